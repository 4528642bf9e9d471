"""The measurement core every benchmark suite uses: timing, memory, the run's context, rows
written as they come, markdown tables and the small argument parsers.

:class:`Meter` is the one place that differs between a GPU and a CPU run: on CUDA it times with
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs; warm-up and repeat given in
milliseconds) and reads the caching allocator's peak; on a CPU it times ``time.perf_counter``
runs and has no memory figure (None). Everything around it, the inputs, the closures timed,
the first call (compilation, autotuning) kept out of the timed region, OOM as a result, is the
same code on both, so a CPU run executes every other line a GPU run will.

Around it: :func:`run_context` (device, versions, git commit: what every row of a results
file carries), :class:`ResultsWriter` (jsonl rows flushed as they are made, so an interrupted
run keeps every finished row), :func:`markdown_table` (the one table writer of every report
and per-kernel script) and :data:`DTYPES`.

Only numbers from one run of one script are meant to be compared with each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

# torch.compile's backend for the compiled baselines: inductor, as users run it. A CPU dry run
# sets "aot_eager" (dynamo and AOTAutograd trace the same graphs; inductor's CPU code
# generation is 30+ s per graph on a small CPU and is not what a GPU runs anyway).
COMPILE_BACKEND_ENV = "GPTFAST_BENCH_COMPILE_BACKEND"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_backend() -> str:
    return os.environ.get(COMPILE_BACKEND_ENV, "inductor")


def compiled(fn, **options):
    """``torch.compile(fn)`` with the benchmarks' backend (see :data:`COMPILE_BACKEND_ENV`)."""
    return torch.compile(fn, backend=compile_backend(), **options)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median and spread (20th-80th percentile) of the timed runs, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def percentile(samples: list, q: float) -> float:
    """The q-th percentile (0..100) of samples, linearly interpolated."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclasses.dataclass
class Measured:
    """What :meth:`Meter.measure` saw: status "ok", "oom" or "error" (with the reason)."""

    timing: Optional[Timing] = None
    extra_mb: Optional[float] = None
    first_call_s: Optional[float] = None
    status: str = "ok"
    error: Optional[str] = None

    @property
    def ms(self) -> Optional[float]:
        return None if self.timing is None else self.timing.median_ms


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(||ours - expected|| / ||expected||, max |ours - expected|) in fp32; both infinite when
    ours holds a NaN or an Inf."""
    ours, expected = ours.detach().float(), expected.detach().float()
    if not torch.isfinite(ours).all():
        return float("inf"), float("inf")
    diff = ours - expected
    return (float(diff.norm() / expected.norm().clamp_min(1e-30)),
            float(diff.abs().max()) if diff.numel() else 0.0)


def short_reason(err: BaseException) -> str:
    """"TypeName: first line of the message" (at most 200 characters of it)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def is_out_of_memory(err: BaseException) -> bool:
    # compiled code and some CUDA paths raise a plain RuntimeError/other wrapper saying so
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


class Meter:
    """Timing and peak memory on one device (see the module docstring)."""

    def __init__(self, device: str | torch.device = "cuda", warmup: int = 10, repeats: int = 50):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.warmup, self.repeats = warmup, repeats  # the defaults of time() and measure()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.cuda:
            self.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> Optional[float]:
        """Peak allocated since :meth:`reset_peak`, in GB (None on a CPU)."""
        return torch.cuda.max_memory_allocated(self.device) / 1e9 if self.cuda else None

    def peak_extra_mb(self, fn: Callable[[], object]) -> Optional[float]:
        """Peak memory allocated by ``fn()`` beyond what was allocated before it, in MB."""
        if not self.cuda:
            fn()
            return None
        self.reset_peak()
        before = torch.cuda.memory_allocated(self.device)
        fn()
        self.synchronize()
        return (torch.cuda.max_memory_allocated(self.device) - before) / 1e6

    def time(self, fn: Callable[[], object], warmup: Optional[int] = None,
             repeats: Optional[int] = None) -> Timing:
        """Median and spread of ``fn()``. On CUDA ``warmup``/``repeats`` are milliseconds
        (do_bench's meaning); on a CPU, warmup // 10 calls and max(1, repeats // 10) samples."""
        warmup = self.warmup if warmup is None else warmup
        repeats = self.repeats if repeats is None else repeats
        if self.cuda:
            from triton.testing import do_bench

            median, p20, p80 = do_bench(fn, warmup=warmup, rep=repeats, quantiles=[0.5, 0.2, 0.8])
            return Timing(float(median), float(p20), float(p80))
        for _ in range(warmup // 10):
            fn()
        samples = []
        for _ in range(max(1, repeats // 10)):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return Timing(statistics.median(samples), percentile(samples, 20),
                      percentile(samples, 80))

    def samples_ms(self, fn: Callable[[], object], repeats: int) -> list:
        """One time per call of ``fn()``, ``repeats`` calls back to back (CUDA events on a
        GPU, so the calls queue as in a training loop; perf_counter on a CPU)."""
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
            for begin, end in events:
                begin.record()
                fn()
                end.record()
            self.synchronize()
            return [begin.elapsed_time(end) for begin, end in events]
        samples = []
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        return samples

    def measure(self, fn: Callable[[], object], reset: Callable[[], object] = lambda: None, *,
                memory: bool = False, warmup: Optional[int] = None,
                repeats: Optional[int] = None) -> Measured:
        """The first call (compilation, autotuning) timed on its own, then the peak extra
        memory when asked, then the timed runs (``reset()`` after each: drop gradients...).
        Out of memory and any other failure are results, never raised."""
        try:
            start = time.perf_counter()
            fn()
            self.synchronize()
            first = time.perf_counter() - start
            reset()
            extra = self.peak_extra_mb(fn) if memory else None
            reset()
            timing = self.time(lambda: (fn(), reset()), warmup, repeats)
            return Measured(timing, extra, first)
        except Exception as err:  # KeyboardInterrupt is not an Exception: it ends the run
            return Measured(status="oom" if is_out_of_memory(err) else "error",
                            error=short_reason(err))
        finally:
            reset()
            self.empty_cache()


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


def usage_error(args: argparse.Namespace, err: Exception) -> int:
    """Report a bad ``gptfast bench`` argument: through the CLI's parser when there is one
    (``args.bench_parser``; exits 2, as argparse does), else one line on stderr, returning 2."""
    parser = getattr(args, "bench_parser", None)
    if parser is not None:
        parser.error(str(err))
    print(f"gptfast bench: error: {err}", file=sys.stderr)
    return 2


def parse_ints(text: str) -> list[int]:
    """"64,128" -> [64, 128] (empty items skipped)."""
    return [int(part) for part in text.split(",") if part.strip()]


# ------------------------------------------------------------------------ run context --

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} CPU cores)"


def versions() -> dict:
    import gptfast

    try:
        triton = importlib.metadata.version("triton")  # without importing it
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"torch": torch.__version__, "triton": triton, "gptfast": gptfast.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def git_state() -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the checkout gptfast is imported from, or (None, None) when it is
    not a git checkout (an installed wheel, say)."""
    import gptfast

    package = Path(gptfast.__file__).resolve().parent

    def git(*args):
        out = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        # a wheel installed inside some other repository is not that repository's code
        if top is None or Path(top).resolve() != package.parent:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD"), None if status is None else bool(status)
    except (OSError, subprocess.SubprocessError):
        return None, None


def run_context(device: torch.device, dtype: str, started: datetime.datetime) -> dict:
    commit, dirty = git_state()
    return {"run": started.isoformat(timespec="seconds"), "device": device.type,
            "device_name": device_name(device), "dtype": dtype, "versions": versions(),
            "git_commit": commit, "git_dirty": dirty}


# ------------------------------------------------------------------------------- rows --

class ResultsWriter:
    """Writes each row, with ``context`` merged in, to a jsonl file as soon as it exists
    (flushed, so an interrupted run keeps every finished row) and keeps the rows for the
    reports. ``append``: add to the file (a headline stage's rows) instead of starting it."""

    def __init__(self, path: Path, context: Optional[dict] = None, append: bool = False):
        self.path = Path(path)
        self.context = context or {}
        self.rows: list[dict] = []
        self._file = open(self.path, "a" if append else "w")

    def write(self, row: dict) -> dict:
        row = {**row, **self.context}
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()
        self.rows.append(row)
        return row

    def write_all(self, rows: list) -> None:
        for row in rows:
            self.write(row)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
