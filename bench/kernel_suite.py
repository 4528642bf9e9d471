"""The kernels suite of ``gptfast bench``: the kernel benchmarks run from one place, as rows.

It calls the measuring functions of :mod:`.layernorm`, :mod:`.cross_entropy` and
:mod:`.attention` (gptfast against torch eager, torch.compile, the SDPA backends and Liger
when it imports) and turns each of their table rows into one result row per implementation
and pass, with a throughput to plot:

- ``layer_norm``: GB/s as the LayerNorm benchmark counts bytes (also the device copy ceiling);
- ``rms_norm``, ``add_rms_norm``: the same at the same (N, C) sizes, against F.rms_norm eager
  and compiled and Liger's RMSNorm / fused add + RMSNorm ("n/a" rows when Liger is missing);
- ``cross_entropy``: fwd+bwd ms and extra peak MB, and GB/s of reading the N x V logits and
  writing their gradient (2 N V bytes-per-element / time), the traffic floor of the loss;
- ``linear_cross_entropy``: fwd+bwd ms and extra MB, and TFLOP/s of its three GEMMs (6 N C V);
- ``causal_attention``: TFLOP/s fwd and fwd+bwd (fwd = 2 B H T^2 D, fwd+bwd = 3.5 x fwd).
- ``rotary_qk_norm``: GB/s as :mod:`.rotary` counts bytes (q, k views of a fused projection;
  nanochat's rotary + QK norm + scale in eager torch, compiled, Liger's RoPE + torch's norm).
- ``document_attention`` (``--attention document``): :mod:`.document_attention` at T=8192,
  gptfast's document/window kernel against FlexAttention with the same block mask, SDPA with
  a dense boolean mask and gptfast's plain causal kernel; TFLOP/s counted on the attended pairs
  (4 P H D forward), with the milliseconds.
- ``nanochat_attention``: :mod:`.nanochat_attention`, nanochat's shapes (B16 T2048 H10 D128,
  windows 768 and 2048; varlen T8192 documents of mean 2048): gptfast against nanochat's SDPA
  fallback, FlexAttention, FA2 and FA3; TFLOP/s on the visible pairs, ms and extra MB. On a CPU
  this is the one kernel unit that runs (:data:`CPU`, tiny cases).

``attention`` (the ``--attention`` axis) picks the attention units: "causal" (the sweep over
T above) and/or "document".

The kernels are Triton kernels timed on a CUDA device; there is nothing to time on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import document_attention, nanochat_attention
from .common import DTYPES, Meter

REQUIRES = "a CUDA device (the Triton kernels are timed on the GPU)"
VOCAB = 50257          # GPT-2's vocabulary, as in bench/ANCHORS.md
HIDDEN = 768           # GPT-2 124M's width, for the fused linear + cross-entropy
ATTENTION_TOKENS = 16384  # B * T per attention call


@dataclasses.dataclass(frozen=True)
class KernelSizes:
    layer_norm: tuple       # (N, C) pairs, also for rms_norm and add_rms_norm
    cross_entropy: tuple    # N rows
    linear: tuple           # N rows
    head_dims: tuple
    attention_seq: tuple    # T values
    document_seq: int = document_attention.DEFAULT_SEQ
    document_cases: tuple = document_attention.default_cases()
    nanochat: tuple = nanochat_attention.GPU_CASES
    rotary: tuple = ((4, 2048, 10, 10, 128), (8, 2048, 10, 10, 128), (32, 2048, 10, 10, 128))


FULL = KernelSizes(layer_norm=((16384, 768), (65536, 768), (16384, 4096), (8192, 8192)),
                   cross_entropy=(8192, 16384, 32768), linear=(16384, 32768),
                   head_dims=(64, 128), attention_seq=(512, 1024, 2048, 4096, 8192, 16384))
QUICK = KernelSizes(layer_norm=((16384, 768),), cross_entropy=(8192,), linear=(8192,),
                    head_dims=(64,), attention_seq=(1024, 4096),
                    document_cases=(document_attention.Case(2048, None),
                                    document_attention.Case(256, document_attention.DEFAULT_WINDOW)),
                    rotary=((8, 2048, 10, 10, 128),))  # (B, T, H, Hkv, D): nanochat-d20, B8 T2048
# a CPU run: only the nanochat attention cases, tiny (the other kernels are timed on a GPU)
CPU = KernelSizes(layer_norm=(), cross_entropy=(), linear=(), head_dims=(), attention_seq=(),
                  document_cases=(), nanochat=nanochat_attention.CPU_CASES, rotary=())
ATTENTIONS = ("causal", "document")


def _pair(text) -> Optional[tuple]:
    """"1.25 / 300.0" -> (1.25, 300.0); "OOM", "n/a" and the like -> None."""
    try:
        first, second = (float(part) for part in str(text).split("/"))
    except ValueError:
        return None
    return first, second


def _status(text) -> str:
    return "oom" if str(text).strip().upper() == "OOM" else "error"


def _note(notes, prefix):
    """The reason a benchmark gave for a provider's "n/a": its note starting with ``prefix``."""
    found = [note[len(prefix):] for note in notes if note.startswith(prefix)]
    return found[0] if found else None


class KernelSuite:
    """Builds the providers of each kernel benchmark once, on first use, and measures sizes."""

    def __init__(self, dtype: str, sizes: KernelSizes, attention: tuple = ("causal",),
                 device="cuda"):
        self.dtype = DTYPES[dtype]
        self.sizes = sizes
        self.attention_kinds = attention
        self.device = torch.device(device)
        self._providers = {}

    def _get(self, name, build):
        if name not in self._providers:
            torch._dynamo.reset()  # each benchmark's torch.compile baselines start cold
            self._providers[name] = build()
        return self._providers[name]

    def units(self) -> list:
        """(label, run) pairs, one per kernel size; run() returns result rows."""
        s = self.sizes
        units = [(f"kernels layer_norm {n}x{c}", lambda n=n, c=c: self.layer_norm(n, c))
                 for n, c in s.layer_norm]
        units += [(f"kernels {op} {n}x{c}", lambda op=op, n=n, c=c: self.rms_norm(op, n, c))
                  for op in ("rms_norm", "add_rms_norm") for n, c in s.layer_norm]
        units += [(f"kernels cross_entropy N={n}", lambda n=n: self.cross_entropy(n))
                  for n in s.cross_entropy]
        units += [(f"kernels linear_cross_entropy N={n}", lambda n=n: self.linear(n))
                  for n in s.linear]
        units += [(f"kernels rotary_qk_norm {'x'.join(map(str, shape))}",
                   lambda shape=shape: self.rotary(shape)) for shape in s.rotary]
        if "causal" in self.attention_kinds:
            units += [(f"kernels causal_attention hd={d} T={t}", lambda d=d, t=t: self.attention(d, t))
                      for d in s.head_dims for t in s.attention_seq]
        if "document" in self.attention_kinds:
            units += [(f"kernels document_attention hd={d} T={s.document_seq} {case.label}",
                       lambda d=d, case=case: self.document(d, s.document_seq, case))
                      for d in s.head_dims for case in s.document_cases]
        units += [(f"kernels nanochat_attention {case.shape}",
                   lambda case=case: self.nanochat(case)) for case in s.nanochat]
        return units

    def _row(self, kernel, impl, direction, shape, size, unit, throughput, **extra):
        status = extra.pop("status", "ok" if throughput is not None else "error")
        return {"suite": "kernels", "kernel": kernel, "impl": impl, "pass": direction,
                "shape": shape, "size": size, "unit": unit, "throughput": throughput,
                "status": status, "batch_size": extra.pop("batch_size", None),
                "context_length": extra.pop("context_length", None), **extra}

    def layer_norm(self, n: int, c: int) -> list:
        from . import layernorm

        # gptfast with fp32 weights (mixed precision); the baselines need x's dtype
        impls = self._get("layer_norm", lambda: layernorm.implementations(param_dtype_is_x=False))
        table = layernorm.bench_size(n, c, self.dtype, impls)
        shape = f"{n}x{c}"
        failed = "failed or out of memory (the reason is in the benchmark's stderr output)"
        cells = [("copy", "copy", table["copy"])]
        cells += [(name, direction, table[f"{name} {direction}"])
                  for name in impls for direction in ("fwd", "fwd+bwd")]
        return [self._row("layer_norm", name, direction, shape, n * c, "GB/s", gbps,
                          note=None if gbps is not None else failed)
                for name, direction, gbps in cells]

    def rms_norm(self, op: str, n: int, c: int) -> list:
        """rms_norm or add_rms_norm rows, as :meth:`layer_norm` (Liger: "n/a" when missing)."""
        from . import layernorm

        impls = self._get(op, lambda: layernorm.implementations(param_dtype_is_x=False, op=op))
        table = layernorm.bench_size(n, c, self.dtype, impls, op=op)
        shape = f"{n}x{c}"
        failed = "failed or out of memory (the reason is in the benchmark's stderr output)"
        rows = [self._row(op, name, direction, shape, n * c, "GB/s", table[f"{name} {direction}"],
                          note=None if table[f"{name} {direction}"] is not None else failed)
                for name in impls for direction in ("fwd", "fwd+bwd")]
        missing = layernorm.liger_unavailable(op) if "liger" not in impls else None
        if missing:
            rows += [self._row(op, "liger", direction, shape, n * c, "GB/s", None, status="n/a",
                               note=missing) for direction in ("fwd", "fwd+bwd")]
        return rows

    def rotary(self, shape) -> list:
        from . import rotary

        impls = self._get("rotary_qk_norm", rotary.implementations)
        table = rotary.bench_shape(shape, self.dtype, impls)
        b, t, h, hkv, d = shape
        statuses = {"ok": "ok", "oom": "oom", "unavailable": "n/a"}
        rows = []
        for column, measured in table["measured"].items():
            name, _, direction = column.partition(" ")
            rows.append(self._row(
                "rotary_qk_norm", name, direction or name, f"B{b} T{t} H{h} Hkv{hkv} D{d}",
                b * t, "GB/s", table[column], status=statuses.get(measured.status, "error"),
                batch_size=b, context_length=t, heads=h, kv_heads=hkv, head_dim=d,
                max_abs_diff=table.get(f"{name} diff"), note=measured.error))
        return rows

    def _loss_rows(self, kernel, table, notes, providers, shape, size, unit, per_ms):
        """Rows of a loss benchmark's "ms / MB" cells; ``per_ms`` / ms is the throughput."""
        rows = []
        for name in providers:
            measured = _pair(table[name])
            ms, extra_mb = measured if measured else (None, None)
            rows.append(self._row(
                kernel, name, "fwd+bwd", shape, size, unit,
                None if ms is None else per_ms / ms,
                status="ok" if measured else _status(table[name]),
                ms=ms, extra_mb=extra_mb, loss_gap=table.get(f"{name} |dloss|"),
                note=_note(notes, f"{name} N={size}: ")))
        return rows

    def cross_entropy(self, n: int) -> list:
        from . import cross_entropy

        providers = self._get("cross_entropy", cross_entropy.cross_entropy_providers)
        table, notes = cross_entropy.bench_cross_entropy(n, VOCAB, self.dtype, providers)
        element = torch.empty(0, dtype=self.dtype).element_size()
        return self._loss_rows("cross_entropy", table, notes, providers, f"{n}x{VOCAB}", n,
                               "GB/s", 2 * n * VOCAB * element / 1e6)  # bytes / ms -> GB/s

    def linear(self, n: int) -> list:
        from . import cross_entropy

        providers = self._get("linear_cross_entropy", cross_entropy.linear_providers)
        table, notes = cross_entropy.bench_linear(n, HIDDEN, VOCAB, self.dtype, providers)
        return self._loss_rows("linear_cross_entropy", table, notes, providers,
                               f"{n}x{HIDDEN} @ {VOCAB}x{HIDDEN}", n, "TFLOP/s",
                               6 * n * HIDDEN * VOCAB / 1e9)  # FLOP / ms -> TFLOP/s

    def attention(self, head_dim: int, seq: int) -> list:
        from . import attention

        providers = list(attention.PROVIDERS)
        table, notes = attention.bench_shape(head_dim, seq, ATTENTION_TOKENS, self.dtype, providers)
        shape = f"B{table['B']} H{table['H']} T{seq} D{head_dim}"
        rows = []
        for name in providers:
            measured = _pair(table[name])
            for index, direction in enumerate(("fwd", "fwd+bwd")):
                rows.append(self._row(
                    "causal_attention", name, direction, shape, seq, "TFLOP/s",
                    measured[index] if measured else None,
                    status="ok" if measured else _status(table[name]),
                    batch_size=table["B"], context_length=seq, head_dim=head_dim,
                    heads=table["H"], note=_note(notes, f"{name} hd{head_dim} T{seq}: ")))
        return rows

    def document(self, head_dim: int, seq: int, case) -> list:
        results = document_attention.bench_case(case, seq, head_dim,
                                                 document_attention.heads_for(head_dim),
                                                 ATTENTION_TOKENS, self.dtype)
        rows = []
        for r in results:
            shape = f"B{r['B']} H{r['H']} T{seq} D{head_dim} {case.label}"
            status = {"ok": "ok", "oom": "oom", "unavailable": "n/a"}.get(r["status"], "error")
            rows.append(self._row(
                "document_attention", r["provider"], r["direction"], shape,
                case.doc_len or seq, "TFLOP/s", r["tflops"], status=status, ms=r["ms"],
                batch_size=r["B"], context_length=seq, head_dim=head_dim, heads=r["H"],
                doc_len=case.doc_len, window=case.window, pairs=r["pairs"],
                max_abs_diff=r.get("max_abs_diff"), note=r.get("error")))
        return rows

    def nanochat(self, case) -> list:
        # a CPU run: one untimed call and 2 samples (the interpreter is slow, the numbers moot)
        meter = None if self.device.type == "cuda" else Meter(self.device, warmup=0, repeats=20)
        results = nanochat_attention.bench_case(case, self.dtype, device=self.device, meter=meter)
        rows = []
        for r in results:
            status = {"ok": "ok", "oom": "oom", "unavailable": "n/a"}.get(r["status"], "error")
            errors = r.get("errors") or {}
            rows.append(self._row(
                "nanochat_attention", r["provider"], r["direction"], case.shape, case.seq,
                "TFLOP/s", r["tflops"], status=status, ms=r["ms"], extra_mb=r["extra_mb"],
                batch_size=case.batch, context_length=case.seq, head_dim=case.head_dim,
                heads=case.heads, window_left=case.window_left, doc_mean=case.doc_mean,
                pairs=r["pairs"], documents=r.get("documents"),
                rel_err={n: e[0] for n, e in errors.items() if n != "error"},
                note=r.get("error") or errors.get("error") or r.get("note")))
        return rows
