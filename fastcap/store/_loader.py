"""Shuffled batches of a store's rows for training: :meth:`Store.loader` gives a
:class:`RowLoader`.

The rows of a key are cut into chunks of contiguous rows within one shard. Each epoch a
permutation seeded by ``(seed, epoch)`` orders the chunks, the same on every rank; the
concatenated rows are split into one contiguous range per rank, whose batch-sized pieces are
dealt round-robin to the DataLoader workers (as a DataLoader collects them). Each worker reads
its pieces in order, a ``window`` of rows at a time, and shuffles the window before cutting
batches from it. Reads stay sequential within a chunk, and every row comes exactly once per
epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = ["RowLoader"]

#: the chunk size is window // _CHUNKS_PER_WINDOW, so a window mixes rows of about this many chunks
_CHUNKS_PER_WINDOW = 16
#: with_index fields, by row kind
_INDEX_FIELDS = {"tokens": ("sample", "position", "token_id"), "samples": ("index",)}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class RowLoader(IterableDataset):
    """Batches ``{key: tensor [batch, ...]}`` of a store's rows, shuffled across shards; made by
    :meth:`Store.loader`, which documents the arguments.

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
                 window: int | None = None, rank: int | None = None, world_size: int | None = None):
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
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
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
        # What a worker needs to read rows, without the store (so a spawned worker gets no memory
        # maps in its pickle): shard files, dtypes, and where each row lies.
        rows = arrays[0]._rows  # the same for every key of one kind
        self._shard_of, self._row_of = rows.shard_of, rows.row_of
        self._files = {key: [store._shard_path(shard, key) for shard in range(len(store._shards))]
                       for key in self.keys}
        self._dtypes = {key: (array.dtype, array.row_shape, array.torch_dtype)
                        for key, array in zip(self.keys, arrays)}
        self._maps: dict[tuple[str, int], np.ndarray] = {}
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
        rows of one shard. Not shuffled: the store's order, one chunk."""
        n = self._rows
        if not self.shuffle:
            self._by_file = None
            self._chunk_starts = np.zeros(1 if n else 0, dtype=np.int64)
            self._chunk_stops = np.full(len(self._chunk_starts), n, dtype=np.int64)
            return
        in_order = n == 0 or bool(np.all(np.diff(self._shard_of * (self._row_of.max() + 1) + self._row_of) > 0))
        self._by_file = None if in_order else np.lexsort((self._row_of, self._shard_of))
        shards = self._shard_of if self._by_file is None else self._shard_of[self._by_file]
        edges = np.concatenate([[0], np.flatnonzero(np.diff(shards)) + 1, [n]]).astype(np.int64)
        size = max(1, self.window // _CHUNKS_PER_WINDOW)
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

    def _worker_runs(self, worker: int, workers: int) -> Iterator[tuple[int, int]]:
        """A worker's share of its rank's rows, as runs (a, b) of positions in the read order
        (see _layout): batches worker, worker + workers, ... of the rank's rows. Interleaved
        round-robin, as a DataLoader does, they are the batches of one process."""
        start, stop, batches = self._rank_range()
        order = np.arange(len(self._chunk_starts))
        if self.shuffle:  # the same on every rank and worker
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        sizes = self._chunk_stops[order] - self._chunk_starts[order]
        ends = np.cumsum(sizes)
        for batch in range(worker, batches, workers):
            first, last = start + batch * self.batch_size, min(start + (batch + 1) * self.batch_size, stop)
            i = int(np.searchsorted(ends, first, side="right"))
            while i < len(order) and ends[i] - sizes[i] < last:
                begin, chunk = ends[i] - sizes[i], self._chunk_starts[order[i]]
                yield int(chunk + max(first - begin, 0)), int(chunk + min(last, ends[i]) - begin)
                i += 1

    # ------------------------------------------------------------------ reading

    def _map(self, key: str, shard: int) -> np.ndarray:
        if (key, shard) not in self._maps:
            self._maps[key, shard] = np.load(self._files[key][shard], mmap_mode="r")
        return self._maps[key, shard]

    def _read(self, a: int, b: int, buffers: dict[str, np.ndarray], at: int) -> None:
        """Positions a..b of the read order (see _layout) into buffers[at:]: a slice of one
        memory map when the rows are contiguous in one shard (the shuffled case), else gathered
        shard by shard."""
        rows = np.arange(a, b) if self._by_file is None else self._by_file[a:b]
        shards, within = self._shard_of[rows], self._row_of[rows]
        one_run = shards[0] == shards[-1] and np.all(np.diff(within) == 1) and np.all(shards == shards[0])
        for key in self.keys:
            out = buffers[key][at:at + len(rows)]
            if one_run:
                out[:] = self._map(key, int(shards[0]))[within[0]:within[-1] + 1]
                continue
            for shard in np.unique(shards):
                pick = shards == shard
                out[pick] = self._map(key, int(shard))[within[pick]]
        for field, values in self._fields.items():
            buffers[field][at:at + len(rows)] = values[rows]

    def _batch(self, buffers: dict[str, np.ndarray], pick: np.ndarray) -> dict[str, torch.Tensor]:
        batch = {}
        for name, buffer in buffers.items():
            tensor = torch.from_numpy(buffer[pick])  # a copy: the buffer is refilled
            torch_dtype = self._dtypes[name][2] if name in self._dtypes else torch.int64
            batch[name] = tensor if tensor.dtype == torch_dtype else tensor.view(torch_dtype)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is None and self.num_workers > 0:
            # In the workers get_worker_info() is set, so each iterates its own share.
            yield from DataLoader(self, batch_size=None, num_workers=self.num_workers)
            return
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start, stop, _ = self._rank_range()
        if stop <= start:
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, workers])
        capacity = min(self.window if self.shuffle else self.batch_size, stop - start)
        buffers = {key: np.empty((capacity, *shape), dtype) for key, (dtype, shape, _) in self._dtypes.items()}
        buffers |= {field: np.empty(capacity, np.int64) for field in self._fields}
        filled = 0
        for a, b in self._worker_runs(worker, workers):
            while a < b:
                count = min(b - a, capacity - filled)
                self._read(a, a + count, buffers, filled)
                filled, a = filled + count, a + count
                if filled == capacity:
                    order = rng.permutation(filled) if self.shuffle else np.arange(filled)
                    full = filled // self.batch_size * self.batch_size
                    for first in range(0, full, self.batch_size):
                        yield self._batch(buffers, order[first:first + self.batch_size])
                    # The rows short of a batch wait for the next window.
                    rest = order[full:]
                    for buffer in buffers.values():
                        buffer[:len(rest)] = buffer[rest]
                    filled = len(rest)
        if filled:
            order = rng.permutation(filled) if self.shuffle else np.arange(filled)
            for first in range(0, filled, self.batch_size):
                yield self._batch(buffers, order[first:first + self.batch_size])

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_maps": {}}  # a spawned worker opens its own memory maps

    def __repr__(self) -> str:
        return (f"RowLoader(keys={self.keys}, {self._rows} rows, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, rank={self.rank} of {self.world_size}, epoch={self.epoch})")
