"""The ``fastcap`` command line: the argparse front of ``fastcap extract``, ``layers``, ``info``,
``verify``, ``export`` and ``bench`` (``python -m fastcap`` runs :func:`main`; ``--help`` lists
every flag).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from fastcap.models import MODEL_DTYPES
from fastcap.store._writer import size_text

#: reduce modes that exist only over tokens: they imply --tokens.
TOKEN_ONLY = ("tokens", "max", "first", "last")
REDUCE_MODES = ("full", "mean", "topk", *TOKEN_ONLY)
#: flags for text data only (their defaults are None/False so that "given" can be told).
_TEXT_FLAGS = ("tokenizer", "text_field", "ids_field", "encoding", "context", "pack", "padding", "tokens",
               "skip_ids", "start")
#: flags for image folders only
_IMAGE_FLAGS = ("no_normalize", "mean", "std")
#: fastcap verify's exit statuses
VERIFY_OK, VERIFY_DAMAGED, VERIFY_INCOMPLETE = 0, 1, 3


EXTRACT_EPILOG = """\
examples:
  # mean-pooled features of four ResNet-50 stages over 2048 synthetic 64x64 images
  fastcap extract --model resnet50 --data fake:2048 --layers 'layer1,layer2,layer3,layer4' \\
      --reduce mean --batch-size 64 --out feats/

  # top-8 channels of every block of a trained model over an image folder, on the GPU
  fastcap extract --model torchvision:resnet50 --weights resnet50.pt --data /data/val \\
      --layers 'layer*.*' --reduce topk --k 8 --device cuda --num-workers 8 --out topk/

  # full activations in bfloat16 from your own model factory, 2 processes with torchrun
  torchrun --nproc_per_node=2 -m fastcap extract --model my_pkg.models:build \\
      --data fake:10000 --layers encoder.out --dtype bfloat16 --out acts/

  # an image folder (class sub-folders): each image's class index is kept beside its features
  fastcap extract --model resnet50 --weights resnet50.pt --data /data/val --layers layer4 \
      --reduce mean --device cuda --out val-feats/        # store.columns["label"]

  # a quick try on the first 100 samples
  fastcap extract --model resnet50 --data /data/val --layers layer4 --reduce mean --limit 100 --out try/

  # then, in Python:
  import fastcap
  store = fastcap.open("feats/")
  x = store["layer4"][:]          # numpy [N, 2048], memory-mapped; torch.from_numpy(x)

  # language model: the residual stream of two GPT-2 blocks at every token but BOS, and the
  # masked mean of the second under the key "pooled", over 256 random documents packed into
  # rows of 128 tokens (random weights, nothing downloaded)
  fastcap extract --model 'hf-random:gpt2?n_layer=4' --data fake-text:256 --context 128 --pack \
      --layers transformer.h.1,transformer.h.3,pooled=transformer.h.3 --reduce tokens,pooled=mean \
      --skip-ids bos --out acts/

  # a local model and its tokenizer over a JSON-lines corpus, one left-padded document per row,
  # masked mean of the last block (store.tokens says where each token row came from)
  fastcap extract --model hf:models/my-lm --model-dtype bf16 --data corpus.jsonl --context 512 \
      --padding left --layers model.layers.23 --reduce mean --tokens --device cuda --out sent/

  # a Hugging Face dataset written by Dataset.save_to_disk, its token ids in the input_ids column,
  # each document's label kept beside its pooled features
  fastcap extract --model hf:models/my-lm --data reviews-tokenized/ --context 256 \
      --layers model.layers.11 --reduce mean --tokens --keep-columns label --out reviews/

Killed midway, the same command resumes from the last committed shard; with other arguments
on an existing --out it refuses unless --overwrite is given.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fastcap`` and the ``fastcap`` console script.

    Example:
        >>> main(["extract", "--model", "resnet18", "--data", "fake:64", "--layers", "layer4",
        ...       "--reduce", "mean", "--out", "feats/"])
        0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser, bench = _parser(with_bench=command == "bench")
    args = parser.parse_args(argv)
    if args.command == "extract":
        return _run_extract(args, argv)
    if args.command == "layers":
        return _run_layers(args)
    if args.command == "info":
        return _run_info(args)
    if args.command == "verify":
        return _run_verify(args)
    if args.command == "export":
        return _run_export(args)
    if args.command == "bench":
        return bench.run(args)
    parser.print_help(sys.stderr)
    return 2


def _parser(with_bench: bool):
    parser = argparse.ArgumentParser(
        prog="fastcap",
        description="Memory-efficient activation capture for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"fastcap {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_extract_arguments(commands.add_parser(
        "extract",
        help="run a model over a dataset and write layer activations to disk",
        description="Run a model over a dataset and write the chosen layers' activations "
                    "to --out (one .npy per layer per shard plus manifest.json), resumably.",
        epilog=EXTRACT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ))
    _add_layers_arguments(commands.add_parser(
        "layers",
        help="list a model's layer names, classes and output shapes (what --layers takes)",
        description="List every module of --model in named_modules() order (or those GLOB matches), "
                    "with its class and the shape and dtype of its output in one forward on a small "
                    "fake input: images for vision models, a few tokens for hf: models.",
        epilog="examples:\n"
               "  fastcap layers --model resnet50 'layer*'\n"
               "  fastcap layers --model 'hf-random:gpt2?n_layer=4' 'transformer.h.*'\n"
               "  fastcap layers --model my_pkg.models:build --input-shape 3,32,32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ))
    info = commands.add_parser(
        "info", help="print what a store holds and how it was made",
        description="Print a store's keys (rows, shape, dtype), whether it is complete and how many samples "
                    "are committed, its statistics, token index and kept columns, and the arguments it was "
                    "made with.")
    info.add_argument("out", metavar="OUT", help="the store (extract's --out)")
    verify = commands.add_parser(
        "verify", help="check every file of a store against its recorded checksum",
        description="Read every shard file of a store against the size and crc32 recorded when it was "
                    "written. Exit status: 0 complete and every byte as written; 1 damaged (a file missing, "
                    "truncated or changed) or not a store; 3 unfinished (the committed shards are intact: run "
                    "the extraction again to finish it).")
    verify.add_argument("out", metavar="OUT", help="the store (extract's --out)")
    verify.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: only when stderr is a terminal)")
    _add_export_arguments(commands.add_parser(
        "export", help="write a store's token rows for another tool (SAELens's activation cache)",
        description="Write KEY of the store OUT for another tool. --format saelens: a Hugging Face datasets "
                    "folder (Dataset.save_to_disk) that SAELens reads as its cached_activations_path: one row "
                    "per sequence, KEY as Array2D((T, d), float32) and token_ids as Sequence(int32, T), in "
                    "shards of at most --max-shard-size, in store order or shuffled across sequences. The "
                    "store's samples must all have kept the same number T of token rows (a packed corpus "
                    "without --skip-ids).",
        epilog="example:\n"
               "  fastcap export acts/ --format saelens --key transformer.h.3 --to sae-cache/ --shuffle --seed 0\n"
               "  # SAELens: cached_activations_path='sae-cache/', hook_name='transformer.h.3'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ))
    bench_parser = commands.add_parser(
        "bench",
        help="benchmark fastcap against pure-Python hooks (run 'fastcap bench --help')",
        description="Benchmark fastcap against pure-Python hooks.",
    )
    bench = None
    if with_bench:
        try:
            from fastcap import bench
        except ImportError as error:
            parser.error(f"the bench command is unavailable: {error}")
        bench.add_arguments(bench_parser)
    return parser, bench


def _add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    what.add_argument("--model", required=True, metavar="SPEC",
                      help="torchvision name (resnet50, torchvision:vit_b_16), a module:function "
                           "factory (my_pkg.models:build), a TorchScript / torch.save'd model "
                           "file (torch.save'd modules need --trust-pickle), "
                           "hf:DIR (a local Hugging Face model directory), or "
                           "hf-random:NAME?key=value&... (a Hugging Face architecture with random "
                           "weights, e.g. 'hf-random:gpt2?n_layer=4&n_embd=256')")
    what.add_argument("--trust-pickle", action="store_true",
                      help="load a --model file saved with torch.save(model) by full unpickling, which "
                           "runs any code the file names: only for files you trust")
    what.add_argument("--model-dtype", choices=list(MODEL_DTYPES),
                      help="dtype of hf: / hf-random: models (default: as saved for hf:, fp32)")
    what.add_argument("--weights", metavar="PATH",
                      help="state dict to load into the model (default: random init from --seed; "
                           "nothing is downloaded)")
    what.add_argument("--data", required=True, metavar="SPEC",
                      help="images: an image folder (torchvision ImageFolder layout: its class index is "
                           "kept as the column 'label'), or fake:N for N deterministic synthetic images; "
                           "text (needs --context): a .jsonl file "
                           "(one document per line, in --text-field), a .txt file (one document per "
                           "non-empty line), a folder of .txt/.jsonl files (sorted by name), a .npy "
                           "of token ids (1-D: one document; 2-D [N, L]: N documents), a Hugging Face "
                           "dataset folder written by Dataset.save_to_disk (one document per row: "
                           "--ids-field or --text-field), or "
                           "fake-text:N for N deterministic random documents in the model's "
                           "vocabulary")
    what.add_argument("--limit", type=int, metavar="N",
                      help="run on the first N samples only (rows, for text), for a quick try")
    what.add_argument("--keep-columns", metavar="NAMES",
                      help="per-sample values stored beside the features (store.columns[NAME]), comma "
                           "separated: .jsonl fields or dataset columns (one document per row, not --pack), "
                           "or 'label' for images (default: 'label' for an image folder)")
    what.add_argument("--image-size", type=int, metavar="PIXELS",
                      help="image side length S (default: 64 for fake:N, 224 for a folder): a folder's "
                           "images are resized to round(S/0.875) on the shorter side (256 for 224), "
                           "center-cropped to SxS, scaled to [0, 1] and normalised")
    what.add_argument("--no-normalize", action="store_true",
                      help="image folder: leave pixels in [0, 1] (no mean/std normalisation)")
    what.add_argument("--mean", type=_floats, metavar="R,G,B",
                      help="image folder: normalisation mean (default: ImageNet's 0.485,0.456,0.406)")
    what.add_argument("--std", type=_floats, metavar="R,G,B",
                      help="image folder: normalisation std (default: ImageNet's 0.229,0.224,0.225)")
    what.add_argument("--seed", type=int, default=0,
                      help="seed of the random init (default: %(default)s); every rank and every "
                           "resumed run must use the same one")

    text = parser.add_argument_group("language models (text --data)")
    text.add_argument("--tokenizer", metavar="DIR",
                      help="local tokenizer directory for .jsonl/.txt data (default: the hf:DIR "
                           "model's directory, when it holds one)")
    text.add_argument("--text-field", metavar="NAME", help="field of a .jsonl record, or column of a "
                                                         "datasets folder, holding the text (default: text)")
    text.add_argument("--ids-field", metavar="NAME",
                      help="column of a datasets folder holding token ids, used as they are (default: "
                           "input_ids when the dataset has that column and no --text-field is given)")
    text.add_argument("--encoding", metavar="CODEC",
                      help="text encoding of .jsonl/.txt data, e.g. latin-1 (default: utf-8)")
    text.add_argument("--context", type=int, metavar="T", help="tokens per row")
    text.add_argument("--pack", action="store_true",
                      help="pack documents into rows of exactly T tokens: doc1 BOS doc2 BOS ... cut "
                           "into pieces of T-1, each row BOS + piece, the incomplete tail dropped "
                           "(BOS: bos_token_id, else eos_token_id)")
    text.add_argument("--padding", choices=["right", "left"],
                      help="without --pack: one document per row, truncated to T and padded on this "
                           "side (default: right)")
    text.add_argument("--tokens", action="store_true",
                      help="capture only real tokens (attention_mask): mean and topk become their "
                           "masked versions; implied by --reduce tokens|max|first|last, --skip-ids "
                           "and --start")
    text.add_argument("--skip-ids", metavar="IDS",
                      help="token ids not kept: comma separated ints and/or bos, eos, pad "
                           "(e.g. 'bos' or 'bos,13')")
    text.add_argument("--start", type=int, metavar="N",
                      help="keep tokens from the N-th real token of each row on (default: 0)")

    capture = parser.add_argument_group("what to capture")
    capture.add_argument("--layers", action="append", required=True, metavar="NAMES",
                         help="module names, comma separated or repeated; globs allowed "
                              "('layer*.1', '**.mlp'); KEY=NAME stores a module under the key KEY "
                              "(one module may be captured under two keys, with two --reduce modes)")
    capture.add_argument("--reduce", default=(None, {}), type=_reduce_spec, metavar="MODE[,KEY=MODE...]",
                         help=f"one of {', '.join(REDUCE_MODES)}: full copy, per-channel mean, top-k "
                              "channels; for text also tokens (one row per kept token), max, first, "
                              "last (per row, over the kept tokens); then KEY=MODE for the keys that "
                              "differ, e.g. 'tokens,pooled=mean' (default: full; tokens for text with --tokens)")
    capture.add_argument("--k", type=int, help="channels kept by --reduce topk")
    capture.add_argument("--channel-dim", type=int,
                         help="channel dimension (default: 1 for NCHW images, -1 for text [N, T, C])")
    capture.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                         help="cast full captures to this dtype on the device (default: keep)")

    run = parser.add_argument_group("how to run")
    run.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    run.add_argument("--num-workers", type=int, default=0,
                     help="DataLoader worker processes (default: %(default)s)")
    run.add_argument("--device", default=None,
                     help="cpu, cuda, cuda:1, ... (default: cuda when available; under torchrun "
                          "cuda means cuda:LOCAL_RANK)")
    run.add_argument("--out", required=True, metavar="DIR", help="output directory")
    run.add_argument("--shard-size", type=int, default=4096,
                     help="samples per shard, the unit of resume (default: %(default)s)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an extraction in --out made with other arguments")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar (default: only when stderr is a terminal)")
    run.add_argument("--no-stop-early", dest="stop_early", action="store_false",
                     help="run each forward to the end (default: stop after the deepest captured layer)")
    run.add_argument("--no-check-space", dest="check_space", action="store_false",
                     help="write even when the disk seems to hold less than the estimated output")


def _run_extract(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import torch
    from torch.utils.data import DataLoader

    from fastcap.extract import extract_with_stats, print_estimate
    from fastcap.models import load_model

    started = time.perf_counter()
    try:
        device = _device(args.device)
        text = _check_data_flags(args)
        _check_k(args)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        torch.manual_seed(args.seed)
        model = load_model(args.model, args.weights, device, args.model_dtype,
                           trust_pickle=args.trust_pickle, progress=bool(args.progress))
        columns = _names(args.keep_columns)
        dataset = _text_dataset(args, model, columns) if text else _image_dataset(args)
        if not text and args.keep_columns is None:
            columns = _automatic_columns(args)
        if args.limit is not None:
            from fastcap._sources import FirstN

            dataset = FirstN(dataset, args.limit)
        layers = _layer_spec(args.layers)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda")
        channel_dim = args.channel_dim if args.channel_dim is not None else (-1 if text else 1)
        store, stats = extract_with_stats(
            model, loader, layers, _reduce(args.reduce, model, layers), out=args.out, k=args.k,
            channel_dim=channel_dim, dtype=getattr(torch, args.dtype) if args.dtype else None,
            select=None, shard_size=args.shard_size, overwrite=args.overwrite,
            progress=args.progress, forward=None, depth=4,
            tokens=_tokens(args, dataset) if text else None,
            stop_early=args.stop_early, check_space=args.check_space, on_estimate=print_estimate,
            keep_columns=columns or None, description=_description(args, argv, text, dataset, columns),
        )
    except (ValueError, TypeError, OSError, ImportError) as error:  # ImportError: no datasets package
        print(f"fastcap extract: error: {error}", file=sys.stderr)
        return 1
    if stats["rank"] == 0:
        print(_summary(store, stats, device, time.perf_counter() - started))
    return 0


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _automatic_columns(args: argparse.Namespace) -> list[str]:
    """An image folder keeps its class index as 'label' - unless --out holds a store made before
    columns were kept (and no --overwrite), which then resumes as it was made."""
    from fastcap.extract import _existing_arguments

    if args.data.startswith("fake:") or not os.path.isdir(args.data):
        return []
    existing = _existing_arguments(Path(args.out)) if os.path.isdir(args.out) else None
    if existing is not None and "columns" not in existing and not args.overwrite:
        return []
    return ["label"]


def _description(args: argparse.Namespace, argv: list[str] | None, text: bool, dataset, columns) -> dict:
    """The arguments in readable form, recorded in the manifest (fastcap info shows them)."""
    from fastcap.models import IMAGENET_MEAN, IMAGENET_STD, default_image_size

    def where(path: str) -> str:
        return os.path.abspath(path) if os.path.exists(path) else path

    described = {"command": shlex.join(["fastcap", *(argv or [])]) if argv is not None else None,
                 "model": args.model, "weights": args.weights and where(args.weights),
                 "model_dtype": args.model_dtype, "seed": args.seed, "data": where(args.data), "limit": args.limit}
    if text:
        spec = getattr(dataset, "extract_spec", {}) or {}
        described |= {"tokenizer": spec.get("tokenizer"), "text_field": spec.get("text_field"),
                      "ids_field": spec.get("ids_field"), "context": args.context, "pack": bool(args.pack),
                      "padding": None if args.pack else (args.padding or "right"), "skip_ids": args.skip_ids,
                      "start": args.start}
    else:
        size = args.image_size or default_image_size(args.data)
        described["image_size"] = size
        if not args.data.startswith("fake:"):
            normalise = ("none" if args.no_normalize else
                         f"mean {list(args.mean or IMAGENET_MEAN)}, std {list(args.std or IMAGENET_STD)}")
            described["preprocessing"] = (f"RGB, resize {round(size / 0.875)} (shorter side), center crop "
                                          f"{size}, to [0, 1], normalise: {normalise}")
            described["classes"] = list(getattr(dataset, "classes", []))
    described |= {"layers": ",".join(args.layers), "reduce": _reduce_text(args.reduce), "k": args.k,
                  "dtype": args.dtype, "keep_columns": ",".join(columns) or None, "batch_size": args.batch_size,
                  "shard_size": args.shard_size}
    return {name: value for name, value in described.items() if value not in (None, [], "")}


def _reduce_text(spec: tuple) -> str | None:
    default, overrides = spec
    parts = ([default] if default else []) + [f"{key}={mode}" for key, mode in overrides.items()]
    return ",".join(parts) or None


def _floats(text: str) -> list[float]:
    """--mean/--std: comma separated numbers."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers such as 0.5,0.5,0.5") from None


def _check_data_flags(args: argparse.Namespace) -> bool:
    """Whether --data is text; refuses flags that do not fit the kind of data."""
    from fastcap.text import is_text_spec

    text = is_text_spec(args.data)
    if text:
        if args.image_size is not None:
            raise ValueError(f"--image-size is for images, but --data {args.data!r} is text")
        images = [name for name in _IMAGE_FLAGS if getattr(args, name) not in (None, False)]
        if images:
            flags = ", ".join("--" + name.replace("_", "-") for name in images)
            raise ValueError(f"{flags}: for an image folder, but --data {args.data!r} is text")
        if args.context is None:
            raise ValueError(f"--data {args.data!r} is text: pass --context T, the tokens per row")
        if args.pack and args.padding is not None:
            raise ValueError(f"--pack makes full rows without padding: drop --padding {args.padding}")
        if args.start is not None and args.start < 0:
            raise ValueError(f"--start must be >= 0, got {args.start}")
        return True
    given = [name for name in _TEXT_FLAGS if getattr(args, name) not in (None, False)]
    given += [f"reduce {mode}" for mode in _modes(args) if mode in TOKEN_ONLY]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: for text data, but --data {args.data!r} is images (text is "
                         "fake-text:N, .jsonl, .txt, .npy, a datasets folder or a folder of .txt/.jsonl files)")
    return False


def _add_layers_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", metavar="GLOB",
                        help="a module name or a dotted glob, as --layers takes it ('layer*', "
                             "'transformer.h.*', '**.mlp'); default: every module")
    parser.add_argument("--model", required=True, metavar="SPEC", help="as for fastcap extract")
    parser.add_argument("--weights", metavar="PATH", help="state dict to load (default: random init from --seed)")
    parser.add_argument("--trust-pickle", action="store_true", help="as for fastcap extract")
    parser.add_argument("--model-dtype", choices=list(MODEL_DTYPES), help="dtype of hf: / hf-random: models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, metavar="PIXELS",
                        help="the fake image's side for vision models (default: %(default)s)")
    parser.add_argument("--input-shape", metavar="DIMS",
                        help="one fake float input of this per-sample shape instead, comma separated (e.g. 3,32,32)")
    parser.add_argument("--context", type=int, default=16, metavar="T",
                        help="the fake tokens of hf: / hf-random: models (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="default: %(default)s")
    parser.add_argument("--progress", action="store_true", help="let transformers show its loading bar")


def _run_layers(args: argparse.Namespace) -> int:
    import torch

    from fastcap._layer_list import format_layers, layers
    from fastcap.models import load_model

    try:
        torch.manual_seed(args.seed)
        model = load_model(args.model, args.weights, _device(args.device), args.model_dtype,
                           trust_pickle=args.trust_pickle, progress=args.progress)
        example, what = _example_input(args, model)
        rows = layers(model, example, args.pattern)
    except (ValueError, TypeError, OSError) as error:
        print(f"fastcap layers: error: {error}", file=sys.stderr)
        return 1
    matched = f"{len(rows)} modules" + (f" matching {args.pattern!r}" if args.pattern else "")
    print(f"{type(model).__name__}: {matched}; outputs of one forward on {what}")
    print(format_layers(rows))
    return 0


def _example_input(args: argparse.Namespace, model):
    """A small fake input for --model and what it is, in words: a few tokens for a Hugging Face
    model, else one image (or --input-shape)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    if args.input_shape:
        try:
            shape = [int(part) for part in args.input_shape.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--input-shape {args.input_shape!r}: expected integers such as 3,32,32") from None
        return torch.randn(1, *shape, generator=generator), f"a float32 input [1, {', '.join(map(str, shape))}]"
    if args.model.startswith(("hf:", "hf-random:")) and getattr(config, "vocab_size", None):
        if args.context < 1:
            raise ValueError(f"--context must be >= 1, got {args.context}")
        ids = torch.randint(0, config.vocab_size, (1, args.context), generator=generator)
        return ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                f"{args.context} random tokens (input_ids [1, {args.context}])")
    if args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    size = args.image_size
    return torch.randn(1, 3, size, size, generator=generator), f"one fake image [1, 3, {size}, {size}]"


def _run_info(args: argparse.Namespace) -> int:
    from fastcap.store._info import describe, open_quietly

    try:
        store, _ = open_quietly(args.out)
    except (ValueError, OSError) as error:
        print(f"fastcap info: error: {error}", file=sys.stderr)
        return 1
    print(describe(store))
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from fastcap._distributed import show_progress
    from fastcap.store._info import check_files, open_quietly

    try:
        store, unfinished = open_quietly(args.out)
        files, size, problems = check_files(store, show_progress(args.progress))
    except (ValueError, OSError) as error:  # a missing or truncated file, or no store at all
        print(f"fastcap verify: {args.out}: DAMAGED: {error}", file=sys.stderr)
        return VERIFY_DAMAGED
    checked = f"{files} files, {size_text(size)}, {len(store.indices)} samples"
    if problems:
        print(f"fastcap verify: {args.out}: DAMAGED: {len(problems)} of {checked} differ from what was written:",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("  rerun the extraction with --overwrite to rewrite the store", file=sys.stderr)
        return VERIFY_DAMAGED
    if unfinished is not None or not store.complete:
        print(f"fastcap verify: {args.out}: INCOMPLETE: {checked} committed, every byte as written; "
              + (unfinished or "the run has not finished") + "")
        return VERIFY_INCOMPLETE
    print(f"fastcap verify: {args.out}: OK: {checked}, every byte as written")
    return VERIFY_OK


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="the store (extract's --out)")
    parser.add_argument("--format", required=True, choices=["saelens"], help="the tool to write for")
    parser.add_argument("--key", required=True, help="the key to export (rows per kept token)")
    parser.add_argument("--to", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--shuffle", action="store_true", help="shuffle the sequences (SAELens reads its cache in order)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default: %(default)s)")
    parser.add_argument("--max-shard-size", default="1GB", metavar="SIZE",
                        help="most bytes per Arrow shard, e.g. 500MB (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --to")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: only when stderr is a terminal)")


def _run_export(args: argparse.Namespace) -> int:
    from fastcap.export import to_saelens

    size = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    try:
        to = to_saelens(args.out, args.key, args.to, shuffle=args.shuffle, seed=args.seed, overwrite=args.overwrite,
                        max_shard_size=size, progress=args.progress)
    except (ValueError, OSError, ImportError) as error:
        print(f"fastcap export: error: {error}", file=sys.stderr)
        return 1
    import datasets

    written = datasets.load_from_disk(str(to))
    shape = written.features[args.key].shape
    print(f"fastcap export: {len(written)} sequences of {shape[0]} tokens x {shape[1]} written to {str(to)!r}"
          f"{' (shuffled, seed ' + str(args.seed) + ')' if args.shuffle else ''}; in SAELens: "
          f"cached_activations_path={str(to)!r}, hook_name={args.key!r}, context_size={shape[0]}, d_in={shape[1]}")
    return 0


def _check_k(args: argparse.Namespace) -> None:
    """--k against --reduce, in the command line's terms (extract() would name k=)."""
    default, overrides = args.reduce
    topk = (["topk"] if default == "topk" else []) + [f"{key}=topk" for key, mode in overrides.items()
                                                      if mode == "topk"]
    if topk and args.k is None:
        raise ValueError(f"--reduce {topk[0]} needs --k, the channels to keep (e.g. --k 8)")
    if args.k is not None and not topk:
        raise ValueError(f"--k {args.k} is given, but no --reduce mode is topk")
    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")


def _image_dataset(args: argparse.Namespace):
    from fastcap.models import make_dataset

    return make_dataset(args.data, args.image_size, normalize=not args.no_normalize, mean=args.mean, std=args.std)


def _text_dataset(args: argparse.Namespace, model, columns: list[str]):
    import inspect

    from fastcap.models import tokenizer_dir
    from fastcap.text import make_text_dataset

    # Padded rows carry position_ids when the forward takes them: left padding then gives the
    # real tokens the positions (and hidden states) right padding gives them.
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    return make_text_dataset(
        args.data, context=args.context, pack=args.pack, padding=args.padding or "right",
        tokenizer=args.tokenizer or tokenizer_dir(args.model), text_field=args.text_field,
        encoding=args.encoding or "utf-8", config=getattr(model, "config", None),
        position_ids=takes_positions, progress=args.progress, ids_field=args.ids_field,
        keep_columns=columns or None)


def _tokens(args: argparse.Namespace, dataset):
    """fastcap.Tokens of --tokens, --skip-ids, --start (implied by the token-only reduce modes)."""
    from fastcap import Tokens

    wanted = (args.tokens or args.skip_ids is not None or args.start is not None
              or any(mode in TOKEN_ONLY for mode in _modes(args)))
    if not wanted:
        return None
    skip = []
    for item in filter(None, (part.strip() for part in (args.skip_ids or "").split(","))):
        try:
            skip.append(int(item))
        except ValueError:
            skip.append(dataset.special_ids.resolve(item.lower()))
    return Tokens(mask="attention_mask", ids="input_ids", skip_ids=skip, start=args.start or 0)


def _device(name: str | None):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _layer_spec(values: list[str]):
    """--layers as capture() takes it: a list of names (globs allowed), or, when some entry is
    KEY=NAME, ``{key: name}`` (a plain NAME is its own key)."""
    entries = [entry.strip() for value in values for entry in value.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"--layers names no layer: {values!r}")
    if not any("=" in entry for entry in entries):
        return entries
    layers = {}
    for entry in entries:
        key, _, name = entry.rpartition("=")
        key, name = (key.strip() or name.strip()), name.strip()
        if not name or key in layers:
            raise ValueError(f"--layers {entry!r}: " + ("KEY=NAME needs a module name" if not name
                                                       else f"the key {key!r} is given twice"))
        if any(c in name for c in "*?[") and "=" not in entry:
            raise ValueError(f"--layers {entry!r}: a glob cannot be mixed with KEY=NAME entries; name "
                             "each module (KEY=NAME or NAME)")
        layers[key] = name
    return layers


def _reduce_spec(text: str) -> tuple[str | None, dict]:
    """--reduce MODE[,KEY=MODE...] -> (the default mode, None for extract's own, {key: mode}
    where it differs)."""
    default, overrides = None, {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        key, _, mode = entry.rpartition("=")
        if mode not in REDUCE_MODES:
            raise argparse.ArgumentTypeError(f"{entry!r}: the mode must be one of {', '.join(REDUCE_MODES)}")
        if key:
            overrides[key.strip()] = mode
        elif default is None:
            default = mode
        else:
            raise argparse.ArgumentTypeError(f"{text!r} names two default modes ({default}, {mode}); "
                                             "give the others as KEY=MODE")
    return default, overrides


def _modes(args: argparse.Namespace) -> set:
    default, overrides = args.reduce
    return {default, *overrides.values()}


def _reduce(spec: tuple[str, dict], model, layers):
    """The reduce= of extract(): the mode, or {key: mode} over every captured key."""
    from fastcap._layers import resolve_layers

    default, overrides = spec
    if not overrides:
        return default
    keys = resolve_layers(model, layers)
    unknown = [key for key in overrides if key not in keys]
    if unknown:
        raise ValueError(f"--reduce {unknown[0]}=...: {unknown[0]!r} is not a captured key; the keys: "
                         f"{list(keys)}")
    return {key: overrides.get(key, default) for key in keys}


def _summary(store, stats: dict, device, total_seconds: float) -> str:
    import torch

    samples, seconds = stats["samples"], stats["seconds"]
    tokens, kept, estimate = stats["input_tokens"], stats["kept_tokens"], stats["estimated_bytes"]

    def rate(count: int) -> float:
        return count / seconds if seconds > 0 else 0.0

    lines = [
        f"fastcap extract: {samples} items"
        + (f", {tokens} tokens" if tokens else "")
        + f" in {seconds:.1f} s ({rate(samples):.1f} items/s"
        + (f", {rate(tokens):.0f} tokens/s" if tokens else "")
        + f", {total_seconds:.1f} s in all)"
        + (f", resumed after {stats['resumed_samples']}" if stats["resumed_samples"] else ""),
        f"  wrote {size_text(stats['bytes_written'])}"
        + (f" (estimated {size_text(estimate)})" if estimate is not None else "")
        + f" in {stats['shards_written']} shard(s) on rank 0 of {stats['world_size']}"
        + (f", {kept} token rows" if kept else "")
        + f"; forward waited {stats['stall_seconds']:.2f} s on the writer",
        f"  peak host memory {size_text(_peak_rss())}"
        + (f", peak device memory {size_text(torch.cuda.max_memory_allocated(device))}"
           if device.type == "cuda" else ""),
        f"  {store!r}",
        f"  open it: import fastcap; store = fastcap.open({str(store.path)!r}); "
        f"x = store[{next(iter(store), 'KEY')!r}][:]",
    ]
    return "\n".join(lines)


def _peak_rss() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastcap")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"

