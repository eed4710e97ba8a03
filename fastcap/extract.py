"""Dataset-scale extraction to disk: :func:`extract` writes a store, :func:`open` reads it.

``extract`` runs a model over a DataLoader (or any iterable of batches) under
``torch.inference_mode()``, captures the chosen layers with :func:`fastcap.capture`, and hands
each finished forward pass to a writer thread that streams it into ``.npy`` files. The forward
loop never waits on disk unless the writer falls behind by more than the capture ring's depth;
then the capture's backpressure holds the forward, so host memory stays bounded whatever the
dataset size.

Layout of ``out/`` (every file is written to a temporary name, fsynced, then renamed)::

    manifest.json                      merged manifest, written once every rank has finished
    rank-00000.json                    rank 0's progress: names only committed shards
    rank-00000/shard-000000/layer4.npy one .npy per key per shard, rows in the rank's order
    rank-00001.json, rank-00001/...    further ranks under torchrun

A shard is a run of whole batches holding at least ``shard_size`` samples (the last one may
hold fewer). It is built in ``shard-NNNNNN.tmp/`` and renamed into place before the rank
manifest names it, so a killed run leaves only committed shards behind; running ``extract``
again with the same arguments skips their batches and produces the same bytes an
uninterrupted run would.

Keys: a ``full`` or ``mean`` layer is stored under its capture key (``"layer4"``); a ``topk``
layer as two arrays, ``"layer4"`` (the values) and ``"layer4.indices"`` (int64 channel
indices). ``bfloat16`` and other dtypes numpy lacks are stored as unsigned integers of the
same width (their raw bits); ``LayerArray.tensor()`` gives them back as torch tensors of the
original dtype.
"""

from __future__ import annotations

import builtins
import difflib
import hashlib
import json
import os
import shutil
import struct
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from fastcap._layers import model_device
from fastcap.capture import TopK, capture

__all__ = ["extract", "open", "Store", "LayerArray"]

FORMAT = "fastcap-extract"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDICES_SUFFIX = ".indices"

# How long the writer thread sleeps when a drain() found nothing new.
_WRITER_POLL_SECONDS = 0.002

# Unsigned integer dtypes used to store the raw bits of dtypes numpy lacks (bfloat16, float8).
_RAW_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def extract(
    model: torch.nn.Module,
    data: Iterable,
    layers,
    reduce="full",
    *,
    out: str | os.PathLike,
    k: int | None = None,
    channel_dim=1,
    dtype: torch.dtype | None = None,
    select=None,
    shard_size: int = 4096,
    overwrite: bool = False,
    progress: bool | None = None,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    depth: int = 4,
) -> "Store":
    """Run ``model`` over ``data`` and write the captured layers to ``out/``; return the store.

    Args:
        model: the model; batches are moved to the device of its first parameter (or buffer),
            with ``non_blocking=True`` when the DataLoader pinned them.
        data: a ``DataLoader`` or any iterable of batches. A batch is a tensor, a tuple/list
            whose first element is the input (``(images, labels)``), or a dict passed as
            keyword arguments; pass ``forward`` for anything else. For a DataLoader over a
            map-style dataset, stored rows carry the dataset indices and run in the
            loader's sampler order (dataset order when it shuffles, with a warning);
            for other iterables the indices are running sample counters.
        layers, reduce, k, channel_dim, dtype, select, depth: as for :func:`fastcap.capture`.
        out: the output directory (created if missing).
        shard_size: samples per shard, the unit of crash safety and resume (whole batches,
            so a shard holds at least this many samples, the last one fewer).
        overwrite: replace an extraction in ``out`` made with different arguments (without
            it, that is a ``ValueError`` naming the argument). An extraction made with the
            same arguments is resumed, or returned as is when complete, either way; delete
            ``out`` to recompute from scratch.
        progress: show a tqdm progress bar; default: only when stderr is a terminal.
        forward: ``forward(model, batch)`` runs one batch already on the model's device;
            default ``model(batch)``, ``model(batch[0])``, or ``model(**batch)``.

    Under ``torchrun`` it initialises torch.distributed when the script has not (gloo on CPU,
    NCCL on CUDA), splits the loader's dataset with ``DistributedSampler(shuffle=False)``,
    each rank writes its own shards, and rank 0 merges the manifest after a barrier.

    Raises:
        ValueError: mismatched arguments against an existing extraction, a non-fastcap
            non-empty ``out``, or invalid arguments.
        OSError: ``out`` cannot be written (disk full, read-only, a file in the way); the
            shards committed before the failure are kept and a rerun resumes after them.

    Example:
        >>> loader = DataLoader(dataset, batch_size=64, num_workers=4, pin_memory=True)
        >>> store = fastcap.extract(model.eval(), loader, ["layer3", "layer4"],
        ...                         reduce="mean", out="feats/")
        >>> store["layer4"].shape
        (50000, 2048)
    """
    store, _ = _extract(
        model, data, layers, reduce, out=out, k=k, channel_dim=channel_dim, dtype=dtype,
        select=select, shard_size=shard_size, overwrite=overwrite, progress=progress,
        forward=forward, depth=depth,
    )
    return store


def open(out: str | os.PathLike) -> "Store":  # noqa: A001 - mirrors fastcap.open in the API
    """Open the extraction in ``out/`` written by :func:`extract`.

    A finished extraction opens with ``store.complete`` True. An unfinished one (killed, or
    still running) opens as what its ranks have committed so far, with ``store.complete``
    False and a ``UserWarning`` saying so.

    Example:
        >>> store = fastcap.open("feats/")
        >>> x = store["layer4"]                       # LayerArray [N, 2048], memory-mapped
        >>> t = torch.from_numpy(x[:1024])            # rows 0..1023 as a tensor
        >>> store.indices[:3]                         # their dataset indices
        array([0, 1, 2])
    """
    root = Path(out)
    merged = root / MANIFEST
    if merged.is_file():
        return Store(root, _read_json(merged))
    rank_files = sorted(root.glob("rank-*.json"))
    if not rank_files:
        raise FileNotFoundError(
            f"out={str(out)!r} holds no fastcap extraction (no {MANIFEST} and no rank-*.json)"
        )
    manifest = _merge_manifests([_read_json(p) for p in rank_files])
    store = Store(root, manifest)
    expected = manifest.get("num_samples")
    of_total = f" of {expected}" if expected is not None else ""
    warnings.warn(
        f"{str(out)!r} holds an unfinished extraction: {len(store.indices)}{of_total} samples "
        "committed; run extract again with the same arguments to finish it",
        UserWarning,
        stacklevel=2,
    )
    return store


# --------------------------------------------------------------------------------------------
# Reading: Store and LayerArray
# --------------------------------------------------------------------------------------------


class Store(Mapping):
    """An extraction on disk: a mapping from key to :class:`LayerArray`, in dataset order.

    Attributes:
        path: the ``out`` directory.
        manifest: the parsed manifest (arguments, versions, keys, shards).
        complete: False when the run that wrote it has not finished.
        indices: int64 numpy array, the dataset index of every row.

    Example:
        >>> store = fastcap.open("feats/")
        >>> list(store)                      # ['layer3', 'layer4']
        >>> store["layer4"][10:20].mean()
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.complete = bool(manifest.get("complete", False))
        self._keys = manifest.get("keys", {})
        self._shards = manifest.get("shards", [])
        self._arrays: dict[str, LayerArray] = {}  # one per key, so its memory maps are reused
        self._locate_rows()

    def _locate_rows(self) -> None:
        """Map each row in dataset order to (shard, row in shard)."""
        counts = [shard["samples"] for shard in self._shards]
        order, indices = _dataset_order(self._shards, self.manifest.get("num_samples"))
        shard_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])[:-1]
        self.indices = indices[order]
        self._shard_of = shard_of[order]
        self._row_of = order - starts[self._shard_of]
        self._starts = starts
        self._contiguous = bool(np.array_equal(order, np.arange(len(order))))

    def __getitem__(self, key: str) -> "LayerArray":
        if key not in self._keys:
            close = difflib.get_close_matches(key, list(self._keys), n=3)
            hint = f"; did you mean {close}?" if close else f"; keys: {list(self._keys)}"
            raise KeyError(f"{key!r} is not in the store at {str(self.path)!r}{hint}")
        if key not in self._arrays:
            self._arrays[key] = LayerArray(self, key, self._keys[key])
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return (f"Store({str(self.path)!r}, {len(self.indices)} samples, {state}, "
                f"keys={list(self._keys)})")

    def _shard_path(self, shard: int, key: str) -> Path:
        return self.path / self._shards[shard]["path"] / self._keys[key]["file"]


class LayerArray:
    """One key of a :class:`Store`: an array-like ``[N, ...]`` over memory-mapped shards.

    Indexing the first dimension returns a numpy array: a zero-copy memory map when the rows
    lie in one shard, else a gathered copy. ``np.asarray(a)`` reads everything;
    ``a.shards`` lists the per-shard memory maps in file order.

    Example:
        >>> a = store["layer4"]
        >>> a.shape, a.dtype
        ((50000, 2048), dtype('float32'))
        >>> batch = torch.from_numpy(a[0:256])     # or a.tensor(slice(0, 256))
    """

    def __init__(self, store: Store, key: str, meta: dict):
        self._store = store
        self.key = key
        self.dtype = np.dtype(meta["dtype"])
        self.torch_dtype = getattr(torch, meta["torch_dtype"])
        self.row_shape = tuple(meta["row_shape"])
        self.shape = (len(store.indices),) + self.row_shape
        self.ndim = len(self.shape)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LayerArray({self.key!r}, shape={self.shape}, dtype={self.dtype})"

    @property
    def shards(self) -> list[np.ndarray]:
        """The memory map of every shard, in file order (rank, then shard)."""
        return [self._map(i) for i in range(len(self._store._shards))]

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            # "c": copy-on-write, so torch.from_numpy gets a writable array and disk stays intact.
            self._maps[shard] = np.load(self._store._shard_path(shard, self.key), mmap_mode="c")
        return self._maps[shard]

    def __getitem__(self, index):
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if rows is Ellipsis:
            return self[:][index]
        n = len(self)
        if isinstance(rows, (int, np.integer)):
            if not -n <= rows < n:
                raise IndexError(f"row {rows} is out of range for {self.key!r} with {n} rows")
            row = int(rows) % n
            return self._map(int(self._store._shard_of[row]))[self._store._row_of[row]][rest]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1 and self._store._contiguous:
                return self._slice(start, max(start, stop))[(slice(None),) + rest]
            rows = np.arange(start, stop, step)
        else:
            rows = np.arange(n)[np.asarray(rows)]
        return self._gather(rows)[(slice(None),) + rest]

    def _slice(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of a contiguous store: a view when they lie in one shard."""
        if stop <= start:
            return np.empty((0,) + self.row_shape, self.dtype)
        starts = self._store._starts
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, stop - 1, side="right")) - 1
        if first == last:
            return self._map(first)[start - starts[first]:stop - starts[first]]
        parts = [self._map(s)[max(start - starts[s], 0):stop - starts[s]]
                 for s in range(first, last + 1)]
        return np.concatenate(parts)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        result = np.empty((len(rows),) + self.row_shape, self.dtype)
        shards = self._store._shard_of[rows]
        within = self._store._row_of[rows]
        for shard in np.unique(shards):
            pick = shards == shard
            result[pick] = self._map(int(shard))[within[pick]]
        return result

    def __array__(self, dtype=None, copy=None):
        data = self[:]
        return data if dtype is None else data.astype(dtype)

    def __iter__(self):
        for row in range(len(self)):
            yield self[row]

    def tensor(self, rows=slice(None)) -> torch.Tensor:
        """Rows as a torch tensor of the captured dtype (bfloat16 included).

        Example:
            >>> store["layer4"].tensor(slice(0, 8)).dtype
            torch.bfloat16
        """
        data = np.ascontiguousarray(self[rows])
        tensor = torch.from_numpy(data)
        return tensor if tensor.dtype == self.torch_dtype else tensor.view(self.torch_dtype)


# --------------------------------------------------------------------------------------------
# The extraction run
# --------------------------------------------------------------------------------------------


def _extract(model, data, layers, reduce, *, out, k, channel_dim, dtype, select, shard_size,
             overwrite, progress, forward, depth) -> tuple[Store, dict]:
    """:func:`extract`, also returning run statistics (for the command line summary)."""
    _check_arguments(model, data, out, shard_size, depth)
    # Built first so that bad layers/reduce/k fail before out is touched; hooks come later.
    cap = capture(model, layers, reduce, k=k, channel_dim=channel_dim, dtype=dtype,
                  select=select, depth=depth, _backpressure=True)
    device = model_device(model)
    group = _ProcessGroup.join(device)
    try:
        source = _make_source(data, group.rank, group.world_size)
        args = _fingerprint(model, source, layers, reduce, k, channel_dim, dtype, select,
                            shard_size, group.world_size)
        group.check_same(args["model"], "model parameters")
        root = Path(out)
        group.run_on_rank0(lambda: _prepare_out(root, args, overwrite))
        rank_dir = _RankDir.open(root, group.rank, args, source.num_samples)
        stats = _run_rank(model, cap, device, source, rank_dir, shard_size,
                          _show_progress(progress, group.rank), forward or _default_forward)
        group.barrier()
        if group.rank == 0 and not (root / MANIFEST).is_file():
            _write_merged_manifest(root, group.world_size)
        group.barrier()
        stats.update(rank=group.rank, world_size=group.world_size)
        return open(root), stats
    finally:
        group.leave()


def _check_arguments(model, data, out, shard_size, depth) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if out is None:
        raise ValueError("out must name the output directory, got None")
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        raise TypeError(
            f"data must be a DataLoader or an iterable of batches, got the dataset "
            f"{type(data).__name__}; wrap it: DataLoader(dataset, batch_size=64)"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader or an iterable of batches, got {type(data).__name__}")
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")


def _run_rank(model, cap, device, source, rank_dir, shard_size, show_progress, forward) -> dict:
    """Run this rank's remaining batches; every step ends up in a committed shard."""
    from tqdm.auto import tqdm

    stats = {"samples": 0, "seconds": 0.0, "bytes_written": 0, "shards_written": 0,
             "resumed_samples": rank_dir.committed_samples, "stall_seconds": 0.0,
             "max_pending_steps": 0}
    if rank_dir.complete:
        return stats
    if model.training:
        warnings.warn("extract: model is in training mode (dropout, batch-norm updates); "
                      "call model.eval() first for reproducible features", UserWarning, stacklevel=4)
    batches = source.batches(rank_dir.committed_batches, pin=device.type == "cuda")
    writer = _ShardWriter(rank_dir, shard_size)
    started = time.perf_counter()
    with tqdm(total=source.rank_samples, initial=rank_dir.committed_samples, unit="item",
              desc="extract", disable=not show_progress, file=sys.stderr, dynamic_ncols=True) as bar:
        with torch.inference_mode(), cap:
            _forward_all(model, cap, batches, writer, device, forward, bar)
            stats["stall_seconds"] = float(cap.stats().get("stall_seconds", 0.0))
        # Steps the writer thread had not drained when the loop ended (still in flight on
        # CUDA) are finished by the capture's exit and handed out by result().
        writer.finish(cap.result() if writer.pending else {})
    stats.update(samples=writer.samples, seconds=time.perf_counter() - started,
                 bytes_written=writer.bytes_written, shards_written=writer.shards_written,
                 max_pending_steps=writer.max_pending)
    return stats


def _forward_all(model, cap, batches, writer: "_ShardWriter", device, forward, bar) -> None:
    """The forward loop: the writer thread drains ``cap`` while this thread runs the model."""
    writer.start(cap)
    try:
        for batch, indices, positions in batches:
            writer.raise_if_failed()
            size = len(indices) if indices is not None else _batch_size(batch)
            writer.submit(size, indices, positions)  # before the forward: the writer pairs them
            forward(model, _to_device(batch, device))
            bar.update(size)
        writer.stop()
    except BaseException:
        writer.abort()
        raise


def _default_forward(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _batch_size(batch) -> int:
    """Rows in a batch: dim 0 of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        values = []
    for value in values:
        try:
            return _batch_size(value)
        except TypeError:
            continue
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__} batch: it holds no tensor")


def _to_device(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        moved = [_to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _show_progress(progress: bool | None, rank: int) -> bool:
    if progress is None:
        return rank == 0 and sys.stderr.isatty()
    return bool(progress) and rank == 0


# --------------------------------------------------------------------------------------------
# Where batches come from: map-style plans and plain iterables
# --------------------------------------------------------------------------------------------


class _MapSource:
    """A DataLoader over a map-style dataset, replanned as explicit batches of indices.

    ``positions`` are places in the global (all-rank) order; under torch.distributed rank r
    holds positions r, r + W, ... of the DistributedSampler's padded list, and positions
    >= num_samples are its padding.
    """

    kind = "map"

    def __init__(self, loader: DataLoader, rank: int, world_size: int):
        self.loader = loader
        order = self._order(loader)
        self.num_samples = len(order)
        self.order_digest = hashlib.sha256(order.astype("<i8").tobytes()).hexdigest()[:16]
        self.batch_size = loader.batch_size
        if world_size > 1:
            sampler = DistributedSampler(order, num_replicas=world_size, rank=rank, shuffle=False)
            taken = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
            indices = order[taken]
            positions = np.arange(rank, sampler.total_size, world_size, dtype=np.int64)
        else:
            indices, positions = order, np.arange(len(order), dtype=np.int64)
        self.rank_samples = len(indices)
        cuts = range(0, len(indices), self.batch_size)
        self.plan = [(indices[c:c + self.batch_size], positions[c:c + self.batch_size]) for c in cuts]
        if loader.drop_last and self.plan and len(self.plan[-1][0]) < self.batch_size:
            self.plan.pop()
            self.rank_samples = sum(len(b) for b, _ in self.plan)

    @staticmethod
    def _order(loader: DataLoader) -> np.ndarray:
        """The loader's sample order: its sampler's, or dataset order when it shuffles."""
        if isinstance(loader.sampler, DistributedSampler):  # the script's own split: redone here
            return np.arange(len(loader.dataset), dtype=np.int64)
        if isinstance(loader.sampler, RandomSampler):
            warnings.warn("extract: the DataLoader shuffles; extract runs in dataset order "
                          "instead, so that an interrupted run can resume", UserWarning, stacklevel=6)
            return np.arange(len(loader.dataset), dtype=np.int64)
        return np.fromiter((int(i) for i in loader.sampler), dtype=np.int64)

    def batches(self, skip_batches: int, pin: bool):
        """Yield (batch, indices, positions) for the batches after the first ``skip_batches``.

        The skipped batches are not loaded: a new DataLoader (same dataset, workers and
        collate_fn) runs over the remaining batches of the plan.
        """
        plan = self.plan[skip_batches:]
        if not plan:
            return
        old = self.loader
        kwargs = dict(batch_sampler=[b.tolist() for b, _ in plan], num_workers=old.num_workers,
                      collate_fn=old.collate_fn, pin_memory=pin,
                      timeout=old.timeout, worker_init_fn=old.worker_init_fn,
                      multiprocessing_context=old.multiprocessing_context, generator=old.generator)
        if old.num_workers > 0:
            kwargs["prefetch_factor"] = old.prefetch_factor
        loader = DataLoader(old.dataset, **kwargs)
        for batch, (indices, positions) in zip(loader, plan):
            yield batch, indices, positions


class _IterableSource:
    """Any other iterable of batches; rows are numbered by running sample counters."""

    kind = "iterable"
    num_samples = None
    rank_samples = None
    batch_size = None
    order_digest = None

    def __init__(self, data: Iterable):
        self.data = data

    def batches(self, skip_batches: int, pin: bool):
        """Yield (batch, None, None) after consuming, without running them, ``skip_batches``."""
        iterator = iter(self.data)
        for skipped in range(skip_batches):
            if next(iterator, _END) is _END:
                raise ValueError(
                    f"data ended after {skipped} batches, but the extraction in out already "
                    f"committed {skip_batches}: this is not the data it was started with"
                )
        for batch in iterator:
            yield batch, None, None


_END = object()


def _make_source(data, rank: int, world_size: int):
    map_style = (isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset)
                 and data.batch_sampler is not None)
    if map_style and isinstance(data.batch_sampler, BatchSampler):
        return _MapSource(data, rank, world_size)
    if world_size > 1:
        raise ValueError(
            "under torch.distributed, data must be a DataLoader with batch_size over a map-style "
            f"dataset (so that it can be split with a DistributedSampler), got {type(data).__name__}"
            + (" with a custom batch_sampler" if map_style else "")
        )
    return _IterableSource(data)


# --------------------------------------------------------------------------------------------
# Arguments recorded in the manifest, and the check against an existing extraction
# --------------------------------------------------------------------------------------------


def _fingerprint(model, source, layers, reduce, k, channel_dim, dtype, select, shard_size,
                 world_size) -> dict:
    """The arguments that determine the output; a resumed run must match them exactly."""
    return {
        "layers": _jsonable(layers),
        "reduce": _jsonable(reduce),
        "k": _jsonable(k),
        "channel_dim": _jsonable(channel_dim),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "select": _jsonable(select),
        "shard_size": shard_size,
        "world_size": world_size,
        "data": source.kind,
        "num_samples": source.num_samples,
        "batch_size": source.batch_size,
        "sample_order": source.order_digest,
        "model": _model_digest(model),
    }


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


def _model_digest(model: torch.nn.Module) -> str:
    """Class, parameter names, shapes, dtypes and a strided sample of every tensor's values.

    Sampling (at most 1024 values per tensor) keeps this cheap for large models while still
    telling apart two random initialisations or two checkpoints.
    """
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _prepare_out(root: Path, args: dict, overwrite: bool) -> None:
    """Create ``out``; refuse (or, with overwrite, clear) an extraction with other arguments."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _out_error(root, error, "cannot create it") from error
    existing = _existing_arguments(root)
    if existing is None:
        foreign = [p.name for p in root.iterdir() if not _is_ours(p)]
        if foreign and not overwrite:
            raise ValueError(
                f"out={str(root)!r} is not empty and holds no fastcap extraction "
                f"(found {sorted(foreign)[:3]}); choose an empty or new directory"
            )
        return
    if existing == args:
        return
    if not overwrite and _committed_shards(root):
        raise ValueError(_mismatch_message(root, existing, args))
    _remove_extraction(root)  # with overwrite, or nothing was committed: nothing to lose


def _committed_shards(root: Path) -> int:
    return sum(len(_read_json(path)["shards"]) for path in root.glob("rank-*.json"))


def _existing_arguments(root: Path) -> dict | None:
    candidates = [root / MANIFEST, *sorted(root.glob("rank-*.json"))]
    for path in candidates:
        if path.is_file():
            return _read_json(path).get("args")
    return None


_MISMATCH_HINTS = {
    "model": " (a digest of the weights: seed the initialisation or load the same checkpoint)",
    "sample_order": " (a digest of the order the DataLoader's sampler gives: use a "
                    "deterministic sampler)",
    "world_size": " (the number of torchrun processes)",
}


def _mismatch_message(root: Path, existing: dict, args: dict) -> str:
    differing = [key for key in args if existing.get(key) != args[key]]
    differing += [key for key in existing if key not in args]
    key = differing[0]
    others = f" (also: {', '.join(differing[1:])})" if len(differing) > 1 else ""
    return (
        f"out={str(root)!r} holds an extraction made with different arguments: {key}="
        f"{existing.get(key)!r} there, {args.get(key)!r} now{_MISMATCH_HINTS.get(key, '')}"
        f"{others}; pass overwrite=True to replace it, or choose another out"
    )


def _is_ours(path: Path) -> bool:
    name = path.name
    return name.startswith("rank-") or name.startswith(MANIFEST)


def _remove_extraction(root: Path) -> None:
    for path in root.iterdir():
        if not _is_ours(path):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _out_error(root: Path, error: OSError, what: str) -> OSError:
    reason = error.strerror or str(error)
    return OSError(error.errno, f"extract: out={str(root)!r}: {what}: {reason}")


# --------------------------------------------------------------------------------------------
# Writing: one rank's directory, its shards, and the writer thread
# --------------------------------------------------------------------------------------------


class _RankDir:
    """One rank's committed shards: ``rank-RRRRR.json`` plus ``rank-RRRRR/shard-*``."""

    def __init__(self, root: Path, rank: int, state: dict):
        self.root = root
        self.rank = rank
        self.state = state
        self.dir = root / f"rank-{rank:05d}"
        self.manifest_path = root / f"rank-{rank:05d}.json"

    @classmethod
    def open(cls, root: Path, rank: int, args: dict, num_samples: int | None) -> "_RankDir":
        """Load this rank's progress (or start it) and delete anything not committed."""
        path = root / f"rank-{rank:05d}.json"
        if path.is_file():
            state = _read_json(path)
        else:
            state = _header(args) | {"rank": rank, "num_samples": num_samples, "keys": {},
                                     "shards": [], "complete": False}
        rank_dir = cls(root, rank, state)
        try:
            rank_dir.dir.mkdir(exist_ok=True)
            rank_dir.remove_uncommitted()
            if not path.is_file():
                rank_dir.save()
        except OSError as error:
            raise _out_error(root, error, "cannot write to it") from error
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
        _write_json_atomic(self.manifest_path, self.state)


class _NpyStream:
    """A ``.npy`` file appended block by block; its fixed-size header is rewritten on close."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple):
        self.path = path
        self.dtype = dtype
        self.row_shape = row_shape
        self.rows = 0
        self._header_size = len(_npy_header(dtype, (10**15, *row_shape)))
        self._file = builtins.open(path, "wb")
        self._file.write(_npy_header(dtype, (0, *row_shape), self._header_size))

    def write(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        self._file.write(array.reshape(-1).view(np.uint8))
        self.rows += array.shape[0]
        return array.nbytes

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, *self.row_shape), self._header_size))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()


def _npy_header(dtype: np.dtype, shape: tuple, size: int | None = None) -> bytes:
    """A .npy version 1.0 header, space-padded to ``size`` bytes (a multiple of 64 by default)."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(dtype), tuple(int(d) for d in shape))
    if size is None:
        size = -(-(10 + len(text) + 1) // 64) * 64
    text = text.ljust(size - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


class _Shard:
    """A shard being built in ``shard-NNNNNN.tmp/``; :meth:`commit` renames it into place."""

    def __init__(self, rank_dir: _RankDir, number: int):
        self.rank_dir = rank_dir
        self.name = f"shard-{number:06d}"
        self.tmp = rank_dir.dir / f"{self.name}.tmp"
        self.tmp.mkdir()
        self.streams: dict[str, _NpyStream] = {}
        self.samples = 0
        self.batches = 0
        self.indices: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []

    def append(self, arrays: dict[str, np.ndarray], indices: np.ndarray, positions: np.ndarray) -> int:
        written = 0
        for key, array in arrays.items():
            meta = self.rank_dir.state["keys"][key]
            if key not in self.streams:
                self.streams[key] = _NpyStream(self.tmp / meta["file"], array.dtype, tuple(meta["row_shape"]))
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
        _fsync_dir(self.tmp)
        final = self.rank_dir.dir / self.name
        os.replace(self.tmp, final)
        _fsync_dir(self.rank_dir.dir)
        shards = self.rank_dir.state["shards"]
        shards.append({
            "path": f"{self.rank_dir.dir.name}/{self.name}",
            "samples": self.samples,
            "batches": self.batches,
            "indices": _encode_runs(np.concatenate(self.indices)),
            "positions": _encode_runs(np.concatenate(self.positions)),
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


class _ShardWriter:
    """Drains finished capture steps on its own thread and writes them into shards.

    The main thread calls :meth:`submit` before each forward (so the writer can pair the
    n-th step with the n-th batch's indices) and :meth:`raise_if_failed` between forwards.
    After a write error the thread keeps draining and discarding, so a forward blocked on the
    capture's backpressure is released and the main thread sees the error at its next check.
    """

    def __init__(self, rank_dir: _RankDir, shard_size: int):
        self.rank_dir = rank_dir
        self.shard_size = shard_size
        self.pending: deque = deque()
        self.max_pending = 0
        self.samples = 0
        self.bytes_written = 0
        self.shards_written = 0
        self._next_position = rank_dir.committed_samples
        self._shard: _Shard | None = None
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
            self._cap._abort(error)

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
            self._shard = _Shard(self.rank_dir, len(self.rank_dir.state["shards"]))
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


def _step_arrays(step: Mapping, size: int, rank_dir: _RankDir) -> dict[str, np.ndarray]:
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
            keys[name] = {"file": file} | _key_meta(array, dtypes[name])
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


def _key_meta(array: np.ndarray, tensor_dtype: torch.dtype) -> dict:
    return {"dtype": array.dtype.str, "torch_dtype": str(tensor_dtype).replace("torch.", ""),
            "row_shape": list(array.shape[1:])}


def _check_keys(keys: dict, arrays: dict[str, np.ndarray], dtypes: dict) -> None:
    """Every step must hold the keys, dtypes and row shapes of the first one."""
    if set(keys) != set(arrays):
        raise ValueError(
            f"extract: a forward pass captured keys {sorted(arrays)}, earlier ones {sorted(keys)}; "
            "every layer must run the same number of times in every batch"
        )
    for name, array in arrays.items():
        known = {field: keys[name][field] for field in ("dtype", "torch_dtype", "row_shape")}
        now = _key_meta(array, dtypes[name])
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
        return tensor.view(_RAW_BITS[tensor.element_size()]).numpy()


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


def _write_merged_manifest(root: Path, world_size: int) -> None:
    """Rank 0, after the barrier: merge every rank's manifest into ``manifest.json``."""
    ranks = [_read_json(root / f"rank-{rank:05d}.json") for rank in range(world_size)]
    manifest = _merge_manifests(ranks)
    try:
        _write_json_atomic(root / MANIFEST, manifest)
    except OSError as error:
        raise _out_error(root, error, f"cannot write {MANIFEST}") from error


def _merge_manifests(ranks: list[dict]) -> dict:
    """One manifest over every rank's committed shards (rank order, then shard order)."""
    first = ranks[0]
    shards = [{"rank": state["rank"]} | shard for state in sorted(ranks, key=lambda s: s["rank"])
              for shard in state["shards"]]
    num_samples = first.get("num_samples")
    rows = len(_dataset_order(shards, num_samples)[0])
    keys = {}
    for state in ranks:
        for key, meta in state["keys"].items():
            keys[key] = meta | {"shape": [rows, *meta["row_shape"]]}
    world_size = first["args"]["world_size"]
    complete = len(ranks) == world_size and all(state["complete"] for state in ranks)
    return _header(first["args"]) | {
        "world_size": world_size,
        "num_samples": num_samples,
        "rows": rows,
        "complete": complete,
        "keys": keys,
        "shards": shards,
    }


def _dataset_order(shards: list[dict], num_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Which stored rows (numbered across shards in file order) form the dataset, in order.

    Returns ``(order, indices)``: ``order`` lists stored row numbers sorted by position, with
    DistributedSampler padding (positions >= num_samples, repeats of early samples) dropped;
    ``indices`` are the dataset indices of all stored rows.
    """
    positions = _decode_runs([run for shard in shards for run in shard["positions"]])
    indices = _decode_runs([run for shard in shards for run in shard["indices"]])
    keep = np.ones(len(positions), bool) if num_samples is None else positions < num_samples
    kept = np.flatnonzero(keep)
    _, first = np.unique(positions[kept], return_index=True)  # sorted by position
    return kept[first], indices


def _header(args: dict) -> dict:
    import fastcap

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastcap_version": getattr(fastcap, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "args": args,
    }


# --------------------------------------------------------------------------------------------
# Small helpers: atomic JSON, fsync, index runs
# --------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with builtins.open(tmp, "w") as file:
        file.write(_json_text(obj) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_text(obj, indent: int = 0) -> str:
    """JSON with one dict entry per line and lists of numbers (index runs, shapes) inline."""
    pad = " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(key)}: {_json_text(value, indent + 1)}" for key, value in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and any(isinstance(item, dict) for item in obj):
        items = [pad + _json_text(item, indent + 1) for item in obj]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(obj)


def _read_json(path: Path) -> dict:
    try:
        with builtins.open(path) as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not a valid fastcap manifest: {error}") from error


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_runs(values: np.ndarray) -> list[list[int]]:
    """Compress integers into ``[start, stop, step]`` runs whose ranges concatenate to them.

    Example: ``[0, 2, 4, 5]`` -> ``[[0, 6, 2], [5, 6, 1]]``.
    """
    runs: list[list[int]] = []
    values = [int(v) for v in values]
    i = 0
    while i < len(values):
        j = i
        step = values[i + 1] - values[i] if i + 1 < len(values) else 1
        if step != 0:
            while j + 1 < len(values) and values[j + 1] - values[j] == step:
                j += 1
        else:
            step = 1
        runs.append([values[i], values[j] + step, step])
        i = j + 1
    return runs


def _decode_runs(runs: list) -> np.ndarray:
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(start, stop, step, dtype=np.int64) for start, stop, step in runs])


# --------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------


class _ProcessGroup:
    """This process's place in a torchrun job; a single process is rank 0 of 1."""

    def __init__(self, rank: int, world_size: int, created: bool):
        self.rank = rank
        self.world_size = world_size
        self.created = created

    @classmethod
    def join(cls, device: torch.device) -> "_ProcessGroup":
        """Use the script's process group, or start one from torchrun's environment."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), created=False)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1 or not dist.is_available():
            return cls(0, 1, created=False)
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None
                                  else int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), created=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def run_on_rank0(self, function: Callable[[], None]) -> None:
        """Run on rank 0 only; every rank raises the error rank 0 got, if any."""
        error = None
        if self.rank == 0:
            try:
                function()
            except (OSError, ValueError) as caught:
                error = caught
        if self.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise error

    def check_same(self, value: str, what: str) -> None:
        """Raise on every rank unless ``value`` is the same on all of them."""
        if self.world_size == 1:
            return
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            odd = next(rank for rank, v in enumerate(values) if v != values[0])
            raise ValueError(
                f"extract: {what} differ between rank 0 and rank {odd}; seed the initialisation "
                "(torch.manual_seed) or load the same weights on every rank"
            )

    def leave(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()
