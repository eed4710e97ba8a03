"""capture(): forward hooks that hand each activation to fastcap's compiled ops, which copy or
reduce it into a preallocated ring of host slots, and the consumers that take it out again.

One activation's path (fastcap/_steps.py): the layer's forward hook (`_on_output`) picks the
tensor (`fastcap._outputs.select_tensor`), works out the bytes its result needs
(`fastcap._slots.plan_parts`), takes a slot of the ring for that key and device (`_acquire`),
runs the op (`torch.ops.fastcap.copy_into`/`mean_into`/`topk_into`) straight into the slot's
memory - host memory on CPU, the slot's device staging buffer on CUDA - and commits the slot
(on CUDA this queues the device-to-host copy on a side stream). The forward then goes on.

Waiting and copying out happen on consumer threads only: the capture's collector thread
(`collect=True`, the default) moves each finished forward pass out of the rings into host
tensors for `result()` and `drain()`; with `collect=False` a thread of the user's calls
`drain()` (extract's writer reads the slots in place). The forward thread waits only when
every slot of a ring still holds data no consumer has taken: backpressure, counted in
`stats()["forward_wait_seconds"]`.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from fastcap import _ext
from fastcap._layers import LayerSpec, plan_layers
from fastcap._slots import Captured, Item, TopK
from fastcap._steps import Step, StepHooks
from fastcap._tokens import TOKEN_INDEX_KEY, BoundTokens, TokenIndex, Tokens

__all__ = ["capture", "Capture"]

MAX_DEPTH = 1 << 16

Select = Union[None, int, str, Callable[[Any], torch.Tensor]]


class Capture(StepHooks):
    """Captures chosen layers' activations while a model runs. Made by :func:`capture`."""

    # ----------------------------------------------------------------- lifecycle
    @property
    def keys(self) -> List[str]:
        """The capture keys (module names or aliases), in order."""
        return list(self._layers)

    @property
    def steps_finished(self) -> int:
        """Forward passes finished so far (each call of the model is one)."""
        return self._steps_finished

    def __enter__(self) -> "Capture":
        if self._active:
            raise RuntimeError("this capture is already active")
        self._active = True
        self._stopping = False
        self._consumer_error = None
        self._local = threading.local()
        try:
            self._add_hooks()
            if self._collect:
                self._start_collector()
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
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        interrupted: Optional[BaseException] = None
        try:
            with self._cond:
                for tid in list(self._open):
                    self._finish_locked(tid)
                pending = [s for s in list(self._steps) + self._claimed
                           if any(item.pending for item in s.items.values())]
                known = set(map(id, self._uncollected))
                self._uncollected.extend(s for s in pending if id(s) not in known)
                self._stopping = True
                self._cond.notify_all()
            if self._uncollected and (self._collector is None or self._collected.is_set()):
                self._start_collector()
            # An Event, not Thread.join(): a join interrupted by Ctrl-C may take the thread for
            # finished while it still copies (bpo-45274).
            while self._collector is not None and not self._collected.is_set():
                try:
                    self._collected.wait()
                    self._collector.join()  # it has nothing left to do: leave no thread behind
                except BaseException as exc:  # Ctrl-C while copying out: finish, then raise it
                    interrupted = interrupted or exc
        finally:
            self._collector = None
            for ring in self._rings.values():
                s = ring.stats()
                for name in self._closed_totals:
                    self._closed_totals[name] += s[name]
                ring.close()
            self._rings.clear()
        if interrupted is not None:
            raise interrupted

    def abort(self, exc: BaseException) -> None:
        """Called by a consumer thread that failed: a forward waiting for a slot raises."""
        self._consumer_error = exc

    # ----------------------------------------------------------------- consumers
    def _start_collector(self) -> None:
        self._collected = threading.Event()
        self._collector = threading.Thread(target=self._collect_loop, name="fastcap-collector", daemon=True)
        self._collector.start()

    def _collect_loop(self) -> None:
        """The collector thread: copies finished steps out of the rings, oldest first."""
        try:
            while True:
                with self._cond:
                    while not self._uncollected and not self._stopping:
                        self._cond.wait()
                    if not self._uncollected:
                        return
                    step = self._uncollected.popleft()
                for item in step.items.values():
                    try:
                        self._materialize(item)
                    except BaseException as exc:  # a forward waiting for a slot raises it
                        self._consumer_error = self._consumer_error or exc
        finally:
            self._collected.set()

    def _materialize(self, item: Item) -> Captured:
        in_forward = getattr(self._local, "depth", 0) > 0
        return item.materialize(lambda seconds: self._counters.copied(seconds, in_forward))

    def drain(self, block: bool = False) -> Iterator[Dict[str, Captured]]:
        """Yields each finished forward pass not yet drained, oldest first, exactly once.

        Each step is a dict ``{key: Tensor or TopK}`` of CPU tensors; fastcap keeps no
        copy, so a loop that drains holds host memory flat. Safe to call from another
        thread than the one running the model.

        Args:
            block: False (default): stop as soon as no finished step is waiting, for a loop
                that drains after each forward. True: wait for the next step instead, and stop
                only once the capture has closed and every step was yielded - a consumer
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
        for step in self._drain_steps(block):
            try:
                out = {key: self._materialize(item) for key, item in step.items.items()}
            finally:
                with self._cond:
                    self._claimed.remove(step)
            yield out

    def drain_slots(self) -> Iterator[Dict[str, Item]]:
        """Like :meth:`drain`, for a consumer that reads the bytes where they are: yields each
        finished step as ``{key: Item}`` still in its ring slots. The consumer reads
        ``item.host_views()`` and must call ``item.release()`` for every item."""
        for step in self._drain_steps():
            with self._cond:
                self._claimed.remove(step)
            yield step.items

    def wait_for_steps(self, timeout: float) -> bool:
        """Blocks until a finished step waits to be drained, for at most ``timeout`` seconds;
        whether one does. For a consumer thread: drain when this says so, instead of polling.

        Example::

            while running:
                if cap.wait_for_steps(0.1):
                    for step in cap.drain():
                        write(step)
        """
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._steps) or self._stopping, timeout) and bool(self._steps)

    def _drain_steps(self, block: bool = False) -> Iterator[Step]:
        self._consumers.add(threading.get_ident())
        while True:
            with self._cond:
                self._finish_implicit_locked()
                if block:
                    # Until a step finishes or the capture closes (close() finishes every open
                    # step first, so none is left behind).
                    self._cond.wait_for(lambda: bool(self._steps) or self._stopping)
                if not self._steps:
                    return
                step = self._steps.popleft()
                self._claimed.append(step)
            yield step

    def _undrained_steps(self) -> List[Step]:
        """The finished steps not drained yet; an implicit step is finished first (and, once the
        capture is closed, any step still open)."""
        with self._cond:
            if self._active:
                self._finish_implicit_locked()
            else:
                for tid in list(self._open):
                    self._finish_locked(tid)
            return list(self._steps)

    def result(self) -> Dict[str, Captured]:
        """Every captured batch not yet drained, concatenated along dim 0 on CPU, per key.

        Works during and after the ``with`` block; keys are in first-capture order. Each
        call returns tensors of its own.
        """
        steps = self._undrained_steps()
        self._warn_layers_not_run()
        per_key: Dict[str, List[Captured]] = {}
        for step in steps:
            for key, item in step.items.items():
                if key != TOKEN_INDEX_KEY:
                    per_key.setdefault(key, []).append(self._materialize(item))
        return {key: _concat(key, values) for key, values in per_key.items()}

    def token_index(self) -> TokenIndex:
        """Where each row of the ``"tokens"`` (and token ``"topk"``) results came from, for the
        steps not yet drained, aligned with ``result()``'s rows: ``TokenIndex(sample, position,
        token_id)``, int64 ``[n_kept]`` each (``sample`` counts samples from 0 over the whole
        capture; ``token_id`` is -1 without ids). ``drain()`` hands each step's index out under
        the key ``"token_index"``.
        """
        steps = self._undrained_steps()
        parts = [self._materialize(s.items[TOKEN_INDEX_KEY]) for s in steps if TOKEN_INDEX_KEY in s.items]
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64)
            return TokenIndex(empty, empty.clone(), empty.clone())
        return TokenIndex(*(torch.cat([getattr(p, f) for p in parts]) for f in TokenIndex._fields))

    def stats(self) -> Dict[str, Any]:
        """Counters of the capture so far.

        ``steps``, ``bytes_captured``, ``pinned_bytes``, ``host_bytes``, ``device_bytes`` (held
        by the rings now), ``stall_seconds`` = ``forward_wait_seconds`` (time the forward
        waited for a free slot), ``forwards_waiting`` (forwards waiting for one right now),
        ``copy_out_seconds`` (time consumers spent moving bytes out
        of the rings), ``materializations`` (``{thread name: count}``: who did that work),
        ``materializations_on_forward`` (how many ran inside a forward: 0 when consumers keep
        up), ``d2h_gbps`` (bytes copied from GPUs over the union of the busy intervals of
        those copies; 0.0 when nothing crossed), ``slots``, ``resizes``, and the process-wide
        host memory pool's ``pool_pinned_bytes``, ``pool_plain_bytes``, ``pool_cached_bytes``.
        """
        totals = dict(self._closed_totals)
        live = {"pinned_bytes": 0, "host_bytes": 0, "device_bytes": 0, "slots": 0}
        for ring in list(self._rings.values()):
            s = ring.stats()
            for name in totals:
                totals[name] += s[name]
            for name in live:
                live[name] += s[name]
        busy = self._timeline.busy_seconds()
        pool = _ext._C.pool_stats()
        c = self._counters
        with c.lock:
            counters = {"forward_wait_seconds": c.forward_wait_seconds, "forwards_waiting": c.waiting,
                        "copy_out_seconds": c.copy_out_seconds,
                        "materializations": dict(c.by_thread), "materializations_on_forward": c.on_forward}
        return {
            "steps": self._steps_finished,
            "bytes_captured": totals["bytes_captured"],
            **live,
            "resizes": totals["resizes"],
            "stall_seconds": counters["forward_wait_seconds"],
            **counters,
            "d2h_gbps": self._timeline.bytes() / busy / 1e9 if busy > 0 else 0.0,
            "pool_pinned_bytes": pool["pinned_allocated_bytes"],
            "pool_plain_bytes": pool["plain_allocated_bytes"],
            "pool_cached_bytes": pool["pinned_cached_bytes"] + pool["plain_cached_bytes"],
        }


def _concat(key: str, values: List[Captured]) -> Captured:
    """One key's steps along dim 0, as new tensors; a clear error when their shapes differ."""
    shapes = [tuple((v.values if isinstance(v, TopK) else v).shape) for v in values]
    odd = next((s for s in shapes if s[1:] != shapes[0][1:]), None)
    if odd is not None:
        raise ValueError(
            f"layer {key!r}: result() concatenates steps along dim 0, but their shapes differ beyond "
            f"it ({shapes[0]} and {odd}, e.g. sequences of different lengths); take the steps one by "
            "one with drain(), or make the shapes equal (pad, or reduce='mean')")
    if isinstance(values[0], TopK):
        return TopK(torch.cat([v.values for v in values]), torch.cat([v.indices for v in values]))
    return torch.cat(values)


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
