"""Runs fastcap.extract in its own process, for tests/test_extract.py.

    python tests/_extract_worker.py OUT [--samples 200] [--kill-at 150] [--report r.json]
    python -m torch.distributed.run --nproc_per_node=2 tests/_extract_worker.py OUT ...

The model and the data are deterministic (seeded), so any two runs capture the same values.
``--kill-at I`` SIGKILLs the process when the dataset is asked for item I: a crash at an
arbitrary point of the run, the writer thread possibly in the middle of a shard.
``--report`` writes {"forwards": batches the model ran, "rank": r} (one file per rank).
``--keep-columns`` keeps a label per sample (images: the (image, label) batches' label = the index
times 3; text: a "label" field of each item, the index times 3, and an "id" string).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, Dataset

LAYERS = ["0", "3"]
REDUCE = {"0": "full", "3": "mean"}


def tiny_model() -> torch.nn.Module:
    """A small conv net with the same weights in every process (also a --model factory)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()
    torch.random.set_rng_state(generator_state)
    return model


class _Seeded(Dataset):
    """``count`` items, item i drawn from a generator seeded with i; asking for item
    ``kill_at`` SIGKILLs the process."""

    def __init__(self, count: int, kill_at: int | None = None, columns: bool = False):
        self.count = count
        self.kill_at = kill_at
        self.columns = columns

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if index == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.item(torch.Generator().manual_seed(index), index)


class Images(_Seeded):
    """Images of 3x8x8, labelled 3 * index."""

    def item(self, generator, index):
        return torch.randn(3, 8, 8, generator=generator), 3 * index


class TinyLM(torch.nn.Module):
    """[N, T] ids -> [N, T, 16] hidden states; attention_mask is a forward argument."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.block = torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None):
        return torch.tanh(self.block(self.embed(input_ids)))


def tiny_lm() -> torch.nn.Module:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(4321)
    model = TinyLM().eval()
    torch.random.set_rng_state(generator_state)
    return model


class Texts(_Seeded):
    """Right-padded token sequences of length 1..8 (T = 8); id 1 (a BOS, skipped by tokens())
    starts each."""

    def item(self, generator, index):
        length = int(torch.randint(1, 9, (1,), generator=generator))
        ids = torch.zeros(8, dtype=torch.int64)
        ids[:length] = torch.randint(2, 50, (length,), generator=generator)
        ids[0] = 1
        mask = (torch.arange(8) < length).to(torch.int64)
        item = {"input_ids": ids, "attention_mask": mask}
        if self.columns:
            item |= {"label": 3 * index, "id": f"text-{index}"}
        return item


TOKEN_LAYERS = {"rows": "block", "pool": "block"}
TOKEN_REDUCE = {"rows": "tokens", "pool": "mean"}


def tokens():
    import fastcap

    return fastcap.Tokens(skip_ids=[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--report")
    parser.add_argument("--tokens", action="store_true", help="a tiny language model, tokens=")
    parser.add_argument("--keep-columns", action="store_true", help="keep the label (and the id of texts)")
    args = parser.parse_args(argv)

    import fastcap

    torch.set_num_threads(1)
    model = tiny_lm() if args.tokens else tiny_model()
    forwards = []
    model.register_forward_pre_hook(lambda module, inputs: forwards.append(1))
    data = Texts if args.tokens else Images
    loader = DataLoader(data(args.samples, args.kill_at, args.keep_columns), batch_size=args.batch_size)
    columns = (["label", "id"] if args.tokens else "label") if args.keep_columns else None
    if args.tokens:
        fastcap.extract(model, loader, TOKEN_LAYERS, TOKEN_REDUCE, out=args.out, shard_size=args.shard_size,
                        tokens=tokens(), keep_columns=columns)
    else:
        fastcap.extract(model, loader, LAYERS, REDUCE, out=args.out, shard_size=args.shard_size,
                        keep_columns=columns)
    if args.report:
        rank = int(os.environ.get("RANK", "0"))
        with open(f"{args.report}.{rank}", "w") as file:
            json.dump({"forwards": len(forwards), "rank": rank}, file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
