"""The forward side of a capture: the hooks, the steps they open and finish (one per top-level
call of the model, per thread), and each activation's way into a ring slot: select the tensor,
plan its slot layout, take a slot (waiting only on a full ring), run the op, commit."""
from __future__ import annotations

import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastcap import _ext
from fastcap._early_exit import EarlyExit
from fastcap._layers import Layer
from fastcap._outputs import check_capturable, select_tensor
from fastcap._slots import (INDEX_MODE, Item, Part, plan_index_parts, plan_parts, plan_token_parts, slot_bytes,
                            write_index_slot, write_slot, write_token_slot)
from fastcap._tokens import ROW_MODES, TOKEN_INDEX_KEY, BoundTokens, check_token_output, keep_mask

# With collect=False, how long a forward waits for a full ring before it concludes that no
# live thread will ever drain (a consumer thread gets this long to make its first drain()).
_NO_CONSUMER_SECONDS = 2.0
# A forward that has waited this long for a slot says so (once per capture), whatever the cause.
_WARN_AFTER_SECONDS = 10.0
_WAIT_SLICE_SECONDS = 0.05


@dataclass
class Step:
    """One forward pass of one thread: the activations captured during it, in call order."""

    items: Dict[str, Item] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)
    implicit: bool = False  # opened by a hook outside a call of the model itself
    mask: Optional[torch.Tensor] = None  # tokens=: the call's attention mask and ids
    ids: Optional[torch.Tensor] = None
    keep: Optional[Tuple[tuple, torch.Tensor]] = None  # ((N, T, device), kept tokens [N, T])


class ConsumerFailed(RuntimeError):
    """Raised in a forward waiting for a slot when the thread that takes the steps out (the
    collector, extract's writer) failed: ``error`` is that thread's exception."""

    def __init__(self, error: BaseException):
        super().__init__(f"fastcap: the consumer of this capture failed: {type(error).__name__}: {error}")
        self.error = error


class Counters:
    """Where the time went, for stats(); updated from several threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.forward_wait_seconds = 0.0
        self.copy_out_seconds = 0.0
        self.by_thread: Dict[str, int] = {}
        self.on_forward = 0
        self.waiting = 0  # forwards waiting for a free slot right now

    def copied(self, seconds: float, in_forward: bool) -> None:
        name = threading.current_thread().name
        with self.lock:
            self.copy_out_seconds += seconds
            self.by_thread[name] = self.by_thread.get(name, 0) + 1
            self.on_forward += in_forward


class StepHooks:
    """The hooks of a :class:`fastcap.Capture` and the step queues they fill (the consumers'
    side is in fastcap/capture.py)."""

    def __init__(self, model: nn.Module, layers: Dict[str, Layer], depth: int, collect: bool = True,
                 tokens: Optional[BoundTokens] = None, stop_early: bool = False,
                 timeout: Optional[float] = None):
        self._model = model
        self._timeout = timeout  # seconds a forward may wait for a slot; None: for ever (warned)
        self._warned_wait = False
        self._early_exit = EarlyExit(model, self._register_pre_hook, self._open_step_calls) if stop_early else None
        self._tokens = tokens
        self._samples = 0  # samples numbered so far by token indices
        self._ran: set = set()  # keys of the layers that ran at least once
        self._warned_not_run = False
        self._layers = layers
        self._depth = depth
        self._collect = collect
        self._handles: List[Any] = []
        self._rings: Dict[Tuple[str, torch.device], Any] = {}
        self._plans: Dict[tuple, List[Part]] = {}
        self._timeline = _ext._C.BusyTimeline()
        self._cond = threading.Condition()  # guards the step queues below
        self._open: Dict[int, Step] = {}  # thread ident -> the step that thread has open
        self._steps: Deque[Step] = deque()  # finished, not drained
        self._uncollected: Deque[Step] = deque()  # finished, for the collector
        self._claimed: List[Step] = []  # taken by drain(), being copied out
        self._local = threading.local()  # per thread: how deep in the model's own calls
        self._collector: Optional[threading.Thread] = None
        self._collected = threading.Event()  # set when the collector thread has finished
        self._stopping = False
        self._consumers: set = set()  # idents of the threads that drained
        self._consumer_error: Optional[BaseException] = None
        self._steps_finished = 0
        self._counters = Counters()
        self._closed_totals = {"bytes_captured": 0, "resizes": 0}
        self._active = False

    def _add_hooks(self) -> None:
        """The model's own pre- and post-hooks delimit steps; one hook per captured layer.

        Compiled callers (torch.compile) run the hooks eagerly, at a graph break: they hold
        locks and Python state no graph can trace."""
        modules = dict(self._model.named_modules())
        self._handles.append(self._model.register_forward_pre_hook(eager(self._on_model_start), with_kwargs=True))
        self._handles.append(self._model.register_forward_hook(eager(self._on_model_end), always_call=True))
        for layer in self._layers.values():
            self._handles.append(modules[layer.module_name].register_forward_hook(eager(self._make_hook(layer))))
        if self._early_exit is not None:
            self._early_exit.install()

    def _register_pre_hook(self, module: nn.Module, hook: Callable):
        """A pre-hook of early exit's, ahead of the module's others; an error in it (not
        StopForward) closes the capture like one in a capture hook."""
        def guarded(module, args):
            try:
                return hook(module, args)
            except Exception:
                self.close()
                raise
        handle = module.register_forward_pre_hook(eager(guarded), prepend=True)
        self._handles.append(handle)
        return handle

    def _open_step_calls(self) -> Optional[Dict[str, int]]:
        step = self._open.get(threading.get_ident())
        return None if step is None or step.implicit else step.calls

    # ----------------------------------------------------------------- steps
    def _on_model_start(self, module, args, kwargs) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        if depth == 0:  # a top-level call: a new step (nested, recursive calls belong to it)
            step = Step()
            if self._early_exit is not None:
                self._early_exit.step_started()
            if self._tokens is not None:
                step.mask, step.ids = self._tokens.find(args, kwargs)
            tid = threading.get_ident()
            with self._cond:
                if tid in self._open:
                    self._finish_locked(tid)  # hooks that ran outside a model call before it
                self._open[tid] = step

    def _on_model_end(self, module, args, output) -> None:
        local = self._local
        local.depth = max(getattr(local, "depth", 1) - 1, 0)
        if local.depth == 0:
            with self._cond:
                self._finish_locked(threading.get_ident())

    def _finish_locked(self, tid: int) -> None:
        step = self._open.pop(tid, None)
        if step is None:
            return
        if self._early_exit is not None and self._early_exit.learning and not step.implicit:
            self._early_exit.step_finished(step.calls)
        self._steps.append(step)
        self._steps_finished += 1
        if self._collector is not None:
            self._uncollected.append(step)
        self._cond.notify_all()

    def _finish_implicit_locked(self) -> None:
        for tid, step in list(self._open.items()):
            if step.implicit:
                self._finish_locked(tid)

    def end_step(self) -> None:
        """Finishes the step the calling thread has open from hooks that ran outside a call
        of the model itself (a forward that calls its submodules directly)."""
        with self._cond:
            step = self._open.get(threading.get_ident())
            if step is not None and step.implicit:
                self._finish_locked(threading.get_ident())

    def end_stopped_step(self) -> None:
        """After a forward ended by :class:`StopForward`: the model's own post-hook did not run
        (torch runs always_call hooks for an Exception only), so finish its step here."""
        self._local.depth = 0
        with self._cond:
            self._finish_locked(threading.get_ident())

    def _step_for_hook(self, layer: Layer) -> Step:
        tid = threading.get_ident()
        with self._cond:
            step = self._open.get(tid)
        if step is None:
            if calling_forward_directly(self._model):
                raise RuntimeError(
                    f"layer {layer.key!r} ran inside a direct call of {type(self._model).__name__}"
                    ".forward(...): fastcap delimits steps by calls of the model itself, so call "
                    "model(x) instead of model.forward(x)")
            with self._cond:
                step = self._open.setdefault(tid, Step(implicit=True))
        return step

    def _make_hook(self, layer: Layer):
        def hook(module, args, output):
            return self._on_output(layer, output)
        hook.__qualname__ = f"fastcap capture hook of {layer.key!r}"
        return hook

    def _on_output(self, layer: Layer, output: Any) -> None:
        try:
            step = self._step_for_hook(layer)
            n = step.calls.get(layer.key, 0)
            step.calls[layer.key] = n + 1
            if n == 0:
                self._ran.add(layer.key)
            key = layer.key if n == 0 else f"{layer.key}#{n}"
            x = select_tensor(layer, output)
            check_capturable(layer, x)
            if layer.token_mode:
                items = self._capture_tokens(step, key, layer, x.detach())
            else:
                # Activations keep their shape from step to step: plan (and validate) once.
                signature = (layer.key, x.shape, x.stride(), x.dtype, x.device)
                parts = self._plans.get(signature)
                if parts is None:
                    parts = self._plans[signature] = plan_parts(layer, x)
                ring = self._ring_for(key, x.device)
                slot = self._acquire(ring, slot_bytes(parts), key)
                write_slot(ring, slot, layer, x.detach(), parts)
                items = {key: Item(ring, slot, parts, layer.mode)}
            tid = threading.get_ident()
            with self._cond:
                if self._open.get(tid) is not step:
                    # drain() closed this (implicit) step meanwhile: start the next one.
                    step = self._open.setdefault(tid, Step(implicit=True))
                step.items.update(items)
        except BaseException:
            # Nothing stays behind after an error: hooks off, buffers freed (what was
            # captured before stays in result()).
            self.close()
            raise
        if self._early_exit is not None and self._early_exit.learning and not step.implicit:
            self._early_exit.layer_ran()
        return None

    def _capture_tokens(self, step: Step, key: str, layer: Layer, x: torch.Tensor) -> Dict[str, Item]:
        """A token mode: the kept tokens' rows (or their pooling), plus the step's token index
        the first time a row mode runs in it."""
        check_token_output(layer.key, layer.mode, x)
        n, t = x.shape[0], x.shape[1]
        if step.keep is None or step.keep[0] != (n, t, x.device):
            step.keep = ((n, t, x.device), keep_mask(self._tokens.tokens, layer.key, x, step.mask, step.ids))
        keep = step.keep[1]
        items: Dict[str, Item] = {}
        if layer.mode in ROW_MODES and TOKEN_INDEX_KEY not in step.items:
            parts = plan_index_parts(n, t)
            ring = self._ring_for(TOKEN_INDEX_KEY, x.device)
            slot = self._acquire(ring, slot_bytes(parts), key)
            ids = step.ids.to(x.device, non_blocking=True) if step.ids is not None else None
            with self._cond:
                offset, self._samples = self._samples, self._samples + n
            write_index_slot(ring, slot, keep, ids, offset, parts)
            items[TOKEN_INDEX_KEY] = Item(ring, slot, parts, INDEX_MODE, counted=True,
                                          info={"samples": n, "sample_offset": offset})
        signature = (layer.key, "tokens", x.shape, x.dtype, x.device)
        parts = self._plans.get(signature)
        if parts is None:
            parts = self._plans[signature] = plan_token_parts(layer, x)
        ring = self._ring_for(key, x.device)
        slot = self._acquire(ring, slot_bytes(parts), key)
        write_token_slot(ring, slot, layer, x, keep, parts)
        items[key] = Item(ring, slot, parts, layer.mode, counted=layer.mode in ROW_MODES)
        return items

    def layers_not_run(self) -> List[str]:
        """The requested keys whose module has not run in any forward so far."""
        return [key for key in self._layers if key not in self._ran]

    def not_run_message(self, missing: List[str]) -> str:
        names = ", ".join(f"{key!r}" + (f" (module {self._layers[key].module_name!r})"
                                          if self._layers[key].module_name != key else "") for key in missing)
        return (f"requested layer(s) {names} did not run in {self._steps_finished} forward pass(es) of "
                f"{type(self._model).__name__}. A forward can skip a module: attention dropout under "
                "scaled_dot_product_attention (e.g. Hugging Face's attn_dropout with the 'sdpa' "
                "implementation), a branch not taken, an MoE expert that got no tokens, or a module "
                "called through .forward() or functionally, which bypasses its hooks")

    def _warn_layers_not_run(self) -> None:
        """Once per capture, after at least one forward: name the requested layers that never ran
        (their keys are missing from result() and drain())."""
        missing = self.layers_not_run()
        if missing and self._steps_finished and not self._warned_not_run:
            self._warned_not_run = True
            warnings.warn(f"fastcap: {self.not_run_message(missing)}; result() has no key for them",
                          RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------- rings
    def _ring_for(self, key: str, device: torch.device):
        ring = self._rings.get((key, device))
        if ring is None:
            with self._cond:
                ring = self._rings.get((key, device))
                if ring is None:
                    # Pinned host memory only where a device copies into it.
                    ring = _ext._C.Ring(self._depth, device.type == "cuda", self._timeline)
                    self._rings[(key, device)] = ring
        return ring

    def _acquire(self, ring, nbytes: int, key: str) -> int:
        slot = ring.acquire(nbytes, 0.0)
        if slot >= 0:
            return slot
        # Every slot holds a finished step no consumer has taken yet: wait for one, never
        # silently for ever.
        start = time.perf_counter()
        with self._counters.lock:
            self._counters.waiting += 1
        try:
            while slot < 0:
                waited = time.perf_counter() - start
                if self._consumer_error is not None:
                    raise ConsumerFailed(self._consumer_error) from self._consumer_error
                if not self._collect and waited > _NO_CONSUMER_SECONDS and not self._live_consumers():
                    raise RuntimeError(
                        f"fastcap: layer {key!r} waits for a free slot, but every one of its depth="
                        f"{self._depth} ring slots holds a step no thread has drained, and with "
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
            with self._counters.lock:
                self._counters.forward_wait_seconds += time.perf_counter() - start
                self._counters.waiting -= 1

    def _live_consumers(self) -> set:
        """Threads other than this one that drained this capture and still run."""
        alive = {thread.ident for thread in threading.enumerate()}
        return (self._consumers & alive) - {threading.get_ident()}

    def _stall_reason(self) -> str:
        if self._collect:
            return (f"all depth={self._depth} slots hold steps the collector thread has not copied out "
                    "yet (a slow or blocked copy-out)")
        return (f"all depth={self._depth} slots hold steps no consumer has taken (collect=False): the "
                "thread that drains this capture is slow or stuck")


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
