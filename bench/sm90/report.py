"""The sm_90 report's output: the per-config table (plain or markdown), the per-kernel summary,
the comparison of saved reports (one column per Triton version), and what the CI gate rejects
(:func:`problems`: spills, shared memory, non-wgmma dots; :func:`autotune_key_gaps`)."""

from __future__ import annotations

from .record import SMEM_PER_BLOCK, Record


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
