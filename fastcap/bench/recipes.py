"""Models and inputs built from a recipe: a JSON-able dict, so that a memory-growth child process
can rebuild exactly what its parent measured."""

from __future__ import annotations

from typing import Mapping

import torch


def build_model(recipe: Mapping) -> torch.nn.Module:
    """The model a recipe names, in eval mode on ``recipe["device"]``, weights seeded.

    ``recipe["model"]`` is any spec ``fastcap.models.load_model`` accepts (a torchvision
    name, ``torchvision:NAME``, ``module:function``, a TorchScript or ``torch.save`` file, the
    latter with ``recipe["trust_pickle"]``), with ``recipe["weights"]`` a state-dict file or
    ``None`` for random weights. With ``recipe["model_kwargs"]`` (the suite's ``vit_b_16`` at
    64x64) a torchvision model is built by ``torchvision.models.get_model(NAME, **model_kwargs)``
    instead.
    """
    from fastcap.models import load_model

    spec = recipe["model"]
    device = recipe.get("device", "cpu")
    weights = recipe.get("weights")
    kwargs = dict(recipe.get("model_kwargs") or {})
    torch.manual_seed(recipe.get("seed", 0))
    if kwargs:
        import torchvision

        model = torchvision.models.get_model(spec.split(":", 1)[-1], weights=None, **kwargs)
        if weights is not None:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        model = load_model(spec, weights, "cpu", trust_pickle=bool(recipe.get("trust_pickle")))
    if recipe.get("dtype"):
        model = model.to(getattr(torch, recipe["dtype"]))
    if recipe.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model.eval().to(device)


def build_input(recipe: Mapping) -> torch.Tensor:
    """A random batch: ``[batch, *shape]`` from a normal distribution (in ``recipe["dtype"]``,
    channels_last when ``recipe["channels_last"]``), or int64 token ids in ``[0, int_high)`` when
    ``recipe["int_high"]`` is set."""
    gen = torch.Generator().manual_seed(recipe.get("seed", 0) + 1)
    shape = (int(recipe["batch"]), *[int(s) for s in recipe["shape"]])
    if recipe.get("int_high"):
        x = torch.randint(0, int(recipe["int_high"]), shape, generator=gen)
    else:
        x = torch.randn(shape, generator=gen)
        if recipe.get("dtype"):
            x = x.to(getattr(torch, recipe["dtype"]))
        if recipe.get("channels_last") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(recipe.get("device", "cpu"))
