"""Running statistics of a key's rows, as SAE training normalises with: count, per-channel mean
and variance, the mean L2 norm of a row, per-channel min and max.

Each shard's moments are computed in float64 over exactly the rows the store presents (a
DistributedSampler's padding duplicates left out): step by step as the writer writes them, or,
for a shard holding padding, from its files when it is committed; then merged into the rank's
running moments with Chan et al.'s pairwise update; ``merge_manifests`` merges the ranks the
same way. The result does not depend on how the rows were split into shards, batches or ranks
beyond float64 rounding. Columns holding inf or nan get numpy's float64 answer exactly (an inf or
nan mean, a nan variance).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

# Bytes of float64 rows converted at a time: bounds the memory of the pass (the two-pass formula
# makes a few temporaries of the chunk's size), and keeps those temporaries where malloc reuses
# them: at 4 MiB each one was new mapped memory, and its page faults took 6x the arithmetic.
_CHUNK_BYTES = 1 << 20


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
    def of_rows(cls, rows: np.ndarray) -> "Moments":
        """The moments of float64 rows ``[n, C]`` (n >= 1), by the two-pass formula. numpy, not
        torch: it runs in the writer thread, where torch's intra-op parallelism would start a
        team of OpenMP threads of its own, spinning beside the forward's."""
        with np.errstate(invalid="ignore", over="ignore"):  # inf and nan: numpy's answers, quietly
            mean = rows.mean(0)
            centered = rows - mean
            m2 = np.einsum("ij,ij->j", centered, centered)
            norm_sum = float(np.sqrt(np.einsum("ij,ij->i", rows, rows)).sum())
        return cls(rows.shape[0], mean, m2, norm_sum, rows.min(0), rows.max(0))

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


def array_moments(array: np.ndarray, torch_dtype: str) -> Moments | None:
    """The moments of rows ``[n, C]`` as a shard stores them (raw bits for the dtypes numpy
    lacks, such as bfloat16), converted to float64 ``_CHUNK_BYTES`` at a time; None for no rows.
    The writer takes each step's in as it writes them, while the rows are in the cache."""
    if not len(array):
        return None
    rows = array.reshape(len(array), -1)
    step = max(1, _CHUNK_BYTES // max(8 * rows.shape[1], 1))
    total = None
    for start in range(0, rows.shape[0], step):
        total = combine(total, Moments.of_rows(_float64(rows[start:start + step], torch_dtype)))
    return total


def _float64(rows: np.ndarray, torch_dtype: str) -> np.ndarray:
    """Stored rows as float64, by numpy alone (this runs in the writer thread: see of_rows):
    numpy's own floats converted; bfloat16's raw bits are the top half of a float32's (exact);
    a one-byte float's (float8) looked up in a table of its 256 values."""
    if rows.dtype.kind == "f":
        return rows.astype(np.float64)
    if torch_dtype == "bfloat16":
        return (rows.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return _byte_values(torch_dtype)[rows]


@functools.lru_cache(maxsize=None)
def _byte_values(torch_dtype: str) -> np.ndarray:
    """The float64 value of each of the 256 bit patterns of a one-byte float dtype."""
    return torch.arange(256, dtype=torch.uint8).view(getattr(torch, torch_dtype)).to(torch.float64).numpy()


def shard_moments(path, torch_dtype: str, keep: np.ndarray | None) -> Moments | None:
    """The moments of the rows of one shard's ``.npy`` file (only rows where ``keep`` is True,
    when given), read in chunks; None when no row counts."""
    total = None
    for start, chunk in _chunks(path):
        if keep is not None:
            chunk = chunk[keep[start:start + len(chunk)]]
        total = combine(total, array_moments(chunk, torch_dtype))
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
