"""The ``fastcap`` command line: the argparse front of ``fastcap extract ...`` and
``fastcap bench ...`` (``python -m fastcap`` runs :func:`main`; ``--help`` lists every flag).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from fastcap.models import MODEL_DTYPES
from fastcap.store._writer import size_text

#: reduce modes that exist only over tokens: they imply --tokens.
TOKEN_ONLY = ("tokens", "max", "first", "last")
REDUCE_MODES = ("full", "mean", "topk", *TOKEN_ONLY)
#: flags for text data only (their defaults are None/False so that "given" can be told).
_TEXT_FLAGS = ("tokenizer", "text_field", "encoding", "context", "pack", "padding", "tokens", "skip_ids",
               "start")


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
        return _run_extract(args)
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
                      help="images: an image folder (torchvision ImageFolder layout), or fake:N for "
                           "N deterministic synthetic images; text (needs --context): a .jsonl file "
                           "(one document per line, in --text-field), a .txt file (one document per "
                           "non-empty line), a folder of .txt/.jsonl files (sorted by name), a .npy "
                           "of token ids (1-D: one document; 2-D [N, L]: N documents), or "
                           "fake-text:N for N deterministic random documents in the model's "
                           "vocabulary")
    what.add_argument("--image-size", type=int, metavar="PIXELS",
                      help="image side length (default: 64 for fake:N, 224 for a folder)")
    what.add_argument("--seed", type=int, default=0,
                      help="seed of the random init (default: %(default)s); every rank and every "
                           "resumed run must use the same one")

    text = parser.add_argument_group("language models (text --data)")
    text.add_argument("--tokenizer", metavar="DIR",
                      help="local tokenizer directory for .jsonl/.txt data (default: the hf:DIR "
                           "model's directory, when it holds one)")
    text.add_argument("--text-field", metavar="NAME", help="field of a .jsonl record holding the "
                                                         "text (default: text)")
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


def _run_extract(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from fastcap.extract import extract_with_stats, print_estimate
    from fastcap.models import load_model

    started = time.perf_counter()
    try:
        device = _device(args.device)
        text = _check_data_flags(args)
        _check_k(args)
        torch.manual_seed(args.seed)
        model = load_model(args.model, args.weights, device, args.model_dtype,
                           trust_pickle=args.trust_pickle)
        dataset = _text_dataset(args, model) if text else _image_dataset(args)
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
        )
    except (ValueError, TypeError, OSError) as error:
        print(f"fastcap extract: error: {error}", file=sys.stderr)
        return 1
    if stats["rank"] == 0:
        print(_summary(store, stats, device, time.perf_counter() - started))
    return 0


def _check_data_flags(args: argparse.Namespace) -> bool:
    """Whether --data is text; refuses flags that do not fit the kind of data."""
    from fastcap.text import is_text_spec

    text = is_text_spec(args.data)
    if text:
        if args.image_size is not None:
            raise ValueError(f"--image-size is for images, but --data {args.data!r} is text")
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
                         "fake-text:N, .jsonl, .txt, .npy or a folder of .txt/.jsonl files)")
    return False


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

    return make_dataset(args.data, args.image_size)


def _text_dataset(args: argparse.Namespace, model):
    import inspect

    from fastcap.models import tokenizer_dir
    from fastcap.text import make_text_dataset

    # Padded rows carry position_ids when the forward takes them: left padding then gives the
    # real tokens the positions (and hidden states) right padding gives them.
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    return make_text_dataset(
        args.data, context=args.context, pack=args.pack, padding=args.padding or "right",
        tokenizer=args.tokenizer or tokenizer_dir(args.model), text_field=args.text_field or "text",
        encoding=args.encoding or "utf-8", config=getattr(model, "config", None),
        position_ids=takes_positions, progress=args.progress)


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

