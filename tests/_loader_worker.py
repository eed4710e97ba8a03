"""Under torchrun, for tests/test_loader.py: extract the tiny language model over 2 ranks, then
read the store back with store.loader, the rank taken from torch.distributed.

    python -m torch.distributed.run --nproc_per_node=2 tests/_loader_worker.py OUT REPORT

Writes REPORT.<rank>: {"len": len(loader), "drop_last_len": ..., "rows": [[sample, position], ...]}.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import _extract_worker as worker
import fastcap


def main(out: str, report: str) -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # extract uses the script's group and leaves it open
    fastcap.extract(worker.tiny_lm(), DataLoader(worker.Texts(37), batch_size=4), worker.TOKEN_LAYERS,
                    worker.TOKEN_REDUCE, out=out, shard_size=8, tokens=worker.tokens(), progress=False)
    dist.barrier()
    store = fastcap.open(out)
    data = store.loader("rows", batch_size=8, window=16, with_index=True)
    rows = [[int(s), int(p)] for batch in data for s, p in zip(batch["sample"], batch["position"])]
    full = store.loader("rows", batch_size=8, window=16, drop_last=True)
    with open(f"{report}.{dist.get_rank()}", "w") as file:
        json.dump({"len": len(data), "drop_last_len": len(full), "drop_last_batches": sum(1 for _ in full),
                   "rows": rows}, file)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
