"""What a model's layers are called and what they output: :func:`layers` (``fastcap layers``),
so that ``layers=`` / ``--layers`` can be written without guessing (``transformer.h.2``, not
``h.2``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import torch

from fastcap._layers import _expand, model_device
from fastcap._outputs import describe, first_tensor

__all__ = ["layers", "LayerInfo", "format_layers"]


class LayerInfo(NamedTuple):
    """One module of :func:`layers`: its name (what ``layers=`` takes), class, and the tensor a
    capture of it takes (the output, or its first tensor leaf) in the example forward."""

    name: str
    type: str
    shape: Optional[tuple]  # None: the module did not run (or returned no tensor)
    dtype: Optional[torch.dtype]
    calls: int  # times it ran in the forward (a module called twice is captured as name, name#1)
    output: str  # "Tensor", the structure it was taken from ("tuple of 2"), "did not run", or "" (no forward)

    def __str__(self) -> str:
        return format_layers([self], header=False)


def layers(model: torch.nn.Module, example_input: Any = None, pattern: str | None = None) -> list[LayerInfo]:
    """Every module of ``model`` in ``named_modules()`` order (or those ``pattern`` matches, a name
    or a dotted glob as ``layers=`` takes it), with its class and, after one forward on
    ``example_input``, the shape and dtype of what a capture of it takes.

    ``example_input``: a tensor (``model(x)``), a tuple of arguments (``model(*x)``) or a dict
    of keyword arguments (``model(**x)``: a tokenizer's output); None lists names and classes
    only. The forward runs under ``torch.inference_mode()``, on the model's device.

    Example:
        >>> model = torchvision.models.resnet50().eval()
        >>> for layer in fastcap.layers(model, torch.randn(1, 3, 224, 224), "layer*"):
        ...     print(layer.name, layer.type, layer.shape)
        layer1 Sequential (1, 256, 56, 56)
        layer2 Sequential (1, 512, 28, 28)
        layer3 Sequential (1, 1024, 14, 14)
        layer4 Sequential (1, 2048, 7, 7)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [name for name, _ in model.named_modules() if name]
    chosen = names if pattern is None else _expand(model, pattern, names)
    modules = dict(model.named_modules())
    seen: dict[str, list] = {name: [] for name in chosen}
    if example_input is not None:
        _forward(model, example_input, {name: modules[name] for name in chosen}, seen)
    rows = []
    for name in chosen:
        outputs = seen[name]
        tensor = first_tensor(outputs[0]) if outputs else None
        kind = ("" if example_input is None else "did not run") if not outputs else (
            "Tensor" if isinstance(outputs[0], torch.Tensor) else _structure(outputs[0]))
        rows.append(LayerInfo(name, type(modules[name]).__name__,
                              tuple(tensor.shape) if tensor is not None else None,
                              tensor.dtype if tensor is not None else None, len(outputs), kind))
    return rows


def _forward(model, example_input, modules: dict, seen: dict) -> None:
    """One forward with a hook on each chosen module; every hook is removed afterwards."""
    device = model_device(model)
    handles = []

    def hook(name):
        def record(module, inputs, output):
            seen[name].append(output if not seen[name] else None)  # the first call's output only
        return record

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook(name)))
        moved = _to(example_input, device)
        with torch.inference_mode():
            if isinstance(moved, Mapping):
                model(**moved)
            elif isinstance(moved, tuple):
                model(*moved)
            else:
                model(moved)
    except Exception as error:  # noqa: BLE001 - any model's own error, named with the input given
        raise ValueError(f"layers: {type(model).__name__}'s forward failed on the example input "
                         f"{describe(example_input)}: {type(error).__name__}: {error}; pass an input the "
                         "model takes (fastcap layers: --image-size, --input-shape or --context)") from error
    finally:
        for handle in handles:
            handle.remove()


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_to(item, device) for item in value)
    return value


def _structure(output) -> str:
    """Where a capture's tensor comes from in a non-tensor output, e.g. "tuple of 2"."""
    if isinstance(output, Mapping):
        return f"{type(output).__name__} of {len(output)}"
    if isinstance(output, (list, tuple)):
        return f"{type(output).__name__} of {len(output)}"
    return type(output).__name__


def format_layers(rows: list[LayerInfo], header: bool = True) -> str:
    """``rows`` as an aligned table: name, class, output shape and dtype (and how it was taken).

    Example:
        >>> print(format_layers(fastcap.layers(model, x, "layer4")))
        name    class       output
        layer4  Sequential  [1, 2048, 7, 7] float32
    """
    def shape(row: LayerInfo) -> str:
        if row.calls == 0:
            return row.output or "-"
        if row.shape is None:
            return f"no tensor ({row.output})"
        text = f"[{', '.join(str(d) for d in row.shape)}] {str(row.dtype).replace('torch.', '')}"
        if row.output != "Tensor":
            text += f" (first tensor of a {row.output})"
        return text + (f", {row.calls} calls" if row.calls > 1 else "")

    table = [("name", "class", "output")] if header else []
    table += [(row.name, row.type, shape(row)) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in table)
