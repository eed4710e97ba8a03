"""Language models: which tokens are real. :class:`Tokens` says where a forward's attention
mask and token ids are; :func:`keep_mask` turns them into the kept tokens ``[N, T]`` on the
device (no synchronisation); :class:`TokenIndex` says where each kept row came from."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

#: reduce modes that take tokens= ("full" ignores the mask; "mean" and "topk" change meaning).
TOKEN_MODES = ("tokens", "mean", "max", "first", "last", "topk")
#: one row per kept token: these layers share the capture's token index.
ROW_MODES = ("tokens", "topk")
#: one row per sample, pooled over its kept tokens.
POOL_MODES = ("mean", "max", "first", "last")
#: the key under which drain() hands out each step's TokenIndex.
TOKEN_INDEX_KEY = "token_index"

Source = Union[None, str, Callable[[tuple, dict], Optional[torch.Tensor]]]


class TokenIndex(NamedTuple):
    """Where each kept token's row came from: int64 tensors ``[n_kept]``.

    ``sample`` numbers samples from 0 over the whole capture (in ``extract``: the dataset
    index), ``position`` is the index along T, ``token_id`` the id (-1 without ids).
    """

    sample: torch.Tensor
    position: torch.Tensor
    token_id: torch.Tensor


@dataclass(frozen=True)
class Tokens:
    """Makes a capture mask-aware: pads, skipped ids and the first ``start`` real tokens of a
    sequence never reach the host.

    A token is kept when its mask is nonzero, its id is not in ``skip_ids``, and it is at or
    after the ``start``-th real token of its sequence (real = mask nonzero, counted before
    skipping ids; ``start=1`` drops the first real token). ``mask`` and ``ids`` name arguments
    of the model's forward (positional or keyword, found by its signature), or are callables
    ``(args, kwargs) -> Tensor[N, T]``. A call without a mask keeps every position.

    Example::

        tok = fastcap.Tokens(mask="attention_mask", ids="input_ids", skip_ids=[bos_id])
        with fastcap.capture(gpt2, {"resid6": "transformer.h.6"}, reduce="tokens", tokens=tok) as cap:
            gpt2(**batch)
        rows, where = cap.result()["resid6"], cap.token_index()
    """

    mask: Source = "attention_mask"
    ids: Source = "input_ids"
    skip_ids: Sequence[int] = ()
    start: int = 0
    token_dim: int = 1

    def __post_init__(self):
        for name in ("mask", "ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not callable(value):
                raise TypeError(f"Tokens({name}=...) must be an argument name, a callable "
                                f"(args, kwargs) -> Tensor or None, got {type(value).__name__}: {value!r}")
        skip = tuple(self.skip_ids)
        for i in skip:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"Tokens(skip_ids=...) must be ints, got {type(i).__name__}: {i!r}")
        object.__setattr__(self, "skip_ids", skip)
        if skip and self.ids is None:
            raise ValueError(f"Tokens(skip_ids={list(skip)}) needs ids to read (ids=None): name the "
                             "forward argument holding the token ids, e.g. ids='input_ids'")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"Tokens(start=...) must be an int >= 0, got {self.start!r}")
        if self.token_dim not in (1, -2):
            raise ValueError(f"Tokens(token_dim=...) must be 1 (or -2): outputs are [N, T, C] with the "
                             f"channels last, got {self.token_dim!r}")


class BoundTokens:
    """A :class:`Tokens` checked against a model's forward signature: finds the mask and the
    ids among a call's arguments."""

    def __init__(self, tokens: Tokens, model: nn.Module):
        self.tokens = tokens
        self._skip: dict = {}  # (device, dtype) -> skip_ids as a tensor
        self._signature = inspect.signature(model.forward)
        params = self._signature.parameters
        # The name of a **kwargs parameter, where keyword arguments not in the signature land.
        self._var_kw = next((p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        open_kwargs = self._var_kw is not None
        for what in ("mask", "ids"):
            name = getattr(tokens, what)
            if isinstance(name, str) and name not in params and not open_kwargs:
                raise ValueError(
                    f"Tokens({what}={name!r}): {type(model).__name__}.forward has no argument {name!r} "
                    f"(its arguments: {list(params)}); name one of them, or pass a callable "
                    "(args, kwargs) -> Tensor")

    def skip_tensor(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``skip_ids`` as a tensor on ``device``: made once per device and dtype (a tensor built
        from a list is a blocking host-to-device copy; once, not every forward)."""
        key = (device, dtype)
        skip = self._skip.get(key)
        if skip is None:
            skip = self._skip[key] = torch.tensor(self.tokens.skip_ids, dtype=dtype, device=device)
        return skip

    def find(self, args: tuple, kwargs: dict) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(mask, ids) of one call of the model; None where the call has none."""
        bound = None
        found = []
        for source in (self.tokens.mask, self.tokens.ids):
            if source is None:
                found.append(None)
            elif callable(source):
                found.append(source(args, kwargs))
            else:
                if bound is None:
                    try:
                        bound = self._signature.bind_partial(*args, **kwargs).arguments
                    except TypeError:
                        bound = dict(kwargs)
                value = bound.get(source)
                if value is None and self._var_kw is not None:
                    value = bound.get(self._var_kw, {}).get(source)
                found.append(value)
        return found[0], found[1]


def keep_mask(bound: BoundTokens, key: str, x: torch.Tensor, mask: Optional[torch.Tensor],
              ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The kept tokens of output ``x`` ``[N, T, C]``: bool ``[N, T]`` on x's device, computed
    with device ops only (nothing is read back to the host, nothing synchronises: the mask and
    ids of a call are on the model's device already, as its inputs)."""
    tokens = bound.tokens
    n, t = x.shape[0], x.shape[1]
    device = x.device
    if mask is None:
        real = torch.ones(n, t, dtype=torch.bool, device=device)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, t):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"layer {key!r}: the mask has shape {shape}, but the output {tuple(x.shape)} "
                             f"needs [N, T] = [{n}, {t}]")
        real = mask.to(device, non_blocking=True) != 0
    keep = real
    if tokens.skip_ids:
        if ids is None:
            raise ValueError(f"layer {key!r}: Tokens(skip_ids={list(tokens.skip_ids)}) needs the ids, but "
                             "this call of the model has none")
        if tuple(ids.shape) != (n, t):
            raise ValueError(f"layer {key!r}: the ids have shape {tuple(ids.shape)}, but the output "
                             f"{tuple(x.shape)} needs [N, T] = [{n}, {t}]")
        ids = ids.to(device, non_blocking=True)
        keep = keep & ~torch.isin(ids, bound.skip_tensor(device, ids.dtype))
    if tokens.start:
        keep = keep & (real.cumsum(1) > tokens.start)
    return keep


def check_token_output(key: str, mode: str, x: torch.Tensor) -> None:
    """A token mode needs ``[N, T, C]``."""
    if x.dim() != 3:
        raise ValueError(f"layer {key!r}: reduce={mode!r} with tokens= needs an output of shape [N, T, C] "
                         f"(token_dim=1, channels last), got shape {tuple(x.shape)}; capture a layer "
                         "that outputs hidden states, or use select= to pick them")
