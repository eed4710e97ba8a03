"""Labels and other columns kept beside the features (issue 22, item 4): an image folder's class
index, named fields of dict batches and text corpora, stored per sample and aligned with
``store.indices``, also resumed after a SIGKILL and under torchrun; ``store.loader(with_columns=)``."""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import fastcap
from fastcap.cli import main
from test_extract import WORKER, _free_port, _one_thread, _run, worker  # noqa: F401 (autouse fixture)

PIL = pytest.importorskip("PIL.Image")


def image_folder(root, per_class=(3, 2, 4)) -> str:
    """Class folders a/, b/, c/ of small PNGs of different sizes and colours."""
    generator = np.random.default_rng(0)
    for label, count in enumerate(per_class):
        folder = root / "abc"[label]
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = generator.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8)
            PIL.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)


class Records(Dataset):
    """Dict items: an image, an int label, a float score and a string id."""

    def __len__(self):
        return 37

    def __getitem__(self, index):
        return {"x": worker.Images(37)[index][0], "label": index % 5, "score": index / 4, "id": f"item-{index}"}


def test_dict_batch_columns_are_stored_aligned_and_kept_off_the_model(tmp_path):
    model = worker.tiny_model()
    seen = []
    store = fastcap.extract(model, DataLoader(Records(), batch_size=4), "3", "mean", out=tmp_path, shard_size=8,
                            keep_columns=["label", "score", "id"],
                            forward=lambda m, batch: (seen.append(sorted(batch)), m(batch["x"])))
    assert seen[0] == ["x"]  # the kept columns never reach the forward
    indices = store.indices
    assert np.array_equal(store.columns["label"], indices % 5) and store.columns["label"].dtype == np.int64
    assert np.array_equal(store.columns["score"], indices / 4)
    assert store.columns["id"].tolist() == [f"item-{i}" for i in indices]
    reopened = fastcap.open(tmp_path)
    assert list(reopened.columns) == ["label", "score", "id"]
    reopened.verify()  # the column files are checksummed like the keys
    assert reopened.manifest["args"]["columns"] == ["label", "score", "id"]


def test_loader_with_columns_for_sample_and_token_rows(tmp_path):
    store = fastcap.extract(worker.tiny_model(), DataLoader(Records(), batch_size=4), "3", "mean",
                            out=tmp_path / "images", shard_size=8, keep_columns=["label", "id"],
                            forward=lambda m, batch: m(batch["x"]))
    seen = []
    for batch in store.loader("3", batch_size=8, with_columns="label", with_index=True):
        assert batch["label"].dtype == torch.int64
        assert torch.equal(batch["label"], batch["index"] % 5)
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(37))
    with pytest.raises(ValueError, match="'id' holds <U7 values"):
        store.loader("3", with_columns="id")
    with pytest.raises(ValueError, match="'nope' is not a column"):
        store.loader("3", with_columns=["nope"])

    texts = DataLoader(worker.Texts(30, columns=True), batch_size=4)
    tokens = fastcap.extract(worker.tiny_lm(), texts, worker.TOKEN_LAYERS, worker.TOKEN_REDUCE, out=tmp_path / "lm",
                             shard_size=8, tokens=worker.tokens(), keep_columns=["label", "id"])
    rows = 0
    for batch in tokens.loader("rows", batch_size=16, with_columns=["label"], with_index=True):
        assert torch.equal(batch["label"], 3 * batch["sample"])  # each token row gets its sample's label
        rows += len(batch["rows"])
    assert rows == len(tokens["rows"])


def test_bad_columns_are_named(tmp_path):
    model, loader = worker.tiny_model(), DataLoader(Records(), batch_size=4)
    forward = lambda m, batch: m(batch["x"])  # noqa: E731
    with pytest.raises(ValueError, match=r"the batch has no field 'lable'; its fields are \['id', 'label'"):
        fastcap.extract(model, loader, "3", "mean", out=tmp_path / "a", keep_columns="lable", forward=forward)
    images = DataLoader(worker.Images(8), batch_size=4)
    with pytest.raises(ValueError, match=r"a batch of \(input, label\) has one column, 'label'"):
        fastcap.extract(model, images, "3", "mean", out=tmp_path / "b", keep_columns="id")
    with pytest.raises(ValueError, match="names a column twice"):
        fastcap.extract(model, images, "3", "mean", out=tmp_path / "c", keep_columns=["label", "label"])
    with pytest.raises(TypeError, match="keep_columns must be a name or a list of names"):
        fastcap.extract(model, images, "3", "mean", out=tmp_path / "d", keep_columns=3)


def test_image_folder_labels_on_the_command_line(tmp_path, capsys):
    folder = image_folder(tmp_path / "photos")
    out = tmp_path / "feats"
    args = ["extract", "--model", "_extract_worker:tiny_model", "--data", folder, "--image-size", "16",
            "--layers", "3", "--reduce", "mean", "--batch-size", "2", "--shard-size", "4", "--out", str(out)]
    assert main(args) == 0
    store = fastcap.open(out)
    assert np.array_equal(store.indices, np.arange(9))
    assert store.columns["label"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]  # a, b, c in sorted order
    assert store.manifest["description"]["classes"] == ["a", "b", "c"]
    assert "resize 18 (shorter side), center crop 16" in store.manifest["description"]["preprocessing"]

    # The same features and labels as a hand-built ImageFolder with the documented preprocessing.
    import torchvision

    from fastcap.models import image_transform

    reference = torchvision.datasets.ImageFolder(folder, transform=image_transform(16))
    model = worker.tiny_model()
    with torch.inference_mode(), fastcap.capture(model, "3", "mean") as cap:
        for x, _ in DataLoader(reference, batch_size=2):
            model(x)
    assert torch.equal(store["3"].tensor(), cap.result()["3"])
    assert store.columns["label"].tolist() == reference.targets


def test_a_store_made_before_labels_were_kept_resumes_without_them(tmp_path, capsys):
    folder = image_folder(tmp_path / "photos")
    out = tmp_path / "feats"
    args = ["extract", "--model", "_extract_worker:tiny_model", "--data", folder, "--image-size", "16",
            "--layers", "3", "--reduce", "mean", "--batch-size", "2", "--shard-size", "4", "--out", str(out)]
    assert main([*args, "--keep-columns", ""]) == 0  # as fastcap did before: no columns
    manifest = json.loads((out / "rank-00000.json").read_text())
    assert "columns" not in manifest["args"]
    # Remove the last shard, as if that older run had been killed: the same command finishes it.
    manifest["shards"].pop()
    manifest["complete"] = False
    (out / "rank-00000.json").write_text(json.dumps(manifest))
    (out / "manifest.json").unlink()
    assert main(args) == 0
    store = fastcap.open(out)
    assert store.complete and store.columns == {} and len(store.indices) == 9


def test_padded_text_keeps_jsonl_fields(tmp_path):
    from test_text import MODEL, save_tokenizer, texts

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text, "id": f"doc-{i}", "stars": i % 5}) + "\n"
                              for i, text in enumerate(texts())))
    out = tmp_path / "acts"
    assert main(["extract", "--model", MODEL, "--tokenizer", save_tokenizer(tmp_path / "tok"), "--data", str(corpus),
                 "--context", "12", "--layers", "transformer.h.1", "--reduce", "mean", "--tokens",
                 "--keep-columns", "stars,id", "--batch-size", "4", "--shard-size", "8", "--out", str(out)]) == 0
    store = fastcap.open(out)
    assert store.columns["stars"].tolist() == [i % 5 for i in store.indices]
    assert store.columns["id"].tolist() == [f"doc-{i}" for i in store.indices]


@pytest.mark.parametrize("args, message", [
    (["--pack"], "a packed row holds pieces of several documents"),
    (["--keep-columns", "nope"], "no field --keep-columns 'nope'"),
])
def test_text_columns_errors(tmp_path, capsys, args, message):
    from test_text import MODEL, save_tokenizer, write_jsonl

    base = ["extract", "--model", MODEL, "--tokenizer", save_tokenizer(tmp_path / "tok"),
            "--data", write_jsonl(tmp_path / "c.jsonl"), "--context", "12", "--layers", "transformer.h.1",
            "--reduce", "mean", "--tokens", "--out", str(tmp_path / "out")]
    extra = args if "--keep-columns" in args else ["--keep-columns", "id", *args]
    assert main([*base, *extra]) == 1
    assert message in capsys.readouterr().err


def test_columns_survive_sigkill_and_resume(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    first = _run([str(WORKER), str(killed), "--keep-columns", "--kill-at", "150"])
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert _run([str(WORKER), str(killed), "--keep-columns"]).returncode == 0
    assert _run([str(WORKER), str(clean), "--keep-columns"]).returncode == 0
    resumed, whole = fastcap.open(killed), fastcap.open(clean)
    assert np.array_equal(resumed.columns["label"], 3 * resumed.indices)
    assert np.array_equal(resumed.columns["label"], whole.columns["label"])
    assert _run([str(WORKER), str(killed)]).returncode == 1  # without the column: other arguments


def test_torchrun_keeps_columns_aligned(tmp_path):
    multi = tmp_path / "multi"
    args = ["--samples", "37", "--batch-size", "4", "--shard-size", "8", "--tokens", "--keep-columns"]
    run = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", str(WORKER), str(multi), *args], timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    store = fastcap.open(multi)
    assert sum(shard["samples"] for shard in store.manifest["shards"]) == 38  # one padding duplicate ...
    assert np.array_equal(store.indices, np.arange(37))  # ... dropped, with its column values
    assert np.array_equal(store.columns["label"], 3 * np.arange(37))
    assert store.columns["id"].tolist() == [f"text-{i}" for i in range(37)]
    for batch in store.loader("rows", batch_size=32, with_columns="label", with_index=True):
        assert torch.equal(batch["label"], 3 * batch["sample"])


def test_image_folder_labels_resumed_and_under_torchrun(tmp_path):
    folder = image_folder(tmp_path / "photos", per_class=(4, 3, 6))
    args = ["extract", "--model", "_extract_worker:tiny_model", "--data", folder, "--image-size", "16",
            "--layers", "3", "--reduce", "mean", "--batch-size", "2", "--shard-size", "4"]
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    whole = fastcap.open(single)
    expected = [0] * 4 + [1] * 3 + [2] * 6

    # Interrupted after its first shard (as a kill leaves it), then resumed by the same command.
    manifest = json.loads((single / "rank-00000.json").read_text())
    del manifest["shards"][1:]
    manifest["complete"] = False
    (single / "rank-00000.json").write_text(json.dumps(manifest))
    (single / "manifest.json").unlink()
    assert main([*args, "--out", str(single)]) == 0
    resumed = fastcap.open(single)
    assert resumed.columns["label"].tolist() == expected and np.array_equal(resumed.indices, np.arange(13))
    assert torch.equal(resumed["3"].tensor(), whole["3"].tensor())

    multi = tmp_path / "multi"
    run = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "fastcap", *args, "--out", str(multi)], timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    two = fastcap.open(multi)
    assert two.manifest["world_size"] == 2 and np.array_equal(two.indices, np.arange(13))
    assert sum(shard["samples"] for shard in two.manifest["shards"]) == 14  # a padding duplicate, dropped
    assert two.columns["label"].tolist() == expected
    torch.testing.assert_close(two["3"].tensor(), whole["3"].tensor())
