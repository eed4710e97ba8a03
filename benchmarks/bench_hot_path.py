"""The per-activation cost of capturing, against the Python hook fastcap replaces.

Three cases, every method interleaved in one process, rounds in a new random order each; each
figure is the median over rounds of that round's figure against the same round's plain forward
(paired: the machine's speed drifts between rounds):

- ``mlp``: 24 x ``Linear(64, 64)`` at batch 4 on one thread, every layer captured: the added cost
  per hook (``(forward with capture - plain forward) / 24``) of fastcap's default capture
  (``collect=True``), of ``collect=False`` drained after each forward, and of the Python hook
  doing the same work (``out.detach().clone()`` for ``full``; ``out.float().mean(...).cpu()``
  for ``mean``), each keeping what it captured, as ``result()`` does;
- ``gpt2``: a 12-block GPT-2 (n_embd 256, random weights) at batch 1 x 32 tokens on two threads,
  all 12 blocks ``full``: the forward's time over the plain forward's;
- ``gpt2_1thread``: the same on one thread (a core left free for fastcap's collector);
- ``resnet50``: ResNet-50 at batch 32, 160x160, ``layer1..layer4`` ``mean``: the same ratio.

    python benchmarks/bench_hot_path.py [--rounds 15] [--quick] [--out benchmarks/results/NAME.json]

Writes a JSON (every round's figures and the medians) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fastcap


# ------------------------------------------------------------------ methods: open, run, close


class Plain:
    """No capture: the baseline."""

    def __init__(self, model, layers, reduce, channel_dim):
        self.model = model

    def __enter__(self):
        return self

    def step(self, x):
        self.model(x)

    def __exit__(self, *exc):
        return False


class PythonHook(Plain):
    """The snippet: a forward hook per layer keeping a copy (or the reduction, on the host)."""

    def __init__(self, model, layers, reduce, channel_dim):
        super().__init__(model, layers, reduce, channel_dim)
        self.modules = [dict(model.named_modules())[name] for name in layers]
        self.reduce, self.channel_dim, self.kept = reduce, channel_dim, []

    def _hook(self, module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        if self.reduce == "full":
            self.kept.append(out.detach().clone())
        else:
            cd = self.channel_dim % out.dim()
            dims = [d for d in range(1, out.dim()) if d != cd]
            self.kept.append(out.detach().float().mean(dims).cpu() if dims else out.detach().float().cpu())

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


class Fastcap(Plain):
    def __init__(self, model, layers, reduce, channel_dim, collect=True):
        super().__init__(model, layers, reduce, channel_dim)
        self.cap = fastcap.capture(model, layers, reduce, channel_dim=channel_dim, collect=collect)
        self.collect, self.kept = collect, []

    def __enter__(self):
        self.cap.__enter__()
        return self

    def step(self, x):
        self.model(x)
        if not self.collect:
            self.kept.extend(self.cap.drain())

    def __exit__(self, *exc):
        self.cap.__exit__(*exc)
        if self.collect:
            self.cap.result()
        return False


def fastcap_nocollect(*args):
    return Fastcap(*args, collect=False)


METHODS = {"plain": Plain, "python_hook": PythonHook, "fastcap": Fastcap, "fastcap_collect_false": fastcap_nocollect}


# ------------------------------------------------------------------ cases


def mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(24)]).eval()
    return model, torch.randn(4, 64), [str(i) for i in range(24)], 1, 1


def gpt2_case():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=256, n_head=4, vocab_size=1024, n_positions=64)
    model = transformers.GPT2Model(config).eval()
    return model, torch.randint(0, 1024, (1, 32)), [f"h.{i}" for i in range(12)], -1, 2


def gpt2_one_thread_case():
    """The GPT-2 case with one intra-op thread: a core left free for the collector."""
    model, x, layers, channel_dim, _ = gpt2_case()
    return model, x, layers, channel_dim, 1


def resnet50_case():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    return model, torch.randn(32, 3, 160, 160), ["layer1", "layer2", "layer3", "layer4"], 1, 2


CASES = {
    # name: (builder, reduce modes, methods, forwards per round)
    "mlp": (mlp_case, ("full", "mean"), ("plain", "python_hook", "fastcap", "fastcap_collect_false"), 200),
    "gpt2": (gpt2_case, ("full",), ("plain", "python_hook", "fastcap", "fastcap_collect_false"), 30),
    "gpt2_1thread": (gpt2_one_thread_case, ("full",), ("plain", "python_hook", "fastcap", "fastcap_collect_false"), 30),
    "resnet50": (resnet50_case, ("mean",), ("plain", "python_hook", "fastcap"), 3),
}


def time_method(method, x, forwards: int) -> float:
    """Seconds per forward of ``forwards`` forwards (after one untimed), the capture's set-up and
    hand-off (``result()``) included in neither."""
    with torch.inference_mode(), method:
        method.step(x)
        start = time.perf_counter()
        for _ in range(forwards):
            method.step(x)
        return (time.perf_counter() - start) / forwards


def run_case(name: str, rounds: int, quick: bool) -> dict:
    build, modes, methods, forwards = CASES[name]
    model, x, layers, channel_dim, threads = build()
    if quick:
        forwards = max(1, forwards // 10)
    torch.set_num_threads(threads)
    result = {"case": name, "layers": len(layers), "threads": threads, "forwards_per_round": forwards, "modes": {}}
    for mode in modes:
        times = {m: [] for m in methods}
        for _ in range(rounds):
            order = list(methods)
            random.shuffle(order)
            for m in order:
                times[m].append(time_method(METHODS[m](model, layers, mode, channel_dim), x, forwards))
        med = {m: statistics.median(t) for m, t in times.items()}
        # Paired within a round (the machine's speed drifts between rounds): the median over
        # rounds of each round's ratio and added time.
        plain = times["plain"]
        entry = {"seconds_per_forward": med, "rounds": times,
                 "ratio_to_plain": {m: statistics.median(t / p for t, p in zip(times[m], plain)) for m in methods}}
        entry["added_us_per_hook"] = {
            m: statistics.median((t - p) / len(layers) * 1e6 for t, p in zip(times[m], plain))
            for m in methods if m != "plain"}
        result["modes"][mode] = entry
    return result


def table(results: list[dict]) -> str:
    lines = ["| case | mode | method | time / plain forward | added per hook (µs) |", "|---|---|---|---|---|"]
    for r in results:
        for mode, e in r["modes"].items():
            for m, ratio in e["ratio_to_plain"].items():
                added = e["added_us_per_hook"].get(m)
                lines.append(f"| {r['case']} ({r['layers']} layers, {r['threads']} thread(s)) | {mode} | {m} | "
                             f"{ratio:.3f} | {'' if added is None else f'{added:.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quick", action="store_true", help="a tenth of the forwards, 2 rounds: a smoke run")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    random.seed(0)
    results = [run_case(name, rounds, args.quick) for name in args.cases.split(",")]
    report = {"machine": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
              "torch": torch.__version__, "fastcap": fastcap.__version__,
              "date": time.strftime("%Y-%m-%d"), "rounds": rounds, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
