"""Benchmarks of fastcap against the pure-Python capture hooks it replaces, shared by the
pytest-benchmark suite in ``benchmarks/`` and the ``fastcap bench`` command so that both measure
the same thing the same way.

* :mod:`fastcap.bench.methods`: the capture methods compared (:data:`METHODS`) and what to capture
  (:class:`CaptureSpec`);
* :mod:`fastcap.bench.measure`: the timed loop (:func:`time_round`), the interleaved comparison
  (:func:`compare`), memory probes and the raw device-to-host copy probe;
* :mod:`fastcap.bench.growth`: memory after 1, 10, 100 ... batches per method
  (:func:`memory_growth`), each method in a fresh process;
* :mod:`fastcap.bench.recipes`: the model and input a recipe describes;
* :mod:`fastcap.bench.report`: the machine record, JSON, tables and the plot;
* here: the command line, :func:`add_arguments` and :func:`run` (``fastcap bench``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import sys

import torch

from fastcap._layers import resolve_layers
from fastcap.bench.growth import GROWTH_CASES, memory_growth, memory_growth_one
from fastcap.bench.measure import (
    add_link_metrics,
    compare,
    measure_memory,
    noise,
    paired_ratio,
    probe_d2h_gbps,
    relative,
    time_round,
)
from fastcap.bench.methods import (
    METHOD_LABELS,
    METHOD_SHORT,
    METHODS,
    POLICIES,
    SAME_WORK,
    CaptureSpec,
    Method,
    make_method,
    reduce_torch,
)
from fastcap.bench.recipes import build_input, build_model
from fastcap.bench.report import environment, growth_table, jsonable, plot, throughput_table

__all__ = [
    "add_arguments", "run",
    "METHODS", "METHOD_LABELS", "METHOD_SHORT", "POLICIES", "SAME_WORK", "CaptureSpec", "Method",
    "make_method", "reduce_torch", "resolve_layers",
    "time_round", "measure_memory", "compare", "paired_ratio", "relative", "noise", "add_link_metrics",
    "probe_d2h_gbps", "GROWTH_CASES", "memory_growth", "memory_growth_one",
    "build_model", "build_input", "environment", "jsonable", "throughput_table", "growth_table", "plot",
]


# --------------------------------------------------------------------------------------------
# The command line: fastcap bench
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastcap bench`` options to ``parser``."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--model", required=True,
                        help="any fastcap extract --model: torchvision:NAME, a torchvision name, module:function, "
                             "a TorchScript or torch.save'd module file (the latter needs --trust-pickle), hf:DIR "
                             "or hf-random:NAME?key=value&... (fed --context random token ids)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run for a first look (under a minute for ResNet-50 on 2 CPU cores): 2 rounds "
                             "of 1 batch, no memory-growth run, and unless given --batch-size 8, --image-size 64, "
                             "--context 32")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load a --model file saved with torch.save(model) by full unpickling, which runs "
                             "any code the file names: only for files you trust")
    parser.add_argument("--weights", default=None, help="a state-dict file for --model (default: random weights)")
    parser.add_argument("--layers", nargs="+", required=True,
                        help="layer names or globs, space- or comma-separated, e.g. 'layer*' or layer3,layer4")
    parser.add_argument("--reduce", choices=("full", "mean", "topk"), default="full", help="default full")
    parser.add_argument("--k", type=int, default=8, help="k for --reduce topk (default 8)")
    parser.add_argument("--channel-dim", type=int, default=None,
                        help="channel dim (default: 1; -1 for hf: models, [N, T, C])")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input is [batch, 3, size, size] (default 224; 64 with --quick)")
    parser.add_argument("--context", type=int, default=None, metavar="T",
                        help="hf: models: input is [batch, T] random token ids (default 128; 32 with --quick)")
    parser.add_argument("--input-shape", default=None,
                        help="per-sample input shape, comma-separated, instead of 3,size,size (e.g. 128)")
    parser.add_argument("--int-input", type=int, default=None, metavar="HIGH",
                        help="feed int64 ids in [0, HIGH) (token ids) instead of normal floats")
    parser.add_argument("--device", default=default_device, help=f"default {default_device}")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="run the model and its input in this dtype (default: the model's, float32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and 4-D input in channels_last memory format")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timed rounds per method (default 3; 2 with --quick)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per round (default 2; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed batches before timing: every method in round 1, fastcap and fx "
                             "at every open (default 1)")
    parser.add_argument("--memory-batches", default="1,10,100",
                        help="batch counts at which the memory-growth run measures (default 1,10,100)")
    parser.add_argument("--no-memory-growth", action="store_true",
                        help="skip the memory-growth run (the longest part: each case in its own process, up to the "
                             "largest --memory-batches; --quick skips it)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the memory-growth cases in this process instead of one fresh process each")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--out", default=None,
                        help="output prefix: writes PREFIX.json and PREFIX.png "
                             "(default fastcap-bench-MODEL-DEVICE-DATE)")


def _resolve_defaults(args: argparse.Namespace) -> None:
    """The defaults that --quick changes, and the channel dim of language models."""
    quick = getattr(args, "quick", False)
    for name, full, short in (("batch_size", 32, 8), ("image_size", 224, 64), ("context", 128, 32),
                              ("rounds", 3, 2), ("batches", 2, 1)):
        if getattr(args, name, None) is None:
            setattr(args, name, short if quick else full)
    if quick:
        args.no_memory_growth = True
    if args.channel_dim is None:
        args.channel_dim = -1 if args.model.startswith(("hf:", "hf-random:")) else 1


def _log_estimate(model, x, args: argparse.Namespace, methods: list, log) -> None:
    """One untimed forward, then how long the whole run will take at that speed."""
    import time

    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        seconds = time.perf_counter() - start
    compare_forwards = len(methods) * (args.rounds * (args.batches + args.warmup) + args.warmup)
    growth = 0
    if not args.no_memory_growth:
        largest = max(int(c) for c in args.memory_batches.split(",") if c.strip())
        growth = sum(1 for case in GROWTH_CASES if case[0] in methods) * largest
    total = (compare_forwards + growth) * seconds
    duration = f"{total:.0f} s" if total < 90 else f"{total / 60:.0f} min"
    log(f"fastcap bench: one forward takes {seconds:.2f} s; about {compare_forwards + growth} forwards to go "
        f"({compare_forwards} timed and warm-up, {growth} in the memory-growth run): about {duration}"
        + (" (--quick for a short run)" if total > 120 and not getattr(args, "quick", False) else ""))


def run(args: argparse.Namespace) -> int:
    """``fastcap bench``: compare the methods on the user's model; print, write JSON and PNG."""
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    _resolve_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        log(f"fastcap bench: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        log("fastcap bench: --device cuda but torch sees no CUDA device")
        return 2
    language = args.model.startswith(("hf:", "hf-random:"))
    shape = ([int(s) for s in args.input_shape.split(",")] if args.input_shape
             else [args.context] if language else [3, args.image_size, args.image_size])
    recipe = {"model": args.model, "weights": args.weights, "trust_pickle": args.trust_pickle,
              "device": args.device, "batch": args.batch_size,
              "shape": shape, "int_high": args.int_input, "dtype": args.dtype,
              "channels_last": args.channels_last, "seed": 0, "threads": args.threads}
    names = [name.strip() for arg in args.layers for name in arg.split(",") if name.strip()]
    layers = names[0] if len(names) == 1 else names
    spec = CaptureSpec(layers, args.reduce, args.k if args.reduce == "topk" else None, args.channel_dim)

    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    try:
        model = build_model(recipe)
        if language and not recipe["int_high"]:  # token ids in the model's vocabulary
            recipe["int_high"] = int(getattr(model.config, "vocab_size", 0) or 0) or None
        x = build_input(recipe)
        resolved = resolve_layers(model, layers)
    except (ValueError, TypeError, OSError) as error:
        log(f"fastcap bench: error: {error}")
        return 2
    log(f"fastcap bench: {args.model} on {args.device}, batch {args.batch_size}, input {list(x.shape)} "
        f"{str(x.dtype).replace('torch.', '')}{' channels_last' if args.channels_last else ''}, "
        f"reduce {args.reduce}, {len(resolved)} layers: {', '.join(list(resolved)[:6])}"
        f"{' ...' if len(resolved) > 6 else ''}")
    _log_estimate(model, x, args, methods, log)
    records = compare(model, x, spec, methods, rounds=args.rounds, warmup=args.warmup, batches=args.batches, log=log)

    growth = None
    if not args.no_memory_growth:
        checkpoints = [int(c) for c in args.memory_batches.split(",") if c.strip()]
        cases = [c for c in GROWTH_CASES if c[0] in methods]
        del model, x
        gc.collect()
        growth = memory_growth(recipe, spec, cases, checkpoints, isolate=not args.in_process, log=log)

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model.split(":")[-1].split("/")[-1])
    prefix = args.out or f"fastcap-bench-{name}-{torch.device(args.device).type}-{datetime.date.today():%Y%m%d}"
    env = environment()
    env["load_average_start"] = load_start
    out = {"environment": env, "config": {**recipe, "layers": layers, "resolved_layers": resolved,
                                           "reduce": args.reduce, "k": spec.k, "channel_dim": args.channel_dim,
                                           "rounds": args.rounds, "batches": args.batches, "warmup": args.warmup},
           "throughput": records, "none_spread": noise(records), "memory_growth": growth}
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(jsonable(out), f, indent=1)
    title = (f"{args.model}, {args.device}, batch {args.batch_size}, input {shape} {args.dtype or ''}"
             f"{' channels_last' if args.channels_last else ''}, reduce={args.reduce}, "
             f"layers {' '.join(args.layers)} — torch {env['torch']}, {env['date'][:10]}")
    plot(records, growth, prefix + ".png", title)

    print(f"\nthroughput ({args.rounds} interleaved rounds of {args.batches} batches; x none = time per batch "
          f"over no capture's)")
    print(throughput_table(records))
    spread = noise(records)
    if spread is not None and spread > 0.05:
        print(f"warning: no-capture times varied by {spread:.0%} between rounds (a busy machine?); "
              "ratios within that are noise: rerun with more --rounds")
    same = relative(records, "fastcap", SAME_WORK[args.reduce])
    if same is not None:
        print(f"fastcap / {SAME_WORK[args.reduce]} (the hook doing the same work): {same:.3f}")
    if growth:
        print("\nmemory growth (kept: every batch's results referenced; drain: each dropped once drained)")
        print(growth_table(growth))
    print(f"\nwrote {prefix}.json and {prefix}.png")
    return 0
