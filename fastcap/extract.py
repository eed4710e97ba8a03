"""Dataset-scale extraction to disk: :func:`extract` runs a model over a dataset and writes
the chosen layers to a store (read it with :func:`fastcap.open`).

``extract`` runs the model under ``torch.inference_mode()``, captures the layers with
:func:`fastcap.capture`, and hands each finished forward pass to a writer thread that streams
it into ``.npy`` shards (``fastcap/store/``). The forward loop never waits on disk unless the
writer falls behind by more than the capture ring's depth; then the capture's backpressure
holds the forward, so host memory stays bounded whatever the dataset size.

A shard is a run of whole batches holding at least ``shard_size`` samples (the last one may
hold fewer). A killed run leaves only committed shards behind; running ``extract`` again with
the same arguments skips their batches and produces the same bytes an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, IterableDataset

from fastcap import _ext
from fastcap._distributed import ProcessGroup, launch_rank, show_progress
from fastcap._layers import model_device, resolve_reduce
from fastcap._sources import batch_size, check_columns, first_sample, make_source, split_columns, to_device
from fastcap._tokens import Tokens
from fastcap._early_exit import StopForward
from fastcap._steps import ConsumerFailed
from fastcap.capture import build_capture
from fastcap.store import Store, open
from fastcap.store._format import LOCK, MANIFEST, is_ours, out_error, read_json
from fastcap.store._lock import OutLock
from fastcap.store._writer import RankDir, ShardWriter, size_text, write_merged_manifest

__all__ = ["extract"]


def extract(
    model: torch.nn.Module,
    data: Iterable,
    layers,
    reduce=None,
    *,
    out: str | os.PathLike,
    k: int | None = None,
    channel_dim=1,
    dtype: torch.dtype | None = None,
    select=None,
    shard_size: int = 4096,
    overwrite: bool = False,
    progress: bool | None = None,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    depth: int = 4,
    tokens: Tokens | None = None,
    stop_early: bool = True,
    check_space: bool = True,
    keep_columns=None,
) -> "Store":
    """Run ``model`` over ``data`` and write the captured layers to ``out/``; return the store.

    Args:
        model: the model; batches are moved to the device of its first parameter (or buffer),
            with ``non_blocking=True`` when the DataLoader pinned them.
        data: a ``DataLoader`` or any iterable of batches. A batch is a tensor, a tuple/list
            whose first element is the input (``(images, labels)``), or a dict passed as
            keyword arguments; pass ``forward`` for anything else. For a DataLoader over a
            map-style dataset, stored rows carry the dataset indices and run in the
            loader's sampler order (dataset order when it shuffles, with a warning);
            for other iterables the indices are running sample counters.
        layers, reduce, k, channel_dim, dtype, select, depth, tokens: as for
            :func:`fastcap.capture`. With ``tokens=``, keys with one row per kept token
            (``"tokens"``, token ``"topk"``) are stored token-major: ``store[key]`` is
            ``[n_tokens, C]`` over all shards and ``store.tokens`` says where each row came from
            (``sample`` = the dataset index, ``position``, ``token_id``); pooled keys keep one
            row per sample.
        out: the output directory (created if missing).
        shard_size: samples per shard, the unit of crash safety and resume (whole batches,
            so a shard holds at least this many samples, the last one fewer).
        overwrite: replace an extraction in ``out`` made with different arguments (without
            it, that is a ``ValueError`` naming the argument). An extraction made with the
            same arguments is resumed, or returned as is when complete, either way; delete
            ``out`` to recompute from scratch.
        progress: show a tqdm progress bar; default: only when stderr is a terminal.
        forward: ``forward(model, batch)`` runs one batch already on the model's device;
            default ``model(batch)``, ``model(batch[0])``, or ``model(**batch)``.
        stop_early: end each forward once the deepest captured layer has run (the model's
            outputs are not needed): capturing block 6 of 12 costs about half a forward. The
            first forward of a run goes to the end to learn which layer runs last; the captures
            are bit-identical to full forwards. Pass False for models whose later layers have
            side effects you need.
        check_space: after the first batch, before anything is written, the bytes still to
            write are estimated (printed before the progress bar, and in ``fastcap extract``'s
            summary; token rows from the dataset's ``token_counts``, each item's real tokens,
            when it has them); a disk with less free space is refused with an ``OSError``
            naming both figures. False: go ahead anyway.
        keep_columns: a name or a list of names of per-sample values to store beside the
            features (``store.columns[name]``, aligned with ``store.indices``): the fields of dict
            batches (taken out of the batch before the forward: a dataset's ``"label"`` or
            ``"id"``), or ``"label"`` for ``(input, label)`` batches such as ImageFolder's.
            Numbers, or strings.

    Every key whose rows are float vectors gets running statistics (count, per-channel mean,
    variance, min, max, mean row norm), merged over shards and ranks: ``store.stats[key]``.

    Under ``torchrun`` it initialises torch.distributed when the script has not (gloo on CPU,
    NCCL on CUDA), splits the loader's dataset with ``DistributedSampler(shuffle=False)``,
    each rank writes its own shards, and rank 0 merges the manifest after a barrier.

    Raises:
        ValueError: mismatched arguments against an existing extraction, a non-fastcap
            non-empty ``out``, or invalid arguments.
        OSError: ``out`` cannot be written (disk full, read-only, a file in the way); the
            shards committed before the failure are kept and a rerun resumes after them.

    Example:
        >>> loader = DataLoader(dataset, batch_size=64, num_workers=4, pin_memory=True)
        >>> store = fastcap.extract(model.eval(), loader, ["layer3", "layer4"],
        ...                         reduce="mean", out="feats/")
        >>> store["layer4"].shape
        (50000, 2048)
        >>> loader = DataLoader(torchvision.datasets.ImageFolder("val/", transform), batch_size=64)
        >>> store = fastcap.extract(model, loader, "layer4", "mean", out="val-feats/",
        ...                         keep_columns="label")
        >>> store.columns["label"][:3]                # each image's class index
        array([0, 0, 0])
    """
    store, _ = extract_with_stats(
        model, data, layers, reduce, out=out, k=k, channel_dim=channel_dim, dtype=dtype,
        select=select, shard_size=shard_size, overwrite=overwrite, progress=progress,
        forward=forward, depth=depth, tokens=tokens, stop_early=stop_early, check_space=check_space,
        keep_columns=keep_columns,
    )
    return store


def extract_with_stats(model, data, layers, reduce, *, out, k, channel_dim, dtype, select, shard_size,
                       overwrite, progress, forward, depth, tokens=None, stop_early=True, check_space=True,
                       on_estimate=None, keep_columns=None, description=None) -> tuple[Store, dict]:
    """:func:`extract`, also returning run statistics (for the command line summary).

    ``description``: the run's arguments in readable form, recorded in the manifest by a new
    run (not compared on resume); default: the model's and the data's class names.

    ``on_estimate(estimated_bytes, free_bytes)`` is called on each rank once the first batch
    has been captured, before anything is written (default: shown with the progress bar).
    The statistics: ``samples``, ``seconds``, ``input_tokens`` (tokens the model read: the
    attention masks' sums), ``kept_tokens`` (token rows written), ``bytes_written``,
    ``estimated_bytes``, ``shards_written``, ``resumed_samples``, ``stall_seconds``,
    ``max_pending_steps``, ``capture`` (its ``stats()``), ``rank``, ``world_size``."""
    _check_arguments(model, data, out, shard_size, depth)
    columns = check_columns(keep_columns)
    reduce = resolve_reduce(reduce, tokens)  # the mode itself goes into the fingerprint
    # Built first so that bad layers/reduce/k fail before out is touched; hooks come later.
    # The writer thread is the consumer (collect=False: the forward waits for it, so host memory
    # stays bounded), and full captures are laid out contiguously: rows go from the slot to the
    # .npy file as they are.
    cap = build_capture(model, layers, reduce, k=k, channel_dim=channel_dim, dtype=dtype,
                        select=select, depth=depth, collect=False, tokens=tokens, keep_layout=False,
                        stop_early=stop_early)
    device = model_device(model)
    group = ProcessGroup.join(device)
    lock = None
    try:
        source = make_source(data, group.rank, group.world_size)
        if source.num_samples == 0:
            raise ValueError(_NO_SAMPLES)
        args = _fingerprint(model, source, layers, reduce, k, channel_dim, dtype, select,
                            shard_size, group.world_size, tokens)
        if columns:  # only then: the fingerprints of stores made before columns existed stay the same
            args["columns"] = columns
        group.check_same(args["model"], "model parameters")
        root = Path(out)

        def prepare() -> None:
            nonlocal lock
            _make_out(root)
            lock = OutLock.acquire(root)
            _prepare_out(root, args, overwrite)

        group.run_on_rank0(prepare)
        rank_dir = RankDir.open(root, group.rank, args, source.num_samples,
                                description or _describe(model, data))
        show_bar = show_progress(progress, group.rank)
        if on_estimate is None and show_bar:
            on_estimate = print_estimate
        writer = ShardWriter(rank_dir, shard_size, source.rank_samples, check_space, on_estimate,
                             source.rank_tokens)
        stats = _run_rank(model, cap, device, source, rank_dir, writer, show_bar,
                          forward or _default_forward, columns)
        group.barrier()
        if group.rank == 0 and not (root / MANIFEST).is_file():
            write_merged_manifest(root, group.world_size)
        group.barrier()
        stats.update(rank=group.rank, world_size=group.world_size)
        return open(root), stats
    finally:
        if lock is not None:
            lock.release()
        group.leave()


def _check_arguments(model, data, out, shard_size, depth) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if out is None:
        raise ValueError("out must name the output directory, got None")
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        raise TypeError(
            f"data must be a DataLoader or an iterable of batches, got the dataset "
            f"{type(data).__name__}; wrap it: DataLoader(dataset, batch_size=64)"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader or an iterable of batches, got {type(data).__name__}")
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")


def _run_rank(model, cap, device, source, rank_dir, writer, show_progress, forward, columns=()) -> dict:
    """Run this rank's remaining batches; every step ends up in a committed shard."""
    from tqdm.auto import tqdm

    stats = {"samples": 0, "seconds": 0.0, "input_tokens": 0, "kept_tokens": 0, "bytes_written": 0,
             "estimated_bytes": None, "shards_written": 0, "resumed_samples": rank_dir.committed_samples,
             "stall_seconds": 0.0, "max_pending_steps": 0}
    if rank_dir.complete:
        return stats
    if model.training:
        warnings.warn("extract: model is in training mode (dropout, batch-norm updates); "
                      "call model.eval() first for reproducible features", UserWarning, stacklevel=4)
    batches = source.batches(rank_dir.committed_batches, pin=device.type == "cuda")
    started = time.perf_counter()
    # An estimate to report comes before the bar is first drawn: written over a drawn bar, it
    # would stay in the middle of the bar's line in a log, where "\r" erases nothing.
    estimate_first = show_progress and writer.on_estimate is not None and writer.expected_samples is not None
    with tqdm(total=source.rank_samples, initial=rank_dir.committed_samples, unit="item",
              desc="extract", disable=not show_progress, file=sys.stderr, dynamic_ncols=True,
              delay=math.inf if estimate_first else 0) as bar:
        if estimate_first:
            writer.on_estimate = _then_draw(writer.on_estimate, bar)
        with torch.inference_mode(), cap, _cpu_block_cache(device) as end_step:
            input_tokens = _forward_all(model, cap, batches, writer, device, forward, bar, columns, end_step)
            if writer.samples == 0 and rank_dir.committed_samples == 0 and source.num_samples is None:
                raise ValueError(_NO_SAMPLES)  # an iterable that yielded nothing
            stats["capture"] = cap.stats()
            stats["stall_seconds"] = stats["capture"]["forward_wait_seconds"]
        writer.finish()
    stats.update(samples=writer.samples, seconds=time.perf_counter() - started, input_tokens=input_tokens,
                 kept_tokens=writer.tokens, bytes_written=writer.bytes_written,
                 estimated_bytes=writer.estimated_bytes, shards_written=writer.shards_written,
                 max_pending_steps=writer.max_pending)
    return stats


@contextlib.contextmanager
def _cpu_block_cache(device: torch.device):
    """On the CPU, the forwards' large blocks (1 MiB or more) come from fastcap's block cache
    (csrc/cpu_block_cache.h) and are reused batch after batch: peak memory that of the live
    tensors in every process, no page fault in steady state, where glibc's heap keeps what
    its history makes it keep (up to twice the live memory seen). Yields the call that ends a
    step (unused cached blocks go back). ``FASTCAP_CPU_BLOCK_CACHE=0`` turns it off."""
    if device.type != "cpu" or os.environ.get("FASTCAP_CPU_BLOCK_CACHE", "1") == "0":
        yield lambda: None
        return
    _ext._C.cpu_block_cache_begin()
    try:
        yield _ext._C.cpu_block_cache_step
    finally:
        _ext._C.cpu_block_cache_end()


def _forward_all(model, cap, batches, writer: "ShardWriter", device, forward, bar, columns=(),
                 end_step=lambda: None) -> int:
    """The forward loop: the writer thread drains ``cap`` while this thread runs the model.
    Returns the input tokens read (0 for batches without ``input_ids``)."""
    writer.start(cap)
    tokens = []  # per batch, a tensor where the mask lives: read once at the end (no sync)
    try:
        for number, (batch, indices, positions) in enumerate(batches):
            writer.raise_if_failed()
            size = len(indices) if indices is not None else batch_size(batch)
            batch, kept = split_columns(batch, columns, size)  # labels and ids stay off the model
            before = cap.steps_finished
            batch = to_device(batch, device)
            tokens.append(_input_tokens(batch))
            one = first_sample(batch, size) if number == 0 else None
            if one is not None and (size > 1 or one is not batch):
                # Early exit learns where to stop on one sample (of a few tokens), stored nowhere:
                # the model's tail (an LM head's logits) never runs at full batch.
                cap._learn_stop_point(lambda: forward(model, one))
            try:
                forward(model, batch)
            except StopForward:  # every captured layer has run: the rest is not needed
                cap.end_stopped_step()
            cap.end_step()  # a forward that called submodules directly made one step too
            made = cap.steps_finished - before
            if made != 1:
                # Rows must belong to their items: steps are paired with batches one to one.
                which = f"dataset indices {indices[0]}..{indices[-1]}" if indices is not None else f"batch {number}"
                raise RuntimeError(
                    f"extract: the forward of {which} ran the model {made} times; extract pairs each "
                    "batch with exactly one call of the model (one step): a custom forward= must "
                    "call the model once per batch")
            missing = cap.layers_not_run() if number == 0 else []
            if missing:  # the store's keys come from the first step: never a silently absent key
                raise ValueError(f"extract: {cap.not_run_message(missing)}; leave them out of layers=")
            writer.submit(size, indices, positions, kept)  # the step just made is this batch's
            end_step()
            bar.update(size)
        writer.stop()
    except BaseException as error:
        writer.abort()
        failure = writer.failure()
        if isinstance(error, ConsumerFailed) and failure is not None:
            # A forward waiting for a slot learnt that the writer failed: its error is the one.
            raise failure from None
        raise
    return int(sum(int(count) for count in tokens))


_NO_SAMPLES = ("extract: data holds no samples (an empty dataset, corpus or iterable); there is nothing to "
               "extract, and a store without samples would not know its keys")


def _input_tokens(batch):
    """The tokens a language-model batch holds: its attention mask's sum, else its ids' count."""
    if not isinstance(batch, Mapping):
        return 0
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    if isinstance(mask, torch.Tensor):
        return mask.sum()
    return ids.numel() if isinstance(ids, torch.Tensor) else 0


def _then_draw(on_estimate, bar):
    """``on_estimate``, then the bar drawn from then on (it was made with an endless delay)."""
    def report(estimated: int, free: int) -> None:
        on_estimate(estimated, free)
        bar.delay = 0
        bar.refresh()
    return report


def print_estimate(estimated: int, free: int) -> None:
    """The size estimate, above the progress bar, on rank 0 only (each rank estimates its part)."""
    from tqdm.auto import tqdm

    if launch_rank() == 0:
        tqdm.write(f"fastcap extract: about {size_text(estimated)} to write (estimated from the first batch), "
                   f"{size_text(free)} free", file=sys.stderr)


def _default_forward(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _fingerprint(model, source, layers, reduce, k, channel_dim, dtype, select, shard_size,
                 world_size, tokens=None) -> dict:
    """The arguments that determine the output; a resumed run must match them exactly."""
    return {
        "tokens": None if tokens is None else _jsonable(dataclasses.asdict(tokens)),
        "layers": _jsonable(layers),
        "reduce": _jsonable(reduce),
        "k": _jsonable(k),
        "channel_dim": _jsonable(channel_dim),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "select": _jsonable(select),
        "shard_size": shard_size,
        "world_size": world_size,
        "data": source.kind,
        "num_samples": source.num_samples,
        "batch_size": source.batch_size,
        "sample_order": source.order_digest,
        "model": _model_digest(model),
    } | ({} if source.spec is None else {"data_spec": _jsonable(source.spec)})


def _describe(model, data) -> dict:
    """What a Python call of extract ran, for people (the command line records its arguments)."""
    dataset = getattr(data, "dataset", None)
    return {"model": type(model).__name__,
            "data": type(data).__name__ + (f" over {type(dataset).__name__}" if dataset is not None else "")}


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


def _model_digest(model: torch.nn.Module) -> str:
    """Class, parameter names, shapes, dtypes and a strided sample of every tensor's values.

    Sampling (at most 1024 values per tensor) keeps this cheap for large models while still
    telling apart two random initialisations or two checkpoints.
    """
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _make_out(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise out_error(root, error, "cannot create it") from error


def _prepare_out(root: Path, args: dict, overwrite: bool) -> None:
    """Refuse (or, with overwrite, clear) an extraction in ``out`` with other arguments."""
    existing = _existing_arguments(root)
    if existing is None:
        foreign = [p.name for p in root.iterdir() if not is_ours(p)]
        if foreign and not overwrite:
            raise ValueError(
                f"out={str(root)!r} is not empty and holds no fastcap extraction "
                f"(found {sorted(foreign)[:3]}); choose an empty or new directory"
            )
        return
    if existing == args:
        return
    if not overwrite and _committed_shards(root):
        raise ValueError(_mismatch_message(root, existing, args))
    _remove_extraction(root)  # with overwrite, or nothing was committed: nothing to lose


def _committed_shards(root: Path) -> int:
    return sum(len(read_json(path)["shards"]) for path in root.glob("rank-*.json"))


def _existing_arguments(root: Path) -> dict | None:
    candidates = [root / MANIFEST, *sorted(root.glob("rank-*.json"))]
    for path in candidates:
        if path.is_file():
            return read_json(path).get("args")
    return None


_MISMATCH_HINTS = {
    "model": " (a digest of the weights: seed the initialisation or load the same checkpoint)",
    "sample_order": " (a digest of the order the DataLoader's sampler gives: use a "
                    "deterministic sampler)",
    "world_size": " (the number of torchrun processes)",
    "data_spec": " (how the corpus was tokenized and batched: --context, --pack/--padding, ...)",
}


def _mismatch_message(root: Path, existing: dict, args: dict) -> str:
    differing = [key for key in args if existing.get(key) != args[key]]
    differing += [key for key in existing if key not in args]
    key = differing[0]
    there, now = existing.get(key), args.get(key)
    there_spec, now_spec = existing.get("data_spec"), args.get("data_spec")
    if "data_spec" in differing and isinstance(there_spec, dict) and isinstance(now_spec, dict):
        # The dataset's choice explains the rest (another --context changes num_samples too):
        # name that setting first.
        inner = [name for name in {**there_spec, **now_spec} if there_spec.get(name) != now_spec.get(name)]
        differing = [f"data_spec.{name}" for name in inner] + [k for k in differing if k != "data_spec"]
        key, there, now = differing[0], there_spec.get(inner[0]), now_spec.get(inner[0])
    others = f" (also: {', '.join(differing[1:])})" if len(differing) > 1 else ""
    hint = _MISMATCH_HINTS.get(key.partition(".")[0], "")
    return (
        f"out={str(root)!r} holds an extraction made with different arguments: {key}="
        f"{there!r} there, {now!r} now{hint}"
        f"{others}; pass overwrite=True to replace it, or choose another out"
    )



def _remove_extraction(root: Path) -> None:
    for path in root.iterdir():
        if not is_ours(path) or path.name.startswith(LOCK):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
