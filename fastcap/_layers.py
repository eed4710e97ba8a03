"""Which modules a capture hooks: names, dotted globs and aliases, resolved against
``model.named_modules()``, with per-layer options spread over the resolved layers; and
the model's device."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fastcap._tokens import TOKEN_INDEX_KEY, TOKEN_MODES, Tokens

#: capture()'s reduce modes without tokens= (with it, also fastcap._tokens.TOKEN_MODES).
REDUCE_MODES = ("full", "mean", "topk")

LayerSpec = Union[str, Sequence[str], Mapping[str, str]]

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Layer:
    """A hooked module and how its activations are captured."""

    key: str
    module_name: str
    mode: str
    k: Optional[int]
    channel_dim: int
    dtype: Optional[torch.dtype]
    select: Any  # None, an int, a str key or a callable: which tensor of the output
    keep_layout: bool = True  # full: keep a dense layout (channels_last); False: contiguous
    token_mode: bool = False  # reduce over the kept tokens of [N, T, C] (tokens=)


def _part_regex(part: str) -> str:
    """One dotted part of a glob: `*` and `?` never cross a dot."""
    out, i = [], 0
    while i < len(part):
        ch = part[i]
        if ch == "*":
            out.append(r"[^.]*")
        elif ch == "?":
            out.append(r"[^.]")
        elif ch == "[":
            end = part.find("]", i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = part[i + 1:end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def glob_to_regex(pattern: str) -> "re.Pattern[str]":
    """Compiles a dotted glob: `*`/`?` stay within one part, `**` spans any number of them.

    >>> bool(glob_to_regex("layer*.1").fullmatch("layer2.1"))
    True
    >>> bool(glob_to_regex("layer*.1").fullmatch("layer2.0.downsample.1"))
    False
    >>> bool(glob_to_regex("**.mlp").fullmatch("h.0.mlp"))
    True
    """
    parts = pattern.split(".")
    pieces: List[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            # Leading or middle `**.`: zero or more whole parts, each with its dot.
            # Trailing `.**`: one or more parts below the prefix.
            pieces.append(r".+" if len(parts) == 1 else (r"(?:[^.]+\.)*" if not last else r"[^.]+(?:\.[^.]+)*"))
            continue
        pieces.append(_part_regex(part) + ("" if last else r"\."))
    try:
        return re.compile("".join(pieces))
    except re.error as exc:  # "layer[]", "layer[z-a]", "[!]"
        raise ValueError(f"layer pattern {pattern!r} is not a valid glob: {exc.msg} in its "
                         "[...] set; write [abc], [a-z] or [!abc]") from None


def _suggest(name: str, names: Sequence[str]) -> str:
    """What to write instead: the names (or glob) ``name`` ends, else the closest names."""
    whole = _with_parents(name, names)
    if whole:
        return "did you mean " + whole + "?"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    preview = ", ".join(repr(n) for n in names[:8])
    return f"its modules include {preview}{', ...' if len(names) > 8 else ''}"


def _with_parents(pattern: str, names: Sequence[str]) -> str:
    """The pattern with the parents it was given without, when it is the dotted end of some
    module names (``h.1`` -> ``'transformer.h.1'``, as Hugging Face models nest their blocks);
    "" when it is not."""
    ends = re.compile(r"((?:[^.]+\.)+)" + glob_to_regex(pattern).pattern)
    parents: List[str] = []
    for name in names:
        match = ends.fullmatch(name)
        if match and match.group(1) not in parents:
            parents.append(match.group(1))
    glob = bool(_GLOB_CHARS.search(pattern))
    if not parents:
        return ""
    if len(parents) == 1 or (len(parents) <= 3 and not glob):
        return ", ".join(repr(parent + pattern) for parent in parents)
    if glob:
        return repr("**." + pattern)
    first, second = (parent + pattern for parent in parents[:2])
    return f"{first!r}, {second!r}, ... ({'**.' + pattern!r} for all {len(parents)})"


def _expand(model: nn.Module, pattern: str, names: List[str]) -> List[str]:
    if not isinstance(pattern, str):
        raise TypeError(f"layer names must be str, got {type(pattern).__name__}: {pattern!r}")
    if _GLOB_CHARS.search(pattern):
        rx = glob_to_regex(pattern)
        found = [n for n in names if rx.fullmatch(n)]
        if not found:
            raise ValueError(f"layer pattern {pattern!r} matches no module of {type(model).__name__}; "
                             + _suggest(pattern, names))
        return found
    if pattern not in names:
        raise ValueError(f"unknown layer {pattern!r} in {type(model).__name__}: " + _suggest(pattern, names))
    return [pattern]


def resolve_layers(model: nn.Module, layers: LayerSpec) -> Dict[str, str]:
    """Maps each capture key to a module name, in ``named_modules()`` order for globs.

    ``layers`` is a name, a list of names (globs allowed), or ``{alias: name}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [n for n, _ in model.named_modules() if n]
    resolved: Dict[str, str] = {}
    if isinstance(layers, Mapping):
        if not layers:
            raise ValueError("layers is empty: name at least one module to capture")
        for alias, pattern in layers.items():
            if not isinstance(alias, str):
                raise TypeError(f"layer aliases must be str, got {type(alias).__name__}: {alias!r}")
            found = _expand(model, pattern, names)
            if len(found) != 1:
                raise ValueError(f"alias {alias!r} must name one module, but {pattern!r} matches "
                                 f"{len(found)}: {found[:5]}")
            resolved[alias] = found[0]
    elif isinstance(layers, str):
        resolved = {n: n for n in _expand(model, layers, names)}
    elif isinstance(layers, (list, tuple)):
        if not layers:
            raise ValueError("layers is empty: name at least one module to capture")
        for pattern in layers:
            for n in _expand(model, pattern, names):
                resolved.setdefault(n, n)
    else:
        raise TypeError("layers must be a str, a list of str or a dict {alias: name}, got "
                        f"{type(layers).__name__}")
    return resolved


def per_layer(option: str, value: Any, resolved: Mapping[str, str], default: Any,
              check: Callable[[str, Any], None]) -> Dict[str, Any]:
    """Spreads an option given once or as ``{key: value}`` over every capture key, checking
    each value. A dict is keyed by capture key (the module name, or its alias) only: an
    alias that happens to equal another module's name never takes that module's options."""
    out: Dict[str, Any] = {}
    if isinstance(value, Mapping):
        for name in value:
            if name not in resolved:
                aliased = [key for key, module in resolved.items() if module == name]
                hint = f" (it is captured as {aliased[0]!r}: use that key)" if aliased else ""
                raise ValueError(f"{option}={{{name!r}: ...}} names a layer that is not captured{hint}; "
                                 f"captured: {list(resolved)}")
        for key in resolved:
            v = value.get(key, default)
            check(key, v)
            out[key] = v
    else:
        for key in resolved:
            check(key, value)
            out[key] = value
    return out


def model_device(model: Optional[nn.Module]) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for none."""
    if model is not None:
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def module_lookup(model: nn.Module, resolved: Mapping[str, str]) -> List[Tuple[str, str, nn.Module]]:
    modules = dict(model.named_modules())
    return [(key, name, modules[name]) for key, name in resolved.items()]


def check_model(model: Any) -> None:
    """Refuses a model whose modules forward hooks cannot see (TorchScript, torch.compile)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}, from torch.jit.trace or "
            "torch.jit.script): forward hooks cannot see inside it; capture the original "
            "nn.Module before scripting it")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):  # no dynamo import
        raise TypeError(
            "model is wrapped by torch.compile (an OptimizedModule): its compiled graph does not "
            "run hooks added afterwards; capture the original module (model._orig_mod), or call "
            "torch.compile after capture() has hooked it")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _mode_checker(tokens: Optional[Tokens]):
    modes = REDUCE_MODES + (tuple(m for m in TOKEN_MODES if m not in REDUCE_MODES) if tokens is not None else ())

    def check(key: str, mode: Any) -> None:
        if not isinstance(mode, str):
            raise TypeError(f"layer {key!r}: reduce must be a str, got {type(mode).__name__}: {mode!r}")
        if mode in TOKEN_MODES and mode not in modes:
            raise ValueError(f"layer {key!r}: reduce={mode!r} works on tokens: pass tokens=fastcap.Tokens(...) "
                             "to say which tokens of [N, T, C] are real")
        if mode not in modes:
            raise ValueError(f"layer {key!r}: unknown reduce mode {mode!r}; choose one of {list(modes)}")
    return check


def _check_k_value(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"layer {key!r}: k must be an int, got {type(value).__name__}: {value!r}")
    if value < 1:
        raise ValueError(f"layer {key!r}: k must be >= 1, got {value}")


def _check_channel_dim(key: str, cd: Any) -> None:
    if isinstance(cd, bool) or not isinstance(cd, int):
        raise TypeError(f"layer {key!r}: channel_dim must be an int, got {type(cd).__name__}: {cd!r}")


def _check_select(key: str, sel: Any) -> None:
    if sel is not None and not isinstance(sel, (int, str)) and not callable(sel):
        raise TypeError(f"layer {key!r}: select must be an int, a str key or a callable, "
                        f"got {type(sel).__name__}: {sel!r}")


def default_reduce(tokens: Optional[Tokens]) -> str:
    """The mode of a layer ``reduce`` leaves unsaid: ``"tokens"`` when ``tokens=`` is given (a
    capture told which tokens are real is one of tokens), ``"full"`` otherwise."""
    return "tokens" if tokens is not None else "full"


def resolve_reduce(reduce: Union[None, str, Mapping[str, Optional[str]]], tokens: Optional[Tokens]):
    """``reduce`` with :func:`default_reduce` filled in for None (also as a dict's value)."""
    if reduce is None:
        return default_reduce(tokens)
    if isinstance(reduce, Mapping):
        return {key: default_reduce(tokens) if mode is None else mode for key, mode in reduce.items()}
    return reduce


def plan_layers(model: nn.Module, layers: LayerSpec, reduce: Union[None, str, Mapping[str, str]] = None, *,
                k: Union[None, int, Mapping[str, int]] = None,
                channel_dim: Union[int, Mapping[str, int]] = 1,
                dtype: Optional[torch.dtype] = None,
                select: Any = None,
                tokens: Optional[Tokens] = None,
                keep_layout: bool = True) -> Dict[str, Layer]:
    """capture()'s layer arguments, checked and resolved: one :class:`Layer` per capture key.

    Every value is checked here, before any hook exists, and an error names the layer and the
    value at fault."""
    check_model(model)
    resolved = resolve_layers(model, layers)
    if tokens is not None and not isinstance(tokens, Tokens):
        raise TypeError(f"tokens must be a fastcap.Tokens, got {type(tokens).__name__}: {tokens!r}")
    reduce = resolve_reduce(reduce, tokens)
    modes = per_layer("reduce", reduce, resolved, default_reduce(tokens), _mode_checker(tokens))
    if tokens is not None and TOKEN_INDEX_KEY in resolved:
        raise ValueError(f"with tokens=, {TOKEN_INDEX_KEY!r} is the key of drain()'s token index: give the "
                         "layer another alias")

    def check_k(key: str, value: Any) -> None:
        if value is not None:
            _check_k_value(key, value)
            if modes[key] != "topk" and isinstance(k, Mapping):
                raise ValueError(f"layer {key!r}: k={value} is given, but its reduce is {modes[key]!r}, "
                                 "not 'topk'")
        elif modes[key] == "topk":
            raise ValueError(f"layer {key!r}: reduce='topk' needs k (an int >= 1)")

    ks = per_layer("k", k, resolved, None, check_k)
    if k is not None and not isinstance(k, Mapping) and "topk" not in modes.values():
        raise ValueError(f"k={k!r} is given, but no layer has reduce='topk' (reduce={reduce!r})")
    cds = per_layer("channel_dim", channel_dim, resolved, 1, _check_channel_dim)
    selects = per_layer("select", select, resolved, None, _check_select)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}: {dtype!r}")
    return {
        key: Layer(key, name, modes[key], ks[key] if modes[key] == "topk" else None, cds[key], dtype,
                   selects[key], keep_layout, token_mode=tokens is not None and modes[key] != "full")
        for key, name, _ in module_lookup(model, resolved)
    }
