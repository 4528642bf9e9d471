"""What the sm_90 report compiles and how it reads the result: H100's per-SM limits, the
:class:`Record` of one compiled kernel, the readers of the compile (ptxas's ``-v`` log, the
TTIR/TTGIR/PTX dots, resident warps) and the :class:`Recorder` that turns launches of gptfast's
kernels into sm_90 compiles, cached by kernel source hash."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path


# H100 SXM per-SM limits (same on H200), for the resident-warps estimate.
SM_COUNT = 132
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

# (backend, compute capability, warp size); what the CUDA driver reports for an H100
TARGET = ("cuda", 90, 32)


@dataclasses.dataclass
class Record:
    """One compiled kernel at one shape (one autotune config)."""
    case: str                 # the op and path, e.g. "attention bwd atomic_dq"
    shape: str
    dtype: str
    kernel: str               # the jit function's name
    config: str               # block sizes, warps, stages
    constexprs: dict
    num_warps: int
    num_stages: int
    regs: int
    spill_bytes: int          # ptxas "bytes spill stores"
    spill_loads: int
    stack_bytes: int
    smem_bytes: int
    smem_estimate: int | None  # the attention pruner's estimate (None where no pruner)
    dots: int                 # tl.dot ops in the kernel (TTIR)
    wgmma_dots: int           # of them lowered to warp-group MMA (TTGIR)
    mma: str                  # wgmma | mma.sync | mixed | none
    tma: bool
    warps_per_sm: int
    compile_s: float
    cached: bool = False


# ------------------------------------------------------------------ reading the compile --

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from ``ptxas -v``."""
    regs = _PTXAS_REGS.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    if not regs or not spill:
        raise RuntimeError(f"no register/spill figures in the ptxas log:\n{log[-2000:]}")
    stack, stores, loads = (int(x) for x in spill[-1])
    return int(regs[-1]), stores, loads, stack


def count_dots(ttir: str, ttgir: str, ptx: str) -> tuple[int, int, str]:
    """(tl.dot ops, those lowered to wgmma, MMA kind) of one compiled kernel.

    TTIR holds one ``tt.dot`` per ``tl.dot`` of the (inlined) source. On Hopper the TTGIR
    rewrites each dot that can use wgmma into ``ttng.warp_group_dot``; a ``tt.dot`` still there
    becomes ``mma.sync`` (or FMA). The PTX is checked too, so the kind is what ptxas assembles.
    """
    dots = len(re.findall(r"= tt\.dot ", ttir))
    remaining = len(re.findall(r"= tt\.dot ", ttgir))
    wgmma = len(re.findall(r"= ttng\.warp_group_dot ", ttgir))
    has_wgmma = "wgmma.mma_async" in ptx
    has_sync = re.search(r"\bmma\.sync\b", ptx) is not None
    if dots == 0:
        kind = "none"
    elif remaining == 0 and has_wgmma and not has_sync:
        kind = "wgmma"
    elif wgmma == 0 and not has_wgmma:
        kind = "mma.sync" if has_sync else "fma"
    else:
        kind = "mixed"
    # the pipeliner may peel loop iterations, so TTGIR can hold more dots than the source
    return dots, dots if kind == "wgmma" else min(wgmma, dots), kind


def resident_warps(regs: int, smem: int, num_warps: int) -> int:
    """Warps of one kernel resident on an SM (H100), limited by registers, shared memory,
    the warp slots and the block slots."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps,
                 (REGS_PER_SM // regs_per_warp) // num_warps)
    if smem:
        blocks = min(blocks, SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK))
    return max(0, blocks) * num_warps


def _config_label(constexprs: dict, num_warps: int, num_stages: int) -> str:
    blocks = [f"{k}={v}" for k, v in constexprs.items()
              if k.startswith("BLOCK_") or (k == "PERSISTENT" and v)]
    return " ".join(blocks + [f"w{num_warps}", f"s{num_stages}"])


# --------------------------------------------------------------------- the compile hook --

class _CompileTarget:
    """Triton driver stand-in: the current target is sm_90, device 0, stream 0. Only compile
    (``warmup``) paths run while it is active, never a launch."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget(*TARGET)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("meta")


# Records of the kernels compiled in this process, by id: Triton keeps compiled kernels in
# memory and a second launch of the same specialisation never reaches the compile hook.
_ANALYSED: dict[int, tuple] = {}


def _default_cache_dir() -> Path:
    env = os.environ.get("GPTFAST_SM90_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptfast" / "sm90"


class Recorder:
    """Turns launches of gptfast's kernels into sm_90 compiles while active.

    Every Autotuner found in the kernel modules compiles each config its pruner keeps
    (``Autotuner.warmup``, with the runtime spill check off: the report gates the pruner's
    static model, which must keep no spilling config on its own) instead of timing them; every JITFunction compiles (``warmup=True``)
    instead of launching. ``knobs.runtime.jit_cache_hook`` sees each new specialisation first:
    a cached result is recorded and the compile skipped.
    """

    def __init__(self, modules, cache_dir: Path | None, smem_estimators=None):
        self.modules = modules
        self.cache_dir = cache_dir
        self.smem_estimators = smem_estimators or {}
        self.records: list[Record] = []
        self.context = ("", "", "")
        self._pending = None
        self._undo = []

    # context manager: patch, then restore everything
    def __enter__(self):
        from triton import knobs
        from triton.runtime import driver
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        previous_driver = driver._active  # None until something asks for the real one
        driver.set_active(_CompileTarget())
        self._undo.append(lambda: setattr(driver, "_active", previous_driver))
        for knob, name, value in ((knobs.compilation, "always_compile", True),
                                  (knobs.nvidia, "dump_ptxas_log", True),
                                  (knobs.runtime, "jit_cache_hook", self._hook)):
            old = getattr(knob, name)
            setattr(knob, name, value)
            self._undo.append(lambda knob=knob, name=name, old=old: setattr(knob, name, old))
        for module in self.modules:
            for obj in list(vars(module).values()):
                if isinstance(obj, Autotuner):
                    self._patch(obj, "run", self._autotuner_run(obj))
                    self._patch(obj, "bench", _no_bench)
                    if hasattr(obj, "spill_check"):  # the static pruner alone: what it keeps
                        self._patch(obj, "spill_check", False)
                if isinstance(obj, JITFunction):
                    self._patch(obj, "run", self._jit_run(obj))
                inner = getattr(obj, "fn", None)
                while inner is not None:  # Heuristics / Autotuner wrapping a JITFunction
                    if isinstance(inner, JITFunction) and "run" not in vars(inner):
                        self._patch(inner, "run", self._jit_run(inner))
                    inner = getattr(inner, "fn", None) if not isinstance(inner, JITFunction) else None
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()

    def _patch(self, obj, name, value):
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    @contextlib.contextmanager
    def case(self, case: str, shape: str, dtype: str):
        previous, self.context = self.context, (case, shape, dtype)
        try:
            yield
        finally:
            self.context = previous

    def _autotuner_run(self, tuner):
        def run(*args, grid=None, warmup=False, **kwargs):
            tuner.warmup(*args, grid=grid, **kwargs)
        return run

    def _jit_run(self, fn):
        from triton.runtime.jit import JITFunction

        def run(*args, grid=None, warmup=False, **kwargs):
            self._pending = None
            log = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(log):
                kernel = JITFunction.run(fn, *args, grid=grid, warmup=True, **kwargs)
            seconds = time.perf_counter() - start
            pending, self._pending = self._pending, None
            if pending is None:  # Triton's in-memory cache: compiled earlier in this process
                record = dataclasses.replace(_ANALYSED[id(kernel)][1], compile_s=0.0, cached=True)
            elif pending["cached"] is not None:
                record = pending["cached"]
            else:
                record = self._analyse(kernel, log.getvalue(), seconds, pending)
                _ANALYSED[id(kernel)] = (kernel, record)  # the kernel is kept: ids stay unique
                self._store(pending["key"], record)
            case, shape, dtype = self.context
            # the pruner's estimate is Python, outside the kernel's source hash: never cached
            estimator = self.smem_estimators.get(record.kernel)
            estimate = None if estimator is None else estimator(record.constexprs, record.num_stages)
            self.records.append(dataclasses.replace(record, case=case, shape=shape, dtype=dtype,
                                                    smem_estimate=estimate))
            return None
        return run

    def _hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        import triton
        jit = fn.jit_function
        constexprs = {}
        for path, value in compile["constants"].items():
            index = path[0] if isinstance(path, tuple) else path
            name = jit.arg_names[index] if isinstance(index, int) else str(index)
            constexprs[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
        digest = hashlib.sha256("\n".join(
            [triton.__version__, str(TARGET), jit.cache_key, compile["specialization_data"]]).encode())
        pending = dict(key=digest.hexdigest()[:32], name=fn.name, constexprs=constexprs,
                       num_warps=compile["num_warps"], num_stages=compile["num_stages"],
                       cached=self._load(digest.hexdigest()[:32]))
        self._pending = pending
        return pending["cached"] is not None

    def _analyse(self, kernel, log, seconds, pending) -> Record:
        regs, stores, loads, stack = parse_ptxas_log(log)
        dots, wgmma, mma = count_dots(kernel.asm["ttir"], kernel.asm["ttgir"], kernel.asm["ptx"])
        constexprs, warps, stages = pending["constexprs"], pending["num_warps"], pending["num_stages"]
        smem = int(kernel.metadata.shared)
        return Record(
            case="", shape="", dtype="", kernel=pending["name"],
            config=_config_label(constexprs, warps, stages), constexprs=constexprs,
            num_warps=warps, num_stages=stages, regs=regs, spill_bytes=stores, spill_loads=loads,
            stack_bytes=stack, smem_bytes=smem,
            smem_estimate=None,
            dots=dots, wgmma_dots=wgmma, mma=mma, tma="cp.async.bulk.tensor" in kernel.asm["ptx"],
            warps_per_sm=resident_warps(regs, smem, warps), compile_s=round(seconds, 2))

    def _load(self, key: str) -> Record | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            data = json.loads(path.read_text())
            return dataclasses.replace(Record(**data), compile_s=0.0, cached=True)
        except (OSError, ValueError, TypeError):
            return None

    def _store(self, key: str, record: Record):
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(record)))
        tmp.replace(self.cache_dir / f"{key}.json")


def _no_bench(*args, **kwargs):
    raise RuntimeError("the sm_90 report never times a kernel")
