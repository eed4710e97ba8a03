"""Smoke tests of the benchmark code (fastcap.bench) on tiny models: every method runs and
captures the same values, memory growth is counted right, and ``fastcap bench`` writes its JSON
and PNG. No timing is asserted."""

import argparse
import json

import pytest
import torch
from torch import nn

from fastcap import bench
from fastcap.bench import CaptureSpec


class Tiny(nn.Module):
    """Two conv blocks with in-place ReLUs, so a capture that aliases the output would fail."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.block2(self.block1(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny().eval(), torch.randn(2, 3, 8, 8)



def _run_method(name, spec, model, x, batches):
    """Runs `batches` forwards under one capture method; returns what it kept per batch."""
    method = bench.make_method(name, spec)
    method.open(model)
    kept = []
    try:
        bench.time_round(method, x, batches, kept)
    finally:
        method.close()
    return kept

def test_resolve_layers_globs():
    model = nn.Module()
    model.layer1 = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.ReLU()))
    model.layer2 = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.ReLU()))
    assert list(bench.resolve_layers(model, "layer*")) == ["layer1", "layer2"]
    assert list(bench.resolve_layers(model, "layer*.1")) == ["layer1.1", "layer2.1"]
    assert list(bench.resolve_layers(model, "**.1")) == ["layer1.1", "layer1.1.1", "layer2.1", "layer2.1.1"]
    assert bench.resolve_layers(model, {"a": "layer2.0"}) == {"a": "layer2.0"}
    with pytest.raises(ValueError, match="nope"):
        bench.resolve_layers(model, "nope*")


@pytest.mark.parametrize("reduce", ["full", "mean", "topk"])
def test_methods_capture_the_same_values(tiny, reduce):
    model, x = tiny
    spec = CaptureSpec(["block1", "block2"], reduce, 4 if reduce == "topk" else None, 1)
    results = {}
    with torch.inference_mode():
        for name in bench.METHODS[1:]:
            kept = _run_method(name, spec, model, x, batches=2)
            assert len(kept) == 2, name
            results[name] = kept[0]
    reference = results["clone"]
    for name, step in results.items():
        assert set(step) == {"block1", "block2"}, name
        for key, want in reference.items():
            got = step[key]
            if reduce == "topk":
                # ReLU zeros tie: their indices may differ between implementations.
                assert torch.equal(got.values, want.values), name
                nonzero = want.values != 0
                assert torch.equal(got.indices[nonzero], want.indices[nonzero]), name
            elif reduce == "mean":
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
            else:
                assert torch.equal(got, want), name
    # The in-place ReLU of block2 runs after block1's hook: the kept value is still the ReLU's
    # output of block1 (a copy), never touched by later ops.
    if reduce == "full":
        assert (reference["block1"] >= 0).all()


def test_full_capture_is_a_copy_taken_at_hook_time():
    # The in-place ReLU rewrites the conv output right after its hook: every method must have
    # kept the pre-ReLU values (a copy), negatives included.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        want = model[0](x)
        for name in bench.METHODS[1:]:
            kept = _run_method(name, CaptureSpec("0", "full"), model, x, batches=1)
            assert torch.equal(kept[0]["0"], want), name
            assert (kept[0]["0"] < 0).any(), name


def test_compare_records(tiny):
    model, x = tiny
    spec = CaptureSpec("block*", "mean", None, 1)
    records = bench.compare(model, x, spec, bench.METHODS, rounds=1, batches=1)
    by = {r["method"]: r for r in records}
    assert list(by) == list(bench.METHODS)
    for name, record in by.items():
        assert "error" not in record, record
        assert record["items_per_s"] > 0 and record["ratio"] > 0
        assert record["captured_bytes_per_batch"] == (0 if name == "none" else 2 * (8 + 16) * 4)
    assert by["none"]["ratio"] == 1.0
    text = bench.throughput_table(records)
    assert "fastcap" in text and "torch_reduce" in text
    assert bench.throughput_table(records, markdown=True).startswith("| method")


def test_compare_reports_untraceable_model_for_fx():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
                return self.lin(x)
            return -self.lin(x)

    records = bench.compare(Branchy().eval(), torch.ones(2, 4), CaptureSpec("lin", "full"),
                             ("fx", "clone"), rounds=1, batches=1, memory=False)
    by = {r["method"]: r for r in records}
    assert "error" in by["fx"] and "error" not in by["clone"]


def test_memory_growth_held_bytes(tiny):
    model, x = tiny
    spec = CaptureSpec("block*", "full", None, 1)
    per_batch = 2 * (8 + 16) * 8 * 8 * 4
    clone = bench.memory_growth_one(model, x, spec, "clone", "kept", (1, 3))
    assert [row["held_bytes"] for row in clone["rows"]] == [per_batch, 3 * per_batch]
    drain = bench.memory_growth_one(model, x, spec, "fastcap", "drain", (1, 3))
    assert [row["held_bytes"] for row in drain["rows"]] == [0, 0]
    kept = bench.memory_growth_one(model, x, spec, "fastcap", "kept", (1, 3))
    assert [row["held_bytes"] for row in kept["rows"]] == [per_batch, 3 * per_batch]
    assert kept["rows"][-1]["result_bytes"] == 3 * per_batch


def test_bench_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    prefix = tmp_path / "out" / "r18"
    args = parser.parse_args([
        "--model", "torchvision:resnet18", "--layers", "layer*", "--reduce", "topk", "--k", "4",
        "--batch-size", "2", "--image-size", "32", "--device", "cpu", "--rounds", "1", "--batches", "1",
        "--memory-batches", "1,2", "--in-process", "--out", str(prefix),
    ])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "out" / "r18.json").read_text())
    assert [r["method"] for r in data["throughput"]] == list(bench.METHODS)
    assert data["config"]["resolved_layers"] == {f"layer{i}": f"layer{i}" for i in range(1, 5)}
    assert data["environment"]["torch"] == torch.__version__
    growth = {(g["method"], g["policy"]): g for g in data["memory_growth"]}
    assert [row["batches"] for row in growth[("fastcap", "drain")]["rows"]] == [1, 2]
    assert (tmp_path / "out" / "r18.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "items/s" in out and "memory growth" in out


def test_bench_command_rejects_unknown_method(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", "resnet18", "--layers", "layer1", "--methods", "clone,bogus"])
    assert bench.run(args) == 2
    assert "bogus" in capsys.readouterr().err


def test_bench_command_dtype_and_channels_last(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    prefix = tmp_path / "bf16"
    args = parser.parse_args([
        "--model", "resnet18", "--layers", "layer3,layer4", "--reduce", "full", "--dtype", "bfloat16",
        "--channels-last", "--batch-size", "2", "--image-size", "32", "--device", "cpu", "--rounds", "1",
        "--batches", "1", "--methods", "clone,fastcap", "--no-memory-growth", "--out", str(prefix),
    ])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "bf16.json").read_text())
    by = {r["method"]: r for r in data["throughput"]}
    assert set(by) == {"none", "clone", "fastcap"} and "error" not in by["fastcap"]
    # bfloat16 full capture: 2 bytes per element of layer3 [2, 256, 2, 2] and layer4 [2, 512, 1, 1]
    assert by["fastcap"]["captured_bytes_per_batch"] == 2 * (256 * 4 + 512) * 2
