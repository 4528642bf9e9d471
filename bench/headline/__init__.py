"""``gptfast bench --suite headline``: the whole GPU verdict in one command.

    gptfast bench --suite headline [--out DIR] [--budget-s 480] [--stages env,correct,...]
                  [--dry-run] [--autotune-keep 3]

Stages, in order: ``env`` (device, versions, the matmul and copy ceilings of this run),
``correct`` (every kernel at its headline shape in bf16 and fp16, forward and backward, against
the reference in fp32), ``kernels`` (the bench/ANCHORS.md kernel rows side by side with their
peers), ``nanochat`` (nanochat's attention shapes: gptfast against nanochat's SDPA
fallback, FlexAttention and FA2/FA3, :mod:`gptfast.bench.nanochat_attention`),
``gpt`` (the GPT-2 124M training step, gptfast and nanoGPT, eager and compiled; the
nanochat-d20 step, ours against nanochat's own model when it imports), ``loader``.

Each stage runs in its own process, inside a time box: its share of what is left of the budget.
A child process means that a stage that crashes, hangs, or breaks the CUDA context (an illegal
memory access poisons every later call in a process) costs that stage only: it is recorded
(``error`` or ``skipped-budget``, with the message) and the next stage runs. Inside a stage a
unit that cannot finish in what is left of the box is not started. Rows are written to
``DIR/stages/<stage>.jsonl`` as they are made, so Ctrl-C or a killed stage keeps every finished
row. All stages share one ``TRITON_CACHE_DIR`` and cache autotune results there
(``TRITON_CACHE_AUTOTUNING=1``): a key tuned in ``correct`` is not tuned again in ``kernels``, nor
in a re-run with ``--stages``. Autotuning keeps the first ``--autotune-keep`` configs of each
kernel (:mod:`gptfast.bench.autotune`) and its seconds are reported apart from the timings.

Outputs in DIR: ``headline.json`` (every row), ``headline.md`` (the verdict against the
bench/ANCHORS.md goals on top, one table per stage), ``headline.log`` (everything the stages
printed), ``ANCHORS.md`` (a copy of bench/ANCHORS.md, which headline.md links to).

``--dry-run``, and any run without CUDA: the same stages and functions on the CPU at tiny
shapes, the kernels through the Triton interpreter in ``correct``, ``kernels`` and
``nanochat``, compiled baselines with torch.compile's aot_eager backend, the same files. CI
runs it.

The package, each module one job (it imports the per-kernel modules of gptfast.bench, never
the reverse):

- this module: the options, the plan, the parent process that runs each stage in its box and
  writes the reports (``python -m gptfast.bench.headline`` runs :func:`main`, ``__main__.py``);
- :mod:`.child`: one stage in its child process, its units in order, rows written as they come;
- :mod:`.stages`: the sizes of a GPU run and of the dry run, and the ``env``, ``kernels``,
  ``gpt`` and ``loader`` stages; :mod:`.correct`: the ``correct`` stage; :mod:`.nanochat`:
  the ``nanochat`` stage;
- :mod:`.report`: the row schema, peer and ceiling ratios, the verdict, headline.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from ..common import usage_error
from .report import STAGES, row, validate

DEFAULT_BUDGET_S = 480.0
# Share of the budget each stage's box gets (of what is left when it starts, among the stages
# still to run, so a stage that finishes early leaves its time to the later ones).
SHARES = {"env": 0.06, "correct": 0.20, "kernels": 0.26, "nanochat": 0.12, "gpt": 0.30,
          "loader": 0.06}
MIN_BOX_S = 3.0        # a stage with less than this is skipped, not started
KILL_GRACE_S = 10.0    # after Ctrl-C a stage gets this long to stop before it is killed


def stage_list(text: str) -> tuple:
    """"correct,kernels" -> ("correct", "kernels") in run order (an argparse type)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The headline-only options of ``gptfast bench`` (``--suite headline``)."""
    group = parser.add_argument_group("--suite headline")
    group.add_argument("--budget-s", type=positive_seconds, default=None, metavar="S",
                       help="wall-clock budget of the headline run "
                            f"(default {DEFAULT_BUDGET_S:.0f})")
    group.add_argument("--stages", type=stage_list, default=None, metavar="NAME,...",
                       help=f"headline stages to run, of {','.join(STAGES)} (default all)")
    group.add_argument("--dry-run", action="store_true",
                       help="headline at tiny shapes on the CPU (what runs without CUDA anyway)")
    group.add_argument("--autotune-keep", type=int, default=None, metavar="N",
                       help="headline: configs each Triton autotuner keeps (default 3; 0: all)")


HEADLINE_ONLY = ("budget_s", "stages", "dry_run", "autotune_keep")


@dataclasses.dataclass
class Plan:
    out_dir: Path
    budget_s: float
    stages: tuple
    dry_run: bool
    autotune_keep: int
    triton_cache: str
    started: datetime.datetime
    command: str


def make_plan(args: argparse.Namespace) -> Plan:
    import torch

    started = datetime.datetime.now()
    out = getattr(args, "out", None) or Path("bench-results") / started.strftime(
        "headline-%Y%m%d-%H%M%S")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    keep = 3 if args.autotune_keep is None else args.autotune_keep
    if keep < 0:
        raise ValueError(f"--autotune-keep must be >= 0, got {keep}")
    cache = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    return Plan(out_dir=out, budget_s=args.budget_s or DEFAULT_BUDGET_S,
                stages=args.stages or STAGES,
                dry_run=bool(args.dry_run) or not torch.cuda.is_available(),
                autotune_keep=keep, triton_cache=cache, started=started, command="")


def command_text(plan: Plan) -> str:
    """The command line that repeats this run."""
    text = (f"gptfast bench --suite headline --out {plan.out_dir} --budget-s {plan.budget_s:g} "
            f"--stages {','.join(plan.stages)} --autotune-keep {plan.autotune_keep}")
    return text + (" --dry-run" if plan.dry_run else "")


# ------------------------------------------------------------------------- the parent --

def _box(stage: str, remaining: float, left: tuple) -> float:
    return remaining * SHARES[stage] / sum(SHARES[s] for s in left)


def _child_env(plan: Plan, stage: str) -> dict:
    env = dict(os.environ)
    env["TRITON_CACHE_DIR"] = plan.triton_cache
    env["TRITON_CACHE_AUTOTUNING"] = "1"
    env["GPTFAST_AUTOTUNE_KEEP"] = str(plan.autotune_keep)
    env["PYTHONUNBUFFERED"] = "1"
    # the dry run takes the kernels through the interpreter where a GPU run times them
    interpret = plan.dry_run and stage in ("correct", "kernels", "nanochat")
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    if plan.dry_run:
        env["GPTFAST_BENCH_COMPILE_BACKEND"] = "aot_eager"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run even on a GPU machine
    return env


class _Tee:
    """Copies a child's output lines to our stdout and to the log, as they come."""

    def __init__(self, stream, log):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream, log), daemon=True)
        self._thread.start()

    def _pump(self, stream, log):
        for line in iter(stream.readline, ""):
            self.lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()

    def join(self) -> None:
        self._thread.join(timeout=5)

    def tail(self, count=6) -> str:
        self.join()
        return " / ".join(line.strip() for line in self.lines[-count:] if line.strip())


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the child's process group, then kill it if it has not stopped in time."""
    for sig, wait in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def child_command(plan: Plan, stage: str, deadline: float) -> list:
    command = [sys.executable, "-m", "gptfast.bench.headline", "--child", stage,
               "--out", str(plan.out_dir), "--deadline", f"{deadline:.3f}"]
    return command + (["--dry-run"] if plan.dry_run else [])


def _run_stage(plan: Plan, stage: str, box: float, log) -> dict:
    """Run one stage in a child process inside ``box`` seconds; its stage row."""
    started = time.perf_counter()
    command = child_command(plan, stage, time.time() + box)
    log.write(f"\n=== stage {stage}: box {box:.0f} s ===\n")
    log.flush()
    print(f"=== stage {stage}: box {box:.0f} s ===", flush=True)
    proc = subprocess.Popen(command, env=_child_env(plan, stage), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tee = _Tee(proc.stdout, log)
    status, message = "ok", None
    try:
        proc.wait(timeout=box)
    except subprocess.TimeoutExpired:
        _stop(proc)
        status = "skipped-budget"
        message = f"ran past its {box:.0f} s box and was stopped; the rows it finished are kept"
    except KeyboardInterrupt:
        _stop(proc)
        stage_row = row(stage, "stage", "headline", "wall_s", time.perf_counter() - started, "s",
                        status="interrupted", box_s=box, message="Ctrl-C")
        raise _Interrupted(stage_row) from None
    if status == "ok" and proc.returncode != 0:
        status = "error"
        message = f"exit code {proc.returncode}: {tee.tail()}"
    tee.join()
    return row(stage, "stage", "headline", "wall_s", time.perf_counter() - started, "s",
               status=status, box_s=box, message=message)


class _Interrupted(Exception):
    def __init__(self, stage_row):
        super().__init__("interrupted")
        self.stage_row = stage_row


def _stage_rows(out_dir: Path, stage: str) -> list:
    path = out_dir / "stages" / f"{stage}.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def _finish(plan: Plan, rows: list, stage_rows: list, elapsed: float, interrupted: bool) -> list:
    from .report import ANCHORS_FILE, add_ceiling_ratios, markdown
    from .stages import add_gpt_ratios

    for stage_row in stage_rows:  # the autotune seconds a stage reported, on its stage row
        reported = [r for r in rows if r["stage"] == stage_row["stage"] and r["name"] == "autotune"
                    and r["metric"] == "autotune_s"]
        if reported:
            stage_row["autotune_s"] = reported[0]["value"]
    rows = rows + stage_rows
    add_gpt_ratios(rows)
    add_ceiling_ratios(rows)
    device = next((r["value"] for r in rows if r["stage"] == "env"
                   and r["metric"] == "device_name"), "unknown (env stage not run)")
    meta = {"started": plan.started.isoformat(timespec="seconds"), "device_name": device,
            "budget_s": plan.budget_s, "elapsed_s": elapsed, "stages": plan.stages,
            "dry_run": plan.dry_run, "interrupted": interrupted, "command": plan.command,
            "anchors_copy": None}
    if ANCHORS_FILE.is_file():  # beside headline.md, so its link works wherever DIR goes
        shutil.copyfile(ANCHORS_FILE, plan.out_dir / ANCHORS_FILE.name)
        meta["anchors_copy"] = ANCHORS_FILE.name
    problems = validate(rows)
    if problems:  # never lose a run to a report bug: say so in the log and keep the rows
        print("headline: schema problems:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
    (plan.out_dir / "headline.json").write_text(json.dumps(rows, indent=1, default=str))
    try:
        text = markdown(rows, meta)
    except Exception:  # the rows are safe in headline.json; the run goes on
        text = ("# gptfast headline: the markdown report failed\n\nEvery row is in "
                f"headline.json.\n\n```\n{traceback.format_exc()}```\n")
        print(text, file=sys.stderr)
    (plan.out_dir / "headline.md").write_text(text)
    return rows


def _earlier_stage_rows(plan: Plan) -> list:
    """Stage rows of an earlier run into the same directory, for the stages not run now
    (their data rows are still in DIR/stages/): a --stages re-run keeps the whole picture."""
    path = plan.out_dir / "headline.json"
    try:
        earlier = json.loads(path.read_text()) if path.exists() else []
    except (OSError, json.JSONDecodeError):
        return []
    kept = []
    for r in earlier:
        if r.get("name") == "stage" and r.get("stage") not in plan.stages:
            present = (plan.out_dir / "stages" / f"{r['stage']}.jsonl").exists()
            if present:
                kept.append({**r, "message": "from an earlier run into this directory"
                             + (f"; {r['message']}" if r.get("message") else "")})
    return kept


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a timeout): stop the stage, keep the rows, write reports


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except ValueError as err:
        return usage_error(args, err)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / "stages").mkdir(exist_ok=True)
    earlier = _earlier_stage_rows(plan)
    for stale in (plan.out_dir / "stages").glob("*.jsonl"):
        if stale.stem in plan.stages or stale.stem not in {r["stage"] for r in earlier}:
            stale.unlink()
    plan.command = command_text(plan)
    print(f"gptfast headline: stages {','.join(plan.stages)}, budget {plan.budget_s:.0f} s, "
          f"{'DRY RUN on the CPU' if plan.dry_run else 'CUDA'}, autotune keeps "
          f"{plan.autotune_keep or 'all'} configs, TRITON_CACHE_DIR {plan.triton_cache}, "
          f"out {plan.out_dir}", flush=True)
    previous_sigterm = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        rows, interrupted = _run_stages(plan, earlier)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    failed = [r for r in rows if r["status"] in ("fail", "error")]
    print(f"\n{len(rows)} rows; {len(failed)} failed or errored; wrote {plan.out_dir}/"
          "headline.json, headline.md, headline.log, ANCHORS.md")
    print("\n".join(_verdict_summary(rows)))
    return 130 if interrupted else 0


def _run_stages(plan: Plan, earlier: list) -> tuple:
    """Every stage in its box; the reports are rewritten after each, so a run killed from
    outside still leaves them for the stages it finished."""
    start = time.perf_counter()
    stage_rows, interrupted = list(earlier), False

    def report():
        data = [r for stage in STAGES for r in _stage_rows(plan.out_dir, stage)]
        return _finish(plan, data, stage_rows, time.perf_counter() - start, interrupted)

    with open(plan.out_dir / "headline.log", "a") as log:
        log.write(f"# {plan.command} at {plan.started.isoformat(timespec='seconds')}\n")
        for index, stage in enumerate(plan.stages):
            remaining = plan.budget_s - (time.perf_counter() - start)
            box = _box(stage, remaining, plan.stages[index:])
            if interrupted or box < MIN_BOX_S:
                why = "Ctrl-C" if interrupted else f"{max(remaining, 0):.0f} s of budget left"
                stage_rows.append(row(stage, "stage", "headline", "wall_s", 0.0, "s",
                                      status="interrupted" if interrupted else "skipped-budget",
                                      box_s=max(box, 0.0), message=f"not started: {why}"))
                continue
            try:
                stage_rows.append(_run_stage(plan, stage, box, log))
            except _Interrupted as stop:
                stage_rows.append(stop.stage_row)
                interrupted = True
                print("interrupted: keeping the rows finished so far", flush=True)
            print(f"=== stage {stage}: {stage_rows[-1]['status']} in "
                  f"{stage_rows[-1]['value']:.1f} s ===", flush=True)
            report()
    return report(), interrupted


def _verdict_summary(rows) -> list:
    from .report import verdict

    device = next((r["value"] for r in rows if r["metric"] == "device_name"), "")
    try:
        return [f"  {g['verdict']:>16}  {g['goal']}" for g in verdict(rows, device)]
    except Exception as err:
        return [f"  verdict failed ({type(err).__name__}: {err}); see headline.json"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.headline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        from .child import exit_with_parent, run_child

        exit_with_parent()
        try:
            return run_child(args.child, args.out, args.deadline, args.dry_run)
        except KeyboardInterrupt:
            return 130
    return run(args)
