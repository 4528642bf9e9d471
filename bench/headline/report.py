"""Rows, verdict and markdown of ``gptfast bench --suite headline``.

Every result is one row (a dict) with at least::

    stage   env | correct | kernels | nanochat | gpt | loader
    name    what was measured, e.g. "causal_attention hd64 H12 T1024 fwd+bwd"
    impl    who: "gptfast", "SDPA cuDNN", "eager", "nanogpt-compile", "torch.matmul", ...
    shape   the problem size as text ("B16 H12 T1024 D64"), or null
    metric  e.g. "tflops", "tb_per_s", "ms", "extra_mb", "rel_err", "tokens_per_s"
    value   a number (a string for env facts such as the GPU name), null when not measured
    unit    "TFLOP/s", "TB/s", "ms", "MB", "GB", "tok/s", "s", ... ("" for plain facts)
    status  ok | fail (beyond tolerance) | oom | error | skipped-budget | interrupted |
            unavailable (not on this machine: a peer that does not import, no nvidia-smi)

and where a peer exists ``best_peer`` / ``ratio_to_best_peer`` (> 1: gptfast is better than the
best peer; for ms and MB that is the peer's figure over ours), where a ceiling of the ``env``
stage applies ``ratio_to_ceiling`` (the fraction of the measured matmul or copy rate), and for
timings ``p20``/``p80`` (the spread, in the row's unit). ``first_call_s`` and ``autotune_s`` are
the compile and autotune seconds of a measurement, never part of its timing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

from ..common import Measured, markdown_table

STAGES = ("env", "correct", "kernels", "nanochat", "gpt", "loader")
REQUIRED = ("stage", "name", "impl", "shape", "metric", "value", "unit", "status")
STATUSES = ("ok", "fail", "oom", "error", "skipped-budget", "interrupted", "unavailable")
# metrics where less is better: a ratio to a peer or a ceiling is inverted for them
LOWER_IS_BETTER = {"ms", "extra_mb", "peak_gb", "rel_err", "max_abs_err", "step_ms"}

# bench/ANCHORS.md: the figures and goals with their sources; headline.md links to a copy of it
ANCHORS_FILE = Path(__file__).parent.parent / "ANCHORS.md"
ANCHORS_IN_REPO = "bench/ANCHORS.md"
# its ceilings (H100 80GB HBM3, torch 2.11, triton 3.6), which the absolute goals were set against
ANCHOR_DEVICE = "H100"
ANCHOR_COPY_TBPS = 3.02
ANCHOR_MATMUL_TFLOPS = 767.0


def row(stage: str, name: str, impl: str, metric: str, value, unit: str, *, status: str = "ok",
        shape: Optional[str] = None, **extra) -> dict:
    """One result row; ``extra`` keys (message, p20, p80, dtype, ...) go in as they are."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    return {"stage": stage, "name": name, "impl": impl, "shape": shape, "metric": metric,
            "value": value, "unit": unit, "status": status, **extra}


def timed_row(stage, name, impl, metric, unit, measured: Measured, convert, shape=None,
              **extra):
    """A row whose value is ``convert(ms)`` of a Measured (its spread converted alike)."""
    if measured.status != "ok":
        return row(stage, name, impl, metric, None, unit, shape=shape,
                   status="oom" if measured.status == "oom" else "error",
                   message=measured.error, **extra)
    t = measured.timing
    values = sorted((convert(t.p20_ms), convert(t.p80_ms)))
    return row(stage, name, impl, metric, convert(t.median_ms), unit, shape=shape,
               p20=values[0], p80=values[1], first_call_s=measured.first_call_s, **extra)


def validate(rows: Iterable[dict]) -> list[str]:
    """The schema problems of ``rows`` (empty when they are fine)."""
    problems = []
    for index, r in enumerate(rows):
        where = f"row {index} ({r.get('stage')}/{r.get('name')}/{r.get('impl')})"
        missing = [key for key in REQUIRED if key not in r]
        if missing:
            problems.append(f"{where}: missing {missing}")
            continue
        if r["stage"] not in STAGES:
            problems.append(f"{where}: unknown stage {r['stage']!r}")
        if r["status"] not in STATUSES:
            problems.append(f"{where}: unknown status {r['status']!r}")
        for key in ("name", "impl", "metric", "unit"):
            if not isinstance(r[key], str):
                problems.append(f"{where}: {key} is not a string")
        value = r["value"]
        if value is not None and not isinstance(value, (int, float, str)):
            problems.append(f"{where}: value {value!r} is not a number, string or null")
        if isinstance(value, float) and not math.isfinite(value) and r["metric"] != "rel_err":
            problems.append(f"{where}: value {value!r} is not finite")
        if r["status"] == "ok" and value is None and r["metric"] not in ("extra_mb", "peak_gb"):
            problems.append(f"{where}: status ok without a value")
        if ("best_peer" in r) != ("ratio_to_best_peer" in r):
            problems.append(f"{where}: best_peer and ratio_to_best_peer come together")
    return problems


# ----------------------------------------------------------------------------- ratios --

def better_ratio(metric: str, ours: float, theirs: float) -> Optional[float]:
    """ours relative to theirs, > 1 when ours is better (higher throughput, fewer ms/MB)."""
    if ours is None or theirs is None:
        return None
    if metric in LOWER_IS_BETTER:
        return theirs / ours if ours > 0 else None
    return ours / theirs if theirs > 0 else None


def add_peer_ratios(rows: list[dict], ours: str | tuple, peers: Iterable[str]) -> None:
    """For each row of ``ours`` (an impl name or names), the best ok row of ``peers`` with the
    same name and metric: ``best_peer`` and ``ratio_to_best_peer`` (in place)."""
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    peers = tuple(peers)
    for r in rows:
        if r["impl"] not in ours:
            continue
        candidates = [p for p in rows if p["impl"] in peers and p["name"] == r["name"]
                      and p["metric"] == r["metric"] and p["status"] == "ok"
                      and isinstance(p["value"], (int, float))]
        if not candidates:
            continue
        lower = r["metric"] in LOWER_IS_BETTER
        best = (min if lower else max)(candidates, key=lambda p: p["value"])
        r["best_peer"] = best["impl"]
        r["ratio_to_best_peer"] = (better_ratio(r["metric"], r["value"], best["value"])
                                   if r["status"] == "ok" else None)


def ceilings(rows: list[dict]) -> dict:
    """{"matmul_tflops": .., "copy_tbps": ..} from the env stage's ok rows (missing: absent)."""
    found = {}
    for r in rows:
        if r["stage"] == "env" and r["status"] == "ok" and r.get("ceiling"):
            found[r["ceiling"]] = r["value"]
    return found


def add_ceiling_ratios(rows: list[dict]) -> None:
    """``ratio_to_ceiling`` for every row that says which ceiling it is measured against
    (``ceiling_of``: "matmul" or "copy") and how (``floor_ms_at_ceiling`` for times, else the
    value in the ceiling's unit)."""
    found = ceilings(rows)
    for r in rows:
        kind = r.get("ceiling_of")
        rate = found.get({"matmul": "matmul_tflops", "copy": "copy_tbps"}.get(kind))
        if not rate or r["status"] != "ok" or not isinstance(r["value"], (int, float)):
            continue
        if "work_at_ceiling" in r:  # FLOPs or bytes: the floor time at the measured rate
            floor_ms = r["work_at_ceiling"] / (rate * 1e12) * 1e3
            r["ratio_to_ceiling"] = floor_ms / r["value"] if r["value"] > 0 else None
        else:
            r["ratio_to_ceiling"] = r["value"] / rate


# ---------------------------------------------------------------------------- verdict --

def _ok(rows, **match):
    return [r for r in rows if r["status"] == "ok" and isinstance(r["value"], (int, float))
            and all(r.get(k) == v for k, v in match.items())]


def _basis(device_name: str, found: dict, kind: str):
    """(scale for a goal set on the ANCHORS H100, text saying which basis)."""
    if ANCHOR_DEVICE in device_name:
        return 1.0, "absolute (ANCHORS H100 figure, this is an H100)"
    anchor = {"copy": ANCHOR_COPY_TBPS, "matmul": ANCHOR_MATMUL_TFLOPS}[kind]
    measured = found.get({"copy": "copy_tbps", "matmul": "matmul_tflops"}[kind])
    unit = {"copy": "TB/s", "matmul": "TFLOP/s"}[kind]
    if not measured:
        return 1.0, f"absolute (no {kind} ceiling measured in this run)"
    return (measured / anchor,
            f"scaled by this run's {kind} ceiling {measured:.3g} / ANCHORS {anchor:g} {unit}")


def _goal(goal, target, measured, higher_is_better, basis, detail=""):
    if measured is None:
        verdict = "not measured"
    else:
        met = measured >= target if higher_is_better else measured <= target
        if met:
            verdict = "met"
        else:
            miss = (target - measured if higher_is_better else measured - target) / target
            verdict = f"missed by {miss:.1%}"
    return {"goal": goal, "target": target, "measured": measured, "verdict": verdict,
            "basis": basis, "detail": detail}


def _attention_ratio(rows, group, peer):
    """The worst (fwd or fwd+bwd, any T) gptfast / peer TFLOP/s ratio of a head-dim group."""
    ours = _ok(rows, stage="kernels", op="causal_attention", group=group, impl="gptfast")
    worst, where = None, ""
    for r in ours:
        theirs = _ok(rows, stage="kernels", name=r["name"], impl=peer, metric=r["metric"])
        if theirs:
            ratio = r["value"] / theirs[0]["value"]
            if worst is None or ratio < worst:
                worst, where = ratio, f"worst: {r['name']}"
    return worst, where


def verdict(rows: list[dict], device_name: str) -> list[dict]:
    """The ANCHORS.md goals, each met / missed by how much / not measured, from this run."""
    found = ceilings(rows)
    ratio_basis = "ratio within this run (no scaling)"
    goals = []
    for group, target in (("hd64", 1.1), ("hd128", 1.0)):
        ratio, where = _attention_ratio(rows, group, "SDPA cuDNN")
        goals.append(_goal(f"attention {group}: >= {target}x SDPA cuDNN (fwd and fwd+bwd)", target,
                           ratio, True, ratio_basis, where))
    worst, where = None, ""
    for group in ("hd64", "hd128"):
        ratio, at = _attention_ratio(rows, group, "SDPA flash")
        if ratio is not None and (worst is None or ratio < worst):
            worst, where = ratio, at
    goals.append(_goal("attention: >= 1.3x SDPA flash (FA2), every shape", 1.3, worst, True,
                       ratio_basis, where))

    worst, where, unpaired = None, "", []
    for r in _ok(rows, stage="kernels", op="document_attention", impl="gptfast", metric="tflops"):
        theirs = _ok(rows, stage="kernels", name=r["name"], impl="FlexAttention", metric="tflops")
        if not theirs:
            unpaired.append(r["name"])
        elif worst is None or r["value"] / theirs[0]["value"] < worst:
            worst, where = r["value"] / theirs[0]["value"], f"worst: {r['name']}"
    document_goal = _goal("document attention: >= 1.2x FlexAttention (same block mask, fwd and "
                          "fwd+bwd)", 1.2, worst, True, ratio_basis, where)
    if unpaired and worst is not None:
        # A goal on fwd and fwd+bwd is not met by the forward alone (FlexAttention has no
        # backward on CPU, say): the ratio stays, the verdict says what is missing.
        document_goal["verdict"] = "not measured in full"
        document_goal["detail"] = (f"{where}; no FlexAttention figure for: "
                                   f"{', '.join(unpaired)}").lstrip("; ")
    goals.append(document_goal)

    scale, basis = _basis(device_name, found, "copy")
    ln = _ok(rows, stage="kernels", op="layer_norm", dtype="fp32", impl="gptfast",
             metric="tb_per_s")
    slowest = min(ln, key=lambda r: r["value"]) if ln else None
    goals.append(_goal("LayerNorm fp32: >= 2.7 TB/s (fwd and fwd+bwd)", 2.7 * scale,
                       slowest and slowest["value"], True, basis,
                       slowest["name"] if slowest else ""))
    worst = min((r["ratio_to_best_peer"] for r in ln if r.get("ratio_to_best_peer")), default=None)
    goals.append(_goal("LayerNorm fp32: >= 1.2x the best peer", 1.2, worst, True, ratio_basis))

    ce = _ok(rows, stage="kernels", op="cross_entropy", impl="gptfast")
    ms = next((r["value"] for r in ce if r["metric"] == "ms"), None)
    mb = next((r["value"] for r in ce if r["metric"] == "extra_mb"), None)
    goals.append(_goal("cross_entropy N=16384 V=50257 bf16: <= 1.9 ms fwd+bwd", 1.9 / scale, ms,
                       False, basis))
    goals.append(_goal("cross_entropy N=16384: <= 1 MB extra peak memory", 1.0, mb, False,
                       "absolute"))

    mm_scale, mm_basis = _basis(device_name, found, "matmul")
    linear = _ok(rows, stage="kernels", op="linear_cross_entropy", impl="gptfast")
    ms = next((r["value"] for r in linear if r["metric"] == "ms"), None)
    mb = next((r["value"] for r in linear if r["metric"] == "extra_mb"), None)
    goals.append(_goal("linear_cross_entropy N=16384 C=768: <= 8.3 ms fwd+bwd", 8.3 / mm_scale,
                       ms, False, mm_basis))
    goals.append(_goal("linear_cross_entropy N=16384: <= 256 MB extra peak memory", 256.0, mb,
                       False, "absolute"))

    gpt = _ok(rows, stage="gpt", goal_cell=True, metric="tokens_per_s")
    gpt = [r for r in gpt if r["impl"].startswith("gptfast")]
    best = max(gpt, key=lambda r: r["value"]) if gpt else None
    goals.append(_goal("GPT-2 124M train step B32 T1024: >= 640k tok/s", 640e3 * mm_scale,
                       best and best["value"], True, mm_basis, best["impl"] if best else ""))
    mfu = next((r for r in _ok(rows, stage="gpt", goal_cell=True, metric="mfu")
                if best and r["impl"] == best["impl"]), None)
    goals.append(_goal("GPT-2 124M train step B32 T1024: >= 55% MFU (of 989 TFLOP/s bf16)", 0.55,
                       mfu and mfu["value"], True,
                       "absolute (the H200 has the H100's bf16 peak)",
                       best["impl"] if best else ""))
    return goals


# --------------------------------------------------------------------------- markdown --

def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e5:
            return f"{value:.4g}"
        return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value).replace("|", "/")


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def anchors_line(anchors_copy: Optional[str]) -> str:
    """Where the goals and the figures behind them are: a link to the copy of bench/ANCHORS.md
    beside the report (``anchors_copy``, relative to it), or the repository path alone."""
    if anchors_copy:
        return (f"The goals, the figures they are set against and where each figure comes "
                f"from: [{ANCHORS_IN_REPO}]({anchors_copy}) (copied beside this report).")
    return (f"The goals, the figures they are set against and where each figure comes from: "
            f"{ANCHORS_IN_REPO} in the gptfast source tree (not found in this installation).")


def _verdict_lines(goals, dry_run, anchors_copy=None) -> list[str]:
    lines = ["## Verdict against the goals of bench/ANCHORS.md", "", anchors_line(anchors_copy), ""]
    if dry_run:
        lines += ["DRY RUN on a CPU at tiny shapes: the verdict below only exercises the report; "
                  "its numbers say nothing about the kernels.", ""]
    table = [{"goal": g["goal"], "target": _fmt(g["target"]), "measured": _fmt(g["measured"]),
              "verdict": g["verdict"], "basis": g["basis"], "detail": g["detail"] or "-"}
             for g in goals]
    met = sum(g["verdict"] == "met" for g in goals)
    lines += [f"{met} of {len(goals)} goals met.", "",
              markdown_table(table, ["goal", "target", "measured", "verdict", "basis", "detail"]),
              ""]
    return lines


def _stage_table(rows) -> str:
    table = []
    for r in rows:
        spread = (f"{_fmt(r['p20'])}-{_fmt(r['p80'])}" if r.get("p20") is not None else "-")
        status = r["status"] + (f": {r['message']}" if r.get("message") else "")
        table.append({"name": r["name"], "impl": r["impl"], "metric": r["metric"],
                      "value": _fmt(r["value"]), "unit": r["unit"], "p20-p80": spread,
                      "best peer": r.get("best_peer") or "-",
                      "vs best peer": _ratio(r.get("ratio_to_best_peer")),
                      "of ceiling": ("-" if r.get("ratio_to_ceiling") is None
                                     else f"{r['ratio_to_ceiling']:.1%}"),
                      "status": status[:160].replace("|", "/").replace("\n", " ")})
    return markdown_table(table, ["name", "impl", "metric", "value", "unit", "p20-p80",
                                  "best peer", "vs best peer", "of ceiling", "status"])


def _correct_table(rows) -> str:
    table = [{"case": r["name"], "metric": r["metric"], "value": _fmt(r["value"]),
              "max abs err": _fmt(r.get("max_abs_err")), "tolerance": _fmt(r.get("tolerance")),
              "status": (r["status"] + (f": {r['message']}" if r.get("message") else ""))[:160]
              .replace("|", "/").replace("\n", " ")}
             for r in rows]
    return markdown_table(table, ["case", "metric", "value", "max abs err", "tolerance", "status"])


def markdown(rows: list[dict], meta: dict) -> str:
    """headline.md: the verdict first, then the stages' status, then one table per stage."""
    lines = [f"# gptfast headline, {meta['started']}", ""]
    if meta.get("dry_run"):
        lines += ["**DRY RUN** (CPU, tiny shapes, kernels through the Triton interpreter in "
                  "`correct` and `kernels`): it proves the command runs end to end; no figure "
                  "here is a measurement of the kernels.", ""]
    lines += [f"- device: {meta['device_name']}",
              f"- budget {meta['budget_s']:.0f} s, elapsed {meta['elapsed_s']:.0f} s; stages "
              f"{', '.join(meta['stages'])}"
              + ("; INTERRUPTED (Ctrl-C): only the rows finished before it"
                 if meta.get("interrupted") else ""),
              f"- command: `{meta['command']}`", ""]
    lines += _verdict_lines(verdict(rows, meta["device_name"]), meta.get("dry_run"),
                            meta.get("anchors_copy"))
    stage_rows = [r for r in rows if r["name"] == "stage"]
    if stage_rows:
        lines += ["## Stages", "", markdown_table(
            [{"stage": r["stage"], "status": r["status"], "seconds": _fmt(r["value"]),
              "box s": _fmt(r.get("box_s")),
              "autotune s": _fmt(r.get("autotune_s")),
              "message": (r.get("message") or "-")[:200].replace("|", "/").replace("\n", " ")}
             for r in stage_rows],
            ["stage", "status", "seconds", "box s", "autotune s", "message"]), ""]
    for stage in STAGES:
        of_stage = [r for r in rows if r["stage"] == stage and r["name"] != "stage"]
        if not of_stage:
            continue
        lines += [f"## {stage}", ""]
        lines += [_correct_table(of_stage) if stage == "correct" else _stage_table(of_stage), ""]
    compile_rows = [r for r in rows if r.get("first_call_s") is not None]
    if compile_rows:
        lines += ["## Compile and autotune seconds (first calls, kept out of every timing)", "",
                  markdown_table([{"stage": r["stage"], "name": r["name"], "impl": r["impl"],
                                   "metric": r["metric"], "first call s": _fmt(r["first_call_s"]),
                                   "of which autotune s": _fmt(r.get("autotune_s"))}
                                  for r in compile_rows],
                                 ["stage", "name", "impl", "metric", "first call s",
                                  "of which autotune s"]), ""]
    return "\n".join(lines)
