"""Language-model extraction with early exit: ``fastcap.extract`` against the hand-written loop.

    .venv/bin/python benchmarks/bench_extract_lm.py [--rounds 15] [--quick] [--out benchmarks/results/NAME.json]

Model: a seeded random GPT-2 causal LM with its head (``GPT2LMHeadModel``, 8 blocks, width 512,
8 heads, vocabulary 50257, 128 positions; ``torch.manual_seed(0)``), eval, float32, CPU, two
torch threads. Data: 64 packed rows of 128 tokens (seeded random ids, BOS = ``vocab - 1`` at
position 0 and nowhere else, attention mask all ones) in a ``DataLoader`` of dicts
``{input_ids, attention_mask}`` at batch 8. Captured: the residual stream after blocks 2 and 4
(``transformer.h.2``, ``transformer.h.4``: the block's output tensor, or the first tensor when
it returns a tuple), every token but BOS, written to disk. Three methods:

- ``plain``: the Hugging Face forward over every batch under ``torch.inference_mode()``,
  nothing captured (logits computed and dropped): the baseline;
- ``hand_exit``: the loop one writes by hand: forward hooks on ``h.2`` and ``h.4`` keeping
  ``out.detach()[:, 1:].reshape(-1, 512).clone()``, the hook on ``h.4`` raising a private
  exception after keeping (caught around ``model(**batch)``: blocks 5-7 and the head never
  run); at the end each layer's rows are concatenated and written with ``np.save`` into a
  temporary directory;
- ``fastcap``: ``fastcap.extract(model, loader, {"resid2": ..., "resid4": ...}, "tokens",
  tokens=fastcap.Tokens(skip_ids=[BOS]), out=<a fresh temporary directory>, progress=False)``
  with the default ``stop_early=True``: the whole call is timed (set-up, model digest, writer
  thread, shards, statistics, manifest).

Before any timing, one run of each is checked: fastcap's stored rows (``fastcap.open(out)[key][:]``)
must equal the hand loop's bit for bit, and Hugging Face's ``output_hidden_states`` (entries 3
and 5, BOS dropped; taken from ``model.transformer``, which computes them without the head)
within 1e-5; the benchmark fails loudly otherwise. Then ``--rounds`` rounds (default 15), each
running every method once over all the data, in a new random order per round (the six orders
drawn without replacement), all in this process. Times: medians over rounds; ratios: medians
of the ratios paired within a round.

Peak RSS over the model: each method in a fresh process (peak RSS is a process-lifetime
figure; ``--peak METHOD``), five times each, in a random order: the process builds the model,
resets its peak RSS to the current RSS (``5`` into ``/proc/self/clear_refs``: building the
random model peaks about 0.5 GiB above what it keeps, which would otherwise be every method's
peak), reads its RSS (``VmRSS``), runs the method once over the data and reports its peak RSS
(``VmHWM``) minus the RSS after building; the median of the five runs (glibc and torch make a run's peak vary by up to 2x: 115-250 MiB seen for one method). ``VmHWM``, not
``ru_maxrss``: ``getrusage`` also takes the maximum with the process's ``signal->maxrss``, which
``exec`` sets from the spawning process's memory (this 1.4 GiB benchmark, through ``vfork``) and
every exiting thread from the peak before the reset, so in a child of a large process it reads
the parent's peak whatever the child does (recorded in the JSON as ``ru_maxrss_kib``). Without
``clear_refs`` the figures fall back to ``ru_maxrss`` and are flagged.

Live-memory peak: two more fresh-process runs per method with ``MALLOC_MMAP_THRESHOLD_=131072``
(glibc's mmap threshold fixed: every block of 128 KiB or more mapped at malloc and unmapped at
free), whose peak is that of the memory in use and repeats from run to run; with the default
dynamic threshold the heap keeps freed activations in holes by chance, for fastcap and for the
hand loop alike.

The team's target (reported, not asserted): fastcap at most 1.05x the hand loop's time and at
most 1.2x its peak RSS over the model. ``--quick``: 1 round of 16 rows, one peak run each (a
smoke run). Writes ``--out`` (JSON: every round, every peak run, fastcap's run statistics) and
the same name with ``.md`` (the table, the machine, the command), and prints the markdown.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fastcap
from fastcap import bench

LAYERS = {"resid2": "transformer.h.2", "resid4": "transformer.h.4"}
HIDDEN_INDEX = {"resid2": 3, "resid4": 5}  # hidden_states[i + 1] is block i's output
CONFIG = {"n_layer": 8, "n_embd": 512, "n_head": 8, "vocab_size": 50257, "n_positions": 128}
FULL = {"rows": 64, "context": 128, "batch": 8, "rounds": 15, "peak_runs": 5}
QUICK = {"rows": 16, "context": 128, "batch": 8, "rounds": 1, "peak_runs": 1}
METHODS = ("plain", "hand_exit", "fastcap")
BOS = CONFIG["vocab_size"] - 1
THREADS = 2
TIME_TARGET, RSS_TARGET = 1.05, 1.2
LABELS = {
    "plain": "plain HF forward, nothing captured",
    "hand_exit": "hand-written hooks + early-exit exception + `np.save`",
    "fastcap": "`fastcap.extract` (tokens, skip BOS, `stop_early=True`)",
}


# ------------------------------------------------------------------ model and data


def build_model() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).eval()


def build_loader(cfg: dict) -> torch.utils.data.DataLoader:
    """Packed rows: every token real, BOS at position 0 only (the other ids are below BOS, so
    skipping BOS by id and dropping position 0 keep the same tokens)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, BOS, (cfg["rows"], cfg["context"]), generator=g)
    ids[:, 0] = BOS
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i])} for i in range(len(ids))]
    return torch.utils.data.DataLoader(rows, batch_size=cfg["batch"])


# ------------------------------------------------------------------ the three methods


def run_plain(model, loader, out: str | None = None) -> None:
    with torch.inference_mode():
        for batch in loader:
            model(**batch)


class _Stop(Exception):
    """Raised by the deepest hook: the rest of the forward is not needed."""


def run_hand_exit(model, loader, out: str) -> dict[str, str]:
    modules = dict(model.named_modules())
    kept: dict[str, list[torch.Tensor]] = {key: [] for key in LAYERS}
    last = list(LAYERS)[-1]

    def hook_for(key: str):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # transformers 5 returns a tensor
            kept[key].append(hidden.detach()[:, 1:].reshape(-1, hidden.shape[-1]).clone())
            if key == last:
                raise _Stop
        return hook

    handles = [modules[name].register_forward_hook(hook_for(key)) for key, name in LAYERS.items()]
    try:
        with torch.inference_mode():
            for batch in loader:
                try:
                    model(**batch)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    paths = {}
    for key, rows in kept.items():
        paths[key] = os.path.join(out, f"{key}.npy")
        np.save(paths[key], torch.cat(rows).numpy())
    return paths


def fastcap_tokens() -> "fastcap.Tokens":
    return fastcap.Tokens(mask="attention_mask", ids="input_ids", skip_ids=[BOS])


def run_fastcap(model, loader, out: str):
    return fastcap.extract(model, loader, LAYERS, "tokens", out=out, tokens=fastcap_tokens(), progress=False)


RUN = {"plain": run_plain, "hand_exit": run_hand_exit, "fastcap": run_fastcap}


def timed(method: str, model, loader) -> float:
    out = tempfile.mkdtemp(prefix=f"fastcap-bench-lm-{method}-")
    gc.collect()
    try:
        start = time.perf_counter()
        RUN[method](model, loader, out)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------ the check


def check(model, loader) -> dict:
    """One run of hand_exit and fastcap against each other (bit for bit) and against Hugging
    Face's hidden states (within 1e-5). Raises AssertionError on any difference. Returns
    fastcap's run statistics (``extract_with_stats``) when that function takes these arguments."""
    hand_dir = tempfile.mkdtemp(prefix="fastcap-bench-lm-check-hand-")
    fc_dir = tempfile.mkdtemp(prefix="fastcap-bench-lm-check-fastcap-")
    try:
        hand = {key: torch.from_numpy(np.load(path)) for key, path in run_hand_exit(model, loader, hand_dir).items()}
        stats = None
        try:
            from fastcap.extract import extract_with_stats

            _, stats = extract_with_stats(
                model, loader, LAYERS, "tokens", out=fc_dir, k=None, channel_dim=1, dtype=None, select=None,
                shard_size=4096, overwrite=False, progress=False, forward=None, depth=4, tokens=fastcap_tokens(),
                stop_early=True)
        except TypeError as error:  # its signature changed: the public call is what is timed anyway
            print(f"note: extract_with_stats not usable ({error}); checking fastcap.extract without statistics",
                  file=sys.stderr)
            shutil.rmtree(fc_dir, ignore_errors=True)
            run_fastcap(model, loader, fc_dir)
        store = fastcap.open(fc_dir)
        assert store.complete, "fastcap's store is not complete"
        ours = {key: torch.from_numpy(np.ascontiguousarray(store[key][:])) for key in LAYERS}
        with torch.inference_mode():
            reference = {key: [] for key in LAYERS}
            for batch in loader:
                hidden = model.transformer(**batch, output_hidden_states=True).hidden_states
                for key, index in HIDDEN_INDEX.items():
                    reference[key].append(hidden[index][:, 1:].reshape(-1, CONFIG["n_embd"]))
            reference = {key: torch.cat(rows) for key, rows in reference.items()}
        found = {}
        for key in LAYERS:
            a, b, r = ours[key], hand[key], reference[key]
            assert a.shape == b.shape == r.shape, f"{key}: shapes fastcap {tuple(a.shape)}, hand_exit " \
                                                  f"{tuple(b.shape)}, HF hidden states {tuple(r.shape)}"
            assert a.dtype == b.dtype == torch.float32, f"{key}: dtypes {a.dtype}, {b.dtype}"
            assert torch.equal(a, b), f"{key}: fastcap's rows differ from hand_exit's " \
                                      f"(max |diff| {(a - b).abs().max().item():.3g})"
            diff = (a - r).abs().max().item()
            assert diff <= 1e-5, f"{key}: fastcap's rows differ from HF's hidden states by {diff:.3g} > 1e-5"
            found[key] = {"rows": a.shape[0], "width": a.shape[1], "equal_hand_exit": True, "max_abs_diff_hf": diff}
        positions = np.asarray(store.tokens.position)
        assert (positions >= 1).all(), "fastcap kept a BOS position"
        return {"layers": found, "extract_stats": stats}
    finally:
        shutil.rmtree(hand_dir, ignore_errors=True)
        shutil.rmtree(fc_dir, ignore_errors=True)


# ------------------------------------------------------------------ peak RSS, in a fresh process


def proc_status_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since start or the last reset), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Set the peak RSS (``VmHWM``) to the current RSS: ``5`` into ``clear_refs``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_child(method: str, cfg: dict) -> None:
    """Build the model, run ``method`` once over the data, print the figures as JSON."""
    import tqdm.auto  # noqa: F401  (fastcap imports it at run time: not counted against it)

    torch.set_num_threads(THREADS)
    model = build_model()
    loader = build_loader(cfg)
    out = tempfile.mkdtemp(prefix=f"fastcap-bench-lm-peak-{method}-")
    try:
        gc.collect()
        # Building the model peaks about 0.5 GiB above what it keeps (its random initialisation):
        # reset the process's peak (VmHWM) to the RSS now, or every method would report the
        # build's peak. Linux >= 4.0; without it the figures fall back to ru_maxrss, flagged.
        reset = reset_peak_rss()
        after_model = proc_status_kib("VmRSS")
        hwm_before = proc_status_kib("VmHWM")
        start = time.perf_counter()
        RUN[method](model, loader, out)
        seconds = time.perf_counter() - start
        hwm = proc_status_kib("VmHWM")
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"method": method, "peak_reset": reset, "rss_after_model_kib": after_model,
                      "vmhwm_before_run_kib": hwm_before, "vmhwm_kib": hwm, "ru_maxrss_kib": maxrss,
                      "over_model_mib": ((hwm if reset else maxrss) - after_model) / 1024, "seconds": seconds}))


#: glibc's mmap threshold fixed at its initial 128 KiB (its dynamic raise off): every block of
#: that size or more is mapped at malloc and unmapped at free, so the peak RSS is the peak of
#: live memory, the same in every run, rather than what the heap happened to keep
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_runs(cfg: dict, quick: bool, order: random.Random, extra_env: dict | None = None,
              count: int | None = None) -> dict[str, list[dict]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]), **(extra_env or {}))
    runs: dict[str, list[dict]] = {method: [] for method in METHODS}
    for _ in range(cfg["peak_runs"] if count is None else count):
        for method in order.sample(METHODS, len(METHODS)):
            command = [sys.executable, __file__, "--peak", method] + (["--quick"] if quick else [])
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"peak run of {method} failed ({done.returncode}):\n{done.stderr[-4000:]}")
            runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  peak {method}: {runs[method][-1]['over_model_mib']:.1f} MiB over the model", file=sys.stderr)
    return runs


# ------------------------------------------------------------------ the run and its report


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+" if dirty else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def run(cfg: dict, quick: bool) -> dict:
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    environment = bench.environment()
    environment["commit"] = git_commit()
    model = build_model()
    loader = build_loader(cfg)
    print(f"checking fastcap against hand_exit and HF hidden states ({cfg['rows']} rows)...", file=sys.stderr)
    checked = check(model, loader)
    with torch.inference_mode():  # warm-up of the head (the check ran everything else)
        model(**next(iter(loader)))

    order = random.Random(0)
    seconds: dict[str, list[float]] = {method: [] for method in METHODS}
    orders, pool = [], []
    for r in range(cfg["rounds"]):
        if not pool:  # each of the 6 orders once, shuffled, before any comes again: no method always first
            pool = [list(p) for p in itertools.permutations(METHODS)]
            order.shuffle(pool)
        methods = pool.pop()
        orders.append(methods)
        for method in methods:
            seconds[method].append(timed(method, model, loader))
        print(f"round {r + 1}/{cfg['rounds']}: " + ", ".join(f"{m} {seconds[m][-1]:.2f} s" for m in methods),
              file=sys.stderr)
    del model

    print("peak RSS, each method in fresh processes...", file=sys.stderr)
    peaks = peak_runs(cfg, quick, order)
    print("peak RSS of live memory (glibc's mmap threshold fixed), fresh processes...", file=sys.stderr)
    live = peak_runs(cfg, quick, order, LIVE_MEMORY_ENV, count=min(cfg["peak_runs"], 2))

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

    valid = all(r["peak_reset"] and r["vmhwm_before_run_kib"] <= r["rss_after_model_kib"] + 1024
                for runs in peaks.values() for r in runs)
    peak_mib = {method: statistics.median(r["over_model_mib"] for r in runs) for method, runs in peaks.items()}
    time_ratio = paired("fastcap", "hand_exit")
    rss_ratio = peak_mib["fastcap"] / peak_mib["hand_exit"] if peak_mib["hand_exit"] > 0 else None
    live_mib = {method: statistics.median(r["over_model_mib"] for r in runs) for method, runs in live.items()}
    live_ratio = live_mib["fastcap"] / live_mib["hand_exit"] if live_mib["hand_exit"] > 0 else None
    tokens = cfg["rows"] * cfg["context"]
    return {
        "environment": environment,
        "config": cfg | {"model": "transformers.GPT2LMHeadModel", "gpt2_config": CONFIG, "dtype": "float32",
                         "device": "cpu", "threads": THREADS, "layers": LAYERS, "bos": BOS,
                         "input_tokens": tokens, "kept_rows_per_layer": cfg["rows"] * (cfg["context"] - 1)},
        "check": checked,
        "orders": orders,
        "seconds": seconds,
        "median_seconds": {m: statistics.median(v) for m, v in seconds.items()},
        "ratio_to_plain": {m: paired(m, "plain") for m in METHODS},
        "fastcap_over_hand_exit_time": time_ratio,
        "fastcap_over_hand_exit_time_per_round": [f / h for f, h in zip(seconds["fastcap"], seconds["hand_exit"])],
        "peak_runs": peaks,
        "peak_over_model_mib": peak_mib,
        "peak_reset_valid": valid,
        "fastcap_over_hand_exit_peak_rss": rss_ratio,
        "live_memory_env": LIVE_MEMORY_ENV,
        "peak_live_runs": live,
        "peak_live_over_model_mib": live_mib,
        "fastcap_over_hand_exit_peak_live": live_ratio,
        "targets": {"time": TIME_TARGET, "peak_rss": RSS_TARGET,
                    "time_met": time_ratio <= TIME_TARGET,
                    "peak_rss_met": rss_ratio is not None and rss_ratio <= RSS_TARGET,
                    "peak_live_met": live_ratio is not None and live_ratio <= RSS_TARGET},
        "wall_seconds": time.perf_counter() - started,
    }


def markdown(result: dict) -> str:
    env, cfg, t = result["environment"], result["config"], result["targets"]
    gpu = f"GPU {env['gpu']}" if env.get("gpu") else "no GPU"
    plain = result["seconds"]["plain"]
    lines = [
        "# Language-model extraction with early exit: fastcap against the hand-written loop",
        "",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores, {cfg['threads']} torch threads), {gpu}; "
        f"{env['platform']}; load average at start {env['load_average']}. Python {env['python']}, "
        f"torch {env['torch']}, fastcap {env.get('fastcap')}, commit {env.get('commit')}; date {env['date']}.",
        f"Command: `{env['command']}`",
        "",
        f"Model: random GPT-2 LM with head ({cfg['gpt2_config']['n_layer']} blocks, width "
        f"{cfg['gpt2_config']['n_embd']}, vocabulary {cfg['gpt2_config']['vocab_size']}), float32, CPU. Data: "
        f"{cfg['rows']} packed rows x {cfg['context']} tokens, batch {cfg['batch']}, BOS at position 0. Captured: "
        f"`transformer.h.2`, `transformer.h.4`, every token but BOS ({cfg['kept_rows_per_layer']} rows x "
        f"{cfg['gpt2_config']['n_embd']} per layer), written to disk. {cfg['rounds']} interleaved rounds in a random "
        "order each; seconds: median over rounds; ratios: median of the ratios paired within a round. Peak RSS over "
        "the model: `VmHWM` at the end minus `VmRSS` after building the model (the peak reset to it then "
        "through `/proc/self/clear_refs`: the build's own transient peak excluded; `ru_maxrss` is not used, as "
        "in a child of this large process it reads the parent's peak), in a fresh process per run, median of "
        f"{cfg['peak_runs']} run(s). Check before timing: fastcap's rows equal hand_exit's bit for bit, HF's "
        "hidden states within "
        + ", ".join(f"{v['max_abs_diff_hf']:.1g} ({k})" for k, v in result["check"]["layers"].items()) + ".",
        "",
        "| method | seconds | min-max | x plain forward | peak RSS over model (MiB) | live-memory peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        values = result["seconds"][method]
        runs = ", ".join(f"{r['over_model_mib']:.0f}" for r in result["peak_runs"][method])
        live_runs = ", ".join(f"{r['over_model_mib']:.0f}" for r in result["peak_live_runs"][method])
        lines.append(f"| `{method}`: {LABELS[method]} | {result['median_seconds'][method]:.2f} | "
                     f"{min(values):.2f}-{max(values):.2f} | {result['ratio_to_plain'][method]:.3f} | "
                     f"{result['peak_over_model_mib'][method]:.1f} ({runs}) | "
                     f"{result['peak_live_over_model_mib'][method]:.1f} ({live_runs}) |")
    rss, live = result["fastcap_over_hand_exit_peak_rss"], result["fastcap_over_hand_exit_peak_live"]
    lines += [
        "",
        f"fastcap / hand_exit: time **{result['fastcap_over_hand_exit_time']:.3f}** (target <= {t['time']}: "
        f"{'met' if t['time_met'] else 'NOT met'}; per round "
        + ", ".join(f"{x:.3f}" for x in result["fastcap_over_hand_exit_time_per_round"])
        + f"), peak RSS over the model **{'-' if rss is None else f'{rss:.2f}'}** (target <= {t['peak_rss']}: "
        f"{'met' if t['peak_rss_met'] else 'NOT met'}), live-memory peak **{'-' if live is None else f'{live:.2f}'}** "
        f"({'met' if t['peak_live_met'] else 'NOT met'}).",
        "Live-memory peak: the same fresh-process runs with glibc's mmap threshold fixed at 128 KiB "
        f"(`{' '.join(f'{k}={v}' for k, v in result['live_memory_env'].items())}`): every block of 128 KiB or more "
        "is mapped at malloc and unmapped at free, so the peak is that of the memory in use, the same in every run. "
        "With the default (dynamic) threshold, the heap keeps freed activations in holes, by chance: a plain "
        "forward loop with an exception exit, no hooks at all, ended with 4 or 106 MiB free in its heap in two "
        "runs of the same script.",
        *([] if result["peak_reset_valid"] else [
            "**Peak RSS figures are not valid**: the peak could not be reset after building the model (no "
            "`/proc/self/clear_refs`): they are `ru_maxrss`, which the build's or the parent's peak may hide "
            "(see `peak_runs` in the JSON)."]),
        f"Noise: the plain forward ranged {min(plain):.2f}-{max(plain):.2f} s over rounds "
        f"({(max(plain) / min(plain) - 1) * 100:.1f}%).",
    ]
    stats = result["check"].get("extract_stats")
    if stats:
        cap = stats.get("capture") or {}
        lines.append(
            f"fastcap's run statistics (the check run): {stats.get('samples')} samples, {stats.get('kept_tokens')} "
            f"kept token rows, {stats.get('bytes_written', 0) / 2**20:.1f} MiB written (estimated "
            f"{(stats.get('estimated_bytes') or 0) / 2**20:.1f}), {stats.get('shards_written')} shard(s), forward "
            f"waited {stats.get('stall_seconds', 0):.3f} s for a slot, at most {stats.get('max_pending_steps')} "
            f"step(s) pending" + (f"; capture: {json.dumps(bench.jsonable(cap))}" if cap else "") + ".")
    lines += [f"Whole benchmark: {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 15; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="1 round of 16 rows, one peak run each (a smoke run)")
    parser.add_argument("--out", default=f"benchmarks/results/cpu-{time.strftime('%Y%m%d')}-extract-early-exit.json",
                        help="the JSON to write; the markdown goes beside it (.md)")
    parser.add_argument("--peak", choices=METHODS, help=argparse.SUPPRESS)  # a fresh process's peak RSS run
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("FASTCAP_BENCH_QUICK") == "1"
    cfg = dict(QUICK if quick else FULL)
    if args.peak:
        peak_child(args.peak, cfg)
        return 0
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        cfg["rounds"] = args.rounds
    result = run(cfg, quick)
    out = Path(args.out)
    out = out if out.suffix == ".json" else out.with_name(out.name + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench.jsonable(result), indent=2) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
