"""Where extract's batches come from: a DataLoader over a map-style dataset (a Hugging Face
``datasets.Dataset`` included), replanned as explicit batches of dataset indices (split with a
DistributedSampler under torchrun), or any other iterable of batches, numbered by running
sample counters; and the kept columns (labels, ids) taken out of each batch.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler


def batch_size(batch) -> int:
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
            return batch_size(value)
        except TypeError:
            continue
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__} batch: it holds no tensor")


#: tokens of early exit's learning forward on a language-model batch
LEARNING_TOKENS = 8


def first_sample(batch, size: int):
    """The batch cut to its first sample: every tensor whose dim 0 is the batch's ``size``
    sliced to ``[:1]`` (a view), in the same structure; anything else as it is. A
    language-model batch (a mapping with 2-D ``input_ids`` ``[size, T]``) is also cut to its first
    ``LEARNING_TOKENS`` tokens: every tensor ``[size, T, ...]`` to ``[:1, :LEARNING_TOKENS]``.

    Example:
        >>> first_sample({"input_ids": torch.zeros(4, 16, dtype=torch.long)}, 4)["input_ids"].shape
        torch.Size([1, 8])
    """
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    length = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == size else None
    return _cut(batch, size, length)


def _cut(batch, size: int, length):
    if isinstance(batch, torch.Tensor):
        if not batch.dim() or batch.shape[0] != size:
            return batch
        if length is not None and batch.dim() >= 2 and batch.shape[1] == length:
            return batch[:1, :LEARNING_TOKENS]
        return batch[:1]
    if isinstance(batch, Mapping):
        return {key: _cut(value, size, length) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        cut = [_cut(value, size, length) for value in batch]
        return type(batch)(*cut) if hasattr(batch, "_fields") else type(batch)(cut)
    return batch


def to_device(batch, device: torch.device):
    """The batch's tensors on ``device`` (``non_blocking`` from pinned memory)."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        moved = [to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch



def check_columns(keep_columns) -> list[str]:
    """``keep_columns`` as a list of distinct names (None: none)."""
    if keep_columns is None:
        return []
    names = [keep_columns] if isinstance(keep_columns, str) else keep_columns
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"keep_columns must be a name or a list of names, got {keep_columns!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"keep_columns={keep_columns!r} names a column twice")
    return list(names)


def split_columns(batch, names: list[str], size: int):
    """``(batch without the kept columns, {name: numpy array [size, ...]})``: a dict batch's
    fields, or ``"label"``, the second element of an ``(input, label)`` batch."""
    if not names:
        return batch, {}
    if isinstance(batch, Mapping):
        missing = [name for name in names if name not in batch]
        if missing:
            raise ValueError(f"keep_columns: the batch has no field {missing[0]!r}; its fields are "
                             f"{sorted(batch)}")
        return ({key: value for key, value in batch.items() if key not in names},
                {name: _column_values(name, batch[name], size) for name in names})
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        if names != ["label"]:
            raise ValueError(f"keep_columns={names!r}: a batch of (input, label) has one column, 'label' "
                             "(its second element); for other columns, make the dataset's items dicts")
        return batch, {"label": _column_values("label", batch[1], size)}
    raise ValueError(f"keep_columns={names!r}: a {type(batch).__name__} batch has no columns; keep_columns "
                     "takes fields of dict batches, or 'label' of (input, label) batches")


def _column_values(name: str, values, size: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = (values.float() if values.dtype in (torch.bfloat16, torch.float16) else values).numpy()
    else:
        values = np.asarray(values)
    if values.ndim == 0 or len(values) != size or values.dtype.kind not in "biufU":
        what = (f"{values.dtype} values" if values.ndim and len(values) == size
                else f"{values.shape[0] if values.ndim else 'no'} values for {size} samples")
        raise ValueError(f"keep_columns: column {name!r} has {what}; a kept column holds one number or "
                         "string per sample")
    return values


class FirstN(Dataset):
    """The first ``n`` items of a map-style dataset (``--limit``), keeping what extract reads of
    it: ``extract_spec`` (with the limit), ``token_counts``, ``special_ids``, ``classes``.

    Example:
        >>> FirstN(make_dataset("fake:2048"), 100)[99][1]
        99
    """

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(int(n), len(dataset))
        spec = getattr(dataset, "extract_spec", None)
        if spec is not None:
            self.extract_spec = {**spec, "limit": self.n}
        counts = getattr(dataset, "token_counts", None)
        if counts is not None:
            self.token_counts = np.asarray(counts)[:self.n]
        for name in ("special_ids", "classes"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for the first {self.n} items")
        return self.dataset[index]


def hf_dataset(data) -> bool:
    """Whether ``data`` is a Hugging Face ``datasets.Dataset`` (without importing datasets)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(data, module.Dataset)


def hf_spec(dataset) -> dict:
    """What identifies a Hugging Face dataset's rows: its fingerprint (a hash of how it was made,
    which changes with every map/filter/select), size and columns; checked on resume."""
    return {"corpus": "datasets", "fingerprint": dataset._fingerprint, "rows": len(dataset),
            "columns": list(dataset.column_names)}


class MapSource:
    """A DataLoader over a map-style dataset, replanned as explicit batches of indices.

    ``spec``: the dataset's ``extract_spec`` (a JSON-able dict of how its items are made, e.g.
    tokenization and packing, recorded in the manifest and checked on resume), or None.
    ``rank_tokens``: the real tokens of each of this rank's samples, in order, from the
    dataset's ``token_counts`` (the text datasets have them), or None.

    ``positions`` are places in the global (all-rank) order; under torch.distributed rank r
    holds positions r, r + W, ... of the DistributedSampler's padded list, and positions
    >= num_samples are its padding.
    """

    kind = "map"

    def __init__(self, loader: DataLoader, rank: int, world_size: int):
        self.loader = loader
        self.spec = getattr(loader.dataset, "extract_spec", None)
        if self.spec is None and hf_dataset(loader.dataset):
            self.spec = hf_spec(loader.dataset)
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
        counts = getattr(loader.dataset, "token_counts", None)
        self.rank_tokens = None if counts is None else np.asarray(counts)[indices[:self.rank_samples]]

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


class IterableSource:
    """Any other iterable of batches; rows are numbered by running sample counters."""

    kind = "iterable"
    num_samples = None
    rank_samples = None
    rank_tokens = None
    batch_size = None
    order_digest = None

    def __init__(self, data: Iterable):
        self.data = data
        self.spec = getattr(getattr(data, "dataset", data), "extract_spec", None)

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


def make_source(data, rank: int, world_size: int):
    if hf_dataset(data):
        raise TypeError(
            "data is a datasets.Dataset; extract takes batches: wrap it in a DataLoader, e.g. "
            "DataLoader(dataset.with_format('torch'), batch_size=64) for rows of equal-length ids, or "
            "DataLoader(fastcap.text.make_text_dataset(dataset, context=T, ...), batch_size=64) to tokenize, "
            "pack or pad a text or ids column as the command line does")
    map_style = (isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset)
                 and data.batch_sampler is not None)
    if map_style and isinstance(data.batch_sampler, BatchSampler):
        return MapSource(data, rank, world_size)
    if world_size > 1:
        raise ValueError(
            "under torch.distributed, data must be a DataLoader with batch_size over a map-style "
            f"dataset (so that it can be split with a DistributedSampler), got {type(data).__name__}"
            + (" with a custom batch_sampler" if map_style else "")
        )
    return IterableSource(data)


# --------------------------------------------------------------------------------------------
# Arguments recorded in the manifest, and the check against an existing extraction
# --------------------------------------------------------------------------------------------
