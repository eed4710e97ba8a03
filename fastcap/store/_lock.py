"""One run at a time in an ``out`` directory: ``out/.lock`` names the process that holds it (pid,
host, start time); a lock whose process is gone is stale and taken over."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psutil

from fastcap.store._format import LOCK


class OutLock:
    """Held by the run that writes ``out`` (rank 0 of a torchrun job, for all its ranks).

    Example::

        lock = OutLock.acquire(Path("feats"))   # RuntimeError if another live run holds it
        try:
            ...
        finally:
            lock.release()
    """

    def __init__(self, path: Path, record: dict):
        self.path = path
        self.record = record

    @classmethod
    def acquire(cls, root: Path) -> "OutLock":
        path = root / LOCK
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):  # a stale lock removed under us by a third run: try again
            tmp = root / f"{LOCK}.{record['pid']}.tmp"
            tmp.write_text(json.dumps(record))
            try:
                os.link(tmp, path)  # atomic: fails if a lock is there
                return cls(path, record)
            except FileExistsError:
                holder = _read(path)
                if not _is_stale(holder):
                    raise RuntimeError(
                        f"out={str(root)!r} is in use by another extract run (pid {holder.get('pid')} "
                        f"on host {holder.get('host')!r}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}); "
                        f"wait for it to finish, or, if no such run is alive, delete {str(path)!r}"
                    ) from None
                try:
                    path.unlink()  # stale: its process is gone
                except FileNotFoundError:
                    pass
            finally:
                tmp.unlink(missing_ok=True)
        raise RuntimeError(f"out={str(root)!r}: could not take the lock {str(path)!r}")

    def release(self) -> None:
        """Removes the lock if it is still ours; never raises (it runs on the way out of errors)."""
        try:
            if _read(self.path) == self.record:
                self.path.unlink()
        except OSError:
            pass


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _is_stale(holder: dict) -> bool:
    """A lock of this host whose process has exited (or whose pid now names a newer process).
    A lock of another host cannot be checked from here: it is never stale. An unreadable lock
    (a run killed while writing it) is stale."""
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or host is None:
        return True
    if host != socket.gethostname():
        return False
    try:
        process = psutil.Process(pid)
        return process.create_time() > holder.get("started", 0) + 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
