"""Starting a run: :func:`train` on every rank (process group, backend, trainer) and the CLI's
:func:`run`, which turns a TrainError into a one-line message."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch

from .config import TrainConfig, describe_cpu_defaults, resolve
from .device import init_distributed
from .errors import TrainError
from .loop import TrainResult
from .trainer import Trainer


def train(cfg: TrainConfig, checkpoint: Optional[dict] = None,
          cpu_defaults_applied: Optional[dict] = None) -> TrainResult:
    """Run training as configured (under torchrun, on every rank); ``cpu_defaults_applied``
    (from resolve()) is reported after the run's summary."""
    from ..backend import use_backend

    dist, device = init_distributed(cfg.device)
    try:
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        with use_backend(cfg.backend):
            trainer = Trainer(cfg, checkpoint, dist, device)
            if cpu_defaults_applied:
                trainer.notes.append(describe_cpu_defaults(cpu_defaults_applied))
            try:
                result = trainer.run()
            finally:
                trainer.close()
        dist.barrier()  # rank 0 may still be writing the last checkpoint
        return result
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    try:
        cfg, checkpoint, applied = resolve(overrides, getattr(args, "config", None))
        result = train(cfg, checkpoint, applied)
    except TrainError as err:
        print(f"gptfast train: error: {err}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0
