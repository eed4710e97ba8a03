"""Never hang, never drop silently: a writer that fails while the forward waits, a consumer
thread that ends or stalls, layers that never run, early exit over varying call counts, and
tokens= without a token mode.

Every test here failed (or hung) on the code before its fix. A test whose failure would be a
hang runs the work on a thread of its own and gives it a generous deadline, so a regression
fails with a message instead of eating CI's time (pytest-timeout is the backstop).
CPU only, small models, deterministic: threads meet at events, never after a sleep.
"""
from __future__ import annotations

import errno
import importlib
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastcap

# ------------------------------------------------------------------ the internals used here
# The disk-full case must make one shard's file fail: fastcap.store._writer.NpyStream writes
# every shard .npy file (also used by test_robust_extract.py).
_writer_module = importlib.import_module("fastcap.store._writer")
_capture_module = importlib.import_module("fastcap.capture")  # the writer waits in Capture.wait_for_steps

DEADLINE = 60.0  # seconds: far above what any of these runs needs, even on a busy machine


def run_on_thread(work):
    """Runs ``work()`` on a thread; returns ``(finished, result, error)`` after at most
    DEADLINE seconds: ``finished`` is False when it hung."""
    outcome = {}

    def target():
        try:
            outcome["result"] = work()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="test-work", daemon=True)
    thread.start()
    thread.join(DEADLINE)
    return not thread.is_alive(), outcome.get("result"), outcome.get("error")


class ForwardCounter:
    """Counts forwards reaching a module (a pre-hook), and lets another thread wait for a count."""

    def __init__(self, module: nn.Module):
        self.count = 0
        self._cond = threading.Condition()
        self.handle = module.register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_for(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= count, DEADLINE)


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(body=nn.Linear(6, 8), act=nn.ReLU(), head=nn.Linear(8, 4))).eval()


# ------------------------------------------------------------------ 1. a failing writer


def test_the_writer_ends_at_once_when_stopped_not_after_its_wait(tmp_path, monkeypatch):
    """The writer thread waits for steps a poll interval at a time; stopping it wakes it, so an
    extract ends as soon as its last shard is written. With the interval made an hour, a writer
    that slept out its wait would hold the run for an hour (here: past the deadline)."""
    monkeypatch.setattr(_writer_module, "_WRITER_POLL_SECONDS", 3600.0)
    batches = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    written, idle = [], threading.Event()  # idle: every step written, the writer about to wait
    write_step, wait_for_steps = _writer_module.ShardWriter._write_step, _capture_module.Capture.wait_for_steps
    stop = _writer_module.ShardWriter.stop

    def counted(self, items):
        write_step(self, items)
        written.append(1)

    def waiting(self, timeout):
        if len(written) == len(batches):
            idle.set()
        return wait_for_steps(self, timeout)

    def stop_when_idle(self):  # the main thread stops the writer only once it sleeps in its wait
        assert idle.wait(DEADLINE)
        stop(self)

    monkeypatch.setattr(_writer_module.ShardWriter, "_write_step", counted)
    monkeypatch.setattr(_capture_module.Capture, "wait_for_steps", waiting)
    monkeypatch.setattr(_writer_module.ShardWriter, "stop", stop_when_idle)
    finished, store, error = run_on_thread(lambda: fastcap.extract(
        small_model(), batches, "head", "full", out=tmp_path / "out", progress=False))
    assert finished, "extract waited for its writer's poll interval after the last batch"
    assert error is None and store.complete and store["head"].shape[0] == 12


def test_writer_failing_while_the_forward_waits_raises_its_oserror(tmp_path, monkeypatch):
    """The disk fills on the second shard while the forward is a full ring ahead of the writer:
    the forward must raise the writer's OSError (naming out and what was kept), not wait for
    ever; the first shard stays committed."""
    depth = 2
    model = small_model()
    counter = ForwardCounter(model.head)
    batches = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    class FullOnSecondShard(_writer_module.NpyStream):
        def write(self, array):
            if "shard-000001" in str(self.path):
                # Step 1 is being written: wait until the forward of step 1 + depth has reached
                # the captured layer. Steps 2..depth hold the other slots, so it is waiting for one.
                counter.wait_for(2 + depth)
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(array)

    monkeypatch.setattr(_writer_module, "NpyStream", FullOnSecondShard)
    out = tmp_path / "out"
    finished, _, error = run_on_thread(lambda: fastcap.extract(
        model, batches, "head", "full", out=out, shard_size=4, depth=depth, stop_early=False))
    assert finished, "extract hung after its writer failed"
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, repr(error)
    assert str(out) in str(error) and re.search(r"1 shard\(s\) .* kept", str(error)), str(error)
    committed = sorted(p.name for p in (out / "rank-00000").iterdir())
    assert committed == ["shard-000000"], committed
    counter.handle.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


# ------------------------------------------------------------------ 2. consumer threads


def test_blocking_drain_in_a_thread_takes_every_step_and_ends_with_the_capture():
    """The consumer-thread pattern: ``drain(block=True)`` keeps taking steps until the capture
    closes, so many more forwards than ``depth`` neither hang nor lose a step. (The non-blocking
    ``drain()`` ended after the first batch and the forward then waited for ever.)"""
    model = small_model()
    xs = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    got = []

    def run():
        with torch.no_grad(), fastcap.capture(model, "head", collect=False, depth=4) as cap:
            consumer = threading.Thread(target=lambda: got.extend(s["head"] for s in cap.drain(block=True)))
            consumer.start()
            for x in xs:
                model(x)
        consumer.join(DEADLINE)
        return consumer.is_alive(), cap.stats()

    finished, result, error = run_on_thread(run)
    assert finished and error is None, error
    consumer_alive, stats = result
    assert not consumer_alive
    with torch.no_grad():
        assert [torch.equal(a, model(x)) for a, x in zip(got, xs)] == [True] * len(xs)
    assert len(got) == len(xs) and stats["steps"] == len(xs)


def test_a_consumer_thread_that_ended_is_an_error_not_a_hang(monkeypatch):
    """A consumer thread that drained once and ended (the old README example) leaves a forward
    waiting on a full ring: it must raise, naming the layer, depth and collect=False."""
    steps_module = importlib.import_module("fastcap._steps")
    monkeypatch.setattr(steps_module, "_NO_CONSUMER_SECONDS", 0.1)
    model = small_model()

    def run():
        with torch.no_grad(), fastcap.capture(model, "head", collect=False, depth=2) as cap:
            consumer = threading.Thread(target=lambda: list(cap.drain()))
            consumer.start()
            consumer.join()
            for _ in range(4):
                model(torch.randn(2, 6))

    finished, _, error = run_on_thread(run)
    assert finished, "the forward waited for ever for a consumer thread that had ended"
    assert isinstance(error, RuntimeError), repr(error)
    assert all(s in str(error) for s in ("'head'", "depth=2", "collect=False", "drain(block=True)")), str(error)


class StalledConsumer:
    """A live consumer thread that has drained once (so the capture knows it) and then takes
    nothing until ``release()``; then it drains with ``block=True`` to the end."""

    def __init__(self, cap):
        self.cap, self.gate, self.got = cap, threading.Event(), []
        drained_once = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(drained_once,), name="stalled-consumer")
        self.thread.start()
        # Before any forward: a first drain() racing the forwards could take every step.
        assert drained_once.wait(DEADLINE)

    def _run(self, drained_once):
        self.got.extend(self.cap.drain())
        drained_once.set()
        self.gate.wait(DEADLINE)
        self.got.extend(self.cap.drain(block=True))

    def release(self):
        self.gate.set()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()


def test_a_long_wait_warns_naming_the_layer_and_depth(monkeypatch):
    """A forward that has waited long on a full ring says so (once), then goes on waiting."""
    steps_module = importlib.import_module("fastcap._steps")
    monkeypatch.setattr(steps_module, "_WARN_AFTER_SECONDS", 0.05)
    model = small_model()
    caught = []

    def run():
        with torch.no_grad(), fastcap.capture(model, "head", collect=False, depth=2) as cap:
            consumer = StalledConsumer(cap)
            original = warnings.showwarning

            def show(message, *args, **kwargs):  # the warning lets the consumer go on
                caught.append(str(message))
                consumer.gate.set()

            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = show
                try:
                    for _ in range(5):
                        model(torch.randn(2, 6))
                finally:
                    warnings.showwarning = original
        consumer.release()
        return len(consumer.got)

    finished, drained, error = run_on_thread(run)
    assert finished and error is None, error
    assert drained == 5
    assert len(caught) == 1, caught
    assert all(s in caught[0] for s in ("'head'", "depth=2", "collect=False", "timeout=")), caught[0]


def test_timeout_turns_a_long_wait_into_an_error():
    model = small_model()

    def run():
        with torch.no_grad(), fastcap.capture(model, "head", collect=False, depth=2, timeout=0.2) as cap:
            consumer = StalledConsumer(cap)
            try:
                for _ in range(5):
                    model(torch.randn(2, 6))
            finally:
                consumer.release()

    finished, _, error = run_on_thread(run)
    assert finished
    assert isinstance(error, TimeoutError), repr(error)
    assert all(s in str(error) for s in ("'head'", "timeout=0.2", "depth=2", "collect=False")), str(error)
    with pytest.raises(ValueError, match="timeout must be None or a number of seconds > 0, got -1"):
        fastcap.capture(model, "head", timeout=-1)


# ------------------------------------------------------------------ 3. layers that never run


def tiny_gpt2():
    """A 2-block GPT-2 with random weights and the default ("sdpa") attention, under which
    ``attn.attn_dropout`` never runs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_extract_names_a_requested_layer_that_never_ran(tmp_path):
    """GPT-2's attn_dropout under SDPA never runs: the store used to be complete without that key
    (or, as the only layer, the error spoke of "0 rows for a batch of 4 samples")."""
    model = tiny_gpt2()
    batches = [{"input_ids": torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    for layers in (["transformer.h.0", "transformer.h.0.attn.attn_dropout"],
                   "transformer.h.1.attn.attn_dropout"):
        with pytest.raises(ValueError) as info:
            fastcap.extract(model, batches, layers, "mean", channel_dim=-1, out=tmp_path / "out")
        message = str(info.value)
        assert "attn_dropout" in message and "did not run" in message and "scaled_dot_product" in message, message
        assert "0 rows" not in message
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_capture_warns_about_a_requested_layer_that_never_ran():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match=r"'transformer.h.0.attn.attn_dropout' did not run in 2 forward"):
        with torch.no_grad(), fastcap.capture(model, ["transformer.h.0", "transformer.h.0.attn.attn_dropout"],
                                              "mean", channel_dim=-1) as cap:
            model(ids)
            model(ids)
    assert list(cap.result()) == ["transformer.h.0"]
    # Every layer ran: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), fastcap.capture(model, "transformer.h.0", "mean", channel_dim=-1) as cap:
            model(ids)
        cap.result()


@pytest.mark.parametrize("data", [[], "empty-loader"], ids=["empty-list", "empty-loader"])
def test_extract_of_no_samples_is_refused_not_an_empty_store(tmp_path, data):
    """No samples: the store used to be "complete" with keys=[]."""
    if data == "empty-loader":
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 6)), batch_size=2)
    with pytest.raises(ValueError, match="no samples"):
        fastcap.extract(small_model(), data, "head", out=tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------ 4. early exit, varying calls


class Scripted(nn.Module):
    """Batch i calls ``block`` ``block_calls[i]`` times and ``expert`` (after block) when
    ``expert_runs[i]``, then ``head``: call counts that vary from batch to batch."""

    def __init__(self, block_calls, expert_runs):
        super().__init__()
        torch.manual_seed(0)
        self.block, self.expert, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.block_calls, self.expert_runs, self.forwards = block_calls, expert_runs, 0
        self.eval()

    def forward(self, x):
        # Forward i follows the script of batch i; early exit's learning forward (one sample of
        # the first batch, before it) follows batch 0's.
        if x.shape[0] == 1:
            i = 0
        else:
            i, self.forwards = self.forwards, self.forwards + 1
        for _ in range(self.block_calls[i]):
            x = self.block(x)
        if self.expert_runs[i]:
            x = self.expert(x)
        return self.head(x)


def _scripted_extract(tmp_path, model, layers, stop_early=True):
    batches = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(len(model.block_calls))]
    return fastcap.extract(model, batches, layers, "full", out=tmp_path / f"out-{stop_early}", stop_early=stop_early)


@pytest.mark.parametrize("stop_early", [True, False], ids=["early-exit", "full-forward"])
def test_a_layer_called_more_often_later_is_an_error_with_and_without_early_exit(tmp_path, stop_early):
    """Called once in batch 0 and twice in batch 1: early exit used to stop after the first call
    and silently lose ``block#1``."""
    model = Scripted(block_calls=[1, 2, 1], expert_runs=[True, True, True])
    with pytest.raises(ValueError) as info:
        _scripted_extract(tmp_path, model, ["block", "expert"], stop_early)
    assert "block" in str(info.value), str(info.value)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("stop_early", [True, False], ids=["early-exit", "full-forward"])
def test_a_layer_that_runs_only_in_later_batches_is_an_error(tmp_path, stop_early):
    """An expert that got no tokens in batch 0 and runs after the deepest other captured layer
    later: early exit used to stop before it and drop it silently."""
    model = Scripted(block_calls=[1, 1, 1], expert_runs=[False, True, True])
    with pytest.raises(ValueError, match="'expert'"):
        _scripted_extract(tmp_path, model, ["block", "expert"], stop_early)


def test_a_layer_that_stops_running_is_named_at_the_stop_point(tmp_path):
    model = Scripted(block_calls=[1, 1, 1], expert_runs=[True, True, False])
    with pytest.raises(ValueError, match=r"layer 'expert' ran 0 time\(s\) in this forward, 1 in the learning forward \(one sample of the first batch\)"):
        _scripted_extract(tmp_path, model, ["block", "expert"])


def test_early_exit_stops_before_the_next_module_and_stores_every_call(tmp_path):
    """Equal calls in every batch: early exit stores what a full forward stores, and the module
    after the deepest captured call (``head``) runs only in the learning forward (one sample of
    the first batch, stored nowhere)."""
    heads = []
    early_model = Scripted(block_calls=[2, 2, 2], expert_runs=[True, True, True])
    early_model.head.register_forward_pre_hook(lambda module, args: heads.append(tuple(args[0].shape)))
    early = _scripted_extract(tmp_path, early_model, ["block", "expert"])
    full = _scripted_extract(tmp_path, Scripted([2, 2, 2], [True, True, True]), ["block", "expert"], False)
    assert heads == [(1, 4)]
    assert sorted(early) == sorted(full) == ["block", "block#1", "expert"]
    for key in full:
        assert torch.equal(early[key].tensor(), full[key].tensor()), key


# ------------------------------------------------------------------ 8. tokens= means tokens


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.block = nn.Embedding(16, 4), nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.block(self.embed(input_ids))


def test_tokens_without_reduce_captures_the_kept_tokens(tmp_path):
    """tokens= with the default reduce used to write full [N, T, C] rows, BOS included, and no
    token index: now the default mode with tokens= is "tokens"."""
    model = TinyLM().eval()
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    tokens = fastcap.Tokens(skip_ids=[1])
    with torch.no_grad():
        hidden = model(ids)
        with fastcap.capture(model, "block", tokens=tokens) as cap:
            model(input_ids=ids, attention_mask=mask)
    keep = (mask == 1) & (ids != 1)
    assert torch.equal(cap.result()["block"], hidden[keep])
    assert cap.token_index().position.tolist() == [1, 2, 3, 1, 2]
    store = fastcap.extract(model, [{"input_ids": ids, "attention_mask": mask}], "block", out=tmp_path / "out",
                            tokens=tokens)
    assert torch.equal(store["block"].tensor(), hidden[keep])
    assert store.tokens.position.tolist() == [1, 2, 3, 1, 2]
    # An explicit "full" still ignores the mask, as documented.
    with torch.no_grad(), fastcap.capture(model, "block", "full", tokens=tokens) as cap:
        model(input_ids=ids, attention_mask=mask)
    assert torch.equal(cap.result()["block"], hidden)


def test_command_line_tokens_without_reduce_stores_token_rows(tmp_path):
    pytest.importorskip("transformers")
    from fastcap.cli import main
    model = ("hf-random:gpt2?n_layer=1&n_embd=16&n_head=2&vocab_size=50&n_positions=32"
             "&bos_token_id=1&eos_token_id=2")
    out = tmp_path / "out"
    assert main(["extract", "--model", model, "--data", "fake-text:6", "--context", "8", "--pack",
                 "--tokens", "--skip-ids", "bos", "--layers", "transformer.h.0", "--out", str(out)]) == 0
    store = fastcap.open(out)
    assert store.manifest["keys"]["transformer.h.0"].get("rows") == "tokens"
    assert store["transformer.h.0"].shape[1] == 16 and len(store.tokens.position) == store["transformer.h.0"].shape[0]
    assert 0 not in set(store.tokens.position.tolist())  # BOS, at position 0 of every packed row, skipped
