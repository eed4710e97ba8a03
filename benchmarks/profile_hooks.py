"""Capture cost per activation, outside the model: where each method's time goes.

End-to-end ratios on a busy two-core machine move by several percent from round to round; the
capture work itself is a few milliseconds per batch. This script takes the real activations of
one forward pass, then times each method's capture of each one alone, many times, through an
``nn.Identity`` wrapper (so the hook machinery is the real one): fastcap split into its hook
(the kernel writing into the ring, on the forward's critical path) and its ``drain()`` (the
copy out of the ring into the tensor handed to the caller).

    python benchmarks/profile_hooks.py --model torchvision:resnet50 --batch-size 32 --image-size 160
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from fastcap import bench
from fastcap._outputs import first_tensor


def _median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def activations(recipe: dict, layers) -> dict[str, torch.Tensor]:
    """One forward pass's outputs of ``layers`` (cloned), keyed by module name."""
    model, x = bench.build_model(recipe), bench.build_input(recipe)
    keys = bench.resolve_layers(model, layers)
    modules = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda m, i, o, key=key: acts.__setitem__(key, first_tensor(o).detach().clone()))
        for key, name in keys.items()]
    with torch.inference_mode():
        model(x)
    for handle in handles:
        handle.remove()
    return acts


def profile(acts: dict[str, torch.Tensor], reduce: str, k: int, channel_dim: int, repeats: int) -> list[dict]:
    """Milliseconds per activation for each method (median of ``repeats``)."""
    spec = bench.CaptureSpec("0", reduce, k if reduce == "topk" else None, channel_dim)
    rows = []
    with torch.inference_mode():
        for key, a in acts.items():
            wrapper = nn.Sequential(nn.Identity())
            row = {"layer": key, "shape": list(a.shape)}
            for name in ("clone", "torch_reduce", "nonblocking"):
                method = bench.make_method(name, spec)
                method.open(wrapper)
                row[name] = _median_ms(lambda: (method.forward(a), method.finish()), repeats)
                method.close()
            method = bench.make_method("fastcap", spec)
            method.open(wrapper)
            try:
                hook, drain = [], []
                for i in range(repeats + 2):
                    start = time.perf_counter()
                    method.forward(a)
                    mid = time.perf_counter()
                    method.finish()
                    end = time.perf_counter()
                    if i >= 2:
                        hook.append(mid - start)
                        drain.append(end - mid)
            finally:
                method.close()
            row["fastcap hook"] = statistics.median(hook) * 1e3
            row["fastcap drain"] = statistics.median(drain) * 1e3
            row["fastcap"] = row["fastcap hook"] + row["fastcap drain"]
            rows.append(row)
    return rows


COLUMNS = ("clone", "torch_reduce", "nonblocking", "fastcap hook", "fastcap drain", "fastcap")


def markdown(reduce: str, rows: list[dict]) -> str:
    """A table of :func:`profile` rows with a total."""
    total = {c: sum(r[c] for r in rows) for c in COLUMNS}
    lines = [f"| {reduce} layer | shape | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for r in rows + [{"layer": "**total**", "shape": "", **total}]:
        shape = "x".join(map(str, r["shape"])) if r["shape"] else ""
        lines.append(f"| {r['layer']} | {shape} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--layers", default="layer*")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--reduce", default="full,mean,topk", help="comma-separated modes")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--channel-dim", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    recipe = {"model": args.model, "batch": args.batch_size, "shape": [3, args.image_size, args.image_size],
              "device": "cpu"}
    acts = activations(recipe, args.layers)
    env = bench.environment()
    text = [
        f"Capture cost in ms per batch, per layer, outside the model: {args.model}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, CPU ({env['cpu']}, {env['torch_threads']} threads), "
        f"torch {env['torch']}, {env['date']}, load average {env['load_average']}.",
        f"Command: `{env['command']}`",
        "",
        "*fastcap hook*: the hook's kernel writing into the ring (on the forward's critical path); "
        "*fastcap drain*: `drain()` copying the step out of the ring into the tensors it hands out.",
        "",
    ]
    for reduce in args.reduce.split(","):
        text += [markdown(reduce, profile(acts, reduce, args.k, args.channel_dim, args.repeats)), ""]
    out = "\n".join(text)
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
