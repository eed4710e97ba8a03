"""fastcap: memory-efficient activation capture for PyTorch.

Forward hooks hand each activation to compiled ops (``fastcap._C``) that copy or reduce it
(full, per-channel mean, top-k) into preallocated host ring buffers - pinned, and filled
by side-stream copies, on CUDA.

    with fastcap.capture(model, ["layer3", "layer4"], reduce="mean") as cap:
        for x, _ in loader:
            model(x)
    feats = cap.result()

Everything a user calls is here: :func:`capture`, :class:`TopK`, :class:`Tokens` (language models:
which tokens are real), :class:`TokenIndex`, :func:`extract`, :func:`open`, :func:`layers` (a
model's layer names and output shapes), :func:`empty_cache`.
"""
from fastcap._ext import BUILT_WITH_CUDA, empty_cache
from fastcap._layer_list import layers
from fastcap._slots import TopK
from fastcap._tokens import TokenIndex, Tokens
from fastcap.capture import Capture, capture
from fastcap.extract import extract
from fastcap.store import LayerArray, Store, open  # noqa: A004 (fastcap.open, like np.load)

__version__ = "0.1.0"

__all__ = ["capture", "Capture", "TopK", "Tokens", "TokenIndex", "extract", "open", "Store", "LayerArray",
           "layers", "empty_cache", "BUILT_WITH_CUDA", "__version__"]
