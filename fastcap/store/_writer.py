"""Writing an extraction: one rank's directory, its shards (built in a temporary directory,
fsynced, renamed into place, then named in the rank manifest), and the writer thread that
drains a capture into them. The format itself is in ``_format.py``.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import threading
import zlib
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fastcap._slots import INDEX_MODE
from fastcap.store._format import (INDICES_SUFFIX, MANIFEST, TOKEN_KEYS, RAW_BITS, encode_runs, fsync_dir, header,
                                   key_meta, merge_manifests, npy_header, out_error, rank_name, read_json,
                                   write_json_atomic)
from fastcap.store._stats import Moments, array_moments, combine, shard_moments

# How long the writer thread waits for a step (or for the main thread's word) between checks
# of its stop flag.
_WRITER_POLL_SECONDS = 0.05
#: Write-behind: a shard's files are flushed to disk each time this many bytes were appended,
#: by the writer thread while the model runs, so that a commit's fsync (the last one on the
#: forward's thread, after the last batch) waits for the last few MiB only.
_SYNC_BYTES = 8 << 20


class RankDir:
    """One rank's committed shards: ``rank-RRRRR.json`` plus ``rank-RRRRR/shard-*``."""

    def __init__(self, root: Path, rank: int, state: dict):
        self.root = root
        self.rank = rank
        self.state = state
        self.dir = root / rank_name(rank)
        self.manifest_path = root / f"{rank_name(rank)}.json"

    @classmethod
    def open(cls, root: Path, rank: int, args: dict, num_samples: int | None,
             description: dict | None = None) -> "RankDir":
        """Load this rank's progress (or start it) and delete anything not committed.

        ``description``: the run's arguments in readable form (the command line's), recorded
        by a new run beside ``args``; not part of what a resume must match."""
        path = root / f"{rank_name(rank)}.json"
        if path.is_file():
            state = read_json(path)
        else:
            state = header(args) | ({"description": description} if description else {}) | {
                "rank": rank, "num_samples": num_samples, "keys": {}, "shards": [], "complete": False}
        rank_dir = cls(root, rank, state)
        try:
            rank_dir.dir.mkdir(exist_ok=True)
            rank_dir.remove_uncommitted()
            if not path.is_file():
                rank_dir.save()
        except OSError as error:
            raise out_error(root, error, "cannot write to it") from error
        return rank_dir

    @property
    def complete(self) -> bool:
        return self.state["complete"]

    @property
    def committed_batches(self) -> int:
        return sum(shard["batches"] for shard in self.state["shards"])

    @property
    def committed_samples(self) -> int:
        return sum(shard["samples"] for shard in self.state["shards"])

    def remove_uncommitted(self) -> None:
        committed = {Path(shard["path"]).name for shard in self.state["shards"]}
        for path in self.dir.iterdir():
            if path.name not in committed:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def save(self) -> None:
        write_json_atomic(self.manifest_path, self.state)


class NpyStream:
    """A ``.npy`` file appended block by block; its fixed-size header is rewritten on close.

    The data's crc32 is computed while writing, for the manifest (no second pass)."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple):
        self.path = path
        self.dtype = dtype
        self.row_shape = row_shape
        self.rows = 0
        self.crc32 = 0
        self._header_size = len(npy_header(dtype, (10**15, *row_shape)))
        self.nbytes = self._header_size
        self._file = builtins.open(path, "wb")
        self._file.write(npy_header(dtype, (0, *row_shape), self._header_size))

    def write(self, array: np.ndarray) -> int:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._file.write(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        self.rows += array.shape[0]
        self.nbytes += data.nbytes
        return data.nbytes

    def sync(self) -> None:
        """The data written so far, on disk."""
        self._file.flush()
        getattr(os, "fdatasync", os.fsync)(self._file.fileno())  # macOS has no fdatasync

    def close(self) -> dict:
        """Finish the file; returns its manifest entry (size in bytes, crc32 of the data)."""
        self._file.seek(0)
        self._file.write(npy_header(self.dtype, (self.rows, *self.row_shape), self._header_size))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"bytes": self.nbytes, "crc32": self.crc32}

    def discard(self) -> None:
        """Close without finishing, ignoring errors: this is clean-up after a failure, whose
        error is the one to report (on a full disk the close's own flush fails again)."""
        try:
            self._file.close()
        except OSError:
            pass


class Shard:
    """A shard being built in ``shard-NNNNNN.tmp/``; :meth:`commit` renames it into place."""

    def __init__(self, rank_dir: RankDir, number: int):
        self.rank_dir = rank_dir
        self.name = f"shard-{number:06d}"
        self.tmp = rank_dir.dir / f"{self.name}.tmp"
        self.tmp.mkdir()
        self.streams: dict[str, NpyStream] = {}
        self.samples = 0
        self.tokens = 0  # kept tokens (rows of the token-major keys), with tokens=
        self.step_rows: list[int] = []  # rows of each step appended, in order
        self.moments: dict[str, Moments | None] = {}  # per statistics key, of every row appended
        self._unsynced = 0  # bytes appended since the files were last flushed to disk

    def append(self, arrays: dict[str, np.ndarray], rows: int, tokens: int = 0) -> int:
        """Append one step's rows (``rows`` samples, ``tokens`` kept tokens); its batch's
        indices come at :meth:`commit`."""
        written = 0
        for key, array in arrays.items():
            meta = self.rank_dir.state["keys"][key]
            if key not in self.streams:
                self.streams[key] = NpyStream(self.tmp / meta["file"], array.dtype, tuple(meta["row_shape"]))
            written += self.streams[key].write(array)
            if meta.get("stats"):
                self.moments[key] = combine(self.moments.get(key), array_moments(array, meta["torch_dtype"]))
        self.samples += rows
        self.tokens += tokens
        self.step_rows.append(rows)
        self._unsynced += written
        if self._unsynced >= _SYNC_BYTES:
            for stream in self.streams.values():
                stream.sync()
            self._unsynced = 0
        return written

    def commit(self, indices: np.ndarray, positions: np.ndarray, columns: dict | None = None) -> None:
        """Close, fsync, rename into place, then name the shard in the rank manifest, with the
        dataset indices (and global positions) of its rows; the rank's running statistics take
        in the shard's rows in the same manifest write. ``columns``: ``{name: array [samples]}``,
        kept columns (labels, ids) written beside the keys, one value per sample row."""
        files = {stream.path.name: stream.close() for stream in self.streams.values()}
        files |= self._write_columns(columns or {})
        state = self.rank_dir.state
        stats = dict(state.get("stats", {}))
        for key, moments in self._moments(positions, state.get("num_samples")).items():
            stats[key] = combine(Moments.from_json(stats.get(key)), moments).to_json()
        fsync_dir(self.tmp)
        final = self.rank_dir.dir / self.name
        os.replace(self.tmp, final)
        fsync_dir(self.rank_dir.dir)
        shards = self.rank_dir.state["shards"]
        shards.append({
            "path": f"{self.rank_dir.dir.name}/{self.name}",
            "samples": self.samples,
            "batches": len(self.step_rows),
            "indices": encode_runs(indices),
            "positions": encode_runs(positions),
            "tokens": self.tokens,
            "files": files,
        })
        previous_stats = state.get("stats")
        state["stats"] = stats
        try:
            self.rank_dir.save()
        except BaseException:
            shards.pop()  # not committed: a rerun deletes the renamed directory
            state["stats"] = previous_stats
            raise

    def _write_columns(self, columns: dict) -> dict:
        """Each kept column as ``<name>.npy`` of the shard (its file recorded in the rank
        manifest's ``columns`` on the first commit); returns their manifest entries."""
        known = self.rank_dir.state.setdefault("columns", {})
        files = {}
        for name, values in columns.items():
            if len(values) != self.samples:
                raise ValueError(f"extract: column {name!r} has {len(values)} values for a shard of "
                                 f"{self.samples} samples")
            if name not in known:
                taken = {meta["file"] for meta in self.rank_dir.state["keys"].values()}
                taken |= {meta["file"] for meta in known.values()}
                known[name] = {"file": _file_name("column." + name, taken), "dtype": values.dtype.str,
                               "row_shape": list(values.shape[1:])}
            values = _column_as(name, values, known[name])
            stream = NpyStream(self.tmp / known[name]["file"], values.dtype, values.shape[1:])
            stream.write(values)
            files[stream.path.name] = stream.close()
        return files

    def _moments(self, positions: np.ndarray, num_samples: int | None) -> dict:
        """Each statistics key's moments over the shard's rows that the store presents: those of
        every row appended; for a shard holding a DistributedSampler's padding duplicates
        (positions >= num_samples), read again from its files without them."""
        keys = self.rank_dir.state["keys"]
        if num_samples is None or not len(positions) or positions.max() < num_samples:
            return {key: moments for key, moments in self.moments.items() if moments is not None}
        keep = positions < num_samples
        moments = {}
        for key, meta in keys.items():
            if not meta.get("stats") or key not in self.streams:
                continue
            rows = keep
            if meta.get("rows") == "tokens":  # a token's sample is a shard row
                rows = keep[np.load(self.streams[TOKEN_KEYS[0]].path).astype(np.int64)]
            result = shard_moments(self.streams[key].path, meta["torch_dtype"], rows)
            if result is not None:
                moments[key] = result
        return moments

    def discard(self) -> None:
        for stream in self.streams.values():
            stream.discard()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ShardWriter:
    """Drains finished capture steps on its own thread and writes them into shards, straight
    from the ring's host memory (device -> pinned -> file: no other copy).

    The main thread calls :meth:`submit` after each batch's forward, once it has checked the
    batch made exactly one step: the n-th step is written with the n-th submitted batch's
    indices, and a step waits in its slots until its batch is confirmed, so rows always
    belong to their items. After a write error the thread keeps draining and discarding, so
    a forward blocked on the capture's backpressure is released and the main thread sees the
    error at its next check.
    """

    def __init__(self, rank_dir: RankDir, shard_size: int, expected_samples: int | None = None,
                 check_space: bool = True, on_estimate=None, sample_tokens: np.ndarray | None = None):
        self.rank_dir = rank_dir
        self.shard_size = shard_size
        self.expected_samples = expected_samples  # this rank's samples in all (None: unknown)
        self.check_space = check_space
        self.on_estimate = on_estimate
        self.sample_tokens = sample_tokens  # the real tokens of each of them (None: unknown)
        self.estimated_bytes: int | None = None
        self.tokens = 0
        self.pending: deque = deque()
        self.max_pending = 0
        self.samples = 0
        self.bytes_written = 0
        self.shards_written = 0
        self._next_position = rank_dir.committed_samples
        self._shard: Shard | None = None
        self._error: BaseException | None = None
        self._submitted = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap = None

    def start(self, cap) -> None:
        self._cap = cap
        self._thread = threading.Thread(target=self._loop, name="fastcap-extract-writer", daemon=True)
        self._thread.start()

    def submit(self, size: int, indices: np.ndarray | None, positions: np.ndarray | None,
               columns: dict | None = None) -> None:
        """The next finished step belongs to this batch (``size`` samples, dataset indices, and
        the values of the kept ``columns``, ``{name: array [size]}``)."""
        if indices is None:
            indices = positions = np.arange(self._next_position, self._next_position + size, dtype=np.int64)
            self._next_position += size
        with self._submitted:
            self.pending.append((size, indices, positions, columns or {}))
            # Batches whose step is not in the shard file yet (the rest only wait to be paired).
            written = len(self._shard.step_rows) if self._shard is not None else 0
            self.max_pending = max(self.max_pending, len(self.pending) - written)
            self._submitted.notify_all()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def failure(self) -> BaseException | None:
        """The writer thread's own error, if it failed (not an abort by the main thread)."""
        return None if isinstance(self._error, _Aborted) else self._error

    def stop(self) -> None:
        """Let the thread drain what is finished, join it, and raise its error if any."""
        self._set_stop()
        self._thread.join()
        self.raise_if_failed()

    def abort(self) -> None:
        """Join the thread and drop the shard in progress (the committed ones stay)."""
        self._error = self._error or _Aborted()
        self._set_stop()
        if self._thread is not None:
            self._thread.join()
        if self._shard is not None:
            self._shard.discard()
            self._shard = None

    def finish(self) -> None:
        """Commit the last shard and mark the rank complete."""
        if self._shard is not None:
            self._guarded(self._commit)
        if self.pending:
            raise RuntimeError(f"extract: {len(self.pending)} batch(es) ran but their steps never reached "
                               "the writer")
        self.rank_dir.state["complete"] = True
        self._guarded(self.rank_dir.save)

    def _set_stop(self) -> None:
        with self._submitted:
            self._stop.set()
            self._submitted.notify_all()
        if self._cap is not None:  # a thread waiting for steps looks again now, and ends
            self._cap._release_waits()

    def _loop(self) -> None:
        try:
            while True:
                stopping = self._stop.is_set()  # read before draining: nothing is left behind
                if not self._drain_once():
                    if stopping:
                        return
                    self._cap.wait_for_steps(_WRITER_POLL_SECONDS)
        except BaseException as error:  # drain() itself failed: release a forward waiting for a slot
            self._error = self._error or error
            self._cap.abort(error)

    def _drain_once(self) -> bool:
        """Write every finished step (or drop it, after an error); False if there was none."""
        drained = False
        for items in self._cap.drain_slots():
            drained = True
            try:
                if self._error is None:
                    self._guarded(self._write_step, items)
            except BaseException as error:  # handed to the main thread, also mid-forward
                self._error = self._error or error
                self._cap.abort(self._error)
            finally:
                for item in items.values():
                    item.release()  # the bytes are in the file: the slot is free again
        return drained

    def _confirmed_batch(self):
        """The next submitted batch, waiting for the main thread's confirmation."""
        with self._submitted:
            while not self.pending:
                if self._error is not None:
                    raise _Aborted()
                if self._stop.is_set():
                    raise RuntimeError("extract: a step reached the writer that no batch submitted")
                self._submitted.wait(_WRITER_POLL_SECONDS)
            return self.pending.popleft()

    def _guarded(self, function, *args):
        """Run a write; an OSError becomes one that names out and says what is kept."""
        try:
            return function(*args)
        except OSError as error:
            shard = self._shard
            if shard is not None:
                shard.discard()
                self._shard = None
            if isinstance(error, NotEnoughSpace):
                raise
            kept = len(self.rank_dir.state["shards"])
            raise OSError(
                error.errno,
                f"extract: writing to out={str(self.rank_dir.root)!r} failed: "
                f"{error.strerror or error}; the {kept} shard(s) of rank {self.rank_dir.rank} "
                "committed before it are kept, and running extract again with the same "
                "arguments resumes after them",
            ) from error

    def _write_step(self, items: Mapping) -> None:
        step = _step_arrays(items, self.rank_dir)
        if self.estimated_bytes is None and self.expected_samples is not None:
            self._estimate(step)
        if self._shard is None:
            self._shard = Shard(self.rank_dir, len(self.rank_dir.state["shards"]))
        if step.index_offset is not None:
            # The token index's samples, renumbered from the capture's count to the shard's own
            # rows: open() maps them to dataset indices through the shard's indices.
            sample = TOKEN_KEYS[0]
            step.arrays[sample] = step.arrays[sample] - step.index_offset + self._shard.samples
        self.bytes_written += self._shard.append(step.arrays, step.samples, step.tokens)
        self.samples += step.samples
        self.tokens += step.tokens
        if self._shard.samples >= self.shard_size:
            self._commit()

    def _estimate(self, step: "StepArrays") -> None:
        """Before the run's first byte reaches the disk: the bytes still to write, extrapolated
        from the first step (its rows per sample, and its rows per kept token); refused when the
        disk has less free (with check_space)."""
        remaining = self.expected_samples - self.rank_dir.committed_samples
        keys = self.rank_dir.state["keys"]
        by_token = [array for name, array in step.arrays.items() if keys[name].get("rows") == "tokens"]
        by_sample = [array for name, array in step.arrays.items() if keys[name].get("rows") != "tokens"]
        per_token = sum(array.itemsize * int(np.prod(array.shape[1:])) for array in by_token)
        payload = (sum(array.nbytes for array in by_sample) / max(step.samples, 1) * remaining
                   + per_token * self._tokens_to_come(step))
        shards = -(-remaining // self.shard_size)
        headers = shards * 128 * len(step.arrays)  # a .npy header per key and shard
        self.estimated_bytes = estimated = int(payload) + headers
        per_sample = payload / max(remaining, 1)
        free = free_bytes(self.rank_dir.root)
        if self.on_estimate is not None:
            self.on_estimate(estimated, free)
        if self.check_space and estimated > free:
            raise NotEnoughSpace(
                errno.ENOSPC,
                f"extract: out={str(self.rank_dir.root)!r} has {size_text(free)} free, but rank "
                f"{self.rank_dir.rank} is about to write about {size_text(estimated)} ({remaining} samples at "
                f"{size_text(per_sample)} each, estimated from the first batch); free some space or choose "
                "another out, or pass check_space=False (--no-check-space) to go ahead")

    def _tokens_to_come(self, step: "StepArrays") -> float:
        """The kept tokens still to write. Where the dataset counts each sample's real tokens
        (padded rows differ in length): those, less the first step's real tokens not kept per
        sample (a skipped BOS, start=); else the first step's kept tokens per sample."""
        remaining = self.expected_samples - self.rank_dir.committed_samples
        samples = max(step.samples, 1)
        if self.sample_tokens is None:
            return step.tokens / samples * remaining
        real = self.sample_tokens[self.rank_dir.committed_samples:]
        dropped = (int(real[:step.samples].sum()) - step.tokens) / samples
        return max(int(real.sum()) - dropped * remaining, 0)

    def _commit(self) -> None:
        """Pair the shard's steps with their confirmed batches, in order, and commit it."""
        shard = self._shard
        batches = [self._confirmed_batch() for _ in shard.step_rows]
        for rows, (size, *_) in zip(shard.step_rows, batches):
            if rows != size:
                raise ValueError(
                    f"extract: a forward pass captured {rows} rows for a batch of {size} samples; "
                    "extract stores one row per sample, so dim 0 of every captured output must be "
                    "the batch")
        columns = {name: _concatenate([b[3][name] for b in batches]) for name in batches[0][3]}
        shard.commit(np.concatenate([b[1] for b in batches]), np.concatenate([b[2] for b in batches]), columns)
        self._shard = None
        self.shards_written += 1


def free_bytes(path: Path) -> int:
    """Bytes free for this user on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def size_text(count: float) -> str:
    """``count`` bytes for people: 512 B, 1.5 MiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{int(count)} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


class NotEnoughSpace(OSError):
    """The disk holds less than the run is estimated to write (raised before writing)."""


class _Aborted(Exception):
    """Marks a writer stopped because the main loop failed; never raised to the user."""


class StepArrays:
    """One step as the shard will store it: {store key: numpy array viewing ring memory}, the
    samples it covers, and (with tokens=) its kept tokens and the token index."""

    def __init__(self, arrays: dict, samples: int, tokens: int, index_offset: int | None):
        self.arrays, self.samples, self.tokens, self.index_offset = arrays, samples, tokens, index_offset


def _step_arrays(items: Mapping, rank_dir: RankDir) -> StepArrays:
    """A step's slots as the arrays a shard stores, checked against the keys seen so far. A
    top-k key is stored as its values and ``key.indices``; the token index as the three
    ``TOKEN_KEYS``; keys with one row per kept token are marked ``"rows": "tokens"``."""
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, torch.dtype] = {}
    token_major: set[str] = set()
    with_stats: set[str] = set()  # vector rows of floats: running statistics are kept for them
    samples = tokens = None
    index_offset = None
    for key, item in items.items():
        views = item.host_views()
        if item.mode == INDEX_MODE:
            names = list(TOKEN_KEYS)
            samples, index_offset = item.info["samples"], item.info["sample_offset"]
        else:
            names = [key, key + INDICES_SUFFIX] if item.mode == "topk" else [key]
        for name, tensor in zip(names, views):
            if name in arrays:
                raise ValueError(f"extract: key {name!r} names both a layer and the indices of a "
                                 "top-k layer; give one of them an alias (layers={alias: name})")
            arrays[name] = _to_numpy(tensor)
            dtypes[name] = tensor.dtype
            if item.counted:
                token_major.add(name)
            if item.mode not in (INDEX_MODE, "topk") and tensor.dim() == 2 and tensor.dtype.is_floating_point:
                with_stats.add(name)
    for name, array in arrays.items():
        if name in token_major:
            tokens = array.shape[0] if tokens is None else tokens
            _check_rows(name, array, tokens, "kept tokens")
        else:
            samples = array.shape[0] if samples is None else samples
            _check_rows(name, array, samples, "samples")
    keys = rank_dir.state["keys"]
    if not keys:  # the first step of the run fixes the keys, their files and row shapes
        for name, array in arrays.items():
            file = _file_name(name, {meta["file"] for meta in keys.values()})
            keys[name] = {"file": file} | key_meta(array, dtypes[name])
            if name in token_major:
                keys[name]["rows"] = "tokens"
            if name in with_stats:
                keys[name]["stats"] = True
    _check_keys(keys, arrays, dtypes)
    return StepArrays(arrays, samples or 0, tokens or 0, index_offset)


def _check_rows(key: str, array: np.ndarray, size: int, what: str = "samples") -> None:
    if array.ndim == 0 or array.shape[0] != size:
        rows = array.shape[0] if array.ndim else "no"
        raise ValueError(
            f"extract: layer {key!r} produced {rows} rows where the step has {size} {what} "
            f"(shape {tuple(array.shape)}); extract stores one row per sample, so dim 0 of "
            "every captured output must be the batch"
        )


def _check_keys(keys: dict, arrays: dict[str, np.ndarray], dtypes: dict) -> None:
    """Every step must hold the keys, dtypes and row shapes of the first one."""
    if set(keys) != set(arrays):
        raise ValueError(
            f"extract: a forward pass captured keys {sorted(arrays)}, earlier ones {sorted(keys)}; "
            "every layer must run the same number of times in every batch"
        )
    for name, array in arrays.items():
        known = {field: keys[name][field] for field in ("dtype", "torch_dtype", "row_shape")}
        now = key_meta(array, dtypes[name])
        if known != now:
            raise ValueError(
                f"extract: layer {name!r} changed from {known['torch_dtype']} rows "
                f"{known['row_shape']} to {now['torch_dtype']} rows {now['row_shape']}; extract "
                "needs the same row shape in every batch (resize inputs to one size, or use "
                "reduce='mean')"
            )


def _file_name(key: str, taken: set[str]) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in key).lstrip(".") or "_"
    name, number = f"{stem}.npy", 1
    while name in taken:
        name, number = f"{stem}_{number}.npy", number + 1
    return name


def _concatenate(parts: list) -> np.ndarray:
    """One column's values over a shard's batches (strings of any width, numbers as they came)."""
    return np.concatenate(parts) if parts else np.zeros(0)


def _column_as(name: str, values: np.ndarray, meta: dict) -> np.ndarray:
    """A shard's values of a kept column in the column's recorded dtype: strings keep their own
    width, numbers are cast within their kind (int64 stays int64); anything else names it."""
    recorded = np.dtype(meta["dtype"])
    if list(values.shape[1:]) != meta["row_shape"]:
        raise ValueError(f"extract: column {name!r} changed from values of shape {tuple(meta['row_shape'])} "
                         f"to {tuple(values.shape[1:])}")
    if recorded.kind == "U" and values.dtype.kind == "U":
        return values
    if values.dtype == recorded or (values.dtype.kind != "U" and np.can_cast(values.dtype, recorded, "same_kind")):
        return values.astype(recorded, copy=False)
    raise ValueError(f"extract: column {name!r} changed from {recorded} values to {values.dtype} ones; "
                     "every batch must give it values of one kind")


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a host tensor (no copy when it is contiguous, as slots lay it out)."""
    tensor = tensor.detach().cpu().contiguous()
    try:
        return tensor.numpy()
    except TypeError:  # bfloat16, float8: keep the raw bits
        return tensor.view(RAW_BITS[tensor.element_size()]).numpy()


def write_merged_manifest(root: Path, world_size: int) -> None:
    """Rank 0, after the barrier: merge every rank's manifest into ``manifest.json``."""
    ranks = [read_json(root / f"{rank_name(rank)}.json") for rank in range(world_size)]
    manifest = merge_manifests(ranks)
    try:
        write_json_atomic(root / MANIFEST, manifest)
    except OSError as error:
        raise out_error(root, error, f"cannot write {MANIFEST}") from error
