"""The GPU check's summary table, from the JSONs ``fastcap bench`` and the token benchmark wrote.

    python benchmarks/gpu_report.py OUT_DIR       # reads OUT_DIR/resnet50-{full,growth,mean,topk}.json
                                                  # and OUT_DIR/{tokens,extract_lm}.json, prints markdown

Per reduce mode: images/s with no capture (T0), fastcap's and the pure-Python hook doing the
same work (clone for full, reduce + .cpu() for mean/topk) with their ratio to T0; device
memory above the no-capture peak, and after the last memory-growth checkpoint (resnet50-growth.json,
the full-capture growth run, when the mode's own JSON has none; gpu_check.sh: 20 batches);
fastcap's D2H GB/s against a raw pinned-copy probe of the same bytes; and, when the token
benchmark ran, GPT-2's kept tokens/s as reduce="tokens" against a plain forward. Runs on any
machine (a CPU run gives the same table with the GPU columns empty).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SAME_WORK = {"full": "clone", "mean": "torch_reduce", "topk": "torch_reduce"}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def resnet_rows(out: str) -> list[str]:
    rows = []
    growth_run = _load(os.path.join(out, "resnet50-growth.json")) or {}
    for reduce in ("full", "mean", "topk"):
        data = _load(os.path.join(out, f"resnet50-{reduce}.json"))
        if data is None:
            rows.append(f"| {reduce} | (not run) | | | | | | | |")
            continue
        by = {r["method"]: r for r in data["throughput"] if "error" not in r}
        none, fast, hook = by.get("none", {}), by.get("fastcap", {}), by.get(SAME_WORK[reduce], {})
        records = data.get("memory_growth") or (
            growth_run.get("memory_growth") if reduce == (growth_run.get("config") or {}).get("reduce") else None)
        growth = {(g["method"], g["policy"]): g for g in records or []}
        drained = (growth.get(("fastcap", "drain")) or {}).get("rows") or [{}]
        rows.append(
            f"| {reduce} | {_num(none.get('items_per_s'), '.0f')} | {_num(fast.get('items_per_s'), '.0f')} "
            f"({_num(fast.get('ratio'), '.3f')}) | {SAME_WORK[reduce]}: {_num(hook.get('items_per_s'), '.0f')} "
            f"({_num(hook.get('ratio'), '.3f')}) | {_mib(fast.get('device_overhead_bytes'))} | "
            f"{_mib(drained[-1].get('device_bytes'))} @{drained[-1].get('batches', '-')} | "
            f"{_num(fast.get('d2h_gbps'), '.1f')} | {_num(fast.get('probe_gbps'), '.1f')} | "
            f"{_num(fast.get('d2h_fraction_of_probe'), '.2f')} |")
    return rows


def tokens_rows(out: str) -> list[str]:
    # One pytest-benchmark JSON per session: the token benchmark and the LM extract (or, as
    # before, both in tokens.json).
    found = [d for d in (_load(os.path.join(out, name)) for name in ("tokens.json", "extract_lm.json")) if d]
    if not found:
        return []
    data = {"benchmarks": [b for d in found for b in d.get("benchmarks", [])]}
    lines = ["", "| language model | kept tokens/s plain | kept tokens/s fastcap tokens | ratio |", "|---|---:|---:|---:|"]
    extracts = []
    for b in data["benchmarks"]:
        c = b["extra_info"]
        if c.get("kind") == "extract_lm":
            extracts.append(c)
            continue
        lines.append(f"| {c['model']}, {c['dtype']}, {c['device']}, batch {c['batch']} x {c['seq']} | "
                     f"{c['plain_tokens_per_s']:,.0f} | {c['tokens_per_s']:,.0f} | {c['ratio_vs_plain']:.3f} |")
    if extracts:
        lines += ["", "| LM extract to disk | input tokens/s plain forward | extract (early exit) | ratio "
                  "| stop_early=False ratio |", "|---|---:|---:|---:|---:|"]
    for c in extracts:
        lines.append(f"| {c['model']}, {c['device']}, {c['rows']} x {c['context']}, batch {c['batch']} | "
                     f"{c['tokens_per_s']['plain']:,.0f} | {c['tokens_per_s']['extract']:,.0f} | "
                     f"{c['ratio_vs_plain']:.3f} | {c['ratio_full_vs_plain']:.3f} |")
    return lines


def report(out: str) -> str:
    head = ("| reduce | T0 images/s (no capture) | fastcap images/s (x T0) | same-work hook images/s (x T0) "
            "| fastcap device MiB over T0's peak | fastcap device MiB after the last batch | fastcap D2H GB/s "
            "| probe GB/s | D2H / probe |")
    lines = ["## ResNet-50", "", head, "|" + "---|" * 9] + resnet_rows(out) + tokens_rows(out)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the GPU check's output folder")
    args = parser.parse_args(argv)
    sys.stdout.write(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
