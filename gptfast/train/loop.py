"""The training loop: evaluate, step, log, evaluate and save every eval_interval, stop cleanly
on Ctrl-C with a checkpoint to resume from."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from .errors import EvaluationInterrupted
from .report import Reporter, summary
from .signals import StopRequest


@dataclasses.dataclass
class TrainResult:
    iter_num: int
    last_loss: Optional[float]
    val_loss: Optional[float]
    interrupted: bool
    checkpoint: Optional[str]


def run_training(t) -> TrainResult:
    """Train the :class:`~gptfast.train.trainer.Trainer` ``t`` up to max_iters, reporting as it
    goes; Ctrl-C/SIGTERM stop it after the current step with a checkpoint."""
    t.out_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(t.out_dir, t.dist.is_main, t.start_iter, t.cfg.max_iters,
                        resuming=t.start_iter > 0)
    try:
        reporter.message(summary(t))
        for note in t.notes:
            reporter.message(note)
        with StopRequest(second_interrupt_quits=not t.dist.enabled) as stop:
            return loop(t, reporter, stop)
    finally:
        reporter.close()


def loop(t, reporter: Reporter, stop: StopRequest) -> TrainResult:
    cfg = t.cfg
    it = t.start_iter
    last_loss = None
    t.take_snapshot(it)
    try:
        if it == 0 and t.val_loader is not None:
            t.evaluate_and_save(it, reporter, stop, save=False)
        clock = {"start": time.perf_counter(), "time": time.perf_counter(), "iter": it}
        while it < cfg.max_iters:
            if t.dist.any(stop.requested):
                return interrupted(t, it, reporter, last_loss)
            loss = t.train_step(it)
            it += 1
            t.take_snapshot(it)
            reporter.advance()
            if (it - 1) % cfg.log_interval == 0 or it == cfg.max_iters:
                last_loss = t.log_train(it - 1, loss, reporter, clock)
            if it % cfg.eval_interval == 0 and it < cfg.max_iters:
                t.evaluate_and_save(it, reporter, stop)
                clock.update(iter=it, time=time.perf_counter())  # eval time is not step time
                t.data_wait = 0.0
        if it > t.start_iter or not t.checkpoint_path.exists():
            t.evaluate_and_save(it, reporter, stop)
    except EvaluationInterrupted:
        reporter.message(f"evaluation at iteration {it} stopped")
        return interrupted(t, it, reporter, last_loss)
    except KeyboardInterrupt:
        # A second Ctrl-C means now; under DDP the other ranks could not join a save; and
        # mid-update the weights are half-stepped: in each case no consistent state to save.
        if stop.requested or t.dist.enabled or t.in_update:
            reporter.message("interrupted: no checkpoint written")
            raise
        return interrupted(t, t.snapshot["iter_num"], reporter, last_loss)
    reporter.message(f"done: {it} iterations, checkpoint {t.checkpoint_path}")
    return TrainResult(it, last_loss, t.val_loss, False, str(t.checkpoint_path))


def interrupted(t, it: int, reporter: Reporter, last_loss) -> TrainResult:
    t.save(it)
    reporter.message(f"interrupted: checkpoint of iteration {it} written to "
                     f"{t.checkpoint_path}; continue with --init resume")
    return TrainResult(it, last_loss, t.val_loss, True, str(t.checkpoint_path))
