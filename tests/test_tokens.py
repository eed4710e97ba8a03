"""Language models: captures that know which tokens are real (tokens=), against references that
plain PyTorch and Hugging Face compute, on small random-weight GPT-2 and BERT models built here
(nothing is downloaded), with right and left padding, on CPU and (when present) CUDA."""
import pytest
import torch
import torch.nn as nn

import fastcap
from conftest import DEVICES, assert_mean_close, hook_count

transformers = pytest.importorskip("transformers")

BOS = 1
LENGTHS = (5, 8, 3, 6)
T = 8


def gpt2(device):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
                                     bos_token_id=BOS, eos_token_id=BOS)
    return transformers.GPT2Model(config).eval().to(device)


def bert(device):
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=97, max_position_embeddings=32)
    return transformers.BertModel(config).eval().to(device)


def batch(device, padding="right", lengths=LENGTHS, bos=True):
    """input_ids and attention_mask [N, T]: each sequence starts with BOS (a skip id), then
    random ids; pads (id 0, mask 0) on the right or the left."""
    g = torch.Generator().manual_seed(3)
    n = len(lengths)
    ids = torch.zeros(n, T, dtype=torch.int64)
    mask = torch.zeros(n, T, dtype=torch.int64)
    for i, length in enumerate(lengths):
        seq = torch.randint(2, 97, (length,), generator=g)
        if bos:
            seq[0] = BOS
        where = slice(0, length) if padding == "right" else slice(T - length, T)
        ids[i, where] = seq
        mask[i, where] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def hidden_states(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states


def kept(inputs, skip_ids=(), start=0):
    """The reference keep mask, written out the slow way, token by token."""
    mask, ids = inputs["attention_mask"].cpu(), inputs["input_ids"].cpu()
    keep = torch.zeros_like(mask, dtype=torch.bool)
    for n in range(mask.shape[0]):
        real = 0
        for t in range(mask.shape[1]):
            if mask[n, t]:
                real += 1
                keep[n, t] = real > start and int(ids[n, t]) not in skip_ids
    return keep


def run(model, layers, reduce, tokens, batches, **kwargs):
    with torch.no_grad(), fastcap.capture(model, layers, reduce, tokens=tokens, **kwargs) as cap:
        for inputs in batches:
            model(**inputs)
    return cap


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("skip_ids, start", [((), 0), ((BOS,), 0), ((), 1)], ids=["all", "skip-bos", "start-1"])
def test_token_rows_equal_hidden_states_at_the_kept_tokens(device, padding, skip_ids, start):
    model = gpt2(device)
    batches = [batch(device, padding), batch(device, padding, lengths=(2, 7))]
    tok = fastcap.Tokens(skip_ids=skip_ids, start=start)
    cap = run(model, {"resid0": "h.0", "resid1": "h.1"}, "tokens", tok, batches)
    got, where = cap.result(), cap.token_index()
    rows = {"resid0": [], "resid1": []}
    samples, positions, token_ids, offset = [], [], [], 0
    for inputs in batches:
        hs = hidden_states(model, inputs)
        keep = kept(inputs, skip_ids, start)
        rows["resid0"].append(hs[1][keep.to(device)].cpu())  # hidden_states[i + 1]: block i's output
        rows["resid1"].append(hs[2][keep.to(device)].cpu())
        n, t = keep.nonzero(as_tuple=True)
        samples.append(n + offset)
        positions.append(t)
        token_ids.append(inputs["input_ids"].cpu()[keep])
        offset += keep.shape[0]
    for key in rows:
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], torch.cat(rows[key])), key
    assert isinstance(where, fastcap.TokenIndex)
    assert torch.equal(where.sample, torch.cat(samples))
    assert torch.equal(where.position, torch.cat(positions))
    assert torch.equal(where.token_id, torch.cat(token_ids))
    assert len(where.sample) == len(got["resid0"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_pooled_modes_equal_masked_pooling(device, padding):
    # sentence-transformers' Pooling: mean and max over the real tokens, cls (the first real
    # token), lasttoken (the last real token), per sample.
    model = bert(device)
    inputs = batch(device, padding, bos=False)
    modes = {"mean": "mean", "max": "max", "first": "first", "last": "last"}
    layers = {mode: "encoder.layer.1" for mode in modes}
    cap = run(model, layers, modes, fastcap.Tokens(), [inputs])
    got = cap.result()
    hs = hidden_states(model, inputs)[2].cpu()
    mask = inputs["attention_mask"].cpu().bool()
    for n in range(hs.shape[0]):
        real = hs[n][mask[n]]
        assert_mean_close(got["mean"][n:n + 1], real.double().mean(0, keepdim=True))
        assert torch.equal(got["max"][n], real.max(0).values)
        assert torch.equal(got["first"][n], real[0])
        assert torch.equal(got["last"][n], real[-1])
    assert got["max"].dtype == torch.float32 and got["mean"].shape == (len(LENGTHS), 32)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_per_kept_token_equals_torch_topk(device):
    model = gpt2(device)
    inputs = batch(device, "left")
    cap = run(model, "h.1", "topk", fastcap.Tokens(skip_ids=[BOS]), [inputs], k=5)
    got = cap.result()["h.1"]
    rows = hidden_states(model, inputs)[2][kept(inputs, (BOS,)).to(device)]
    ref = torch.topk(rows, 5, dim=-1)
    assert isinstance(got, fastcap.TopK)
    assert torch.equal(got.values, ref.values.cpu()) and torch.equal(got.indices, ref.indices.cpu())
    assert len(cap.token_index().sample) == len(rows)


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_with_no_kept_token_and_drain_with_the_index(device):
    model = gpt2(device)
    nothing = batch(device, lengths=(1, 1))  # only BOS, which is skipped
    some = batch(device)
    with torch.no_grad(), fastcap.capture(model, {"rows": "h.0", "mean": "h.0"}, {"rows": "tokens", "mean": "mean"},
                                          tokens=fastcap.Tokens(skip_ids=[BOS])) as cap:
        model(**nothing)
        first = list(cap.drain())
        model(**some)
        second = list(cap.drain())
    (empty,), (full,) = first, second
    assert empty["rows"].shape == (0, 32) and len(empty["token_index"].sample) == 0
    assert torch.equal(empty["mean"], torch.zeros(2, 32))  # a sample with no kept token: zeros
    keep = kept(some, (BOS,))
    assert full["rows"].shape == (int(keep.sum()), 32)
    assert torch.equal(full["token_index"].position, keep.nonzero(as_tuple=True)[1])
    assert torch.equal(full["token_index"].sample, keep.nonzero(as_tuple=True)[0] + 2)  # samples count on


class TinyLM(nn.Module):
    """[N, T] ids -> [N, T, C], with the mask and ids as forward arguments."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None):
        return self.block(self.embed(input_ids))


def test_empty_batch_and_a_call_without_a_mask():
    torch.manual_seed(0)
    model = TinyLM().eval()
    with torch.no_grad(), fastcap.capture(model, {"rows": "block", "last": "block"}, {"rows": "tokens", "last": "last"},
                                          tokens=fastcap.Tokens()) as cap:
        model(torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 4, dtype=torch.int64))
        ids = torch.randint(0, 50, (2, 4))
        out = model(ids)  # no mask: every position is kept
    got = cap.result()
    assert got["rows"].shape == (8, 16) and torch.equal(got["rows"], out.reshape(8, 16))
    assert got["last"].shape == (2, 16) and torch.equal(got["last"], out[:, -1])
    assert torch.equal(cap.token_index().position, torch.arange(4).repeat(2))


def test_positional_mask_and_a_callable():
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(ids, mask)
        with fastcap.capture(model, "block", "tokens", tokens=fastcap.Tokens()) as cap:
            model(ids, mask)  # positional: found by the signature
        by_call = fastcap.Tokens(mask=lambda args, kwargs: args[1], ids=lambda args, kwargs: args[0])
        with fastcap.capture(model, "block", "tokens", tokens=by_call) as cap2:
            model(ids, mask)
    assert torch.equal(cap.result()["block"], out[mask.bool()])
    assert torch.equal(cap2.result()["block"], out[mask.bool()])
    assert torch.equal(cap2.token_index().token_id, ids[mask.bool()])


def test_errors_name_the_layer_and_the_value():
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(ValueError, match=r"layer 'embed': reduce='tokens' .* needs an output of shape \[N, T, C\]"
                                         r".*got shape \(2, 5\)"):
        with torch.no_grad(), fastcap.capture(model, "embed", "tokens", tokens=fastcap.Tokens(),
                                              select=lambda out: out[..., 0]):
            model(ids)
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match=r"layer 'block': the mask has shape \(2, 4\), but the output \(2, 5, 16\)"):
        with torch.no_grad(), fastcap.capture(model, "block", "mean", tokens=fastcap.Tokens()):
            model(ids, torch.ones(2, 4))
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match=r"skip_ids=\[1\]\) needs ids"):
        fastcap.Tokens(ids=None, skip_ids=[1])
    with pytest.raises(ValueError, match=r"layer 'block': reduce='tokens' works on tokens: pass tokens="):
        fastcap.capture(model, "block", "tokens")
    with pytest.raises(ValueError, match=r"layer 'block': reduce='last' works on tokens"):
        fastcap.capture(model, "block", "last")
    with pytest.raises(ValueError, match=r"Tokens\(mask='mask'\): TinyLM.forward has no argument 'mask'"):
        fastcap.capture(model, "block", "tokens", tokens=fastcap.Tokens(mask="mask"))
    with pytest.raises(TypeError, match=r"tokens must be a fastcap.Tokens"):
        fastcap.capture(model, "block", "tokens", tokens="attention_mask")
