"""Shuffled batches of a store's rows for training: :meth:`Store.loader` gives a
:class:`RowLoader`.

The rows of a key are cut into chunks of contiguous rows within one shard. Each epoch a
permutation seeded by ``(seed, epoch)`` orders the chunks, the same on every rank; the
concatenated rows are split into one contiguous range per rank, whose batch-sized pieces are
dealt round-robin to the workers (threads, or the processes of a DataLoader), as a DataLoader
collects them. Each worker takes its pieces in order, a ``window`` of rows at a time, and deals
the window's rows to batches at random, in runs of ``run`` contiguous rows; every row comes
exactly once per epoch. Only row positions are shuffled: each batch is then copied once, from
the memory maps straight into the batch's own memory, its rows in file order, by the compiled
gather (``fastcap::gather_rows``: streaming stores, prefetch after each jump) outside the GIL:
split over ``torch.get_num_threads()`` threads in the consumer's thread (see
:func:`_copy_threads`), on one core in each reading thread. Where that memory comes from, and
how long a batch stays valid, is :class:`_Batches`'s business.

Why runs: every jump to a scattered row costs about as much as copying a few KiB (the row's
first cache lines and its page's translation start cold). On the 2-core benchmark machine,
2 KiB rows dealt one by one read at about 0.4x a sequential copy of the same bytes, runs of 16
rows (32 KiB) at 0.7x, runs of 64 (128 KiB) at 0.9x.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numpy.random import default_rng  # here, not in the first epoch (numpy loads it lazily: ~10 ms)
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from fastcap import _ops

__all__ = ["RowLoader"]

#: the chunk size is window // _CHUNKS_PER_WINDOW, so a window mixes rows of about this many chunks
_CHUNKS_PER_WINDOW = 16
#: batches of memory the main process keeps for reuse: the one a training step holds, the one
#: being filled, and two more for a consumer that keeps a batch or prefetches one; each reading
#: thread adds the batches it may have read ahead, and the one it fills
_POOL = 4
#: batches each reading thread may read ahead (DataLoader's prefetch_factor)
_PREFETCH = 2
#: the default run: enough contiguous rows for this many bytes (of all the keys' rows together),
#: where the copy runs at ~0.9x sequential speed (see the module's docstring) ...
_RUN_BYTES = 128 << 10
#: ... but at most batch_size // this, so that a full batch holds rows of at least this many runs
_RUNS_PER_BATCH = 16
#: with_index fields, by row kind
_INDEX_FIELDS = {"tokens": ("sample", "position", "token_id"), "samples": ("index",)}
#: a batch is split over the copying threads in parts of at least this many bytes
_PART_BYTES = 1 << 20
#: set in the loader's reading threads, which copy on their own core each: the threads are the
#: parallelism there
_IN_READER = threading.local()
_HELPERS: tuple[int, ThreadPoolExecutor] | None = None  # (process id, the pool), made on first use
_HELPERS_LOCK = threading.Lock()


def _copy_threads() -> int:
    """Threads a batch's copies may use in the consumer's thread: torch's intra-op threads, as
    the user set them (``torch.set_num_threads``; 1 in a DataLoader worker, and under torchrun
    with several processes per node)."""
    return torch.get_num_threads()


def _helpers() -> ThreadPoolExecutor:
    """The threads that copy parts of a batch beside the consumer's. Plain threads running numpy's
    copies (which release the GIL), not torch's OpenMP threads: a gather by torch.index_select
    runs as fast on two cores, but OpenMP threads spin at each join, and while another process
    holds a core each join waits for a time slice: on two cores with one busy process, torch's
    gather fell to 0.9 GB/s, a quarter of one core's numpy gather; these threads sleep while
    they wait. A new pool after a fork (a forked child has none of the parent's threads)."""
    global _HELPERS
    with _HELPERS_LOCK:
        if _HELPERS is None or _HELPERS[0] != os.getpid():
            _HELPERS = (os.getpid(), ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1),
                                                        thread_name_prefix="fastcap-copy"))
        return _HELPERS[1]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _usable(mode: str) -> str:
    """``mode`` of :class:`_Batches`, but "fresh" for "recycle" without torch's use count (a
    private function): then every batch is new memory."""
    return "fresh" if mode == "recycle" and not hasattr(torch._C, "_storage_Use_Count") else mode


def _users(tensor: torch.Tensor) -> int:
    """How many references its memory has: tensors and views of it, numpy arrays of them."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class _Batches:
    """The memory of batches ``{name: tensor [n, ...]}``: ``take(n)`` gives tensors to fill (of
    the stored dtype) and the tensors to hand out, views of the same memory. ``specs``: ``{name: (dtype of the
    stored bytes, row shape, dtype handed out)}``.

    Modes:
        ``recycle`` (the main process): up to ``size`` batches of memory, allocated once and
        reused when nothing refers to a batch any more (no tensor, view or numpy array of it).
        A batch stays valid for as long as it is held, and a loop that drops each batch before
        the next but one allocates nothing in steady state. Without torch's use count (a
        private function) every batch is new memory.
        ``pinned``: each batch new page-locked memory from torch's pinned-memory cache, which
        hands a block out again only after the copies from it (``non_blocking=True``) are done.
        ``shared`` (a DataLoader worker): each batch new shared memory, which the DataLoader
        passes to the main process without a copy (as its own collate does).

    Example:
        >>> fill, batch = _Batches({"x": (torch.float32, (4,), torch.float32)}, 8, "recycle", 4).take(8)
        >>> fill["x"][:] = 1; batch["x"].shape
        torch.Size([8, 4])
    """

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple, torch.dtype]], batch_size: int, mode: str,
                 size: int):
        self._specs, self._batch_size, self._size = specs, batch_size, size
        self._mode = _usable(mode)
        self._pool: list[tuple[dict[str, torch.Tensor], dict[str, int]]] = []  # memory, its idle use counts
        self._lock = threading.Lock()  # two reading threads never get one batch's memory

    def _new(self, n: int) -> dict[str, torch.Tensor]:
        if self._mode == "shared":
            return {name: torch.empty(0, dtype=raw).set_(
                        torch.UntypedStorage._new_shared(n * math.prod(shape) * raw.itemsize), 0, (n, *shape))
                    for name, (raw, shape, _) in self._specs.items()}
        if self._mode == "pinned":
            return {name: torch.empty((n, *shape), dtype=raw, pin_memory=True)
                    for name, (raw, shape, _) in self._specs.items()}
        # numpy's allocator asks the kernel for huge pages for arrays of 4 MiB or more: the
        # first fill of a new 8 MiB batch then faults in 4 pages, not 2048 (~3 ms of a fresh
        # process's first batch on the benchmark machine).
        return {name: torch.from_numpy(np.empty(n * math.prod(shape) * raw.itemsize, np.uint8)).view(raw)
                .view(n, *shape) for name, (raw, shape, _) in self._specs.items()}

    def _idle(self) -> dict[str, torch.Tensor] | None:
        # share_memory_() on a batch moves its memory where another process may read it: let it go.
        # (The storage's is_shared, not the tensor's: the same answer, without a TypedStorage.)
        self._pool = [(memory, counts) for memory, counts in self._pool
                      if not any(t.untyped_storage().is_shared() for t in memory.values())]
        for memory, counts in self._pool:
            if all(_users(t) == counts[name] for name, t in memory.items()):
                return memory
        if len(self._pool) == self._size:
            return None
        memory = self._new(self._batch_size)
        self._pool.append((memory, {name: _users(t) for name, t in memory.items()}))
        return memory

    def take(self, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Memory for a batch of ``n`` rows: tensors to fill (the stored dtype), tensors to hand
        out (the captured dtype)."""
        with self._lock:
            memory = self._idle() if self._mode == "recycle" else None
            memory = memory if memory is not None else self._new(n)  # beyond the pool: not kept
            # Made under the lock: these views mark the memory taken.
            fill = {name: t[:n] for name, t in memory.items()}
        return fill, {name: t.view(self._specs[name][2]) for name, t in fill.items()}


def _column_fields(store, names, kind: str, taken: list[str]) -> dict[str, np.ndarray]:
    """``with_columns``: each named kept column's value per row of the loader's keys, in the
    store's order (a token row gets its sample's value)."""
    if names is None:
        return {}
    names = [names] if isinstance(names, str) else list(names)
    fields = {}
    for name in names:
        if name not in store.columns:
            kept = list(store.columns) or "none"
            raise ValueError(f"with_columns: {name!r} is not a column of the store at {str(store.path)!r} "
                             f"(kept: {kept}); keep it with extract(keep_columns=[...]) or --keep-columns")
        if name in taken or name in fields:
            raise ValueError(f"with_columns: {name!r} clashes with a key or another field of the batch "
                             f"({taken}); each batch holds one tensor per name")
        values = store.columns[name]
        if values.dtype.kind not in "biuf":
            raise ValueError(f"with_columns: column {name!r} holds {values.dtype} values; batches are "
                             "tensors: map the column to numbers (e.g. class indices) to load it")
        if kind == "tokens":  # each token row's sample, as a row of the store's order
            order = np.argsort(store.indices, kind="stable")
            values = values[order[np.searchsorted(store.indices, store.tokens.sample, sorter=order)]]
        fields[name] = np.ascontiguousarray(values)
    return fields


class RowLoader(IterableDataset):
    """Batches ``{key: tensor [batch, ...]}`` of a store's rows, shuffled across shards; made by
    :meth:`Store.loader`, which documents the arguments and how long a batch stays valid.

    ``len()`` is the number of batches this rank yields per epoch, whatever the workers.

    Example:
        >>> data = store.loader("rows", batch_size=4096, num_workers=2)
        >>> for epoch in range(3):
        ...     data.set_epoch(epoch)
        ...     for batch in data:
        ...         loss = sae(batch["rows"].cuda())
    """

    def __init__(self, store, keys, batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
                 num_workers: int = 0, *, drop_last: bool = False, with_index: bool = False,
                 with_columns=None, window: int | None = None, run: int | None = None,
                 pin_memory: bool = False, rank: int | None = None, world_size: int | None = None):
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        if not self.keys or not all(isinstance(key, str) for key in self.keys):
            raise ValueError(f"keys must be a key or a non-empty list of keys, got {keys!r}")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"keys={keys!r} names a key twice")
        arrays = [store[key] for key in self.keys]  # KeyError naming an unknown key
        kinds = {key: store.manifest["keys"][key].get("rows", "samples") for key in self.keys}
        if len(set(kinds.values())) > 1:
            counts = ", ".join(f"{key!r}: {len(array)} rows (one per "
                               f"{'kept token' if kinds[key] == 'tokens' else 'sample'})"
                               for key, array in zip(self.keys, arrays))
            raise ValueError(f"keys={self.keys!r} mix rows per kept token and rows per sample "
                             f"({counts}); pass keys of one kind to one loader")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.window = self.batch_size * _CHUNKS_PER_WINDOW if window is None else window
        if (isinstance(self.window, bool) or not isinstance(self.window, (int, np.integer))
                or self.window < self.batch_size):
            raise ValueError(f"window must be an integer >= batch_size={self.batch_size} (rows "
                             f"shuffled together), got {window!r}")
        self.window = int(self.window)
        row_bytes = sum(array.dtype.itemsize * math.prod(array.row_shape) for array in arrays)
        self.run = (max(1, min(-(-_RUN_BYTES // max(row_bytes, 1)), self.batch_size // _RUNS_PER_BATCH))
                    if run is None else _check_int("run", run, 1))
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.pin_memory = bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            # As DataLoader(pin_memory=True) does: the same script still runs on a CPU machine.
            warnings.warn("pin_memory=True, but CUDA is not available: batches are in ordinary "
                          "(pageable) memory", UserWarning, stacklevel=3)
            self.pin_memory = False
        self.rank, self.world_size = self._place(rank, world_size)
        self.epoch = 0

        kind = next(iter(kinds.values()))
        self._fields: dict[str, np.ndarray] = {}
        if with_index:
            clash = [key for key in self.keys if key in _INDEX_FIELDS[kind]]
            if clash:
                raise ValueError(f"with_index=True adds {list(_INDEX_FIELDS[kind])} to each batch, "
                                 f"which clashes with keys {clash}; pass with_index=False")
            if kind == "tokens":
                self._fields = dict(zip(_INDEX_FIELDS[kind], (store.tokens.sample, store.tokens.position,
                                                              store.tokens.token_id)))
            else:
                self._fields = {"index": store.indices}
        self._fields |= _column_fields(store, with_columns, kind, [*self.keys, *self._fields])
        # What a worker needs to read rows, without the store (so a spawned worker gets no memory
        # maps in its pickle): shard files, dtypes, and where each row lies.
        rows = arrays[0]._rows  # the same for every key of one kind
        self._shard_of, self._row_of = rows.shard_of, rows.row_of
        self._files = {key: [store._shard_path(shard, key) for shard in range(len(store._shards))]
                       for key in self.keys}
        self._dtypes = {key: (array.dtype, array.row_shape, array.torch_dtype)
                        for key, array in zip(self.keys, arrays)}
        # In this process, the store's own memory maps: a new loader per epoch maps nothing again.
        self._arrays = dict(zip(self.keys, arrays))
        self._maps: dict[str, list[torch.Tensor]] = {}
        self._pools: dict[tuple, _Batches] = store._loader_pools  # shared: a new loader per epoch reuses them
        self._rows = len(rows)
        self._layout()

    def _place(self, rank, world_size) -> tuple[int, int]:
        """This consumer's rank: the explicit arguments, else torch.distributed's, else 0 of 1."""
        if rank is None and world_size is None:
            if dist.is_available() and dist.is_initialized():
                return dist.get_rank(), dist.get_world_size()
            return 0, 1
        if rank is None or world_size is None:
            raise ValueError(f"pass rank= and world_size= together, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        world_size = _check_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        return int(rank), world_size

    def _layout(self) -> None:
        """The order rows are read in and its chunks. Shuffled: file order (``_by_file`` maps a
        position to a row in the store's order; None when the two agree), in chunks of contiguous
        rows of one shard. Not shuffled: the store's order, one chunk.

        Shuffled, the read order's shard segments too, so that a batch's ascending positions
        find their shards with one search: segment i holds positions ``_seg_bounds[i]`` to
        ``_seg_bounds[i + 1]``, all in shard ``_seg_shard[i]``. Where each segment's rows are
        contiguous in their file (``_within`` None) the row in the shard is the position less
        ``_seg_offset[i]``; else ``_within`` gives it."""
        n = self._rows
        if not self.shuffle:
            self._by_file = None
            self._chunk_starts = np.zeros(1 if n else 0, dtype=np.int64)
            self._chunk_stops = np.full(len(self._chunk_starts), n, dtype=np.int64)
            return
        in_order = n == 0 or bool(np.all(np.diff(self._shard_of * (self._row_of.max() + 1) + self._row_of) > 0))
        self._by_file = None if in_order else np.lexsort((self._row_of, self._shard_of))
        shards = self._shard_of if self._by_file is None else self._shard_of[self._by_file]
        within = self._row_of if self._by_file is None else self._row_of[self._by_file]
        edges = np.concatenate([[0], np.flatnonzero(np.diff(shards)) + 1, [n] if n else []]).astype(np.int64)
        self._seg_bounds, self._seg_shard = edges, shards[edges[:-1]].astype(np.int64)
        self._seg_offset = edges[:-1] - within[edges[:-1]]
        steps = np.diff(within) == 1
        steps[edges[1:-1] - 1] = True  # a new segment starts afresh
        self._within = None if bool(np.all(steps)) else within.astype(np.int64)
        size = max(self.run, self.window // _CHUNKS_PER_WINDOW)  # a run fits in a chunk
        starts = [np.arange(a, b, size, dtype=np.int64) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        self._chunk_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self._chunk_stops = np.append(self._chunk_starts[1:], n).astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` (like ``DistributedSampler.set_epoch``); set the same
        epoch on every rank. Without it every epoch has the order of epoch 0.

        Example:
            >>> for epoch in range(10):
            ...     data.set_epoch(epoch)
            ...     for batch in data: ...
        """
        self.epoch = _check_int("epoch", epoch, 0)

    # ------------------------------------------------------------------ the split

    def _rank_range(self) -> tuple[int, int, int]:
        """This rank's rows (start, stop in the epoch's order) and its number of batches."""
        n, size = self._rows, self.world_size
        if self.drop_last:  # every rank the same rows and batches, so DDP steps stay in step
            per_rank = n // size
            start, stop = self.rank * per_rank, (self.rank + 1) * per_rank
            batches = per_rank // self.batch_size
            return start, start + batches * self.batch_size, batches
        start, stop = self.rank * n // size, (self.rank + 1) * n // size
        return start, stop, -(-(stop - start) // self.batch_size)

    def __len__(self) -> int:
        return self._rank_range()[2]

    def _worker_runs(self, worker: int, workers: int, epoch: int) -> Iterator[tuple[int, int]]:
        """A worker's share of its rank's rows, as runs (a, b) of positions in the read order
        (see _layout): batches worker, worker + workers, ... of the rank's rows. Interleaved
        round-robin, as a DataLoader does, they are the batches of one process."""
        start, stop, batches = self._rank_range()
        order = np.arange(len(self._chunk_starts))
        if self.shuffle:  # the same on every rank and worker
            order = default_rng([self.seed, epoch]).permutation(order)
        sizes = self._chunk_stops[order] - self._chunk_starts[order]
        ends = np.cumsum(sizes)
        for batch in range(worker, batches, workers):
            first, last = start + batch * self.batch_size, min(start + (batch + 1) * self.batch_size, stop)
            i = int(np.searchsorted(ends, first, side="right"))
            while i < len(order) and ends[i] - sizes[i] < last:
                begin, chunk = ends[i] - sizes[i], self._chunk_starts[order[i]]
                yield int(chunk + max(first - begin, 0)), int(chunk + min(last, ends[i]) - begin)
                i += 1

    def _positions(self, worker: int, workers: int, epoch: int) -> Iterator[np.ndarray]:
        """Each of a worker's batches as positions in the read order: its runs gathered a window
        at a time, the window's positions dealt to batches by a permutation seeded by (seed,
        epoch, rank, worker, workers); the positions short of a batch wait for the next window.
        Shuffled, each batch's positions come ascending (file order)."""
        start, stop, _ = self._rank_range()
        capacity = min(self.window if self.shuffle else self.batch_size, stop - start)
        if capacity <= 0:
            return
        rng = default_rng([self.seed, epoch, self.rank, worker, workers])
        window, filled = np.empty(capacity, np.int64), 0
        labels = None  # for dealing: the batch of each place in a window's permutation
        if self.shuffle and capacity > self.batch_size:
            batches = capacity // self.batch_size + 1
            small = np.uint8 if batches <= 255 else np.uint16 if batches <= 65535 else np.int64
            labels = (np.arange(capacity) // self.batch_size).astype(small)
        for a, b in self._worker_runs(worker, workers, epoch):
            while a < b:
                count = min(b - a, capacity - filled)
                window[filled:filled + count] = np.arange(a, a + count)
                filled, a = filled + count, a + count
                if filled == capacity:
                    batches, rest = self._deal(rng, window[:filled], labels, final=False)
                    yield from batches
                    window[:len(rest)], filled = rest, len(rest)
        yield from self._deal(rng, window[:filled], labels, final=True)[0]

    def _deal(self, rng: np.random.Generator, window: np.ndarray, labels: np.ndarray | None,
              final: bool) -> tuple[list[np.ndarray], np.ndarray]:
        """A window's positions dealt to batches: the batches (new arrays; shuffled, each
        ascending), and the positions left for the next window (none when ``final``).

        Shuffled, the window's runs go to batches in a random order (one permutation per
        window). A run is ``run`` places of consecutive positions, cut short where the positions
        jump (a chunk ends), so that it is one read; with ``run=1`` every place is a run. A
        window of one batch keeps its order: its positions come as runs, sorted at once."""
        size, filled = self.batch_size, len(window)
        count = filled if final else filled // size * size
        if not self.shuffle or filled <= size:
            batches = [window[first:first + size] for first in range(0, count, size)]
            return [np.sort(b) if self.shuffle else b.copy() for b in batches], window[count:].copy()
        if self.run == 1:
            order = rng.permutation(filled)
            return self._sorted_batches(window, order, count, labels), window[order[count:]]
        return self._dealt_runs(rng, window, count)

    def _sorted_batches(self, window: np.ndarray, order: np.ndarray, count: int,
                        labels: np.ndarray) -> list[np.ndarray]:
        """The batches ``sorted(window[order[first:first + batch_size]])`` for first in 0,
        batch_size, ... < count. Sorted all at once: the window by position (a few sorted runs:
        quick), then stably by batch (a radix sort of small labels), which leaves each batch's
        positions ascending; a sort per batch would cost several times as much."""
        label = np.empty(len(window), labels.dtype)
        label[order] = labels[:len(window)]  # beyond count: the rest, sorted last and left
        by_position = np.argsort(window, kind="stable")
        positions = window[by_position[np.argsort(label[by_position], kind="stable")]]
        return [positions[first:min(first + self.batch_size, count)] for first in range(0, count, self.batch_size)]

    def _dealt_runs(self, rng: np.random.Generator, window: np.ndarray,
                    count: int) -> tuple[list[np.ndarray], np.ndarray]:
        """``_deal`` for runs longer than one place, worked on runs rather than places: the
        window's runs in a random order, laid end to end and cut into batches (a run may span
        two); each batch's pieces of runs sorted by position and spelt out. A window of 65536
        places in runs of 64 is dealt in ~0.1 ms, where a sort of its places took ~1."""
        size, filled, run = self.batch_size, len(window), self.run
        # Stretches of consecutive positions, each cut into runs from its start.
        stretches = np.concatenate([[0], np.flatnonzero(window[1:] != window[:-1] + 1) + 1]).astype(np.int64)
        per_stretch = -(-np.diff(stretches, append=filled) // run)
        before = np.repeat(np.cumsum(per_stretch) - per_stretch, per_stretch)
        starts = np.repeat(stretches, per_stretch) + (np.arange(len(before)) - before) * run  # first places
        lengths = np.diff(starts, append=filled)
        shuffled = rng.permutation(len(starts))
        starts, lengths = starts[shuffled], lengths[shuffled]
        ends = np.cumsum(lengths)  # where each run ends, laid end to end in the dealt order
        # Pieces: the runs cut where a batch ends; each in one run and one batch.
        cuts = np.sort(np.concatenate([[0], ends[:-1], np.arange(size, count, size)]).astype(np.int64))
        cuts = cuts[(cuts < count) & (np.diff(cuts, append=count + 1) > 0)]  # once each, below count
        # (not np.union1d: it imports numpy.ma, 20 ms of a fresh process's first batch)
        run = np.searchsorted(ends, cuts, side="right")
        first = window[starts[run] + cuts - (ends[run] - lengths[run])]  # a piece's first position
        pieces = np.diff(cuts, append=count)
        batch = cuts // size
        by = np.lexsort((first, batch))
        first, pieces = first[by], pieces[by]
        positions = np.repeat(first - (np.cumsum(pieces) - pieces), pieces) + np.arange(count)
        batches = [positions[f:f + size] for f in range(0, count, size)]
        if count == filled:
            return batches, window[:0]
        dealt = np.repeat(starts - (ends - lengths), lengths) + np.arange(filled)  # places, dealt order
        return batches, window[dealt[count:]]

    # ------------------------------------------------------------------ reading

    def _sources(self, key: str) -> list[torch.Tensor]:
        """The rows of each shard file of ``key``, memory-mapped, as uint8 ``[rows, row bytes]``
        for the gather. Mapped copy-on-write ("c", as the store maps): writable, so torch takes
        them without a warning, and nothing reaches the files."""
        if key not in self._maps:
            maps = [self._arrays[key]._map(shard) if self._arrays is not None
                    else np.load(path, mmap_mode="c") for shard, path in enumerate(self._files[key])]
            self._maps[key] = [torch.from_numpy(m.view(np.ndarray).reshape(len(m), math.prod(m.shape[1:]))
                                                .view(np.uint8)) for m in maps]
        return self._maps[key]

    def _pool(self, mode: str) -> _Batches:
        """The batch memory of ``mode`` for batches like this loader's: in the main process the
        store's, shared by its loaders of the same batch size, keys, fields and workers."""
        specs = {key: (torch.from_numpy(np.empty(0, dtype)).dtype, shape, torch_dtype)
                 for key, (dtype, shape, torch_dtype) in self._dtypes.items()}
        for field, values in self._fields.items():  # int64 index fields, kept columns' own dtypes
            dtype = torch.from_numpy(values[:0]).dtype
            specs[field] = (dtype, values.shape[1:], dtype)
        size = _POOL + (_PREFETCH + 1) * self.num_workers
        mode = _usable(mode)
        key = (mode, self.batch_size, size, tuple(specs.items()))
        if key not in self._pools:
            self._pools.setdefault(key, _Batches(specs, self.batch_size, mode, size))
        return self._pools[key]

    def _where(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a batch's rows lie: the shard of each and its row there (int64 tensors)."""
        if self.shuffle:  # ascending, in file order: each shard segment's rows found by one search
            segment = np.searchsorted(self._seg_bounds, positions, side="right") - 1
            rows = positions - self._seg_offset[segment] if self._within is None else self._within[positions]
            shard = self._seg_shard[segment]
        else:  # the store's order
            shard, rows = self._shard_of[positions], self._row_of[positions]
        return (torch.from_numpy(shard.astype(np.int64, copy=False)),
                torch.from_numpy(rows.astype(np.int64, copy=False)))

    def _batch(self, positions: np.ndarray, pool: _Batches) -> dict[str, torch.Tensor]:
        """The rows at ``positions`` of the read order (ascending when shuffled: each shard's
        rows read in one forward sweep), copied once from the memory maps into the batch, a
        gather per shard. In the consumer's thread the batch is cut into parts copied at once
        by up to ``_copy_threads()`` threads (this one and helpers); a reading thread copies
        all of it itself."""
        where = self._where(positions)
        fill, batch = pool.take(len(positions))
        n = len(positions)
        fill = {key: fill[key].view(n, -1).view(torch.uint8) for key in self.keys if fill[key][:1].nbytes}
        row_bytes = sum(out.shape[1] for out in fill.values())
        parts = 1 if getattr(_IN_READER, "active", False) else min(_copy_threads(), n * row_bytes // _PART_BYTES)
        if parts > 1:
            cuts = [n * i // parts for i in range(parts + 1)]
            helpers = _helpers()
            done = [helpers.submit(self._copy, where, fill, a, b) for a, b in zip(cuts[1:-1], cuts[2:])]
            try:
                self._copy(where, fill, 0, cuts[1])
            finally:  # every part done before the batch goes (or this thread's error does)
                errors = [part.exception() for part in done]
            for error in errors:
                if error is not None:
                    raise error
        else:
            self._copy(where, fill, 0, n)
        if self._fields:
            rows = positions if self._by_file is None else self._by_file[positions]
            for field, values in self._fields.items():
                np.take(values, rows, axis=0, out=batch[field].numpy(), mode="clip")
        return batch

    def _copy(self, where: tuple[torch.Tensor, torch.Tensor], fill: dict[str, torch.Tensor], lo: int,
              hi: int) -> None:
        """Rows lo..hi of a batch (``where`` they lie: see _where) into ``fill`` (uint8 ``[n, row
        bytes]`` per key): the compiled gather, one call per key, which releases the GIL."""
        shard, rows = where
        for key, out in fill.items():
            _ops.gather_rows(self._sources(key), shard[lo:hi], rows[lo:hi], out[lo:hi])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is not None:  # a DataLoader's worker process: its share, in memory it can send
            pool = self._pool("shared")
            for positions in self._positions(info.id, info.num_workers, self.epoch):
                yield self._batch(positions, pool)
            return
        pool = self._pool("pinned" if self.pin_memory else "recycle")
        if self.num_workers == 0:
            for positions in self._positions(0, 1, self.epoch):
                yield self._batch(positions, pool)
            return
        yield from self._threads(pool, self.epoch)  # the epoch now: set_epoch may come before they read

    def _threads(self, pool: _Batches, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches read by ``num_workers`` threads, worker w reading the share a DataLoader's
        worker w would, handed out in the order a DataLoader gives. Threads, not processes: the
        copies run outside the GIL, and a batch needs no second copy to reach this process."""
        workers, stop = self.num_workers, threading.Event()
        queues = [queue.Queue(_PREFETCH) for _ in range(workers)]

        def read(worker: int) -> None:
            _IN_READER.active = True
            try:
                for positions in self._positions(worker, workers, epoch):
                    if stop.is_set():
                        return
                    queues[worker].put(self._batch(positions, pool))
                queues[worker].put(None)
            except BaseException as error:  # raised in the consumer, in its turn
                queues[worker].put(error)

        threads = [threading.Thread(target=read, args=(w,), name=f"fastcap-loader-{w}", daemon=True)
                   for w in range(workers)]
        for thread in threads:
            thread.start()
        try:
            running = list(range(workers))
            while running:
                for worker in list(running):
                    item = queues[worker].get()
                    if item is None:
                        running.remove(worker)
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
        finally:  # the epoch's end, an error, or the consumer leaving early
            # Each thread checks stop before a batch; draining its queue frees one blocked on it.
            stop.set()
            for worker, thread in enumerate(threads):
                while thread.is_alive():
                    with contextlib.suppress(queue.Empty):
                        queues[worker].get(timeout=0.05)

    def __getstate__(self) -> dict:
        # A spawned DataLoader worker opens its own memory maps, and makes its own batches.
        return self.__dict__ | {"_arrays": None, "_maps": {}, "_pools": {}}

    def __repr__(self) -> str:
        return (f"RowLoader(keys={self.keys}, {self._rows} rows, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, rank={self.rank} of {self.world_size}, epoch={self.epoch})")
