"""Token loading throughput: gptfast.TokenLoader against nanoGPT's get_batch.

    python -m gptfast.bench.loader [--device cpu|cuda] [--tokens 50000000]
                                   [--sizes 16x1024,64x1024,8x4096] [--seconds 2]

Writes one llm.c uint16 shard of random GPT-2 token ids to a temporary directory (in the page
cache afterwards, as a hot training set is), then measures, for each batch size x block size,
batches/s and tokens/s (B*T per batch) of

- nanoGPT: ``get_batch`` from nanoGPT's train.py, reimplemented: np.memmap reopened per call,
  ``torch.randint`` offsets, ``torch.stack`` of per-row int64 copies; on CUDA pinned and
  copied non_blocking;
- gptfast: ``TokenLoader(sampler="random")`` on the same file and device, steady state
  (batches pulled back to back; the workers' prefetch is what makes it fast).

Each figure is the total time of a run of calls over its count (at least --seconds of
calls), after warm-up; on CUDA the run ends with a synchronize, so copies are included.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import numpy as np
import torch

from .common import cpu_name, markdown_table, parse_pairs

DEFAULT_SIZES = "16x1024,64x1024,8x4096"
GPT2_VOCAB = 50257


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return parse_pairs(text, example="16x1024")


def write_random_shard(path: str, tokens: int, seed: int = 0) -> None:
    from ..prepare import write_shard

    ids = np.random.default_rng(seed).integers(0, GPT2_VOCAB, tokens, dtype=np.uint16)
    write_shard(path, ids)


def nanogpt_get_batch(path: str, header_bytes: int, batch_size: int, block_size: int,
                      device: torch.device):
    """nanoGPT's get_batch (train.py), reading past the llm.c header."""
    data = np.memmap(path, dtype=np.uint16, mode="r", offset=header_bytes)
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
    return x, y


def ms_per_call(fn, device: torch.device, seconds: float, warmup: int = 5) -> float:
    """Wall time per call over a run of at least `seconds` (and at least 20 calls)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < 20 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3 / calls


def measure(path: str, sizes, device: torch.device, seconds: float) -> list[dict]:
    from gptfast import TokenLoader

    rows = []
    for batch_size, block_size in sizes:
        tokens = batch_size * block_size
        baseline = ms_per_call(
            lambda: nanogpt_get_batch(path, 1024, batch_size, block_size, device), device, seconds)
        with TokenLoader(path, batch_size, block_size, sampler="random", device=device) as loader:
            ours = ms_per_call(lambda: next(loader), device, seconds, warmup=20)
            workers = loader.num_workers
        rows.append({
            "B x T": f"{batch_size} x {block_size}",
            "nanoGPT ms/batch": baseline,
            "nanoGPT batches/s": 1e3 / baseline,
            "nanoGPT Mtok/s": tokens / baseline / 1e3,
            "gptfast ms/batch": ours,
            "gptfast batches/s": 1e3 / ours,
            "gptfast Mtok/s": tokens / ours / 1e3,
            "speedup": baseline / ours,
            "workers": workers,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.loader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=50_000_000,
                        help="tokens in the generated shard (default 50M = 100 MB)")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                        help=f"batch x block sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    longest = max(block for _, block in args.sizes)
    if args.tokens < 10 * (longest + 1):
        parser.error(f"--tokens {args.tokens} is too small for block size {longest}")

    with tempfile.TemporaryDirectory(prefix="gptfast-bench-loader-") as tmp:
        path = os.path.join(tmp, "train_000000.bin")
        write_random_shard(path, args.tokens)
        rows = measure(path, args.sizes, device, args.seconds)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# token loading, {datetime.date.today()}, {name} ({os.cpu_count()} CPU cores), "
          f"torch {torch.__version__}, shard of {args.tokens / 1e6:.0f}M uint16 tokens\n")
    print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
