"""Reporting: the machine record (:func:`environment`), strict-JSON values, the text and markdown
tables, and the plot."""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
from typing import Any, Mapping, Sequence

import torch

from fastcap.bench.methods import METHOD_SHORT, METHODS


def environment() -> dict:
    """Machine, library versions, date and command line, for the JSON and the markdown."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import fastcap

        info["fastcap"] = getattr(fastcap, "__version__", None)
    except ImportError:
        pass
    return info


def jsonable(value: Any) -> Any:
    """``value`` with tensors, numpy scalars and non-finite floats made strict-JSON friendly."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def _mib(n: Any) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f}"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def throughput_table(records: Sequence[Mapping], markdown: bool = False) -> str:
    """A table of :func:`compare` records: throughput, ratio, memory, link speed."""
    head = ["method", "reduce", "items/s", "x none", "dev peak +MiB", "pinned MiB", "RSS +MiB",
            "D2H GB/s", "probe GB/s"]
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["method"], r["reduce"], "skipped (see JSON)"] + ["-"] * 6)
            continue
        rows.append([
            r["method"], r["reduce"], f"{r['items_per_s']:.1f}", f"{r['ratio']:.3f}",
            _mib(r.get("device_overhead_bytes")), _mib(r.get("pinned_bytes")), _mib(r.get("rss_growth_bytes")),
            _num(r.get("d2h_gbps"), ".1f"), _num(r.get("probe_gbps"), ".1f"),
        ])
    return _table(head, rows, markdown)


def growth_table(results: Sequence[Mapping], markdown: bool = False) -> str:
    """A table of :func:`memory_growth` results: memory after each checkpoint, per method."""
    checkpoints = sorted({row["batches"] for res in results for row in res.get("rows", [])})
    on_device = any(row.get("device_bytes") is not None for res in results for row in res.get("rows", []))
    metric = "device_bytes" if on_device else "rss_growth_bytes"
    head = ["method", "policy"] + [f"{'dev' if on_device else 'RSS'} +MiB @{c}" for c in checkpoints] + [
        f"held MiB @{c}" for c in checkpoints[-1:]
    ] + ["note"]
    rows = []
    for res in results:
        by = {row["batches"]: row for row in res.get("rows", [])}
        last = by.get(checkpoints[-1]) if checkpoints else None
        rows.append(
            [res["method"], res["policy"]]
            + [_mib(by[c][metric]) if c in by else "-" for c in checkpoints]
            + [_mib(last["held_bytes"]) if last else "-"]
            + [(res.get("error") or res.get("stopped") or "")[:70]]
        )
    return _table(head, rows, markdown)


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*map(str, r)) for r in rows])


def plot(records: Sequence[Mapping], growth: Sequence[Mapping] | None, path: str, title: str) -> str:
    """Draw throughput, memory overhead and (when given) memory growth per method to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    names = [METHOD_SHORT.get(r["method"], r["method"]) for r in ok]
    colors = [f"C{METHODS.index(r['method']) if r['method'] in METHODS else 9}" for r in ok]
    panels = 3 if growth else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.6))
    ax = axes[0]
    bars = ax.bar(names, [r["items_per_s"] for r in ok], color=colors)
    for bar, r in zip(bars, ok):
        ax.annotate(f"{r['ratio']:.3f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("items / s (higher is better)")
    ax.set_title("throughput (label: time vs no capture)")
    ax.tick_params(axis="x", rotation=30)

    ax = axes[1]
    on_device = any(r.get("device_overhead_bytes") is not None for r in ok)
    first = [(r.get("device_overhead_bytes") if on_device else r.get("rss_growth_bytes")) or 0 for r in ok]
    pinned = [(r.get("buffer_bytes") or 0) + (r.get("pinned_result_bytes") or 0) for r in ok]
    pos = range(len(ok))
    left = ax.bar([p - 0.2 for p in pos], [v / 2**20 for v in first], width=0.4, color=colors,
                  label="peak device memory over no capture" if on_device else "host RSS growth over a round")
    right = ax.bar([p + 0.2 for p in pos], [v / 2**20 for v in pinned], width=0.4, color=colors, alpha=0.45,
                   hatch="//", label="fastcap ring buffers + pinned results")
    for bar in list(left) + list(right):
        ax.annotate(f"{bar.get_height():.3g}", (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0)),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(pos), names, rotation=30)
    ax.set_ylabel("MiB (lower is better)")
    ax.set_title("memory during one round (its results kept)")
    ax.legend(fontsize=8)

    if growth:
        ax = axes[2]
        device_rows = any(row.get("device_bytes") is not None for g in growth for row in g.get("rows", []))
        metric = "device_bytes" if device_rows else "rss_growth_bytes"
        for g in growth:
            rows = g.get("rows") or []
            if not rows:
                continue
            label = f"{METHOD_SHORT.get(g['method'], g['method'])} ({g['policy']})"
            kept_fastcap = g["policy"] == "kept" and g["method"] == "fastcap"
            color = f"C{METHODS.index(g['method'])}" if g["method"] in METHODS else None
            ax.plot([row["batches"] for row in rows], [row[metric] / 2**20 for row in rows],
                    "--" if kept_fastcap else "-", marker="x" if kept_fastcap else "o",
                    lw=1 if kept_fastcap else 2, color=color, label=label)
        ax.set_xlim(left=0)
        ax.set_xlabel("batches run")
        ax.set_ylabel(("device memory" if device_rows else "host RSS") + " growth, MiB")
        ax.set_title("memory growth with batches")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
