"""store.loader: every row exactly once per epoch (one process, reading threads, DataLoader
workers, ranks, a real 2-rank gloo run), seeded and per-epoch orders, batch shapes and dtypes,
token and sample keys, batch memory (reused only once let go; pinned), argument checks. Tiny
stores, built once per module."""
from __future__ import annotations

import collections
import json
import threading

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import fastcap
from conftest import needs_cuda
from fastcap.store import _loader as loader_module
from test_extract import WORKER, _free_port, _loader, _one_thread, _run, worker  # noqa: F401 (_one_thread: autouse)

LOADER_WORKER = WORKER.parent / "_loader_worker.py"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """30 texts, shards of 8: "rows" one row per kept token (91), "pool" one row per sample."""
    out = tmp_path_factory.mktemp("tokens")
    return fastcap.extract(worker.tiny_lm(), DataLoader(worker.Texts(30), batch_size=4), worker.TOKEN_LAYERS,
                           worker.TOKEN_REDUCE, out=out, shard_size=8, tokens=worker.tokens(), progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """50 images, shards of 16: "0" [50, 8, 8, 8] bfloat16 and "3" [50, 16] (a mean, float32)."""
    out = tmp_path_factory.mktemp("images")
    return fastcap.extract(worker.tiny_model(), _loader(50, 8), worker.LAYERS, worker.REDUCE, out=out,
                           shard_size=16, dtype=torch.bfloat16, progress=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A real 2-rank gloo run (37 texts: rank 1 pads with a duplicate): the store, and what each
    rank's loader yielded with its rank taken from torch.distributed."""
    out = tmp_path_factory.mktemp("two_ranks")
    report = out / "report"
    run = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", str(LOADER_WORKER), str(out / "store"), str(report)], timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    return fastcap.open(out / "store"), [json.loads((out / f"report.{r}").read_text()) for r in (0, 1)]


def _token_origins(store) -> list[tuple[int, int]]:
    return list(zip(store.tokens.sample.tolist(), store.tokens.position.tolist()))


def _origins(batches) -> list[tuple[int, int]]:
    """(sample, position) of every token row yielded, in order."""
    return [(int(s), int(p)) for b in batches for s, p in zip(b["sample"], b["position"])]


def _assert_rows_match_store(store, batches, key: str) -> None:
    """Each yielded row is the store's row at its origin."""
    where = {origin: row for row, origin in enumerate(_token_origins(store))}
    reference = store[key].tensor()
    for batch in batches:
        rows = [where[(int(s), int(p))] for s, p in zip(batch["sample"], batch["position"])]
        assert torch.equal(batch[key], reference[rows])
        assert torch.equal(batch["token_id"], torch.from_numpy(store.tokens.token_id[rows]))


def _once_each(origins, store) -> None:
    counts = collections.Counter(origins)
    assert max(counts.values()) == 1, "a row came twice"
    assert sorted(counts) == sorted(_token_origins(store))


# ------------------------------------------------------------------ every row exactly once


@pytest.mark.parametrize("num_workers", [0, 2])
def test_token_rows_once_per_epoch(tokens, num_workers):
    data = tokens.loader("rows", batch_size=8, window=32, with_index=True, num_workers=num_workers)
    batches = list(data)
    _once_each(_origins(batches), tokens)
    _assert_rows_match_store(tokens, batches, "rows")
    assert len(data) == len(batches) == -(-91 // 8)
    assert [len(b["rows"]) for b in batches] == [8] * 11 + [3]  # workers split on batch boundaries
    # Shuffled across shards: not the store's order, and the first batch mixes shards (8 samples each).
    assert _origins(batches) != _token_origins(tokens)
    assert len({int(sample) // 8 for sample in batches[0]["sample"]}) > 1


def test_own_dataloader_with_workers_gets_every_row_once(tokens):
    data = tokens.loader("rows", batch_size=8, window=16, with_index=True)
    batches = list(DataLoader(data, batch_size=None, num_workers=2))
    _once_each(_origins(batches), tokens)
    assert len(batches) == len(data)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_rows_disjointly(tokens, num_workers, drop_last):
    per_rank = [list(tokens.loader("rows", batch_size=8, window=16, with_index=True, rank=rank, world_size=2,
                                   num_workers=num_workers, drop_last=drop_last)) for rank in (0, 1)]
    origins = [_origins(batches) for batches in per_rank]
    assert not set(origins[0]) & set(origins[1])
    lengths = [len(tokens.loader("rows", batch_size=8, rank=r, world_size=2, drop_last=drop_last)) for r in (0, 1)]
    assert [len(batches) for batches in per_rank] == lengths
    if drop_last:  # the same number of full batches on every rank, for DDP
        assert lengths == [91 // 2 // 8] * 2
        assert all(len(b["rows"]) == 8 for batches in per_rank for b in batches)
        assert collections.Counter(origins[0] + origins[1]) <= collections.Counter(_token_origins(tokens))
    else:
        _once_each(origins[0] + origins[1], tokens)
        assert sorted(len(o) for o in origins) == [45, 46]


def test_sample_keys_bfloat16_once_per_epoch(images):
    data = images.loader(["0", "3"], batch_size=16, window=32, with_index=True, num_workers=2)
    batches = list(data)
    assert [len(b["index"]) for b in batches] == [16, 16, 16, 2] and len(data) == 4
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(50))
    for batch in batches:
        assert set(batch) == {"0", "3", "index"}
        assert batch["0"].dtype == torch.bfloat16 and batch["index"].dtype == torch.int64
        assert batch["3"].dtype == images["3"].torch_dtype == torch.float32  # a mean stays float32
        assert batch["0"].shape[1:] == (8, 8, 8) and batch["3"].shape[1:] == (16,)
        assert torch.equal(batch["0"], images["0"].tensor(batch["index"].numpy()))
        assert torch.equal(batch["3"], images["3"].tensor(batch["index"].numpy()))


def test_batch_shapes_and_dtypes_without_index(tokens):
    data = tokens.loader(["rows"], batch_size=32)
    batches = list(data)
    assert [set(b) for b in batches] == [{"rows"}] * 3
    assert [tuple(b["rows"].shape) for b in batches] == [(32, 16), (32, 16), (27, 16)]
    assert all(b["rows"].dtype == torch.float32 and b["rows"].is_contiguous() for b in batches)
    assert isinstance(data, IterableDataset)
    pooled = list(tokens.loader("pool", batch_size=8, drop_last=True, with_index=True))
    assert [tuple(b["pool"].shape) for b in pooled] == [(8, 16)] * 3 and set(pooled[0]) == {"pool", "index"}


def test_no_shuffle_is_store_order(tokens):
    batches = list(tokens.loader("rows", batch_size=8, shuffle=False, with_index=True))
    assert _origins(batches) == _token_origins(tokens)
    assert torch.equal(torch.cat([b["rows"] for b in batches]), tokens["rows"].tensor())


def test_real_two_rank_run(two_ranks):
    """Ranks from torch.distributed; the store interleaves the ranks' shards and drops rank 1's
    padding duplicate, so rows are read through the store's order."""
    store, reports = two_ranks
    origins = [[tuple(row) for row in report["rows"]] for report in reports]
    assert not set(origins[0]) & set(origins[1])
    _once_each(origins[0] + origins[1], store)
    assert [report["len"] for report in reports] == [-(-len(o) // 8) for o in origins]
    assert reports[0]["drop_last_len"] == reports[1]["drop_last_len"] == reports[0]["drop_last_batches"]


def test_interleaved_store_with_workers_and_ranks(two_ranks):
    store, _ = two_ranks
    assert not store._rows["tokens"].contiguous  # rank 0's and rank 1's samples alternate
    per_rank = [list(store.loader("rows", batch_size=8, window=32, with_index=True, rank=r, world_size=2,
                                  num_workers=2)) for r in (0, 1)]
    _once_each(_origins(per_rank[0]) + _origins(per_rank[1]), store)
    _assert_rows_match_store(store, per_rank[0] + per_rank[1], "rows")
    unshuffled = list(store.loader("rows", batch_size=8, shuffle=False, with_index=True, num_workers=2))
    assert _origins(unshuffled) == _token_origins(store)
    assert torch.equal(torch.cat([b["rows"] for b in unshuffled]), store["rows"].tensor())


@pytest.mark.parametrize("run", [1, 3, 8, 40])
def test_runs_of_any_length_read_the_right_rows_once(tokens, two_ranks, run):
    """Rows dealt in runs (single rows, runs that do not divide the batch or the window, a run
    of a whole batch, a run longer than the window), on a store in file order and on one whose
    ranks' samples alternate: every row once, each the store's row at its origin."""
    for store in (tokens, two_ranks[0]):
        for shuffle in (True, False):
            for epoch in (0, 1):
                data = store.loader("rows", batch_size=8, window=20, run=run, with_index=True, shuffle=shuffle)
                data.set_epoch(epoch)
                batches = list(data)
                _once_each(_origins(batches), store)
                _assert_rows_match_store(store, batches, "rows")


def _next_row_too(batches) -> float:
    """The share of a batch's positions whose next position is in the same batch."""
    import numpy as np
    return sum(np.isin(p + 1, p).sum() for p in batches) / sum(len(p) for p in batches)


def test_runs_read_consecutive_rows_and_single_rows_scatter(tokens):
    """With run=4 most of a batch's positions come with the next one (runs of 4, cut where a
    chunk ends); with run=1 few do (the next one is in the same batch of 8 by chance: 7 of 63)."""
    runs = list(tokens.loader("rows", batch_size=8, window=64, run=4)._positions(0, 1, 0))
    single = list(tokens.loader("rows", batch_size=8, window=64, run=1)._positions(0, 1, 0))
    assert _next_row_too(runs) > 0.6 and _next_row_too(single) < 0.25


def test_the_default_run_holds_128_kib_and_lets_a_batch_mix_16_runs(tokens, images):
    """run's default: rows for 128 KiB of all the keys' bytes, at most batch_size // 16, at least 1."""
    row_bytes = tokens["rows"].dtype.itemsize * tokens["rows"].shape[1]
    assert tokens.loader("rows", batch_size=2**20).run == -(-(128 << 10) // row_bytes)
    assert tokens.loader("rows", batch_size=64).run == 4
    assert tokens.loader("rows", batch_size=8).run == 1
    both = 8 * 8 * 8 * 2 + 16 * 4  # "0": [8, 8, 8] bfloat16, "3": [16] float32
    assert images.loader(["0", "3"], batch_size=2**20).run == -(-(128 << 10) // both)


@pytest.mark.parametrize("run", [1, 4])
def test_batches_cut_into_parts_for_copying_threads_are_the_same(tokens, two_ranks, monkeypatch, run):
    """A batch cut into parts that helper threads copy beside the consumer's thread holds what
    one thread copies (single rows and runs, both stores, shuffled or not); reading threads
    copy whole batches; an error in a part reaches the consumer."""
    copied_by = collections.Counter()
    copy = loader_module.RowLoader._copy

    def counted(self, *args):
        copied_by[threading.current_thread().name.startswith("fastcap-copy")] += 1
        return copy(self, *args)

    monkeypatch.setattr(loader_module.RowLoader, "_copy", counted)
    for store in (tokens, two_ranks[0]):
        for shuffle in (True, False):
            kwargs = {"batch_size": 8, "window": 16, "run": run, "with_index": True, "shuffle": shuffle}
            whole = [{k: v.clone() for k, v in batch.items()} for batch in store.loader("rows", **kwargs)]
            with monkeypatch.context() as split:
                split.setattr(loader_module, "_PART_BYTES", 1)
                split.setattr(loader_module, "_copy_threads", lambda: 3)
                parts = list(store.loader("rows", **kwargs))
            assert len(parts) == len(whole)
            for a, b in zip(parts, whole):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            _assert_rows_match_store(store, parts, "rows")
    assert copied_by[True] > 0 and copied_by[False] > 0
    copied_by.clear()
    with monkeypatch.context() as split:  # reading threads copy whole batches themselves
        split.setattr(loader_module, "_PART_BYTES", 1)
        split.setattr(loader_module, "_copy_threads", lambda: 3)
        _once_each(_origins(tokens.loader("rows", batch_size=8, with_index=True, num_workers=2)), tokens)
    assert copied_by[True] == 0 and copied_by[False] == 12

    def fail(self, where, fill, lo, hi):
        if threading.current_thread().name.startswith("fastcap-copy"):
            raise OSError("a part went away")
        return copy(self, where, fill, lo, hi)

    monkeypatch.setattr(loader_module.RowLoader, "_copy", fail)
    monkeypatch.setattr(loader_module, "_PART_BYTES", 1)
    monkeypatch.setattr(loader_module, "_copy_threads", lambda: 2)
    with pytest.raises(OSError, match="a part went away"):
        list(tokens.loader("rows", batch_size=8))


# ------------------------------------------------------------------ reading threads


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [2, 3])
def test_threads_give_the_batches_of_dataloader_workers(tokens, workers):
    """num_workers threads yield what DataLoader worker processes over the same loader yield,
    batch by batch, in the same order."""
    kwargs = {"batch_size": 8, "window": 16, "with_index": True, "seed": 5}
    threads = list(tokens.loader("rows", num_workers=workers, **kwargs))
    processes = list(DataLoader(tokens.loader("rows", **kwargs), batch_size=None, num_workers=workers))
    assert len(threads) == len(processes) == 12
    for a, b in zip(threads, processes):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reading_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("fastcap-loader")]


def test_leaving_early_stops_the_threads(tokens):
    batches = iter(tokens.loader("rows", batch_size=8, num_workers=2))
    next(batches)
    batches.close()
    assert not _reading_threads()


def test_an_error_in_a_thread_reaches_the_consumer(tokens, monkeypatch):
    data = tokens.loader("rows", batch_size=8, num_workers=2)

    def fail(positions, pool):
        raise OSError("the disk went away")

    monkeypatch.setattr(data, "_batch", fail)
    with pytest.raises(OSError, match="the disk went away"):
        list(data)
    assert not _reading_threads()


# ------------------------------------------------------------------ batch memory


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_training_loop_reuses_the_same_batch_memory(tokens, num_workers):
    """A loop that lets each batch go reads every epoch into the same few batches of memory (two
    without threads; the pool's size with them), each batch right while it is used."""
    data = tokens.loader("rows", batch_size=8, window=16, with_index=True, num_workers=num_workers)
    pointers = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        for batch in data:
            pointers.add(batch["rows"].data_ptr())
            _assert_rows_match_store(tokens, [batch], "rows")
    assert len(pointers) == 2 if num_workers == 0 else len(pointers) <= loader_module._POOL + 3 * num_workers


def test_a_new_loader_per_epoch_reuses_the_stores_batch_memory(tokens):
    """Loaders of one store with the same batch size and keys share its batch memory: a new
    loader each epoch allocates none after the first (a loader of another batch size has its
    own)."""
    pointers = set()
    for epoch in range(3):
        for batch in tokens.loader("rows", batch_size=8, window=16, with_index=True, seed=epoch):
            pointers.add(batch["rows"].data_ptr())
            _assert_rows_match_store(tokens, [batch], "rows")
    assert len(pointers) == 2
    other = {batch["rows"].data_ptr() for batch in tokens.loader("rows", batch_size=5, with_index=True)}
    assert not other & pointers


def test_held_batches_views_and_arrays_stay_valid(tokens):
    """Memory is reused only once nothing refers to it: batches, views of them, and numpy arrays
    of them keep what they held when handed out while later epochs read."""
    data = tokens.loader("rows", batch_size=8, window=16, with_index=True)
    held, then = [], []
    for keep in (lambda tensor: tensor, lambda tensor: tensor[2:5], lambda tensor: tensor.numpy()):
        for batch in data:  # the batches themselves let go, but for the first round
            held.append({name: keep(tensor) for name, tensor in batch.items()})
            then.append({name: torch.as_tensor(value).clone() for name, value in held[-1].items()})
    for epoch in (1, 2):
        data.set_epoch(epoch)
        for _ in data:
            pass
    for kept, copy in zip(held, then):
        assert all(torch.equal(torch.as_tensor(kept[name]), copy[name]) for name in copy)
    _assert_rows_match_store(tokens, then, "rows")


def test_without_torchs_use_count_every_batch_is_new_memory(tokens, monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    data = tokens.loader("rows", batch_size=8, window=16, with_index=True)
    kept = []
    for batch in data:
        _assert_rows_match_store(tokens, [batch], "rows")
        kept.append(batch)
    assert len({batch["rows"].data_ptr() for batch in kept}) == len(kept)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback without CUDA")
def test_pin_memory_without_cuda_warns_and_reads_ordinary_memory(tokens):
    with pytest.warns(UserWarning, match=r"pin_memory=True, but CUDA is not available: batches are in "
                                         r"ordinary \(pageable\) memory"):
        data = tokens.loader("rows", batch_size=8, window=16, with_index=True, pin_memory=True)
    batches = list(data)
    _once_each(_origins(batches), tokens)
    _assert_rows_match_store(tokens, batches, "rows")
    assert not any(tensor.is_pinned() for batch in batches for tensor in batch.values())


@needs_cuda
@pytest.mark.parametrize("num_workers", [0, 2])
def test_pin_memory_gives_pinned_batches(tokens, num_workers):
    """Every tensor of every batch pinned; non_blocking copies of batches let go at once are
    right (torch's pinned cache reuses a block only once its copies are done)."""
    data = tokens.loader("rows", batch_size=8, window=16, with_index=True, pin_memory=True,
                         num_workers=num_workers)
    batches = list(data)
    assert all(tensor.is_pinned() for batch in batches for tensor in batch.values())
    _once_each(_origins(batches), tokens)
    _assert_rows_match_store(tokens, batches, "rows")
    on_device = [batch["rows"].cuda(non_blocking=True) for batch in data]
    torch.cuda.synchronize()
    assert torch.equal(torch.cat(on_device).cpu(), torch.cat([batch["rows"] for batch in batches]))


# ------------------------------------------------------------------ order


def _order(data) -> list[tuple[int, int]]:
    return _origins(list(data))


def test_same_seed_same_batches_other_seed_other_order(tokens):
    first = list(tokens.loader("rows", batch_size=8, window=16, seed=3, with_index=True))
    again = list(tokens.loader("rows", batch_size=8, window=16, seed=3, with_index=True))
    assert len(first) == len(again)
    for a, b in zip(first, again):  # batch by batch
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _order(tokens.loader("rows", batch_size=8, window=16, seed=4, with_index=True)) != _origins(first)
    workers = tokens.loader("rows", batch_size=8, window=16, seed=3, with_index=True, num_workers=2)
    assert _order(workers) == _order(workers)


def _reference_positions(data, worker: int, workers: int, epoch: int):
    """The batches of positions as the loader dealt them before it sorted a window at once: the
    same permutation per window, each batch sorted on its own."""
    import numpy as np
    start, stop, _ = data._rank_range()
    capacity = min(data.window if data.shuffle else data.batch_size, stop - start)
    if capacity <= 0:
        return
    rng = np.random.default_rng([data.seed, epoch, data.rank, worker, workers])
    window, size = [], data.batch_size

    def deal(final):
        order = np.arange(len(window))
        if data.shuffle and len(window) > size and data.run == 1:
            order = rng.permutation(len(window))
        elif data.shuffle and len(window) > size:  # runs of data.run consecutive positions, shuffled
            runs = []
            for place, position in enumerate(window):
                if runs and len(runs[-1]) < data.run and window[place - 1] + 1 == position:
                    runs[-1].append(place)
                else:
                    runs.append([place])
            order = np.concatenate([runs[i] for i in rng.permutation(len(runs))])
        full = len(window) if final else len(window) // size * size
        dealt = [np.asarray(window)[order[first:min(first + size, full)]] for first in range(0, full, size)]
        return [np.sort(p) if data.shuffle else p for p in dealt], list(np.asarray(window)[order[full:]])

    for a, b in data._worker_runs(worker, workers, epoch):
        for position in range(a, b):
            window.append(position)
            if len(window) == capacity:
                batches, window = deal(False)
                yield from batches
    yield from deal(True)[0]


@pytest.mark.parametrize("batch_size, window, run", [(8, 16, 1), (8, 20, 1), (5, 64, 1), (8, 8, 1), (3, 1000, 1),
                                                     (8, None, 1), (8, 20, 3), (5, 64, 4), (8, 16, 16)])
def test_batches_are_the_dealt_positions_sorted(tokens, two_ranks, batch_size, window, run):
    """Sorting each window at once gives each batch exactly the positions a permutation of the
    window's runs deals it, in ascending order, as a sort per batch did (windows that are a
    multiple of the batch or not, one batch, a window beyond the rows, runs that divide the
    window or not; ranks, workers, epochs)."""
    import numpy as np
    for store in (tokens, two_ranks[0]):
        for rank, world_size, workers in ((0, 1, 1), (1, 2, 1), (0, 1, 3)):
            data = store.loader("rows", batch_size=batch_size, window=window, run=run, rank=rank,
                                world_size=world_size)
            for epoch in (0, 1):
                for worker in range(workers):
                    got = list(data._positions(worker, workers, epoch))
                    want = list(_reference_positions(data, worker, workers, epoch))
                    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_set_epoch_changes_the_order(tokens):
    data = tokens.loader("rows", batch_size=8, window=16, with_index=True)
    epoch0 = _order(data)
    data.set_epoch(1)
    epoch1 = _order(data)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    data.set_epoch(0)
    assert _order(data) == epoch0
    data.set_epoch(1)
    assert _order(DataLoader(data, batch_size=None, num_workers=2)) != _order(
        DataLoader(tokens.loader("rows", batch_size=8, window=16, with_index=True), batch_size=None, num_workers=2))


# ------------------------------------------------------------------ errors


def test_mixing_token_and_sample_keys_is_an_error(tokens):
    with pytest.raises(ValueError, match=r"'rows': 91 rows \(one per kept token\), "
                                         r"'pool': 30 rows \(one per sample\)"):
        tokens.loader(["rows", "pool"])


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
    ({"window": 4, "batch_size": 8}, r"window must be an integer >= batch_size=8 .*got 4"),
    ({"run": 0}, "run must be an integer >= 1, got 0"),
    ({"run": True}, "run must be an integer >= 1, got True"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"rank": 2, "world_size": 2}, r"rank must be an integer in \[0, world_size=2\), got 2"),
    ({"rank": -1, "world_size": 2}, r"rank must be an integer in \[0, world_size=2\), got -1"),
    ({"rank": 0, "world_size": 0}, "world_size must be an integer >= 1, got 0"),
    ({"rank": 1}, "pass rank= and world_size= together, got rank=1, world_size=None"),
    ({"keys": []}, "keys must be a key or a non-empty list of keys, got"),
    ({"keys": ["rows", "rows"]}, "names a key twice"),
], ids=["batch0", "batch-float", "window", "run0", "run-bool", "workers", "seed", "rank-high", "rank-negative", "world0", "rank-alone",
        "no-keys", "twice"])
def test_bad_arguments(tokens, kwargs, match):
    kwargs = {"keys": "rows"} | kwargs
    with pytest.raises(ValueError, match=match):
        tokens.loader(**kwargs)


def test_unknown_key_and_epoch(tokens):
    with pytest.raises(KeyError, match="'row' is not in the store.*did you mean"):
        tokens.loader(["rows", "row"])
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got -1"):
        tokens.loader("rows").set_epoch(-1)
