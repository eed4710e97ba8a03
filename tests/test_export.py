"""fastcap export --format saelens (issue 22, item 5): the folder loads back with
datasets.load_from_disk, its features and values equal to the store's rows and token ids, in
store order or shuffled; stores whose samples kept different token counts are refused; SAELens's
own ActivationsStore reads it when sae_lens is installed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastcap
import fastcap.export
from fastcap.cli import main
from test_extract import _one_thread  # noqa: F401 (autouse: results are compared bit-wise)
from test_text import MODEL

datasets = pytest.importorskip("datasets")

KEY = "transformer.h.1"


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def packed_store(out, *extra: str) -> fastcap.Store:
    """fake-text packed into rows of 8 tokens, every token kept (no --skip-ids)."""
    assert main(["extract", "--model", MODEL, "--data", "fake-text:6", "--context", "8", "--pack",
                 "--layers", f"{KEY},pooled={KEY}", "--reduce", "tokens,pooled=mean", "--batch-size", "4",
                 "--shard-size", "8", "--out", str(out), *extra]) == 0
    return fastcap.open(out)


def test_export_loads_back_equal_to_the_store(tmp_path, capsys):
    store = packed_store(tmp_path / "acts", "--dtype", "bfloat16")  # exported as float32
    rows = store[KEY].tensor().float().numpy()
    sequences = len(store.indices)
    assert main(["export", str(tmp_path / "acts"), "--format", "saelens", "--key", KEY,
                 "--to", str(tmp_path / "cache"), "--max-shard-size", "20000"]) == 0
    assert f"{sequences} sequences of 8 tokens x 32" in capsys.readouterr().out
    cache = datasets.load_from_disk(str(tmp_path / "cache"))
    assert isinstance(cache, datasets.Dataset) and len(cache) == sequences
    assert cache.features[KEY] == datasets.Array2D(shape=(8, 32), dtype="float32")
    assert cache.features["token_ids"] == datasets.Sequence(datasets.Value("int32"), length=8)
    assert len(list((tmp_path / "cache").glob("data-*.arrow"))) > 1  # in shards of at most 20000 bytes
    values = np.asarray(cache.with_format("numpy")[KEY])
    assert values.dtype == np.float32 and np.array_equal(values.reshape(-1, 32), rows)
    ids = np.asarray(cache.with_format("numpy")["token_ids"])
    assert np.array_equal(ids.reshape(-1), store.tokens.token_id)
    assert str(cache.data.schema.field("token_ids").type.value_type) == "int32"  # on disk

    assert main(["export", str(tmp_path / "acts"), "--format", "saelens", "--key", KEY,
                 "--to", str(tmp_path / "shuffled"), "--shuffle", "--seed", "3"]) == 0
    shuffled = datasets.load_from_disk(str(tmp_path / "shuffled")).with_format("numpy")
    order = np.random.default_rng(3).permutation(sequences)
    assert not np.array_equal(order, np.arange(sequences))
    assert np.array_equal(np.asarray(shuffled[KEY]), values[order])
    assert np.array_equal(np.asarray(shuffled["token_ids"]), ids[order])


def test_export_refusals_say_why(tmp_path, capsys):
    store = packed_store(tmp_path / "skip", "--skip-ids", "bos")  # some rows keep 7 tokens, some 6
    assert len(set(np.bincount(store.tokens.sample))) > 1
    export = ["export", str(tmp_path / "skip"), "--format", "saelens", "--to", str(tmp_path / "cache")]
    assert main([*export, "--key", KEY]) == 1
    err = capsys.readouterr().err
    assert "samples kept different numbers of token rows (6 to 7)" in err and "without --skip-ids" in err
    assert main([*export, "--key", "pooled"]) == 1
    assert "'pooled' holds one row per sample" in capsys.readouterr().err
    assert main([*export, "--key", "nope"]) == 1
    assert "'nope' is not in the store" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()

    packed_store(tmp_path / "all")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    taken = ["export", str(tmp_path / "all"), "--format", "saelens", "--key", KEY, "--to", str(tmp_path / "taken")]
    assert main(taken) == 1
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "taken" / "mine.txt").exists()
    assert main([*taken, "--overwrite"]) == 0 and not (tmp_path / "taken" / "mine.txt").exists()
    assert not list(tmp_path.glob(".fastcap-export-*"))  # the work folder is gone


def test_store_loader_feeds_a_trainer_batches_of_vectors(tmp_path):
    """SAELens's SAETrainer takes any iterator of [batch, d] tensors (its DataProvider)."""
    store = packed_store(tmp_path / "acts")
    data = store.loader(KEY, batch_size=16, shuffle=True, seed=0)

    def provider():
        epoch = 0
        while True:
            data.set_epoch(epoch)
            yield from (batch[KEY] for batch in data)
            epoch += 1

    batches = provider()
    seen = [next(batches) for _ in range(len(data) + 1)]  # into the second epoch
    assert all(batch.shape[1] == 32 and batch.dtype == torch.float32 for batch in seen)
    assert sum(len(batch) for batch in seen[:len(data)]) == len(store[KEY])


def test_sae_lens_reads_the_export(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed (not a dependency of fastcap)")
    from sae_lens.training.activations_store import ActivationsStore

    store = packed_store(tmp_path / "acts")
    fastcap.export.to_saelens(tmp_path / "acts", KEY, tmp_path / "cache")
    reader = ActivationsStore(
        model=None, dataset=datasets.Dataset.from_dict({"input_ids": [[0] * 8]}), streaming=False, hook_name=KEY,
        hook_head_index=None, context_size=8, d_in=32, n_batches_in_buffer=2, total_training_tokens=64,
        store_batch_size_prompts=2, train_batch_size_tokens=16, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32", cached_activations_path=str(tmp_path / "cache"))
    assert reader.cached_activation_dataset.features[KEY].shape == (8, 32)
    assert sae_lens is not None and len(reader.cached_activation_dataset) == len(store.indices)
