"""One stage of ``gptfast bench --suite headline`` in its child process (the parent,
:mod:`gptfast.bench.headline`, starts it as ``python -m gptfast.bench.headline --child STAGE``):
its units in order inside the stage's box, each unit's rows written to
``DIR/stages/<stage>.jsonl`` as they come, a failed unit a row and never the end of the stage.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from pathlib import Path

from ..common import ResultsWriter
from .report import row

STOP_MARGIN = 0.1      # a stage starts no unit in the last 10% of its box (at most 15 s)


def _cuda_broken(meter) -> str | None:
    """After a failed unit: None when the CUDA context still works, else why not."""
    if not meter.cuda:
        return None
    try:
        meter.synchronize()
        return None
    except Exception as err:
        return f"the CUDA context is broken ({type(err).__name__}: {str(err)[:160]})"


def exit_with_parent() -> None:
    """A stage runs in its own session (so that Ctrl-C reaches the parent first, which stops it
    in order); if the parent dies without stopping it, it must not go on using the GPU."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                print("headline: the parent process is gone; stopping this stage", flush=True)
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def run_child(stage: str, out_dir: Path, deadline: float, dry_run: bool) -> int:
    """One stage, in this process: its units in order, each row written as it comes."""
    import torch

    from .. import autotune
    from ..common import Meter
    from .stages import DRY, GPU, Context, env_units, gpt_units, kernels_units, loader_units

    sizes = DRY if dry_run else GPU
    device = torch.device("cpu" if dry_run else "cuda")
    meter = Meter(device, sizes.warmup_ms, sizes.repeat_ms)
    ctx = Context(stage, sizes, device, meter, dry_run)
    writer = ResultsWriter(out_dir / "stages" / f"{stage}.jsonl", append=True)
    box_start = time.time()
    stop_at = deadline - min(15.0, STOP_MARGIN * (deadline - box_start))
    torch.manual_seed(0)

    clock = autotune.AutotuneClock()
    notes = []
    if stage in ("correct", "kernels", "nanochat", "gpt"):
        try:
            counts = autotune.restrict(autotune.keep_from_env())
            clock.install()
            notes = [f"{name} {kept}/{listed}" for name, (kept, listed) in counts.items()]
        except Exception as err:  # triton missing or changed: the stage still runs
            notes = [f"autotune hook not installed: {type(err).__name__}: {err}"]

    if stage == "correct":
        from .correct import correct_units
        units = correct_units(ctx)
    elif stage == "nanochat":
        from .nanochat import nanochat_units
        units = nanochat_units(ctx, clock)
    else:
        units = {"env": lambda: env_units(ctx), "kernels": lambda: kernels_units(ctx, clock),
                 "gpt": lambda: gpt_units(ctx), "loader": lambda: loader_units(ctx)}[stage]()

    broken = None
    for unit in units:
        left = stop_at - time.time()
        need = unit.estimate_s if sizes.unit_estimates else 0.0
        if broken or left <= need:
            status = "error" if broken else "skipped-budget"
            message = broken or (f"not started: {max(left, 0):.0f} s left of the box, "
                                 f"needs ~{need:.0f} s")
            writer.write_all([row(stage, unit.label, "headline", "unit", None, "",
                                  status=status, message=message)])
            print(f"[{stage}] {unit.label}: {status} ({message})", flush=True)
            continue
        started = time.perf_counter()
        try:
            rows = unit.run()
        except Exception as err:  # KeyboardInterrupt is not an Exception: it ends the stage
            traceback.print_exc()
            rows = [row(stage, unit.label, "headline", "unit", None, "", status="error",
                        message=f"{type(err).__name__}: {str(err).strip()[:300]}")]
        if any(r["status"] == "error" for r in rows):
            broken = _cuda_broken(meter)  # an illegal access poisons every later CUDA call
        writer.write_all(rows)
        bad = sum(r["status"] not in ("ok", "unavailable") for r in rows)
        print(f"[{stage}] {unit.label}: {len(rows)} rows, {bad} not ok, "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    if stage in ("correct", "kernels", "nanochat", "gpt"):
        writer.write_all([
            row(stage, "autotune", "headline", "autotune_s", clock.seconds, "s",
                message="compile + timing of the autotune candidates; kept configs: "
                + ("; ".join(notes) if notes else "no autotuned kernel "
                   "(the Triton interpreter does not autotune)")),
            row(stage, "autotune", "headline", "configs_timed", clock.configs, "")])
    writer.close()
    return 0
