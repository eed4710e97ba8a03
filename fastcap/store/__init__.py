"""Reading an extraction: :func:`open` gives a :class:`Store`, a mapping from key to a
memory-mapped :class:`LayerArray` in dataset order. The format is in ``_format.py``.
"""

from __future__ import annotations

import builtins
import difflib
import os
import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch

from fastcap.store._format import MANIFEST, TOKEN_KEYS, dataset_order, merge_manifests, read_manifest
from fastcap.store._stats import KeyStats, Moments

__all__ = ["open", "Store", "LayerArray", "TokenRows", "KeyStats"]


def open(out: str | os.PathLike) -> "Store":  # noqa: A001 - fastcap.open, like np.load
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
        return Store(root, read_manifest(merged))
    rank_files = sorted(root.glob("rank-*.json"))
    if not rank_files:
        raise FileNotFoundError(
            f"out={str(out)!r} holds no fastcap extraction (no {MANIFEST} and no rank-*.json)"
        )
    manifest = merge_manifests([read_manifest(p) for p in rank_files])
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


class Store(Mapping):
    """An extraction on disk: a mapping from key to :class:`LayerArray`, in dataset order.

    Attributes:
        path: the ``out`` directory.
        manifest: the parsed manifest (arguments, versions, keys, shards).
        complete: False when the run that wrote it has not finished.
        indices: int64 numpy array, the dataset index of every row (of the keys with one row
            per sample).
        tokens: with ``extract(tokens=...)``, a :class:`TokenRows` aligned with the keys that
            have one row per kept token (``sample`` is the dataset index); else None.
        columns: ``{name: numpy array}``, the columns kept beside the features
            (``extract(keep_columns=...)``, an image folder's ``label``), one value per sample,
            aligned with ``indices``; empty when none was kept.
        stats: ``{key: KeyStats}`` for every key whose rows are float vectors (pooled, token
            rows, full ``[N, C]``): count, per-channel ``mean``/``var``/``std``/``min``/``max``
            and ``norm_mean`` (the mean L2 norm of a row), over the store's rows, computed in
            float64 while extracting.

    Example:
        >>> store = fastcap.open("feats/")
        >>> list(store)                      # ['layer3', 'layer4']
        >>> store["layer4"][10:20].mean()
        >>> store.stats["layer4"].mean       # float64 [2048], for normalising
        >>> store.verify()                   # every shard file against its recorded crc32
        >>> store.columns["label"][:3]       # kept columns, aligned with store.indices
        array([0, 0, 1])
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.complete = bool(manifest.get("complete", False))
        self._keys = manifest.get("keys", {})
        self._shards = manifest.get("shards", [])
        self._arrays: dict[str, LayerArray] = {}  # one per key, so its memory maps are reused
        self._loader_pools: dict = {}  # batch memory, shared by this store's loaders (see RowLoader._pool)
        self._columns = manifest.get("columns", {})
        self._column_values: dict[str, np.ndarray] | None = None
        self.stats: dict[str, KeyStats] = {key: Moments.from_json(value).key_stats()
                                           for key, value in manifest.get("stats", {}).items()}
        self._check_sizes()
        self._locate_rows()

    def _files(self) -> Iterator[tuple[Path, dict | None]]:
        """Every shard file with its manifest record (size, crc32; None in format 1)."""
        for shard in self._shards:
            records = shard.get("files")
            for meta in [*self._keys.values(), *self._columns.values()]:
                record = records.get(meta["file"], {"bytes": -1}) if records is not None else None
                yield self.path / shard["path"] / meta["file"], record

    def _check_sizes(self) -> None:
        """A missing or truncated shard file is an error naming it (cheap: one stat each)."""
        for path, record in self._files():
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise ValueError(f"{str(path)!r} is missing: the store at {str(self.path)!r} is "
                                 "incomplete or damaged; rerun extract to rewrite it") from None
            if record is not None and size != record["bytes"]:
                raise ValueError(f"{str(path)!r} has {size} bytes where the manifest records "
                                 f"{record['bytes']}: it is truncated or was replaced; rerun extract "
                                 "with overwrite=True to rewrite the store")

    def verify(self) -> None:
        """Reads every shard file and checks it against the crc32 the manifest recorded when it
        was written; raises ValueError naming the first file that differs (``fastcap verify OUT``
        lists every one, with a progress bar).

        Example:
            >>> fastcap.open("feats/").verify()      # silent when every byte is as written
        """
        for path, record in self._files():
            problem = _file_problem(path, record)
            if problem is not None:
                raise ValueError(problem)

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """The kept columns, ``{name: numpy array [samples, ...]}`` in the store's order (aligned
        with ``indices``), read on first use.

        Example:
            >>> store = fastcap.open("feats/")          # extracted from an image folder
            >>> store.columns["label"][:4], store.indices[:4]
            (array([0, 0, 1, 1]), array([0, 1, 2, 3]))
        """
        if self._column_values is None:
            rows = self._rows["samples"]
            stored = rows.starts[rows.shard_of] + rows.row_of  # each row's number in file order
            self._column_values = {}
            for name, meta in self._columns.items():
                parts = [np.load(self.path / shard["path"] / meta["file"]) for shard in self._shards]
                values = np.concatenate(parts) if parts else np.zeros((0, *meta["row_shape"]), meta["dtype"])
                self._column_values[name] = values[stored]
        return self._column_values

    def _locate_rows(self) -> None:
        """Map each row in dataset order to (shard, row in shard): of the samples, and (with
        tokens=) of the kept tokens, ordered by their sample's place in the dataset."""
        order, indices = dataset_order(self._shards, self.manifest.get("num_samples"))
        self.indices = indices[order]
        self._rows = {"samples": _Rows([shard["samples"] for shard in self._shards], order)}
        self.tokens: TokenRows | None = None
        if TOKEN_KEYS[0] not in self._keys:
            return
        # Each token's sample, as a stored sample row; its rank in dataset order (-1: dropped,
        # a DistributedSampler padding duplicate) orders the tokens.
        counts = [shard.get("tokens", 0) for shard in self._shards]
        token_rows = _Rows(counts, np.arange(sum(counts), dtype=np.int64))
        stored = LayerArray(self, TOKEN_KEYS[0], self._keys[TOKEN_KEYS[0]], token_rows)[:].astype(np.int64)
        sample_starts = self._rows["samples"].starts
        stored += sample_starts[token_rows.shard_of] if len(stored) else 0
        rank = np.full(len(indices), -1, dtype=np.int64)
        rank[order] = np.arange(len(order))
        kept = np.flatnonzero(rank[stored] >= 0)
        token_order = kept[np.argsort(rank[stored[kept]], kind="stable")]
        self._rows["tokens"] = _Rows(counts, token_order)
        self.tokens = TokenRows(indices[stored[token_order]], self[TOKEN_KEYS[1]][:], self[TOKEN_KEYS[2]][:])

    def __getitem__(self, key: str) -> "LayerArray":
        if key not in self._keys:
            close = difflib.get_close_matches(key, list(self), n=3)
            hint = f"; did you mean {close}?" if close else f"; keys: {list(self)}"
            raise KeyError(f"{key!r} is not in the store at {str(self.path)!r}{hint}")
        if key not in self._arrays:
            meta = self._keys[key]
            self._arrays[key] = LayerArray(self, key, meta, self._rows[meta.get("rows", "samples")])
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key in self._keys if key not in TOKEN_KEYS)  # the index is store.tokens

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return (f"Store({str(self.path)!r}, {len(self.indices)} samples, {state}, "
                f"keys={list(self)})")

    def _shard_path(self, shard: int, key: str) -> Path:
        return self.path / self._shards[shard]["path"] / self._keys[key]["file"]

    def loader(self, keys, batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
               num_workers: int = 0, *, drop_last: bool = False, with_index: bool = False,
               with_columns=None, window: int | None = None, run: int | None = None,
               pin_memory: bool = False, rank: int | None = None, world_size: int | None = None):
        """Shuffled batches of rows for training (a sparse autoencoder on the token rows, say): an
        ``IterableDataset`` yielding ``{key: tensor [batch, ...]}`` in the captured dtypes.

        Each epoch a permutation seeded by ``(seed, epoch)`` orders chunks of ``window // 16``
        contiguous rows of one shard; the rows are split, in that order, over ranks and workers,
        and each one deals ``window`` rows at a time to batches at random, in runs of ``run``
        contiguous rows. Every row comes
        exactly once per epoch (all ranks and workers together); the same seed and epoch give
        the same batches in the same order. A batch is one copy of its rows from the memory
        maps, in file order within the batch: for random sub-batches, index a batch at random
        rather than slicing off a prefix. With ``num_workers=0`` the copies of a batch are split
        over ``torch.get_num_threads()`` threads; each reading thread copies on one core.

        A batch stays valid for as long as you hold it. Its memory is reused only once nothing
        refers to it (no tensor, view or numpy array of it); the store keeps up to
        ``4 + 3 * num_workers`` batches of memory for that, shared by its loaders of the same
        batch size and keys, so a loop that lets each batch go allocates no batch memory in
        steady state, with one loader across epochs or a new one per epoch.

        Args:
            keys: a key or a list of keys, all with one row per kept token or all with one row
                per sample (ValueError otherwise).
            batch_size: rows per batch; the last batch of each rank may be shorter.
            shuffle: False: the rows in the store's order, split over ranks and workers.
            seed: the permutation's seed (an integer >= 0); see also ``set_epoch``.
            num_workers: > 0 reads in that many background threads (the copies run outside the
                GIL), each reading up to 2 batches ahead, handed out in the order a
                ``DataLoader`` with as many workers gives. Your own
                ``DataLoader(data, batch_size=None, num_workers=N)`` also gives every row once;
                its worker processes put each batch in new shared memory (pass ``pin_memory``
                to that DataLoader).
            drop_last: drop rows so that every rank yields the same number of full batches
                (under DDP, which needs the same number of steps on every rank).
            with_index: add where each row came from: ``"sample"`` (the dataset index),
                ``"position"`` and ``"token_id"`` for token rows, ``"index"`` for sample rows
                (int64).
            with_columns: a kept column's name, or a list of them, added to each batch (its
                value per row: for token rows, their sample's), e.g. ``"label"``; numbers only.
            window: rows dealt to batches together (>= batch_size; default 16 * batch_size);
                the loader holds their positions (8 bytes a row), not the rows.
                ``window=batch_size`` mixes each batch's rows from 16 chunks of
                ``batch_size // 16`` contiguous rows only.
            run: rows dealt to a batch together, contiguous in the store's files. Every jump
                to a scattered row costs about as much as copying a few KiB, so longer runs read
                faster and mix less. Default: enough rows for 128 KiB (of all the keys' rows
                together; 64 rows of 2 KiB, 8 of 16 KiB, 1 of 128 KiB or more), at most
                ``batch_size // 16`` so that a batch mixes at least 16 runs. ``run=1`` deals
                single rows, the finest mix: 2 KiB rows then read at about 0.4x the speed of a
                sequential read on a 2-core machine (runs of 64: 0.9x).
            pin_memory: batches in page-locked memory, for ``.cuda(non_blocking=True)``: each a
                block of torch's pinned-memory cache, which reuses a block only once the copies
                from it are done. Without CUDA: a warning, and ordinary memory.
            rank, world_size: this process's share; by default from ``torch.distributed`` when
                it is initialised, else 0 of 1.

        Example:
            >>> data = store.loader("rows", batch_size=4096, num_workers=2, pin_memory=True)
            >>> len(data)                                # batches per epoch on this rank
            >>> for epoch in range(10):
            ...     data.set_epoch(epoch)                # a new order, the same on every rank
            ...     for batch in data:
            ...         x = batch["rows"].cuda(non_blocking=True)   # [4096, C]
            ...         loss = sae(x).loss
            ...         loss.backward(); optimizer.step(); optimizer.zero_grad()
        """
        from fastcap.store._loader import RowLoader  # _loader reads the store: imported on use

        return RowLoader(self, keys, batch_size, shuffle, seed, num_workers, drop_last=drop_last,
                         with_index=with_index, with_columns=with_columns, window=window, run=run,
                         pin_memory=pin_memory, rank=rank, world_size=world_size)


def _file_problem(path: Path, record: dict | None) -> str | None:
    """What is wrong with one shard file against its manifest record (missing, truncated,
    another crc32), or None when every byte is as written."""
    if record is None:
        return None  # written before checksums were recorded
    try:
        with builtins.open(path, "rb") as file:
            major, _ = np.lib.format.read_magic(file)  # the crc32 covers the data after the header
            (header_len,) = struct.unpack("<H" if major == 1 else "<I", file.read(2 if major == 1 else 4))
            file.seek(header_len, os.SEEK_CUR)
            crc = 0
            while chunk := file.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
    except FileNotFoundError:
        return f"{str(path)!r} is missing"
    except (ValueError, struct.error) as error:
        return f"{str(path)!r} is not a .npy file any more: {error}"
    if crc != record["crc32"]:
        return (f"{str(path)!r} is corrupt: its data's crc32 is {crc:#010x}, the manifest recorded "
                f"{record['crc32']:#010x} when it was written")
    return None


class TokenRows(NamedTuple):
    """Where each row of a store's ``"tokens"`` keys came from, aligned with them: numpy int64
    arrays ``sample`` (the dataset index), ``position`` (along T) and ``token_id`` (-1 without
    ids)."""

    sample: np.ndarray
    position: np.ndarray
    token_id: np.ndarray


class _Rows:
    """Where each row of a key lies, in the store's order: shard and row within it."""

    def __init__(self, counts: list[int], order: np.ndarray):
        shard_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])[:-1].astype(np.int64)
        self.shard_of = shard_of[order]
        self.row_of = order - self.starts[self.shard_of]
        self.contiguous = bool(np.array_equal(order, np.arange(len(order))))

    def __len__(self) -> int:
        return len(self.shard_of)


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

    def __init__(self, store: Store, key: str, meta: dict, rows: _Rows):
        self._store = store
        self._rows = rows
        self.key = key
        self.dtype = np.dtype(meta["dtype"])
        self.torch_dtype = getattr(torch, meta["torch_dtype"])
        self.row_shape = tuple(meta["row_shape"])
        self.shape = (len(rows),) + self.row_shape
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
            return self._map(int(self._rows.shard_of[row]))[self._rows.row_of[row]][rest]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1 and self._rows.contiguous:
                return self._slice(start, max(start, stop))[(slice(None),) + rest]
            rows = np.arange(start, stop, step)
        else:
            rows = np.arange(n)[np.asarray(rows)]
        return self._gather(rows)[(slice(None),) + rest]

    def _slice(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of a contiguous store: a view when they lie in one shard."""
        if stop <= start:
            return np.empty((0,) + self.row_shape, self.dtype)
        starts = self._rows.starts
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, stop - 1, side="right")) - 1
        if first == last:
            return self._map(first)[start - starts[first]:stop - starts[first]]
        parts = [self._map(s)[max(start - starts[s], 0):stop - starts[s]]
                 for s in range(first, last + 1)]
        return np.concatenate(parts)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        result = np.empty((len(rows),) + self.row_shape, self.dtype)
        shards = self._rows.shard_of[rows]
        within = self._rows.row_of[rows]
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
