"""Language models on the command line: hf: / hf-random: models, text corpora (fastcap/text.py)
packed or padded, --tokens; each store against a plain fastcap.capture of the same model over
the same batches. Tiny GPT-2 models and a word-level tokenizer built here (nothing is
downloaded)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fastcap
from fastcap.cli import main
from fastcap.models import load_model
from fastcap.text import make_text_dataset
from test_extract import _one_thread  # noqa: F401 (autouse: results are compared bit-wise)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

BOS, EOS, PAD = 1, 2, 0
#: a 2-block GPT-2 with 97 ids; BOS and EOS differ so that --skip-ids bos is not eos too.
MODEL = ("hf-random:gpt2?n_layer=2&n_embd=32&n_head=2&vocab_size=97&n_positions=64"
         f"&bos_token_id={BOS}&eos_token_id={EOS}")
LAYERS = ["transformer.h.0", "transformer.h.1"]
WORDS = "the cat sat on a mat while dog ran far away from big red house near old tree".split()


def texts(count: int = 13) -> list[str]:
    """Deterministic sentences of 1..12 words."""
    generator = np.random.default_rng(5)
    return [" ".join(generator.choice(WORDS, size=int(generator.integers(1, 13)))) for _ in range(count)]


def save_tokenizer(path) -> str:
    """A word-level tokenizer over WORDS (pad 0, bos 1, eos 2, unk 3), saved like any HF one."""
    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<bos>",
                                                     eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, field: str = "text") -> str:
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts())))
    return str(path)


def cli(*args: str) -> int:
    return main(["extract", "--batch-size", "4", "--shard-size", "8", *args])


def random_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the CLI's default --seed
    return load_model(MODEL)


def captured(model, batches, layers, reduce, tokens):
    with torch.inference_mode(), fastcap.capture(model, layers, reduce, tokens=tokens) as cap:
        for batch in batches:
            model(**batch)
    return cap.result(), cap.token_index()


def assert_rows_equal(store, result, index) -> None:
    for key, rows in result.items():
        assert torch.equal(store[key].tensor(), rows), key
    for field in ("sample", "position", "token_id"):
        assert np.array_equal(getattr(store.tokens, field), getattr(index, field).numpy()), field


def reference_pack(documents: list[list[int]], context: int, bos: int) -> list[list[int]]:
    """doc_1 BOS doc_2 BOS ... BOS doc_N, cut into pieces of context-1; each row BOS + piece."""
    stream: list[int] = []
    for number, document in enumerate(documents):
        if number:
            stream.append(bos)
        stream.extend(document)
    step = context - 1
    return [[bos] + stream[start:start + step] for start in range(0, len(stream) - step + 1, step)]


# ------------------------------------------------------------------ models and corpora on the CLI


def test_hf_random_packed_fake_text_equals_capture(tmp_path):
    out = tmp_path / "acts"
    assert cli("--model", MODEL, "--data", "fake-text:12", "--context", "16", "--pack",
               "--layers", ",".join(LAYERS), "--reduce", "tokens", "--skip-ids", "bos", "--out", str(out)) == 0
    model = random_model()
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.use_cache is False
    data = make_text_dataset("fake-text:12", context=16, pack=True, config=model.config)
    result, index = captured(model, DataLoader(data, batch_size=4), LAYERS, "tokens",
                             fastcap.Tokens(skip_ids=[BOS]))
    store = fastcap.open(out)
    assert len(store.indices) == len(data) and store["transformer.h.1"].shape == (len(index.sample), 32)
    assert_rows_equal(store, result, index)
    assert BOS not in store.tokens.token_id  # every row's BOS and the separators were skipped
    assert store.manifest["args"]["data_spec"] == data.extract_spec


def test_hf_model_dir_and_its_tokenizer_over_txt_equal_capture(tmp_path):
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64,
                                     bos_token_id=BOS, eos_token_id=EOS)
    model = transformers.GPT2LMHeadModel(config).eval()
    model_dir = tmp_path / "lm"
    model.save_pretrained(model_dir)
    save_tokenizer(model_dir)  # the model dir is the default --tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts()[:6]) + "\n\n" + "\n".join(texts()[6:]) + "\n")  # a blank line: skipped
    out = tmp_path / "acts"
    assert cli("--model", f"hf:{model_dir}", "--data", str(corpus), "--context", "10",
               "--layers", "transformer.h.1", "--reduce", "tokens", "--out", str(out)) == 0

    # The reference batches, made by hand: each line tokenized, truncated to 10, right-padded.
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batches = []
    for start in range(0, len(texts()), 4):
        ids = torch.zeros(len(texts()[start:start + 4]), 10, dtype=torch.int64)
        for row, text in enumerate(texts()[start:start + 4]):
            encoded = tokenizer(text)["input_ids"][:10]
            ids[row, :len(encoded)] = torch.tensor(encoded)
        mask = (ids != PAD).long()  # no text holds the pad word
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "position_ids": (mask.cumsum(1) - 1).clamp(min=0)})
    result, index = captured(model, batches, "transformer.h.1", "tokens", fastcap.Tokens())
    store = fastcap.open(out)
    assert len(store.indices) == len(texts())
    assert_rows_equal(store, result, index)


def test_jsonl_with_a_tokenizer_keeps_every_document_token(tmp_path):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", field="body")
    out = tmp_path / "acts"
    assert cli("--model", MODEL, "--data", corpus, "--text-field", "body", "--tokenizer", tokenizer_dir,
               "--context", "64", "--layers", "transformer.h.0", "--reduce", "tokens", "--out", str(out)) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = [tokenizer(text)["input_ids"] for text in texts()]
    store = fastcap.open(out)
    assert store.tokens.token_id.tolist() == [i for ids in expected for i in ids]
    assert store.tokens.sample.tolist() == [n for n, ids in enumerate(expected) for _ in ids]

    model = random_model()
    data = make_text_dataset(corpus, context=64, tokenizer=tokenizer_dir, text_field="body",
                             config=model.config, position_ids=True)
    result, index = captured(model, DataLoader(data, batch_size=4), "transformer.h.0", "tokens", fastcap.Tokens())
    assert_rows_equal(store, result, index)
    assert data.extract_spec["text_field"] == "body" and data.extract_spec["tokenizer"] == tokenizer_dir


def test_a_folder_of_files_in_sorted_order(tmp_path):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl")
    (folder / "a.txt").write_text("dog ran\nthe cat\n")
    (folder / "notes.md").write_text("not a document")
    data = make_text_dataset(str(folder), context=16, tokenizer=tokenizer_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    documents = ["dog ran", "the cat", *texts()]
    assert len(data) == len(documents)
    for n, text in enumerate(documents):
        ids = tokenizer(text)["input_ids"]
        assert data[n]["input_ids"][:len(ids)].tolist() == ids
    assert data.extract_spec["corpus"] == "folder" and data.extract_spec["documents"] == len(documents)


# ------------------------------------------------------------------ rows: packing and padding


@pytest.mark.parametrize("context", [2, 5, 16])
def test_packing_equals_a_reference_packer(tmp_path, context):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    corpus = write_jsonl(tmp_path / "corpus.jsonl")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = np.arange(4, 4 + 30, dtype=np.int64).reshape(3, 10)
    np.save(tmp_path / "two.npy", ids)
    np.save(tmp_path / "one.npy", ids[0])
    config = transformers.GPT2Config(vocab_size=97, n_positions=64, bos_token_id=BOS, eos_token_id=EOS)
    cases = {
        corpus: [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts()],
        str(tmp_path / "two.npy"): ids.tolist(),
        str(tmp_path / "one.npy"): [ids[0].tolist()],
    }
    for spec, documents in cases.items():
        expected = reference_pack(documents, context, BOS)
        if not expected:
            continue  # one 10-token document holds no row of 16
        data = make_text_dataset(spec, context=context, pack=True, tokenizer=tokenizer_dir, config=config)
        assert len(data) == len(expected), spec
        for row, want in enumerate(expected):
            item = data[row]
            assert item["input_ids"].tolist() == want, (spec, row)
            assert item["input_ids"].dtype == torch.int64 and item["attention_mask"].tolist() == [1] * context
            assert "position_ids" not in item  # no pads: the model's own positions are the same


def test_fake_text_is_deterministic_in_vocab_and_free_of_special_ids():
    config = transformers.GPT2Config(vocab_size=97, n_positions=64, bos_token_id=BOS, eos_token_id=EOS)
    a = make_text_dataset("fake-text:30", context=64, config=config)
    b = make_text_dataset("fake-text:40", context=64, config=config)  # document i does not depend on N
    lengths = [int(a[i]["attention_mask"].sum()) for i in range(30)]
    assert len(set(lengths)) >= 3 and min(lengths) >= 1 and max(lengths) == 64  # 1..256 tokens, truncated
    for i in range(30):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
    real = torch.stack([a[i]["input_ids"][a[i]["attention_mask"].bool()] for i in range(30) if lengths[i] == 64])
    assert int(real.max()) < 97 and not torch.isin(real, torch.tensor([BOS, EOS])).any()
    spec = a.extract_spec
    assert json.loads(json.dumps(spec)) == spec and spec["vocab_size"] == 97 and spec["documents"] == 30


def test_padded_rows_truncate_pad_and_position(tmp_path):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "the cat sat on a mat"}\n{"text": ""}\n{"text": "dog"}\n')
    right = make_text_dataset(str(corpus), context=4, tokenizer=tokenizer_dir)
    left = make_text_dataset(str(corpus), context=4, padding="left", tokenizer=tokenizer_dir, position_ids=True)
    assert right[0]["input_ids"].tolist() == [4, 5, 6, 7]  # truncated to the first 4
    dog = 4 + WORDS.index("dog")
    assert right[2]["input_ids"].tolist() == [dog, PAD, PAD, PAD] and right[2]["attention_mask"].tolist() == [1, 0, 0, 0]
    assert left[2]["input_ids"].tolist() == [PAD, PAD, PAD, dog] and left[2]["position_ids"].tolist() == [0, 0, 0, 0]
    assert left[0]["position_ids"].tolist() == [0, 1, 2, 3]
    assert right[1]["attention_mask"].tolist() == [0] * 4  # an empty document: no real token
    assert sorted(right[0]) == ["attention_mask", "input_ids"]


def test_left_and_right_padding_keep_the_same_rows(tmp_path):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    corpus = write_jsonl(tmp_path / "corpus.jsonl")
    stores = {}
    for side in ("right", "left"):
        out = tmp_path / side
        assert cli("--model", MODEL, "--data", corpus, "--tokenizer", tokenizer_dir, "--context", "12",
                   "--padding", side, "--layers", "transformer.h.1", "--reduce", "tokens", "--out", str(out)) == 0
        stores[side] = fastcap.open(out)
    right, left = stores["right"], stores["left"]
    assert np.array_equal(right.tokens.token_id, left.tokens.token_id)
    assert np.array_equal(right.tokens.sample, left.tokens.sample)
    lengths = np.bincount(right.tokens.sample)[right.tokens.sample]
    assert np.array_equal(left.tokens.position, right.tokens.position + 12 - lengths)  # positions differ
    torch.testing.assert_close(left["transformer.h.1"].tensor(), right["transformer.h.1"].tensor())


# ------------------------------------------------------------------ resume and errors


@pytest.mark.parametrize("change, setting", [(["--context", "8", "--pack"], "context"),
                                             (["--context", "16"], "pack")])
def test_resume_with_other_rows_is_refused_naming_the_setting(tmp_path, capsys, change, setting):
    args = ["--model", MODEL, "--data", "fake-text:12", "--layers", "transformer.h.1", "--reduce", "tokens",
            "--out", str(tmp_path)]
    assert cli(*args, "--context", "16", "--pack") == 0
    capsys.readouterr()
    assert cli(*args, *change) == 1
    error = capsys.readouterr().err
    assert f"data_spec.{setting}=" in error and "--context, --pack/--padding" in error
    assert cli(*args, "--context", "16", "--pack") == 0  # the same arguments: resumed (done)


def test_summary_reports_tokens_and_the_estimate(tmp_path, capsys):
    assert cli("--model", MODEL, "--data", "fake-text:8", "--context", "16", "--pack", "--layers",
               "transformer.h.1", "--reduce", "mean", "--tokens", "--out", str(tmp_path)) == 0
    captured_io = capsys.readouterr()
    assert "tokens/s" in captured_io.out and "(estimated " in captured_io.out
    assert "to write (estimated from the first batch)" in captured_io.err
    store = fastcap.open(tmp_path)
    assert store["transformer.h.1"].shape == (len(store.indices), 32)  # a masked mean per row


def test_stop_early_and_check_space_flags(tmp_path, capsys, monkeypatch):
    from test_extract import _files

    from fastcap.store import _writer

    args = ["--model", MODEL, "--data", "fake-text:12", "--context", "16", "--pack", "--layers",
            "transformer.h.0", "--reduce", "tokens"]
    assert cli(*args, "--out", str(tmp_path / "early")) == 0
    assert cli(*args, "--no-stop-early", "--out", str(tmp_path / "full")) == 0
    assert _files(tmp_path / "early") == _files(tmp_path / "full")  # early exit changes no byte
    monkeypatch.setattr(_writer, "free_bytes", lambda path: 100)
    capsys.readouterr()
    assert cli(*args, "--out", str(tmp_path / "small")) == 1
    assert re.search(r"has 100 B free, but rank 0 is about to write about [\d.]+ KiB .*--no-check-space",
                     capsys.readouterr().err)
    assert cli(*args, "--no-check-space", "--out", str(tmp_path / "small")) == 0
    assert _files(tmp_path / "small") == _files(tmp_path / "early")


def test_keys_and_per_key_reduce_modes_in_one_run(tmp_path, capsys):
    model = random_model()
    args = ["--model", MODEL, "--data", "fake-text:12", "--context", "16", "--pack", "--skip-ids", "bos"]
    assert cli(*args, "--layers", "transformer.h.0,pooled=transformer.h.1,transformer.h.1",
               "--reduce", "tokens,pooled=mean", "--out", str(tmp_path / "both")) == 0
    store = fastcap.open(tmp_path / "both")
    assert list(store) == ["transformer.h.0", "pooled", "transformer.h.1"]
    dataset = make_text_dataset("fake-text:12", context=16, pack=True, config=model.config)
    tokens = fastcap.Tokens(skip_ids=[BOS])
    result, index = captured(model, DataLoader(dataset, batch_size=4),
                             {"transformer.h.0": "transformer.h.0", "pooled": "transformer.h.1",
                              "transformer.h.1": "transformer.h.1"},
                             {"transformer.h.0": "tokens", "pooled": "mean", "transformer.h.1": "tokens"}, tokens)
    assert_rows_equal(store, result, index)
    capsys.readouterr()
    assert cli(*args, "--layers", "transformer.h.0", "--reduce", "tokens,nope=mean", "--out", str(tmp_path / "x")) == 1
    assert "--reduce nope=...: 'nope' is not a captured key; the keys: ['transformer.h.0']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(*args, "--layers", "transformer.h.0", "--reduce", "tokens,mean", "--out", str(tmp_path / "x"))
    assert "names two default modes" in capsys.readouterr().err


def _image_flags(tmp_path):
    return ["--model", "resnet18", "--data", "fake:8", "--layers", "layer4", "--out", str(tmp_path)]


@pytest.mark.parametrize("args, message", [
    (["--model", "hf-random:gpt3", "--data", "fake-text:4", "--context", "8"],
     r"no model type 'gpt3'; did you mean \[.*'gpt2'"),
    (["--model", "hf-random:gpt2?n_lyer=2", "--data", "fake-text:4", "--context", "8"],
     r"GPT2Config has no setting 'n_lyer'; did you mean \['n_layer'"),
    (["--model", "hf-random:gpt2?n_layer", "--data", "fake-text:4", "--context", "8"], r"'n_layer' is not key=value"),
    (["--model", MODEL, "--data", "CORPUS", "--context", "8"], r"is text: pass --tokenizer DIR"),
    (["--model", MODEL + "&bos_token_id=none&eos_token_id=none", "--data", "fake-text:4", "--context", "8",
      "--pack"], r"--pack needs a BOS id"),
    (["--model", MODEL, "--data", "fake-text:4", "--context", "0"], r"--context must be an int >= 1, got 0"),
    (["--model", MODEL, "--data", "fake-text:4", "--context", "1", "--pack"], r"--context must be an int >= 2 with --pack"),
    (["--model", MODEL, "--data", "fake-text:4"], r"is text: pass --context T"),
    (["--model", MODEL, "--data", "fake-text:4", "--context", "65"], r"--context 65 is longer than the model's 64"),
    (["--model", MODEL, "--data", "fake-text:4", "--context", "8", "--skip-ids", "bos,cls"],
     r"--skip-ids: unknown token name 'cls'"),
    (["--model", MODEL, "--data", "fake-text:4", "--context", "8", "--skip-ids", "pad"],
     r"--skip-ids pad: neither the tokenizer nor the model config has a pad_token_id"),
    (["--model", "resnet18", "--model-dtype", "bf16", "--data", "fake:4"], r"--model-dtype bf16 is for hf:"),
    (["--model", "resnet18", "--data", "fake:4", "--pack", "--reduce", "last"],
     r"--pack, --reduce last: for text data, but --data 'fake:4' is images"),
    (["--model", MODEL, "--data", "fake-text:4", "--context", "8", "--layers", "h.1"],
     r"unknown layer 'h\.1' in GPT2LMHeadModel: did you mean 'transformer\.h\.1'\?"),
], ids=["hf-name", "hf-key", "hf-pair", "no-tokenizer", "pack-no-bos", "context-0", "context-1-pack",
        "no-context", "context-too-long", "skip-name", "skip-pad", "dtype-images", "text-flags-images",
        "layer-parents"])
def test_errors_name_the_argument(tmp_path, capsys, args, message):
    args = [str(write_jsonl(tmp_path / "c.jsonl")) if arg == "CORPUS" else arg for arg in args]
    assert cli(*args, "--layers", "transformer.h.1", "--out", str(tmp_path / "out")) == 1
    error = capsys.readouterr().err
    assert error.startswith("fastcap extract: error: "), error
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()  # refused before out is touched


@pytest.mark.parametrize("args, message", [
    (["--reduce", "topk"], r"--reduce topk needs --k, the channels to keep \(e\.g\. --k 8\)$"),
    (["--layers", "pooled=layer3", "--reduce", "mean,pooled=topk"], r"--reduce pooled=topk needs --k"),
    (["--k", "3"], r"--k 3 is given, but no --reduce mode is topk$"),
    (["--reduce", "topk", "--k", "0"], r"--k must be >= 1, got 0$"),
], ids=["topk-no-k", "key-topk-no-k", "k-no-topk", "k-0"])
def test_k_errors_name_the_flags(tmp_path, capsys, args, message):
    assert cli("--model", "resnet18", "--data", "fake:4", "--layers", "layer4", *args, "--out", str(tmp_path)) == 1
    error = capsys.readouterr().err.strip()
    assert re.search(message, error), error
    assert not tmp_path.joinpath("manifest.json").exists()


def test_hf_models_and_tokenizers_never_trust_remote_code(tmp_path, monkeypatch):
    """Every Hugging Face entry point fastcap calls is told trust_remote_code=False: a model
    directory's own code never runs, and never prompts."""
    from fastcap.text import load_tokenizer

    calls = []

    def recording(owner, name):
        original = getattr(owner, name)

        def call(*args, **kwargs):
            calls.append((f"{owner.__name__}.{name}", kwargs.get("trust_remote_code")))
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, call)

    for owner in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoModel,
                  transformers.AutoTokenizer):
        recording(owner, "from_pretrained")
    for owner in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        recording(owner, "from_config")
    model_dir = tmp_path / "lm"
    random_model().save_pretrained(model_dir)
    save_tokenizer(model_dir)
    load_model(f"hf:{model_dir}")
    load_model(MODEL)
    load_tokenizer(str(model_dir))
    assert {name for name, _ in calls} == {"AutoConfig.from_pretrained", "AutoModelForCausalLM.from_pretrained",
                                           "AutoModelForCausalLM.from_config", "AutoTokenizer.from_pretrained"}
    assert all(trust is False for _, trust in calls), calls

    # A directory whose config asks for its own code: refused, and its code never runs.
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my-own", "auto_map": {
        "AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyModel"}}))
    ran = tmp_path / "ran"
    for module in ("configuration_mine", "modeling_mine"):
        (custom / f"{module}.py").write_text(f"import os\nos.mkdir({str(ran)!r})\n")
    with pytest.raises(ValueError, match=r"needs code of its own from .* \(its config's auto_map\), and fastcap "
                                         r"never runs a model directory's code"):
        load_model(f"hf:{custom}")
    assert not ran.exists()


def test_model_dtype_and_help(capsys):
    torch.manual_seed(0)
    assert next(load_model(MODEL, dtype="bf16").parameters()).dtype == torch.bfloat16
    assert next(load_model(MODEL).parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"--model-dtype must be one of \['bf16', 'fp16', 'fp32'\], got 'int8'"):
        load_model(MODEL, dtype="int8")
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model-dtype", "--tokenizer", "--text-field", "--encoding", "--context", "--pack", "--padding",
                 "--tokens", "--skip-ids", "--start", "--no-stop-early", "--no-check-space", "hf-random:",
                 "fake-text:N", "one document per", "non-empty line",
                 "--data fake-text:256 --context 128 --pack"):
        assert flag in text, flag


@pytest.mark.parametrize("value", [2 ** 32 + 7, 2 ** 31, -1, -2 ** 32 + 5],
                         ids=["wraps-to-7", "int32-max-plus-1", "negative", "negative-wraps-to-5"])
@pytest.mark.parametrize("vocab", [97, None], ids=["vocab", "no-vocab"])
def test_npy_ids_out_of_range_are_refused_before_any_cast(tmp_path, value, vocab):
    ids = np.arange(4, 24, dtype=np.int64).reshape(2, 10)
    ids[1, 3] = value
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, bos_token_id=BOS) if vocab else None
    message = re.escape(f"--data {str(path)!r} holds the token id {value} (document 1, token 3)")
    if vocab:
        message += re.escape(", but the model's vocabulary has 97 ids (0..96)")
    with pytest.raises(ValueError, match=message):
        make_text_dataset(str(path), context=16, config=config)


def _latin1_corpus(tmp_path, suffix: str):
    """Three documents, the second with an é written in latin-1."""
    path = tmp_path / f"latin1{suffix}"
    lines = ["the cat", "the café", "dog ran"]
    if suffix == ".jsonl":
        lines = ['{"text": "%s"}' % line for line in lines]
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_text_that_is_not_utf8_names_file_and_line_and_encoding_reads_it(tmp_path, capsys, suffix):
    tokenizer_dir = save_tokenizer(tmp_path / "tok")
    corpus = _latin1_corpus(tmp_path, suffix)
    with pytest.raises(ValueError, match=re.escape(f"--data {str(corpus)!r} line 2: not utf-8 (byte 0xe9 ")
                       + r".*--encoding latin-1"):
        make_text_dataset(str(corpus), context=8, tokenizer=tokenizer_dir)
    data = make_text_dataset(str(corpus), context=8, tokenizer=tokenizer_dir, encoding="latin-1")
    assert len(data) == 3 and data.extract_spec["encoding"] == "iso8859-1"  # the codec's own name
    utf8 = write_jsonl(tmp_path / "utf8.jsonl")
    # UTF-8 under any name records no encoding: stores made before the option resume unchanged.
    assert "encoding" not in make_text_dataset(utf8, context=8, tokenizer=tokenizer_dir).extract_spec
    assert (make_text_dataset(utf8, context=8, tokenizer=tokenizer_dir, encoding="UTF8").extract_spec
            == make_text_dataset(utf8, context=8, tokenizer=tokenizer_dir).extract_spec)

    args = ["--model", MODEL, "--data", str(corpus), "--tokenizer", tokenizer_dir, "--context", "8",
            "--layers", "transformer.h.0", "--reduce", "tokens"]
    assert cli(*args, "--out", str(tmp_path / "acts")) == 1
    assert f"line 2: not utf-8" in capsys.readouterr().err
    assert cli(*args, "--encoding", "latin-1", "--out", str(tmp_path / "acts")) == 0
    store = fastcap.open(tmp_path / "acts")
    assert store.manifest["args"]["data_spec"]["encoding"] == "iso8859-1" and len(store.indices) == 3
    assert cli(*args, "--encoding", "latin-1", "--out", str(tmp_path / "acts")) == 0  # resumed (done)


def test_the_estimate_is_printed_before_the_progress_bar(tmp_path, capsys):
    """On its own line even in a log, where tqdm's carriage returns do not erase a drawn bar."""
    assert cli("--model", MODEL, "--data", "fake-text:24", "--context", "16", "--pack", "--layers",
               "transformer.h.1", "--reduce", "tokens", "--progress", "--out", str(tmp_path)) == 0
    error = capsys.readouterr().err
    line, = [line for line in error.split("\n") if "to write" in line]
    assert re.fullmatch(r"\r*fastcap extract: about [\d.]+ KiB to write \(estimated from the first batch\), "
                        r"[\d.]+ [KMGT]iB free", line), repr(line)
    start = error.index(line)
    assert "%|" not in error[:start] and "extract: 100%|" in error[start:]  # the bar only after it


def _growing_corpus(path) -> str:
    """24 documents of 1, 1, 2, 2, ... 12 words: the first batch is far shorter than the rest."""
    words = [" ".join(WORDS[:1 + i // 2]) for i in range(24)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in words))
    return str(path)


@pytest.mark.parametrize("kind", ["padded", "padded-skip", "packed", "images"])
def test_the_estimate_is_close_to_the_written_size(tmp_path, kind):
    """The disk check relies on it: within 10% of the .npy bytes on disk, padded rows included."""
    from test_extract import worker

    from fastcap.extract import extract_with_stats

    if kind == "images":
        model, layers, reduce, tokens = worker.tiny_model(), worker.LAYERS, worker.REDUCE, None
        data = worker.Images(40)
    else:
        model, tokens = random_model(), fastcap.Tokens()
        layers, reduce = {"rows": "transformer.h.1", "pool": "transformer.h.1"}, {"rows": "tokens", "pool": "mean"}
        if kind.startswith("padded"):  # the first batch holds 6 tokens of the corpus's 156
            data = make_text_dataset(_growing_corpus(tmp_path / "c.jsonl"), context=16,
                                     tokenizer=save_tokenizer(tmp_path / "tok"), config=model.config)
            if kind == "padded-skip":  # one per document, as a BOS: 4 of the first 6 tokens, 24 of 156
                tokens = fastcap.Tokens(skip_ids=[4 + WORDS.index("the")])
        else:
            data = make_text_dataset("fake-text:12", context=16, pack=True, config=model.config)
            tokens = fastcap.Tokens(skip_ids=[BOS])  # BOS starts each row and separates documents
    _, stats = extract_with_stats(model, DataLoader(data, batch_size=4), layers, reduce, out=tmp_path / "out",
                                  k=None, channel_dim=-1 if tokens else 1, dtype=None, select=None, shard_size=8,
                                  overwrite=False, progress=False, forward=None, depth=4, tokens=tokens)
    written = sum(path.stat().st_size for path in (tmp_path / "out").rglob("*.npy"))
    assert 0.97 <= stats["estimated_bytes"] / written <= 1.1, (stats["estimated_bytes"], written)
