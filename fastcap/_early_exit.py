"""Early exit (``extract(..., stop_early=True)``): where each forward may end once every captured
layer has run, and the check that nothing captured is dropped by ending it there.

The stop point is learned from a forward that runs to its end: pre-hooks on every submodule see
which module call came first after the last call of a captured layer (the *stop point*: the
module and which of its calls, e.g. block 5 after captured block 4). ``extract`` runs that
learning forward on a one-sample slice of the first batch (its first few tokens, for a
language model's batch), with the capture's hooks only
counting (nothing is stored), so that the model's tail (an LM head's ``[batch, T, vocab]``
logits) never runs at full batch; where the slice cannot run (a forward that needs the whole
batch), the first real forward learns instead and runs to its end. Every later forward ends at
the stop point, before the module runs (a pre-hook, ahead of any other), by raising
:class:`StopForward` - but only after checking that each captured layer ran exactly as often as
in the learning forward; any other count is an error naming the layer, never a silently missing
``name#1`` or layer.

The assumption, documented for users: no captured layer runs again after the stop point. A layer
whose call count varies (an MoE expert, a loop of data-dependent length) is caught as long as
its calls come before the stop point, as they do when it sits before the deepest captured layer.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn


class StopForward(BaseException):
    """Raised at the stop point once every captured layer of the step has run: the rest of the
    forward is not needed. A BaseException, so that a model's ``except Exception`` fallbacks do
    not swallow it; ``extract`` catches it around each forward and calls
    :meth:`fastcap.Capture.end_stopped_step`."""


class EarlyExit:
    """Learns the stop point from the first complete forward, then stops the later ones there.

    Thread use: extract runs one forward at a time; the hooks run on the forward's thread.
    ``register(module, hook)`` adds a forward pre-hook, ahead of the module's others, and returns
    its handle (the owner removes every handle when the capture closes); ``step_calls()`` gives
    the captured calls of the forward running now, or None outside one.
    """

    def __init__(self, model: nn.Module, register: Callable, step_calls: Callable[[], Optional[Dict[str, int]]]):
        self._model = model
        self._register = register
        self._step_calls = step_calls
        self.calls: Optional[Dict[str, int]] = None  # per captured key, calls in the learning forward
        self.stop_at: Optional[Tuple[str, int]] = None  # (module name, its call number in a forward)
        self._learning_handles: List = []
        self._module_calls: Dict[str, int] = {}  # learning: calls of each module so far
        self._next_call: Optional[Tuple[str, int]] = None  # learning: first call after a captured one
        self._stop_calls = 0  # calls of the stop point's module in the current forward
        self.slice_calls: Optional[Dict[str, int]] = None  # learning on a slice: captured calls so far
        self.learned_from = "the first forward"

    @property
    def learning(self) -> bool:
        return self.calls is None

    def install(self) -> None:
        """Pre-hooks on every submodule for the learning forward."""
        for name, module in self._model.named_modules():
            if module is not self._model:
                self._learning_handles.append(self._register(module, self._learning_hook(name)))

    def _learning_hook(self, name: str):
        def hook(module, args):
            calls = self._module_calls.get(name, 0)
            self._module_calls[name] = calls + 1
            if self._next_call is None:
                self._next_call = (name, calls)
        return hook

    def step_started(self) -> None:
        self._module_calls.clear()
        self._next_call = None
        self._stop_calls = 0

    def layer_ran(self, key: Optional[str] = None) -> None:
        """A captured layer's hook ran: while learning, the stop point is a later call. On a
        slice (``key`` given) the capture stores nothing: the call is counted here."""
        self._next_call = None
        if key is not None and self.slice_calls is not None:
            self.slice_calls[key] = self.slice_calls.get(key, 0) + 1

    def learn_on_slice(self, run: Callable[[], None]) -> bool:
        """Runs ``run()`` (a forward of one sample, the capture's hooks calling
        :meth:`layer_ran` with their key and storing nothing) as the learning forward. Whether
        it taught the stop point; when ``run()`` raised an ``Exception``, or no captured layer
        ran, the next forward learns as before."""
        if not self.learning:
            return False
        self.step_started()
        self.slice_calls = {}
        try:
            run()
            calls = self.slice_calls
        except Exception:  # e.g. a forward= that needs the whole batch: learn on the first one
            calls = None
        finally:
            self.slice_calls = None
        if not calls:
            self.step_started()
            return False
        self.learned_from = "the learning forward (one sample of the first batch)"
        self.step_finished(calls)
        return True

    def step_finished(self, calls: Dict[str, int]) -> None:
        """The learning forward ran to its end with these captured calls: fix the stop point,
        drop the learning hooks, and watch the stop point's module from now on."""
        if not self.learning or not calls:
            return
        self.calls = dict(calls)
        self.stop_at = self._next_call
        for handle in self._learning_handles:
            handle.remove()
        self._learning_handles.clear()
        if self.stop_at is not None:
            module = dict(self._model.named_modules())[self.stop_at[0]]
            self._register(module, self._stop_hook)

    def _stop_hook(self, module, args) -> None:
        calls = self._step_calls()
        if calls is None:
            return
        self._stop_calls += 1
        if self._stop_calls == self.stop_at[1] + 1:
            self._check(calls)
            raise StopForward(self.stop_at[0])

    def _check(self, calls: Dict[str, int]) -> None:
        """At the stop point: every captured layer ran as often as in the learning forward."""
        if calls == self.calls:
            return
        odd = [key for key in {**self.calls, **calls} if calls.get(key, 0) != self.calls.get(key, 0)]
        counts = "; ".join(f"layer {key!r} ran {calls.get(key, 0)} time(s) in this forward, "
                           f"{self.calls.get(key, 0)} in {self.learned_from}" for key in odd)
        raise ValueError(
            f"extract: {counts} (counted when the forward reached {self.stop_at[0]!r}, where early exit "
            "ends it). extract stores one row per sample for every layer call, so each forward must call "
            "each captured layer equally often (a layer that runs in some batches only, e.g. an MoE "
            "expert, or a module called a varying number of times, cannot be stored this way); "
            "capture it with fastcap.capture() and drain() instead")
