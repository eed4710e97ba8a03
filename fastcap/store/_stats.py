"""Running statistics of a key's rows, as SAE training normalises with: count, per-channel mean
and variance, the mean L2 norm of a row, per-channel min and max.

Each shard's moments are computed in float64 when it is committed, over exactly the rows the
store presents (a DistributedSampler's padding duplicates left out), and merged into the rank's
running moments with Chan et al.'s pairwise update; ``merge_manifests`` merges the ranks the
same way. The result does not depend on how the rows were split into shards, batches or ranks
beyond float64 rounding. Columns holding inf or nan get numpy's float64 answer exactly (an inf or
nan mean, a nan variance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Bytes of float64 rows converted at a time: bounds the memory of the pass over a shard (the
# two-pass formula makes a few temporaries of the chunk's size).
_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class KeyStats:
    """Statistics of one key's rows ``[count, C]`` (float64 numpy arrays ``[C]``).

    ``var`` is the population variance (``ddof=0``, as ``np.var``); ``norm_mean`` the mean of
    ``np.linalg.norm(row)`` over the rows.

    Example:
        >>> s = fastcap.open("acts/").stats["resid6"]
        >>> x = (torch.from_numpy(store["resid6"][:4096]) - torch.from_numpy(s.mean)) / s.norm_mean
    """

    count: int
    mean: np.ndarray
    var: np.ndarray
    norm_mean: float
    min: np.ndarray
    max: np.ndarray

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)


class Moments:
    """Mergeable moments: count, mean, M2 (sum of squared deviations), sum of row norms, min, max."""

    def __init__(self, count: int, mean: np.ndarray, m2: np.ndarray, norm_sum: float,
                 low: np.ndarray, high: np.ndarray):
        self.count, self.mean, self.m2, self.norm_sum, self.min, self.max = count, mean, m2, norm_sum, low, high

    @classmethod
    def of_rows(cls, rows: torch.Tensor) -> "Moments":
        """The moments of float64 rows ``[n, C]`` (n >= 1), by the two-pass formula."""
        mean = rows.mean(0)
        m2 = ((rows - mean) ** 2).sum(0)
        return cls(rows.shape[0], mean.numpy(), m2.numpy(), float(torch.linalg.vector_norm(rows, dim=1).sum()),
                   rows.amin(0).numpy(), rows.amax(0).numpy())

    def merge(self, other: "Moments | None") -> "Moments":
        """Chan's parallel update: the moments of both sets of rows together."""
        if other is None or other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        with np.errstate(invalid="ignore"):  # inf - inf: nan, as numpy gives over the same rows
            delta = other.mean - self.mean
            # A column holding inf or nan has a non-finite mean; numpy's sum gives inf + finite =
            # inf and inf + -inf = nan, where the update below would give inf - inf = nan.
            finite = np.isfinite(self.mean) & np.isfinite(other.mean)
            mean = np.where(finite, self.mean + delta * (other.count / count), self.mean + other.mean)
            # Such a column's m2 is already nan (inf - inf in of_rows), as numpy's variance is.
            m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / count)
        return Moments(count, mean, m2, self.norm_sum + other.norm_sum,
                       np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    def key_stats(self) -> KeyStats:
        return KeyStats(self.count, self.mean, self.m2 / self.count, self.norm_sum / self.count,
                        self.min, self.max)

    # The manifest holds them as JSON; Python's float repr round-trips float64 exactly.
    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist(),
                "norm_sum": self.norm_sum, "min": self.min.tolist(), "max": self.max.tolist()}

    @classmethod
    def from_json(cls, data: dict | None) -> "Moments | None":
        if data is None:
            return None
        arrays = [np.asarray(data[name], dtype=np.float64) for name in ("mean", "m2", "min", "max")]
        return cls(int(data["count"]), arrays[0], arrays[1], float(data["norm_sum"]), arrays[2], arrays[3])


def shard_moments(path, torch_dtype: str, keep: np.ndarray | None) -> Moments | None:
    """The moments of the rows of one shard's ``.npy`` file (only rows where ``keep`` is True,
    when given), read in chunks; None when no row counts."""
    dtype = getattr(torch, torch_dtype)
    total = None
    for start, chunk in _chunks(path):
        if keep is not None:
            chunk = chunk[keep[start:start + len(chunk)]]
        if not len(chunk):
            continue
        rows = torch.from_numpy(chunk)
        if rows.dtype != dtype:  # bfloat16 and other dtypes numpy lacks are stored as raw bits
            rows = rows.view(dtype)
        total = combine(total, Moments.of_rows(rows.to(torch.float64)))
    return total


def _chunks(path):
    """``(first row, rows)`` of an ``.npy`` file, ``_CHUNK_BYTES`` of float64 at a time, read
    into memory of their own: a memory map would leave every page it touched in the process's resident set
    (the whole shard, by the end of the pass)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array; fastcap writes C order")
        row_shape = shape[1:]
        row_values = int(np.prod(row_shape, dtype=np.int64))
        row_bytes = row_values * dtype.itemsize
        step = max(1, _CHUNK_BYTES // max(8 * row_values, 1))
        for start in range(0, shape[0], step):
            count = min(step, shape[0] - start)
            chunk = np.empty((count, *row_shape), dtype)
            if row_bytes and f.readinto(memoryview(chunk).cast("B")) != count * row_bytes:
                raise ValueError(f"{path}: shorter than its header says ({shape[0]} rows)")
            yield start, chunk


def combine(total: "Moments | None", part: "Moments | None") -> "Moments | None":
    """Moments of both (either may be None: nothing yet)."""
    return part if total is None else total.merge(part)


def merge_json(parts: list) -> dict | None:
    """Merge moments given as JSON (None entries: nothing) into JSON."""
    total = None
    for part in parts:
        total = combine(total, Moments.from_json(part))
    return None if total is None else total.to_json()
