"""capture(): forward hooks that hand each activation to fastcap's compiled core, which copies or
reduces it into a preallocated ring of host slots, and the consumers that take it out again.

One activation's path: the layer's compiled hook (``fastcap._C.Hook``, see ``csrc/capture_core.cpp``)
counts the call in its thread's step, takes a free slot of the ring for that call and device
(``csrc/ring.cpp``), runs the op (``torch.ops.fastcap.copy_into``/``mean_into``/``topk_into``)
straight into the slot's memory - host memory on CPU, the slot's device staging buffer on CUDA -
and commits it (on CUDA this queues the device-to-host copy on a side stream,
``csrc/cuda/transfer.cu``). The forward then goes on. Whatever the hook cannot do in one go (a
first call, a full ring, token modes) goes through ``fastcap._steps.ForwardHooks``.

Waiting and copying out happen on consumer threads only: the capture's collector thread
(``collect=True``, the default; compiled, it never takes the GIL) moves each finished forward
pass out of the rings into host memory that ``result()`` and ``drain()`` hand out without
copying again; with ``collect=False`` the thread that calls ``drain()`` does it (extract's writer
reads the slots in place). The forward waits only when every slot of a ring still holds data
no consumer has taken: backpressure, counted in ``stats()["forward_wait_seconds"]``.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from fastcap import _ext
from fastcap._layers import Layer, LayerSpec, plan_layers
from fastcap._slots import Captured, TopK, assemble
from fastcap._steps import ForwardHooks
from fastcap._tokens import TOKEN_INDEX_KEY, BoundTokens, TokenIndex, Tokens

__all__ = ["capture", "Capture"]

MAX_DEPTH = 1 << 16

Select = Union[None, int, str, Callable[[Any], torch.Tensor]]

# How long a compiled wait lasts before Python gets the GIL back (Ctrl-C is then handled).
_WAIT_SLICE_SECONDS = 0.1


class Capture:
    """Captures chosen layers' activations while a model runs. Made by :func:`capture`."""

    def __init__(self, model: nn.Module, layers: Dict[str, Layer], depth: int, collect: bool = True,
                 tokens: Optional[BoundTokens] = None, stop_early: bool = False,
                 timeout: Optional[float] = None):
        self._layers = layers
        self._collect = collect
        self._core = _ext._C.Core(list(layers), depth, collect)
        self._hooks = ForwardHooks(model, list(layers.values()), self._core, tokens, stop_early, timeout, self.close)
        self._model = model
        self._active = False
        self._closed = False
        self._close_lock = threading.RLock()
        self._warned_not_run = False

    # ----------------------------------------------------------------- lifecycle
    @property
    def keys(self) -> List[str]:
        """The capture keys (module names or aliases), in order."""
        return list(self._layers)

    @property
    def steps_finished(self) -> int:
        """Forward passes finished so far (each call of the model is one)."""
        return self._core.steps_finished

    def __enter__(self) -> "Capture":
        if self._active:
            raise RuntimeError("this capture is already active")
        if self._closed:
            raise RuntimeError("this capture is closed (its results stay readable): make a new one with "
                               "fastcap.capture(...) to capture again")
        self._active = True
        try:
            self._hooks.install()
            if self._collect:
                self._core.start_collector()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.close()
        if exc_type is None:
            self._warn_layers_not_run()

    def close(self) -> None:
        """Removes every hook and frees every buffer; what was captured stays in result().

        Everything still in a ring is copied out first, by the collector thread, so that a
        KeyboardInterrupt arriving meanwhile cannot lose it: close() goes on waiting and raises
        the interrupt once the data is safe.
        """
        self._hooks.remove()
        self._active = False
        interrupted: Optional[BaseException] = None
        with self._close_lock:  # close() may come from a hook, the with block and another thread
            if self._closed:
                return
            self._core.stop()  # every open step finished; the collector takes what is left
            while True:
                try:
                    if self._core.wait_collected(_WAIT_SLICE_SECONDS):
                        break
                except BaseException as exc:  # Ctrl-C while copying out: finish, then raise it
                    interrupted = interrupted or exc
            self._core.close_rings()
            self._closed = True
        if interrupted is not None:
            raise interrupted

    def abort(self, exc: BaseException) -> None:
        """Called by a consumer thread that failed: a forward waiting for a slot raises."""
        self._hooks.consumer_error = exc

    # ----------------------------------------------------------------- steps
    def end_step(self) -> None:
        """Finishes the step the calling thread has open from hooks that ran outside a call
        of the model itself (a forward that calls its submodules directly)."""
        self._core.end_implicit_step()

    def _learn_stop_point(self, run) -> bool:
        """``stop_early``: learn where to stop from ``run()``, a forward of one sample that this
        capture counts and does not store (extract runs it before the first batch)."""
        return self._hooks.learn_stop_point(run)

    def end_stopped_step(self) -> None:
        """After a forward ended by early exit's ``StopForward``: the model's own post-hook did
        not run (torch runs always_call hooks for an Exception only), so finish its step here."""
        self._core.end_stopped_step()

    def layers_not_run(self) -> List[str]:
        """The requested keys whose module has not run in any forward so far."""
        return self._hooks.layers_not_run()

    def not_run_message(self, missing: List[str]) -> str:
        return self._hooks.not_run_message(missing)

    def _warn_layers_not_run(self) -> None:
        """Once per capture, after at least one forward: name the requested layers that never ran
        (their keys are missing from result() and drain())."""
        missing = self.layers_not_run()
        if missing and self.steps_finished and not self._warned_not_run:
            self._warned_not_run = True
            warnings.warn(f"fastcap: {self.not_run_message(missing)}; result() has no key for them",
                          RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------- consumers
    def _consumer(self) -> tuple:
        """(thread name, whether it is inside a forward) of the calling consumer, now known."""
        self._hooks.consumers.add(threading.get_ident())
        return threading.current_thread().name, len(self._core.open_step_calls()) > 0

    def drain(self, block: bool = False) -> Iterator[Dict[str, Captured]]:
        """Yields each finished forward pass not yet drained, oldest first, exactly once.

        Each step is a dict ``{key: Tensor or TopK}`` of CPU tensors (with ``tokens=``, the
        step's ``TokenIndex`` under ``"token_index"``); fastcap keeps no copy, so a loop that
        drains holds host memory flat. Safe to call from another thread than the one running
        the model.

        Args:
            block: False (default): stop as soon as no finished step is waiting with its bytes
                in host memory (a step still crossing from a GPU comes in a later drain), for a
                loop that drains after each forward. True: wait for the next step instead, and
                stop only once the capture has closed and every step was yielded - a consumer
                thread's loop, which then ends by itself when the ``with`` block exits.

        Example::

            with fastcap.capture(model, "layer*.1", reduce="topk", k=8) as cap:
                for x in batches:
                    model(x)
                    for step in cap.drain():
                        use(step["layer4.1"].values)

            # a consumer thread (collect=False: the forward waits when it falls behind)
            with fastcap.capture(model, "layer4", reduce="mean", collect=False) as cap:
                consumer = threading.Thread(target=lambda: [use(s) for s in cap.drain(block=True)])
                consumer.start()
                for x in batches:
                    model(x)
            consumer.join()
        """
        thread, in_forward = self._consumer()
        while True:
            step = self._core.next_step(block, _WAIT_SLICE_SECONDS, thread, in_forward)
            if step == 2:  # the slice passed: wait on (Ctrl-C is handled between slices)
                continue
            if step == 1:
                return
            yield {key: _checked(key, mode, tensors, error) for key, mode, tensors, _, _, error in step}

    def drain_slots(self) -> Iterator[Dict[str, Any]]:
        """Like :meth:`drain`, for a consumer that reads the bytes where they are: yields each
        finished step as ``{key: fastcap._C.SlotItem}`` still in its ring slots. The consumer
        reads ``item.host_views()`` and must call ``item.release()`` for every item."""
        self._consumer()
        while True:
            items = self._core.next_slots()
            if items is None:
                return
            yield items

    def wait_for_steps(self, timeout: float) -> bool:
        """Blocks until a finished step waits to be drained, for at most ``timeout`` seconds;
        whether one does. For a consumer thread: drain when this says so, instead of polling.

        Example::

            while running:
                if cap.wait_for_steps(0.1):
                    for step in cap.drain():
                        write(step)
        """
        return self._core.wait_finished(timeout)

    def _release_waits(self) -> None:
        """Wakes every :meth:`wait_for_steps` now, and makes later ones return at once: for a
        consumer thread being stopped (extract's writer), so it ends without sleeping out a wait."""
        self._core.release_waits()

    def _results(self) -> list:
        thread, in_forward = self._consumer()
        return self._core.result(thread, in_forward)

    def result(self) -> Dict[str, Captured]:
        """Every captured batch not yet drained, concatenated along dim 0 on CPU, per key.

        Works during and after the ``with`` block; keys are in first-capture order. Each call
        returns tensors of its own, made with one copy per key from the host memory the steps
        were collected into (``stats()["result_copies"]``), never one per step.
        """
        self._warn_layers_not_run()
        out: Dict[str, Captured] = {}
        for key, mode, steps, merged, error in self._results():
            if key == TOKEN_INDEX_KEY:
                continue
            if error:
                raise RuntimeError(f"fastcap: copying layer {key!r} out of its ring slot failed: {error}")
            if not merged:
                _raise_shapes_differ(key, steps)
            out[key] = assemble(mode, merged)
        return out

    def token_index(self) -> TokenIndex:
        """Where each row of the ``"tokens"`` (and token ``"topk"``) results came from, for the
        steps not yet drained, aligned with ``result()``'s rows: ``TokenIndex(sample, position,
        token_id)``, int64 ``[n_kept]`` each (``sample`` counts samples from 0 over the whole
        capture; ``token_id`` is -1 without ids). ``drain()`` hands each step's index out under
        the key ``"token_index"``.
        """
        for key, mode, steps, merged, error in self._results():
            if key == TOKEN_INDEX_KEY:
                if error:
                    raise RuntimeError(f"fastcap: copying the token index out of its ring slot failed: {error}")
                return TokenIndex(*merged)
        empty = torch.zeros(0, dtype=torch.int64)
        return TokenIndex(empty, empty.clone(), empty.clone())

    def stats(self) -> Dict[str, Any]:
        """Counters of the capture so far.

        ``steps``, ``bytes_captured``, ``pinned_bytes``, ``host_bytes``, ``device_bytes`` (held
        by the rings now), ``stall_seconds`` = ``forward_wait_seconds`` (time the forward
        waited for a free slot), ``forwards_waiting`` (forwards waiting for one right now),
        ``copy_out_seconds`` (time consumers spent moving bytes out of the rings),
        ``materializations`` (``{thread name: count}``: who did that work, per captured item),
        ``materializations_on_forward`` (how many ran inside a forward: 0 when consumers keep
        up), ``arena_copies`` (item parts copied out of the rings: one each), ``result_copies``
        (tensors ``result()`` made: one per key and part, whatever the steps),
        ``d2h_gbps`` (bytes copied from GPUs over the union of the busy intervals of those
        copies; 0.0 when nothing crossed), ``slots``, ``resizes``, and the process-wide host
        memory pool's ``pool_pinned_bytes``, ``pool_plain_bytes``, ``pool_cached_bytes``.
        """
        totals, live = self._core.ring_totals()
        timeline = self._core.timeline
        busy = timeline.busy_seconds()
        pool = _ext._C.pool_stats()
        counters = self._core.counters()
        hooks = self._hooks
        return {
            "steps": self.steps_finished,
            "bytes_captured": totals["bytes_captured"],
            "pinned_bytes": live["pinned_bytes"],
            "host_bytes": live["host_bytes"],
            "device_bytes": live["device_bytes"],
            "slots": live["slots"],
            "resizes": totals["resizes"],
            "stall_seconds": hooks.forward_wait_seconds,
            "forward_wait_seconds": hooks.forward_wait_seconds,
            "forwards_waiting": hooks.waiting,
            **counters,
            "d2h_gbps": timeline.bytes() / busy / 1e9 if busy > 0 else 0.0,
            "pool_pinned_bytes": pool["pinned_allocated_bytes"],
            "pool_plain_bytes": pool["plain_allocated_bytes"],
            "pool_cached_bytes": pool["pinned_cached_bytes"] + pool["plain_cached_bytes"],
        }


def _checked(key: str, mode: str, tensors: List[torch.Tensor], error: str) -> Captured:
    if error:
        raise RuntimeError(f"fastcap: copying layer {key!r} out of its ring slot failed: {error}")
    return assemble(mode, tensors)


def _raise_shapes_differ(key: str, steps: List[List[torch.Tensor]]) -> None:
    shapes = [tuple(s[0].shape) for s in steps]
    odd = next((s for s in shapes if s[1:] != shapes[0][1:]), shapes[-1])
    raise ValueError(
        f"layer {key!r}: result() concatenates steps along dim 0, but their shapes differ beyond "
        f"it ({shapes[0]} and {odd}, e.g. sequences of different lengths); take the steps one by "
        "one with drain(), or make the shapes equal (pad, or reduce='mean')")


def _check_timeout(timeout: Any) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")


def _check_depth(depth: Any) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be an int in [1, {MAX_DEPTH}] (ring slots per layer), got {depth!r}")


def build_capture(model: nn.Module, layers: LayerSpec, reduce: Union[None, str, Mapping[str, str]] = None, *,
                  k: Union[None, int, Mapping[str, int]] = None,
                  channel_dim: Union[int, Mapping[str, int]] = 1,
                  dtype: Optional[torch.dtype] = None,
                  select: Union[Select, Mapping[str, Select]] = None,
                  depth: int = 2,
                  collect: bool = True,
                  tokens: Optional[Tokens] = None,
                  keep_layout: bool = True,
                  stop_early: bool = False,
                  timeout: Optional[float] = None) -> Capture:
    """:func:`capture` with the options only fastcap's own callers use: ``keep_layout=False``
    lays full captures out contiguously (extract writes C-order rows straight from the slot);
    ``stop_early=True`` ends each forward with ``fastcap._steps.StopForward`` once every
    captured layer has run as often as in the first complete forward (extract, which needs no
    outputs, catches it)."""
    plans = plan_layers(model, layers, reduce, k=k, channel_dim=channel_dim, dtype=dtype, select=select,
                        tokens=tokens, keep_layout=keep_layout)
    _check_depth(depth)
    _check_timeout(timeout)
    bound = BoundTokens(tokens, model) if tokens is not None else None
    return Capture(model, plans, depth, collect, bound, stop_early, timeout)


def capture(model: nn.Module, layers: LayerSpec, reduce: Union[None, str, Mapping[str, str]] = None, *,
            k: Union[None, int, Mapping[str, int]] = None,
            channel_dim: Union[int, Mapping[str, int]] = 1,
            dtype: Optional[torch.dtype] = None,
            select: Union[Select, Mapping[str, Select]] = None,
            depth: int = 2,
            collect: bool = True,
            tokens: Optional[Tokens] = None,
            timeout: Optional[float] = None) -> Capture:
    """Captures the activations of ``layers`` while ``model`` runs, into host memory.

    Args:
        model: the module whose forward passes are captured; each call is one step (also
            from several threads: each thread's calls are steps of their own).
        layers: a module name, a list of names, or ``{alias: name}``. Names are those of
            ``model.named_modules()``; globs use the dot as separator (``"layer*.1"``,
            ``"**.mlp"``).
        reduce: ``"full"`` (exact copy; the default), ``"mean"`` (float32 [N, C] mean over
            every dim but the batch and the channel), ``"topk"`` (``torch.topk`` along the
            channel dim), or ``{key: mode}`` (unlisted keys: the default). Per-layer dicts are
            keyed by result key: the alias when there is one. With ``tokens=`` the default is
            ``"tokens"``.
        k: how many channels ``"topk"`` keeps (required for it); int or ``{key: k}``.
        channel_dim: the channel dim, int or ``{key: int}``; 1 for NCHW, -1 for
            sequence models.
        dtype: cast ``"full"`` captures to this dtype (on the device, before the copy).
        select: which tensor of a tuple/list/dict output to capture: an int, a key or a
            callable; default the first tensor leaf.
        depth: ring slots per layer and device. A forward waits (``forward_wait_seconds``)
            only while all of them hold steps no consumer has taken yet.
        collect: True (default): a collector thread of the capture's own moves finished
            steps out of the rings as they finish, for ``result()`` and ``drain()``. False:
            finished steps wait in their slots until a thread of yours drains them, and the
            forward waits when they are full: host memory bounded by ``depth`` steps.
        tokens: a :class:`fastcap.Tokens` makes the capture mask-aware for ``[N, T, C]``
            outputs (language models): ``reduce`` then also takes ``"tokens"`` (the kept tokens'
            rows ``[n_kept, C]``, located by ``token_index()``), ``"mean"`` / ``"max"`` /
            ``"first"`` / ``"last"`` (pooled over the kept tokens, ``[N, C]``) and ``"topk"``
            (per kept token, ``[n_kept, k]``); ``"full"`` ignores the mask.
        timeout: seconds a forward may wait for a free ring slot before it raises
            ``TimeoutError``; None (default): it waits as long as it takes, with a
            ``RuntimeWarning`` naming the layer once it has waited 10 s.

    Returns:
        A :class:`Capture`: use it as a context manager; read ``result()``, ``drain()``
        and ``stats()``.

    Example::

        import torch, torchvision, fastcap
        model = torchvision.models.resnet18().eval()
        with torch.no_grad(), fastcap.capture(model, ["layer3", "layer4"], reduce="mean") as cap:
            for _ in range(4):
                model(torch.randn(8, 3, 64, 64))
        feats = cap.result()          # {"layer3": Tensor[32, 256], "layer4": Tensor[32, 512]}
    """
    return build_capture(model, layers, reduce, k=k, channel_dim=channel_dim, dtype=dtype, select=select,
                         depth=depth, collect=collect, tokens=tokens, timeout=timeout)
