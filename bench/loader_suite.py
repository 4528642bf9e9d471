"""The loader suite of ``gptfast bench``: ``gptfast.TokenLoader`` against nanoGPT's get_batch.

It runs :mod:`.loader`'s measurement (one random llm.c shard in a temporary directory, random
windows, each figure the time per batch over a run of calls after warm-up) and turns each of
its table rows into two result rows, one per loader.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class LoaderSizes:
    tokens: int     # tokens in the generated shard
    sizes: tuple    # (B, T) pairs
    seconds: float  # time per measurement


FULL = LoaderSizes(tokens=50_000_000, sizes=((16, 1024), (64, 1024), (8, 4096)), seconds=2.0)
QUICK = LoaderSizes(tokens=2_000_000, sizes=((4, 256), (16, 1024)), seconds=0.3)


def missing_reason() -> Optional[str]:
    """None when the loader benchmark and gptfast.TokenLoader import, else why not."""
    for module in ("gptfast.bench.loader", "gptfast.data"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            return f"{module} does not import ({err})"
    return None


def units(device: torch.device, sizes: LoaderSizes) -> list:
    """One (label, run) pair: the shard is written once and every size measured on it."""
    label = f"loader TokenLoader vs nanoGPT get_batch ({len(sizes.sizes)} sizes)"
    return [(label, lambda: measure(device, sizes))]


def measure(device: torch.device, sizes: LoaderSizes) -> list:
    from . import loader

    with tempfile.TemporaryDirectory(prefix="gptfast-bench-loader-") as tmp:
        path = os.path.join(tmp, "train_000000.bin")
        loader.write_random_shard(path, sizes.tokens)
        table = loader.measure(path, list(sizes.sizes), device, sizes.seconds)
    rows = []
    for (batch, seq), measured in zip(sizes.sizes, table):
        for impl, prefix, extra in (
                ("nanogpt-get_batch", "nanoGPT", {}),
                ("gptfast-TokenLoader", "gptfast", {"workers": measured["workers"],
                                                     "speedup": measured["speedup"]})):
            ms = measured[f"{prefix} ms/batch"]
            rows.append({"suite": "loader", "impl": impl, "batch_size": batch,
                         "context_length": seq, "status": "ok", "ms_per_batch": ms,
                         "tokens_per_s": batch * seq / (ms / 1e3),
                         "shard_tokens": sizes.tokens, **extra})
    return rows
