"""fastcap.extract / fastcap.open: equal to capture(), crash-safe resume, argument checks,
torchrun, the command line, and flat host memory. CPU only, small models, a few seconds each."""
from __future__ import annotations

import errno
import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastcap

extract_module = importlib.import_module("fastcap.extract")
from fastcap.store import _format, _writer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_extract_worker.py"
_spec = importlib.util.spec_from_file_location("_extract_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in the worker processes (their results are compared bit-wise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(WORKER.parent), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _loader(count: int = 50, batch_size: int = 8) -> DataLoader:
    images = torch.stack([worker.Images(count)[i][0] for i in range(count)])
    return DataLoader(TensorDataset(images), batch_size=batch_size)


def _reference(model, loader, layers, reduce, **kwargs) -> dict:
    with torch.inference_mode(), fastcap.capture(model, layers, reduce, **kwargs) as cap:
        for (x,) in loader:
            model(x)
    return cap.result()


def _assert_store_equals(store, reference: dict) -> None:
    assert store.complete
    for key, value in reference.items():
        if isinstance(value, fastcap.TopK):
            assert torch.equal(store[key].tensor(), value.values), key
            assert torch.equal(store[key + ".indices"].tensor(), value.indices), key
        else:
            assert torch.equal(store[key].tensor(), value), key


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.npy"))}


# ------------------------------------------------------------------ equal to capture()


@pytest.mark.parametrize("reduce, kwargs", [
    ("full", {}),
    ("full", {"dtype": torch.bfloat16}),
    ("mean", {}),
    ("topk", {"k": 3}),
    ({"0": "full", "3": "topk", "7": "mean"}, {"k": 2}),
], ids=["full", "full-bf16", "mean", "topk", "mixed"])
def test_extract_equals_capture(tmp_path, reduce, kwargs):
    model, loader = worker.tiny_model(), _loader(50, 8)  # 7 batches, the last one short
    layers = ["0", "3", "7"]
    store = fastcap.extract(model, loader, layers, reduce, out=tmp_path, shard_size=16, **kwargs)
    _assert_store_equals(store, _reference(model, loader, layers, reduce, **kwargs))
    reopened = fastcap.open(tmp_path)
    assert np.array_equal(reopened.indices, np.arange(50))
    assert len(reopened.manifest["shards"]) == 4  # 16 + 16 + 16 + 2 samples
    _assert_store_equals(reopened, _reference(model, loader, layers, reduce, **kwargs))


def test_store_is_array_like(tmp_path):
    model, loader = worker.tiny_model(), _loader(50, 8)
    store = fastcap.extract(model, loader, ["0", "3"], "mean", out=tmp_path, shard_size=16)
    full = _reference(model, loader, ["0", "3"], "mean")["3"].numpy()
    x = store["3"]
    assert x.shape == (50, 16) and x.dtype == np.float32 and len(x) == 50
    assert isinstance(x[0:10], np.memmap)  # one shard: a zero-copy view
    assert np.array_equal(x[5:40], full[5:40])  # across shards
    assert np.array_equal(x[::7], full[::7])
    assert np.array_equal(x[-1], full[-1])
    assert np.array_equal(x[[3, 49, 0]], full[[3, 49, 0]])
    assert np.array_equal(x[10:20, 2], full[10:20, 2])
    assert np.array_equal(np.asarray(x), full)
    assert torch.equal(torch.from_numpy(x[0:16]), torch.from_numpy(full[0:16]))
    assert set(store) == {"0", "3"} and "layer9" not in store
    with pytest.raises(KeyError, match="'30' is not in the store"):
        store["30"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["keys"]["3"]["shape"] == [50, 16] and manifest["keys"]["3"]["dtype"] == "<f4"
    assert manifest["torch_version"] == torch.__version__ and manifest["args"]["reduce"] == "mean"
    assert manifest["shards"][0]["indices"] == [[0, 16, 1]]


def test_iterable_data_and_dict_batches(tmp_path):
    model = worker.tiny_model()
    batches = [{"input": worker.Images(30)[i][0].expand(3, 3, 8, 8).clone()} for i in range(5)]
    store = fastcap.extract(model, iter(batches), "3", "mean", out=tmp_path, shard_size=4,
                            forward=lambda m, batch: m(batch["input"]))
    with torch.inference_mode(), fastcap.capture(model, "3", "mean") as cap:
        for batch in batches:
            model(batch["input"])
    assert torch.equal(store["3"].tensor(), cap.result()["3"])
    assert np.array_equal(store.indices, np.arange(15))


def test_shuffled_loader_runs_in_dataset_order(tmp_path):
    model, loader = worker.tiny_model(), _loader(20, 8)
    shuffled = DataLoader(loader.dataset, batch_size=8, shuffle=True)
    with pytest.warns(UserWarning, match="shuffles"):
        store = fastcap.extract(model, shuffled, "3", "mean", out=tmp_path)
    assert np.array_equal(store.indices, np.arange(20))
    assert torch.equal(store["3"].tensor(), _reference(model, loader, "3", "mean")["3"])


def test_index_runs_round_trip():
    for values in ([], [5], [0, 2, 4, 5], [3, 3, 3], [9, 7, 5, 6, 0], list(range(0, 37, 2))):
        runs = _format.encode_runs(np.array(values, dtype=np.int64))
        assert _format.decode_runs(runs).tolist() == values
    assert _format.encode_runs(np.arange(1000)) == [[0, 1000, 1]]


# ------------------------------------------------------------------ crash safety and resume


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    report = str(tmp_path / "report")
    first = _run([str(WORKER), str(killed), "--kill-at", "150"])
    assert first.returncode == -signal.SIGKILL, first.stderr
    with pytest.warns(UserWarning, match="unfinished extraction"):
        partial = fastcap.open(killed)
    assert not partial.complete
    committed = len(partial.indices)
    assert 0 < committed < 150 and committed % 16 == 0  # whole shards only
    assert np.array_equal(partial.indices, np.arange(committed))

    resumed = _run([str(WORKER), str(killed), "--report", report])
    assert resumed.returncode == 0, resumed.stderr
    forwards = json.loads(Path(report + ".0").read_text())["forwards"]
    # Committed batches were not run again (+ 1: early exit's learning forward, on one sample).
    assert forwards == (200 - committed) // 4 + 1
    assert _run([str(WORKER), str(clean)]).returncode == 0

    assert fastcap.open(killed).complete
    assert _files(killed) == _files(clean)  # bit for bit, shard by shard
    for key in ("0", "3"):
        assert np.array_equal(fastcap.open(killed)[key][:], fastcap.open(clean)[key][:])


def test_disk_full_keeps_committed_shards_and_resumes(tmp_path, monkeypatch):
    model, loader = worker.tiny_model(), _loader(50, 8)
    writes = {"n": 0}
    original = _writer.NpyStream.write

    def failing_write(self, array):
        writes["n"] += 1
        if writes["n"] > 5:  # 2 keys x 2 batches per shard: fails inside the 2nd shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, array)

    monkeypatch.setattr(_writer.NpyStream, "write", failing_write)
    with pytest.raises(OSError, match=r"No space left on device.*1 shard\(s\).*kept"):
        fastcap.extract(model, loader, ["0", "3"], "full", out=tmp_path, shard_size=16)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="16 of 50 samples"):
        assert len(fastcap.open(tmp_path).indices) == 16
    assert not list((tmp_path / "rank-00000").glob("*.tmp"))  # the failed shard is gone

    store = fastcap.extract(model, loader, ["0", "3"], "full", out=tmp_path, shard_size=16)
    _assert_store_equals(store, _reference(model, loader, ["0", "3"], "full"))



def test_the_writer_flushes_each_shard_to_disk_as_it_goes(tmp_path, monkeypatch):
    """Write-behind: the writer thread fdatasyncs a shard's files every _SYNC_BYTES appended,
    not only at its commit; the files are the same."""
    synced = []
    original = _writer.NpyStream.sync

    def counted(self):
        synced.append((self.path.name, self.rows))
        original(self)

    model, loader = worker.tiny_model(), _loader(50, 8)
    monkeypatch.setattr(_writer.NpyStream, "sync", counted)
    monkeypatch.setattr(_writer, "_SYNC_BYTES", 1)  # every step
    store = fastcap.extract(model, loader, ["0", "3"], "full", out=tmp_path / "a", shard_size=16)
    # 7 steps, 2 keys: each step's files flushed right after it was appended
    assert len(synced) == 7 * 2 and synced[:2] == [("0.npy", 8), ("3.npy", 8)], synced
    monkeypatch.undo()
    _assert_store_equals(store, _reference(model, loader, ["0", "3"], "full"))
    fastcap.extract(model, loader, ["0", "3"], "full", out=tmp_path / "b", shard_size=16)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


# ------------------------------------------------------------------ argument checks


def test_different_arguments_are_refused_unless_overwrite(tmp_path):
    model, loader = worker.tiny_model(), _loader(20, 8)
    fastcap.extract(model, loader, "3", "mean", out=tmp_path)
    with pytest.raises(ValueError, match=r"reduce='mean' there, 'topk' now.*overwrite=True"):
        fastcap.extract(model, loader, "3", "topk", k=2, out=tmp_path)
    with pytest.raises(ValueError, match="shard_size=4096 there, 8 now"):
        fastcap.extract(model, loader, "3", "mean", out=tmp_path, shard_size=8)
    other = torch.nn.Sequential(*worker.tiny_model()).eval()
    with torch.no_grad():
        other[0].weight.add_(1)
    with pytest.raises(ValueError, match="model="):
        fastcap.extract(other, loader, "3", "mean", out=tmp_path)
    assert fastcap.open(tmp_path).manifest["args"]["reduce"] == "mean"  # left intact

    store = fastcap.extract(model, loader, "3", "topk", k=2, out=tmp_path, overwrite=True)
    assert set(store) == {"3", "3.indices"} and store.manifest["args"]["reduce"] == "topk"


def test_a_run_that_failed_before_any_shard_does_not_block_a_corrected_one(tmp_path):
    model, loader = worker.tiny_model(), _loader(20, 8)
    with pytest.raises(ValueError, match="k=99 is out of range"):
        fastcap.extract(model, loader, "3", "topk", k=99, out=tmp_path)  # fails in the forward
    store = fastcap.extract(model, loader, "3", "topk", k=2, out=tmp_path)
    assert store.complete and store["3"].shape == (20, 2, 4, 4)


def test_same_arguments_on_a_finished_run_do_no_work(tmp_path):
    model, loader = worker.tiny_model(), _loader(20, 8)
    fastcap.extract(model, loader, "3", "mean", out=tmp_path)
    before = _files(tmp_path)
    calls = []
    model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    store = fastcap.extract(model, loader, "3", "mean", out=tmp_path)
    assert calls == [] and store.complete and _files(tmp_path) == before


def test_unwritable_out_is_a_clear_error(tmp_path):
    model, loader = worker.tiny_model(), _loader(8, 8)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"out=.*a_file/out.*cannot create it"):
        fastcap.extract(model, loader, "3", "mean", out=blocker / "out")
    with pytest.raises(OSError, match="cannot create it"):
        fastcap.extract(model, loader, "3", "mean", out="/proc/fastcap-cannot-write-here")


def test_foreign_directory_and_bad_arguments(tmp_path):
    model, loader = worker.tiny_model(), _loader(8, 8)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no fastcap extraction"):
        fastcap.extract(model, loader, "3", "mean", out=tmp_path)
    with pytest.raises(ValueError, match="shard_size must be a positive int, got 0"):
        fastcap.extract(model, loader, "3", "mean", out=tmp_path / "x", shard_size=0)
    with pytest.raises(TypeError, match="wrap it: DataLoader"):
        fastcap.extract(model, loader.dataset, "3", "mean", out=tmp_path / "x")
    with pytest.raises(ValueError, match="nowhere"):
        fastcap.extract(model, loader, "nowhere", "mean", out=tmp_path / "y")
    assert not (tmp_path / "y").exists()  # checked before out is touched
    with pytest.raises(FileNotFoundError, match="no fastcap extraction"):
        fastcap.open(tmp_path)


# ------------------------------------------------------------------ torchrun


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_ranks_equal_single_process(tmp_path):
    single, multi, report = tmp_path / "single", tmp_path / "multi", str(tmp_path / "report")
    args = ["--samples", "37", "--batch-size", "4", "--shard-size", "8"]
    run = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                str(WORKER), str(multi), *args, "--report", report], timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _run([str(WORKER), str(single), *args]).returncode == 0

    one, two = fastcap.open(single), fastcap.open(multi)
    assert two.complete and two.manifest["world_size"] == 2
    assert {shard["rank"] for shard in two.manifest["shards"]} == {0, 1}
    stored = sum(shard["samples"] for shard in two.manifest["shards"])
    assert stored == 38  # DistributedSampler padded 37 to 38 ...
    assert np.array_equal(two.indices, np.arange(37))  # ... and open dropped the duplicate
    assert two.manifest["keys"]["3"]["shape"] == [37, 16]
    for key in ("0", "3"):
        torch.testing.assert_close(two[key].tensor(), one[key].tensor())  # batches differ
    ranks = [json.loads(Path(f"{report}.{r}").read_text())["forwards"] for r in (0, 1)]
    assert ranks == [5 + 1, 5 + 1]  # 19 samples per rank in batches of 4, + the learning forward


# ------------------------------------------------------------------ command line


def test_cli_extract_end_to_end(tmp_path):
    out = tmp_path / "feats"
    run = _run(["-m", "fastcap", "extract", "--model", "resnet18", "--data", "fake:64",
                "--image-size", "32", "--layers", "layer3,layer4", "--layers", "fc",
                "--reduce", "mean", "--batch-size", "16", "--shard-size", "32",
                "--out", str(out)])
    assert run.returncode == 0, run.stderr
    assert "64 items" in run.stdout and "items/s" in run.stdout and "peak host memory" in run.stdout
    assert "\r" not in run.stderr  # no progress bar when stderr is not a terminal
    store = fastcap.open(out)
    assert store["layer4"].shape == (64, 512) and store["fc"].shape == (64, 1000)

    from fastcap.models import load_model, make_dataset

    torch.manual_seed(0)  # the CLI's default --seed
    model = load_model("resnet18")
    loader = DataLoader(make_dataset("fake:64", 32), batch_size=16)
    with torch.inference_mode(), fastcap.capture(model, ["layer3", "layer4", "fc"], "mean") as cap:
        for x, _ in loader:
            model(x)
    for key, value in cap.result().items():
        assert torch.equal(store[key].tensor(), value), key

    again = _run(["-m", "fastcap", "extract", "--model", "resnet18", "--data", "fake:64",
                  "--image-size", "32", "--layers", "layer4", "--reduce", "mean", "--out", str(out)])
    assert again.returncode == 1 and "layers=" in again.stderr and "--overwrite" not in again.stdout


def test_cli_help_documents_every_flag():
    run = _run(["-m", "fastcap", "extract", "--help"])
    assert run.returncode == 0, run.stderr
    for flag in ("--model", "--weights", "--data", "--image-size", "--layers", "--reduce", "--k",
                 "--channel-dim", "--dtype", "--batch-size", "--num-workers", "--device", "--out",
                 "--overwrite", "--progress", "--shard-size", "--trust-pickle", "examples:", "fastcap.open"):
        assert flag in run.stdout, flag
    top = _run(["-m", "fastcap", "--help"])
    assert top.returncode == 0 and "extract" in top.stdout and "bench" in top.stdout


def test_cli_model_and_data_specs(tmp_path):
    from fastcap.models import FakeImages, load_model, make_dataset

    sys.path.insert(0, str(WORKER.parent))
    try:
        model = load_model("_extract_worker:tiny_model")
    finally:
        sys.path.remove(str(WORKER.parent))
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    with pytest.raises(ValueError, match="holds a state dict, not a model"):
        load_model(str(weights))
    assert isinstance(load_model("torchvision:resnet18"), torch.nn.Module)
    with pytest.raises(ValueError, match="did you mean"):
        load_model("resnet05")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_model("resnet18", str(weights))
    scripted = tmp_path / "m.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in recent torch
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 8, 8)), scripted)
        assert isinstance(load_model(str(scripted)), torch.nn.Module)
    data = make_dataset("fake:5", 16)
    assert isinstance(data, FakeImages) and data[4][0].shape == (3, 16, 16)
    assert torch.equal(data[3][0], make_dataset("fake:5", 16)[3][0])
    with pytest.raises(ValueError, match="fake:N"):
        make_dataset("fake:x")
    with pytest.raises(ValueError, match="neither fake:N nor an existing image folder"):
        make_dataset(str(tmp_path / "missing"))


class _RunsOnLoad:
    """Unpickling it calls os.mkdir(path): what any code in a pickle could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickled_model_file_is_unpickled_only_with_trust_pickle(tmp_path, capsys):
    from fastcap.cli import main
    from fastcap.models import load_model

    whole = tmp_path / "whole.pt"
    torch.save(worker.tiny_model(), whole)
    with pytest.raises(ValueError, match=r"holds a pickled torch\.nn\.modules\.container\.Sequential .*"
                                         r"runs any code the file names.*--trust-pickle"):
        load_model(str(whole))
    assert isinstance(load_model(str(whole), trust_pickle=True), torch.nn.Sequential)
    args = ["extract", "--model", str(whole), "--data", "fake:4", "--layers", "3", "--reduce", "mean",
            "--out", str(tmp_path / "out")]
    assert main(args) == 1
    assert "holds a pickled torch.nn.modules.container.Sequential" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--trust-pickle"]) == 0
    assert fastcap.open(tmp_path / "out")["3"].shape == (4, 16)

    ran = tmp_path / "ran"
    torch.save(_RunsOnLoad(ran), tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"holds a pickled posix\.mkdir"):
        load_model(str(tmp_path / "evil.pt"))
    assert not ran.exists()  # nothing in the file ran


# ------------------------------------------------------------------ bounded memory


def test_host_memory_flat_over_many_batches(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()).eval()
    process = psutil.Process()
    rss = {}

    def batches():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, 32, 32, generator=generator)
        for i in range(300):  # 2 x 512 KiB captured per batch: 300 MiB if anything piled up
            if i in (50, 299):
                rss[i] = process.memory_info().rss
            yield x

    store, stats = extract_module.extract_with_stats(
        model, batches(), ["0", "1"], "full", out=tmp_path, k=None, channel_dim=1, dtype=None,
        select=None, shard_size=256, overwrite=False, progress=False, forward=None, depth=4)
    assert store["1"].shape == (2400, 16, 32, 32) and stats["bytes_written"] == 2 * 300 * 8 * 16 * 32 * 32 * 4
    growth = (rss[299] - rss[50]) / 2**20
    assert growth < 24, f"host memory grew {growth:.1f} MiB between batch 50 and 300"
    # Bounded by the ring: 4 steps in its slots, 1 being written, 1 forward waiting for a slot.
    assert stats["max_pending_steps"] <= 4 + 2
