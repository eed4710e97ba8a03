"""Model and data specs of the command line (``fastcap extract``, ``fastcap bench``): building
the model and the dataset a ``--model`` / ``--data`` string names.

Model specs (``--model``):
    ``resnet50`` or ``torchvision:resnet50``   a torchvision architecture, random init
    ``my_pkg.models:build``                    a factory: ``build()`` returns the nn.Module
    ``model.pt``                               a TorchScript archive or a ``torch.save``'d module
``--weights`` loads a state dict into it; nothing is ever downloaded.

Data specs (``--data``):
    ``fake:N``                                 N deterministic synthetic images (FakeImages)
    ``path/to/images``                         a torchvision ImageFolder (class sub-folders)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import warnings

import torch
from torch.utils.data import Dataset

__all__ = ["load_model", "make_dataset", "FakeImages", "default_image_size"]

FAKE_IMAGE_SIZE = 64
FOLDER_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model(spec: str, weights: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model named by ``spec``, load ``weights`` if given, move it to ``device``, eval().

    Seed the RNG first (``torch.manual_seed``) for reproducible random weights.

    Example:
        >>> torch.manual_seed(0)
        >>> model = load_model("torchvision:resnet18", device="cpu")
        >>> model = load_model("my_pkg.models:build", weights="ckpt.pt", device="cuda")
    """
    model = _build(spec)
    if weights is not None:
        _load_weights(model, weights)
    return model.to(device).eval()


def _build(spec: str) -> torch.nn.Module:
    if os.path.isfile(spec):
        return _load_model_file(spec)
    if spec.startswith("torchvision:"):
        return _torchvision_model(spec.split(":", 1)[1], spec)
    if ":" in spec:
        return _factory_model(spec)
    import torchvision

    if spec in torchvision.models.list_models():
        return _torchvision_model(spec, spec)
    close = difflib.get_close_matches(spec, torchvision.models.list_models(), n=3)
    hint = f"; did you mean {close}?" if close else ""
    raise ValueError(
        f"--model {spec!r} is not a torchvision model name, a module:function factory, or an "
        f"existing file{hint}"
    )


def _torchvision_model(name: str, spec: str) -> torch.nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ValueError(f"--model {spec!r}: torchvision has no model {name!r}"
                         + (f"; did you mean {close}?" if close else ""))
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # detection models default to a pretrained backbone
    return builder(**kwargs)


def _factory_model(spec: str) -> torch.nn.Module:
    module_name, _, attribute = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model {spec!r}: cannot import module {module_name!r}: {error}") from error
    factory = getattr(module, attribute, None)
    if factory is None:
        raise ValueError(f"--model {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec!r}: {attribute}() returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def _load_model_file(path: str) -> torch.nn.Module:
    """A TorchScript archive, or a whole module saved with torch.save (trusted files only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            return torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError):
        pass
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A pickled nn.Module needs full unpickling, which can run code: only for your own files.
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(loaded, torch.nn.Module):
        return loaded
    if isinstance(loaded, dict):
        raise ValueError(
            f"--model {path!r} holds a state dict, not a model: name the architecture with "
            f"--model (e.g. resnet50 or my_pkg.models:build) and pass this file as --weights"
        )
    raise ValueError(f"--model {path!r} holds a {type(loaded).__name__}, not a model")


def _load_weights(model: torch.nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(f"--weights {path!r}: cannot load a state dict: {error}") from error
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path!r} holds a {type(state).__name__}, not a state dict")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel/DDP
        state = {key[len("module."):]: value for key, value in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"--weights {path!r} does not fit the model: {error}") from error


def default_image_size(spec: str) -> int:
    """The image side used when ``--image-size`` is not given: 64 for fake:N, else 224."""
    return FAKE_IMAGE_SIZE if spec.startswith("fake:") else FOLDER_IMAGE_SIZE


def make_dataset(spec: str, image_size: int | None = None) -> Dataset:
    """The map-style dataset named by ``spec``: ``fake:N`` or an image folder.

    Items are ``(image, label)`` with ``image`` a float32 ``[3, image_size, image_size]``
    tensor, normalised with the ImageNet mean and std.

    Example:
        >>> dataset = make_dataset("fake:2048", image_size=64)
        >>> dataset[0][0].shape
        torch.Size([3, 64, 64])
        >>> dataset = make_dataset("/data/imagenet/val")      # Resize + CenterCrop to 224
    """
    size = image_size if image_size is not None else default_image_size(spec)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"--image-size must be a positive int, got {size!r}")
    if spec.startswith("fake:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--data {spec!r}: expected fake:N with N a positive integer")
        return FakeImages(int(count), size)
    if os.path.isdir(spec):
        return _image_folder(spec, size)
    raise ValueError(f"--data {spec!r} is neither fake:N nor an existing image folder")


def _image_folder(root: str, size: int) -> Dataset:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(round(size / 0.875)),  # the usual 256 -> 224 ratio
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    try:
        return datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise ValueError(f"--data {root!r}: not an image folder: {error}") from error


class FakeImages(Dataset):
    """``count`` synthetic images: item ``i`` is always the same (its own seeded generator).

    Example:
        >>> data = FakeImages(100, image_size=32)
        >>> torch.equal(data[7][0], FakeImages(100, 32)[7][0])
        True
    """

    def __init__(self, count: int, image_size: int = FAKE_IMAGE_SIZE, num_classes: int = 1000):
        self.count = count
        self.image_size = image_size
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for FakeImages of {self.count} items")
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(3, self.image_size, self.image_size, generator=generator)
        return image, index % self.num_classes
