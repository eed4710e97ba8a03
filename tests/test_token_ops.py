"""The compiled token ops (language models: [N, T, C] with a keep mask [N, T]) against
plain PyTorch, on CPU and (when present) CUDA."""
import pytest
import torch

from fastcap import _C, _ops
from conftest import DEVICES, assert_mean_close, distinct_along

N, T, C = 3, 7, 16


def _masks(n: int, t: int, device: str):
    """Right-padded, left-padded, all-kept, none-kept and mixed masks [n, t]."""
    lengths = torch.tensor([t, max(t - 3, 0), 1, 0, t - 1, 2][:n] + [t] * max(0, n - 6))
    pos = torch.arange(t)
    right = pos[None, :] < lengths[:, None]
    yield "right_padded", right.to(device)
    yield "left_padded", right.flip(1).to(device)
    yield "all_kept", torch.ones(n, t, dtype=torch.bool, device=device)
    yield "none_kept", torch.zeros(n, t, dtype=torch.bool, device=device)
    g = torch.Generator().manual_seed(n * 100 + t)
    yield "mixed", (torch.rand(n, t, generator=g) < 0.5).to(device)
    # The same mixed mask, transposed in memory: keep need not be contiguous.
    yield "mixed_strided", (torch.rand(t, n, generator=g) < 0.5).to(device).t()


def _layouts(x: torch.Tensor):
    """The same [N, T, C] values as a contiguous, a token-major and a channel-sliced tensor."""
    yield "contiguous", x.contiguous()
    yield "transposed", x.transpose(0, 1).contiguous().transpose(0, 1)
    big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    big[..., ::2] = x
    yield "sliced", big[..., ::2]


def _data(dtype, device, shape=(N, T, C)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g) * 3 + 1
    if dtype == torch.bool:
        return (x > 1).to(device)
    if not dtype.is_floating_point:
        x = x * 20
    return x.to(dtype).to(device)


def _long(n, device, fill=-7):
    return torch.full((n,), fill, dtype=torch.int64, device=device)


# --- tokens_into ----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int32, torch.uint8, torch.bool])
def test_tokens_into_is_boolean_indexing(device, dtype):
    x = _data(dtype, device)
    for lname, src in _layouts(x):
        for mname, keep in _masks(N, T, device):
            rows = torch.ones(N * T, C, dtype=dtype, device=device)
            count = _long(1, device)
            _ops.tokens_into(src, keep, 1 if mname != "mixed" else -2, rows, count)
            ref = src[keep]
            n = ref.shape[0]
            assert count.item() == keep.sum().item() == n, (lname, mname)
            assert torch.equal(rows[:n], ref), (lname, mname)
            assert (rows[n:] == 1).all(), (lname, mname)  # past count: left as they were


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src_dtype,to", [
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float64), (torch.int32, torch.float32), (torch.float32, torch.int64),
])
def test_tokens_into_casts(device, src_dtype, to):
    x = _data(src_dtype, device)
    for lname, src in _layouts(x):
        for mname, keep in _masks(N, T, device):
            rows = torch.zeros(N * T, C, dtype=to, device=device)
            count = _long(1, device)
            _ops.tokens_into(src, keep, 1, rows, count)
            ref = src[keep].to(to)
            assert count.item() == ref.shape[0]
            assert torch.equal(rows[:ref.shape[0]], ref), (lname, mname)
            assert (rows[ref.shape[0]:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, T, C), (N, 0, C), (N, T, 0)])
def test_tokens_into_empty(device, shape):
    src = torch.randn(shape, device=device)
    keep = torch.ones(shape[:2], dtype=torch.bool, device=device)
    rows, count = torch.empty(shape[0] * shape[1], shape[2], device=device), _long(1, device)
    _ops.tokens_into(src, keep, 1, rows, count)
    assert count.item() == keep.sum().item()


# --- token_index_into -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", [None, torch.int64, torch.int32, torch.uint8])
def test_token_index_is_nonzero(device, ids_dtype):
    ids = None
    if ids_dtype is not None:
        ids = torch.randint(0, 200, (N, T)).to(ids_dtype).to(device)
    for mname, keep in _masks(N, T, device):
        for which, id_arg in (("plain", ids), ("strided", None if ids is None else ids.t().contiguous().t())):
            sample, position, token_id = (_long(N * T, device) for _ in range(3))
            count = _long(1, device)
            _ops.token_index_into(keep, id_arg, 1000, sample, position, token_id, count)
            nz = keep.nonzero()
            n = nz.shape[0]
            assert count.item() == n == keep.sum().item(), mname
            assert torch.equal(sample[:n], nz[:, 0] + 1000), mname
            assert torch.equal(position[:n], nz[:, 1]), mname
            want = torch.full((n,), -1, dtype=torch.int64, device=device) if ids is None else ids[keep].long()
            assert torch.equal(token_id[:n], want), (mname, which)
            assert (sample[n:] == -7).all()


@pytest.mark.parametrize("device", DEVICES)
def test_token_index_empty(device):
    for n, t in ((0, 5), (4, 0)):
        keep = torch.ones(n, t, dtype=torch.bool, device=device)
        outs = [_long(n * t, device) for _ in range(3)]
        count = _long(1, device)
        _ops.token_index_into(keep, None, 0, *outs, count)
        assert count.item() == 0


# --- pool_tokens_into -----------------------------------------------------------------

def _pool_reference(src, keep, mode):
    out = []
    for n in range(src.shape[0]):
        kept = src[n][keep[n]]
        if kept.shape[0] == 0:
            out.append(torch.zeros(src.shape[2], dtype=torch.float64 if mode == "mean" else src.dtype,
                                   device=src.device))
        elif mode == "mean":
            out.append(kept.double().mean(0))
        elif mode == "max":
            out.append(kept.max(0).values)
        elif mode == "first":
            out.append(kept[0])
        else:
            out.append(kept[-1])
    return torch.stack(out) if out else torch.empty(0, src.shape[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mean", "max", "first", "last"])
def test_pool_tokens_matches_masked_reference(device, dtype, mode):
    x = _data(dtype, device)
    for lname, src in _layouts(x):
        for mname, keep in _masks(N, T, device):
            out_dtype = torch.float32 if mode == "mean" else dtype
            dst = torch.full((N, C), float("nan"), dtype=out_dtype, device=device)
            _ops.pool_tokens_into(src, keep, 1, mode, dst)
            ref = _pool_reference(src, keep, mode)
            if mode == "mean":
                assert_mean_close(dst, ref)
            else:
                assert torch.equal(dst, ref), (lname, mname)
            empty = ~keep.any(1)
            assert (dst[empty] == 0).all(), (lname, mname)  # no kept token: zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["max", "first", "last", "mean"])
def test_pool_tokens_integer_input(device, mode):
    src = _data(torch.int32, device)
    for mname, keep in _masks(N, T, device):
        dst = torch.empty(N, C, dtype=torch.float32 if mode == "mean" else torch.int32, device=device)
        _ops.pool_tokens_into(src, keep, 1, mode, dst)
        ref = _pool_reference(src, keep, mode)
        if mode == "mean":
            assert_mean_close(dst, ref)
        else:
            assert torch.equal(dst, ref), mname


@pytest.mark.parametrize("device", DEVICES)
def test_pool_max_propagates_nan(device):
    src = torch.randn(2, 4, 3, device=device)
    src[0, 1, 2] = float("nan")
    keep = torch.ones(2, 4, dtype=torch.bool, device=device)
    dst = torch.empty(2, 3, device=device)
    _ops.pool_tokens_into(src, keep, 1, "max", dst)
    ref = src.max(1).values
    assert torch.isnan(dst[0, 2]) and torch.equal(dst.isnan(), ref.isnan())
    assert torch.equal(dst.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
def test_pool_mean_long_sequence_keeps_float32_accuracy(device):
    x = (torch.rand(2, 8192, 8, dtype=torch.float64) + 100.0).float().to(device)
    keep = torch.ones(2, 8192, dtype=torch.bool, device=device)
    keep[1, 5000:] = False
    dst = torch.empty(2, 8, device=device)
    _ops.pool_tokens_into(x, keep, 1, "mean", dst)
    assert_mean_close(dst, _pool_reference(x, keep, "mean"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["mean", "max", "first", "last"])
def test_pool_tokens_empty(device, mode):
    # An empty batch gives [0, C]; T=0 gives a zero row per sample.
    for n, t in ((0, T), (N, 0)):
        src = torch.randn(n, t, C, device=device)
        keep = torch.ones(n, t, dtype=torch.bool, device=device)
        dst = torch.full((n, C), float("nan"), device=device)
        _ops.pool_tokens_into(src, keep, 1, mode, dst)
        assert (dst == 0).all()


# --- tokens_topk_into -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, C])
def test_tokens_topk_matches_torch_topk(device, dtype, k):
    x = distinct_along((N, T, C), 2, dtype, device)
    for lname, src in _layouts(x):
        for mname, keep in _masks(N, T, device):
            values = torch.zeros(N * T, k, dtype=dtype, device=device)
            indices = torch.zeros(N * T, k, dtype=torch.int64, device=device)
            count = _long(1, device)
            _ops.tokens_topk_into(src, keep, 1, k, values, indices, count)
            ref = torch.topk(src[keep], k, dim=-1)
            n = ref.values.shape[0]
            assert count.item() == n == keep.sum().item()
            assert torch.equal(values[:n], ref.values), (lname, mname)
            assert torch.equal(indices[:n], ref.indices), (lname, mname)


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_topk_random_float32(device):
    src = torch.randn(4, 33, 128, device=device)
    keep = torch.rand(4, 33, device=device) < 0.7
    values, indices = torch.empty(4 * 33, 8, device=device), torch.empty(4 * 33, 8, dtype=torch.long, device=device)
    count = _long(1, device)
    _ops.tokens_topk_into(src, keep, 1, 8, values, indices, count)
    ref = torch.topk(src[keep], 8)
    n = count.item()
    assert torch.equal(values[:n], ref.values) and torch.equal(indices[:n], ref.indices)


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_topk_empty(device):
    for n, t in ((0, T), (N, 0)):
        src = torch.randn(n, t, C, device=device)
        keep = torch.ones(n, t, dtype=torch.bool, device=device)
        values = torch.empty(n * t, 3, device=device)
        indices = torch.empty(n * t, 3, dtype=torch.long, device=device)
        count = _long(1, device)
        _ops.tokens_topk_into(src, keep, 1, 3, values, indices, count)
        assert count.item() == 0


# --- errors and opcheck ---------------------------------------------------------------

def test_token_op_errors_name_the_argument():
    x, keep = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    rows, count = torch.empty(10, 16), torch.empty(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"tokens need \[N, T, C\] with token_dim=1, got shape \[2, 16\]"):
        _ops.tokens_into(torch.randn(2, 16), keep, 1, rows, count)
    with pytest.raises(ValueError, match=r"token_dim=2"):
        _ops.pool_tokens_into(x, keep, 2, "mean", torch.empty(2, 16))
    with pytest.raises(ValueError, match=r"keep must have shape \[2, 5\] \(src's \[N, T\]\), got \[2, 4\]"):
        _ops.tokens_into(x, keep[:, :4], 1, rows, count)
    with pytest.raises(ValueError, match=r"keep must be a bool mask \[N, T\], got dtype Long"):
        _ops.tokens_into(x, keep.long(), 1, rows, count)
    with pytest.raises(ValueError, match=r"keep must be a bool mask \[N, T\], got dtype Float"):
        _ops.token_index_into(keep.float(), None, 0, *(torch.empty(10, dtype=torch.long) for _ in range(3)), count)
    with pytest.raises(ValueError, match=r"k=17 is out of range \[1, 16\]"):
        _ops.tokens_topk_into(x, keep, 1, 17, torch.empty(10, 17), torch.empty(10, 17, dtype=torch.long), count)
    with pytest.raises(ValueError, match=r"k=0 is out of range \[1, 16\]"):
        _ops.tokens_topk_into(x, keep, 1, 0, torch.empty(10, 0), torch.empty(10, 0, dtype=torch.long), count)
    with pytest.raises(ValueError, match=r"reduce must be one of mean\|max\|first\|last, got 'median'"):
        _ops.pool_tokens_into(x, keep, 1, "median", torch.empty(2, 16))
    with pytest.raises(ValueError, match=r"dst must be Float, got Half"):
        _ops.pool_tokens_into(x, keep, 1, "mean", torch.empty(2, 16, dtype=torch.half))
    with pytest.raises(ValueError, match=r"rows must have shape \[10, 16\], got \[9, 16\]"):
        _ops.tokens_into(x, keep, 1, torch.empty(9, 16), count)
    with pytest.raises(ValueError, match=r"count must be Long, got Int"):
        _ops.tokens_into(x, keep, 1, rows, torch.empty(1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ids must be an integer tensor, got dtype Float"):
        _ops.token_index_into(keep, torch.zeros(2, 5), 0, *(torch.empty(10, dtype=torch.long) for _ in range(3)),
                              count)


def _opcheck_samples(device):
    x = torch.randn(3, 6, 8, device=device)
    keep = torch.rand(3, 6, device=device) < 0.6
    ids = torch.randint(0, 50, (3, 6), device=device)

    def longs(n):
        return torch.empty(n, dtype=torch.long, device=device)

    ops = torch.ops.fastcap
    samples = {
        "tokens": (ops.tokens_into.default, (x, keep, 1, torch.zeros(18, 8, device=device), longs(1))),
        "tokens_cast": (ops.tokens_into.default, (x.transpose(0, 1).contiguous().transpose(0, 1), keep, -2,
                                                  torch.zeros(18, 8, dtype=torch.float16, device=device),
                                                  longs(1))),
        "index": (ops.token_index_into.default, (keep, ids, 5, longs(18), longs(18), longs(18), longs(1))),
        "index_no_ids": (ops.token_index_into.default, (keep, None, 0, longs(18), longs(18), longs(18), longs(1))),
        "topk": (ops.tokens_topk_into.default, (x, keep, 1, 3, torch.zeros(18, 3, device=device),
                                                torch.zeros(18, 3, dtype=torch.long, device=device), longs(1))),
    }
    for reduce in ("mean", "max", "first", "last"):
        dst = torch.empty(3, 8, device=device)
        samples[f"pool_{reduce}"] = (ops.pool_tokens_into.default, (x, keep, 1, reduce, dst))
    return samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", list(_opcheck_samples("cpu")))
def test_token_opcheck(device, sample):
    op, args = _opcheck_samples(device)[sample]
    torch.library.opcheck(op, args)


# --- the ring's counted commit (CPU: the op wrote host memory) -------------------------

def test_ring_commit_counted_on_host():
    ring = _C.Ring(2, torch.device("cpu"))
    try:
        src = torch.randn(2, 6, 4)
        keep = torch.zeros(2, 6, dtype=torch.bool)
        keep[0, :4] = True
        keep[1, 2] = True
        row_bytes = 4 * 4
        # The count first, then room for N*T rows: the slot's bytes end with the counted rows.
        upper = 8 + 12 * row_bytes
        slot = ring.acquire(upper, 0.0)
        host = ring.target(slot, torch.device("cpu"))
        count = host[:8].view(torch.int64)
        rows = host[8:upper].view(torch.float32).view(12, 4)
        _ops.tokens_into(src, keep, 1, rows, count)
        ring.commit_counted(slot, 0, [(8, row_bytes)], upper)
        assert ring.ready(slot)  # the op wrote host memory: final at once
        ring.wait(slot)
        got = ring.host(slot)
        assert got[:8].view(torch.int64).item() == 5
        assert torch.equal(got[8:8 + 5 * row_bytes].view(torch.float32).view(5, 4), src[keep])
        assert ring.stats()["bytes_captured"] == 8 + 5 * row_bytes
        with pytest.raises(RuntimeError, match="was not acquired"):
            ring.commit_counted(slot, 0, [], 8)
        ring.release(slot)
        slot = ring.acquire(64, 0.0)
        ring.target(slot, torch.device("cpu"))[:8].view(torch.int64).fill_(1000)  # 1000 rows do not fit
        with pytest.raises(RuntimeError, match="overrun the slot's capacity"):
            ring.commit_counted(slot, 0, [(8, 16)], 64)
        ring.target(slot, torch.device("cpu"))[:8].view(torch.int64).fill_(2)
        ring.commit_counted(slot, 0, [(8, 16)], 64)  # still acquired after the failure
        ring.release(slot)
    finally:
        ring.close()
