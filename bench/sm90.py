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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
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


# ------------------------------------------------------------------------------- shapes --

def _meta(*shape, dtype):
    import torch
    return torch.empty(*shape, dtype=dtype, device="meta")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def attention_cases(subset: str):
    """(case, shape, dtype, thunk): forward, and backward on both dQ paths, bf16, with q/k/v
    split from a fused (B, T, 3, H, D) projection as in the GPT model."""
    import torch
    from gptfast.kernels import attention as attn

    # GPT-2 small's 12 heads of 64 and a 16 x 128 model; T only picks the T_BUCKET key, so
    # both lengths share their compiled kernels (H's divisibility would not: it is kept).
    shapes = [(8, 12, 1024, 64), (1, 12, 8192, 64), (8, 16, 1024, 128), (1, 16, 8192, 128)]
    if subset == "full":
        shapes += [(4, 8, 1024, 256), (2, 16, 1000, 64)]  # the largest head dim; a ragged T
    dtype = torch.bfloat16
    for b, h, t, d in shapes:
        shape = f"B{b} H{h} T{t} D{d}"
        qkv = _meta(b, t, 3, h, d, dtype=dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        o = _meta(b, t, h, d, dtype=dtype).transpose(1, 2)
        lse2 = _meta(b, h, t, dtype=torch.float32)
        do = _meta(b, t, h, d, dtype=dtype).transpose(1, 2)
        scale = d ** -0.5
        yield ("attention fwd", shape, dtype,
               lambda q=q, k=k, v=v, s=scale: attn.attention_forward(q, k, v, s))
        for atomic in (False, True):
            yield (f"attention bwd {'atomic_dq' if atomic else 'deterministic'}", shape, dtype,
                   lambda q=q, k=k, v=v, o=o, lse2=lse2, do=do, s=scale, a=atomic:
                   attn._launch_backward(do, q, k, v, o, lse2, s, a))
        if t < 8192:
            continue
        # document + sliding-window masks (both flags: the largest masked variant)
        ids, window = _meta(b, t, dtype=torch.int64), 1024
        yield ("attention fwd documents+window", shape, dtype,
               lambda q=q, k=k, v=v, s=scale, i=ids: attn.attention_forward(q, k, v, s, i, window))
        for atomic in (False, True):
            yield (f"attention bwd {'atomic_dq' if atomic else 'deterministic'} documents+window",
                   shape, dtype,
                   lambda q=q, k=k, v=v, o=o, lse2=lse2, do=do, s=scale, a=atomic, i=ids:
                   attn._launch_backward(do, q, k, v, o, lse2, s, a, i, window))
        # bidirectional (causal=False): no window, and documents with (left, right) windows
        for name, i, w, right in (("bidirectional", None, None, None),
                                  ("bidirectional documents+windows", ids, window, window)):
            yield (f"attention fwd {name}", shape, dtype,
                   lambda q=q, k=k, v=v, s=scale, i=i, w=w, r=right:
                   attn.attention_forward(q, k, v, s, i, w, r))
            for atomic in (False, True):
                yield (f"attention bwd {'atomic_dq' if atomic else 'deterministic'} {name}",
                       shape, dtype,
                       lambda q=q, k=k, v=v, o=o, lse2=lse2, do=do, s=scale, a=atomic, i=i, w=w,
                       r=right: attn._launch_backward(do, q, k, v, o, lse2, s, a, i, w, r))


def layernorm_cases(subset: str):
    """layer_norm and add_layer_norm forward and backward (with dw, db) at the benchmark rows,
    and rms_norm / add_rms_norm (the same kernels, CENTER off) at the same rows."""
    import torch
    from gptfast.kernels import layernorm as ln

    shapes = [(65536, 768, torch.float32), (65536, 768, torch.bfloat16),
              (16384, 4096, torch.bfloat16), (8192, 8192, torch.bfloat16),
              (4096, 16384, torch.bfloat16), (2048, 32768, torch.bfloat16)]
    if subset == "full":
        shapes += [(16384, 4096, torch.float32), (8192, 8192, torch.float32),
                   (4096, 16384, torch.float32), (2048, 32768, torch.float32),
                   (4096, 50000, torch.bfloat16)]
    for n, c, dtype in shapes:
        shape = f"{n}x{c}"
        x = _meta(n, c, dtype=dtype)
        w, b = _meta(c, dtype=dtype), _meta(c, dtype=dtype)
        stats = _meta(n, dtype=torch.float32)
        for residual in (None, _meta(n, c, dtype=dtype)):
            op = "layer_norm" if residual is None else "add_layer_norm"
            yield (f"{op} fwd", shape, dtype,
                   lambda x=x, r=residual, w=w, b=b: ln._forward(x, r, w, b, 1e-5))
            ds = None if residual is None else x
            yield (f"{op} bwd", shape, dtype,
                   lambda x=x, w=w, b=b, st=stats, ds=ds, dt=dtype:
                   ln._backward(x, x, w, b, st, st, ds, dt, None, True, True))
        # RMSNorm: the same kernels with CENTER off, no bias; with a weight, and without one
        # (nanochat's norm) at the 768-wide rows
        for residual in (None, _meta(n, c, dtype=dtype)):
            op = "rms_norm" if residual is None else "add_rms_norm"
            ds = None if residual is None else x
            for weight in (w, None) if c == 768 else (w,):
                label = op if weight is not None else f"{op} no weight"
                yield (f"{label} fwd", shape, dtype,
                       lambda x=x, r=residual, w=weight: ln._forward(x, r, w, None, 1e-6, center=False))
                yield (f"{label} bwd", shape, dtype,
                       lambda x=x, w=weight, st=stats, ds=ds, dt=dtype:
                       ln._backward(x, x, w, None, None, st, ds, dt, None, True, False))


def cross_entropy_cases(subset: str):
    """The CE kernel's loss-only, loss+grad (one scale, and one scale per row) variants and
    the row-scaling kernel, at N=16384, V=50257; linear CE runs the same kernels on a
    (chunk rows, V) buffer, whose row stride is V as here."""
    import torch
    from gptfast.kernels import cross_entropy as ce

    shapes = [(16384, 50257, torch.bfloat16), (16384, 50257, torch.float32)]
    if subset == "full":
        shapes += [(16384, 50304, torch.bfloat16), (4096, 128256, torch.bfloat16)]
    for n, vocab, dtype in shapes:
        shape = f"N{n} V{vocab}"
        logits = _meta(n, vocab, dtype=dtype)
        target = _meta(n, dtype=torch.int64)
        loss = _meta(n, dtype=torch.float32)
        flag = _meta(1, dtype=torch.int32)
        one, per_row = _meta((), dtype=torch.float32), _meta(n, dtype=torch.float32)
        yield ("cross_entropy loss", shape, dtype, lambda lg=logits, t=target, l=loss, f=flag:
               ce._launch_cross_entropy(lg, t, l, None, None, f, -100, 0.0, 0.0))
        for scale, name in ((one, "mean/sum"), (per_row, "per-row")):
            yield (f"cross_entropy loss+grad {name}", shape, dtype,
                   lambda lg=logits, t=target, l=loss, f=flag, s=scale:
                   ce._launch_cross_entropy(lg, t, l, lg, s, f, -100, 0.1, 1e-4))
            yield (f"cross_entropy scale_rows {name}", shape, dtype,
                   lambda lg=logits, s=scale: ce._launch_scale_rows(lg, s))
        if dtype == torch.bfloat16 and vocab == 50257:
            # every option at once: softcap, class weights with smoothing, split z-loss term
            class_weight, z_term = _meta(vocab, dtype=torch.float32), _meta(n, dtype=torch.float32)
            yield ("cross_entropy loss+grad softcap+weight", shape, dtype,
                   lambda lg=logits, t=target, l=loss, f=flag, s=one, w=class_weight, z=z_term:
                   ce._launch_cross_entropy(lg, t, l, lg, s, f, -100, 0.1, 1e-4, class_weight=w,
                                            softcap=30.0, z_term=z, z_grad_scale=s))


def rotary_cases(subset: str):
    """rotary_qk_norm forward and backward at nanochat's shapes: q and k as views of one fused
    (B, T, (H + 2 Hkv) D) projection, rotate-half and interleaved pairs."""
    import torch
    from gptfast.kernels import rotary

    shapes = [(8, 2048, 10, 10, 128, torch.bfloat16), (16, 1024, 12, 12, 64, torch.bfloat16)]
    if subset == "full":
        shapes += [(4, 2048, 32, 8, 128, torch.bfloat16), (8, 2048, 10, 10, 128, torch.float32),
                   (4, 1024, 16, 16, 256, torch.bfloat16), (4, 1024, 8, 1, 96, torch.float16)]
    for b, t, h, hkv, d, dtype in shapes:
        shape = f"B{b} T{t} H{h} Hkv{hkv} D{d}"
        heads = _meta(b, t, h + 2 * hkv, d, dtype=dtype)
        q, k = heads[:, :, :h], heads[:, :, h:h + hkv]
        cos, sin = _meta(t, d // 2, dtype=dtype), _meta(t, d // 2, dtype=dtype)
        dqo, dko = _meta(b, t, h, d, dtype=dtype), _meta(b, t, hkv, d, dtype=dtype)
        for interleaved in (False, True):
            pairs = "interleaved" if interleaved else "rotate-half"
            yield (f"rotary_qk_norm fwd {pairs}", shape, dtype,
                   lambda q=q, k=k, c=cos, s=sin, i=interleaved:
                   rotary.rotary_qk_norm_forward(q, k, c, s, 1.2, None, i))
            yield (f"rotary_qk_norm bwd {pairs}", shape, dtype,
                   lambda q=q, k=k, c=cos, s=sin, i=interleaved, dq=dqo, dk=dko:
                   rotary.rotary_qk_norm_backward(dq, dk, q, k, c, s, 1.2, None, i, True, True))


def _attention_smem_estimators():
    from gptfast.kernels import attention as attn

    def estimator(kind):
        def estimate(constexprs, num_stages):
            return attn._smem_estimate(kind, constexprs["BLOCK_M"], constexprs["BLOCK_N"],
                                       num_stages, constexprs["BLOCK_D"], 2,
                                       bool(constexprs.get("ATOMIC_DQ", False)),
                                       bool(constexprs.get("TMA", False)),
                                       bool(constexprs.get("PERSISTENT", 0)))
        return estimate
    return {"_attn_fwd_kernel": estimator("fwd"), "_attn_bwd_dkdv_kernel": estimator("dkdv"),
            "_attn_bwd_dq_kernel": estimator("dq")}


def autotune_key_gaps(modules=None) -> dict:
    """Constexprs a caller passes to an autotuned kernel that its autotune key leaves out.

    A constexpr not tuned by the configs and not set by a heuristic comes from the caller and
    selects a different compiled kernel (ATOMIC_DQ, DOT_PRECISION, HEAD_DIM...); if the key
    lacks it, both variants share one cached winner, timed on only one of them.
    """
    from gptfast.backend import interpreter_enabled
    if interpreter_enabled():
        raise RuntimeError("autotuners exist only without TRITON_INTERPRET")
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction
    if modules is None:
        from gptfast.kernels import attention, cross_entropy, layernorm
        modules = (attention, layernorm, cross_entropy)
    gaps, tuners = [], 0
    for module in modules:
        for name, obj in vars(module).items():
            if not isinstance(obj, Autotuner):
                continue
            tuners += 1
            tuned = {k for config in obj.configs for k in config.kwargs}
            inner = obj.fn
            while not isinstance(inner, JITFunction):
                if isinstance(inner, Heuristics):
                    tuned |= set(inner.values)
                inner = inner.fn
            passed = [p.name for p in inner.params if p.is_constexpr and p.name not in tuned]
            missing = [p for p in passed if p not in obj.keys]
            if missing:
                gaps.append(f"{module.__name__}.{name} ({inner.fn.__name__}): key {obj.keys} "
                            f"lacks {missing}")
    return {"tuners": tuners, "gaps": gaps}


KERNEL_SETS = {"attention": attention_cases, "layernorm": layernorm_cases,
               "cross_entropy": cross_entropy_cases, "rotary": rotary_cases}


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


def _cases(kernels, subset):
    """Every (kernel set, case, shape, dtype, thunk), in report order."""
    return [(name, *case) for name in kernels for case in KERNEL_SETS[name](subset)]


def _group(kernel_set: str, shape: str, dtype) -> str:
    """Cases that compile the same specialisations (attention at one head dim, any T) go to
    one worker, so no two workers compile the same kernel."""
    if kernel_set == "attention":
        return shape.split()[-1]
    return f"{kernel_set} {shape} {dtype}" if kernel_set == "layernorm" else kernel_set


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


# ------------------------------------------------------------------------------- output --

COLUMNS = ("case", "shape", "dtype", "kernel", "config", "regs", "spill_bytes", "smem_bytes",
           "smem_estimate", "mma", "tma", "warps_per_sm", "compile_s")


def _cell(record: Record, column: str) -> str:
    value = getattr(record, column)
    if column == "smem_bytes" or column == "smem_estimate":
        return "" if value is None else f"{value / 1024:.0f}K"
    if column == "tma":
        return "yes" if value else "no"
    if column == "mma" and record.dots:
        return f"{value} ({record.wgmma_dots}/{record.dots})"
    if column == "compile_s":
        return "cached" if record.cached else f"{value:.1f}"
    return str(value)


def table(records, markdown: bool = False) -> str:
    rows = [[_cell(r, c) for c in COLUMNS] for r in records]
    header = ["case", "shape", "dtype", "kernel", "config", "regs", "spill B", "smem",
              "smem est", "mma (wgmma/dots)", "tma", "warps/SM", "compile s"]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*row) for row in rows])


def summary_table(records) -> str:
    """Markdown, one row per (case, shape, dtype, kernel): how many configs were compiled and
    the range of registers, spills, shared memory and resident warps over them."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.case, r.shape, r.dtype, r.kernel), []).append(r)

    def span(values, fmt=str):
        lo, hi = min(values), max(values)
        return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"

    kib = lambda v: f"{v / 1024:.0f}K"  # noqa: E731
    lines = ["| case | shape | dtype | kernel | configs | regs | spill B | smem | mma | tma | warps/SM |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (case, shape, dtype, kernel), rs in groups.items():
        kinds = sorted({r.mma for r in rs})
        tma = sorted({"yes" if r.tma else "no" for r in rs})
        lines.append(f"| {case} | {shape} | {dtype} | {kernel} | {len(rs)} | "
                     f"{span([r.regs for r in rs])} | {span([r.spill_bytes for r in rs])} | "
                     f"{span([r.smem_bytes for r in rs], kib)} | {'/'.join(kinds)} | "
                     f"{'/'.join(tma)} | {span([r.warps_per_sm for r in rs])} |")
    return "\n".join(lines)


def compare_table(runs: dict) -> str:
    """Markdown, one row per (case, shape, dtype, kernel) and a column pair per run (e.g. per
    Triton version): configs, registers, spill bytes, shared memory, MMA kind, warps/SM,
    each a range over the kept configs. ``runs`` maps a label to a list of record dicts."""
    labels = list(runs)
    groups: dict[tuple, dict[str, list]] = {}
    for label, rows in runs.items():
        for r in rows:
            key = (r["case"], r["shape"], r["dtype"], r["kernel"])
            groups.setdefault(key, {}).setdefault(label, []).append(r)

    def span(rows, field, fmt=str):
        if not rows:
            return "-"
        values = [r[field] for r in rows]
        lo, hi = min(values), max(values)
        return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"

    kib = lambda v: f"{v / 1024:.0f}K"  # noqa: E731
    fields = [("configs", None), ("regs", "regs"), ("spill B", "spill_bytes"),
              ("smem", "smem_bytes"), ("mma", "mma"), ("warps/SM", "warps_per_sm")]
    header = ["case", "shape", "dtype", "kernel"] + [f"{name} {label}" for name, _ in fields
                                                     for label in labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_label in groups.items():
        cells = list(key)
        for name, field in fields:
            for label in labels:
                rows = by_label.get(label, [])
                if field is None:
                    cells.append(str(len(rows)))
                elif field == "mma":
                    cells.append("/".join(sorted({r["mma"] for r in rows})) or "-")
                else:
                    cells.append(span(rows, field, kib if field == "smem_bytes" else str))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mma_sync_expected(kernel: str, constexprs: dict) -> bool:
    """The one kept tile family whose dots are mma.sync by design: dK/dV 32-key tiles at head
    dim 256, kept only on triton >= 3.9, where every wgmma (64-key) tile of that kernel spills
    (kernels/attention.py ``_DKDV_NARROW_D256``)."""
    return (kernel == "_attn_bwd_dkdv_kernel" and constexprs.get("BLOCK_D") == 256
            and constexprs.get("BLOCK_N", 64) < 64)


def problems(records) -> list[str]:
    """What the CI gate rejects: spills, shared memory over the block limit or above the
    pruner's estimate, and dots that are not wgmma (but see :func:`mma_sync_expected`)."""
    found = []
    for r in records:
        where = f"{r.case} {r.shape} {r.dtype} {r.kernel} [{r.config}]"
        if r.spill_bytes or r.spill_loads:
            found.append(f"{where}: spills {r.spill_bytes} B stores / {r.spill_loads} B loads")
        if r.smem_bytes > SMEM_PER_BLOCK:
            found.append(f"{where}: {r.smem_bytes} B shared memory > {SMEM_PER_BLOCK}")
        if r.smem_estimate is not None and r.smem_estimate < r.smem_bytes:
            found.append(f"{where}: pruner estimates {r.smem_estimate} B < compiled {r.smem_bytes} B")
        if r.dots and r.mma != "wgmma" and not mma_sync_expected(r.kernel, r.constexprs):
            found.append(f"{where}: {r.dots - r.wgmma_dots} of {r.dots} dots not wgmma ({r.mma})")
    return found


# ----------------------------------------------------------------------- roofline floors --

H100_SXM_BYTES_PER_S = 3.35e12
H200_BYTES_PER_S = 4.8e12
BF16_DENSE_FLOP_PER_S = 989e12  # H100 SXM and H200


def roofline_floors() -> list[dict]:
    """Bytes and FLOPs of each headline op (the minimum any kernel must move and compute)
    and the time floor max(bytes / bandwidth, FLOPs / 989 TFLOP/s) on H100 SXM and H200.

    Attention (causal, so half the T x T scores): forward 2 matmuls = 2 B H T^2 D FLOPs and
    reads Q, K, V, writes O (+ fp32 lse); backward 5 matmuls = 5 B H T^2 D FLOPs and reads
    Q, K, V, O, dO, lse, writes dQ, dK, dV. LayerNorm: read x (and r), write y (and s);
    backward read x (or s), dy (and ds), write dx. Cross-entropy with the gradient written
    into the logits: one read and one write of N x V.
    """
    rows = []

    def add(op, shape, dtype, nbytes, flops=0.0):
        floor_h100 = max(nbytes / H100_SXM_BYTES_PER_S, flops / BF16_DENSE_FLOP_PER_S)
        floor_h200 = max(nbytes / H200_BYTES_PER_S, flops / BF16_DENSE_FLOP_PER_S)
        rows.append(dict(op=op, shape=shape, dtype=dtype, mbytes=nbytes / 1e6, gflop=flops / 1e9,
                         h100_us=floor_h100 * 1e6, h200_us=floor_h200 * 1e6,
                         bound="compute" if flops / BF16_DENSE_FLOP_PER_S > nbytes / H100_SXM_BYTES_PER_S
                         else "memory"))

    for b, h, t, d in ((8, 12, 1024, 64), (1, 12, 8192, 64), (8, 16, 1024, 128), (1, 16, 8192, 128)):
        shape, tile = f"B{b} H{h} T{t} D{d}", b * h * t * d * 2
        add("attention fwd", shape, "bf16", 4 * tile + b * h * t * 4, 2.0 * b * h * t * t * d)
        add("attention bwd", shape, "bf16", 8 * tile + 2 * b * h * t * 4, 5.0 * b * h * t * t * d)
    for n, c, size, name in ((65536, 768, 4, "fp32"), (65536, 768, 2, "bf16"), (16384, 4096, 2, "bf16"),
                             (8192, 8192, 2, "bf16"), (4096, 16384, 2, "bf16")):
        add("layer_norm fwd", f"{n}x{c}", name, 2 * n * c * size)
        add("layer_norm bwd", f"{n}x{c}", name, 3 * n * c * size)
        add("add_layer_norm fwd", f"{n}x{c}", name, 4 * n * c * size)
        add("add_layer_norm bwd", f"{n}x{c}", name, 4 * n * c * size)
    for size, name in ((2, "bf16"), (4, "fp32")):
        add("cross_entropy loss+grad", "N16384 V50257", name, 2 * 16384 * 50257 * size)
    return rows


def roofline_table() -> str:
    lines = ["| op | shape | dtype | MB moved | GFLOP | bound | floor H100 SXM us | floor H200 us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in roofline_floors():
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mbytes']:.0f} | "
                     f"{r['gflop']:.0f} | {r['bound']} | {r['h100_us']:.0f} | {r['h200_us']:.0f} |")
    return "\n".join(lines)


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


if __name__ == "__main__":
    sys.exit(main())
