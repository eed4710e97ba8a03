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
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    preview = ", ".join(repr(n) for n in names[:8])
    return f"its modules include {preview}{', ...' if len(names) > 8 else ''}"


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
