"""Thin typed wrappers over fastcap's compiled ops (``torch.ops.fastcap``), each with the
fake implementation that lets it trace (``torch.compile``, ``torch.library.opcheck``).

Each op writes into tensors the caller provides - views of a ring slot - and returns
nothing.
"""
from __future__ import annotations

from typing import Literal

import torch

from fastcap import _ext  # noqa: F401  (loads fastcap._C, which registers the ops)

_ops = torch.ops.fastcap


def copy_into(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(src)``: an exact copy, cast to ``dst.dtype``; ``dst`` has ``src``'s shape."""
    _ops.copy_into(src, dst)


def mean_into(src: torch.Tensor, channel_dim: int, dst: torch.Tensor) -> None:
    """``dst[n, c]`` = mean of ``src`` over every dim but 0 and ``channel_dim``.

    ``dst`` is float32 ``[N, C]``, contiguous; the sums are accumulated in float32.

    Example::

        x = torch.randn(8, 64, 7, 7)
        out = torch.empty(8, 64)
        fastcap._ops.mean_into(x, 1, out)      # == x.mean((2, 3))
    """
    _ops.mean_into(src, channel_dim, dst)


def topk_into(src: torch.Tensor, k: int, channel_dim: int, values: torch.Tensor,
              indices: torch.Tensor) -> None:
    """``torch.topk(src, k, dim=channel_dim)`` (largest first) into ``values``/``indices``,
    contiguous tensors of ``src``'s shape with the channel dim replaced by ``k``."""
    _ops.topk_into(src, k, channel_dim, values, indices)


def tokens_into(src: torch.Tensor, keep: torch.Tensor, token_dim: int, rows: torch.Tensor,
                count: torch.Tensor) -> None:
    """The kept tokens' rows of ``src`` ``[N, T, C]``, compacted in (sample, position) order:
    ``rows[:n] = src[keep]`` (cast to ``rows.dtype``) and ``count[0] = n = keep.sum()``.

    ``keep`` is a bool ``[N, T]`` on ``src``'s device and ``token_dim`` must be 1 (or -2):
    the channels are the last dim. ``rows`` is ``[N*T, C]``, an upper bound: the rows
    past ``n`` are left as they are. ``count`` is int64 ``[1]``. On CUDA nothing is read
    back on the host (``n`` stays on the device).

    Example::

        x = torch.randn(2, 5, 8)
        keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        rows, count = torch.empty(10, 8), torch.empty(1, dtype=torch.int64)
        fastcap._ops.tokens_into(x, keep, 1, rows, count)   # rows[:8] == x[keep], count == [8]
    """
    _ops.tokens_into(src, keep, token_dim, rows, count)


def token_index_into(keep: torch.Tensor, ids: torch.Tensor | None, sample_offset: int,
                     sample: torch.Tensor, position: torch.Tensor, token_id: torch.Tensor,
                     count: torch.Tensor) -> None:
    """Where each kept token of ``keep`` (bool ``[N, T]``) came from, in the order of
    :func:`tokens_into`: ``sample = sample_offset + n``, ``position = t`` and
    ``token_id = ids[n, t]`` (-1 when ``ids`` is None; ``ids`` any integer dtype, of
    ``keep``'s shape). Outputs are int64 ``[N*T]`` (upper bounds), ``count`` int64 ``[1]``.

    Example::

        keep = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
        ids = torch.tensor([[0, 7, 8], [9, 0, 0]])
        sample, position, token_id = (torch.empty(6, dtype=torch.int64) for _ in range(3))
        count = torch.empty(1, dtype=torch.int64)
        fastcap._ops.token_index_into(keep, ids, 100, sample, position, token_id, count)
        # count == [3]; sample[:3] == [100, 100, 101], position[:3] == [1, 2, 0],
        # token_id[:3] == [7, 8, 9]
    """
    _ops.token_index_into(keep, ids, sample_offset, sample, position, token_id, count)


def pool_tokens_into(src: torch.Tensor, keep: torch.Tensor, token_dim: int,
                     reduce: Literal["mean", "max", "first", "last"], dst: torch.Tensor) -> None:
    """``dst[n]`` = ``src[n]`` ``[T, C]`` pooled over its kept tokens (``keep[n]``), by ``reduce``:

    - ``"mean"``: float32 ``dst``, summed in float32 (sentence-transformers' masked mean);
    - ``"max"``: the max over the kept tokens, in ``src``'s dtype;
    - ``"first"`` / ``"last"``: the first / last kept token's row, in ``src``'s dtype.

    ``dst`` is ``[N, C]``, contiguous; a sample with no kept token gives a row of zeros.

    Example::

        x = torch.randn(2, 4, 8)
        keep = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
        out = torch.empty(2, 8)
        fastcap._ops.pool_tokens_into(x, keep, 1, "mean", out)  # out[0] == x[0, :2].mean(0)
    """
    _ops.pool_tokens_into(src, keep, token_dim, reduce, dst)


def tokens_topk_into(src: torch.Tensor, keep: torch.Tensor, token_dim: int, k: int,
                     values: torch.Tensor, indices: torch.Tensor, count: torch.Tensor) -> None:
    """``torch.topk(src[keep], k)`` (largest first, over the channels) compacted like
    :func:`tokens_into`: ``values`` (``src``'s dtype) and int64 ``indices`` are
    ``[N*T, k]``, of which the first ``count[0]`` rows are the kept tokens'; ``k`` in
    ``[1, C]``. On CUDA the rows past ``count`` may be overwritten (with garbage).

    Example::

        x = torch.randn(2, 5, 16)
        keep = torch.ones(2, 5, dtype=torch.bool)
        values, indices = torch.empty(10, 4), torch.empty(10, 4, dtype=torch.int64)
        count = torch.empty(1, dtype=torch.int64)
        fastcap._ops.tokens_topk_into(x, keep, 1, 4, values, indices, count)
    """
    _ops.tokens_topk_into(src, keep, token_dim, k, values, indices, count)


def gather_rows(src: list[torch.Tensor], shard: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = src[shard[i]][rows[i]]`` on CPU, whole rows of bytes: each ``src`` uint8
    ``[R_s, B]`` (a shard's rows), ``shard`` and ``rows`` int64 ``[n]``, ``out`` uint8
    ``[n, B]``, all contiguous. The read of :meth:`Store.loader`, one call per batch: the batch
    is written with streaming stores, and the rows after a jump prefetched, so scattered rows
    read near the speed of a sequential copy. An index outside ``src`` is an IndexError naming
    it (``out`` untouched). Releases the GIL.

    Example::

        a, b = torch.arange(12, dtype=torch.uint8).view(4, 3), torch.zeros(2, 3, dtype=torch.uint8)
        out = torch.empty(3, 3, dtype=torch.uint8)
        fastcap._ops.gather_rows([a, b], torch.tensor([0, 1, 0]), torch.tensor([3, 0, 1]), out)
        # out == [a[3], b[0], a[1]]
    """
    _ops.gather_rows(src, shard, rows, out)


@torch.library.register_fake("fastcap::copy_into")
def _copy_into_fake(src, dst) -> None:
    torch._check(src.shape == dst.shape, lambda: f"dst shape {dst.shape} != src shape {src.shape}")


@torch.library.register_fake("fastcap::mean_into")
def _mean_into_fake(src, channel_dim, dst) -> None:
    torch._check(dst.dtype == torch.float32, lambda: f"dst must be float32, got {dst.dtype}")


@torch.library.register_fake("fastcap::topk_into")
def _topk_into_fake(src, k, channel_dim, values, indices) -> None:
    torch._check(indices.dtype == torch.int64, lambda: f"indices must be int64, got {indices.dtype}")


def _token_dims_fake(src, keep, token_dim):
    torch._check(src.dim() == 3 and token_dim in (1, -2),
                 lambda: f"tokens need [N, T, C] with token_dim=1, got shape {list(src.shape)}")
    n, t, c = src.shape
    torch._check(keep.dtype == torch.bool, lambda: f"keep must be bool, got {keep.dtype}")
    torch._check(keep.dim() == 2 and keep.shape[0] == n and keep.shape[1] == t,
                 lambda: f"keep must have shape [{n}, {t}], got {list(keep.shape)}")
    return n, t, c


def _check_count_fake(count):
    torch._check(count.dim() == 1 and count.shape[0] == 1 and count.dtype == torch.int64,
                 lambda: f"count must be int64 [1], got {count.dtype} {list(count.shape)}")


@torch.library.register_fake("fastcap::tokens_into")
def _tokens_into_fake(src, keep, token_dim, rows, count) -> None:
    n, t, c = _token_dims_fake(src, keep, token_dim)
    torch._check(rows.dim() == 2 and rows.shape[0] == n * t and rows.shape[1] == c,
                 lambda: f"rows must have shape [{n * t}, {c}], got {list(rows.shape)}")
    _check_count_fake(count)


@torch.library.register_fake("fastcap::token_index_into")
def _token_index_into_fake(keep, ids, sample_offset, sample, position, token_id, count) -> None:
    torch._check(keep.dim() == 2, lambda: f"keep must be [N, T], got {list(keep.shape)}")
    n, t = keep.shape
    for name, out in (("sample", sample), ("position", position), ("token_id", token_id)):
        torch._check(out.dim() == 1 and out.shape[0] == n * t and out.dtype == torch.int64,
                     lambda: f"{name} must be int64 [{n * t}], got {out.dtype} {list(out.shape)}")
    _check_count_fake(count)


@torch.library.register_fake("fastcap::pool_tokens_into")
def _pool_tokens_into_fake(src, keep, token_dim, reduce, dst) -> None:
    n, t, c = _token_dims_fake(src, keep, token_dim)
    torch._check(reduce in ("mean", "max", "first", "last"),
                 lambda: f"reduce must be one of mean|max|first|last, got {reduce!r}")
    torch._check(dst.dim() == 2 and dst.shape[0] == n and dst.shape[1] == c,
                 lambda: f"dst must have shape [{n}, {c}], got {list(dst.shape)}")
    want = torch.float32 if reduce == "mean" else src.dtype
    torch._check(dst.dtype == want, lambda: f"dst must be {want}, got {dst.dtype}")


@torch.library.register_fake("fastcap::gather_rows")
def _gather_rows_fake(src, shard, rows, out) -> None:
    torch._check(out.dim() == 2 and out.shape[0] == rows.shape[0] == shard.shape[0],
                 lambda: f"out must have one row per index, got {list(out.shape)} for {rows.shape[0]} rows")


@torch.library.register_fake("fastcap::tokens_topk_into")
def _tokens_topk_into_fake(src, keep, token_dim, k, values, indices, count) -> None:
    n, t, c = _token_dims_fake(src, keep, token_dim)
    for name, out in (("values", values), ("indices", indices)):
        torch._check(out.dim() == 2 and out.shape[0] == n * t and out.shape[1] == k,
                     lambda: f"{name} must have shape [{n * t}, {k}], got {list(out.shape)}")
    torch._check(indices.dtype == torch.int64, lambda: f"indices must be int64, got {indices.dtype}")
    _check_count_fake(count)
