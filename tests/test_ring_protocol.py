"""The ring's protocol with copies in flight, without a GPU: fastcap's asynchronous test transfer
copies each committed slot to host memory later, in order, on a worker thread, the way the CUDA
side stream does (``csrc/test_transfer.cpp``), and a test decides when each copy may run.

1. A seeded random sequence of acquire / write+commit / counted commit / grant a copy / ready /
   release, checked step by step against a plain Python model of the ring (which slot an
   acquire gets, which slots are ready, what their host bytes hold).
2. Threads: producers and consumers racing on one ring, copies landing whenever the worker gets
   to them; every committed payload is read back exactly once, and a slot is never held twice.
3. A consumer that stops: the producer's bounded waits give up (no hang) and close() wakes it.
4. Close with copies in flight waits for them, frees everything, and wakes a blocked acquire.

Deterministic: threads meet at states (a slot ready, a copy granted), never after a sleep.
"""
from __future__ import annotations

import random
import threading
import time
from collections import deque

import pytest
import torch

from fastcap import _ext

_C = _ext._C
CPU = torch.device("cpu")
DEADLINE = 30.0
ROW = 16  # bytes per row of a counted commit
COUNT_AT = 0
ROWS_AT = 64


def eventually(predicate, what: str) -> None:
    """Polls a state (not a time): the worker thread gets to a copy when it does."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.0005)


class RingModel:
    """What the ring must do: FIFO reuse of free slots, one copy per commit landing in commit
    order, a slot ready once its copy has landed."""

    def __init__(self, depth: int):
        self.depth = depth
        self.state = ["free"] * depth
        self.next = 0
        self.expected = [None] * depth  # bytes the host memory must hold once ready
        self.pending = deque()          # slots whose copy has not landed, in commit order
        self.granted = 0                # copies the test has let run

    def acquire(self) -> int:
        for i in range(self.depth):
            slot = (self.next + i) % self.depth
            if self.state[slot] == "free":
                self.state[slot] = "writing"
                self.next = (slot + 1) % self.depth
                return slot
        return -1

    def commit(self, slot: int, payload: bytes) -> None:
        self.state[slot] = "committed"
        self.expected[slot] = payload
        self.pending.append(slot)

    def landed(self, slot: int) -> bool:
        return self.state[slot] == "committed" and slot not in self.pending

    def grant(self) -> int:
        return self.pending.popleft()

    def release(self, slot: int) -> None:
        self.state[slot] = "free"
        self.expected[slot] = None


@pytest.fixture
def gated_copies(async_copies):
    return async_copies(gated=True)


def write_plain(ring, slot: int, seq: int, n: int) -> bytes:
    target = ring.target(slot, CPU)
    target[:n].fill_(seq % 251)
    ring.commit(slot, n)
    return bytes([seq % 251]) * n


def write_counted(ring, slot: int, seq: int, count: int, capacity_rows: int) -> bytes:
    target = ring.target(slot, CPU)
    target[COUNT_AT:COUNT_AT + 8].view(torch.int64).fill_(count)
    target[ROWS_AT:ROWS_AT + capacity_rows * ROW].fill_((seq * 7) % 251)
    ring.commit_counted(slot, COUNT_AT, [(ROWS_AT, ROW)], ROWS_AT + capacity_rows * ROW)
    return ("counted", count, (seq * 7) % 251)


def host_matches(ring, slot: int, expected) -> bool:
    host = ring.host(slot)
    if isinstance(expected, tuple):  # counted: the count, then exactly that many rows
        _, count, value = expected
        rows = host[ROWS_AT:ROWS_AT + count * ROW]
        return host[:8].view(torch.int64).item() == count and bool((rows == value).all())
    return bytes(host[:len(expected)].tolist()) == expected


@pytest.mark.parametrize("seed", range(6))
def test_random_sequence_matches_the_model(gated_copies, seed):
    rng = random.Random(seed)
    depth = rng.choice([1, 2, 3, 5])
    capacity_rows = 8
    ring = _C.Ring(depth, CPU)
    model = RingModel(depth)
    nbytes = ROWS_AT + capacity_rows * ROW
    writing = []
    try:
        for seq in range(300):
            op = rng.choice(["acquire", "commit", "commit", "grant", "ready", "release"])
            if op == "acquire":
                got = ring.acquire(nbytes, 0.0)
                assert got == model.acquire(), f"step {seq}: acquire gave slot {got}"
                if got >= 0:
                    writing.append(got)
            elif op == "commit" and writing:
                slot = writing.pop(rng.randrange(len(writing)))
                if rng.random() < 0.4:
                    payload = write_counted(ring, slot, seq, rng.randrange(capacity_rows + 1), capacity_rows)
                else:
                    payload = write_plain(ring, slot, seq, rng.randrange(1, nbytes + 1))
                model.commit(slot, payload)
                assert not ring.ready(slot), f"step {seq}: slot {slot} ready before its copy ran"
            elif op == "grant" and model.pending:
                slot = model.grant()
                _C.release_test_transfer_copies(1)
                eventually(lambda: ring.ready(slot), f"slot {slot} ready after its copy was granted")
            elif op == "ready":
                for slot in range(depth):
                    if model.state[slot] == "committed":
                        assert ring.ready(slot) == model.landed(slot), f"step {seq}: ready({slot})"
            elif op == "release":
                landed = [s for s in range(depth) if model.landed(s)]
                if landed:
                    slot = rng.choice(landed)
                    assert host_matches(ring, slot, model.expected[slot]), f"step {seq}: slot {slot} bytes"
                    ring.release(slot)
                    model.release(slot)
            assert ring.free_slots() == model.state.count("free")
    finally:
        # Close with copies in flight: close() waits for them (granted meanwhile).
        closer = threading.Thread(target=ring.close)
        closer.start()
        _C.open_test_transfer_gate()
        closer.join(DEADLINE)
        assert not closer.is_alive()
    assert _ext.live_host_bytes() == 0


def test_release_and_wait_block_until_the_copy_lands(gated_copies):
    ring = _C.Ring(2, CPU)
    try:
        slot = ring.acquire(64, 0.0)
        write_plain(ring, slot, 5, 64)
        done = threading.Event()

        def consumer():
            ring.wait(slot)  # blocks: the copy has not run
            done.set()

        thread = threading.Thread(target=consumer)
        thread.start()
        assert not done.is_set() and not ring.ready(slot)
        _C.release_test_transfer_copies(1)
        thread.join(DEADLINE)
        assert done.is_set() and host_matches(ring, slot, bytes([5]) * 64)
        # release() of a slot whose copy is in flight waits for it: the memory is not reused early.
        ring.release(slot)
        slot = ring.acquire(64, 0.0)
        write_plain(ring, slot, 6, 64)
        releaser = threading.Thread(target=ring.release, args=(slot,))
        releaser.start()
        assert ring.free_slots() == 1
        _C.release_test_transfer_copies(1)
        releaser.join(DEADLINE)
        assert not releaser.is_alive() and ring.free_slots() == 2
    finally:
        _C.open_test_transfer_gate()
        ring.close()


def test_large_counted_commit_copies_the_count_then_only_its_rows(gated_copies):
    """Above the at-once bound only the count crosses at commit; a consumer that sees it landed
    queues exactly the rows it counts (not the upper bound)."""
    capacity_rows = (8 << 20) // ROW + 8  # an upper bound above 8 MiB
    ring = _C.Ring(1, CPU)
    try:
        slot = ring.acquire(ROWS_AT + capacity_rows * ROW, 0.0)
        expected = write_counted(ring, slot, 3, 5, capacity_rows)
        _C.release_test_transfer_copies(1)  # the count's copy
        eventually(lambda: ring.stats()["d2h_bytes"] == 8, "the count landed")
        assert not ring.ready(slot)  # the count is in: now the rows are queued, gated
        _C.release_test_transfer_copies(1)
        eventually(lambda: ring.ready(slot), "the rows landed")
        assert host_matches(ring, slot, expected)
        assert ring.stats()["d2h_bytes"] == 8 + 5 * ROW
        assert ring.stats()["bytes_captured"] == ROWS_AT + 5 * ROW
    finally:
        _C.open_test_transfer_gate()
        ring.close()


def test_racing_producers_and_consumers(async_copies):
    """Copies land whenever the worker gets to them; each payload is read back exactly once."""
    async_copies(delay=0.0)
    depth, per_producer = 3, 150
    ring = _C.Ring(depth, CPU)
    committed: deque = deque()
    holders = [None] * depth
    lock = threading.Lock()
    errors, read = [], []
    done = threading.Event()

    def take(slot, who):
        with lock:
            if holders[slot] is not None:
                errors.append(f"slot {slot} held by {holders[slot]} and {who}")
            holders[slot] = who

    def producer(p):
        try:
            for i in range(per_producer):
                slot = -1
                while slot < 0:
                    slot = ring.acquire(256, 0.05)
                take(slot, f"producer {p}")
                seq = p * 1000 + i
                payload = write_plain(ring, slot, seq, 1 + seq % 256)
                with lock:
                    holders[slot] = None  # handed over by the commit
                    committed.append((slot, payload))
        except Exception as exc:
            errors.append(repr(exc))

    def consumer():
        try:
            while not (done.is_set() and not committed):
                with lock:
                    item = committed.popleft() if committed else None
                if item is None:
                    time.sleep(0.0005)
                    continue
                slot, payload = item
                ring.wait(slot)
                if not host_matches(ring, slot, payload):
                    errors.append(f"slot {slot}: wrong bytes")
                read.append(payload)
                ring.release(slot)
        except Exception as exc:
            errors.append(repr(exc))

    producers = [threading.Thread(target=producer, args=(p,)) for p in range(2)]
    consumers = [threading.Thread(target=consumer) for _ in range(2)]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join(DEADLINE)
    done.set()
    for t in consumers:
        t.join(DEADLINE)
    ring.close()
    assert errors == []
    assert len(read) == 2 * per_producer
    assert ring.stats()["commits"] == 2 * per_producer


def test_a_consumer_that_stops_leaves_bounded_waits_and_close_wakes_a_blocked_acquire(async_copies):
    async_copies(delay=0.0)
    ring = _C.Ring(2, CPU)
    for seq in range(2):  # both slots committed; the consumer stopped before taking them
        write_plain(ring, ring.acquire(32, 0.0), seq, 32)
    assert ring.acquire(32, 0.05) == -1  # a bounded wait gives up
    outcome = {}

    def blocked():
        try:
            outcome["slot"] = ring.acquire(32, -1.0)  # for ever, but for close()
        except RuntimeError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    closer = threading.Thread(target=ring.close)
    closer.start()
    closer.join(DEADLINE)
    thread.join(DEADLINE)
    assert not thread.is_alive() and not closer.is_alive()
    assert "closed" in outcome.get("error", ""), outcome
    assert _ext.live_host_bytes() == 0
