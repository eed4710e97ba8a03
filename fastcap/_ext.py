"""Loads fastcap's compiled core and checks it matches the torch it runs with."""
from __future__ import annotations

import torch

try:
    from fastcap import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "fastcap's compiled extension fastcap._C is missing or failed to load "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` (torch must be "
        "installed first), or run `make test`, which sets everything up."
    ) from exc


def _check_torch_version() -> None:
    built = _C.torch_version()
    running = torch.__version__.split("+")[0]
    if built.split("+")[0] != running:
        raise ImportError(
            f"fastcap._C was built against torch {built} but torch {torch.__version__} is "
            "running; rebuild it with `pip install --no-build-isolation -e .`.")


def _check_cuda_version() -> None:
    """As torchvision does: a CUDA build of fastcap must match the CUDA torch was built with."""
    built = _C.cuda_version()  # e.g. 13000 for 13.0; -1 without CUDA
    if built < 0 or torch.version.cuda is None:
        return
    major, minor = built // 1000, built % 1000 // 10
    t_major, t_minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    if major != t_major:
        raise ImportError(
            f"fastcap._C was compiled with CUDA {major}.{minor} but torch uses CUDA {torch.version.cuda}; "
            "rebuild it where the CUDA toolkit matches torch's (pip install --no-build-isolation -e .)")


_check_torch_version()
_check_cuda_version()

#: Whether the CUDA kernels, side-stream copies and pinned rings were compiled in.
BUILT_WITH_CUDA: bool = _C.built_with_cuda()


def cuda_ready() -> bool:
    """CUDA kernels compiled in and a CUDA device visible."""
    return BUILT_WITH_CUDA and torch.cuda.is_available()


def live_host_bytes() -> int:
    """Host bytes held by fastcap's rings right now (pinned or not)."""
    return _C.live_host_bytes()


def live_pinned_bytes() -> int:
    """Pinned host bytes held by fastcap's rings right now."""
    return _C.live_pinned_bytes()


def empty_cache() -> int:
    """Returns the host memory fastcap's pool keeps for reuse (pinned and plain) to the system.

    Ring slots come from a process-wide pool, so that a new capture (or a grown slot) reuses
    the pinned memory of earlier ones instead of paying ``cudaHostAlloc`` and, at close, a
    device-synchronising ``cudaFreeHost``. Memory in use by a live capture is not touched.
    Like ``torch.cuda.empty_cache()``, it is only needed to hand memory back between jobs.

    Example::

        with fastcap.capture(model, "layer4") as cap:
            model(x)
        freed = fastcap.empty_cache()       # bytes handed back
    """
    return _C.empty_cache()


def pool_bytes() -> int:
    """Host bytes held by fastcap's pool now (in use by rings plus cached for reuse)."""
    s = _C.pool_stats()
    return s["pinned_allocated_bytes"] + s["plain_allocated_bytes"]
