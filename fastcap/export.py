"""A store's token rows out to other tools: :func:`to_saelens` (``fastcap export OUT --format
saelens``) writes the folder SAELens reads as its activation cache (``cached_activations_path``).

SAELens's cache is a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``) with one row per
sequence: the activations of its ``context_size`` tokens in a column named after the hook,
``Array2D(shape=(context_size, d_in), dtype="float32")``, and their ``token_ids`` as
``Sequence(Value("int32"), length=context_size)``. It reads the rows in the order they are
stored (it does not shuffle the cache on disk), so the export can shuffle the sequences.
The folder is written with ``datasets`` itself, in shards of at most ``max_shard_size``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["to_saelens"]

#: rows of Arrow the writer holds at once, at most (each row is one sequence's activations)
_WRITER_BYTES = 64 << 20


def to_saelens(out, key: str, to, *, shuffle: bool = False, seed: int = 0, overwrite: bool = False,
               max_shard_size: int | str = "1GB", progress: bool | None = None) -> Path:
    """Write ``key`` of the store in ``out`` as a SAELens activation cache in ``to``.

    The store must hold ``key`` with one row per kept token (``reduce="tokens"``), every sample
    with the same number of rows (T: e.g. a packed corpus, ``--pack``, without ``--skip-ids``
    or ``--start``, keeps all ``--context`` tokens of every row), and token ids. Each sample
    becomes one row of the dataset: ``key`` as float32 ``[T, d]`` and ``token_ids`` as int32
    ``[T]``, in the store's order, or shuffled across sequences with ``shuffle`` (seeded by
    ``seed``). The folder's Arrow shards hold at most ``max_shard_size`` each (bytes, or a
    string such as "500MB"; default 1 GB). It is built beside ``to`` and renamed into place
    once complete. Returns the folder.

    Train with it in SAELens: ``cached_activations_path=to``, ``hook_name=key``,
    ``context_size=T``, ``d_in=d``.

    Raises:
        ValueError: the store is unfinished, ``key`` is not a token key, its samples kept
            different numbers of tokens, token ids are missing, or ``to`` is not empty (without
            ``overwrite``).
        ImportError: ``datasets`` is not installed.

    Example:
        >>> fastcap.export.to_saelens("acts/", "transformer.h.3", "sae-cache/", shuffle=True)
        >>> ds = datasets.load_from_disk("sae-cache/")
        >>> ds.features["transformer.h.3"].shape          # (context_size, d_in)
        (128, 256)
    """
    from fastcap.store._info import open_quietly, tokens_per_sample
    from fastcap.text import import_datasets

    datasets = import_datasets()
    store, unfinished = open_quietly(out)
    sequences, context, width = _check(store, key, unfinished, tokens_per_sample)
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        if not overwrite:
            raise ValueError(f"--to {str(to)!r} is not empty; choose a new folder, or pass --overwrite "
                             "(overwrite=True) to replace it")
    order = np.random.default_rng(seed).permutation(sequences) if shuffle else np.arange(sequences)
    features = datasets.Features({
        key: datasets.Array2D(shape=(context, width), dtype="float32"),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=context),
    })
    digest = hashlib.sha256(repr((str(Path(out).resolve()), key, shuffle, seed, store.manifest.get("shards"))).encode())
    row_bytes = context * width * 4
    parent = to.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fastcap-export-", dir=parent))
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar of our own, over the sequences
    try:
        dataset = datasets.Dataset.from_generator(
            _sequences, features=features, cache_dir=str(work / "cache"), fingerprint=digest.hexdigest()[:16],
            writer_batch_size=max(1, _WRITER_BYTES // row_bytes),
            gen_kwargs={"out": str(out), "key": key, "order": order, "context": context, "progress": progress})
        staged = work / "dataset"
        dataset.save_to_disk(str(staged), max_shard_size=max_shard_size)
        del dataset
        if to.exists():
            shutil.rmtree(to) if to.is_dir() else to.unlink()
        os.replace(staged, to)
    finally:
        if not bars:
            datasets.enable_progress_bars()
        shutil.rmtree(work, ignore_errors=True)
    return to


def _check(store, key: str, unfinished: str | None, tokens_per_sample) -> tuple[int, int, int]:
    """``(sequences, tokens per sequence, d)``, or a ValueError saying what does not fit."""
    if unfinished is not None or not store.complete:
        raise ValueError(f"the store at {str(store.path)!r} is unfinished: run its extraction again with the "
                         "same arguments to finish it, then export")
    if key not in store:
        raise ValueError(f"--key {key!r} is not in the store at {str(store.path)!r}; its keys: {list(store)}")
    if store.manifest["keys"][key].get("rows") != "tokens":
        raise ValueError(f"--key {key!r} holds one row per sample; a SAELens cache holds every token's "
                         "activation: export a key extracted with --reduce tokens (reduce='tokens')")
    if len(store[key].row_shape) != 1:
        raise ValueError(f"--key {key!r} has rows of shape {list(store[key].row_shape)}; SAELens trains on "
                         "vectors [d]")
    counts = tokens_per_sample(store)
    if not len(counts) or counts.min() != counts.max() or counts[0] == 0:
        low, high = (int(counts.min()), int(counts.max())) if len(counts) else (0, 0)
        raise ValueError(
            f"--key {key!r}: the store's samples kept different numbers of token rows ({low} to {high}); a "
            "SAELens cache holds sequences of one length. Extract a packed corpus (--pack) keeping every "
            "token (without --skip-ids or --start), so that every row keeps all --context tokens")
    if (store.tokens.token_id < 0).any():
        raise ValueError(f"--key {key!r}: the store has no token ids (the capture's Tokens had no ids=); "
                         "SAELens's cache holds token_ids beside the activations")
    return len(counts), int(counts[0]), int(store[key].row_shape[0])


def _sequences(out: str, key: str, order: np.ndarray, context: int, progress):
    """One dataset row per sequence, in ``order`` (token rows of sequence i: i*T .. i*T+T-1)."""
    import torch
    from tqdm.auto import tqdm

    from fastcap._distributed import show_progress
    from fastcap.store._info import open_quietly

    store, _ = open_quietly(out)
    rows, ids = store[key], store.tokens.token_id
    for sequence in tqdm(order, desc="export", unit="seq", disable=not show_progress(progress), file=sys.stderr,
                         dynamic_ncols=True):
        start = int(sequence) * context
        values = rows.tensor(slice(start, start + context)).to(torch.float32).numpy()
        yield {key: values, "token_ids": ids[start:start + context].astype(np.int32)}
