"""The front door (issue 22, item 6): installing into one's own environment, --limit, the image
preprocessing and its options, transformers' loading bar kept quiet, fastcap bench on hf-random
specs and --quick."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fastcap
from fastcap.cli import main
from test_columns import image_folder
from test_extract import _one_thread, worker  # noqa: F401 (autouse fixture)
from test_text import MODEL

ROOT = Path(__file__).resolve().parent.parent


def source_copy(tmp_path) -> Path:
    """What pip installs from: setup.py, the package and the C++ sources (not the built .so, not
    .venv), so that nothing is written into the checkout."""
    copy = tmp_path / "src"
    copy.mkdir()
    shutil.copy(ROOT / "setup.py", copy)
    shutil.copytree(ROOT / "csrc", copy / "csrc")
    shutil.copytree(ROOT / "fastcap", copy / "fastcap", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    return copy


def test_pip_install_uses_the_torch_already_installed(tmp_path):
    """What `pip install --no-build-isolation .` resolves, without building: fastcap alone, every
    requirement (torch first) satisfied by this environment, with no package index to fetch from.
    The build itself (minutes) is test_pip_install_builds_and_runs, run with FASTCAP_SLOW_TESTS=1."""
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--dry-run",
                          "--quiet", "--report", str(report), str(source_copy(tmp_path))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    install = json.loads(report.read_text())["install"]
    assert [item["metadata"]["name"] for item in install] == ["fastcap"]  # torch & co. already here
    assert install[0]["metadata"]["requires_dist"][0] == "torch"
    assert 'datasets; extra == "datasets"' in install[0]["metadata"]["requires_dist"]

    # The console script `fastcap` the install creates runs fastcap.cli:main.
    egg = tmp_path / "egg"
    egg.mkdir()
    run = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg)],
                         cwd=tmp_path / "src", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    entry_points = (egg / "fastcap.egg-info" / "entry_points.txt").read_text()
    assert "[console_scripts]\nfastcap = fastcap.cli:main" in entry_points


@pytest.mark.skipif(os.environ.get("FASTCAP_SLOW_TESTS") != "1",
                    reason="builds fastcap._C CPU-only (6 minutes on the project's 2 shared cores, 4 of CPU "
                           "time): FASTCAP_SLOW_TESTS=1 runs it")
@pytest.mark.timeout(1200)
def test_pip_install_builds_and_runs(tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, FASTCAP_CPU_ONLY="1")
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--quiet",
                          "--target", str(target), str(source_copy(tmp_path))], env=env, capture_output=True,
                         text=True, timeout=1100)
    assert run.returncode == 0, run.stdout + run.stderr
    assert list((target / "fastcap").glob("_C*.so"))
    script = target / "bin" / "fastcap"
    env = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, str(script), "layers", "--model", "resnet18", "layer4"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "layer4  Sequential" in run.stdout, run.stdout + run.stderr


def test_limit_runs_the_first_samples(tmp_path, capsys):
    assert main(["extract", "--model", "_extract_worker:tiny_model", "--data", "fake:64", "--image-size", "8",
                 "--layers", "3", "--reduce", "mean", "--limit", "10", "--batch-size", "4",
                 "--out", str(tmp_path / "a")]) == 0
    store = fastcap.open(tmp_path / "a")
    assert np.array_equal(store.indices, np.arange(10))
    assert store.manifest["description"]["limit"] == 10
    assert main(["extract", "--model", MODEL, "--data", "fake-text:20", "--context", "8", "--pack", "--limit", "5",
                 "--layers", "transformer.h.1", "--reduce", "tokens", "--out", str(tmp_path / "b")]) == 0
    text = fastcap.open(tmp_path / "b")
    assert len(text.indices) == 5 and len(text["transformer.h.1"]) == 5 * 8
    assert text.manifest["args"]["data_spec"]["limit"] == 5
    assert main(["extract", "--model", MODEL, "--data", "fake-text:20", "--context", "8", "--pack", "--limit", "0",
                 "--layers", "transformer.h.1", "--out", str(tmp_path / "c")]) == 1
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err


def test_normalisation_options_change_the_preprocessing(tmp_path, capsys):
    import torchvision

    from fastcap.models import image_transform, make_dataset

    folder = image_folder(tmp_path / "photos", per_class=(2, 2))
    plain = make_dataset(folder, 16, normalize=False)[0][0]
    assert 0 <= float(plain.min()) and float(plain.max()) <= 1  # ToTensor's [0, 1]
    halves = make_dataset(folder, 16, mean=[0.5], std=[0.5])[0][0]
    assert torch.allclose(halves, (plain - 0.5) / 0.5)
    imagenet = make_dataset(folder, 16)[0][0]
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(imagenet, (plain - mean) / std)
    custom = make_dataset(folder, transform=torchvision.transforms.Compose([
        torchvision.transforms.Resize((10, 12)), torchvision.transforms.ToTensor()]))
    assert custom[0][0].shape == (3, 10, 12)
    assert "Resize(size=256" in repr(image_transform(224))

    out = tmp_path / "feats"
    args = ["extract", "--model", "_extract_worker:tiny_model", "--data", folder, "--image-size", "16",
            "--layers", "3", "--reduce", "mean", "--out", str(out)]
    assert main([*args, "--no-normalize"]) == 0
    model = worker.tiny_model()
    with torch.inference_mode(), fastcap.capture(model, "3", "mean") as cap:
        for x, _ in DataLoader(make_dataset(folder, 16, normalize=False), batch_size=64):
            model(x)
    assert torch.equal(fastcap.open(out)["3"].tensor(), cap.result()["3"])
    assert "normalise: none" in fastcap.open(out).manifest["description"]["preprocessing"]
    capsys.readouterr()
    assert main(args) == 1  # another preprocessing: a resume would mix them
    assert "data_spec" in capsys.readouterr().err
    assert main([*args[:-2], "--mean", "0.5", "--std", "0.5,0.5,0.5", "--out", str(tmp_path / "other")]) == 0
    for bad, message in [(["--mean", "1,2"], "--mean takes 1 or 3 numbers"),
                         (["--std", "0"], "--std takes 1 or 3 positive numbers"),
                         (["--no-normalize", "--mean", "0.5"], "drop --no-normalize")]:
        assert main([*args[:-2], *bad, "--out", str(tmp_path / "bad")]) == 1, bad
        assert message in capsys.readouterr().err, bad
    assert main(["extract", "--model", "resnet18", "--data", "fake:4", "--no-normalize", "--layers", "fc",
                 "--out", str(tmp_path / "fake")]) == 1
    assert "synthetic normal noise" in capsys.readouterr().err
    assert main(["extract", "--model", MODEL, "--data", "fake-text:4", "--context", "8", "--mean", "0.5",
                 "--layers", "transformer.h.1", "--out", str(tmp_path / "text")]) == 1
    assert "--mean: for an image folder" in capsys.readouterr().err


def test_the_transformers_loading_bar_is_quiet_unless_progress(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    capsys.readouterr()
    args = ["extract", "--model", f"hf:{tmp_path / 'lm'}", "--data", "fake-text:4", "--context", "8",
            "--layers", "transformer.h.0", "--reduce", "mean", "--tokens"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--progress"]) == 0
    assert "Loading weights" in capsys.readouterr().err
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()  # left as it was


def test_bench_takes_hf_random_specs_and_quick(tmp_path, capsys):
    from fastcap import bench

    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", MODEL, "--layers", "transformer.h.1", "--quick", "--methods", "none,fastcap",
                              "--device", "cpu", "--out", str(tmp_path / "b")])
    assert bench.run(args) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    config = record["config"]
    assert config["shape"] == [32] and config["int_high"] == 97 and config["batch"] == 8
    assert config["channel_dim"] == -1 and config["rounds"] == 2 and config["batches"] == 1
    assert record["memory_growth"] is None
    assert "one forward takes" in capsys.readouterr().err
    quick = parser.parse_args(["--model", "resnet18", "--layers", "layer4", "--quick", "--image-size", "32"])
    bench._resolve_defaults(quick)
    assert (quick.image_size, quick.batch_size, quick.no_memory_growth, quick.channel_dim) == (32, 8, True, 1)
    full = parser.parse_args(["--model", "resnet18", "--layers", "layer4"])
    bench._resolve_defaults(full)
    assert (full.image_size, full.batch_size, full.rounds, full.no_memory_growth) == (224, 32, 3, False)
