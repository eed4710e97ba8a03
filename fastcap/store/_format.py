"""The on-disk format of an extraction, in one place: paths, ``.npy`` headers, the manifest
(its schema, merging the ranks' manifests, atomic JSON) and run-length coded indices.

Layout of ``out/`` (every file is written to a temporary name, fsynced, then renamed)::

    manifest.json                      merged manifest, written once every rank has finished
    rank-00000.json                    rank 0's progress: names only committed shards
    rank-00000/shard-000000/layer4.npy one .npy per key per shard, rows in the rank's order
    rank-00001.json, rank-00001/...    further ranks under torchrun

Statistics: every key whose rows are float vectors (``[rows, C]``: pooled, token rows, full
``[N, C]``; not top-k) has running moments in ``stats`` (``_stats.py``): per rank in the rank
manifest, updated with each shard's commit, and merged over the ranks in ``manifest.json``.

Kept columns (``extract(keep_columns=...)``: labels, ids): one value per sample row, as
``column.<name>.npy`` in each shard beside the keys, listed in the manifest's ``columns``.
``description`` holds the run's arguments in readable form (the command line's); unlike
``args`` it is not compared on resume.

Keys: a ``full`` or ``mean`` layer is stored under its capture key (``"layer4"``); a ``topk``
layer as two arrays, ``"layer4"`` (the values) and ``"layer4.indices"`` (int64 channel
indices). ``bfloat16`` and other dtypes numpy lacks are stored as unsigned integers of the
same width (their raw bits).
"""

from __future__ import annotations

import builtins
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from fastcap.store._stats import merge_json

FORMAT = "fastcap-extract"
FORMAT_VERSION = 2  # 2: each shard records its files' sizes and crc32s
MANIFEST = "manifest.json"
LOCK = ".lock"  # held by the run writing out/ (store/_lock.py)
INDICES_SUFFIX = ".indices"
#: the token index of an extraction with tokens=: one row per kept token, like the "tokens" keys
#: (sample: the row of its sample in the shard; open() makes it the dataset index).
TOKEN_KEYS = (".tokens.sample", ".tokens.position", ".tokens.token_id")
# Unsigned integer dtypes used to store the raw bits of dtypes numpy lacks (bfloat16, float8).
RAW_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def rank_name(rank: int) -> str:
    """The name of rank ``rank``'s manifest (``.json``) and shard directory."""
    return f"rank-{rank:05d}"


def npy_header(dtype: np.dtype, shape: tuple, size: int | None = None) -> bytes:
    """A .npy version 1.0 header, space-padded to ``size`` bytes (a multiple of 64 by default)."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(dtype), tuple(int(d) for d in shape))
    if size is None:
        size = -(-(10 + len(text) + 1) // 64) * 64
    text = text.ljust(size - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def merge_manifests(ranks: list[dict]) -> dict:
    """One manifest over every rank's committed shards (rank order, then shard order)."""
    first = ranks[0]
    shards = [{"rank": state["rank"]} | shard for state in sorted(ranks, key=lambda s: s["rank"])
              for shard in state["shards"]]
    num_samples = first.get("num_samples")
    rows = len(dataset_order(shards, num_samples)[0])
    keys = {}
    for state in ranks:
        for key, meta in state["keys"].items():
            # Keys with a row per kept token: their count is known once open() has read the index.
            keys[key] = meta | {"shape": None if meta.get("rows") == "tokens" else [rows, *meta["row_shape"]]}
    world_size = first["args"]["world_size"]
    complete = len(ranks) == world_size and all(state["complete"] for state in ranks)
    stats = {key: merge_json([state.get("stats", {}).get(key) for state in ranks])
             for key, meta in keys.items() if meta.get("stats")}
    described = next((state["description"] for state in ranks if state.get("description")), None)
    columns = next((state["columns"] for state in ranks if state.get("columns")), None)
    return header(first["args"]) | ({"description": described} if described else {}) | {
        "world_size": world_size,
        "num_samples": num_samples,
        "rows": rows,
        "complete": complete,
        "keys": keys,
        "stats": {key: value for key, value in stats.items() if value is not None},
        **({"columns": columns} if columns else {}),
        "shards": shards,
    }


def dataset_order(shards: list[dict], num_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Which stored rows (numbered across shards in file order) form the dataset, in order.

    Returns ``(order, indices)``: ``order`` lists stored row numbers sorted by position, with
    DistributedSampler padding (positions >= num_samples, repeats of early samples) dropped;
    ``indices`` are the dataset indices of all stored rows.
    """
    positions = decode_runs([run for shard in shards for run in shard["positions"]])
    indices = decode_runs([run for shard in shards for run in shard["indices"]])
    keep = np.ones(len(positions), bool) if num_samples is None else positions < num_samples
    kept = np.flatnonzero(keep)
    _, first = np.unique(positions[kept], return_index=True)  # sorted by position
    return kept[first], indices


def header(args: dict) -> dict:
    """The fields every manifest starts with: format, versions, the run's arguments."""
    import fastcap

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastcap_version": getattr(fastcap, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "args": args,
    }


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with builtins.open(tmp, "w") as file:
        file.write(_json_text(obj) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _json_text(obj, indent: int = 0) -> str:
    """JSON with one dict entry per line and lists of numbers (index runs, shapes) inline."""
    pad = " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(key)}: {_json_text(value, indent + 1)}" for key, value in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and any(isinstance(item, dict) for item in obj):
        items = [pad + _json_text(item, indent + 1) for item in obj]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(obj)


def read_json(path: Path) -> dict:
    try:
        with builtins.open(path) as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not a valid fastcap manifest: {error}") from error


def read_manifest(path: Path) -> dict:
    """A manifest (merged or one rank's), checked to be fastcap's: a ValueError naming the file
    otherwise."""
    manifest = read_json(path)
    problem = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        problem = f"its format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, not {FORMAT!r}"
    elif manifest.get("format_version") not in (1, FORMAT_VERSION):
        problem = (f"it has format_version {manifest.get('format_version')!r}; this fastcap reads 1 to "
                   f"{FORMAT_VERSION}")
    else:
        missing = [field for field in ("args", "keys", "shards") if not isinstance(manifest.get(field), (dict, list))]
        if missing:
            problem = f"it lacks {', '.join(missing)}"
    if problem:
        raise ValueError(f"{str(path)!r} is not a fastcap manifest: {problem}")
    return manifest


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_runs(values: np.ndarray) -> list[list[int]]:
    """Compress integers into ``[start, stop, step]`` runs whose ranges concatenate to them.

    Example: ``[0, 2, 4, 5]`` -> ``[[0, 6, 2], [5, 6, 1]]``.
    """
    runs: list[list[int]] = []
    values = [int(v) for v in values]
    i = 0
    while i < len(values):
        j = i
        step = values[i + 1] - values[i] if i + 1 < len(values) else 1
        if step != 0:
            while j + 1 < len(values) and values[j + 1] - values[j] == step:
                j += 1
        else:
            step = 1
        runs.append([values[i], values[j] + step, step])
        i = j + 1
    return runs


def decode_runs(runs: list) -> np.ndarray:
    """The inverse of :func:`encode_runs`."""
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(start, stop, step, dtype=np.int64) for start, stop, step in runs])


def is_ours(path: Path) -> bool:
    """Whether ``path`` (an entry of ``out/``) belongs to an extraction."""
    name = path.name
    return name.startswith("rank-") or name.startswith(MANIFEST) or name.startswith(LOCK)


def out_error(root: Path, error: OSError, what: str) -> OSError:
    """An OSError that names ``out`` and what could not be done there."""
    reason = error.strerror or str(error)
    return OSError(error.errno, f"extract: out={str(root)!r}: {what}: {reason}")


def key_meta(array: np.ndarray, tensor_dtype: torch.dtype) -> dict:
    """The manifest entry of a key: numpy dtype, torch dtype, shape of one row."""
    return {"dtype": array.dtype.str, "torch_dtype": str(tensor_dtype).replace("torch.", ""),
            "row_shape": list(array.shape[1:])}

