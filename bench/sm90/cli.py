"""Static sm_90 (Hopper) report: compile every gptfast Triton kernel for H100 on a CPU machine.

The command line, ``python -m gptfast.bench.sm90`` (see :mod:`gptfast.bench.sm90`): compile,
print the table, the problems and the versions line, write ``--json``; or ``--compare`` saved
reports, or print the ``--roofline`` floors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from .cases import KERNEL_SETS
from .report import autotune_key_gaps, compare_table, problems, summary_table, table
from .roofline import roofline_table
from .run import _print_progress, run_report, versions


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.sm90", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the records as a JSON list here")
    parser.add_argument("--subset", choices=("headline", "full"), default="full",
                        help="headline: the benchmark shapes; full: also D=256, a ragged T, "
                             "fp32 LayerNorm at every C, more vocabularies (default)")
    parser.add_argument("--kernels", default=",".join(KERNEL_SETS),
                        help=f"comma-separated subset of {','.join(KERNEL_SETS)}")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="worker processes compiling in parallel (default: CPUs, at most 4)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--summary", action="store_true",
                        help="print one markdown row per kernel and shape (ranges over configs)")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="JSON",
                        help="print a markdown table comparing reports written with --json "
                             "(one column per file, labelled by its triton version) and exit")
    parser.add_argument("--roofline", action="store_true",
                        help="print the roofline floors of the headline shapes (markdown) and exit")
    parser.add_argument("--triton-version-note", action="store_true",
                        help="print only the versions line (triton, ptxas, target) and exit")
    args = parser.parse_args(argv)
    if args.roofline:
        print(roofline_table())
        return 0
    if args.compare:
        runs = {}
        for path in args.compare:
            rows = json.loads(path.read_text())
            runs[f"{rows[0]['triton'] if rows else path.stem}"] = rows
        print(compare_table(runs))
        return 0

    info = versions()
    note = (f"sm_90 static report: triton {info['triton']}, ptxas {info['ptxas']}, "
            f"torch {info['torch']}, python {info['python']}, target {info['target']}")
    print(note, flush=True)
    if args.triton_version_note:
        return 0
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = set(kernels) - set(KERNEL_SETS)
    if unknown:
        parser.error(f"unknown kernel sets {sorted(unknown)}")

    start = time.perf_counter()
    records = run_report(kernels, args.subset, cache=not args.no_cache, progress=_print_progress,
                         jobs=args.jobs)
    elapsed = time.perf_counter() - start
    print(summary_table(records) if args.summary else table(records, markdown=args.markdown))
    compiled = sum(not r.cached for r in records)
    print(f"\n{len(records)} kernels ({compiled} compiled, {len(records) - compiled} cached) "
          f"in {elapsed:.0f} s")
    found = problems(records) + autotune_key_gaps()["gaps"]
    print(f"{len(found)} problems" + (":" if found else ""))
    for line in found:
        print("  " + line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [{**dataclasses.asdict(r), "triton": info["triton"], "ptxas": info["ptxas"]}
                for r in records]
        args.json.write_text(json.dumps(rows, indent=1))
    return 0
