"""What a store holds, for people (``fastcap info OUT``), and every shard file checked against
its checksum (``fastcap verify OUT``)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

from fastcap.store import Store, _file_problem, open  # noqa: A004

__all__ = ["describe", "check_files", "open_quietly", "tokens_per_sample"]

#: fingerprint fields shown in readable form when a store has no description (made before one
#: was recorded), in this order; digests are left out.
_ARG_FIELDS = ("layers", "reduce", "k", "channel_dim", "dtype", "select", "tokens", "columns", "shard_size",
               "world_size", "batch_size", "data", "num_samples")


def open_quietly(out) -> tuple[Store, str | None]:
    """``(store, warning)``: :func:`fastcap.open` with its unfinished-run warning returned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = open(out)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return store, (messages[0] if messages else None)


def describe(store: Store) -> str:
    """Keys, rows, shapes and dtypes, completeness, statistics, the token index, kept columns and
    the arguments the store was made with, as text.

    Example:
        >>> print(describe(fastcap.open("acts-lm/")))
    """
    manifest = store.manifest
    lines = [f"store {str(store.path)!r}: " + ("complete" if store.complete else "INCOMPLETE (a run that has "
                                                "not finished: run it again with the same arguments)")]
    expected = manifest.get("num_samples")
    committed = len(store.indices)
    lines.append(f"  samples: {committed}" + (f" of {expected}" if expected is not None and
                                               (expected != committed or not store.complete) else "")
                 + f", in {len(manifest.get('shards', []))} shard(s) from {manifest.get('world_size', 1)} rank(s), "
                 + _size(_bytes(store)))
    lines.append(f"  written by fastcap {manifest.get('fastcap_version')}, torch {manifest.get('torch_version')}")
    lines += ["", "keys:"] + _keys_table(store)
    if store.stats:
        lines += ["", "statistics (over channels: the mean of the per-channel means and stds; min, max; "
                      "mean row norm):"]
        width = max(len(key) for key in store.stats)
        for key, stats in store.stats.items():
            lines.append(f"  {key:<{width}}  mean {float(np.mean(stats.mean)):+.4g}  std {float(np.mean(stats.std)):.4g}"
                         f"  min {float(np.min(stats.min)):.4g}  max {float(np.max(stats.max)):.4g}"
                         f"  norm {stats.norm_mean:.4g}  ({stats.count} rows)")
    if store.tokens is not None:
        tokens = store.tokens
        per = tokens_per_sample(store)
        ids = tokens.token_id[tokens.token_id >= 0]
        lines += ["", f"token index: {len(tokens.sample)} token rows from {len(store.indices)} samples"
                      + (f", {int(np.min(per))}..{int(np.max(per))} per sample" if len(per) else "")
                      + (f", positions {int(tokens.position.min())}..{int(tokens.position.max())}" if len(tokens.sample) else "")
                      + (f", token ids {int(ids.min())}..{int(ids.max())}" if len(ids) else ", no token ids")]
    if store.columns:
        lines += ["", "columns (one value per sample, aligned with store.indices):"]
        for name, values in store.columns.items():
            distinct = len(np.unique(values)) if values.ndim == 1 else None
            lines.append(f"  {name}: {values.dtype}{list(values.shape[1:]) or ''}"
                         + (f", {distinct} distinct values" if distinct is not None else "")
                         + (f", e.g. {', '.join(map(str, values[:3]))}" if len(values) and values.ndim == 1 else ""))
    lines += ["", "made with:"] + _arguments(manifest)
    return "\n".join(lines)


def _keys_table(store: Store) -> list[str]:
    rows = [("key", "rows", "row shape", "dtype", "rows are")]
    for key in store:
        array = store[key]
        per = store.manifest["keys"][key].get("rows", "samples")
        rows.append((key, str(len(array)), str(list(array.row_shape)), str(array.torch_dtype).replace("torch.", ""),
                     "one per kept token" if per == "tokens" else "one per sample"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  " + "  ".join(f"{cell:<{widths[i]}}" if i < 4 else cell for i, cell in enumerate(row)).rstrip()
            for row in rows]


def _arguments(manifest: dict) -> list[str]:
    """The readable arguments (the command line's, or extract's description), then the
    dataset's choices; for stores made before they were recorded, the fingerprint's fields."""
    described = manifest.get("description")
    args = manifest.get("args", {})
    lines = []
    if described:
        lines += [f"  {name}: {_text(value)}" for name, value in described.items() if name != "classes"]
        if described.get("classes"):
            classes = described["classes"]
            lines.append(f"  classes: {len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    else:
        lines.append("  (no readable record: the store was made before fastcap recorded its arguments; "
                     "the resume fingerprint says:)")
        kinds = {"map": "a DataLoader over a map-style dataset", "iterable": "an iterable of batches"}
        lines += [f"  {name}: {kinds.get(args[name], args[name]) if name == 'data' else _text(args[name])}"
                  for name in _ARG_FIELDS if args.get(name) is not None]
    spec = args.get("data_spec")
    if spec:
        lines.append("  data spec (checked on resume): " + ", ".join(f"{k}={_text(v)}" for k, v in spec.items()
                                                                      if v is not None))
    return lines


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _bytes(store: Store) -> int:
    return sum(path.stat().st_size for path, _ in store._files() if path.exists())


def _size(count: int) -> str:
    from fastcap.store._writer import size_text

    return size_text(count)


def check_files(store: Store, progress: bool = False) -> tuple[int, int, list[str]]:
    """Read every shard file against the crc32 the manifest recorded: ``(files, bytes, problems)``.

    Example:
        >>> files, size, problems = check_files(fastcap.open("feats/"))
        >>> problems
        []
    """
    from tqdm.auto import tqdm

    files = list(store._files())
    total = sum(path.stat().st_size for path, _ in files if path.exists())
    problems = []
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for path, record in files:
            problem = _file_problem(path, record)
            if problem is not None:
                problems.append(problem)
            bar.update(path.stat().st_size if Path(path).exists() else 0)
    return len(files), total, problems


def tokens_per_sample(store: Store) -> np.ndarray:
    """How many token rows each sample kept, aligned with ``store.indices`` (int64)."""
    order = np.argsort(store.indices, kind="stable")
    rows = order[np.searchsorted(store.indices, store.tokens.sample, sorter=order)]
    return np.bincount(rows, minlength=len(store.indices))
