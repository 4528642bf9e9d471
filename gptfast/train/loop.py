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
    """How a run ended: the iterations done, the last train and val losses, whether Ctrl-C
    stopped it, and its checkpoint."""

    iter_num: int
    last_loss: Optional[float]
    val_loss: Optional[float]
    interrupted: bool
    checkpoint: Optional[str]


def run_training(trainer) -> TrainResult:
    """Train ``trainer`` (a :class:`~gptfast.train.trainer.Trainer`) up to max_iters, reporting
    as it goes; Ctrl-C/SIGTERM stop it after the current step with a checkpoint."""
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(trainer.out_dir, trainer.dist.is_main, trainer.start_iter,
                        trainer.cfg.max_iters, resuming=trainer.start_iter > 0)
    try:
        reporter.message(summary(trainer))
        for note in trainer.notes:
            reporter.message(note)
        with StopRequest(second_interrupt_quits=not trainer.dist.enabled) as stop:
            return loop(trainer, reporter, stop)
    finally:
        reporter.close()


def loop(trainer, reporter: Reporter, stop: StopRequest) -> TrainResult:
    """Evaluate the start (iteration 0), then step to max_iters: log every log_interval steps,
    evaluate and save every eval_interval and at the end."""
    cfg = trainer.cfg
    it = trainer.start_iter
    last_loss = None
    trainer.take_snapshot(it)
    try:
        if it == 0 and trainer.val_loader is not None:
            trainer.evaluate_and_save(it, reporter, stop, save=False)
        clock = {"start": time.perf_counter(), "time": time.perf_counter(), "iter": it}
        while it < cfg.max_iters:
            if trainer.dist.any(stop.requested):
                return interrupted(trainer, it, reporter, last_loss)
            loss = trainer.train_step(it)
            it += 1
            trainer.take_snapshot(it)
            reporter.advance()
            if (it - 1) % cfg.log_interval == 0 or it == cfg.max_iters:
                last_loss = trainer.log_train(it - 1, loss, reporter, clock)
            if it % cfg.eval_interval == 0 and it < cfg.max_iters:
                trainer.evaluate_and_save(it, reporter, stop)
                clock.update(iter=it, time=time.perf_counter())  # eval time is not step time
                trainer.data_wait = 0.0
        if it > trainer.start_iter or not trainer.checkpoint_path.exists():
            trainer.evaluate_and_save(it, reporter, stop)
    except EvaluationInterrupted:
        reporter.message(f"evaluation at iteration {it} stopped")
        return interrupted(trainer, it, reporter, last_loss)
    except KeyboardInterrupt:
        # A second Ctrl-C means now; under DDP the other ranks could not join a save; and
        # mid-update the weights are half-stepped: in each case no consistent state to save.
        if stop.requested or trainer.dist.enabled or trainer.in_update:
            reporter.message("interrupted: no checkpoint written")
            raise
        return interrupted(trainer, trainer.snapshot["iter_num"], reporter, last_loss)
    reporter.message(f"done: {it} iterations, checkpoint {trainer.checkpoint_path}")
    return TrainResult(it, last_loss, trainer.val_loss, False, str(trainer.checkpoint_path))


def interrupted(trainer, it: int, reporter: Reporter, last_loss) -> TrainResult:
    """Save the state after `it` steps and say how to resume."""
    trainer.save(it)
    reporter.message(f"interrupted: checkpoint of iteration {it} written to "
                     f"{trainer.checkpoint_path}; continue with --init resume")
    return TrainResult(it, last_loss, trainer.val_loss, True, str(trainer.checkpoint_path))
