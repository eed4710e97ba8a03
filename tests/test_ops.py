"""The compiled ops against plain PyTorch, on CPU and (when present) CUDA."""
import pytest
import torch

from fastcap import _ops
from conftest import DEVICES, assert_mean_close, distinct_along, mean_reference


def _layouts(x: torch.Tensor):
    """The same values as contiguous, channels_last (4-D), transposed and sliced tensors."""
    yield "contiguous", x.contiguous()
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    if x.dim() >= 3:
        yield "transposed", x.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    big[..., ::2] = x
    yield "sliced", big[..., ::2]


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.bool])
def test_copy_into_is_exact(device, dtype):
    x = (torch.randn(3, 5, 6, 7) * 50).to(dtype).to(device)
    for name, src in _layouts(x):
        dst = torch.empty_like(src, memory_format=torch.preserve_format)
        if not src.is_contiguous() and name == "sliced":
            dst = torch.empty(src.shape, dtype=dtype, device=device)
        _ops.copy_into(src, dst)
        assert torch.equal(dst, src), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("to", [torch.float16, torch.bfloat16, torch.float32])
def test_copy_into_casts(device, to):
    x = torch.randn(4, 8, 5, 5, device=device)
    for name, src in _layouts(x):
        dst = torch.empty(src.shape, dtype=to, device=device)
        _ops.copy_into(src, dst)
        assert torch.equal(dst, src.to(to)), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
@pytest.mark.parametrize("shape,channel_dim", [
    ((4, 16), 1), ((4, 16, 33), 1), ((3, 16, 9, 11), 1), ((2, 6, 3, 4, 5), 1),
    ((4, 21, 16), -1), ((3, 5, 16, 7), 2),
])
def test_mean_into_matches_float64_reference(device, dtype, shape, channel_dim):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype).to(device)
    for name, src in _layouts(x):
        cd = channel_dim % src.dim()
        out = torch.full((src.shape[0], src.shape[cd]), float("nan"), device=device)
        _ops.mean_into(src, channel_dim, out)
        assert_mean_close(out, mean_reference(src, channel_dim))


@pytest.mark.parametrize("device", DEVICES)
def test_mean_into_long_reduction_keeps_float32_accuracy(device):
    # 1x1 channel of 2**20 values with a large mean: naive float32 running sums drift.
    x = (torch.rand(2, 3, 1024, 1024, dtype=torch.float64) + 100.0).float().to(device)
    for name, src in _layouts(x):
        out = torch.empty(2, 3, device=device)
        _ops.mean_into(src, 1, out)
        assert_mean_close(out, mean_reference(src, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64])
@pytest.mark.parametrize("shape,channel_dim,k", [
    ((4, 64), 1, 8), ((3, 32, 5, 6), 1, 4), ((2, 7, 48), -1, 5), ((3, 40, 4, 4), 1, 40), ((2, 3, 17, 2), 2, 1),
])
def test_topk_into_matches_torch_topk(device, dtype, shape, channel_dim, k):
    cd = channel_dim % len(shape)
    x = distinct_along(shape, cd, dtype, device)
    for name, src in _layouts(x):
        ref = torch.topk(src, k, dim=cd)
        values = torch.empty(ref.values.shape, dtype=dtype, device=device)
        indices = torch.full(ref.indices.shape, -1, dtype=torch.int64, device=device)
        _ops.topk_into(src, k, channel_dim, values, indices)
        assert torch.equal(values, ref.values), name
        assert torch.equal(indices, ref.indices), name


@pytest.mark.parametrize("device", DEVICES)
def test_topk_into_random_float32(device):
    x = torch.randn(16, 256, 3, 3, device=device)
    ref = torch.topk(x, 8, dim=1)
    values, indices = torch.empty_like(ref.values), torch.empty_like(ref.indices)
    _ops.topk_into(x, 8, 1, values, indices)
    assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.randn(0, 8, 4, 4, device=device)
    out = torch.empty(0, 8, device=device)
    _ops.mean_into(x, 1, out)
    v, i = torch.empty(0, 3, 4, 4, device=device), torch.empty(0, 3, 4, 4, dtype=torch.long, device=device)
    _ops.topk_into(x, 3, 1, v, i)
    d = torch.empty_like(x)
    _ops.copy_into(x, d)


@pytest.mark.parametrize("device", DEVICES)
def test_mean_over_an_empty_reduction_is_nan_like_torch(device):
    for x in (torch.empty(2, 3, 5, 0, device=device).transpose(2, 3),
              torch.empty(2, 0, 3, 4, device=device).permute(0, 2, 1, 3)):
        out = torch.zeros(x.shape[0], x.shape[1], device=device)
        _ops.mean_into(x, 1, out)
        assert torch.isnan(out).all() and torch.isnan(x.mean((2, 3))).all()


def test_op_errors_name_the_argument():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"channel_dim=4 does not fit shape \[2, 8, 4, 4\]"):
        _ops.mean_into(x, 4, torch.empty(2, 8))
    with pytest.raises(ValueError, match=r"dst must have shape \[2, 8\], got \[2, 9\]"):
        _ops.mean_into(x, 1, torch.empty(2, 9))
    with pytest.raises(ValueError, match=r"k=9 is out of range \[1, 8\]"):
        _ops.topk_into(x, 9, 1, torch.empty(2, 9, 4, 4), torch.empty(2, 9, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dst must have src's shape"):
        _ops.copy_into(x, torch.empty(2, 8, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(3, 8, 5, 5, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    samples = [
        (torch.ops.fastcap.copy_into.default, (x, torch.empty_like(x))),
        (torch.ops.fastcap.copy_into.default, (cl, torch.empty(x.shape, dtype=torch.float16, device=device))),
        (torch.ops.fastcap.mean_into.default, (x, 1, torch.empty(3, 8, device=device))),
        (torch.ops.fastcap.mean_into.default, (cl, -3, torch.empty(3, 8, device=device))),
        (torch.ops.fastcap.topk_into.default,
         (x, 4, 1, torch.empty(3, 4, 5, 5, device=device), torch.empty(3, 4, 5, 5, dtype=torch.long, device=device))),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("width", [1, 15, 16, 64, 100, 2048, 2051])
def test_gather_rows_matches_indexing(width):
    """gather_rows against indexing each shard: widths below, at and across the 16- and 64-byte
    steps of its streaming copy, out rows starting off a 16-byte boundary, shards of different
    lengths (one empty), repeated, descending and consecutive rows (a prefetch after each jump
    only), a run that crosses from one shard to the next."""
    torch.manual_seed(0)
    src = [torch.randint(0, 256, (rows, width), dtype=torch.uint8) for rows in (300, 7, 0, 50)]
    shard = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(7, dtype=torch.long), torch.full((30,), 3),
                       torch.randint(0, 2, (20,)) * 3])
    rows = torch.cat([torch.randint(0, 300, (40,)), torch.arange(7), torch.arange(20, 50), torch.zeros(20, dtype=torch.long)])
    rows[-20:] = torch.where(shard[-20:] == 0, torch.randint(0, 300, (20,)), torch.randint(0, 50, (20,)))
    want = torch.stack([src[s][r] for s, r in zip(shard.tolist(), rows.tolist())])
    out = torch.zeros(len(rows), width, dtype=torch.uint8)
    _ops.gather_rows(src, shard, rows, out)
    assert torch.equal(out, want)
    odd = torch.zeros(len(rows) * width + 3, dtype=torch.uint8)[3:].view(len(rows), width)  # off 16-byte alignment
    _ops.gather_rows(src, shard, rows, odd)
    assert torch.equal(odd, want)
    none = torch.empty(0, dtype=torch.long)
    _ops.gather_rows(src, none, none, torch.empty(0, width, dtype=torch.uint8))


def test_gather_rows_errors_name_the_argument_and_leave_out_untouched():
    src, out = [torch.zeros(10, 4, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8)], torch.full((3, 4), 7, dtype=torch.uint8)
    zeros = torch.zeros(3, dtype=torch.long)
    with pytest.raises(IndexError, match=r"rows\[2\] = 2 is outside src\[1\]'s 2 rows"):
        _ops.gather_rows(src, torch.tensor([0, 0, 1]), torch.tensor([0, 9, 2]), out)
    assert (out == 7).all()
    with pytest.raises(IndexError, match=r"rows\[0\] = -1"):
        _ops.gather_rows(src, zeros, torch.tensor([-1, 1, 2]), out)
    with pytest.raises(IndexError, match=r"shard\[1\] = 2 is outside src's 2 tensors"):
        _ops.gather_rows(src, torch.tensor([0, 2, 0]), zeros, out)
    assert (out == 7).all()
    with pytest.raises(ValueError, match=r"src\[1\] has rows of 5 bytes, out of 4"):
        _ops.gather_rows([src[0], torch.zeros(2, 5, dtype=torch.uint8)], zeros, zeros, out)
    with pytest.raises(ValueError, match=r"src\[0\] must be a contiguous uint8 \[rows, row_bytes\] CPU tensor, got Float"):
        _ops.gather_rows([torch.zeros(10, 4)], zeros, zeros, out)
    with pytest.raises(ValueError, match=r"rows must be a contiguous int64 \[3\] CPU tensor \(out's rows\), got Int"):
        _ops.gather_rows(src, zeros, zeros.int(), out)
    with pytest.raises(ValueError, match=r"shard must be a contiguous int64 \[3\] CPU tensor \(out's rows\), got Long \[2\]"):
        _ops.gather_rows(src, zeros[:2], zeros, out)
    with pytest.raises(ValueError, match=r"src must hold at least one tensor"):
        _ops.gather_rows([], zeros, zeros, out)


def test_gather_rows_opcheck():
    src = [torch.randint(0, 256, (20, 24), dtype=torch.uint8), torch.randint(0, 256, (5, 24), dtype=torch.uint8)]
    torch.library.opcheck(torch.ops.fastcap.gather_rows.default,
                          (src, torch.tensor([0, 0, 1, 1, 0]), torch.tensor([3, 4, 0, 4, 19]),
                           torch.empty(5, 24, dtype=torch.uint8)))
