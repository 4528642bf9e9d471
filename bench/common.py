"""Timing and reporting shared by the benchmarks.

GPU timings are medians of CUDA-event timed runs after warm-up (``triton.testing.do_bench``,
which also flushes L2 between runs); CPU timings are medians of ``time.perf_counter`` runs.
Only numbers from one run of one script are meant to be compared with each other.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_ms(fn, warmup: int = 10, repeats: int = 50, device: str | torch.device = "cuda") -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=repeats, return_mode="median"))
    for _ in range(max(1, warmup // 10)):
        fn()
    samples = []
    for _ in range(max(3, repeats // 10)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_extra_mb(fn, device: str | torch.device = "cuda") -> float | None:
    """Peak CUDA memory allocated by ``fn()`` beyond what was allocated before it, in MB."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows of dicts as a markdown table with the given column order (missing cells: '-')."""
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def parse_pairs(text: str, example: str = "16x1024") -> list[tuple[int, int]]:
    """"16x1024,64x1024" -> [(16, 1024), (64, 1024)]; an argparse type (clear errors)."""
    pairs = []
    for item in text.split(","):
        try:
            first, second = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"size {item!r} is not AxB (e.g. {example})") from None
        if first < 1 or second < 1:
            raise argparse.ArgumentTypeError(f"size {item!r} must be positive")
        pairs.append((first, second))
    return pairs
