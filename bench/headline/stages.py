"""The stages of ``gptfast bench --suite headline`` other than ``correct``: env, kernels, gpt,
loader; and the sizes of a GPU run and of the CPU dry run.

A stage is a list of :class:`Unit` s, run in order by :mod:`.child`; each returns rows (see
:mod:`.report`). A dry run calls the same functions as a GPU run at the sizes in :data:`DRY`;
only :class:`~gptfast.bench.common.Meter` (CUDA events / do_bench / allocator peaks against
perf_counter) and the device-query calls differ. The measuring itself is the per-kernel
modules' (``gptfast.bench.attention`` ...); a stage turns their results into rows.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
from typing import Callable

import torch

from .. import loader_suite
from ..common import DTYPES, Meter
from .report import add_peer_ratios, row, timed_row


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size a headline run uses (GPU: the bench/ANCHORS.md shapes; dry run: tiny ones)."""

    matmul_n: int                 # the bf16 n^3 matmul ceiling
    copy_bytes: int               # the device-to-device copy ceiling
    attention: tuple              # (group, head_dim, heads, T) timed in `kernels`
    attention_tokens: int         # B*T per attention call
    layer_norm: tuple             # (N, C)
    ce_rows: int
    vocab: int
    hidden: int                   # linear cross-entropy C
    gpt_model: str
    gpt_batches: tuple            # the first is the goal cell (ANCHORS: B32 T1024)
    gpt_seq: int
    gpt_warmup: int
    gpt_repeats: int
    loader: loader_suite.LoaderSizes
    correct_dtypes: tuple         # the first runs every case, the others the first case of each op
    correct_attention: tuple      # (label, B, H, Hkv, T, D, atomic_dq)
    correct_norm_rows: tuple      # (N, C)
    correct_gpt: tuple            # (model or "tiny", B, T)
    warmup_ms: int                # Meter.time's warm-up and repeat (ms on CUDA)
    repeat_ms: int
    unit_estimates: bool          # skip a unit that cannot finish inside the stage's box
    # (head_dim, heads, T, mean document length, window): the document-mask row in `kernels`
    document_attention: tuple = ()
    # nanochat's pieces (issue 25): its parameter-free RMSNorm (N, C), rotary + QK-norm
    # (B, T, H, Hkv, D), the softcapped linear cross-entropy (N, C, V), the GPT step (model, B, T)
    nanochat_norm: tuple = ()
    nanochat_rotary: tuple = ()
    nanochat_softcap_ce: tuple = ()
    nanochat_gpt: tuple = ()


GPU = Sizes(
    matmul_n=8192, copy_bytes=2**30,
    attention=(("hd64", 64, 12, 1024), ("hd64", 64, 12, 8192), ("hd128", 128, 16, 4096)),
    attention_tokens=16384, layer_norm=(65536, 768), ce_rows=16384, vocab=50257, hidden=768,
    gpt_model="gpt2", gpt_batches=(32, 16), gpt_seq=1024, gpt_warmup=3, gpt_repeats=10,
    loader=loader_suite.LoaderSizes(tokens=20_000_000, sizes=((16, 1024), (64, 1024), (8, 4096)),
                                    seconds=1.0),
    correct_dtypes=("bf16", "fp16"),
    correct_attention=(("hd64 T1024", 4, 12, 12, 1024, 64, False),
                       ("hd64 T1024 atomic-dQ", 4, 12, 12, 1024, 64, True),
                       ("hd128 T1024", 2, 16, 16, 1024, 128, False),
                       ("hd64 T4096", 1, 12, 12, 4096, 64, False),
                       ("hd64 odd T999", 2, 12, 12, 999, 64, False),
                       ("hd64 GQA 12/4 T1024", 4, 12, 4, 1024, 64, False)),
    correct_norm_rows=(65536, 768), correct_gpt=("gpt2", 4, 1024),
    warmup_ms=25, repeat_ms=100, unit_estimates=True,
    document_attention=((64, 12, 8192, 2048, None),),
    nanochat_norm=(65536, 1280), nanochat_rotary=(8, 2048, 10, 10, 128),
    nanochat_softcap_ce=(16384, 1280, 32768), nanochat_gpt=("nanochat-d20", 8, 2048))

# The same stages at shapes the Triton interpreter and 2 CPU cores get through in seconds.
# fp32 and fp16 in `correct`: bf16 tl.dot is wrong in the interpreter.
DRY = Sizes(
    matmul_n=128, copy_bytes=4 * 2**20,
    attention=(("hd64", 16, 2, 32), ("hd128", 32, 2, 32)),
    attention_tokens=64, layer_norm=(64, 96), ce_rows=32, vocab=500, hidden=32,
    gpt_model="micro", gpt_batches=(2,), gpt_seq=16, gpt_warmup=1, gpt_repeats=2,
    loader=loader_suite.LoaderSizes(tokens=50_000, sizes=((2, 64),), seconds=0.02),
    correct_dtypes=("fp32", "fp16"),
    correct_attention=(("hd16 T48", 1, 2, 2, 48, 16, False),
                       ("hd16 T48 atomic-dQ", 1, 2, 2, 48, 16, True),
                       ("hd32 T32", 1, 2, 2, 32, 32, False),
                       ("hd16 T96", 1, 1, 1, 96, 16, False),
                       ("hd16 odd T37", 1, 2, 2, 37, 16, False),
                       ("hd16 GQA 4/2 T48", 1, 4, 2, 48, 16, False)),
    correct_norm_rows=(48, 96), correct_gpt=("tiny", 2, 16),
    warmup_ms=0, repeat_ms=20, unit_estimates=False,
    document_attention=((16, 2, 64, 16, None),),
    nanochat_norm=(64, 96), nanochat_rotary=(1, 8, 2, 1, 16), nanochat_softcap_ce=(32, 32, 500),
    nanochat_gpt=("nanochat-tiny", 2, 16))

@dataclasses.dataclass
class Context:
    """What every unit of a stage shares."""

    stage: str
    sizes: Sizes
    device: torch.device
    meter: Meter
    dry_run: bool


@dataclasses.dataclass
class Unit:
    """One piece of a stage: ``run()`` returns rows. ``estimate_s`` is what it takes on an
    H100/H200 (compilation and autotuning included); a unit is skipped, not started, when less
    than that is left of the stage's box."""

    label: str
    run: Callable[[], list]
    estimate_s: float = 5.0


# -------------------------------------------------------------------------------- env --

NVIDIA_SMI_FIELDS = (("driver_version", ""), ("clocks.sm", "MHz"), ("clocks.max.sm", "MHz"),
                     ("clocks.mem", "MHz"), ("clocks.max.mem", "MHz"), ("power.limit", "W"),
                     ("temperature.gpu", "C"))


def _nvidia_smi() -> dict:
    """Driver, clocks, power limit, temperature from nvidia-smi, one query per field so that a
    field this driver does not know costs only that field (empty when there is no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    found = {}
    for field, _ in NVIDIA_SMI_FIELDS:
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={field}",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        value = out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else ""
        if out.returncode == 0 and value and "not supported" not in value.lower():
            found[field] = value
    return found


VERSION_FACTS = {"torch", "triton", "cuda", "python", "platform", "gptfast", "git_commit",
                 "TRITON_CACHE_DIR", "compile_backend"}


def _facts(ctx: Context) -> list:
    from .. import common

    def fact(metric, value, unit="", status="ok", **extra):
        return row("env", "device" if metric not in VERSION_FACTS else "versions",
                   "headline", metric, value, unit,
                   status="unavailable" if value is None and status == "ok" else status, **extra)

    versions = common.versions()
    commit, dirty = common.git_state()
    rows = [fact("device_name", common.device_name(ctx.device))]
    if ctx.meter.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        rows += [fact("sm_count", props.multi_processor_count),
                 fact("memory_gb", round(props.total_memory / 1e9, 1), "GB"),
                 fact("compute_capability", f"{props.major}.{props.minor}"),
                 fact("cudnn", str(torch.backends.cudnn.version()))]
    else:
        rows += [fact("cpu_cores", os.cpu_count())]
    smi = _nvidia_smi()
    for key, unit in NVIDIA_SMI_FIELDS:
        value = smi.get(key)
        rows.append(fact(key, value, unit, message=None if value else
                         "not read: no nvidia-smi, or it does not answer this field"))
    rows += [fact("torch", versions["torch"]), fact("triton", versions["triton"]),
             fact("cuda", versions["cuda"]), fact("python", versions["python"]),
             fact("platform", platform.platform()), fact("gptfast", versions["gptfast"]),
             fact("git_commit", commit and commit + (" (with local changes)" if dirty else "")),
             fact("TRITON_CACHE_DIR", os.environ.get("TRITON_CACHE_DIR")),
             fact("compile_backend", os.environ.get("GPTFAST_BENCH_COMPILE_BACKEND", "inductor"))]
    return rows



def _matmul_ceiling(ctx: Context) -> list:
    n = ctx.sizes.matmul_n
    # random data: a matmul on zeros runs faster than on real data
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    measured = ctx.meter.measure(lambda: a @ b)
    return [timed_row("env", f"matmul bf16 {n}^3", "torch.matmul", "tflops", "TFLOP/s",
                       measured, lambda ms: 2 * n ** 3 / ms / 1e9, shape=f"{n}x{n}x{n}",
                       ceiling="matmul_tflops")]


def _copy_ceiling(ctx: Context) -> list:
    nbytes = ctx.sizes.copy_bytes
    src = torch.randn(nbytes // 4, device=ctx.device)
    dst = torch.empty_like(src)
    measured = ctx.meter.measure(lambda: dst.copy_(src))
    return [timed_row("env", f"device copy {nbytes / 2**20:.0f} MiB", "Tensor.copy_",
                       "tb_per_s", "TB/s", measured, lambda ms: 2 * nbytes / ms / 1e9,
                       shape=f"{nbytes} bytes", ceiling="copy_tbps",
                       message="bytes read + bytes written over time")]


def env_units(ctx: Context) -> list:
    return [Unit("facts", lambda: _facts(ctx), 5),
            Unit("matmul ceiling", lambda: _matmul_ceiling(ctx), 5),
            Unit("copy ceiling", lambda: _copy_ceiling(ctx), 5)]


# ---------------------------------------------------------------------------- kernels --

ATTENTION_PEERS = ("SDPA flash", "SDPA cuDNN", "SDPA mem-eff")


def _attention(ctx: Context, group, head_dim, heads, seq, clock) -> list:
    from .. import attention

    dtype = torch.bfloat16 if ctx.meter.cuda else torch.float32
    providers = list(attention.PROVIDERS)
    before = clock.snapshot()
    table, _ = attention.bench_shape(head_dim, seq, ctx.sizes.attention_tokens, dtype, providers,
                                     device=ctx.device, meter=ctx.meter, heads=heads)
    autotune_s = clock.snapshot()[0] - before[0]
    batch = table["B"]
    flops = attention.forward_flops(batch, heads, seq, head_dim)
    shape = f"B{batch} H{heads} T{seq} D{head_dim}"
    rows = []
    for name in providers:
        fwd, fwd_bwd = table["measured"][name]
        for direction, measured, work in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 3.5 * flops)):
            # fwd+bwd runs first: its first call tunes both directions of this shape
            tuned = name.startswith("gptfast") and direction == "fwd+bwd"
            extra = {"autotune_s": autotune_s} if tuned else {}
            rows.append(timed_row(
                "kernels", f"causal_attention {group} H{heads} T{seq} {direction}", name,
                "tflops", "TFLOP/s", measured, lambda ms, work=work: work / ms / 1e9, shape=shape,
                op="causal_attention", group=group, head_dim=head_dim, direction=direction,
                dtype=str(dtype).replace("torch.", ""), ceiling_of="matmul", **extra))
    add_peer_ratios(rows, ("gptfast", "gptfast atomic-dQ"), ATTENTION_PEERS)
    return rows


DOCUMENT_PEERS = ("FlexAttention", "SDPA dense mask", "gptfast causal")


def _document_attention(ctx: Context, head_dim, heads, seq, doc_len, window, clock) -> list:
    """gptfast's document-masked kernel beside FlexAttention (same block mask), SDPA with the
    dense mask and the plain causal kernel; TFLOP/s on the attended pairs."""
    from .. import document_attention

    dtype = torch.bfloat16 if ctx.meter.cuda else torch.float32
    case = document_attention.Case(doc_len, window)
    before = clock.snapshot()
    results = document_attention.bench_case(case, seq, head_dim, heads,
                                            ctx.sizes.attention_tokens, dtype,
                                            device=ctx.device, meter=ctx.meter)
    autotune_s = clock.snapshot()[0] - before[0]
    rows = []
    for r in results:
        shape = f"B{r['B']} H{heads} T{seq} D{head_dim} {case.label}"
        name = f"document_attention hd{head_dim} T{seq} {case.label} {r['direction']}"
        work = forward = document_attention.forward_flops(r["pairs"], heads, head_dim)
        if r["direction"] == "fwd+bwd":
            work = 3.5 * forward
        extra = {"autotune_s": autotune_s} if r["provider"] == "gptfast" and \
            r["direction"] == "fwd+bwd" else {}
        common = dict(shape=shape, op="document_attention", head_dim=head_dim,
                      direction=r["direction"], dtype=str(dtype).replace("torch.", ""),
                      pairs=r["pairs"], doc_len=doc_len, window=window, **extra)
        if r["status"] == "unavailable":
            rows.append(row("kernels", name, r["provider"], "tflops", None, "TFLOP/s",
                            status="unavailable", message=r["error"], **common))
            continue
        rows.append(timed_row("kernels", name, r["provider"], "tflops", "TFLOP/s", r["measured"],
                               lambda ms, work=work: work / ms / 1e9, ceiling_of="matmul",
                               **common))
        rows.append(timed_row("kernels", name, r["provider"], "ms", "ms", r["measured"],
                               lambda ms: ms, **common))
    # TFLOP/s against the peers computing the same mask; wall time against all three (the
    # plain causal kernel computes another function, so only its time compares)
    add_peer_ratios([r for r in rows if r["metric"] == "tflops"], "gptfast", DOCUMENT_PEERS[:2])
    add_peer_ratios([r for r in rows if r["metric"] == "ms"], "gptfast", DOCUMENT_PEERS)
    return rows


def _layer_norm(ctx: Context, dtype_name) -> list:
    from .. import layernorm

    n, c = ctx.sizes.layer_norm
    # gptfast with fp32 weights (mixed precision); the baselines need x's dtype
    impls = layernorm.implementations(param_dtype_is_x=False)
    table = layernorm.bench_size(n, c, DTYPES[dtype_name], impls, device=ctx.device,
                                 meter=ctx.meter)
    rows = []
    for column, measured in table["measured"].items():
        impl, _, direction = column.partition(" ")
        nbytes = table["bytes"][column]
        rows.append(timed_row(
            "kernels", f"layer_norm {n}x{c} {dtype_name} {direction or 'copy'}", impl,
            "tb_per_s", "TB/s", measured, lambda ms, nbytes=nbytes: nbytes / ms / 1e9,
            shape=f"{n}x{c}", op="layer_norm", dtype=dtype_name, direction=direction or "copy",
            ceiling_of="copy"))
    # the copy of the same tensor is a ceiling, not a peer
    add_peer_ratios(rows, "gptfast", [name for name in impls if name != "gptfast"])
    return rows


def _loss_rows(kernel, table, shape, name, work, ceiling_of, dtype_name) -> list:
    rows = []
    for impl, measured in table["measured"].items():
        common = dict(shape=shape, op=kernel, dtype=dtype_name, direction="fwd+bwd")
        rows.append(timed_row("kernels", name, impl, "ms", "ms", measured, lambda ms: ms,
                               ceiling_of=ceiling_of, work_at_ceiling=work, **common))
        rows.append(row("kernels", name, impl, "extra_mb", measured.extra_mb, "MB",
                        status={"ok": "ok", "oom": "oom"}.get(measured.status, "error"),
                        message=measured.error, **common))
    return rows


def _cross_entropy(ctx: Context) -> list:
    from .. import cross_entropy

    n, v = ctx.sizes.ce_rows, ctx.sizes.vocab
    dtype = torch.bfloat16
    providers = cross_entropy.cross_entropy_providers()
    table, _ = cross_entropy.bench_cross_entropy(n, v, dtype, providers, device=ctx.device,
                                                 meter=ctx.meter)
    element = torch.empty(0, dtype=dtype).element_size()
    rows = _loss_rows("cross_entropy", table, f"{n}x{v}", f"cross_entropy N{n} V{v} bf16",
                      2 * n * v * element, "copy", "bf16")  # read logits + write their grad
    add_peer_ratios(rows, "gptfast", [p for p in providers if p != "gptfast"])
    return rows


def _linear_cross_entropy(ctx: Context) -> list:
    from .. import cross_entropy

    n, c, v = ctx.sizes.ce_rows, ctx.sizes.hidden, ctx.sizes.vocab
    providers = cross_entropy.linear_providers()
    table, _ = cross_entropy.bench_linear(n, c, v, torch.bfloat16, providers, device=ctx.device,
                                          meter=ctx.meter)
    rows = _loss_rows("linear_cross_entropy", table, f"{n}x{c} @ {v}x{c}",
                      f"linear_cross_entropy N{n} C{c} V{v} bf16", 6 * n * c * v, "matmul",
                      "bf16")  # 3 GEMMs of 2 N C V FLOPs
    add_peer_ratios(rows, "gptfast", [p for p in providers if p != "gptfast"])
    return rows


def _bandwidth_rows(op, name, table, shape, dtype_name) -> list:
    """TB/s rows of a bench table keyed "impl direction" (and "copy", the ceiling's peer)."""
    rows = []
    for column, measured in table["measured"].items():
        impl, _, direction = column.partition(" ")
        common = dict(shape=shape, op=op, dtype=dtype_name, direction=direction or "copy")
        if measured.status == "unavailable":
            rows.append(row("kernels", f"{name} {direction}", impl, "tb_per_s", None, "TB/s",
                            status="unavailable", message=measured.error, **common))
            continue
        nbytes = table["bytes"][column]
        rows.append(timed_row("kernels", f"{name} {direction or 'copy'}", impl, "tb_per_s",
                               "TB/s", measured, lambda ms, nbytes=nbytes: nbytes / ms / 1e9,
                               ceiling_of="copy", **common))
    add_peer_ratios(rows, "gptfast", sorted({r["impl"] for r in rows} - {"gptfast", "copy"}))
    return rows


def _nanochat_norm(ctx: Context) -> list:
    """nanochat's norm: parameter-free F.rms_norm with the dtype's eps, bf16."""
    from .. import layernorm

    n, c = ctx.sizes.nanochat_norm
    impls = layernorm.implementations(param_dtype_is_x=True, op="rms_norm_no_weight")
    table = layernorm.bench_size(n, c, torch.bfloat16, impls, device=ctx.device,
                                 meter=ctx.meter, op="rms_norm_no_weight")
    return _bandwidth_rows("rms_norm", f"rms_norm no weight {n}x{c} bf16", table, f"{n}x{c}",
                           "bf16")


def _nanochat_rotary(ctx: Context) -> list:
    """rotary_qk_norm against nanochat's rotate, rms_norm, * 1.2 (bench/rotary.py), bf16."""
    from .. import rotary

    shape = ctx.sizes.nanochat_rotary
    table = rotary.bench_shape(shape, torch.bfloat16, rotary.implementations(),
                               device=ctx.device, meter=ctx.meter)
    text = "B{} T{} H{} Hkv{} D{}".format(*shape)
    return _bandwidth_rows("rotary_qk_norm", f"rotary_qk_norm {text} bf16", table, text, "bf16")


NANOCHAT_SOFTCAP = 15.0


def _softcap_linear_cross_entropy(ctx: Context) -> list:
    """nanochat's loss: cross_entropy of 15 * tanh(fp32 logits / 15), bf16 x and weight."""
    from .. import cross_entropy

    n, c, v = ctx.sizes.nanochat_softcap_ce
    providers = cross_entropy.linear_providers(softcap=NANOCHAT_SOFTCAP)
    table, _ = cross_entropy.bench_linear(n, c, v, torch.bfloat16, providers, device=ctx.device,
                                          meter=ctx.meter, softcap=NANOCHAT_SOFTCAP)
    rows = _loss_rows("linear_cross_entropy_softcap", table, f"{n}x{c} @ {v}x{c}",
                      f"linear_cross_entropy softcap15 N{n} C{c} V{v} bf16", 6 * n * c * v,
                      "matmul", "bf16")
    add_peer_ratios(rows, "gptfast", [p for p in providers if p != "gptfast"])
    return rows


def kernels_units(ctx: Context, clock) -> list:
    s = ctx.sizes
    units = [Unit(f"attention {group} H{heads} T{seq}",
                  lambda a=(group, d, heads, seq): _attention(ctx, *a, clock), 40)
             for group, d, heads, seq in s.attention]
    units += [Unit(f"document attention hd{d} T{seq} doc{doc} window {window}",
                   lambda a=(d, heads, seq, doc, window): _document_attention(ctx, *a, clock), 60)
              for d, heads, seq, doc, window in s.document_attention]
    units += [Unit(f"layer_norm {s.layer_norm[0]}x{s.layer_norm[1]} {dtype}",
                   lambda dtype=dtype: _layer_norm(ctx, dtype), 40) for dtype in ("fp32", "bf16")]
    units += [Unit(f"cross_entropy N{s.ce_rows}", lambda: _cross_entropy(ctx), 30),
              Unit(f"linear_cross_entropy N{s.ce_rows}", lambda: _linear_cross_entropy(ctx), 30)]
    if s.nanochat_norm:
        units += [Unit("nanochat rms_norm (no weight)", lambda: _nanochat_norm(ctx), 30),
                  Unit("nanochat rotary_qk_norm", lambda: _nanochat_rotary(ctx), 30),
                  Unit("nanochat softcapped linear_cross_entropy",
                       lambda: _softcap_linear_cross_entropy(ctx), 30)]
    return units


# -------------------------------------------------------------------------------- gpt --

GPT_IMPLS = ("gptfast-compile", "nanogpt-compile", "gptfast", "nanogpt-eager")
GPT_PEERS = ("nanogpt-compile", "nanogpt-eager")


def _gpt_cell(ctx: Context, impl, batch, arch="gpt2") -> list:
    """A training-step cell: GPT-2 at the goal shapes, or (arch "nanochat") our modern GPT or
    nanochat's own model at ``sizes.nanochat_gpt``."""
    from .. import gpt

    s = ctx.sizes
    model, seq = s.gpt_model, s.gpt_seq
    if arch == "nanochat":
        model, batch, seq = s.nanochat_gpt
    settings = gpt.GPTSettings(model=s.gpt_model, device=ctx.device, dtype="bf16",
                               warmup=s.gpt_warmup, repeats=s.gpt_repeats,
                               nanochat_model=s.nanochat_gpt[0] if s.nanochat_gpt else "")
    with gpt.nanogpt_matmul_precision(ctx.device):
        result = gpt.run_cell(gpt.GPTCell("train", impl, batch, seq, arch=arch), settings)
    impl = result["impl"]
    name = f"{model} train B{batch} T{seq}"
    shape = f"B{batch} T{seq}"
    common = dict(shape=shape, op="gpt", batch_size=batch, arch=arch,
                  goal_cell=arch == "gpt2" and batch == s.gpt_batches[0])
    if result["status"] != "ok":
        return [row("gpt", name, impl, "tokens_per_s", None, "tok/s",
                    status=result["status"], message=result.get("error"), **common)]
    ms = result["step_ms"]
    tokens = batch * seq
    flops_per_step = result["tflops"] * 1e12 * ms / 1e3
    return [
        row("gpt", name, impl, "tokens_per_s", result["tokens_per_s"], "tok/s",
            p20=tokens / (result["step_ms_p80"] / 1e3), p80=tokens / (result["step_ms_p20"] / 1e3),
            first_call_s=result["first_step_s"], **common),
        row("gpt", name, impl, "step_ms", ms, "ms", p20=result["step_ms_p20"],
            p80=result["step_ms_p80"], ceiling_of="matmul", work_at_ceiling=flops_per_step,
            **common),
        row("gpt", name, impl, "mfu", result["mfu"], "of 989 TFLOP/s",
            status="ok" if result["mfu"] is not None else "unavailable",
            message=None if result["mfu"] is not None else "no bf16 peak known for this device",
            **common),
        row("gpt", name, impl, "peak_gb", result["peak_mem_gb"], "GB", **common),
        row("gpt", name, impl, "warmup_s", result["warmup_s"], "s",
            message=f"{result['warmup_steps']} warm-up steps, the first (compilation) included",
            **common),
    ]


NANOCHAT_GPT_IMPLS = ("gptfast-compile", "nanochat-compile", "gptfast", "nanochat-eager")
NANOCHAT_GPT_PEERS = ("nanochat-compile", "nanochat-eager")


def gpt_units(ctx: Context) -> list:
    """The goal cell's units, then the nanochat step's (before the other GPT-2 batch sizes, so
    that a tight box drops those first)."""
    units = [Unit(f"gpt train {impl} B{batch}", lambda i=impl, b=batch: _gpt_cell(ctx, i, b),
                  60 if "compile" in impl else 15)
             for batch in ctx.sizes.gpt_batches for impl in GPT_IMPLS]
    if ctx.sizes.nanochat_gpt:
        model, batch, seq = ctx.sizes.nanochat_gpt
        nanochat = [Unit(f"{model} train {impl} B{batch} T{seq}",
                         lambda i=impl: _gpt_cell(ctx, i, None, arch="nanochat"),
                         90 if "compile" in impl else 20) for impl in NANOCHAT_GPT_IMPLS]
        goal = len(GPT_IMPLS)
        units = units[:goal] + nanochat + units[goal:]
    return units


def add_gpt_ratios(rows: list) -> None:
    gpt_rows = [r for r in rows if r["stage"] == "gpt"]
    add_peer_ratios(gpt_rows, ("gptfast", "gptfast-compile"), GPT_PEERS)
    add_peer_ratios(gpt_rows, ("gptfast nanochat", "gptfast-compile nanochat"),
                    NANOCHAT_GPT_PEERS)


# ----------------------------------------------------------------------------- loader --

def _loader(ctx: Context) -> list:
    missing = loader_suite.missing_reason()
    if missing is not None:
        return [row("loader", "loader", "gptfast-TokenLoader", "tokens_per_s", None, "tok/s",
                    status="unavailable", message=missing)]
    rows = []
    for r in loader_suite.measure(ctx.device, ctx.sizes.loader):
        name = f"loader B{r['batch_size']} T{r['context_length']} to {ctx.device.type}"
        rows.append(row("loader", name, r["impl"], "tokens_per_s", r["tokens_per_s"], "tok/s",
                        shape=f"B{r['batch_size']} T{r['context_length']}",
                        ms_per_batch=r["ms_per_batch"], workers=r.get("workers")))
    add_peer_ratios(rows, "gptfast-TokenLoader", ("nanogpt-get_batch",))
    return rows


def loader_units(ctx: Context) -> list:
    return [Unit("loader TokenLoader vs nanoGPT get_batch", lambda: _loader(ctx), 20)]
