"""Runs fastcap.extract in its own process and holds it in the middle of the run, for the
lock tests of tests/test_robust_extract.py.

    python tests/_slow_extract_worker.py OUT STARTED GO [--samples 16]

The data are _extract_worker.Images (so an in-process run over the same images has the same
arguments). Loading the first item touches the file STARTED, then waits (at most 60 s) for
the file GO to exist: the run holds OUT for as long as the test needs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from _extract_worker import LAYERS, REDUCE, Images, tiny_model

BATCH_SIZE = 4
SHARD_SIZE = 8


class HeldImages(Images):
    def __init__(self, count: int, started: Path, go: Path):
        super().__init__(count)
        self.started, self.go = started, go

    def __getitem__(self, index: int):
        if not self.started.exists():
            self.started.touch()
            deadline = time.monotonic() + 60
            while not self.go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return super().__getitem__(index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("started", type=Path)
    parser.add_argument("go", type=Path)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args(argv)

    import fastcap

    torch.set_num_threads(1)
    loader = DataLoader(HeldImages(args.samples, args.started, args.go), batch_size=BATCH_SIZE)
    fastcap.extract(tiny_model(), loader, LAYERS, REDUCE, out=args.out, shard_size=SHARD_SIZE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
