"""Model and data specs of the command line (``fastcap extract``, ``fastcap bench``): building
the model and the dataset a ``--model`` / ``--data`` string names.

Model specs (``--model``):
    ``resnet50`` or ``torchvision:resnet50``   a torchvision architecture, random init
    ``my_pkg.models:build``                    a factory: ``build()`` returns the nn.Module
    ``model.pt``                               a TorchScript archive, or a ``torch.save``'d module
                                               (unpickled only with ``trust_pickle``)
    ``hf:path/to/model``                       a local Hugging Face model directory
    ``hf-random:gpt2?n_layer=4&n_embd=256``    a Hugging Face architecture, random init, its
                                               config's defaults changed by key=value pairs
                                               (int, float, true/false, none, else a string)
``--weights`` loads a state dict into it; nothing is ever downloaded. Hugging Face models are
the causal-LM class of their config (``AutoModelForCausalLM``; ``AutoModel`` for configs that
have none), with ``config.use_cache = False`` (extraction keeps no KV cache); ``--layers`` takes
their module names (``transformer.h.2`` in GPT2LMHeadModel). No code from a file or a model
directory runs: a pickled module needs ``trust_pickle``, and ``trust_remote_code`` is always off.

Data specs (``--data``):
    ``fake:N``                                 N deterministic synthetic images (FakeImages)
    ``path/to/images``                         a torchvision ImageFolder (class sub-folders)
An image folder's images are read as RGB, their shorter side resized to ``round(S / 0.875)``
(256 for S = 224), center-cropped to S x S, scaled to [0, 1] and normalised with the ImageNet
mean and std (:func:`image_transform`; ``normalize=False`` or ``mean``/``std`` change the last
step, ``transform=`` replaces them all).
Text corpora (``fake-text:N``, .jsonl, .txt, .npy of ids) are in :mod:`fastcap.text`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import pickle
import warnings

import torch
from torch.utils.data import Dataset

__all__ = ["load_model", "make_dataset", "image_transform", "FakeImages", "default_image_size", "tokenizer_dir",
           "MODEL_DTYPES", "IMAGENET_MEAN", "IMAGENET_STD"]

#: --model-dtype of Hugging Face models.
MODEL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

FAKE_IMAGE_SIZE = 64
FOLDER_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model(spec: str, weights: str | None = None, device: str | torch.device = "cpu",
               dtype: str | None = None, *, trust_pickle: bool = False, progress: bool = False) -> torch.nn.Module:
    """Build the model named by ``spec``, load ``weights`` if given, move it to ``device``, eval().

    Seed the RNG first (``torch.manual_seed``) for reproducible random weights. ``dtype``
    (``"bf16"``, ``"fp16"``, ``"fp32"``) is for Hugging Face models only; by default hf:
    loads the dtype it was saved in and hf-random builds float32. ``trust_pickle``: load a
    module saved whole with ``torch.save`` by full unpickling, which runs any code the file
    names (only for files you trust); without it such a file is a ValueError saying so.
    ``progress``: let transformers draw its "Loading weights" bar for an hf: model (quiet by
    default).

    Example:
        >>> torch.manual_seed(0)
        >>> model = load_model("torchvision:resnet18", device="cpu")
        >>> model = load_model("my_pkg.models:build", weights="ckpt.pt", device="cuda")
        >>> model = load_model("hf-random:gpt2?n_layer=4&n_embd=256&n_head=4", dtype="bf16")
    """
    if dtype is not None and dtype not in MODEL_DTYPES:
        raise ValueError(f"--model-dtype must be one of {list(MODEL_DTYPES)}, got {dtype!r}")
    if spec.startswith("hf:"):
        with _transformers_bars(progress):
            model = _hf_model(spec, dtype)
    elif spec.startswith("hf-random:"):
        model = _hf_random_model(spec, dtype)
    elif dtype is not None:
        raise ValueError(f"--model-dtype {dtype} is for hf: and hf-random: models, not --model {spec!r}")
    else:
        model = _build(spec, trust_pickle)
    if weights is not None:
        _load_weights(model, weights)
    return model.to(device).eval()


def tokenizer_dir(spec: str) -> str | None:
    """The tokenizer that comes with a model spec: an hf:PATH directory that holds one, else None.

    Example:
        >>> tokenizer_dir("hf:models/gpt2")
        'models/gpt2'
    """
    if not spec.startswith("hf:"):
        return None
    path = spec[len("hf:"):]
    return path if any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES) else None


@contextlib.contextmanager
def _transformers_bars(show: bool):
    """transformers' own progress bars ("Loading weights") on or off while loading, then as before."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if show else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def _hf_model(spec: str, dtype: str | None) -> torch.nn.Module:
    import transformers

    path = spec[len("hf:"):]
    if not os.path.isdir(path):
        raise ValueError(f"--model {spec!r}: {path!r} is not a directory; hf:PATH takes a local Hugging "
                         "Face model directory (as written by save_pretrained), nothing is downloaded")
    try:
        # trust_remote_code=False, not the default None: None may prompt on a terminal.
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        config.use_cache = False
        return _hf_class(config).from_pretrained(
            path, config=config, local_files_only=True, trust_remote_code=False,
            dtype=MODEL_DTYPES[dtype] if dtype else "auto")  # "auto": as saved
    except (OSError, ValueError, KeyError) as error:
        if "trust_remote_code" in str(error):
            raise ValueError(f"--model {spec!r}: the model needs code of its own from {path!r} (its config's "
                             "auto_map), and fastcap never runs a model directory's code: build the model "
                             "in your own script and pass it to fastcap.extract()") from error
        raise ValueError(f"--model {spec!r}: cannot load a Hugging Face model: {error}") from error


def _hf_random_model(spec: str, dtype: str | None) -> torch.nn.Module:
    from transformers import CONFIG_MAPPING

    name, _, query = spec[len("hf-random:"):].partition("?")
    names = list(CONFIG_MAPPING.keys())
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ValueError(f"--model {spec!r}: transformers has no model type {name!r}"
                         + (f"; did you mean {close}?" if close else ""))
    defaults = CONFIG_MAPPING[name]()
    kwargs = {}
    for pair in filter(None, query.split("&")):
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"--model {spec!r}: {pair!r} is not key=value")
        if not hasattr(defaults, key):  # configs accept any key silently: a typo would do nothing
            keys = [*defaults.to_dict(), *getattr(defaults, "attribute_map", {})]
            close = difflib.get_close_matches(key, keys, n=3)
            raise ValueError(f"--model {spec!r}: {type(defaults).__name__} has no setting {key!r}"
                             + (f"; did you mean {close}?" if close else ""))
        kwargs[key] = _parse_value(value)
    config = CONFIG_MAPPING[name](**kwargs)
    config.use_cache = False
    try:
        return _hf_class(config).from_config(config, dtype=MODEL_DTYPES[dtype or "fp32"],
                                             trust_remote_code=False)
    except (ValueError, TypeError, AttributeError) as error:  # e.g. n_embd not divisible by n_head
        raise ValueError(f"--model {spec!r}: cannot build the model: {error}") from error


def _hf_class(config):
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModel


def _parse_value(text: str):
    """``4`` -> int, ``0.1`` -> float, ``true``/``false`` -> bool, ``none`` -> None, else a str."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _build(spec: str, trust_pickle: bool) -> torch.nn.Module:
    if os.path.isfile(spec):
        return _load_model_file(spec, trust_pickle)
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


def _load_model_file(path: str, trust_pickle: bool) -> torch.nn.Module:
    """A TorchScript archive, or a whole module saved with torch.save (with trust_pickle only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            return torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError):
        pass
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A pickled nn.Module needs full unpickling, which can run any code: only when asked.
        if not trust_pickle:
            raise ValueError(_untrusted_pickle(path)) from error
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(loaded, torch.nn.Module):
        return loaded
    if isinstance(loaded, dict):
        raise ValueError(
            f"--model {path!r} holds a state dict, not a model: name the architecture with "
            f"--model (e.g. resnet50 or my_pkg.models:build) and pass this file as --weights"
        )
    raise ValueError(f"--model {path!r} holds a {type(loaded).__name__}, not a model")


def _untrusted_pickle(path: str) -> str:
    """Why a file torch.load(weights_only=True) refused was not loaded, and what --trust-pickle does."""
    what = _pickled_class(path)
    risk = ("full unpickling runs any code the file names: a file from someone else can do anything "
            "your account can")
    if what is None:  # not a zip torch.save wrote (an older format, or no torch file at all)
        return (f"--model {path!r} is neither TorchScript nor what torch.load(weights_only=True) reads; if it "
                f"is a model saved whole with torch.save and you trust the file, pass --trust-pickle ({risk})")
    return (f"--model {path!r} holds a pickled {what} (a whole object saved with torch.save), which "
            f"loads only by full unpickling, and {risk}. If you trust this file, pass --trust-pickle "
            "(load_model(..., trust_pickle=True)); or save the model as TorchScript, or its "
            "state_dict() for --weights with the architecture as --model")


def _pickled_class(path: str) -> str | None:
    """The first global a torch.save file's pickle names (the saved object's class), read from
    its opcodes without running any; None when it is no such file."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
        strings = []
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                return argument.replace(" ", ".")
            if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                return ".".join(strings[-2:])
            if isinstance(argument, str):
                strings.append(argument)
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile):
        return None
    return None


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


def make_dataset(spec: str, image_size: int | None = None, *, normalize: bool = True, mean=None, std=None,
                 transform=None) -> Dataset:
    """The map-style dataset named by ``spec``: ``fake:N`` or an image folder.

    Items are ``(image, label)``. An image folder's image is a float32 ``[3, S, S]`` tensor
    made by :func:`image_transform` (S = ``image_size``, default 224): resized, center-cropped,
    scaled to [0, 1], normalised with ``mean`` and ``std`` (default ImageNet's; none with
    ``normalize=False``); ``transform`` (any callable from a PIL image, e.g. a torchvision
    ``Compose``) replaces all of it. Its label is the class index (sub-folders in sorted
    order, ``dataset.classes``). ``fake:N`` images are standard normal noise of that shape
    (already "normalised": the preprocessing options are for folders).

    Example:
        >>> dataset = make_dataset("fake:2048", image_size=64)
        >>> dataset[0][0].shape
        torch.Size([3, 64, 64])
        >>> dataset = make_dataset("/data/imagenet/val")      # Resize 256 + CenterCrop 224
        >>> dataset = make_dataset("/data/photos", 224, mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> dataset = make_dataset("/data/photos", transform=my_transform)
    """
    size = image_size if image_size is not None else default_image_size(spec)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"--image-size must be a positive int, got {size!r}")
    custom = [name for name, given in (("--no-normalize", not normalize), ("--mean", mean is not None),
                                       ("--std", std is not None), ("transform", transform is not None))
              if given]
    if spec.startswith("fake:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--data {spec!r}: expected fake:N with N a positive integer")
        if custom:
            raise ValueError(f"{', '.join(custom)}: for an image folder; --data {spec!r} images are "
                             "synthetic normal noise, not pixels to normalise")
        return FakeImages(int(count), size)
    if os.path.isdir(spec):
        return _image_folder(spec, size, normalize, mean, std, transform)
    raise ValueError(f"--data {spec!r} is neither fake:N nor an existing image folder")


def image_transform(image_size: int = FOLDER_IMAGE_SIZE, *, normalize: bool = True, mean=None, std=None):
    """The preprocessing of an image folder's images, as a torchvision transform: the shorter
    side resized to ``round(image_size / 0.875)`` (256 for 224, bilinear, antialiased), a
    center crop of ``image_size`` squared, ``ToTensor`` (float32 in [0, 1]), then
    ``Normalize(mean, std)`` (default the ImageNet ones; skipped with ``normalize=False``).

    Example:
        >>> image_transform(224)
        Compose(
            Resize(size=256, interpolation=bilinear, max_size=None, antialias=True)
            CenterCrop(size=(224, 224))
            ToTensor()
            Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        )
    """
    from torchvision import transforms

    steps = [transforms.Resize(round(image_size / 0.875)),  # the usual 256 -> 224 ratio
             transforms.CenterCrop(image_size), transforms.ToTensor()]
    if normalize:
        steps.append(transforms.Normalize(_channels("--mean", mean, IMAGENET_MEAN),
                                          _channels("--std", std, IMAGENET_STD, positive=True)))
    elif mean is not None or std is not None:
        raise ValueError("--mean/--std normalise; drop --no-normalize to use them")
    return transforms.Compose(steps)


def _channels(flag: str, values, default: tuple, positive: bool = False) -> tuple:
    """Three per-channel floats (one value is used for all three)."""
    if values is None:
        return default
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or (positive and min(values) <= 0):
        raise ValueError(f"{flag} takes 1 or 3 {'positive ' if positive else ''}numbers (R, G, B), got "
                         f"{list(values)}")
    return values


def _image_folder(root: str, size: int, normalize: bool, mean, std, transform) -> Dataset:
    from torchvision import datasets

    if transform is not None and (not normalize or mean is not None or std is not None):
        raise ValueError("transform= replaces the whole preprocessing: normalise inside it, not with "
                         "normalize/mean/std")
    chosen = transform if transform is not None else image_transform(size, normalize=normalize, mean=mean, std=std)
    try:
        dataset = datasets.ImageFolder(root, transform=chosen)
    except (FileNotFoundError, RuntimeError) as error:
        raise ValueError(f"--data {root!r}: not an image folder: {error}") from error
    # Preprocessing other than the default one is recorded and checked on resume (the default
    # records nothing, so that stores made before these options existed resume as they were).
    if transform is not None:
        dataset.extract_spec = {"images": "folder", "transform": repr(transform)}
    elif not normalize or mean is not None or std is not None:
        dataset.extract_spec = {"images": "folder", "normalize": bool(normalize),
                                "mean": list(_channels("--mean", mean, IMAGENET_MEAN)) if normalize else None,
                                "std": list(_channels("--std", std, IMAGENET_STD)) if normalize else None}
    return dataset


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
