"""The ``fastcap`` command line: the argparse front of ``fastcap extract ...`` and
``fastcap bench ...`` (``python -m fastcap`` runs :func:`main`; ``--help`` lists every flag).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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
                           "factory (my_pkg.models:build), or a TorchScript / torch.save'd model "
                           "file (torch.save'd modules are unpickled: only your own files)")
    what.add_argument("--weights", metavar="PATH",
                      help="state dict to load into the model (default: random init from --seed; "
                           "nothing is downloaded)")
    what.add_argument("--data", required=True, metavar="SPEC",
                      help="an image folder (torchvision ImageFolder layout), or fake:N for N "
                           "deterministic synthetic images")
    what.add_argument("--image-size", type=int, metavar="PIXELS",
                      help="image side length (default: 64 for fake:N, 224 for a folder)")
    what.add_argument("--seed", type=int, default=0,
                      help="seed of the random init (default: %(default)s); every rank and every "
                           "resumed run must use the same one")

    capture = parser.add_argument_group("what to capture")
    capture.add_argument("--layers", action="append", required=True, metavar="NAMES",
                         help="module names, comma separated or repeated; globs allowed "
                              "('layer*.1', '**.mlp')")
    capture.add_argument("--reduce", default="full", choices=["full", "mean", "topk"],
                         help="full copy, per-channel mean, or top-k channels (default: %(default)s)")
    capture.add_argument("--k", type=int, help="channels kept by --reduce topk")
    capture.add_argument("--channel-dim", type=int, default=1,
                         help="channel dimension: 1 for NCHW (default), -1 for [N, T, C]")
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


def _run_extract(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from fastcap.extract import extract_with_stats
    from fastcap.models import load_model, make_dataset

    started = time.perf_counter()
    try:
        device = _device(args.device)
        torch.manual_seed(args.seed)
        model = load_model(args.model, args.weights, device)
        dataset = make_dataset(args.data, args.image_size)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda")
        store, stats = extract_with_stats(
            model, loader, _layer_list(args.layers), args.reduce, out=args.out, k=args.k,
            channel_dim=args.channel_dim, dtype=getattr(torch, args.dtype) if args.dtype else None,
            select=None, shard_size=args.shard_size, overwrite=args.overwrite,
            progress=args.progress, forward=None, depth=4,
        )
    except (ValueError, TypeError, OSError) as error:
        print(f"fastcap extract: error: {error}", file=sys.stderr)
        return 1
    if stats["rank"] == 0:
        print(_summary(store, stats, device, time.perf_counter() - started))
    return 0


def _device(name: str | None):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _layer_list(values: list[str]) -> list[str]:
    layers = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not layers:
        raise ValueError(f"--layers names no layer: {values!r}")
    return layers


def _summary(store, stats: dict, device, total_seconds: float) -> str:
    import torch

    samples, seconds = stats["samples"], stats["seconds"]
    rate = samples / seconds if seconds > 0 else 0.0
    lines = [
        f"fastcap extract: {samples} items in {seconds:.1f} s ({rate:.1f} items/s, "
        f"{total_seconds:.1f} s in all)"
        + (f", resumed after {stats['resumed_samples']}" if stats["resumed_samples"] else ""),
        f"  wrote {_bytes(stats['bytes_written'])} in {stats['shards_written']} shard(s) on rank 0"
        f" of {stats['world_size']}; forward waited {stats['stall_seconds']:.2f} s on the writer",
        f"  peak host memory {_bytes(_peak_rss())}"
        + (f", peak device memory {_bytes(torch.cuda.max_memory_allocated(device))}"
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


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastcap")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"

