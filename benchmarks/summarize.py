"""Turn a pytest-benchmark JSON of the fastcap suite into markdown tables and a PNG.

    python benchmarks/summarize.py benchmarks/results/cpu-20261122.json

writes ``cpu-20261122.md`` and ``cpu-20261122.png`` beside the JSON, and copies the markdown to
``benchmarks/results/README.md`` (``--readme`` to change, ``--no-readme`` to skip): the tables
there are the ones to paste into the top-level README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from fastcap.bench import METHOD_LABELS, METHOD_SHORT, METHODS, growth_table, noise




def _mib(n):
    return "-" if n is None else f"{n / 2**20:.1f}"


def _cases(data, kind):
    return [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind") == kind]


def _shape(info):
    shape = info["input"]
    return "x".join(str(s) for s in shape[1:]) if len(shape) == 3 else "x".join(map(str, shape))


def summary_markdown(data, device: str) -> list[str]:
    """The short table for the top-level README: fastcap against the hook doing the same work,
    and memory after the last checkpoint of the growth run."""
    headline = sorted((c for c in _cases(data, "headline") if c["device"] == device),
                      key=lambda c: ("full", "mean", "topk").index(c["reduce"]))
    if not headline:
        return []
    first = headline[0]
    lines = [
        f"**{device}**, {first['model']} batch {first['batch']} at {_shape(first)}, capturing `{first['layers']}`:",
        "",
        "| reduce | fastcap / same-work hook | fastcap x no capture | same-work hook x no capture |",
        "|---|---:|---:|---:|",
    ]
    for info in headline:
        by = {r["method"]: r for r in info["records"] if not r.get("error")}
        same = info.get("fastcap_vs")
        if "fastcap" not in by or same not in by:
            continue
        lines.append(f"| {info['reduce']} | {info['fastcap_ratio']:.3f} (vs `{same}`) | {by['fastcap']['ratio']:.3f} "
                     f"| {by[same]['ratio']:.3f} |")
    for info in (c for c in _cases(data, "memory_growth") if c["device"] == device):
        res = {(g["method"], g["policy"]): g for g in info["results"] if g.get("rows")}
        metric = "device_bytes" if device != "cpu" else "rss_growth_bytes"
        what = "device memory" if device != "cpu" else "host RSS"
        parts = []
        for key, label in ((("clone", "kept"), "clone hook"), (("fastcap", "drain"), "fastcap (drain loop)")):
            if key in res:
                rows = res[key]["rows"]
                parts.append(f"{label} +{_mib(rows[0][metric])} MiB after {rows[0]['batches']} batch, "
                             f"+{_mib(rows[-1][metric])} MiB after {rows[-1]['batches']}")
        if parts:
            lines += ["", f"Memory growth ({info['model']} batch {info['batch']}, full capture, {what}): "
                      + "; ".join(parts) + "."]
    return lines + [""]


def headline_markdown(cases) -> list[str]:
    """The interleaved resnet50 comparison: one row per reduce and method."""
    if not cases:
        return []
    first = cases[0]
    lines = [
        f"### Headline: {first['model']}, batch {first['batch']}, input {_shape(first)}, layers "
        f"`{first['layers']}`, {first['device']}",
        "",
        f"Every method timed in {first['rounds']} interleaved rounds of {first['batches_per_round']} batch(es) "
        "(order rotating each round; an untimed warm-up batch for every method in the first round, and "
        "each time fastcap or the FX module is opened, so their one-off allocations are not timed). "
        "*ms/batch*: median. *x none*: time per batch over no capture's from the same round, median over "
        "rounds. *fastcap / same work*: fastcap's time over that of the pure-Python hook doing the same "
        "work, paired the same way (the `detach().clone()` hook for full, the torch reduction then "
        "`.cpu()` for mean and topk): below 1 means fastcap is faster.",
        "",
        "| reduce | method | ms/batch | items/s | x none | RSS +MiB (round) | fastcap / same work |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for info in sorted(cases, key=lambda c: ("full", "mean", "topk").index(c["reduce"])):
        by = {r["method"]: r for r in info["records"]}
        for name in METHODS:
            r = by.get(name)
            if r is None:
                continue
            if r.get("error"):
                lines.append(f"| {info['reduce']} | {name} | skipped: {r['error'][:80]} | | | | |")
                continue
            ratio = ""
            if name == "fastcap" and info.get("fastcap_ratio") is not None:
                ratio = f"**{info['fastcap_ratio']:.3f}** (vs {info['fastcap_vs']})"
            lines.append(
                f"| {info['reduce']} | {name} | {r['seconds_per_batch'] * 1e3:.1f} | {r['items_per_s']:.1f} | "
                f"{r['ratio']:.3f} | {_mib(r.get('rss_growth_bytes'))} | {ratio} |"
            )
    spreads = [s for s in (noise(info["records"]) for info in cases) if s is not None]
    if spreads:
        lines += ["", f"No-capture times varied by up to {max(spreads):.1%} between rounds in this run: "
                  "differences smaller than that are noise."]
    return lines + [""]


def grid_markdown(cases) -> list[str]:
    """The per-method grid: x-none ratio and items/s per model and reduce."""
    if not cases:
        return []
    by_key = {(c["model"], c["reduce"], c["method"]): c for c in cases}
    models = list(dict.fromkeys(c["model"] for c in cases))
    cols = [m for m in METHODS if m != "none"] + ["fastcap_thread"]  # + fastcap drained by a consumer thread
    lines = [
        f"### Grid: every method x reduce x model ({cases[0]['device']}, small configurations)",
        "",
        "Cells: time per batch over no capture's timed right before each round, median over rounds "
        "(items/s). Each case is its own pytest-benchmark test, minutes apart from the others, so "
        "compare ratios, not items/s, across cells; the headline above is the careful comparison. "
        "*fastcap_thread*: `collect=False`, a consumer thread drains while the model runs (extract's "
        "pattern).",
        "",
        "| model | batch, input | reduce | no capture items/s | " + " | ".join(cols) + " |",
        "|---|---|---|---:|" + "---:|" * len(cols),
    ]
    for model in models:
        none = by_key.get((model, None, "none"))
        for reduce in ("full", "mean", "topk"):
            row = [model, "", reduce, ""]
            if none:
                row[1] = f"{none['batch']}, {_shape(none)}"
                row[3] = f"{none['items_per_s']:.1f}"
            for method in cols:
                c = by_key.get((model, reduce, method))
                row.append("-" if c is None else f"{c['overhead_ratio']:.3f} ({c['items_per_s']:.1f})")
            lines.append("| " + " | ".join(row) + " |")
    memory = [
        "",
        "Memory of one round with its results kept (resnet-style `full` rows; MiB): host RSS growth / "
        "peak device memory over no capture / pinned host bytes / fastcap ring buffers.",
        "",
        "| model | method | RSS + | device + | pinned | ring |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model in models:
        for method in cols:
            c = by_key.get((model, "full", method))
            if c:
                memory.append(
                    f"| {model} | {method} | {_mib(c.get('rss_growth_bytes'))} | "
                    f"{_mib(c.get('device_overhead_bytes'))} "
                    f"| {_mib(c.get('pinned_bytes'))} | {_mib(c.get('buffer_bytes'))} |"
                )
    return lines + memory + [""]


def tokens_markdown(cases) -> list[str]:
    """The language-model case: two residual layers of GPT-2 as reduce="tokens"."""
    lines = []
    for c in cases:
        lines += [
            f"### Language model: {c['model']}, {c['dtype']}, batch {c['batch']} x {c['seq']} right-padded, "
            f"layers {', '.join(c['layers'].values())} as `reduce=\"tokens\"`",
            "",
            "| | kept tokens/s | time vs plain forward |",
            "|---|---:|---:|",
            f"| plain forward | {c['plain_tokens_per_s']:,.0f} | 1.000 |",
            f"| fastcap tokens | {c['tokens_per_s']:,.0f} | **{c['ratio_vs_plain']:.3f}** |",
            "",
            f"Median of {c['rounds']} interleaved rounds of {c['batches']} batches (paired ratio); the forward "
            f"waited {c['forward_wait_seconds'] or 0:.3f} s for a slot, and did "
            f"{c['materializations_on_forward'] or 0} copy-outs itself.",
            "",
        ]
    return lines


def extract_lm_markdown(cases) -> list[str]:
    """Language-model extraction to disk, early exit on and off, against the plain forward."""
    lines = []
    for c in cases:
        per_s = c["tokens_per_s"]
        lines += [
            f"### Extraction: `{c['model']}`, {c['rows']} packed rows x {c['context']} tokens, batch {c['batch']}, "
            f"{', '.join(c['layers'].values())} as `reduce=\"tokens\"` to disk",
            "",
            "| | input tokens/s | time vs plain forward |",
            "|---|---:|---:|",
            f"| plain Hugging Face forward (logits) | {per_s['plain']:,.0f} | 1.000 |",
            f"| `fastcap.extract` (early exit after the deeper block) | {per_s['extract']:,.0f} "
            f"| **{c['ratio_vs_plain']:.3f}** |",
            f"| `fastcap.extract`, `stop_early=False` | {per_s['extract_full']:,.0f} | {c['ratio_full_vs_plain']:.3f} |",
            "",
            f"Median of {c['rounds']} interleaved rounds (paired ratio); extract times are whole `extract()` "
            f"calls (setup, writer, statistics, manifest). It wrote {_mib(c['bytes_written'])} MiB (estimated "
            f"{_mib(c['estimated_bytes'])} MiB after the first batch); the forward waited "
            f"{c['forward_wait_seconds'] or 0:.3f} s on the writer.",
            "",
        ]
    return lines


def growth_markdown(cases) -> list[str]:
    """Memory after 1, 10, 100 batches per method."""
    lines = []
    for info in cases:
        lines += [
            f"### Memory growth: {info['model']}, batch {info['batch']}, input {_shape(info)}, full capture of "
            f"`{info['layers']}`, {info['device']}",
            "",
            "Each method in a fresh process; memory measured after a garbage collection and `malloc_trim`. "
            "*kept*: every batch's results stay referenced (the pure-Python hooks' list; for fastcap, "
            "nothing drained, `cap.result()` at the end). *drain*: `for step in cap.drain(): pass` after "
            "every batch, so each step is dropped once handed out. *held*: bytes of captured results "
            "referenced at the last checkpoint.",
            "",
            growth_table(info["results"], markdown=True),
            "",
        ]
    return lines


def environment_markdown(data) -> list[str]:
    env = data["machine_info"].get("fastcap_environment", {})
    return [
        f"Machine: {env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads)"
        + (f", GPU {env['gpu']}" if env.get("gpu") else ", no GPU")
        + f"; {env.get('platform')}; load average at start {env.get('load_average')}, at end "
        f"{env.get('load_average_end')}.",
        f"Python {env.get('python')}, torch {env.get('torch')}, torchvision {env.get('torchvision')}, "
        f"fastcap {env.get('fastcap')}; date {env.get('date')}"
        + (f"; commit {data['commit_info'].get('id', '')[:12]}" if data.get("commit_info", {}).get("id") else "")
        + ".",
        f"Command: `{env.get('command')}`",
        "",
    ]


def markdown(data) -> str:
    """The whole summary of one pytest-benchmark JSON."""
    devices = sorted({c["device"] for b in data["benchmarks"] for c in [b.get("extra_info", {})] if c.get("device")})
    lines = ["# fastcap benchmark results", ""] + environment_markdown(data)
    lines += [
        "Methods: " + "; ".join(f"**{m}**: {METHOD_LABELS[m]}" for m in METHODS) + ".",
        "",
    ]
    lines += ["## Summary", ""]
    for device in devices:
        lines += summary_markdown(data, device)
    for device in devices:
        sel = lambda kind: [c for c in _cases(data, kind) if c["device"] == device]  # noqa: E731
        lines += [f"## {device}", ""]
        lines += headline_markdown(sel("headline"))
        lines += growth_markdown(sel("memory_growth"))
        lines += grid_markdown(sel("throughput"))
        lines += tokens_markdown(sel("tokens"))
        lines += extract_lm_markdown(sel("extract_lm"))
    return "\n".join(lines).rstrip() + "\n"


def plot(data, path: str) -> str | None:
    """Headline ratios per reduce and method, and memory growth per method, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = _cases(data, "headline")
    growth = _cases(data, "memory_growth")
    devices = sorted({c["device"] for c in headline + growth})
    if not devices:  # a run of the language-model benchmarks alone: tables only
        return None
    fig, axes = plt.subplots(len(devices), 2, figsize=(13, 4.6 * len(devices)), squeeze=False)
    for row, device in zip(axes, devices):
        ax = row[0]
        cases = sorted((c for c in headline if c["device"] == device),
                       key=lambda c: ("full", "mean", "topk").index(c["reduce"]))
        width = 0.8 / max(len(METHODS) - 1, 1)
        for i, method in enumerate(METHODS[1:]):
            xs, ys = [], []
            for j, case in enumerate(cases):
                r = {r["method"]: r for r in case["records"]}.get(method)
                if r and not r.get("error"):
                    xs.append(j + (i - (len(METHODS) - 2) / 2) * width)
                    ys.append(r["ratio"])
            bars = ax.bar(xs, ys, width=width, color=f"C{METHODS.index(method)}", label=METHOD_SHORT[method])
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:.3f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=6, rotation=90)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("time per batch / no capture's")
        ax.set_xticks(range(len(cases)), [c["reduce"] for c in cases])
        ratios = [r["ratio"] for c in cases for r in c["records"] if r.get("ratio")]
        if ratios:
            ax.set_ylim(min(0.95, min(ratios) - 0.02), max(ratios) + 0.08)
        if cases:
            c = cases[0]
            ax.set_title(f"{device}: {c['model']} batch {c['batch']} {_shape(c)}, time vs no capture (lower is better)",
                         fontsize=9)
        ax.legend(fontsize=7, ncol=3)
        ax = row[1]
        for case in (c for c in growth if c["device"] == device):
            on_device = any(r.get("device_bytes") is not None for g in case["results"] for r in g.get("rows", []))
            metric = "device_bytes" if on_device else "rss_growth_bytes"
            for g in case["results"]:
                rows = g.get("rows") or []
                if rows:
                    kept_fastcap = (g["method"], g["policy"]) == ("fastcap", "kept")
                    ax.plot([r["batches"] for r in rows], [r[metric] / 2**20 for r in rows],
                            "--" if kept_fastcap else "-", marker="x" if kept_fastcap else "o",
                            lw=1 if kept_fastcap else 2, color=f"C{METHODS.index(g['method'])}",
                            label=f"{METHOD_SHORT[g['method']]} ({g['policy']})")
            ax.set_xlim(left=0)
            ax.set_xlabel("batches run")
            ax.set_ylabel(("device memory" if on_device else "host RSS") + " growth, MiB")
            ax.set_title(f"{device}: memory growth, {case['model']} batch {case['batch']} {_shape(case)}, full",
                         fontsize=9)
            ax.legend(fontsize=7)
    env = data["machine_info"].get("fastcap_environment", {})
    fig.suptitle(f"fastcap benchmarks — {env.get('cpu')}, torch {env.get('torch')}, {str(env.get('date'))[:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a pytest-benchmark JSON written by the suite (--benchmark-json)")
    parser.add_argument("--readme", default=os.path.join(os.path.dirname(__file__), "results", "README.md"))
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    stem = os.path.splitext(args.json)[0]
    text = markdown(data)
    with open(stem + ".md", "w") as f:
        f.write(text)
    png = plot(data, stem + ".png")
    if not args.no_readme:
        shutil.copyfile(stem + ".md", args.readme)
    sys.stdout.write(text)
    print(f"\nwrote {stem}.md" + (f", {png}" if png else "") + ("" if args.no_readme else f" and {args.readme}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
