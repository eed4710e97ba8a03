"""Text data for language models (``fastcap extract --data ... --context T``): a corpus read and
tokenized up front into a map-style Dataset of fixed-length rows, ready for extract().

Corpus specs (``--data``):
    ``corpus.jsonl``        one document per line: the string in field ``text_field`` ("text")
    ``corpus.txt``          one document per non-empty line
                            (.jsonl and .txt are read as UTF-8 unless ``encoding`` says otherwise)
    ``path/to/folder``      the .txt and .jsonl files directly in it, in sorted name order
    ``ids.npy``             token ids: 1-D is one document, 2-D ``[N, L]`` is N documents
    ``path/to/dataset``     a Hugging Face dataset written by ``Dataset.save_to_disk`` (or a
                            ``datasets.Dataset`` in Python), one document per row: the string
                            in column ``text_field``, or the token ids in column ``ids_field``
                            (by default ``input_ids`` when the dataset has it, else ``text``)
    ``fake-text:N``         N deterministic random documents of 1..256 tokens (document i drawn
                            from a generator seeded with i; ids in the model's vocabulary,
                            none of its special ids)
Text is tokenized with a Hugging Face tokenizer (``AutoTokenizer`` of a local directory);
ids and fake-text need none.

Rows of ``context`` T tokens, one per item (map-style, so the count is known for resume and
torchrun):
    :class:`PackedText` (``pack=True``): the documents, tokenized without special tokens, joined
        into one stream with BOS between them, ``doc_1 BOS doc_2 BOS ... BOS doc_N``; the stream
        is cut into pieces of T-1 tokens and row r is ``BOS + piece_r``; the incomplete tail is
        dropped. Every row is T real tokens (a piece that begins at a document boundary gives a
        row starting ``BOS BOS``). BOS is the tokenizer's bos_token_id, else the model
        config's, else eos_token_id (as SAELens and sparsify do).
    :class:`PaddedText` (``pack=False``): one document per row, tokenized with the tokenizer's
        own special tokens (e.g. BERT's CLS/SEP), truncated to its first T tokens, padded on the
        ``padding`` side with the pad id (tokenizer's, else config's, else 0);
        ``attention_mask`` marks the real tokens and, with ``position_ids=True``,
        ``position_ids`` = cumsum(mask) - 1 clamped at 0, so that left and right padding give
        the real tokens the same positions (and hidden states).
Items are dicts of int64 ``[T]`` tensors (``input_ids``, ``attention_mask``[, ``position_ids``])
that the default collate stacks; ids are stored as one int32 array. ``dataset.extract_spec``
says which choices made the rows; extract() records it and refuses a resume that differs.
``dataset.token_counts`` holds each row's real tokens: extract() estimates its output from them.
With ``keep_columns`` (padded rows only: a packed row holds pieces of several documents), each
item also holds its document's values of those fields (.jsonl) or columns (datasets), which
``extract(keep_columns=...)`` stores beside the features.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from fastcap._distributed import show_progress

__all__ = ["make_text_dataset", "is_text_spec", "saved_dataset", "load_tokenizer", "special_ids", "SpecialIds",
           "PackedText", "PaddedText", "FAKE_TEXT_MAX_TOKENS"]

FAKE_TEXT_MAX_TOKENS = 256
TEXT_SUFFIXES = (".txt", ".jsonl")
_TOKENIZE_CHUNK = 1024  # documents per tokenizer call: batched (fast) without holding the corpus


def is_text_spec(spec: str) -> bool:
    """Whether ``--data spec`` names text (fake-text:N, .jsonl/.txt/.npy, a folder of .txt/.jsonl
    files) rather than images.

    Example:
        >>> is_text_spec("fake-text:256"), is_text_spec("fake:256")
        (True, False)
    """
    if spec.startswith("fake-text:") or spec.lower().endswith((*TEXT_SUFFIXES, ".npy")):
        return True
    return os.path.isdir(spec) and (saved_dataset(spec) is not None or bool(_text_files(Path(spec))))


def saved_dataset(path) -> str | None:
    """``"dataset"`` when ``path`` is a folder written by ``Dataset.save_to_disk``, ``"dict"`` for
    a ``DatasetDict``'s (one sub-folder per split), else None.

    Example:
        >>> datasets.Dataset.from_dict({"text": ["a b"]}).save_to_disk("corpus/")
        >>> saved_dataset("corpus/")
        'dataset'
    """
    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def import_datasets():
    """The ``datasets`` package, or an ImportError that says how to install it (an optional
    dependency of fastcap: ``pip install datasets``)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("Hugging Face datasets are read and written with the `datasets` package, which "
                          "is not installed: pip install datasets (or pip install 'fastcap[datasets]')") from error
    return datasets


def load_tokenizer(path: str):
    """``transformers.AutoTokenizer`` of a local directory; a clear ValueError otherwise.

    Example:
        >>> tokenizer = load_tokenizer("models/gpt2")
    """
    if not os.path.isdir(path):
        raise ValueError(f"--tokenizer {path!r} is not a directory: pass a local tokenizer directory "
                         "(as written by save_pretrained); nothing is downloaded")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"--tokenizer {path!r}: cannot load a tokenizer: {error}") from error


class SpecialIds(NamedTuple):
    """The special token ids of a tokenizer and model config (None where neither has one)."""

    bos: Optional[int]
    eos: Optional[int]
    pad: Optional[int]

    @property
    def row_bos(self) -> Optional[int]:
        """The BOS that starts packed rows: bos, else eos (GPT-2 style models share one id)."""
        return self.bos if self.bos is not None else self.eos

    def resolve(self, name: str) -> int:
        """The id of ``bos`` (as packing uses it), ``eos`` or ``pad``; ValueError naming it.

        Example:
            >>> SpecialIds(bos=None, eos=2, pad=0).resolve("bos")
            2
        """
        ids = {"bos": self.row_bos, "eos": self.eos, "pad": self.pad}
        if name not in ids:
            raise ValueError(f"--skip-ids: unknown token name {name!r}; use ints or {', '.join(ids)}")
        if ids[name] is None:
            raise ValueError(f"--skip-ids {name}: neither the tokenizer nor the model config has a "
                             f"{name}_token_id; pass the id as an int")
        return ids[name]


def special_ids(tokenizer=None, config=None) -> SpecialIds:
    """Each special id from the tokenizer, else from the model config (its text config for
    multi-modal models).

    Example:
        >>> special_ids(config=transformers.GPT2Config())
        SpecialIds(bos=50256, eos=50256, pad=None)
    """
    found = {}
    for name in SpecialIds._fields:
        value = getattr(tokenizer, f"{name}_token_id", None) if tokenizer is not None else None
        if value is None:
            value = _config_value(config, f"{name}_token_id")
        if isinstance(value, (list, tuple)):  # e.g. Llama 3's several eos ids: the first
            value = value[0] if value else None
        found[name] = None if value is None else int(value)
    return SpecialIds(**found)


def make_text_dataset(spec, *, context: int, pack: bool = False, padding: str = "right",
                      tokenizer=None, text_field: str | None = None, encoding: str = "utf-8", config=None,
                      position_ids: bool = False, progress: bool | None = None, ids_field: str | None = None,
                      keep_columns=None) -> "PackedText | PaddedText":
    """The rows of ``context`` tokens the corpus ``spec`` makes (see the module docstring).

    Args:
        spec: a .jsonl / .txt file, a folder of them, a .npy of ids, ``fake-text:N``, a folder
            written by ``datasets.Dataset.save_to_disk``, or a ``datasets.Dataset``.
        context: T, the tokens per row.
        pack: pack documents into full rows (:class:`PackedText`); else one padded document per
            row (:class:`PaddedText`) on the ``padding`` side ("right" or "left").
        tokenizer: a tokenizer directory (or a loaded tokenizer); needed for text, optional for
            ids (then it only supplies the special ids).
        text_field: the field of a .jsonl record, or the column of a dataset, that holds the
            text (default "text").
        ids_field: the column of a dataset that holds token ids (default: ``input_ids`` when the
            dataset has that column and no ``text_field`` is given); used as they are, as .npy
            ids are.
        keep_columns: names of .jsonl fields or dataset columns to put in each padded row's
            item (one value per document), for ``extract(keep_columns=...)``.
        encoding: the text encoding of .jsonl / .txt files (e.g. "latin-1"); recorded in
            ``extract_spec`` when it is not UTF-8.
        config: the model's config (``model.config``): special ids, and the vocabulary size
            (fake-text's ids; every corpus's ids are checked against it).
        position_ids: add ``position_ids`` to padded rows (when the model's forward takes them).
        progress: a tqdm bar while tokenizing; default: only on a terminal, on rank 0.

    Example:
        >>> data = make_text_dataset("fake-text:256", context=128, pack=True, config=model.config)
        >>> data[0]["input_ids"].shape, data.extract_spec["pack"]
        (torch.Size([128]), True)
        >>> data = make_text_dataset("corpus.jsonl", context=64, padding="left",
        ...                          tokenizer="models/gpt2", position_ids=True)
        >>> ds = datasets.load_from_disk("tokenized/")             # an input_ids column
        >>> data = make_text_dataset(ds, context=128, pack=True, config=model.config)
    """
    _check_choices(context, pack, padding)
    columns = _check_columns(keep_columns, pack)
    encoding = _encoding_name(encoding)
    positions = _config_value(config, "max_position_embeddings")
    if isinstance(positions, int) and context > positions:
        raise ValueError(f"--context {context} is longer than the model's {positions} positions "
                         "(config.max_position_embeddings)")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    special = special_ids(tokenizer, config)
    bos = special.row_bos
    if pack and bos is None:
        raise ValueError(
            "--pack needs a BOS id to start each row and separate documents, but neither the tokenizer "
            "nor the model config has a bos_token_id or eos_token_id; pass a --tokenizer that has one, "
            "or use padding (--padding right)")
    vocab = _config_value(config, "vocab_size")
    corpus = _read_corpus(spec, tokenizer, text_field, encoding, add_special_tokens=not pack,
                          max_tokens=None if pack else context, vocab=vocab, special=special,
                          show=show_progress(progress), ids_field=ids_field, columns=columns)
    pad = None if pack else (special.pad if special.pad is not None else 0)
    # The choices first, then what they made: a resume that differs is told the choice first.
    # Text files' encoding only when not UTF-8: stores made before it was a choice resume as they were.
    read_as = {"encoding": encoding} if corpus.source["encoding"] and encoding != "utf-8" else {}
    spec = {"corpus": corpus.source["corpus"], "path": corpus.source["path"],
            "text_field": corpus.source["text_field"], **corpus.source.get("dataset", {}), **read_as,
            "tokenizer": _tokenizer_path(tokenizer),
            "context": context, "pack": pack, "padding": None if pack else padding,
            "bos_id": bos if pack else None, "pad_id": pad, "position_ids": bool(position_ids and not pack),
            **corpus.facts}
    if pack:
        return PackedText(corpus, context, bos, special, spec)
    return PaddedText(corpus, context, padding, pad, position_ids, special, spec)


class PackedText(Dataset):
    """Documents packed into rows of exactly ``context`` tokens, each starting with BOS (see the
    module docstring for the exact definition). Made by :func:`make_text_dataset`.

    Example:
        >>> data = make_text_dataset("fake-text:64", context=32, pack=True, config=model.config)
        >>> int(data[3]["input_ids"][0]) == data.bos_id, bool(data[3]["attention_mask"].all())
        (True, True)
    """

    def __init__(self, corpus: "_Corpus", context: int, bos: int, special: SpecialIds, spec: dict):
        # doc_1 BOS doc_2 BOS ... BOS doc_N: a BOS before the start of every document but the first
        self._stream = np.insert(corpus.ids, corpus.offsets[1:-1], np.int32(bos))
        self.context, self.bos_id, self.special_ids = context, bos, special
        self._rows = len(self._stream) // (context - 1)
        if self._rows == 0:
            raise ValueError(
                f"--data {spec['path'] or spec['corpus']!r}: its {corpus.documents} document(s) hold "
                f"{len(self._stream)} tokens with the separators, fewer than the {context - 1} one "
                f"packed row of --context {context} needs; lower --context or add documents")
        self._spec = {**spec, "rows": self._rows}

    @property
    def extract_spec(self) -> dict:
        """The choices that determine the rows (JSON-able), recorded by extract()."""
        return dict(self._spec)

    @property
    def token_counts(self) -> np.ndarray:
        """The real tokens of each row (int64 ``[len]``): all ``context`` of them."""
        return np.full(self._rows, self.context, dtype=np.int64)

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._rows:
            raise IndexError(f"row {index} out of range for {self._rows} packed rows")
        step = self.context - 1
        ids = np.empty(self.context, dtype=np.int64)
        ids[0] = self.bos_id
        ids[1:] = self._stream[index * step:(index + 1) * step]
        return {"input_ids": torch.from_numpy(ids),
                "attention_mask": torch.ones(self.context, dtype=torch.int64)}


class PaddedText(Dataset):
    """One document per row: truncated to ``context``, padded on the ``padding`` side, with its
    ``attention_mask`` (and ``position_ids``). Made by :func:`make_text_dataset`.

    Example:
        >>> data = make_text_dataset("corpus.txt", context=16, padding="left", tokenizer="tok/",
        ...                          position_ids=True)
        >>> sorted(data[0])
        ['attention_mask', 'input_ids', 'position_ids']
    """

    def __init__(self, corpus: "_Corpus", context: int, padding: str, pad: int, position_ids: bool,
                 special: SpecialIds, spec: dict):
        self._corpus = corpus
        self.columns = corpus.columns  # {name: one value per document}, with keep_columns
        self.context, self.padding, self.pad_id, self.special_ids = context, padding, pad, special
        self.position_ids = position_ids
        self._spec = {**spec, "rows": corpus.documents}

    @property
    def extract_spec(self) -> dict:
        """The choices that determine the rows (JSON-able), recorded by extract()."""
        return dict(self._spec)

    @property
    def token_counts(self) -> np.ndarray:
        """The real tokens of each row (int64 ``[len]``): its document's, truncated to ``context``."""
        return np.diff(self._corpus.offsets)

    def __len__(self) -> int:
        return self._corpus.documents

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} documents")
        doc = self._corpus.document(index)  # already truncated to context
        ids = np.full(self.context, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.context, dtype=np.int64)
        where = slice(0, len(doc)) if self.padding == "right" else slice(self.context - len(doc), self.context)
        ids[where], mask[where] = doc, 1
        item = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.position_ids:
            item["position_ids"] = (item["attention_mask"].cumsum(0) - 1).clamp_(min=0)
        for name, values in self.columns.items():  # strings stay str: the default collate lists them
            item[name] = str(values[index]) if values.dtype.kind == "U" else torch.as_tensor(values[index])
        return item


# --------------------------------------------------------------------------------------------
# Reading a corpus into one int32 array of ids plus document offsets
# --------------------------------------------------------------------------------------------


class _Corpus:
    """Documents as one int32 array and offsets (document i is ``ids[offsets[i]:offsets[i+1]]``)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, source: dict, columns: dict | None = None):
        self.ids, self.offsets = ids, offsets
        self.columns = columns or {}
        digest = hashlib.sha256(self.ids.tobytes())
        digest.update(self.offsets.tobytes())
        self.source = source  # corpus, path, text_field, encoding, vocab_size
        self.facts = {"vocab_size": source["vocab_size"], "documents": self.documents,
                      "tokens": int(len(self.ids)), "ids_digest": digest.hexdigest()[:16]}

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def _read_corpus(spec, tokenizer, text_field: str | None, encoding: str, add_special_tokens: bool,
                 max_tokens: int | None, vocab: int | None, special: SpecialIds, show: bool,
                 ids_field: str | None = None, columns: list | None = None) -> _Corpus:
    record = {"corpus": None, "path": None, "text_field": None, "encoding": None, "vocab_size": vocab}
    columns = columns or []
    values = {}
    if not isinstance(spec, str) or (os.path.isdir(spec) and saved_dataset(spec)):
        dataset, where = _open_dataset(spec)
        field, kind = _dataset_field(dataset, where, text_field, ids_field)
        if kind == "text" and tokenizer is None:
            raise ValueError(f"--data {where!r}: column {field!r} is text: pass --tokenizer DIR (a local "
                             "tokenizer directory) to tokenize it, or --ids-field for a column of token ids")
        record.update(corpus="datasets", path=os.path.abspath(spec) if isinstance(spec, str) else None,
                      text_field=field if kind == "text" else None,
                      dataset={"ids_field": field if kind == "ids" else None, "fingerprint": dataset._fingerprint})
        pieces = _dataset_documents(dataset, field, kind, tokenizer, add_special_tokens, show)
        values = {name: _dataset_column(dataset, where, name) for name in columns}
        spec = where
    elif ids_field is not None:
        raise ValueError(f"--ids-field {ids_field!r} names a column of a Hugging Face dataset, but --data "
                         f"{spec!r} is not one (a folder written by Dataset.save_to_disk)")
    elif spec.startswith("fake-text:") or spec.lower().endswith(".npy"):
        if columns:
            raise ValueError(f"--keep-columns {','.join(columns)}: --data {spec!r} holds only token ids, no "
                             "columns to keep (a .jsonl file or a datasets folder has them)")
        if spec.startswith("fake-text:"):
            count = spec.split(":", 1)[1]
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"--data {spec!r}: expected fake-text:N with N a positive integer")
            if vocab is None:
                vocab = len(tokenizer) if tokenizer is not None else None
            if vocab is None:
                raise ValueError(f"--data {spec!r} draws ids from the model's vocabulary, but the model has "
                                 "no config.vocab_size and there is no --tokenizer to tell it")
            record.update(corpus="fake-text", vocab_size=vocab)
            pieces = _fake_documents(int(count), vocab, special)
        else:
            record.update(corpus="npy", path=os.path.abspath(spec))
            pieces = _npy_documents(spec)
    else:
        text_field = text_field or "text"
        path = Path(spec)
        if path.is_dir():
            files = _text_files(path)
            if not files:
                raise ValueError(f"--data {spec!r}: the folder holds no .txt or .jsonl file")
            kind = "folder"
        elif path.is_file():
            files, kind = [path], path.suffix.lower().lstrip(".")
        else:
            raise ValueError(f"--data {spec!r} does not exist")
        if tokenizer is None:
            raise ValueError(f"--data {spec!r} is text: pass --tokenizer DIR (a local tokenizer directory) "
                             "to tokenize it, or use an hf:DIR model whose directory holds one")
        if columns and any(f.suffix.lower() != ".jsonl" for f in files):
            raise ValueError(f"--keep-columns {','.join(columns)}: the lines of a .txt file have no fields; "
                             f"--data {spec!r} must be .jsonl records to keep their fields")
        record.update(corpus=kind, path=os.path.abspath(spec), encoding=encoding,
                      text_field=text_field if any(f.suffix.lower() == ".jsonl" for f in files) else None)
        pieces, found = _tokenized_documents(files, tokenizer, text_field, encoding, add_special_tokens, show,
                                             columns)
        values = {name: _column_array(name, found[name], spec) for name in columns}
    if max_tokens is not None:
        pieces = [piece[:max_tokens] for piece in pieces]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    _check_ids(spec, ids, offsets, vocab)  # before the cast: int32 would wrap 2**32 + 7 to 7
    return _Corpus(ids.astype(np.int32, copy=False), offsets, record, values)


def _open_dataset(spec):
    """``(datasets.Dataset, its name for messages)`` of a save_to_disk folder or a Dataset."""
    if not isinstance(spec, str):
        datasets = import_datasets()
        if not isinstance(spec, datasets.Dataset):
            raise TypeError(f"make_text_dataset: spec must be a --data string or a datasets.Dataset, got "
                            f"{type(spec).__name__}" + (" (a DatasetDict: pick a split, e.g. spec['train'])"
                                                        if isinstance(spec, datasets.DatasetDict) else ""))
        return spec, f"datasets.Dataset({len(spec)} rows, {spec._fingerprint})"
    if saved_dataset(spec) == "dict":
        splits = sorted(p.name for p in Path(spec).iterdir() if p.is_dir())
        raise ValueError(f"--data {spec!r} holds a DatasetDict (splits {splits}): pass one split's folder, "
                         f"e.g. --data {os.path.join(spec, splits[0] if splits else 'train')}")
    datasets = import_datasets()
    try:
        return datasets.load_from_disk(spec), spec
    except (OSError, ValueError) as error:
        raise ValueError(f"--data {spec!r}: cannot load a datasets folder: {error}") from error


def _dataset_field(dataset, where: str, text_field: str | None, ids_field: str | None) -> tuple[str, str]:
    """The column documents come from, and its kind ("text" or "ids")."""
    names = list(dataset.column_names)
    if text_field is not None and ids_field is not None:
        raise ValueError(f"--text-field {text_field!r} and --ids-field {ids_field!r}: documents come from one "
                         "column; pass one of them")
    field, kind = ((ids_field, "ids") if ids_field is not None else (text_field, "text") if text_field is not None
                   else ("input_ids", "ids") if "input_ids" in names else ("text", "text"))
    if field not in names:
        flag = "--ids-field" if kind == "ids" else "--text-field"
        raise ValueError(f"--data {where!r} has no column {field!r} ({flag}); its columns: {names}. Name the "
                         "column of text with --text-field, or of token ids with --ids-field")
    return field, kind


def _dataset_documents(dataset, field: str, kind: str, tokenizer, add_special_tokens: bool, show: bool) -> list:
    """Each row's document: its ids, or its text tokenized, read a chunk of rows at a time."""
    from tqdm.auto import tqdm

    pieces = []
    rows = dataset.select_columns([field])
    with tqdm(total=len(dataset), desc="tokenize" if kind == "text" else "read ids", unit="doc",
              disable=not show, file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(dataset), _TOKENIZE_CHUNK):
            chunk = rows[start:start + _TOKENIZE_CHUNK][field]
            if kind == "text":
                bad = next((i for i, text in enumerate(chunk) if not isinstance(text, str)), None)
                if bad is not None:
                    raise ValueError(f"--text-field {field!r}: row {start + bad} holds a "
                                     f"{type(chunk[bad]).__name__}, not a string (token ids go in --ids-field)")
                pieces += _tokenize(tokenizer, chunk, add_special_tokens)
            else:
                for i, ids in enumerate(chunk):
                    array = np.asarray(ids)
                    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
                        raise ValueError(f"--ids-field {field!r}: row {start + i} is not a list of integer ids "
                                         f"(shape {array.shape}, {array.dtype})")
                    pieces.append(array.astype(np.int64, copy=False))
            bar.update(len(chunk))
    return pieces


def _dataset_column(dataset, where: str, name: str) -> np.ndarray:
    if name not in dataset.column_names:
        raise ValueError(f"--keep-columns {name!r}: --data {where!r} has no such column; its columns: "
                         f"{list(dataset.column_names)}")
    return _column_array(name, dataset[name], where)


def _column_array(name: str, values: list, where: str) -> np.ndarray:
    """A kept column's values, one per document: numbers or strings, never a mix."""
    if values and all(isinstance(v, str) for v in values):
        return np.asarray(values, dtype=str)
    array = np.asarray(values) if values else np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"--keep-columns {name!r}: the values in --data {where!r} are not all numbers or all "
                         f"strings (e.g. {values[0]!r}); a kept column holds one number or string per document")
    return array


def _check_columns(keep_columns, pack: bool) -> list:
    if keep_columns is None:
        return []
    names = [keep_columns] if isinstance(keep_columns, str) else list(keep_columns)
    if names and pack:
        raise ValueError(f"--keep-columns {','.join(names)} with --pack: a packed row holds pieces of several "
                         "documents, so a document's value has no row; keep columns with padded rows "
                         "(one document per row)")
    return names


def _fake_documents(count: int, vocab: int, special: SpecialIds) -> list:
    allowed = np.setdiff1d(np.arange(vocab, dtype=np.int64), [i for i in special if i is not None])
    pieces = []
    for index in range(count):
        generator = np.random.default_rng(index)
        length = int(generator.integers(1, FAKE_TEXT_MAX_TOKENS + 1))
        pieces.append(allowed[generator.integers(0, len(allowed), length)].astype(np.int32))
    return pieces


def _npy_documents(spec: str) -> list:
    try:
        array = np.load(spec, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ValueError(f"--data {spec!r}: cannot read a .npy array: {error}") from error
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"--data {spec!r} holds {array.dtype} values; token ids must be integers")
    if array.ndim == 1:
        return [np.asarray(array)]
    if array.ndim == 2:
        return list(np.asarray(array))
    raise ValueError(f"--data {spec!r} has shape {array.shape}; expected 1-D (one document) or "
                     "2-D [N, L] (N documents)")


def _text_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def _documents_of(path: Path, text_field: str, encoding: str, columns: list = ()):
    """The documents of one file: non-empty lines of a .txt, the text_field of each .jsonl line;
    each as ``(text, {column: value})``."""
    try:
        yield from _parsed_lines(path, text_field, encoding, columns)
    except UnicodeDecodeError as error:
        raise ValueError(_decode_error(path, encoding, error)) from error


def _decode_error(path: Path, encoding: str, error: UnicodeDecodeError) -> str:
    """Which line does not decode (the file is read in blocks, so the error does not say), and
    how to read it."""
    where = f"not {encoding}"
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as bad:
                byte = bad.object[bad.start]
                where = f"line {number}: not {encoding} (byte 0x{byte:02x} at column {bad.start + 1})"
                break
    return (f"--data {str(path)!r} {where}: {error.reason}; pass the file's encoding with --encoding "
            "(e.g. --encoding latin-1, or cp1252 for Windows text), or convert the file to UTF-8")


def _parsed_lines(path: Path, text_field: str, encoding: str, columns: list = ()):
    jsonl = path.suffix.lower() == ".jsonl"
    with open(path, encoding=encoding) as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            if not jsonl:
                yield line.rstrip("\r\n"), {}
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--data {str(path)!r} line {number}: not JSON: {error}") from error
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"--data {str(path)!r} line {number}: no string field "
                                 f"--text-field {text_field!r} (it has {fields})")
            missing = [name for name in columns if name not in record]
            if missing:
                raise ValueError(f"--data {str(path)!r} line {number}: no field --keep-columns {missing[0]!r} "
                                 f"(it has {sorted(record)})")
            yield text, {name: record[name] for name in columns}


def _tokenized_documents(files: list, tokenizer, text_field: str, encoding: str,
                         add_special_tokens: bool, show: bool, columns: list = ()) -> tuple[list, dict]:
    """Every document's ids, and (``columns``) each named field's value per document."""
    from tqdm.auto import tqdm

    pieces, found = [], {name: [] for name in columns}
    with tqdm(desc="tokenize", unit="doc", disable=not show, file=sys.stderr, dynamic_ncols=True) as bar:
        for path in files:
            chunk = []
            for text, values in _documents_of(path, text_field, encoding, columns):
                for name, value in values.items():
                    found[name].append(value)
                chunk.append(text)
                if len(chunk) == _TOKENIZE_CHUNK:
                    pieces += _tokenize(tokenizer, chunk, add_special_tokens)
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                pieces += _tokenize(tokenizer, chunk, add_special_tokens)
                bar.update(len(chunk))
    return pieces, found


def _tokenize(tokenizer, texts: list, add_special_tokens: bool) -> list:
    # verbose=False: documents longer than the model's max length are expected (packing, truncation)
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False,
                        verbose=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]


def _check_ids(spec: str, ids: np.ndarray, offsets: np.ndarray, vocab: int | None) -> None:
    """Every id in 0..vocab-1 (0..int32 max without a vocabulary); ValueError naming the first
    that is not, and where it is."""
    limit = vocab if vocab is not None else int(np.iinfo(np.int32).max) + 1
    if not len(ids) or (int(ids.min()) >= 0 and int(ids.max()) < limit):
        return
    at = int(np.argmax((ids < 0) | (ids >= limit)))
    document = int(np.searchsorted(offsets, at, side="right")) - 1
    where = (f"--data {spec!r} holds the token id {int(ids[at])} "
             f"(document {document}, token {at - offsets[document]})")
    if vocab is not None:
        raise ValueError(f"{where}, but the model's vocabulary has {vocab} ids (0..{vocab - 1}): is this "
                         "the model's tokenizer?")
    raise ValueError(f"{where}; ids must be >= 0" if ids[at] < 0 else f"{where}, beyond int32")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _encoding_name(encoding: str) -> str:
    """The codec's canonical name ("UTF8" and "utf_8" are "utf-8"); ValueError when unknown."""
    import codecs

    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError) as error:
        raise ValueError(f"--encoding {encoding!r} is not a text encoding Python knows "
                         "(e.g. utf-8, latin-1, cp1252)") from error


def _check_choices(context, pack: bool, padding: str) -> None:
    smallest = 2 if pack else 1  # a packed row is BOS plus at least one token
    if isinstance(context, bool) or not isinstance(context, int) or context < smallest:
        raise ValueError(f"--context must be an int >= {smallest}"
                         f"{' with --pack' if pack else ''}, got {context!r}")
    if padding not in ("right", "left"):
        raise ValueError(f"--padding must be 'right' or 'left', got {padding!r}")


def _config_value(config, name: str):
    if config is None:
        return None
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):  # multi-modal: the text model's
        value = getattr(config.get_text_config(), name, None)
    return value


def _tokenizer_path(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    path = getattr(tokenizer, "name_or_path", None)
    return os.path.abspath(path) if path and os.path.isdir(path) else path
