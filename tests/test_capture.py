"""capture() against the plain-PyTorch hook it replaces: out.detach().clone() taken at
hook time, on CPU and (when present) CUDA."""
import importlib
import threading

import pytest
import torch
import torch.nn as nn
import torchvision

import fastcap
from conftest import DEVICES, assert_mean_close, distinct_along, hook_count, mean_reference


def reference_capture(model, names, run):
    """What the snippet everyone copies records: a clone per call, at hook time."""
    seen = {}
    modules = dict(model.named_modules())

    def make(name):
        def hook(module, args, out):
            x = out if isinstance(out, torch.Tensor) else out[0]
            seen.setdefault(name, []).append(x.detach().clone())
        return hook

    handles = [modules[n].register_forward_hook(make(n)) for n in names]
    try:
        outputs = run()
    finally:
        for h in handles:
            h.remove()
    return seen, outputs


def resnet18(device, channels_last=False):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def batches(device, sizes=(4, 4, 4), hw=32, channels_last=False):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 3, hw, hw, generator=g).to(device) for n in sizes]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    return xs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_full_is_bit_exact_and_keeps_negatives_before_inplace_relu(device, channels_last):
    # resnet18's bn1 is followed by ReLU(inplace=True): the clone taken at hook time keeps
    # its negatives, and so must fastcap's capture.
    model = resnet18(device, channels_last)
    xs = batches(device, channels_last=channels_last)
    names = ["bn1", "layer1.0.bn1", "layer2", "layer4.1", "fc"]
    with torch.no_grad():
        ref, ref_out = reference_capture(model, names, lambda: [model(x) for x in xs])
        with fastcap.capture(model, names) as cap:
            outs = [model(x) for x in xs]
    got = cap.result()
    assert list(got) == names
    for n in names:
        assert got[n].device.type == "cpu"
        assert torch.equal(got[n], torch.cat(ref[n]).cpu()), n
    assert (got["bn1"] < 0).any(), "negatives lost: captured after the in-place ReLU"
    for a, b in zip(outs, ref_out):
        assert torch.equal(a, b), "capturing changed the model's output"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_mean_and_topk_match_reference(device, channels_last):
    model = resnet18(device, channels_last)
    xs = batches(device, channels_last=channels_last)
    names = ["layer1", "layer3", "layer4"]
    with torch.no_grad():
        ref, _ = reference_capture(model, names, lambda: [model(x) for x in xs])
        with fastcap.capture(model, names, reduce="mean") as cap_mean:
            [model(x) for x in xs]
        with fastcap.capture(model, names, reduce="topk", k=5) as cap_topk:
            [model(x) for x in xs]
    means, topks = cap_mean.result(), cap_topk.result()
    for n in names:
        x = torch.cat(ref[n])
        assert_mean_close(means[n], mean_reference(x, 1))
        # topk after ReLU has many zeros (ties): compare on the distinct values only.
        r = torch.topk(x, 5, dim=1)
        assert torch.equal(topks[n].values, r.values.cpu()), n
        assert topks[n].indices.dtype == torch.int64
        assert topks[n].indices.shape == r.indices.shape


@pytest.mark.parametrize("device", DEVICES)
def test_topk_indices_equal_torch_topk_without_ties(device):
    x = distinct_along((6, 32, 3, 3), 1, torch.float32, device)
    model = nn.Sequential(nn.Identity())
    with fastcap.capture(model, "0", reduce="topk", k=8) as cap:
        model(x)
    got, ref = cap.result()["0"], torch.topk(x, 8, dim=1)
    assert isinstance(got, fastcap.TopK)
    assert torch.equal(got.values, ref.values.cpu()) and torch.equal(got.indices, ref.indices.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8])
def test_full_dtypes_and_layouts(device, dtype):
    model = nn.Sequential(nn.Identity())
    base = (torch.randn(4, 6, 5, 7) * 40).to(dtype).to(device)
    inputs = {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed": base.transpose(2, 3),
        "sliced": base[:, ::2, 1:, :],
        "expanded": base[:, :1].expand(4, 6, 5, 7),
    }
    for name, x in inputs.items():
        with fastcap.capture(model, "0") as cap:
            model(x)
        got = cap.result()["0"]
        assert got.dtype == dtype and torch.equal(got, x.cpu()), name
        if name == "channels_last":
            assert got.is_contiguous(memory_format=torch.channels_last), "layout not kept"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mean_and_topk_dtypes(device, dtype):
    model = nn.Sequential(nn.Identity())
    x = distinct_along((5, 24, 4, 6), 1, dtype, device)
    with fastcap.capture(model, "0", reduce="mean") as cap:
        model(x)
    assert_mean_close(cap.result()["0"], mean_reference(x, 1))
    with fastcap.capture(model, "0", reduce="topk", k=3) as cap:
        model(x)
    ref = torch.topk(x, 3, dim=1)
    got = cap.result()["0"]
    assert got.values.dtype == dtype
    assert torch.equal(got.values, ref.values.cpu()) and torch.equal(got.indices, ref.indices.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_cast_for_full(device):
    model = nn.Sequential(nn.Identity())
    x = torch.randn(3, 8, 4, 4, device=device)
    with fastcap.capture(model, "0", dtype=torch.float16) as cap:
        model(x)
    got = cap.result()["0"]
    assert got.dtype == torch.float16 and torch.equal(got, x.half().cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_op_after_hook_does_not_change_capture(device):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Identity()).to(device)

    class AddInPlace(nn.Module):
        def forward(self, x):
            x += 100.0  # a residual-style in-place update of the captured tensor
            return x

    model[2] = AddInPlace()
    x = torch.randn(8, 16, device=device)
    with torch.no_grad():
        expected = model[0](x).detach().clone()
        with fastcap.capture(model, "0") as cap:
            model(x)
    assert torch.equal(cap.result()["0"], expected.cpu())


class TupleOut(nn.Module):
    def forward(self, x):
        return (x * 2, {"aux": x + 1, "n": 3})


class DictOut(nn.Module):
    def forward(self, x):
        return {"meta": "text", "hidden": x - 1}


def test_tuple_and_dict_outputs_and_select():
    model = nn.Sequential(TupleOut())
    x = torch.randn(4, 5)
    with fastcap.capture(model, "0") as cap:
        model(x)
    assert torch.equal(cap.result()["0"], x * 2)  # first tensor leaf
    with fastcap.capture(model, "0", select=lambda out: out[1]["aux"]) as cap:
        model(x)
    assert torch.equal(cap.result()["0"], x + 1)
    with fastcap.capture(model, "0", select=0) as cap:
        model(x)
    assert torch.equal(cap.result()["0"], x * 2)

    dmodel = nn.Sequential(DictOut())
    with fastcap.capture(dmodel, "0") as cap:
        dmodel(x)
    assert torch.equal(cap.result()["0"], x - 1)
    with fastcap.capture(dmodel, "0", select="hidden") as cap:
        dmodel(x)
    assert torch.equal(cap.result()["0"], x - 1)


def test_module_called_twice_is_captured_per_call():
    block = nn.Linear(6, 6)
    model = nn.Sequential(block, nn.ReLU(), block)
    xs = [torch.randn(3, 6) for _ in range(2)]
    with torch.no_grad():
        with fastcap.capture(model, "0", reduce={"0": "full"}) as cap:
            for x in xs:
                model(x)
    got = cap.result()
    assert list(got) == ["0", "0#1"]
    first = [block(x) for x in xs]
    second = [block(torch.relu(f)) for f in first]
    assert torch.equal(got["0"], torch.cat(first))
    assert torch.equal(got["0#1"], torch.cat(second))


@pytest.mark.parametrize("device", DEVICES)
def test_variable_batch_sizes_and_empty_batch(device):
    model = resnet18(device)
    xs = batches(device, sizes=(2, 7, 0, 3, 9))
    names = ["layer2", "fc"]
    with torch.no_grad():
        ref, _ = reference_capture(model, names, lambda: [model(x) for x in xs if len(x)])
        for reduce in ("full", "mean", "topk"):
            with fastcap.capture(model, names, reduce=reduce, k=4 if reduce == "topk" else None) as cap:
                for x in xs:
                    model(x)
                assert cap.stats()["resizes"] > 0  # 7 and 9 outgrow the slots sized for 2
            got = cap.result()
            for n in names:
                x = torch.cat(ref[n]).cpu()
                if reduce == "full":
                    assert torch.equal(got[n], x)
                elif reduce == "mean":
                    assert_mean_close(got[n], mean_reference(x, 1))
                else:
                    assert torch.equal(got[n].values, torch.topk(x, 4, dim=1).values)


def test_empty_batch_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    x = torch.randn(0, 3, 5, 5)
    for reduce, shape in (("full", (0, 4, 5, 5)), ("mean", (0, 4)), ("topk", (0, 2, 5, 5))):
        with fastcap.capture(model, "0", reduce=reduce, k=2 if reduce == "topk" else None) as cap:
            model(x)
        got = cap.result()["0"]
        got = got.values if reduce == "topk" else got
        assert tuple(got.shape) == shape


def test_sequence_model_channel_dim_and_per_layer_reduce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 12))
    x = torch.randn(3, 9, 12)  # [N, L, C]
    with fastcap.capture(model, {"up": "0", "down": "2"}, reduce={"up": "topk", "down": "mean"},
                         k=4, channel_dim=-1) as cap:
        out = model(x)
    got = cap.result()
    up = model[0](x)
    ref = torch.topk(up, 4, dim=-1)
    assert torch.equal(got["up"].values, ref.values) and torch.equal(got["up"].indices, ref.indices)
    assert_mean_close(got["down"], mean_reference(out, -1))


def test_globs_follow_dotted_parts():
    model = torchvision.models.resnet18()
    cap = fastcap.capture(model, "layer*.1")
    assert cap.keys == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # not layer2.0.downsample.1
    cap = fastcap.capture(model, "**.downsample")
    assert cap.keys == ["layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"]
    cap = fastcap.capture(model, "layer1.**")
    assert cap.keys[0] == "layer1.0" and "layer1.1.bn2" in cap.keys and "layer1" not in cap.keys
    cap = fastcap.capture(model, ["layer?.0.conv[12]", "fc"])
    assert cap.keys[:2] == ["layer1.0.conv1", "layer1.0.conv2"] and cap.keys[-1] == "fc"
    assert len(cap.keys) == 9


def test_drain_yields_each_step_once_in_order_and_result_skips_drained():
    model = nn.Sequential(nn.Identity())
    xs = [torch.full((2, 3), float(i)) for i in range(6)]
    seen = []
    with fastcap.capture(model, "0", depth=2) as cap:
        for i, x in enumerate(xs):
            model(x)
            if i < 4:
                seen.extend(step["0"] for step in cap.drain())
                assert list(cap.drain()) == []  # nothing is handed out twice
    assert len(seen) == 4
    for i, t in enumerate(seen):
        assert torch.equal(t, xs[i])
    rest = cap.result()["0"]  # steps 4 and 5 were never drained
    assert torch.equal(rest, torch.cat(xs[4:]))
    assert cap.stats()["steps"] == 6


def test_full_ring_spills_oldest_steps_in_the_same_thread():
    model = nn.Sequential(nn.Identity())
    xs = [torch.randn(4, 8) for _ in range(20)]
    with fastcap.capture(model, "0", depth=1) as cap:
        for x in xs:
            model(x)
        stats = cap.stats()
    assert torch.equal(cap.result()["0"], torch.cat(xs))
    assert stats["slots"] == 1 and stats["steps"] == 20
    assert stats["bytes_captured"] == 20 * 4 * 8 * 4


def test_result_during_the_with_block():
    model = nn.Sequential(nn.Identity())
    with fastcap.capture(model, "0") as cap:
        model(torch.ones(2, 2))
        assert torch.equal(cap.result()["0"], torch.ones(2, 2))
        model(torch.zeros(1, 2))
        assert cap.result()["0"].shape == (3, 2)
    assert cap.result()["0"].shape == (3, 2)


def test_hooks_fired_outside_a_model_call_form_one_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with torch.no_grad(), fastcap.capture(model, ["0", "1"]) as cap:
        model[0](x)
        model[1](x)
        steps = list(cap.drain())
    assert len(steps) == 1 and set(steps[0]) == {"0", "1"}


def test_consumer_thread_with_backpressure():
    # extract()'s pattern: the forward thread blocks on a full ring, another thread drains.
    model = nn.Sequential(nn.Identity())
    xs = [torch.full((2, 3), float(i)) for i in range(30)]
    got, done = [], threading.Event()
    cap = fastcap.capture(model, "0", depth=2, collect=False)

    known = threading.Event()

    def consume():
        while not done.is_set() or len(got) < len(xs):
            for step in cap.drain():
                got.append(step["0"])
            known.set()  # a consumer the capture knows of: a full ring waits for it
            threading.Event().wait(0.002)

    with cap:
        t = threading.Thread(target=consume)
        t.start()
        assert known.wait(30)  # on a busy machine the thread may start late
        for x in xs:
            model(x)
        done.set()
        t.join(timeout=30)
    assert not t.is_alive()
    assert len(got) == 30 and all(torch.equal(a, b) for a, b in zip(got, xs))
    assert cap.stats()["stall_seconds"] >= 0.0


def test_stats_counts_bytes():
    model = nn.Sequential(nn.Identity())
    with fastcap.capture(model, "0", reduce="mean") as cap:
        for _ in range(3):
            model(torch.randn(4, 8, 2, 2))
        s = cap.stats()
    for key in ("steps", "bytes_captured", "pinned_bytes", "device_bytes", "stall_seconds", "d2h_gbps"):
        assert key in s
    assert s["steps"] == 3 and s["bytes_captured"] == 3 * 4 * 8 * 4
    assert s["host_bytes"] >= 2 * 4 * 8 * 4  # two preallocated slots
    assert cap.stats()["host_bytes"] == 0  # freed on exit
    assert cap.stats()["bytes_captured"] == s["bytes_captured"]


def test_training_mode_with_grad():
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
    x = torch.randn(3, 5, requires_grad=True)
    with fastcap.capture(model, ["0", "1"], reduce={"0": "full", "1": "mean"}) as cap:
        out = model(x)
        out.sum().backward()
    assert x.grad is not None
    got = cap.result()
    assert not got["0"].requires_grad
    assert torch.equal(got["0"], model[0](x).detach())
    assert hook_count(model) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_allocator_reuse_right_after_the_hook(device):
    # The activation is freed as soon as the next layer has run and its memory is handed
    # out again and overwritten; what was captured must not change.
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).to(device)
    xs = [torch.randn(16 + i, 64, device=device) for i in range(10)]
    with torch.no_grad():
        expected = [model[0](x).cpu() for x in xs]
        with fastcap.capture(model, "0", depth=2) as cap:
            for x in xs:
                model(x)
                junk = [torch.full((32, 64), float("nan"), device=device) for _ in range(4)]
                del junk
    assert torch.equal(cap.result()["0"], torch.cat(expected))


def test_leaving_the_with_block_while_another_thread_copies_a_step_out(async_copies):
    # drain() in a consumer thread has claimed a step whose copy to host is still in flight
    # (0.2 s) when the forward thread leaves the with-block: the step must arrive intact, once,
    # not hit a closed ring.
    async_copies(delay=0.2)
    model = nn.Sequential(nn.Identity())
    got, errors = [], []

    def consume():
        try:
            got.extend(cap.drain(block=True))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    with fastcap.capture(model, "0") as cap:
        model(torch.ones(2, 2))
        consumer = threading.Thread(target=consume)
        consumer.start()
    consumer.join(30)
    assert not consumer.is_alive()
    assert errors == [] and len(got) == 1
    assert torch.equal(got[0]["0"], torch.ones(2, 2))
    assert cap.result() == {}  # handed out once only
