"""Language-model extraction end to end: ``fastcap.extract`` of two GPT-2 blocks as
``reduce="tokens"`` (``hf-random:gpt2?n_layer=8``: the causal-LM model with its head, random
weights, nothing downloaded) over packed fake text, against a plain Hugging Face forward loop
over the same batches, in interleaved rounds of one run.

Three ways per round: ``plain`` (``model(**batch)`` for every batch, logits computed and
dropped), ``extract`` (the default: early exit after ``transformer.h.4``, the deeper of the two
captured blocks, writing shards, statistics and the manifest) and ``extract, stop_early=False``
(every block and the head run). The extract times are of the whole ``extract()`` call (setup,
model digest, writer, manifest). ``extra_info`` holds the ratios (median of the paired rounds)
and input tokens per second. No pass/fail timing assertion.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import pytest
import torch
from torch.utils.data import DataLoader

import fastcap
from fastcap import bench
from fastcap.extract import extract_with_stats

transformers = pytest.importorskip("transformers")

MODEL = "hf-random:gpt2?n_layer=8"
LAYERS = {"resid2": "transformer.h.2", "resid4": "transformer.h.4"}
CONFIG = {"cpu": {"batch": 8, "context": 128, "rows": 48, "rounds": 3},
          "cuda": {"batch": 32, "context": 1024, "rows": 256, "rounds": 3}}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
if os.environ.get("FASTCAP_BENCH_QUICK") == "1":  # a smoke run (gpu_check.sh's QUICK=1 dry run)
    CONFIG["cpu"].update(rows=8, context=32, rounds=1)


def _model(device: str) -> torch.nn.Module:
    from fastcap.models import load_model

    torch.manual_seed(0)
    model = load_model(MODEL, device=device)
    return model.to(torch.bfloat16) if device == "cuda" else model


def _data(cfg: dict, vocab: int) -> DataLoader:
    """Packed rows: every token real, BOS first (as ``--data fake-text:N --pack`` gives)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (cfg["rows"], cfg["context"]), generator=g)
    ids[:, 0] = vocab - 1
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i])} for i in range(len(ids))]
    return DataLoader(rows, batch_size=cfg["batch"])


@pytest.mark.parametrize("device", DEVICES)
def test_extract_gpt2_two_blocks_as_tokens_vs_plain_forward(benchmark, device):
    cfg = CONFIG[device]
    model = _model(device)
    data = _data(cfg, model.config.vocab_size)
    tokens = cfg["rows"] * cfg["context"]
    samples = {"plain": [], "extract": [], "extract_full": []}
    last = {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def plain() -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in data:
                model(**{key: value.to(device) for key, value in batch.items()})
        sync()
        return time.perf_counter() - start

    def extract(stop_early: bool) -> float:
        out = tempfile.mkdtemp(prefix="fastcap-bench-lm-")
        try:
            sync()
            start = time.perf_counter()
            store, stats = extract_with_stats(
                model, data, LAYERS, "tokens", out=out, k=None, channel_dim=-1, dtype=None, select=None,
                shard_size=4096, overwrite=True, progress=False, forward=None, depth=4,
                tokens=fastcap.Tokens(), stop_early=stop_early)
            sync()
            seconds = time.perf_counter() - start
            assert store.complete and len(store["resid4"]) == tokens
            last[stop_early] = stats
            return seconds
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def run_rounds():
        plain()  # warm-up
        extract(True)
        for r in range(cfg["rounds"]):
            ways = ["plain", "extract", "extract_full"]
            for name in ways[r % 3:] + ways[:r % 3]:  # rotate who goes first
                samples[name].append(plain() if name == "plain" else extract(name == "extract"))

    benchmark.group = f"{device} extract gpt2 tokens"
    benchmark.pedantic(run_rounds, rounds=1, iterations=1)
    ratio = statistics.median(e / p for e, p in zip(samples["extract"], samples["plain"]))
    ratio_full = statistics.median(e / p for e, p in zip(samples["extract_full"], samples["plain"]))
    per_s = {name: tokens / statistics.median(values) for name, values in samples.items()}
    stats = last[True]
    info = {"kind": "extract_lm", "device": device, "model": MODEL + (" (bfloat16)" if device == "cuda" else ""),
            "layers": LAYERS, **cfg, "input_tokens_per_round": tokens, "seconds": samples,
            "ratio_vs_plain": ratio, "ratio_full_vs_plain": ratio_full, "tokens_per_s": per_s,
            "bytes_written": stats["bytes_written"], "estimated_bytes": stats["estimated_bytes"],
            "forward_wait_seconds": stats["stall_seconds"]}
    benchmark.extra_info.update(bench.jsonable(info))
    print(f"\n{device}: {MODEL}, {cfg['rows']} rows x {cfg['context']} tokens, 2 blocks as tokens: extract / plain "
          f"forward = {ratio:.3f} (stop_early=False: {ratio_full:.3f}); tokens/s plain {per_s['plain']:,.0f}, "
          f"extract {per_s['extract']:,.0f}, extract without early exit {per_s['extract_full']:,.0f}")
