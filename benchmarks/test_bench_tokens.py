"""Language-model capture cost: a random-weight GPT-2 (the 124M configuration, nothing
downloaded), two residual streams captured as ``reduce="tokens"`` with ``fastcap.Tokens()``,
against the plain forward of the same padded batches, in interleaved rounds of one run.

``extra_info`` holds the ratio (capture time over the plain forward's, median of the paired
rounds) and the kept tokens per second. No pass/fail timing assertion. On CUDA (when torch
sees one) the model runs in bfloat16.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

import fastcap
from fastcap import bench

transformers = pytest.importorskip("transformers")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYERS = {"resid4": "h.4", "resid8": "h.8"}
CONFIG = {"cpu": {"batch": 8, "seq": 128, "rounds": 5, "batches": 2},
          "cuda": {"batch": 64, "seq": 512, "rounds": 7, "batches": 5}}


def _batches(device: str, batch: int, seq: int, count: int):
    """Right-padded batches: lengths spread over [seq/2, seq], attention_mask built."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
        ids = torch.randint(0, 50257, (batch, seq), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(torch.int64)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_gpt2_two_residual_layers_as_tokens(benchmark, device):
    cfg = CONFIG[device]
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config()).eval().to(device)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    batches = _batches(device, cfg["batch"], cfg["seq"], cfg["batches"])
    kept = int(sum(b["attention_mask"].sum() for b in batches))
    tokens = fastcap.Tokens()

    def plain():
        _sync(device)
        start = time.perf_counter()
        for b in batches:
            model(**b)
        _sync(device)
        return time.perf_counter() - start

    def captured():
        with fastcap.capture(model, LAYERS, "tokens", tokens=tokens) as cap:
            model(**batches[0])  # the rings' first allocation is not timed
            list(cap.drain())
            _sync(device)
            start = time.perf_counter()
            rows = 0
            for b in batches:
                model(**b)
                rows += sum(len(step["resid4"]) for step in cap.drain())
            rows += sum(len(step["resid4"]) for step in cap.drain())  # waits for the last copies
            seconds = time.perf_counter() - start
            stats = cap.stats()
        assert rows == kept
        return seconds, stats

    samples = {"plain": [], "fastcap": []}
    last_stats = {}

    def run_rounds():
        with torch.inference_mode():
            plain()  # warm-up
            for r in range(cfg["rounds"]):
                order = ("plain", "fastcap") if r % 2 == 0 else ("fastcap", "plain")
                for name in order:
                    if name == "plain":
                        samples["plain"].append(plain())
                    else:
                        seconds, stats = captured()
                        samples["fastcap"].append(seconds)
                        last_stats.update(stats)

    benchmark.group = f"{device} gpt2 tokens"
    benchmark.pedantic(run_rounds, rounds=1, iterations=1)
    ratio = statistics.median(f / p for f, p in zip(samples["fastcap"], samples["plain"]))
    fast = statistics.median(samples["fastcap"])
    info = {"kind": "tokens", "device": device, "model": "gpt2 (124M config, random weights)",
            "dtype": "bfloat16" if device == "cuda" else "float32", "layers": LAYERS, **cfg,
            "kept_tokens_per_round": kept, "plain_seconds": samples["plain"], "fastcap_seconds": samples["fastcap"],
            "ratio_vs_plain": ratio, "tokens_per_s": kept / fast,
            "plain_tokens_per_s": kept / statistics.median(samples["plain"]),
            "forward_wait_seconds": last_stats.get("forward_wait_seconds"),
            "materializations_on_forward": last_stats.get("materializations_on_forward")}
    benchmark.extra_info.update(bench.jsonable(info))
    print(f"\n{device}: GPT-2 124M, batch {cfg['batch']} x {cfg['seq']} (right-padded), 2 layers as tokens: "
          f"fastcap / plain forward = {ratio:.3f}, {kept / fast:,.0f} kept tokens/s "
          f"(plain {kept / statistics.median(samples['plain']):,.0f})")
