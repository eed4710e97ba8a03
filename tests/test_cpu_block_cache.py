"""The CPU block cache extract runs its forwards under (csrc/cpu_block_cache.h): large blocks
are reused, given back when a step no longer asks for them, and everything goes back when the
run ends, however it ends."""
import gc
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import fastcap
from fastcap import _ext

C = _ext._C
MIB = 1 << 20


def floats(mib: float) -> int:
    """The number of float32s in ``mib`` MiB."""
    return int(mib * MIB) // 4


def counters() -> dict:
    return dict(C.cpu_block_cache_stats())


def delta(before: dict, key: str) -> int:
    return counters()[key] - before[key]


@pytest.fixture
def block_cache():
    assert C.cpu_block_cache_begin(), "torch's CPU allocator could not be replaced"
    try:
        yield
    finally:
        C.cpu_block_cache_end()
    gc.collect()
    after = counters()
    assert not after["active"] and after["cached_bytes"] == 0 and after["live_bytes"] == 0, after


def test_a_freed_block_serves_the_next_request_of_its_size(block_cache):
    before = counters()
    a = torch.empty(floats(2))
    pointer = a.data_ptr()
    assert (delta(before, "maps"), counters()["live_bytes"]) == (1, 2 * MIB)
    del a
    assert (counters()["live_bytes"], counters()["cached_bytes"]) == (0, 2 * MIB)
    b = torch.empty(floats(1.75))  # at most a quarter smaller than the cached block: reused
    assert b.data_ptr() == pointer
    assert (delta(before, "maps"), delta(before, "reuses")) == (1, 1)
    c = torch.empty(floats(1.25))  # nothing cached fits: a new block
    assert delta(before, "maps") == 2
    assert b.data_ptr() % 64 == 0 and c.data_ptr() % 64 == 0
    assert b.data_ptr() % 4096 != c.data_ptr() % 4096  # not both on a page boundary: no aliasing
    small = torch.empty(1000)  # below 1 MiB: torch's own allocator
    assert delta(before, "maps") == 2 and counters()["live_bytes"] == 2 * MIB + int(1.25 * MIB)
    b.fill_(3.0)
    c.copy_(torch.arange(c.numel(), dtype=torch.float32))
    assert bool((b == 3.0).all()) and torch.equal(c, torch.arange(c.numel(), dtype=torch.float32))
    del b, c, small


def test_a_block_no_step_asks_for_goes_back_after_a_whole_step(block_cache):
    before = counters()
    kept_in_use = torch.empty(floats(4))
    del kept_in_use
    unused = torch.empty(floats(2))
    del unused
    C.cpu_block_cache_step()  # both were cached during this step: kept
    assert (counters()["cached_bytes"], delta(before, "unmaps")) == (6 * MIB, 0)
    again = torch.empty(floats(4))  # the 4 MiB block is asked for again in the next step
    del again
    C.cpu_block_cache_step()  # the 2 MiB block sat through that whole step unused
    assert (counters()["cached_bytes"], delta(before, "unmaps")) == (4 * MIB, 1)


def test_calls_nest_and_a_tensor_outliving_the_cache_stays_valid():
    before = counters()
    assert C.cpu_block_cache_begin() and C.cpu_block_cache_begin()
    survivor = torch.full((floats(2),), 7.0)
    C.cpu_block_cache_end()
    assert counters()["active"]  # the outer call still holds it
    C.cpu_block_cache_end()
    assert not counters()["active"] and counters()["live_bytes"] == 2 * MIB
    after_end = torch.empty(floats(2))  # torch's own allocator again
    assert delta(before, "maps") == 1
    assert bool((survivor == 7.0).all())
    del survivor, after_end
    assert (counters()["live_bytes"], counters()["cached_bytes"], delta(before, "unmaps")) == (0, 0, 1)
    with pytest.raises(RuntimeError, match="without cpu_block_cache_begin"):
        C.cpu_block_cache_end()


def test_the_profiler_sees_the_cached_blocks(block_cache):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.ones(floats(2))
        del x
    allocated = max(event.cpu_memory_usage for event in prof.key_averages())
    assert allocated >= 2 * MIB


class Wide(torch.nn.Module):
    """Temporaries of 1-4 MiB at batch 64: the cache's business."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 4096)
        self.down = torch.nn.Linear(4096, 64)
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def wide_data(batches: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 64, generator=g) for _ in range(batches)]


def test_extract_maps_nothing_new_after_its_first_batches(tmp_path):
    """The steady state reuses the same blocks: 9 batches map what 3 map; the rows are those
    of a run without the cache, which maps nothing."""
    torch.manual_seed(0)
    model = Wide().eval()
    maps = []
    for batches in (3, 9):
        before = counters()
        store = fastcap.extract(model, wide_data(batches), "down", "full", out=tmp_path / f"n{batches}")
        maps.append(delta(before, "maps"))
        assert delta(before, "reuses") > 0
        assert not counters()["active"] and counters()["cached_bytes"] == 0
    assert maps[0] > 0 and maps[1] == maps[0], maps
    before = counters()
    os.environ["FASTCAP_CPU_BLOCK_CACHE"] = "0"
    try:
        plain = fastcap.extract(model, wide_data(9), "down", "full", out=tmp_path / "off")
    finally:
        del os.environ["FASTCAP_CPU_BLOCK_CACHE"]
    assert delta(before, "maps") == 0
    assert np.array_equal(store["down"][:], plain["down"][:])


def test_an_extract_that_fails_leaves_no_cache_behind(tmp_path):
    torch.manual_seed(0)
    model = Wide().eval()
    data = wide_data(4)
    data[2] = torch.randn(64, 3)  # the third batch's forward fails

    with pytest.raises(RuntimeError):
        fastcap.extract(model, data, "down", "full", out=tmp_path / "out")
    gc.collect()
    after = counters()
    assert not after["active"] and after["cached_bytes"] == 0 and after["live_bytes"] == 0, after


class BigSamples(Dataset):
    """Samples of 2 MiB, each made in a worker by the cache's copy there."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is not None:  # a forked worker: torch's allocator
            state = C.cpu_block_cache_stats()
            assert not state["active"] and state["cached_bytes"] == 0, state
        return torch.full((512, 1024), float(i))


class Mean(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.Identity()

    def forward(self, x):
        return self.pool(x.mean(dim=2))


def test_dataloader_workers_forked_under_the_cache_collate_their_batches(tmp_path):
    """Workers start (fork) while the cache is torch's allocator: in the child it is put back
    (nothing cached there), and every row arrives."""
    data = DataLoader(BigSamples(), batch_size=4, num_workers=2)
    store = fastcap.extract(Mean().eval(), data, "pool", "full", out=tmp_path / "out")
    assert np.array_equal(store["pool"][:], np.repeat(np.arange(16, dtype=np.float32)[:, None], 512, axis=1))
