"""Running the sm_90 report: the versions line, and :func:`run_report`, which compiles every
case of the chosen kernel sets under a :class:`Recorder`, in this process or in worker
processes (one group of cases each)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

from .cases import KERNEL_SETS, _attention_smem_estimators, _cases, _dtype_name, _group
from .record import TARGET, Record, Recorder, _default_cache_dir
from .report import _cell


def versions() -> dict:
    import torch
    import triton
    from triton.backends.nvidia import compiler as nvidia

    try:
        out = nvidia.get_ptxas_version(TARGET[1])
        ptxas_version = re.findall(r"V(\d+\.\d+\.\d+)", out)[-1]
    except (OSError, IndexError, subprocess.CalledProcessError):
        ptxas_version = "unknown"
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": ptxas_version,
            "python": sys.version.split()[0], "target": f"sm_90 (GPUTarget{TARGET})"}


def run_report(kernels=tuple(KERNEL_SETS), subset: str = "headline", cache: bool = True,
               progress=None, jobs: int = 1, _share=None) -> list[Record]:
    """Compile every case of the chosen kernel sets for sm_90; returns one Record per compiled
    (case, shape, kernel, config), in case order. ``jobs`` > 1 compiles groups of cases in
    that many worker processes."""
    from gptfast.backend import interpreter_enabled
    if interpreter_enabled():
        raise RuntimeError("the sm_90 report compiles real kernels: run it without TRITON_INTERPRET")
    kernels = tuple(kernels)
    if jobs > 1:
        return _run_parallel(kernels, subset, cache, progress, jobs)
    from gptfast.kernels import attention, cross_entropy, layernorm, rotary

    cache_dir = _default_cache_dir() if cache else None
    with Recorder([attention, layernorm, cross_entropy, rotary], cache_dir,
                  _attention_smem_estimators()) as recorder:
        for index, (kernel_set, case, shape, dtype, thunk) in enumerate(_cases(kernels, subset)):
            if _share is not None and _share[0] != index:
                continue
            done = len(recorder.records)
            with recorder.case(case, shape, _dtype_name(dtype)):
                thunk()
            if progress is not None:
                for record in recorder.records[done:]:
                    progress(record)
    return recorder.records


def _worker(kernels, subset, cache, indices):
    records = []
    for index in indices:
        found = run_report(kernels, subset, cache, _print_progress, _share=(index,))
        records.append((index, [dataclasses.asdict(r) for r in found]))
    return records


def _run_parallel(kernels, subset, cache, progress, jobs):
    import multiprocessing

    groups: dict[str, list[int]] = {}
    for index, (kernel_set, _, shape, dtype, _) in enumerate(_cases(kernels, subset)):
        groups.setdefault(_group(kernel_set, shape, dtype), []).append(index)
    shares = [[] for _ in range(jobs)]
    for members in sorted(groups.values(), key=len, reverse=True):  # greedy: fewest cases
        min(shares, key=len).extend(members)
    context = multiprocessing.get_context("spawn")
    with context.Pool(len([s for s in shares if s])) as pool:
        results = pool.starmap(_worker, [(kernels, subset, cache, s) for s in shares if s])
    by_index = dict(item for result in results for item in result)
    return [Record(**r) for index in sorted(by_index) for r in by_index[index]]


def _print_progress(r: Record):
    print(f"  {r.case:34} {r.shape:20} {r.dtype:9} {r.kernel:24} {r.config:40} "
          f"{_cell(r, 'compile_s')}", file=sys.stderr, flush=True)
