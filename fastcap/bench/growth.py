"""The memory-growth measurement: memory after 1, 10, 100 ... batches per method, each case in a
fresh Python process so that one method's freed memory cannot hide the next one's growth."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import subprocess
import sys
from typing import Callable, Mapping, Sequence

import torch

from fastcap.bench.measure import available_host_bytes, device_allocated, format_error, rss_bytes
from fastcap.bench.methods import CaptureSpec, Fastcap, Method, device_tensor_bytes, make_method, sync, tensor_bytes
from fastcap.bench.recipes import build_input, build_model


def memory_growth_one(
    model: torch.nn.Module,
    x: torch.Tensor,
    spec: CaptureSpec,
    method_name: str,
    policy: str,
    checkpoints: Sequence[int] = (1, 10, 100),
    limit_fraction: float = 0.5,
) -> dict:
    """Memory after each checkpoint's number of batches for one method, in this process.

    ``policy="kept"`` keeps every batch's results referenced (the pure-Python hooks' list, or
    ``cap.result()`` for fastcap, which is called once at the end); ``policy="drain"`` drops
    each batch's results once handed out (fastcap: ``for step in cap.drain(): pass``).
    Each checkpoint records ``batches``, ``rss_growth_bytes`` (host RSS over the RSS before the
    method was opened), ``device_bytes`` (CUDA memory allocated over the same baseline),
    ``held_bytes`` (bytes of results referenced) and ``pinned_bytes``. A run whose kept results
    would pass ``limit_fraction`` of the memory available at the start stops early and says so
    in ``stopped``.
    """
    device = x.device
    checkpoints = sorted(set(int(c) for c in checkpoints))
    kept: list[dict] = []
    rows = []
    stopped = None
    with torch.inference_mode():
        model(x)
        sync(device)
        gc.collect()
        host_limit = available_host_bytes() * limit_fraction
        device_limit = torch.cuda.mem_get_info(device)[0] * limit_fraction if device.type == "cuda" else math.inf
        rss0 = rss_bytes()
        dev0 = device_allocated(device)
        method = make_method(method_name, spec, policy)
        method.open(model)
        try:
            done = 0
            host_per_batch = device_per_batch = 0
            for target in checkpoints:
                while done < target:
                    if policy == "kept" and done and (
                        (done + 1) * host_per_batch > host_limit or (done + 1) * device_per_batch > device_limit
                    ):
                        stopped = (f"stopped after {done} batches: kept results would pass "
                                   f"{limit_fraction:.0%} of the free memory")
                        break
                    method.forward(x)
                    got = method.collect()
                    if done == 0:
                        got += method.finish()
                        held = _held_bytes(method, got)
                        device_per_batch = device_tensor_bytes(got)
                        host_per_batch = held - device_per_batch
                    if policy == "kept":
                        kept.extend(got)
                    del got
                    done += 1
                got = method.finish()
                if policy == "kept":
                    kept.extend(got)
                del got
                gc.collect()
                dev = device_allocated(device)
                rows.append(
                    {
                        "batches": done,
                        "rss_growth_bytes": rss_bytes() - rss0,
                        "device_bytes": None if dev is None else dev - dev0,
                        "held_bytes": _held_bytes(method, kept),
                        "pinned_bytes": method.pinned_bytes() + tensor_bytes(kept, pinned_only=True),
                        "buffer_bytes": method.buffer_bytes(),
                    }
                )
                if stopped:
                    break
            if isinstance(method, Fastcap) and policy == "kept":
                result = method.result()
                rows[-1]["result_bytes"] = tensor_bytes(list(result.values()))
                del result
        finally:
            method.close()
    return {"method": method_name, "policy": policy, "rows": rows, "stopped": stopped}


#: The (method, policy) pairs the memory-growth measurement runs by default.
GROWTH_CASES = (
    ("clone", "kept"),
    ("torch_reduce", "kept"),
    ("nonblocking", "kept"),
    ("fx", "kept"),
    ("fastcap", "drain"),
    ("fastcap", "thread"),
    ("fastcap", "kept"),
)


def memory_growth(
    recipe: Mapping,
    spec: CaptureSpec,
    cases: Sequence[tuple[str, str]] = GROWTH_CASES,
    checkpoints: Sequence[int] = (1, 10, 100),
    isolate: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """:func:`memory_growth_one` for every ``(method, policy)`` in ``cases``.

    ``recipe`` describes how to build the model and input (see :func:`build_model` and
    :func:`build_input`), so that with ``isolate`` each case runs in a fresh Python process:
    memory freed by one case then cannot hide the growth of the next. A case that fails is
    reported with ``error``.
    """
    log = log or (lambda msg: None)
    results = []
    model = x = None
    if isolate and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()  # leave the children the device memory this process no longer uses
    for method_name, policy in cases:
        log(f"  memory growth: {method_name} ({policy})")
        job = {"recipe": dict(recipe), "spec": dataclasses.asdict(spec), "method": method_name,
               "policy": policy, "checkpoints": list(checkpoints)}
        try:
            if isolate:
                results.append(_run_growth_child(job))
            else:
                if model is None:
                    model = build_model(recipe)
                    x = build_input(recipe)
                results.append(memory_growth_one(model, x, spec, method_name, policy, checkpoints))
        except Exception as exc:
            results.append({"method": method_name, "policy": policy, "rows": [], "error": format_error(exc)})
    return results


def _held_bytes(method: Method, kept: list) -> int:
    """Bytes of captured results referenced: ``kept``, plus what fastcap holds undrained."""
    held = tensor_bytes(kept)
    if isinstance(method, Fastcap) and method.policy == "kept":
        held += int(method.stats().get("bytes_captured", 0) or 0)
    return held


def _run_growth_child(job: dict) -> dict:
    """Run one memory-growth case in a fresh interpreter; return its record."""
    code = "import sys, fastcap.bench.growth as b; sys.exit(b.growth_child())"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True, timeout=1800
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory-growth process exited with {proc.returncode}: {tail[0]}")
    return json.loads(lines[-1])


def growth_child() -> int:
    """Entry point of a memory-growth process: job JSON on stdin, record JSON on stdout."""
    job = json.loads(sys.stdin.read())
    recipe = job["recipe"]
    if recipe.get("threads"):
        torch.set_num_threads(int(recipe["threads"]))
    model = build_model(recipe)
    x = build_input(recipe)
    record = memory_growth_one(
        model, x, CaptureSpec(**job["spec"]), job["method"], job["policy"], job["checkpoints"]
    )
    print(json.dumps(record))
    return 0
