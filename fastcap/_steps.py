"""The forward side of a capture: the hooks, and the slow path of an activation's way into a
ring slot.

Each captured layer's forward hook is a compiled ``fastcap._C.Hook``: in steady state it
captures the activation in one call (``csrc/capture_core.cpp``: count the call in the thread's
open step, take a free slot, run the op into it, commit). Whatever it cannot do at once it hands
to :meth:`ForwardHooks._fallback`, here: a first call or a new shape (select the tensor, check
it, lay its slot out and install the plan), a full ring (wait, never silently for ever), a token
mode (the kept tokens' rows or pooling, and the step's token index), a hook outside any call of
the model, and early exit's learning forward. The model's own pre- and post-hooks delimit the
steps (one per top-level call, per thread).
"""
from __future__ import annotations

import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from fastcap import _ext
from fastcap._early_exit import EarlyExit
from fastcap._layers import Layer
from fastcap._outputs import check_capturable, select_tensor
from fastcap._slots import (INDEX_MODE, Part, plan_index_parts, plan_parts, plan_token_parts, slot_bytes,
                            write_index_slot, write_token_slot)
from fastcap._tokens import ROW_MODES, TOKEN_INDEX_KEY, BoundTokens, check_token_output, keep_mask

# With collect=False, how long a forward waits for a full ring before it concludes that no
# live thread will ever drain (a consumer thread gets this long to make its first drain()).
_NO_CONSUMER_SECONDS = 2.0
# A forward that has waited this long for a slot says so (once per capture), whatever the cause.
_WARN_AFTER_SECONDS = 10.0
_WAIT_SLICE_SECONDS = 0.05

_OPS = {"full": _ext._C.Op.copy, "mean": _ext._C.Op.mean, "topk": _ext._C.Op.topk}


class ConsumerFailed(RuntimeError):
    """Raised in a forward waiting for a slot when the thread that takes the steps out (the
    collector, extract's writer) failed: ``error`` is that thread's exception."""

    def __init__(self, error: BaseException):
        super().__init__(f"fastcap: the consumer of this capture failed: {type(error).__name__}: {error}")
        self.error = error


class _StepTokens:
    """tokens=: one step's attention mask and ids, and the kept tokens computed from them."""

    __slots__ = ("number", "mask", "ids", "keep", "indexed")

    def __init__(self, number: int, mask=None, ids=None):
        self.number, self.mask, self.ids = number, mask, ids
        self.keep = None  # ((N, T, device), bool [N, T])
        self.indexed = False  # the step's token index is written


class ForwardHooks:
    """The hooks of a :class:`fastcap.Capture` on its model, and what happens in them.

    ``core`` is the capture's ``fastcap._C.Core``; ``on_error()`` closes the capture (nothing
    stays behind after an error in a hook). ``consumers`` (thread idents that drained) and
    ``consumer_error`` are kept up to date by the capture's consumers.
    """

    def __init__(self, model: nn.Module, layers: List[Layer], core, tokens: Optional[BoundTokens],
                 stop_early: bool, timeout: Optional[float], on_error: Callable[[], None]):
        self._model = model
        self._layers = layers
        self._core = core
        self._tokens = tokens
        self._timeout = timeout  # seconds a forward may wait for a slot; None: for ever (warned)
        self._on_error = on_error
        self._handles: List[Any] = []
        self._compiled_hooks: List[Any] = []  # the fastcap._C.Hook of each captured layer
        self._parts: Dict[tuple, List[Part]] = {}  # plan per activation signature
        self._installed: Dict[tuple, tuple] = {}  # (layer, call) -> the signature of its plan in the core
        self._local = threading.local()  # tokens=: the thread's open step
        self._lock = threading.Lock()
        self._samples = 0  # samples numbered so far by token indices
        self._early_exit = EarlyExit(model, self._register_pre_hook, self._open_step_calls) if stop_early else None
        self._warned_wait = False
        self.consumers: set = set()
        self.consumer_error: Optional[BaseException] = None
        self.forward_wait_seconds = 0.0
        self.waiting = 0  # forwards waiting for a free slot right now

    # ----------------------------------------------------------------- hooks
    def install(self) -> None:
        """The model's own pre- and post-hooks delimit steps; a compiled hook per captured layer.

        The model's hooks run eagerly when a compiled caller (torch.compile) reaches them: they
        hold Python state no graph can trace (the compiled hooks graph-break by themselves)."""
        modules = dict(self._model.named_modules())
        self._handles.append(self._model.register_forward_pre_hook(eager(self._on_model_start), with_kwargs=True))
        self._handles.append(self._model.register_forward_hook(eager(self._on_model_end), always_call=True))
        for index, layer in enumerate(self._layers):
            hook = self._core.hook(index, layer.select is None, self._fallback_for(index), self._on_error)
            self._compiled_hooks.append(hook)
            self._handles.append(modules[layer.module_name].register_forward_hook(hook))
        if self._early_exit is not None:
            self._core.set_slow_path(True)  # the learning forward tells early exit of every capture
            self._early_exit.install()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        # A compiled hook's references are invisible to the garbage collector: a traceback
        # holding one would keep this capture alive for ever (see Hook::clear).
        for hook in self._compiled_hooks:
            hook.clear()
        self._compiled_hooks.clear()

    def _register_pre_hook(self, module: nn.Module, hook: Callable):
        """A pre-hook of early exit's, ahead of the module's others; an error in it (not
        StopForward) closes the capture like one in a capture hook."""
        def guarded(module, args):
            try:
                return hook(module, args)
            except Exception:
                self._on_error()
                raise
        handle = module.register_forward_pre_hook(eager(guarded), prepend=True)
        self._handles.append(handle)
        return handle

    def _open_step_calls(self) -> Optional[Dict[str, int]]:
        calls = self._core.open_step_calls()
        return {layer.key: n for layer, n in zip(self._layers, calls) if n} if calls else None

    # ----------------------------------------------------------------- steps
    def learn_stop_point(self, run: Callable[[], None]) -> bool:
        """Early exit's learning forward on a slice: ``run()`` calls the model, whose hooks count
        the captured layers' calls for early exit and capture nothing. See
        :meth:`fastcap._early_exit.EarlyExit.learn_on_slice`."""
        if self._early_exit is None or not self._early_exit.learning:
            return False
        learned = self._early_exit.learn_on_slice(run)
        if learned:
            self._core.set_slow_path(False)
        return learned

    def _learning_on_slice(self) -> bool:
        return self._early_exit is not None and self._early_exit.slice_calls is not None

    def _on_model_start(self, module, args, kwargs) -> None:
        if self._learning_on_slice():
            return  # no step: nothing is captured
        if not self._core.enter_model():
            return  # a nested call of the model belongs to the open step
        if self._tokens is not None:
            self._local.tokens = _StepTokens(self._core.open_step_number(), *self._tokens.find(args, kwargs))
        if self._early_exit is not None:
            self._early_exit.step_started()

    def _on_model_end(self, module, args, output) -> None:
        if self._learning_on_slice():
            return
        learning = self._early_exit is not None and self._early_exit.learning
        calls = self._open_step_calls() if learning else None
        if self._core.exit_model() and learning and calls:
            self._early_exit.step_finished(calls)
            self._core.set_slow_path(False)

    # ----------------------------------------------------------------- the slow path
    def _fallback_for(self, index: int):
        layer = self._layers[index]

        def fallback(call: int, output: Any) -> None:
            if call < 0 and self._learning_on_slice():  # early exit learning: count, store nothing
                self._early_exit.layer_ran(layer.key)
                return
            try:
                self._capture(index, layer, call, output)
            except BaseException:
                # Nothing stays behind after an error: hooks off, buffers freed (what was
                # captured before stays in result()).
                self._on_error()
                raise
        fallback.__qualname__ = f"fastcap capture of {layer.key!r}"
        return fallback

    def _capture(self, index: int, layer: Layer, call: int, output: Any) -> None:
        self._raise_consumer_error()
        if call < 0:  # no step open on this thread: a hook outside a call of the model
            if calling_forward_directly(self._model):
                raise RuntimeError(
                    f"layer {layer.key!r} ran inside a direct call of {type(self._model).__name__}"
                    ".forward(...): fastcap delimits steps by calls of the model itself, so call "
                    "model(x) instead of model.forward(x)")
            call = self._core.count_call(index)
        key = layer.key if call == 0 else f"{layer.key}#{call}"
        x = select_tensor(layer, output)
        check_capturable(layer, x)
        if layer.token_mode:
            self._capture_tokens(index, layer, call, key, x.detach())
        else:
            signature = (layer.key, x.shape, x.stride(), x.dtype, x.device)
            parts = self._parts.get(signature)
            if parts is None:  # activations keep their shape from step to step: plan (and check) once
                parts = self._parts[signature] = plan_parts(layer, x)
            ring = self._core.set_plan(index, call, x, _OPS[layer.mode], layer.k or 0, layer.channel_dim,
                                       layer.mode, [p.spec() for p in parts])
            slot = self._acquire(ring, slot_bytes(parts), key)
            self._core.write(index, call, x, slot)
        if self._early_exit is not None and self._early_exit.learning:
            self._early_exit.layer_ran()

    def _step_tokens(self) -> _StepTokens:
        """The tokens of this thread's open step (an implicit step's: none known)."""
        number = self._core.open_step_number()
        st = getattr(self._local, "tokens", None)
        if st is None or st.number != number:
            st = self._local.tokens = _StepTokens(number)
        return st

    def _capture_tokens(self, index: int, layer: Layer, call: int, key: str, x: torch.Tensor) -> None:
        """A token mode: the kept tokens' rows (or their pooling), plus the step's token index
        the first time a row mode runs in it."""
        check_token_output(layer.key, layer.mode, x)
        st = self._step_tokens()
        n, t = x.shape[0], x.shape[1]
        if st.keep is None or st.keep[0] != (n, t, x.device):
            st.keep = ((n, t, x.device), keep_mask(self._tokens, layer.key, x, st.mask, st.ids))
        keep = st.keep[1]
        if layer.mode in ROW_MODES and not st.indexed:
            parts = plan_index_parts(n, t)
            kid = self._core.key_id(TOKEN_INDEX_KEY)
            ring = self._core.ring_for(kid, x.device)
            slot = self._acquire(ring, slot_bytes(parts), key)
            ids = st.ids.to(x.device, non_blocking=True) if st.ids is not None else None
            with self._lock:
                offset, self._samples = self._samples, self._samples + n
            write_index_slot(ring, slot, keep, ids, offset, parts)
            self._core.add_item(kid, ring, slot, INDEX_MODE, True, [p.spec() for p in parts], n, offset)
            st.indexed = True
        signature = (layer.key, "tokens", x.shape, x.dtype, x.device)
        parts = self._parts.get(signature)
        if parts is None:
            parts = self._parts[signature] = plan_token_parts(layer, x)
        kid = self._core.call_key(index, call)
        ring = self._core.ring_for(kid, x.device)
        slot = self._acquire(ring, slot_bytes(parts), key)
        write_token_slot(ring, slot, layer, x, keep, parts)
        self._core.add_item(kid, ring, slot, layer.mode, layer.mode in ROW_MODES, [p.spec() for p in parts])

    # ----------------------------------------------------------------- waiting for a slot
    def _acquire(self, ring, nbytes: int, key: str) -> int:
        slot = ring.acquire(nbytes, 0.0)
        if slot >= 0:
            return slot
        # Every slot holds a finished step no consumer has taken yet: wait for one, never
        # silently for ever.
        start = time.perf_counter()
        with self._lock:
            self.waiting += 1
        try:
            while slot < 0:
                waited = time.perf_counter() - start
                self._raise_consumer_error()
                if not self._core.collect and waited > _NO_CONSUMER_SECONDS and not self._live_consumers():
                    raise RuntimeError(
                        f"fastcap: layer {key!r} waits for a free slot, but every one of its depth="
                        f"{self._core.depth} ring slots holds a step no thread has drained, and with "
                        "collect=False no live thread drains this capture (a consumer thread that "
                        "ended, or none): consume in a thread with `for step in cap.drain(block=True)`, "
                        "drain after each forward, or use collect=True")
                if self._timeout is not None and waited > self._timeout:
                    raise TimeoutError(f"fastcap: layer {key!r} waited {waited:.1f} s for a free ring slot "
                                       f"(timeout={self._timeout}): {self._stall_reason()}")
                if waited > _WARN_AFTER_SECONDS and not self._warned_wait:
                    self._warned_wait = True
                    warnings.warn(f"fastcap: the forward has waited {waited:.0f} s for a free ring slot of "
                                  f"layer {key!r}: {self._stall_reason()}; pass timeout= to make such a "
                                  "wait an error", RuntimeWarning, stacklevel=2)
                slot = ring.acquire(nbytes, _WAIT_SLICE_SECONDS)
            return slot
        finally:
            with self._lock:
                self.forward_wait_seconds += time.perf_counter() - start
                self.waiting -= 1

    def _raise_consumer_error(self) -> None:
        """A consumer (extract's writer) or the collector failed: this forward raises it."""
        error = self.consumer_error
        if error is None and self._core.consumer_error():
            error = RuntimeError(f"fastcap: copying an activation out of its ring slot failed: "
                                 f"{self._core.consumer_error()}")
        if error is not None:
            raise ConsumerFailed(error) from error

    def _live_consumers(self) -> set:
        """Threads other than this one that drained this capture and still run."""
        alive = {thread.ident for thread in threading.enumerate()}
        return (self.consumers & alive) - {threading.get_ident()}

    def _stall_reason(self) -> str:
        depth = self._core.depth
        if self._core.collect:
            return (f"all depth={depth} slots hold steps the collector thread has not copied out "
                    "yet (a slow or blocked copy-out)")
        return (f"all depth={depth} slots hold steps no consumer has taken (collect=False): the "
                "thread that drains this capture is slow or stuck")

    # ----------------------------------------------------------------- steps, from the consumers' side
    def layers_not_run(self) -> List[str]:
        """The requested keys whose module has not run in any forward so far."""
        return [layer.key for layer, ran in zip(self._layers, self._core.layers_run()) if not ran]

    def not_run_message(self, missing: List[str]) -> str:
        by_key = {layer.key: layer for layer in self._layers}
        names = ", ".join(f"{key!r}" + (f" (module {by_key[key].module_name!r})"
                                          if by_key[key].module_name != key else "") for key in missing)
        return (f"requested layer(s) {names} did not run in {self._core.steps_finished} forward pass(es) of "
                f"{type(self._model).__name__}. A forward can skip a module: attention dropout under "
                "scaled_dot_product_attention (e.g. Hugging Face's attn_dropout with the 'sdpa' "
                "implementation), a branch not taken, an MoE expert that got no tokens, or a module "
                "called through .forward() or functionally, which bypasses its hooks")


def eager(hook: Callable) -> Callable:
    """The hook, marked to run eagerly at a graph break when a compiled function calls it."""
    reason = ("fastcap's capture hooks run eagerly between compiled graphs; compile without "
              "fullgraph=True to capture a torch.compile'd model")
    try:
        return torch.compiler.disable(hook, reason=reason)
    except TypeError:  # torch without disable(reason=)
        return torch.compiler.disable(hook)


def calling_forward_directly(model: nn.Module) -> bool:
    """Whether ``model.forward`` runs on this thread's stack without ``model.__call__``."""
    codes = set()
    fn = type(model).forward
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None:
            codes.add(code)
        fn = getattr(fn, "__wrapped__", None)
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in codes and frame.f_locals.get("self") is model:
            return True
        frame = frame.f_back
    return False
