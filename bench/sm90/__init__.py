"""Static sm_90 (Hopper) report: compile every gptfast Triton kernel for H100 on a CPU machine.

    python -m gptfast.bench.sm90 [--json PATH] [--subset headline|full] [--no-cache]

No GPU and no ``TRITON_INTERPRET``: Triton compiles for ``GPUTarget("cuda", 90, 32)`` (sm_90, warp size 32) with the
ptxas that ships in its wheel. The kernels are reached through gptfast's own launch wrappers,
called on ``meta`` tensors of the benchmark shapes, so the block-size heuristics, the autotuner's
configs and prune function, and Triton's argument specialisation are the ones a real launch
would use. Only the last step differs: where a launch would run the kernel (or the autotuner
would time every config), the report compiles it (every config the pruner keeps) and reads:

- registers, spill bytes (stores) and stack frame, from ptxas's ``-v`` log;
- shared memory (Triton's metadata) and, for autotuned attention kernels, the pruner's estimate;
- the MMA kind: ``wgmma`` when every ``tl.dot`` became a warp-group MMA (``wgmma.mma_async`` in
  the PTX, no ``mma.sync``), ``mma.sync`` when none did, ``mixed``, or ``none`` (no dot);
- TMA: the PTX uses ``cp.async.bulk.tensor`` (tensor descriptors);
- resident warps per SM, from registers, shared memory and warps (H100 limits below);
- compile seconds (0 for results taken from the cache).

Results are cached per compiled specialisation under ``~/.cache/gptfast/sm90`` (or
``$GPTFAST_SM90_CACHE``), keyed by the kernel's source hash (Triton's own, which covers the
jit functions it calls), the specialisation, the options and the Triton version, so a re-run
after editing one kernel recompiles only that kernel.

The package, one job a module: :mod:`.record` (the compile hook, :class:`Record`, the readers of
ptxas's log and the IR), :mod:`.cases` (what is compiled, one table per kernel set),
:mod:`.run` (:func:`run_report`, in-process or over worker processes), :mod:`.report` (tables,
comparison, the CI gate's :func:`problems` and :func:`autotune_key_gaps`), :mod:`.roofline`
(``--roofline``) and :mod:`.cli` (the command line; ``__main__`` runs it). Every name is
re-exported here, so ``from gptfast.bench import sm90; sm90.run_report(...)`` works as before.
"""

from __future__ import annotations

from .cases import (KERNEL_SETS, attention_cases, cross_entropy_cases, layernorm_cases,
                    rotary_cases)
from .cli import main
from .record import (MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM, REG_ALLOC_UNIT, REGS_PER_SM, SM_COUNT,
                     SMEM_PER_BLOCK, SMEM_PER_SM, SMEM_RESERVED_PER_BLOCK, TARGET, Record, Recorder,
                     _CompileTarget, count_dots, parse_ptxas_log, resident_warps)  # noqa: F401
from .report import (COLUMNS, autotune_key_gaps, compare_table, mma_sync_expected, problems,
                     summary_table, table)
from .roofline import (BF16_DENSE_FLOP_PER_S, H100_SXM_BYTES_PER_S, H200_BYTES_PER_S,
                       roofline_floors, roofline_table)
from .run import run_report, versions

__all__ = ["BF16_DENSE_FLOP_PER_S", "COLUMNS", "H100_SXM_BYTES_PER_S", "H200_BYTES_PER_S",
           "KERNEL_SETS", "MAX_BLOCKS_PER_SM", "MAX_WARPS_PER_SM", "REG_ALLOC_UNIT", "REGS_PER_SM",
           "SM_COUNT", "SMEM_PER_BLOCK", "SMEM_PER_SM", "SMEM_RESERVED_PER_BLOCK", "TARGET",
           "Record", "Recorder", "attention_cases", "autotune_key_gaps", "compare_table",
           "count_dots", "cross_entropy_cases", "layernorm_cases", "main", "mma_sync_expected",
           "parse_ptxas_log", "problems", "resident_warps", "roofline_floors", "roofline_table",
           "rotary_cases", "run_report", "summary_table", "table", "versions"]
