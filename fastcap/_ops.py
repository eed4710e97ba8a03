"""Thin typed wrappers over fastcap's compiled ops (``torch.ops.fastcap``), each with the
fake implementation that lets it trace (``torch.compile``, ``torch.library.opcheck``).

Each op writes into tensors the caller provides - views of a ring slot - and returns
nothing.
"""
from __future__ import annotations

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


@torch.library.register_fake("fastcap::copy_into")
def _copy_into_fake(src, dst) -> None:
    torch._check(src.shape == dst.shape, lambda: f"dst shape {dst.shape} != src shape {src.shape}")


@torch.library.register_fake("fastcap::mean_into")
def _mean_into_fake(src, channel_dim, dst) -> None:
    torch._check(dst.dtype == torch.float32, lambda: f"dst must be float32, got {dst.dtype}")


@torch.library.register_fake("fastcap::topk_into")
def _topk_into_fake(src, k, channel_dim, values, indices) -> None:
    torch._check(indices.dtype == torch.int64, lambda: f"indices must be int64, got {indices.dtype}")
