"""Regression tests for the issue "Nothing lost, nothing silently wrong", capture side
(cases 2 and 6-19; the extract cases are in test_robust_extract.py).

Each test's docstring starts with the issue's case number. Every test fails on the code the
issue was filed against and passes once the defect is fixed as the issue describes; where
the issue allows either a correct result or a clear error, the test accepts exactly those.
CPU only unless a test is parametrized over DEVICES. The torch.compile tests (case 14) are
the slow ones of this file (about a second each, the first one a few).
"""
from __future__ import annotations

import importlib
import re
import signal
import sys
import threading
import time
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import fastcap
from conftest import DEVICES, hook_count

# ------------------------------------------------------------------ shared helpers


def reference_capture(model, names, run):
    """What a plain ``out.detach().clone()`` hook records: {name: [one clone per call]}."""
    seen = {}
    modules = dict(model.named_modules())

    def make(name):
        def hook(module, args, out):
            seen.setdefault(name, []).append(out.detach().clone())
        return hook

    handles = [modules[n].register_forward_hook(make(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def assert_message(exc: BaseException, *patterns: str) -> None:
    """The error's message contains every regex (case-insensitive): the key facts."""
    text = str(exc)
    missing = [p for p in patterns if not re.search(p, text, re.IGNORECASE)]
    assert not missing, f"{type(exc).__name__} message lacks {missing}: {text!r}"


def head_model(module: nn.Module | None = None) -> nn.Sequential:
    """A one-layer model whose layer has a name no error message contains by accident."""
    return nn.Sequential(OrderedDict(head=module if module is not None else nn.Identity()))


# ------------------------------------------------------------------ case 2


def _waiting_in_close(thread_id: int) -> bool:
    """Whether that thread is inside Capture.close() and blocked in a wait there."""
    frame = sys._current_frames().get(thread_id)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return "close" in names and names[0] in ("wait", "close")


def test_interrupted_close_keeps_every_captured_step(async_copies):
    """Case 2: a KeyboardInterrupt while close() copies steps out loses all of them
    (result() then raises "take() on a closed ring").

    Deterministic: no copy to host lands until the Ctrl-C has been delivered, and the Ctrl-C is
    sent only once the main thread waits inside close() for those copies."""
    model = head_model()
    xs = [torch.full((2, 3), float(i)) for i in range(3)]
    delivered = threading.Event()
    main = threading.main_thread().ident

    def on_sigint(signum, frame):
        delivered.set()
        async_copies.open_gate()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)

    def send_when_main_waits_in_close():
        deadline = time.monotonic() + 60
        while not _waiting_in_close(main) and time.monotonic() < deadline:
            time.sleep(0.001)  # polling a state, not waiting for a time
        signal.pthread_kill(main, signal.SIGINT)

    async_copies(gated=True)  # no copy lands before the Ctrl-C has
    sender = threading.Thread(target=send_when_main_waits_in_close)
    try:
        with pytest.raises(KeyboardInterrupt):
            # A slot per step: the held-up copies never make the forward wait.
            with fastcap.capture(model, "head", depth=len(xs)) as cap:
                for x in xs:
                    model(x)
                sender.start()
    finally:
        sender.join(60)
        signal.signal(signal.SIGINT, previous)
    assert delivered.is_set()
    assert hook_count(model) == 0
    assert torch.equal(cap.result()["head"], torch.cat(xs))


# ------------------------------------------------------------------ case 6


def _with_infinities(device: str) -> torch.Tensor:
    """[2, 3, 64, 64]: per (sample, channel) +inf alone, -inf alone, +inf with -inf, nan,
    several +inf, and one plain channel."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    inf = float("inf")
    x[0, 0, 10, 10] = inf
    x[0, 1, 3, 40] = -inf
    x[0, 2, 5, 5], x[0, 2, 60, 1] = inf, -inf
    x[1, 0, 7, 7] = float("nan")
    x[1, 1, 0, 0], x[1, 1, 30, 30], x[1, 1, 63, 63] = inf, inf, inf
    return x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "ntc"])
def test_mean_with_infinities_equals_torch_mean(device, layout):
    """Case 6: reduce="mean" over a large reduction with +inf gives nan where torch.mean gives
    inf (the Kahan compensation computes inf - inf)."""
    x = _with_infinities(device)
    if layout == "channels_last":
        x, channel_dim, dims = x.contiguous(memory_format=torch.channels_last), 1, (2, 3)
    elif layout == "ntc":
        x, channel_dim, dims = x.permute(0, 2, 3, 1).reshape(2, 64 * 64, 3).contiguous(), -1, (1,)
    else:
        channel_dim, dims = 1, (2, 3)
    model = head_model()
    with fastcap.capture(model, "head", reduce="mean", channel_dim=channel_dim) as cap:
        model(x)
    got, expected = cap.result()["head"], x.float().mean(dims).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), (got, expected)
    assert torch.equal(torch.isposinf(got), torch.isposinf(expected)), (got, expected)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), (got, expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


# ------------------------------------------------------------------ case 7


class Recursive(nn.Module):
    """Calls itself once: model(x) -> lin(x) -> model(y) -> lin(y)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, depth: int = 1):
        y = self.lin(x)
        return self(y, depth - 1) if depth > 0 else y


def test_recursive_model_gives_one_step_per_top_level_call():
    """Case 7: steps are delimited by every call of the root module, so a model calling
    itself turns 3 top-level calls into 6 steps."""
    torch.manual_seed(0)
    model = Recursive()
    xs = [torch.randn(2, 4) for _ in range(3)]
    with torch.no_grad():
        ref = reference_capture(model, ["lin"], lambda: [model(x) for x in xs])["lin"]
        with fastcap.capture(model, "lin") as cap:
            for x in xs:
                model(x)
    assert cap.stats()["steps"] == 3
    steps = list(cap.drain())
    assert len(steps) == 3, [list(s) for s in steps]
    for i, step in enumerate(steps):
        assert list(step) == ["lin", "lin#1"], list(step)
        assert torch.equal(step["lin"], ref[2 * i]) and torch.equal(step["lin#1"], ref[2 * i + 1])


def test_direct_forward_calls_are_separate_steps_or_refused():
    """Case 7: three direct model.forward(x) calls are grouped into one step, as keys
    head, head#1, head#2."""
    torch.manual_seed(0)
    model = head_model(nn.Linear(4, 4))
    xs = [torch.randn(2, 4) for _ in range(3)]
    try:
        with torch.no_grad(), fastcap.capture(model, "head") as cap:
            for x in xs:
                model.forward(x)
        steps = list(cap.drain())
    except (RuntimeError, ValueError) as exc:  # the other accepted outcome: a clear refusal
        assert_message(exc, r"forward", r"model\(|call the model|__call__")
        assert hook_count(model) == 0
        return
    assert [list(s) for s in steps] == [["head"]] * 3, "calls grouped into one step"
    with torch.no_grad():
        for step, x in zip(steps, xs):
            assert torch.equal(step["head"], model.head(x))


# ------------------------------------------------------------------ case 8


class _SlowCopy(nn.Module):
    """Its input, copied, after a 1 ms sleep that lets the other thread run meanwhile."""

    def forward(self, x):
        time.sleep(0.001)
        return x.clone()


class _Double(nn.Module):
    def forward(self, x):
        return x * 2


def test_two_threads_forwarding_under_one_capture():
    """Case 8: two threads calling the model under one capture mix their steps (keys a, a#1,
    rows of a and b from different inputs, occasional "no ring slot" crashes)."""
    model = nn.Sequential(OrderedDict(a=_SlowCopy(), b=_Double()))
    n_threads, n_forwards = 2, 20
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def run(thread: int):
        try:
            barrier.wait(timeout=10)
            for i in range(n_forwards):
                model(torch.full((1, 3), float(100 * thread + i)))  # the input's id, in every row
        except Exception as exc:
            errors.append(exc)

    steps = None
    try:
        with fastcap.capture(model, ["a", "b"]) as cap:
            threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
        steps = list(cap.drain())
    except RuntimeError as exc:
        errors.append(exc)
    assert hook_count(model) == 0
    if errors:  # accepted only as a clear refusal of concurrent forwards
        for exc in errors:
            assert isinstance(exc, RuntimeError), repr(exc)
            assert_message(exc, r"thread")
        return
    assert len(steps) == n_threads * n_forwards, [sorted(s) for s in steps]
    ids = []
    for step in steps:
        assert sorted(step) == ["a", "b"], sorted(step)
        assert torch.equal(step["b"], step["a"] * 2), "rows of a and b belong to different inputs"
        assert (step["a"] == step["a"][0, 0]).all()
        ids.append(int(step["a"][0, 0]))
    assert sorted(ids) == sorted(100 * t + i for t in range(n_threads) for i in range(n_forwards))
    for t in range(n_threads):  # each thread's steps in its call order
        mine = [i for i in ids if i // 100 == t]
        assert mine == sorted(mine)


# ------------------------------------------------------------------ case 9


def test_traced_model_is_refused():
    """Case 9: a torch.jit.trace'd model is captured as {} with no error."""
    model = head_model(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in recent torch
        traced = torch.jit.trace(model, x)
    with pytest.raises((TypeError, ValueError)) as err:
        with fastcap.capture(traced, "head"):
            traced(x)
    assert_message(err.value, r"torch\.jit|ScriptModule|TorchScript")
    assert hook_count(traced) == 0


@pytest.mark.parametrize("name", ["head", "_orig_mod.head"])
def test_compiled_wrapper_is_refused(name):
    """Case 9: a model wrapped by torch.compile before capture() is captured as {} with no
    error (under its wrapper name) or refused as an unknown layer without saying why."""
    model = head_model(nn.Linear(4, 4))
    compiled = torch.compile(model)  # lazy: nothing is compiled unless it is called
    with pytest.raises((TypeError, ValueError)) as err:
        with fastcap.capture(compiled, name):
            pass
    assert_message(err.value, r"torch\.compile")
    assert hook_count(compiled) == 0


# ------------------------------------------------------------------ case 10


@pytest.mark.parametrize("mode", ["full", "mean", "topk"])
def test_meta_device_output_is_refused(mode):
    """Case 10: a model on the meta device "captures" uninitialised memory (top-k indices
    that look like pointers)."""
    model = head_model(nn.Linear(4, 8)).to("meta")
    kwargs = {"k": 2} if mode == "topk" else {}
    with pytest.raises(ValueError) as err:
        with fastcap.capture(model, "head", reduce=mode, **kwargs):
            model(torch.randn(2, 4, device="meta"))
    assert_message(err.value, r"head", r"meta")
    assert hook_count(model) == 0


# ------------------------------------------------------------------ case 11


def test_alias_named_like_another_module_gets_only_its_own_options():
    """Case 11: with layers={"1": "0", "relu": "1"}, reduce={"1": "mean"} also applies to
    "relu" (the module named "1")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 3, 4)
    with torch.no_grad(), fastcap.capture(model, {"1": "0", "relu": "1"}, reduce={"1": "mean"}) as cap:
        out = model(x)
    got = cap.result()
    assert got["relu"].shape == (2, 3, 4), "relu was reduced: it took the options of key '1'"
    assert torch.equal(got["relu"], out)
    with torch.no_grad():
        torch.testing.assert_close(got["1"], model[0](x).mean(2))


# ------------------------------------------------------------------ case 12


@pytest.mark.parametrize("mode", ["full", "mean"])  # topk results are always fresh tensors today
def test_results_are_independent(mode):
    """Case 12: result() over a single batch returns the cached tensor itself, so changing
    it changes what the next result() returns."""
    model = head_model()
    x = torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(0))
    with fastcap.capture(model, "head", reduce=mode) as cap:
        model(x)
    first = cap.result()["head"]
    first.zero_()
    second = cap.result()["head"]
    if mode == "full":
        assert torch.equal(second, x), "zeroing one result() changed the next one"
    else:
        torch.testing.assert_close(second, x.mean(2))


# ------------------------------------------------------------------ case 13


@pytest.mark.parametrize("mode", ["full", "mean"])
def test_small_result_after_a_big_batch_owns_only_its_bytes(tmp_path, mode):
    """Case 13: a result after a larger earlier batch keeps the big slot's storage
    (torch.save of a 16 KiB result writes ~4 MB)."""
    model = head_model()
    margin = 4096
    with fastcap.capture(model, "head", reduce=mode) as cap:
        model(torch.randn(4096, 256, 1))  # 4 MiB
        for _ in cap.drain():
            pass
        small = torch.randn(16, 256, 1)  # 16 KiB
        model(small)
    got = cap.result()["head"]
    expected = small if mode == "full" else small.mean(2)
    torch.testing.assert_close(got, expected, rtol=0 if mode == "full" else None,
                               atol=0 if mode == "full" else None)
    held = got.untyped_storage().nbytes()  # an int: pytest must not print a 4 MB storage
    assert held <= got.nbytes + margin, f"a {got.nbytes}-byte result holds a {held}-byte storage"
    torch.save(got, tmp_path / "got.pt")
    torch.save(expected.clone(), tmp_path / "own.pt")
    size, own = (tmp_path / "got.pt").stat().st_size, (tmp_path / "own.pt").stat().st_size
    assert size <= own + margin, f"torch.save wrote {size} bytes for a {got.nbytes}-byte result"


# ------------------------------------------------------------------ case 14 (the slow ones)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 16), act=nn.ReLU(), fc2=nn.Linear(16, 4))).eval()


def _assert_clear_compile_error(exc: BaseException) -> None:
    """A fastcap error that names torch.compile. Dynamo's own failures quote torch.compile
    in a generic hint ("...by removing the `torch.compile` call"): that does not count."""
    text = str(exc).replace("removing the `torch.compile` call", "")
    assert "Unsupported context manager" not in text, text
    assert isinstance(exc, (RuntimeError, ValueError, TypeError)), repr(exc)
    # \b: dynamo's hints also name torch.compiler.set_stance, which is not torch.compile.
    assert re.search(r"torch\.compile\b", text), f"not a clear error naming torch.compile: {text!r}"


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks", "fullgraph"])
@pytest.mark.parametrize("mode", ["full", "mean", "topk"])
def test_compiled_model_under_capture(mode, fullgraph):
    """Case 14: torch.compile(model, backend="aot_eager") of a model under capture crashes
    (topk: "view Byte as Long", mean: "dst must have shape", fullgraph: dynamo's
    "Unsupported context manager")."""
    layers = ["fc1", "fc2"]
    kwargs = {"k": 3} if mode == "topk" else {}
    xs = [torch.randn(2, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = _mlp()
    with torch.no_grad(), fastcap.capture(model, layers, reduce=mode, channel_dim=-1, **kwargs) as cap:
        for x in xs:
            model(x)
    expected = cap.result()

    torch._dynamo.reset()
    try:
        with torch.no_grad(), fastcap.capture(model, layers, reduce=mode, channel_dim=-1, **kwargs) as cap:
            compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
            for x in xs:
                compiled(x)
        got = cap.result()
    except Exception as exc:  # the other accepted outcome: one clear error naming torch.compile
        _assert_clear_compile_error(exc)
        assert hook_count(model) == 0
        return
    finally:
        torch._dynamo.reset()
    assert list(got) == layers
    for key in layers:
        if mode == "topk":
            torch.testing.assert_close(got[key].values, expected[key].values)
            assert torch.equal(got[key].indices, expected[key].indices)
        else:
            torch.testing.assert_close(got[key], expected[key])


# ------------------------------------------------------------------ case 15


def test_transformer_nested_fast_path():
    """Case 15: an eval nn.TransformerEncoder with src_key_padding_mask hands its layers
    nested tensors; capturing one fails with "NestedTensorImpl doesn't support sizes",
    naming no layer."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 2 + [True] * 3])
    padded = []

    def keep_padded(module, args, out):
        padded.append(out.to_padded_tensor(0.0, (3, 5, 16)) if out.is_nested else None)

    handle = encoder.layers[0].register_forward_hook(keep_padded)
    with torch.no_grad():
        encoder(x, src_key_padding_mask=mask)
    handle.remove()
    assert padded[0] is not None, "the nested fast path was not taken: this test checks nothing"

    try:
        with torch.no_grad(), fastcap.capture(encoder, "layers.0", channel_dim=-1) as cap:
            encoder(x, src_key_padding_mask=mask)
        got = cap.result()["layers.0"]
    except ValueError as exc:  # the other accepted outcome
        assert_message(exc, r"layers\.0", r"nested")
        assert hook_count(encoder) == 0
        return
    assert torch.equal(got, padded[0])


# ------------------------------------------------------------------ case 16


def test_vmap_is_a_clear_error():
    """Case 16: under torch.func.vmap the copy fails with "Batching rule not implemented for
    fastcap::copy_into", naming no layer."""
    model = head_model(nn.Linear(4, 4))
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        with fastcap.capture(model, "head"):
            torch.func.vmap(model)(torch.randn(3, 2, 4))
    assert_message(err.value, r"head", r"vmap|functorch")
    assert hook_count(model) == 0


class _Convert(nn.Module):
    def __init__(self, convert):
        super().__init__()
        self.convert = convert

    def forward(self, x):
        return self.convert(x)


@pytest.mark.parametrize("convert, what", [
    (lambda x: torch.quantize_per_tensor(x, 0.1, 0, torch.quint8), r"quint8|quantized"),
    (lambda x: x.to_sparse(), r"sparse"),
    (lambda x: x.to_sparse_csr(), r"sparse"),
], ids=["quantized", "sparse_coo", "sparse_csr"])
def test_quantized_and_sparse_outputs_are_clear_errors(convert, what):
    """Case 16: quantized and sparse outputs fail with "Could not run 'fastcap::copy_into'"
    (or "Sparse CSR tensors do not have strides"), naming no layer."""
    model = head_model(_Convert(convert))
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        with fastcap.capture(model, "head"):
            model(torch.randn(2, 4))
    assert_message(err.value, r"head", what)
    assert hook_count(model) == 0


def test_result_over_different_sequence_lengths_names_layer_shapes_and_drain():
    """Case 16: result() over batches of different sequence lengths with reduce="full"
    raises a bare torch.cat size error."""
    model = head_model()
    with fastcap.capture(model, "head") as cap:
        model(torch.randn(2, 5, 4))
        model(torch.randn(2, 7, 4))
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        cap.result()
    assert_message(err.value, r"head", r"2, 5, 4", r"2, 7, 4", r"drain")


# ------------------------------------------------------------------ case 17


def _named_model() -> nn.Sequential:
    return nn.Sequential(OrderedDict(layer1=nn.Linear(4, 4), layer2=nn.Linear(4, 4)))


@pytest.mark.parametrize("kwargs, facts", [
    ({"layers": {}}, [r"layers", r"empty|\{\}|at least one|no layer"]),
    ({"layers": "layer1", "depth": 2**63}, [r"depth", str(2**63)]),
    ({"layers": "layer[]"}, [re.escape("layer[]")]),
    ({"layers": "layer[z-a]"}, [re.escape("layer[z-a]")]),
    ({"layers": "[!]"}, [re.escape("[!]")]),
], ids=["empty-dict", "huge-depth", "glob-empty-set", "glob-reversed-range", "glob-negated-nothing"])
def test_bad_arguments_are_refused_at_capture_time(kwargs, facts):
    """Case 17: layers={}, depth=2**63 and malformed globs are accepted by capture() (or raise
    a raw re.error) instead of a ValueError naming the value."""
    model = _named_model()
    with pytest.raises(ValueError) as err:
        fastcap.capture(model, **kwargs)
    assert_message(err.value, *facts)
    assert hook_count(model) == 0


# ------------------------------------------------------------------ case 18


@pytest.mark.parametrize("reduce, k, error, facts", [
    ("mean", -5, ValueError, [r"\bk\b", r"-5"]),
    ("mean", 0, ValueError, [r"\bk\b"]),
    ("full", 2.5, (ValueError, TypeError), [r"\bk\b", r"2\.5"]),
    ({"layer1": "mean", "layer2": "topk"}, {"layer1": -5, "layer2": 2}, ValueError, [r"\bk\b", r"-5"]),
    ("mean", 3, ValueError, [r"\bk\b", r"top-?k"]),
], ids=["negative", "zero", "not-an-int", "negative-in-a-dict", "k-without-topk"])
def test_k_is_checked_wherever_given(reduce, k, error, facts):
    """Case 18: k=-5 with reduce="mean" (and any k when no layer is top-k) is silently
    accepted."""
    model = _named_model()
    with pytest.raises(error) as err:
        fastcap.capture(model, ["layer1", "layer2"], reduce=reduce, k=k)
    assert_message(err.value, *facts)


# ------------------------------------------------------------------ case 19


@pytest.mark.parametrize("depth", [1, 2])
def test_drain_in_a_consumer_thread_never_crashes_the_forward(depth, async_copies):
    """Case 19: drain() in a consumer thread with depth=1 and a slow copy-out crashes the
    forward with "no ring slot can be freed"."""
    async_copies(delay=0.02)  # slow copies to host
    model = head_model()
    xs = [torch.full((2, 3), float(i)) for i in range(10)]
    got, errors = [], []
    forwards_done = threading.Event()
    cap = fastcap.capture(model, "head", depth=depth)

    def consume():
        try:
            while True:
                drained = False
                for step in cap.drain():
                    got.append(step["head"])
                    drained = True
                if not drained:
                    if forwards_done.is_set():  # the capture is closed: the steps still in flight
                        got.extend(step["head"] for step in cap.drain(block=True))
                        return
                    time.sleep(0.001)
        except Exception as exc:
            errors.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    try:
        with cap:
            consumer.start()
            for x in xs:
                model(x)
                # The consumer claims this step and is copying it out when the next forward
                # needs a slot.
                time.sleep(0.005)
    finally:
        forwards_done.set()
        consumer.join(timeout=30)
    assert not consumer.is_alive()
    assert errors == []
    assert len(got) == len(xs)
    for a, b in zip(got, xs):
        assert torch.equal(a, b)
