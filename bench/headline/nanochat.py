"""The ``nanochat`` stage of ``gptfast bench --suite headline``: nanochat's attention shapes,
gptfast against nanochat's SDPA fallback, FlexAttention and FA2/FA3, measured by the per-kernel
module :mod:`gptfast.bench.nanochat_attention` and turned here into headline rows (TFLOP/s on
the visible pairs, ms, extra MB, and each output's error against the fp32 reference).
"""

from __future__ import annotations

from .. import nanochat_attention
from ..common import DTYPES
from ..document_attention import forward_flops
from ..nanochat_attention import PEERS, Case
from .correct import TOLERANCE
from .report import add_peer_ratios, row, timed_row
from .stages import Unit


def nanochat_rows(case: Case, results: list, dtype_name: str, autotune_s: float) -> list:
    rows = []
    for r in results:
        direction, provider = r["direction"], r["provider"]
        name = f"nanochat_attention {case.shape} {direction}"
        work = forward_flops(r["pairs"], case.heads, case.head_dim) * (
            3.5 if direction == "fwd+bwd" else 1.0)
        common = dict(shape=case.shape, op="nanochat_attention", direction=direction,
                      dtype=dtype_name, pairs=r["pairs"], window_left=case.window_left,
                      doc_mean=case.doc_mean, documents=r["documents"], note=r.get("note"))
        if provider == "gptfast" and direction == "fwd+bwd":
            common["autotune_s"] = autotune_s
        if r["status"] == "unavailable":
            rows.append(row("nanochat", name, provider, "tflops", None, "TFLOP/s",
                            status="unavailable", message=r["error"], **common))
            continue
        m = r["measured"]
        rows.append(timed_row("nanochat", name, provider, "tflops", "TFLOP/s", m,
                              lambda ms, work=work: work / ms / 1e9, ceiling_of="matmul",
                              **common))
        rows.append(timed_row("nanochat", name, provider, "ms", "ms", m, lambda ms: ms, **common))
        if m.extra_mb is not None or m.status != "ok":  # a CPU has no allocator peak
            rows.append(row("nanochat", name, provider, "extra_mb", m.extra_mb, "MB",
                            status={"ok": "ok", "oom": "oom"}.get(m.status, "error"),
                            message=m.error, **common))
        tolerance = TOLERANCE[dtype_name]
        for output, errors in (r.get("errors") or {}).items():
            check = f"nanochat_attention {case.shape} {provider} vs fp32 reference"
            if output == "error":  # no reference (did not fit), or the check itself failed
                missing = errors.startswith("no fp32 reference")
                rows.append(row("nanochat", check, provider, "rel_err", None, "",
                                status="unavailable" if missing else "error", message=errors,
                                **common))
                continue
            rel, max_abs = errors
            rows.append(row("nanochat", f"{check} {output}", provider, "rel_err", rel, "",
                            status="ok" if rel <= tolerance else "fail", tolerance=tolerance,
                            max_abs_err=max_abs, message=None if rel <= tolerance else
                            f"rel_err {rel:.3g} > {tolerance:g}", **common))
    for metric in ("tflops", "ms", "extra_mb"):
        add_peer_ratios([r for r in rows if r["metric"] == metric], "gptfast", PEERS)
    return rows


def nanochat_units(ctx, clock) -> list:
    """The ``nanochat`` stage of ``gptfast bench --suite headline``: one unit per case (the
    tiny CPU cases in a dry run), bf16 on CUDA, fp32 on a CPU."""
    dtype_name = "bf16" if ctx.meter.cuda else "fp32"

    def run(case):
        before = clock.snapshot()[0]
        results = nanochat_attention.bench_case(case, DTYPES[dtype_name], device=ctx.device,
                                                meter=ctx.meter)
        return nanochat_rows(case, results, dtype_name, clock.snapshot()[0] - before)

    return [Unit(f"nanochat attention {case.shape}", lambda case=case: run(case), 60)
            for case in nanochat_attention.cases_for(ctx.device)]
