"""Writing an extraction: one rank's directory, its shards (built in a temporary directory,
fsynced, renamed into place, then named in the rank manifest), and the writer thread that
drains a capture into them. The format itself is in ``_format.py``.
"""

from __future__ import annotations

import builtins
import os
import shutil
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fastcap._slots import TopK
from fastcap.store._format import (INDICES_SUFFIX, MANIFEST, RAW_BITS, encode_runs, fsync_dir, header,
                                   key_meta, merge_manifests, npy_header, out_error, rank_name, read_json,
                                   write_json_atomic)

# How long the writer thread sleeps when a drain() found nothing new.
_WRITER_POLL_SECONDS = 0.002


class RankDir:
    """One rank's committed shards: ``rank-RRRRR.json`` plus ``rank-RRRRR/shard-*``."""

    def __init__(self, root: Path, rank: int, state: dict):
        self.root = root
        self.rank = rank
        self.state = state
        self.dir = root / rank_name(rank)
        self.manifest_path = root / f"{rank_name(rank)}.json"

    @classmethod
    def open(cls, root: Path, rank: int, args: dict, num_samples: int | None) -> "RankDir":
        """Load this rank's progress (or start it) and delete anything not committed."""
        path = root / f"{rank_name(rank)}.json"
        if path.is_file():
            state = read_json(path)
        else:
            state = header(args) | {"rank": rank, "num_samples": num_samples, "keys": {},
                                     "shards": [], "complete": False}
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
    """A ``.npy`` file appended block by block; its fixed-size header is rewritten on close."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple):
        self.path = path
        self.dtype = dtype
        self.row_shape = row_shape
        self.rows = 0
        self._header_size = len(npy_header(dtype, (10**15, *row_shape)))
        self._file = builtins.open(path, "wb")
        self._file.write(npy_header(dtype, (0, *row_shape), self._header_size))

    def write(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        self._file.write(array.reshape(-1).view(np.uint8))
        self.rows += array.shape[0]
        return array.nbytes

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(npy_header(self.dtype, (self.rows, *self.row_shape), self._header_size))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()


class Shard:
    """A shard being built in ``shard-NNNNNN.tmp/``; :meth:`commit` renames it into place."""

    def __init__(self, rank_dir: RankDir, number: int):
        self.rank_dir = rank_dir
        self.name = f"shard-{number:06d}"
        self.tmp = rank_dir.dir / f"{self.name}.tmp"
        self.tmp.mkdir()
        self.streams: dict[str, NpyStream] = {}
        self.samples = 0
        self.batches = 0
        self.indices: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []

    def append(self, arrays: dict[str, np.ndarray], indices: np.ndarray, positions: np.ndarray) -> int:
        written = 0
        for key, array in arrays.items():
            meta = self.rank_dir.state["keys"][key]
            if key not in self.streams:
                self.streams[key] = NpyStream(self.tmp / meta["file"], array.dtype, tuple(meta["row_shape"]))
            written += self.streams[key].write(array)
        self.samples += len(indices)
        self.batches += 1
        self.indices.append(indices)
        self.positions.append(positions)
        return written

    def commit(self) -> None:
        """Close, fsync, rename into place, then name the shard in the rank manifest."""
        for stream in self.streams.values():
            stream.close()
        fsync_dir(self.tmp)
        final = self.rank_dir.dir / self.name
        os.replace(self.tmp, final)
        fsync_dir(self.rank_dir.dir)
        shards = self.rank_dir.state["shards"]
        shards.append({
            "path": f"{self.rank_dir.dir.name}/{self.name}",
            "samples": self.samples,
            "batches": self.batches,
            "indices": encode_runs(np.concatenate(self.indices)),
            "positions": encode_runs(np.concatenate(self.positions)),
        })
        try:
            self.rank_dir.save()
        except BaseException:
            shards.pop()  # not committed: a rerun deletes the renamed directory
            raise

    def discard(self) -> None:
        for stream in self.streams.values():
            stream.discard()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ShardWriter:
    """Drains finished capture steps on its own thread and writes them into shards.

    The main thread calls :meth:`submit` before each forward (so the writer can pair the
    n-th step with the n-th batch's indices) and :meth:`raise_if_failed` between forwards.
    After a write error the thread keeps draining and discarding, so a forward blocked on the
    capture's backpressure is released and the main thread sees the error at its next check.
    """

    def __init__(self, rank_dir: RankDir, shard_size: int):
        self.rank_dir = rank_dir
        self.shard_size = shard_size
        self.pending: deque = deque()
        self.max_pending = 0
        self.samples = 0
        self.bytes_written = 0
        self.shards_written = 0
        self._next_position = rank_dir.committed_samples
        self._shard: Shard | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap = None

    def start(self, cap) -> None:
        self._cap = cap
        self._thread = threading.Thread(target=self._loop, name="fastcap-extract-writer", daemon=True)
        self._thread.start()

    def submit(self, size: int, indices: np.ndarray | None, positions: np.ndarray | None) -> None:
        if indices is None:
            indices = positions = np.arange(self._next_position, self._next_position + size, dtype=np.int64)
            self._next_position += size
        self.pending.append((size, indices, positions))
        self.max_pending = max(self.max_pending, len(self.pending))

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Let the thread drain what is finished, join it, and raise its error if any."""
        self._stop.set()
        self._thread.join()
        self.raise_if_failed()

    def abort(self) -> None:
        """Join the thread and drop the shard in progress (the committed ones stay)."""
        self._error = self._error or _Aborted()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._shard is not None:
            self._shard.discard()
            self._shard = None

    def finish(self, rest: dict) -> None:
        """Write the steps the thread did not get (``cap.result()``), commit, mark complete."""
        sizes = [size for size, _, _ in self.pending]
        if sizes:
            for step in _split_steps(rest, sizes):
                self._guarded(self._write_step, step)
        if self._shard is not None:
            self._guarded(self._commit)
        self.rank_dir.state["complete"] = True
        self._guarded(self.rank_dir.save)

    def _loop(self) -> None:
        try:
            while True:
                stopping = self._stop.is_set()  # read before draining: nothing is left behind
                if not self._drain_once():
                    if stopping:
                        return
                    self._stop.wait(_WRITER_POLL_SECONDS)
        except BaseException as error:  # drain() itself failed: release a forward waiting for a slot
            self._error = self._error or error
            self._cap.abort(error)

    def _drain_once(self) -> bool:
        """Write every finished step (or drop it, after an error); False if there was none."""
        drained = False
        for step in self._cap.drain():
            drained = True
            if self._error is None:
                try:
                    self._guarded(self._write_step, step)
                except BaseException as error:  # handed to the main thread
                    self._error = error
        return drained

    def _guarded(self, function, *args):
        """Run a write; an OSError becomes one that names out and says what is kept."""
        try:
            return function(*args)
        except OSError as error:
            shard = self._shard
            if shard is not None:
                shard.discard()
                self._shard = None
            kept = len(self.rank_dir.state["shards"])
            raise OSError(
                error.errno,
                f"extract: writing to out={str(self.rank_dir.root)!r} failed: "
                f"{error.strerror or error}; the {kept} shard(s) of rank {self.rank_dir.rank} "
                "committed before it are kept, and running extract again with the same "
                "arguments resumes after them",
            ) from error

    def _write_step(self, step: Mapping) -> None:
        size, indices, positions = self.pending.popleft()
        arrays = _step_arrays(step, size, self.rank_dir)
        if self._shard is None:
            self._shard = Shard(self.rank_dir, len(self.rank_dir.state["shards"]))
        self.bytes_written += self._shard.append(arrays, indices, positions)
        self.samples += size
        if self._shard.samples >= self.shard_size:
            self._commit()

    def _commit(self) -> None:
        self._shard.commit()
        self._shard = None
        self.shards_written += 1


class _Aborted(Exception):
    """Marks a writer stopped because the main loop failed; never raised to the user."""


def _step_arrays(step: Mapping, size: int, rank_dir: RankDir) -> dict[str, np.ndarray]:
    """A capture step as {store key: numpy array}; checks it against the keys seen so far."""
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, torch.dtype] = {}
    for key, value in step.items():
        if isinstance(value, TopK):
            parts = {key: value.values, key + INDICES_SUFFIX: value.indices}
        else:
            parts = {key: value}
        for name, tensor in parts.items():
            if name in arrays:
                raise ValueError(f"extract: key {name!r} names both a layer and the indices of a "
                                 "top-k layer; give one of them an alias (layers={alias: name})")
            arrays[name] = _to_numpy(tensor)
            dtypes[name] = tensor.dtype
            _check_rows(name, arrays[name], size)
    keys = rank_dir.state["keys"]
    if not keys:  # the first step of the run fixes the keys, their files and row shapes
        for name, array in arrays.items():
            file = _file_name(name, {meta["file"] for meta in keys.values()})
            keys[name] = {"file": file} | key_meta(array, dtypes[name])
    _check_keys(keys, arrays, dtypes)
    return arrays


def _check_rows(key: str, array: np.ndarray, size: int) -> None:
    if array.ndim == 0 or array.shape[0] != size:
        rows = array.shape[0] if array.ndim else "no"
        raise ValueError(
            f"extract: layer {key!r} produced {rows} rows for a batch of {size} samples "
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
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in key) or "_"
    name, number = f"{stem}.npy", 1
    while name in taken:
        name, number = f"{stem}_{number}.npy", number + 1
    return name


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    try:
        return tensor.numpy()
    except TypeError:  # bfloat16, float8: keep the raw bits
        return tensor.view(RAW_BITS[tensor.element_size()]).numpy()


def _split_steps(rest: Mapping, sizes: list[int]) -> list[dict]:
    """Cut ``cap.result()`` (the undrained steps, concatenated) back into one dict per batch."""
    if not rest:
        raise RuntimeError(f"extract: {len(sizes)} batches ran but the capture returned no data for them")
    steps = [{} for _ in sizes]
    for key, value in rest.items():
        if isinstance(value, TopK):
            parts = zip(value.values.split(sizes), value.indices.split(sizes))
            pieces = [TopK(v, i) for v, i in parts]
        else:
            pieces = value.split(sizes)
        for step, piece in zip(steps, pieces):
            step[key] = piece
    return steps


def write_merged_manifest(root: Path, world_size: int) -> None:
    """Rank 0, after the barrier: merge every rank's manifest into ``manifest.json``."""
    ranks = [read_json(root / f"{rank_name(rank)}.json") for rank in range(world_size)]
    manifest = merge_manifests(ranks)
    try:
        write_json_atomic(root / MANIFEST, manifest)
    except OSError as error:
        raise out_error(root, error, f"cannot write {MANIFEST}") from error
