"""Hugging Face datasets as input (issue 22, item 3): a Dataset.save_to_disk folder on the command
line (--text-field / --ids-field), a datasets.Dataset in Python, equal to the same corpus given
as .jsonl / .npy; its fingerprint in the data spec that resume checks; columns of padded rows
kept; resume and torchrun as for .jsonl."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fastcap
from fastcap.cli import main
from fastcap.text import make_text_dataset
from test_extract import WORKER, _free_port, _one_thread, _run  # noqa: F401 (autouse fixture)
from test_text import BOS, MODEL, assert_rows_equal, captured, random_model, save_tokenizer, texts, write_jsonl

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _quiet_datasets():
    """No "Saving the dataset" bars in the test output."""
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def cli(*args: str) -> int:
    return main(["extract", "--batch-size", "4", "--shard-size", "8", *args])


def saved(path, columns: dict) -> str:
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


def ids_documents() -> np.ndarray:
    return np.random.default_rng(3).integers(4, 97, (7, 10))


@pytest.mark.parametrize("rows", [["--pack"], ["--padding", "left"]], ids=["packed", "padded"])
def test_a_text_column_equals_the_same_jsonl(tmp_path, rows):
    tokenizer = save_tokenizer(tmp_path / "tok")
    corpus = write_jsonl(tmp_path / "corpus.jsonl")
    folder = saved(tmp_path / "ds", {"text": texts(), "id": list(range(len(texts())))})
    common = ["--model", MODEL, "--tokenizer", tokenizer, "--context", "6", *rows,
              "--layers", "transformer.h.0,transformer.h.1", "--reduce", "tokens"]
    assert cli(*common, "--data", corpus, "--out", str(tmp_path / "jsonl")) == 0
    assert cli(*common, "--data", folder, "--out", str(tmp_path / "hf")) == 0
    jsonl, hf = fastcap.open(tmp_path / "jsonl"), fastcap.open(tmp_path / "hf")
    for key in jsonl:
        assert torch.equal(hf[key].tensor(), jsonl[key].tensor()), key
    for field in ("sample", "position", "token_id"):
        assert np.array_equal(getattr(hf.tokens, field), getattr(jsonl.tokens, field)), field
    spec = hf.manifest["args"]["data_spec"]
    assert spec["corpus"] == "datasets" and spec["text_field"] == "text" and spec["ids_field"] is None
    assert spec["fingerprint"] == datasets.load_from_disk(folder)._fingerprint
    assert spec["ids_digest"] == jsonl.manifest["args"]["data_spec"]["ids_digest"]  # the same ids


def test_an_ids_column_equals_the_same_npy(tmp_path):
    ids = ids_documents()
    np.save(tmp_path / "ids.npy", ids)
    folder = saved(tmp_path / "ds", {"input_ids": ids.tolist(), "tokens_per_doc": [10] * len(ids)})
    common = ["--model", MODEL, "--context", "8", "--pack", "--layers", "transformer.h.1", "--reduce", "tokens",
              "--skip-ids", "bos"]
    assert cli(*common, "--data", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "npy")) == 0
    assert cli(*common, "--data", folder, "--out", str(tmp_path / "hf")) == 0  # input_ids: the default column
    npy, hf = fastcap.open(tmp_path / "npy"), fastcap.open(tmp_path / "hf")
    assert torch.equal(hf["transformer.h.1"].tensor(), npy["transformer.h.1"].tensor())
    assert np.array_equal(hf.tokens.token_id, npy.tokens.token_id)
    assert hf.manifest["args"]["data_spec"]["ids_field"] == "input_ids"

    # The same rows in Python, from the Dataset object itself.
    model = random_model()
    data = make_text_dataset(datasets.load_from_disk(folder), context=8, pack=True, config=model.config)
    result, index = captured(model, DataLoader(data, batch_size=4), "transformer.h.1", "tokens",
                             fastcap.Tokens(skip_ids=[BOS]))
    assert_rows_equal(hf, result, index)


def test_the_fingerprint_is_checked_on_resume(tmp_path, capsys):
    folder = tmp_path / "ds"
    saved(folder, {"input_ids": ids_documents().tolist()})
    args = ["--model", MODEL, "--data", str(folder), "--context", "8", "--pack", "--layers", "transformer.h.1",
            "--reduce", "tokens", "--out", str(tmp_path / "acts")]
    assert cli(*args) == 0
    assert cli(*args) == 0  # the same dataset: nothing to do
    capsys.readouterr()
    changed = ids_documents()
    changed[0, 0] = 5
    saved(tmp_path / "ds2", {"input_ids": changed.tolist()})
    import shutil

    shutil.rmtree(folder)
    shutil.move(tmp_path / "ds2", folder)
    assert cli(*args) == 1
    assert "data_spec.fingerprint=" in capsys.readouterr().err


def test_text_and_ids_fields_and_their_errors(tmp_path, capsys):
    tokenizer = save_tokenizer(tmp_path / "tok")
    folder = saved(tmp_path / "ds", {"body": texts(), "input_ids": ids_documents().tolist()[:1] * len(texts())})
    base = ["--model", MODEL, "--tokenizer", tokenizer, "--data", folder, "--context", "8", "--layers",
            "transformer.h.1", "--reduce", "mean", "--tokens"]
    assert cli(*base, "--text-field", "body", "--out", str(tmp_path / "a")) == 0
    assert fastcap.open(tmp_path / "a").manifest["args"]["data_spec"]["text_field"] == "body"
    cases = [
        (["--ids-field", "nope"], "has no column 'nope' (--ids-field); its columns: ['body', 'input_ids']"),
        (["--text-field", "input_ids"], "--text-field 'input_ids': row 0 holds a list, not a string"),
        (["--ids-field", "body"], "--ids-field 'body': row 0 is not a list of integer ids"),
        (["--text-field", "body", "--ids-field", "input_ids"], "pass one of them"),
    ]
    for extra, message in cases:
        assert cli(*base, *extra, "--out", str(tmp_path / "b")) == 1, extra
        assert message in capsys.readouterr().err, extra
    assert cli("--model", MODEL, "--data", str(tmp_path / "x.npy"), "--ids-field", "ids", "--context", "8",
               "--layers", "transformer.h.1", "--out", str(tmp_path / "c")) == 1
    assert "names a column of a Hugging Face dataset" in capsys.readouterr().err
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    assert cli(*base[:5], str(tmp_path / "dd"), *base[6:], "--out", str(tmp_path / "d")) == 1
    assert "holds a DatasetDict (splits ['train']): pass one split's folder" in capsys.readouterr().err


def test_a_dataloader_over_a_tokenized_dataset(tmp_path):
    """The Hugging Face way: map a tokenizer, with_format("torch"), a DataLoader; a label column kept."""
    ids = ids_documents()
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                                          "label": [i % 3 for i in range(len(ids))]}).with_format("torch")
    model = random_model()
    store = fastcap.extract(model, DataLoader(dataset, batch_size=3), "transformer.h.1", "mean", out=tmp_path,
                            tokens=fastcap.Tokens(), keep_columns="label")
    assert store.columns["label"].tolist() == [i % 3 for i in range(len(ids))]
    assert store.manifest["args"]["data_spec"]["fingerprint"] == dataset._fingerprint
    with torch.inference_mode(), fastcap.capture(model, "transformer.h.1", "mean", tokens=fastcap.Tokens()) as cap:
        model(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.int64))
    torch.testing.assert_close(store["transformer.h.1"].tensor(), cap.result()["transformer.h.1"])
    with pytest.raises(TypeError, match=r"data is a datasets.Dataset; extract takes batches: wrap it in a DataLoader"):
        fastcap.extract(model, dataset, "transformer.h.1", "mean", out=tmp_path / "bare")


def test_without_the_datasets_package_the_error_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    folder = saved(tmp_path / "ds", {"input_ids": ids_documents().tolist()})
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    assert cli("--model", MODEL, "--data", folder, "--context", "8", "--layers", "transformer.h.1",
               "--out", str(tmp_path / "acts")) == 1
    assert "pip install datasets" in capsys.readouterr().err
    monkeypatch.undo()


def test_dataset_columns_resumed_and_under_torchrun(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok")
    folder = saved(tmp_path / "ds", {"text": texts(), "stars": [i % 5 for i in range(len(texts()))],
                                     "id": [f"doc-{i}" for i in range(len(texts()))]})
    args = ["extract", "--model", MODEL, "--tokenizer", tokenizer, "--data", folder, "--context", "8",
            "--layers", "transformer.h.1", "--reduce", "mean", "--tokens", "--keep-columns", "stars,id",
            "--batch-size", "2", "--shard-size", "4"]
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    store = fastcap.open(single)
    assert store.columns["stars"].tolist() == [i % 5 for i in store.indices]

    # Interrupted after its first shard (as a kill leaves it), then resumed by the same command.
    manifest = json.loads((single / "rank-00000.json").read_text())
    del manifest["shards"][1:]
    manifest["complete"] = False
    (single / "rank-00000.json").write_text(json.dumps(manifest))
    (single / "manifest.json").unlink()
    assert main([*args, "--out", str(single)]) == 0
    resumed = fastcap.open(single)
    assert resumed.columns["id"].tolist() == [f"doc-{i}" for i in resumed.indices]
    assert torch.equal(resumed["transformer.h.1"].tensor(), store["transformer.h.1"].tensor())

    multi = tmp_path / "multi"
    run = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "fastcap", *args, "--out", str(multi)], timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    two = fastcap.open(multi)
    assert two.manifest["world_size"] == 2 and np.array_equal(two.indices, np.arange(len(texts())))
    assert two.columns["stars"].tolist() == store.columns["stars"].tolist()
    assert two.columns["id"].tolist() == store.columns["id"].tolist()
    torch.testing.assert_close(two["transformer.h.1"].tensor(), store["transformer.h.1"].tensor())
