"""``store.loader`` against raw numpy reads of the same rows, in one process, interleaved rounds.

    .venv/bin/python benchmarks/bench_loader.py            # about a minute on two cores
    .venv/bin/python benchmarks/bench_loader.py --quick    # a smoke run (FASTCAP_BENCH_QUICK=1 too)

Builds a token store with ``fastcap.extract`` (an embedding layer as ``reduce="tokens"``: 512
rows of 128 tokens, width 512, float32, 8 shards: 128 MiB), then times passes over every row
(epochs), each of these ways once per round:

- ``loader``: ``store.loader(batch_size=4096, shuffle=True)`` kept across epochs (``set_epoch``):
  its default deals runs of 64 contiguous 2 KiB rows (128 KiB);
- ``loader_new``: a new loader each epoch, made inside the timing;
- ``loader_run1``: the same with ``run=1``: single rows dealt, scattered over the window;
- ``loader_threads``: ``num_workers=2`` (two reading threads);
- ``raw_chunks``: ``np.load(mmap_mode="r")`` of each shard, 4096-row chunks in a random order,
  each copied out with ``np.array`` (a sequential read);
- ``raw_rows``: the loader's access pattern by hand: every 4096-row batch drawn at random from
  all rows, sorted, gathered shard by shard with ``np.take`` into a new batch;
- ``torch_rows``: the same rows gathered shard by shard with ``torch.index_select`` (on
  torch's intra-op threads) into two batches used in turn: a multi-threaded gather by hand,
  without the loader's bookkeeping;
- ``memcpy``: the same bytes copied from memory in 4096-row pieces into two batches used in
  turn (the loader's steady state): the limit.

Every way is a generator of batches consumed by the same ``for batch in ...: pass`` loop, so the
previous batch is held while the next is read, as in training. Each round runs the ways in a
new random order, each after 64 MiB of other memory traffic (the caches hold nothing of the way
before, as after a training step). Then, in fresh processes, the
first epoch against the second: the loader's and raw_chunks', opening the store or the maps
timed apart. Every file is in the page cache: no disk is timed. GB/s is row bytes over seconds
(1e9); figures are medians over rounds, ratios medians of ratios paired within a round. Writes
``benchmarks/results/cpu-<date>-loader.{json,md}``. No pass/fail.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
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

BATCH = 4096
FULL = {"samples": 512, "context": 128, "width": 512, "shard_size": 64, "rounds": 9, "epochs": 4, "fresh": 5}
QUICK = {"samples": 64, "context": 128, "width": 256, "shard_size": 16, "rounds": 3, "epochs": 1, "fresh": 2}
LABELS = {
    "loader": "fastcap `store.loader`, kept across epochs (`set_epoch`)",
    "loader_new": "fastcap `store.loader`, a new loader per epoch",
    "loader_run1": "fastcap `store.loader(run=1)`: single scattered rows",
    "loader_threads": "fastcap `store.loader(num_workers=2)`: two reading threads",
    "raw_chunks": "raw `np.load(mmap_mode=\"r\")`, permuted 4096-row chunks",
    "raw_rows": "raw memmap, random rows (the loader's pattern, by hand)",
    "torch_rows": "memmap, random rows by `torch.index_select` on torch's threads (by hand)",
    "memcpy": "memcpy of the same bytes (the limit)",
}


class _Embed(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(1000, width)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids)


def build_store(out: str, cfg: dict) -> fastcap.store.Store:
    """The token store: one row per token of ``samples`` rows of ``context`` random ids."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (cfg["samples"], cfg["context"]))
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i])} for i in range(len(ids))]
    return fastcap.extract(_Embed(cfg["width"]).eval(), torch.utils.data.DataLoader(rows, batch_size=32),
                           {"x": "embed"}, "tokens", out=out, channel_dim=-1, shard_size=cfg["shard_size"],
                           tokens=fastcap.Tokens(), progress=False)


def shard_maps(out: str) -> list[np.ndarray]:
    return [np.load(path, mmap_mode="r") for path in sorted(glob.glob(f"{out}/rank-*/shard-*/x.*npy"))]


def raw_chunks(maps: list[np.ndarray], rng: np.random.Generator):
    chunks = [(m, a) for m in maps for a in range(0, len(m), BATCH)]
    for i in rng.permutation(len(chunks)):
        m, a = chunks[i]
        yield np.array(m[a:a + BATCH])


def raw_rows(maps: list[np.ndarray], rng: np.random.Generator):
    starts = np.cumsum([0] + [len(m) for m in maps])
    order = rng.permutation(starts[-1])
    for first in range(0, len(order), BATCH):
        rows = np.sort(order[first:first + BATCH])
        edges = np.searchsorted(rows, starts)
        out = np.empty((len(rows), *maps[0].shape[1:]), maps[0].dtype)
        for shard, m in enumerate(maps):
            a, b = edges[shard], edges[shard + 1]
            if b > a:
                np.take(m, rows[a:b] - starts[shard], axis=0, out=out[a:b], mode="clip")
        yield out


def torch_rows(maps: list[torch.Tensor], rng: np.random.Generator, batches: list[torch.Tensor]):
    starts = np.cumsum([0] + [len(m) for m in maps])
    order = rng.permutation(starts[-1])
    for i, first in enumerate(range(0, len(order), BATCH)):
        rows = np.sort(order[first:first + BATCH])
        edges = np.searchsorted(rows, starts)
        out = batches[i % 2][:len(rows)]
        for shard, m in enumerate(maps):
            a, b = edges[shard], edges[shard + 1]
            if b > a:
                torch.index_select(m, 0, torch.from_numpy(rows[a:b] - starts[shard]), out=out[a:b])
        yield out


def memcpy(source: np.ndarray, batches: list[np.ndarray]):
    for i, first in enumerate(range(0, len(source), BATCH)):
        piece = source[first:first + BATCH]
        out = batches[i % 2][:len(piece)]
        np.copyto(out, piece)
        yield out


def epoch(batches) -> None:
    for _ in batches:  # holds the previous batch while the next is read, as a training loop does
        pass


def child(kind: str, out: str) -> None:
    """One fresh process: the first and second epoch of ``kind``, as JSON on stdout."""
    start = time.perf_counter()
    if kind == "loader":
        data = fastcap.open(out).loader("x", batch_size=BATCH, shuffle=True)
        epochs = [lambda: data, lambda: (data.set_epoch(1), data)[1]]
    else:
        maps, rng = shard_maps(out), np.random.default_rng(0)
        epochs = [lambda: raw_chunks(maps, rng)] * 2
    seconds = [time.perf_counter() - start]
    for batches in epochs:
        start = time.perf_counter()
        epoch(batches())
        seconds.append(time.perf_counter() - start)
    print(json.dumps(dict(zip(["open", "first", "second"], seconds))))


def run(cfg: dict, out: str) -> dict:
    store = build_store(out, cfg)
    nbytes = store["x"].shape[0] * store["x"].dtype.itemsize * int(np.prod(store["x"].row_shape))
    maps = shard_maps(out)
    tensors = [torch.from_numpy(np.load(m.filename, mmap_mode="c")) for m in maps]  # writable: torch wants it
    rng = np.random.default_rng(1)
    source = np.concatenate(maps)
    batches = [np.zeros((BATCH, *store["x"].row_shape), store["x"].dtype) for _ in range(2)]
    kept = store.loader("x", batch_size=BATCH, shuffle=True)
    single = store.loader("x", batch_size=BATCH, shuffle=True, run=1)
    threads = store.loader("x", batch_size=BATCH, shuffle=True, num_workers=2)
    count = [0]

    def with_epoch(data):
        count[0] += 1
        data.set_epoch(count[0])
        return data

    ways = {
        "loader": lambda: epoch(with_epoch(kept)),
        "loader_new": lambda: epoch(store.loader("x", batch_size=BATCH, shuffle=True, seed=count[0] + 1)),
        "loader_run1": lambda: epoch(with_epoch(single)),
        "loader_threads": lambda: epoch(with_epoch(threads)),
        "raw_chunks": lambda: epoch(raw_chunks(maps, rng)),
        "raw_rows": lambda: epoch(raw_rows(maps, rng)),
        "torch_rows": lambda: epoch(torch_rows(tensors, rng, [torch.from_numpy(b) for b in batches])),
        "memcpy": lambda: epoch(memcpy(source, batches)),
    }
    for way in ways.values():  # warm-up: maps faulted in, first allocations made
        way()
    gbps: dict[str, list[float]] = {name: [] for name in ways}
    scratch = np.ones(2**24, np.float32)  # 64 MiB, more than any cache
    order = np.random.default_rng(2)
    for _ in range(cfg["rounds"]):
        for name in order.permutation(list(ways)):  # each way after any other
            scratch += 1  # the caches hold nothing of the way before
            start = time.perf_counter()
            for _ in range(cfg["epochs"]):
                ways[name]()
            gbps[name].append(cfg["epochs"] * nbytes / (time.perf_counter() - start) / 1e9)

    fresh: dict[str, list[dict]] = {"loader": [], "raw_chunks": []}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    for r in range(cfg["fresh"]):
        for kind in (["loader", "raw_chunks"] if r % 2 == 0 else ["raw_chunks", "loader"]):
            done = subprocess.run([sys.executable, __file__, "--child", kind, "--store", out], env=env,
                                  capture_output=True, text=True, check=True)
            fresh[kind].append(json.loads(done.stdout.splitlines()[-1]))

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(gbps[a], gbps[b]))

    first = {kind: {"open_seconds": statistics.median(s["open"] for s in runs),
                    "first_gbps": statistics.median(nbytes / s["first"] / 1e9 for s in runs),
                    "second_gbps": statistics.median(nbytes / s["second"] / 1e9 for s in runs),
                    "first_over_second_time": statistics.median(s["first"] / s["second"] for s in runs)}
             for kind, runs in fresh.items()}
    return {
        "environment": bench.environment(),
        "config": cfg | {"batch_size": BATCH, "run": kept.run, "rows": store["x"].shape[0],
                         "row_bytes": nbytes // store["x"].shape[0],
                         "bytes": nbytes, "shards": len(maps), "dtype": str(store["x"].dtype)},
        "gbps": gbps,
        "median_gbps": {name: statistics.median(values) for name, values in gbps.items()},
        "ratio_to_raw_chunks": {name: paired(name, "raw_chunks") for name in gbps},
        "ratio_to_raw_rows": {name: paired(name, "raw_rows") for name in gbps},
        "fresh_process": first,
        "fresh_process_runs": fresh,
    }


def markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    gpu = f"GPU {env['gpu']}" if env.get("gpu") else "no GPU"
    lines = [
        "# store.loader against raw memmap reads",
        "",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), {gpu}; {env['platform']}; load average at start "
        f"{env['load_average']}. Python {env['python']}, torch {env['torch']}, fastcap {env.get('fastcap')}; "
        f"date {env['date']}.",
        f"Command: `{env['command']}`",
        "",
        f"Store: {cfg['rows']} token rows of {cfg['row_bytes']} bytes ({cfg['dtype']}), {cfg['bytes'] / 2**20:.0f} MiB "
        f"in {cfg['shards']} shards, in the page cache; batch {cfg['batch_size']}, shuffled (the loader's default "
        f"run: {cfg['run']} rows). One epoch reads every "
        f"row once; {cfg['rounds']} interleaved rounds of {cfg['epochs']} epoch(s) each way, in a random order "
        "per round, caches flushed before each. "
        "GB/s: median over rounds; ratios: median of the ratios paired within a round.",
        "",
        "| reader | GB/s | min-max over rounds | x raw chunks | x raw random rows |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in LABELS.items():
        values = result["gbps"][name]
        lines.append(f"| {label} | {result['median_gbps'][name]:.2f} | {min(values):.2f}-{max(values):.2f} "
                     f"| {result['ratio_to_raw_chunks'][name]:.2f} | {result['ratio_to_raw_rows'][name]:.2f} |")
    loader, raw = result["fresh_process"]["loader"], result["fresh_process"]["raw_chunks"]
    lines += [
        "",
        f"First epoch in a fresh process ({cfg['fresh']} processes each, medians): fastcap `store.loader` "
        f"{loader['first_gbps']:.2f} GB/s, then {loader['second_gbps']:.2f} in its second epoch (first / second "
        f"time {loader['first_over_second_time']:.2f}; opening the store and making the loader before it: "
        f"{loader['open_seconds'] * 1e3:.0f} ms); raw permuted chunks {raw['first_gbps']:.2f}, then "
        f"{raw['second_gbps']:.2f} (first / second {raw['first_over_second_time']:.2f}; opening the maps: "
        f"{raw['open_seconds'] * 1e3:.0f} ms).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small store, few rounds (a smoke run)")
    parser.add_argument("--out", default=f"benchmarks/results/cpu-{time.strftime('%Y%m%d')}-loader",
                        help="where to write OUT.json and OUT.md")
    parser.add_argument("--child", choices=["loader", "raw_chunks"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.store)
        return 0
    cfg = QUICK if args.quick or os.environ.get("FASTCAP_BENCH_QUICK") == "1" else FULL
    with tempfile.TemporaryDirectory(prefix="fastcap-bench-loader-") as out:
        result = run(cfg, out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(bench.jsonable(result), indent=2) + "\n")
    text = markdown(result)
    Path(f"{args.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
