"""fastcap.layers / fastcap layers (issue 22, item 1) against a forward of our own, and fastcap
info / fastcap verify (item 2) on a good, an unfinished and a damaged store."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

import fastcap
from fastcap.cli import VERIFY_DAMAGED, VERIFY_INCOMPLETE, VERIFY_OK, main
from fastcap.models import load_model
from test_extract import WORKER, _loader, _one_thread, _run, worker  # noqa: F401 (autouse fixture)
from test_text import MODEL

transformers = pytest.importorskip("transformers")


def own_outputs(model, call) -> dict:
    """Every named module's output in one forward, by plain hooks (the first call of each)."""
    outputs, handles = {}, []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(
                lambda m, i, out, name=name: outputs.setdefault(name, out)))
    with torch.no_grad():
        call()
    for handle in handles:
        handle.remove()
    return outputs


def leaf(output):
    return output if isinstance(output, torch.Tensor) else output[0]  # a tuple or a ModelOutput


def test_layers_of_a_torchvision_model_match_its_forward():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    rows = fastcap.layers(model, x)
    expected = own_outputs(model, lambda: model(x))
    assert [row.name for row in rows] == [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    for row in rows:
        assert row.type == type(modules[row.name]).__name__
        assert row.shape == tuple(expected[row.name].shape) and row.dtype == expected[row.name].dtype, row
    assert [row.name for row in fastcap.layers(model, x, "layer*.1")] == ["layer1.1", "layer2.1", "layer3.1",
                                                                           "layer4.1"]
    names_only = fastcap.layers(model, None, "layer4")
    assert names_only[0].shape is None and names_only[0].calls == 0
    with pytest.raises(ValueError, match="unknown layer 'layer5'"):
        fastcap.layers(model, x, "layer5")
    with pytest.raises(ValueError, match=r"forward failed on the example input Tensor\(1, 64\)"):
        fastcap.layers(model, torch.randn(1, 64))
    assert not any(m._forward_hooks for m in model.modules())  # every hook removed, also after the error


def test_layers_of_an_hf_random_model_match_its_forward():
    torch.manual_seed(0)
    model = load_model(MODEL)
    ids = torch.randint(0, 97, (1, 5))
    rows = {row.name: row for row in fastcap.layers(model, {"input_ids": ids})}
    expected = own_outputs(model, lambda: model(input_ids=ids))
    assert list(rows) == [name for name, _ in model.named_modules() if name]
    for name, output in expected.items():
        assert rows[name].shape == tuple(leaf(output).shape), name
    assert rows["transformer.h.1"].shape == (1, 5, 32) and rows["lm_head"].shape == (1, 5, 97)
    assert rows["transformer.h"].output == "did not run"  # a ModuleList is never called


def test_the_layers_command(capsys):
    assert main(["layers", "--model", "resnet18", "--image-size", "32", "layer*"]) == 0
    out = capsys.readouterr().out
    assert "ResNet: 4 modules matching 'layer*'; outputs of one forward on one fake image [1, 3, 32, 32]" in out
    assert "layer4  Sequential  [1, 512, 1, 1] float32" in out
    assert main(["layers", "--model", MODEL, "--context", "7", "transformer.h.*"]) == 0
    out = capsys.readouterr().out
    assert "7 random tokens" in out and "transformer.h.1  GPT2Block  [1, 7, 32] float32" in out
    assert main(["layers", "--model", MODEL, "h.1"]) == 1
    assert "did you mean 'transformer.h.1'?" in capsys.readouterr().err
    assert main(["layers", "--model", "_extract_worker:tiny_model", "--input-shape", "3,8,8"]) == 0
    assert "7     Linear             [1, 10] float32" in capsys.readouterr().out


# ------------------------------------------------------------------ info and verify


def cli_store(tmp_path, *extra: str) -> tuple[list[str], object]:
    out = tmp_path / "feats"
    args = ["extract", "--model", "_extract_worker:tiny_model", "--data", "fake:40", "--image-size", "8",
            "--layers", "0,3", "--reduce", "0=full,3=mean", "--batch-size", "4", "--shard-size", "8",
            "--out", str(out), *extra]
    assert main(args) == 0
    return args, out


def test_info_and_verify_on_a_good_store(tmp_path, capsys):
    args, out = cli_store(tmp_path)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "complete" in text and "samples: 40, in 5 shard(s) from 1 rank(s)" in text
    assert "0    40    [8, 8, 8]  float32  one per sample" in text
    assert "3    40    [16]       float32  one per sample" in text
    assert "statistics" in text and "(40 rows)" in text
    assert "model: _extract_worker:tiny_model" in text and "data: fake:40" in text and "image_size: 8" in text
    assert "command: fastcap extract --model _extract_worker:tiny_model" in text
    assert main(["verify", str(out)]) == VERIFY_OK
    assert "OK: 10 files" in capsys.readouterr().out
    # The readable record is not part of what a resume matches: the same arguments spelt
    # otherwise (another order, --progress) resume the store.
    assert main([*args[:-4], "--no-progress", "--out", str(out), "--shard-size", "8"]) == 0


def test_info_and_verify_on_an_unfinished_and_a_damaged_store(tmp_path, capsys):
    killed = tmp_path / "killed"
    _run([str(WORKER), str(killed), "--kill-at", "150"])
    capsys.readouterr()
    assert main(["info", str(killed)]) == 0
    text = capsys.readouterr().out
    assert "INCOMPLETE" in text and "of 200" in text
    assert main(["verify", str(killed)]) == VERIFY_INCOMPLETE
    assert "INCOMPLETE" in capsys.readouterr().out

    _, out = cli_store(tmp_path)
    shard = next((out / "rank-00000").glob("shard-000001"))
    data = bytearray((shard / "3.npy").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit, same size: only the checksum sees it
    (shard / "3.npy").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["info", str(out)]) == 0  # info reads no data
    assert main(["verify", str(out)]) == VERIFY_DAMAGED
    err = capsys.readouterr().err
    assert "DAMAGED: 1 of 10 files" in err and "shard-000001/3.npy' is corrupt" in err
    (shard / "0.npy").write_bytes(b"truncated")
    assert main(["verify", str(out)]) == VERIFY_DAMAGED
    assert "has 9 bytes where the manifest records" in capsys.readouterr().err
    assert main(["info", str(out)]) == 1
    assert main(["verify", str(tmp_path / "nothing")]) == VERIFY_DAMAGED
    assert "holds no fastcap extraction" in capsys.readouterr().err


def test_info_of_a_store_made_before_descriptions_and_of_tokens(tmp_path, capsys):
    model, loader = worker.tiny_model(), _loader(20, 4)
    fastcap.extract(model, loader, "3", "mean", out=tmp_path / "old", shard_size=8)
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["description"]  # as a store written before this version
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["info", str(tmp_path / "old")]) == 0
    text = capsys.readouterr().out
    assert "made before fastcap recorded its arguments" in text and "layers: 3" in text
    assert "data: a DataLoader over a map-style dataset" in text

    from torch.utils.data import DataLoader

    store = fastcap.extract(worker.tiny_lm(), DataLoader(worker.Texts(12), batch_size=4), worker.TOKEN_LAYERS,
                            worker.TOKEN_REDUCE, out=tmp_path / "lm", tokens=worker.tokens())
    counts = np.bincount(store.tokens.sample)
    assert main(["info", str(tmp_path / "lm")]) == 0
    text = capsys.readouterr().out
    assert f"token index: {len(store['rows'])} token rows from 12 samples, {counts.min()}..{counts.max()} per sample" in text
    assert "rows  " in text and "one per kept token" in text and "model: TinyLM" in text
