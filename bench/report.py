"""The report of the ``gptfast bench`` sweep: one console line per row, and results.md.

The rows themselves are written as the sweep goes by :class:`.common.ResultsWriter`, each with
the run's context (run id, device, dtype, versions, git commit, :func:`.common.run_context`),
so a results.jsonl file stands on its own. Numbers are meant to be compared within one run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .common import markdown_table

# ----------------------------------------------------------------------------- formats --

def rate(value: Optional[float]) -> str:
    """123456 -> "123.5k", 1.5e6 -> "1.50M", 2.5e9 -> "2.50G"."""
    if value is None:
        return "-"
    if value >= 1e9:
        return f"{value / 1e9:.2f}G"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _num(value) -> str:
    """3 significant digits, without exponents for large values: 2000, 823, 1.25, 0.0123."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_row(row: dict) -> str:
    """One console line per result row."""
    suite = row["suite"]
    if suite == "gpt":
        head = (f"{row['mode']:<5} {row['impl']:<17} B={row['batch_size']:<3} "
                f"T={row['context_length']:<5}")
        if row["status"] != "ok":
            return f"{head} {row['status']}" + (f": {row['error']}" if row.get("error") else "")
        mfu = "" if row["mfu"] is None else f"  MFU {row['mfu']:.1%}"
        memory = "" if row["peak_mem_gb"] is None else f"  peak {row['peak_mem_gb']:.2f} GB"
        return (f"{head} {rate(row['tokens_per_s']):>7} tok/s  {row['step_ms']:8.2f} ms  "
                f"{row['tflops']:.3g} TFLOP/s{mfu}{memory}  first step {row['first_step_s']:.1f} s")
    if suite == "kernels":
        head = f"{row['kernel']} {row['shape']} {row['impl']} {row['pass']}"
        if row["status"] != "ok":
            return f"{head}: {row['status']}" + (f" ({row['note']})" if row.get("note") else "")
        memory = "" if row.get("extra_mb") is None else f", extra {row['extra_mb']:.0f} MB"
        return f"{head}: {_num(row['throughput'])} {row['unit']}{memory}"
    return (f"loader {row['impl']} B={row['batch_size']} T={row['context_length']}: "
            f"{row['ms_per_batch']:.3f} ms/batch, {rate(row['tokens_per_s'])} tok/s")


# ---------------------------------------------------------------------------- markdown --

MODE_TITLES = {"train": "training step (forward, backward, AdamW)",
               "infer": "inference forward (loss of every position, no grad)"}


def _ordered(values, order=()):
    """Distinct values, those named in ``order`` first in that order, the rest sorted."""
    distinct = list(dict.fromkeys(values))
    return [v for v in order if v in distinct] + sorted(v for v in distinct if v not in order)


def _grid_cell(row, base):
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    text = rate(row["tokens_per_s"])
    if base is not None and base is not row and base["status"] == "ok":
        text += f" ({row['tokens_per_s'] / base['tokens_per_s']:.2f}x)"
    return text


def _gpt_section(rows, baseline, impl_order, arch_baselines=None) -> list[str]:
    """Tables per mode; each impl's speed-ups are against the baseline of its row's arch."""
    arch_of = {r["impl"]: r.get("arch", "gpt2") for r in rows}
    lines = []
    for mode in _ordered((r["mode"] for r in rows), ("train", "infer")):
        of_mode = [r for r in rows if r["mode"] == mode]
        cell = {(r["impl"], r["batch_size"], r["context_length"]): r for r in of_mode}
        batches = _ordered(r["batch_size"] for r in of_mode)
        seqs = _ordered(r["context_length"] for r in of_mode)
        lines += [f"## GPT {MODE_TITLES.get(mode, mode)}", ""]
        bases = [b for b in dict.fromkeys([baseline, *(arch_baselines or {}).values()])
                 if any(r["impl"] == b for r in of_mode)]
        lines += ["tokens/s" + (f" (speed-up vs {' or '.join(bases)}, its arch's baseline, in "
                                "the same cell)" if len(bases) > 1 else
                                f" (speed-up vs {bases[0]} in the same cell)" if bases else "")
                  + "; rows: context length T, columns: batch size B"
                  + "; oom: out of memory, -: not run (B*T above --max-tokens or not reached)", ""]
        for impl in _ordered((r["impl"] for r in of_mode), impl_order):
            lines += [f"### {impl}", ""]
            table = []
            base = (arch_baselines or {}).get(arch_of[impl], baseline)
            for seq in seqs:
                entry = {"T \\ B": seq}
                for batch in batches:
                    entry[str(batch)] = _grid_cell(cell.get((impl, batch, seq)),
                                                   cell.get((base, batch, seq)))
                table.append(entry)
            lines += [markdown_table(table, ["T \\ B", *map(str, batches)]), ""]
        lines += ["### every cell", ""]
        table = []
        for r in of_mode:
            ok = r["status"] == "ok"
            table.append({
                "impl": r["impl"], "B": r["batch_size"], "T": r["context_length"],
                "status": r["status"] if ok
                else f"{r['status']}: {r.get('error', '')}"[:120].replace("|", "/"),
                "tokens/s": rate(r.get("tokens_per_s")),
                "step ms": _num(r.get("step_ms")),
                "p20-p80 ms": f"{_num(r['step_ms_p20'])}-{_num(r['step_ms_p80'])}" if ok else "-",
                "TFLOP/s": _num(r.get("tflops")),
                "MFU": "-" if r.get("mfu") is None else f"{r['mfu']:.1%}",
                "peak GB": _num(r.get("peak_mem_gb")),
                "first step s": _num(r.get("first_step_s")),
                "warm-up s": _num(r.get("warmup_s")),
            })
        lines += [markdown_table(table, list(table[0])), ""]
    return lines


KERNEL_ORDER = ("layer_norm", "rms_norm", "add_rms_norm", "cross_entropy", "linear_cross_entropy",
                "causal_attention", "document_attention", "nanochat_attention")


def kernel_column(row) -> str:
    """The table column (and plot label) of a kernel row: impl and pass, e.g. "eager fwd"."""
    return row["impl"] if row["impl"] == row["pass"] else f"{row['impl']} {row['pass']}"


def _kernel_cell(row):
    if row["status"] != "ok":
        return row["status"]
    if row.get("ms") is None:
        return _num(row["throughput"])
    if row.get("extra_mb") is None:
        return f"{_num(row['throughput'])} ({_num(row['ms'])} ms)"
    return f"{_num(row['throughput'])} ({_num(row['ms'])} ms, {_num(row['extra_mb'])} MB)"


def _kernel_section(rows) -> list[str]:
    lines = ["## Kernels", "",
             "layer_norm, rms_norm, add_rms_norm: GB/s as bench/layernorm.py counts bytes; cross_entropy: GB/s of "
             "reading the logits and writing their gradient; linear_cross_entropy: TFLOP/s of "
             "its 3 GEMMs; both with (fwd+bwd ms, extra peak MB); causal_attention: TFLOP/s "
             "(fwd = 2 B H T^2 D, fwd+bwd = 3.5 x fwd); document_attention: TFLOP/s on the "
             "attended pairs P of the mask (fwd = 4 P H D; gptfast causal on its causal pairs) "
             "(ms); nanochat_attention: TFLOP/s on the visible pairs (fwd = 4 P H D) (ms, "
             "extra peak MB)", ""]
    for kernel in _ordered((r["kernel"] for r in rows), KERNEL_ORDER):
        of_kernel = [r for r in rows if r["kernel"] == kernel]
        columns = list(dict.fromkeys(kernel_column(r) for r in of_kernel))
        table = {}
        for r in of_kernel:
            table.setdefault(r["shape"], {"shape": r["shape"]})[kernel_column(r)] = _kernel_cell(r)
        lines += [f"### {kernel} ({of_kernel[0]['unit']})", "",
                  markdown_table(list(table.values()), ["shape", *columns]), ""]
        notes = sorted({f"{r['impl']} {r['shape']}: {r['note']}" for r in of_kernel if r.get("note")})
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    return lines


def _loader_section(rows) -> list[str]:
    table = {}
    for r in rows:
        key = f"{r['batch_size']} x {r['context_length']}"
        entry = table.setdefault(key, {"B x T": key})
        entry[f"{r['impl']} ms/batch"] = f"{r['ms_per_batch']:.3g}"
        entry[f"{r['impl']} tok/s"] = rate(r["tokens_per_s"])
        if r.get("speedup") is not None:
            entry["speed-up"] = f"{r['speedup']:.1f}x"
    columns = list(dict.fromkeys(c for entry in table.values() for c in entry))
    return ["## Token loading", "",
            "time per batch of B x T int64 tokens after warm-up (random windows of one shard)", "",
            markdown_table(list(table.values()), columns), ""]


def markdown(rows: list[dict], meta: dict) -> str:
    """The whole report: a header, then one section per suite that produced rows."""
    versions = meta["versions"]
    commit = meta.get("git_commit")
    lines = [
        f"# gptfast bench, {meta['run']}", "",
        f"- device: {meta['device_name']}",
        f"- dtype: {meta['dtype']}" + (f"; model: {meta['model']}" if meta.get("model") else ""),
        f"- torch {versions['torch']}, triton {versions['triton'] or 'none'}, "
        f"gptfast {versions['gptfast']}, commit "
        + (f"{commit[:12]}{' (with local changes)' if meta.get('git_dirty') else ''}"
           if commit else "none (not a git checkout)"),
        f"- settings: {meta['settings']}",
        f"- {'INTERRUPTED: only the cells finished before Ctrl-C' if meta.get('interrupted') else 'complete'}"
        f", {len(rows)} rows in {meta.get('elapsed_s', 0):.0f} s",
    ]
    lines += [f"- {note}" for note in meta.get("notes", [])] + [""]
    gpt = [r for r in rows if r["suite"] == "gpt"]
    kernels = [r for r in rows if r["suite"] == "kernels"]
    loader = [r for r in rows if r["suite"] == "loader"]
    if gpt:
        lines += _gpt_section(gpt, meta.get("baseline"), meta.get("impl_order", ()),
                              meta.get("arch_baselines", {}))
    if kernels:
        lines += _kernel_section(kernels)
    if loader:
        lines += _loader_section(loader)
    return "\n".join(lines)


def write_markdown(rows: list[dict], path: Path, meta: dict) -> Path:
    Path(path).write_text(markdown(rows, meta))
    return Path(path)
