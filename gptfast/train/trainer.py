"""One run's state and its parts of a step: the model, optimizers, loaders and scaler built
from the settings, one optimizer step, evaluation, the train log line and the checkpoint."""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from .batches import (GPT2_PADDED_VOCAB, eot_token, find_data, make_loader, model_vocab_size,
                      read_data_meta)
from .checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, saved_config, tokenizer_info,
                         rng_state, save_checkpoint, seed_everything, set_rng_state)
from .config import TrainConfig
from .device import Distributed, autocast_dtype
from .errors import EvaluationInterrupted, TrainError, TrainingDiverged
from .loop import TrainResult, run_training
from .model import build_model, saved_model_args, unwrap_model
from .report import EvalProgress, Reporter, format_train, peak_memory_gb
from .schedule import learning_rate
from .signals import StopRequest


class Trainer:
    """One run on this rank: everything built from the settings (and the checkpoint being
    resumed), and the pieces the loop (:mod:`gptfast.train.loop`) calls."""

    def __init__(self, cfg: TrainConfig, checkpoint: Optional[dict], dist: Distributed,
                 device: torch.device):
        self.cfg, self.dist, self.device = cfg, dist, device
        self.out_dir = Path(cfg.out)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.dtype = autocast_dtype(cfg.dtype, device)
        self.data = find_data(cfg)
        self.meta = read_data_meta(self.data.directory)
        if self.meta is None:
            self._note(f"{self.data.directory} has no meta.json or meta.pkl: assuming GPT-2's "
                       "vocabulary")
        data_vocab = self.meta["vocab_size"] if self.meta else GPT2_PADDED_VOCAB

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.raw_model = build_model(cfg, data_vocab, checkpoint, model_vocab_size(self.meta),
                                     eot_token(self.meta)).to(device)
        self.optimizers = self._make_optimizers()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.train_loader, self.val_loader = self._make_loaders()
        self.val_start = self.val_loader.state_dict() if self.val_loader is not None else None

        self.start_iter = 0
        self.val_loss: Optional[float] = None
        self.best_val_loss: Optional[float] = None
        seed_everything(cfg.seed + dist.rank)  # dropout differs across ranks
        if checkpoint is not None:
            self._restore(checkpoint)

        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.eval_model = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)

        self.tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * dist.world_size
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.in_update = False
        self.data_wait = 0.0
        self.snapshot = None
        self.notes: list[str] = []  # printed after the summary line

    # -- setup --

    def _make_loaders(self):
        cfg, files = self.cfg, self.data
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train = make_loader(files.train, cfg, cfg.sampler, self.dist, self.device,
                                    align=cfg.align, eot=eot_token(self.meta))
        except ValueError as err:
            raise TrainError(f"train shards: {err}") from None
        for warning in caught:  # the loader's warnings (short shards, --align eot coverage)
            self._note(f"warning: train shards: {warning.message}")
        val = None
        if files.val:
            try:
                val = make_loader(files.val, cfg, "sequential", self.dist, self.device, prefetch=2)
            except ValueError as err:
                self._note(f"evaluation off: the val shards are unusable ({err})")
        else:
            self._note(f"evaluation off: no val shards in {files.directory} (--val-files GLOB "
                       "names them)")
        return train, val

    def _make_optimizers(self) -> list:
        """[AdamW] (nanoGPT's) or, with --optimizer muon, [AdamW, Muon] (nanochat's)."""
        cfg, model = self.cfg, self.raw_model
        if cfg.optimizer == "adamw":
            return [model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                               self.device.type)]
        from ..optim import muon_and_adamw

        try:
            return muon_and_adamw(model, cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr,
                                  cfg.weight_decay, self.device.type)
        except RuntimeError as err:
            raise TrainError(str(err)) from None

    def _restore(self, checkpoint: dict) -> None:
        saved = (checkpoint.get("config") or {}).get("optimizer", "adamw")
        if saved != self.cfg.optimizer:
            raise TrainError(f"the checkpoint was trained with --optimizer {saved}; resume it with "
                             f"that (not {self.cfg.optimizer})")
        states = [checkpoint["optimizer"]] + ([checkpoint["muon"]] if "muon" in checkpoint else [])
        if len(states) != len(self.optimizers):
            raise TrainError(f"the checkpoint holds {len(states)} optimizer state(s), this run "
                             f"has {len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        try:
            self.train_loader.load_state_dict(checkpoint["loader"])
        except ValueError as err:
            raise TrainError(f"cannot resume the data position: {err}") from None
        self.start_iter = checkpoint["iter_num"]
        self.val_loss = checkpoint.get("val_loss")
        self.best_val_loss = checkpoint.get("best_val_loss")
        states = checkpoint.get("rng") or []
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank], self.device)
        else:
            self._note(f"random state saved for {len(states)} rank(s), running {self.dist.world_size}: "
                       "reseeded (dropout draws differ from an uninterrupted run)")

    def _note(self, text: str) -> None:
        if self.dist.is_main:
            print(text, file=sys.stderr, flush=True)

    # -- one step --

    def _micro_batch_context(self, last: bool):
        if self.dist.enabled and not last:
            return self.model.no_sync()  # gradients are all-reduced once, after the last micro-batch
        return contextlib.nullcontext()

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _next_batch(self, loader):
        start = time.perf_counter()
        batch = next(loader)
        self.data_wait += time.perf_counter() - start
        return batch

    def train_step(self, it: int) -> torch.Tensor:
        """One optimizer step; returns this step's mean loss as a device tensor (no host sync)."""
        lr = learning_rate(it, self.cfg)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:  # muon's groups: their own peak, lr's shape
                peak = group.get("peak_lr")
                group["lr"] = lr if peak is None else peak * (lr / self.cfg.lr)
        accum = self.cfg.grad_accum
        total = None
        for micro in range(accum):
            x, y = self._next_batch(self.train_loader)
            with self._micro_batch_context(last=micro == accum - 1):
                with self._autocast():
                    _, loss = self.model(x, y, return_logits=False)
                    loss = loss / accum
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.in_update = True
        if self.cfg.grad_clip > 0:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                                            self.cfg.grad_clip)
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.nonfinite |= ~torch.isfinite(total)
        return total

    def take_snapshot(self, iter_num: int) -> None:
        """What a checkpoint needs beyond the weights, as of iter_num completed steps."""
        self.snapshot = {"iter_num": iter_num, "loader": self.train_loader.state_dict(),
                         "rng": rng_state(self.device)}
        self.in_update = False  # from the optimizer step until here the snapshot was behind

    # -- evaluation, logging, checkpoints --

    @torch.no_grad()
    def evaluate(self, it: int = 0, stop: Optional["StopRequest"] = None) -> float:
        """Mean val loss over eval_iters batches (the same batches every time), over all ranks.
        Shows progress (EvalProgress). Raises EvaluationInterrupted once ``stop`` is requested:
        at once in a single process (nothing of an evaluation needs to be kept), at the next
        batch under DDP (every rank must leave at the same batch)."""
        self.val_loader.load_state_dict(self.val_start)
        total = torch.zeros((), device=self.device)
        progress = EvalProgress(self.dist.is_main, it, self.cfg.eval_iters)
        at_once = (stop.raising(EvaluationInterrupted) if stop is not None and not self.dist.enabled
                   else contextlib.nullcontext())
        self.eval_model.eval()
        try:
            with at_once:
                for done in range(1, self.cfg.eval_iters + 1):
                    if stop is not None and self.dist.any(stop.requested):
                        raise EvaluationInterrupted
                    x, y = next(self.val_loader)
                    with self._autocast():
                        _, loss = self.eval_model(x, y, return_logits=False)
                    total += loss.float()
                    progress.update(done)
        finally:
            progress.close()
            self.eval_model.train()
        return (self.dist.all_sum(total) / (self.cfg.eval_iters * self.dist.world_size)).item()

    def _diverged(self, it: int, what: str) -> TrainingDiverged:
        kept = (f"the last good checkpoint, {self.checkpoint_path}, is unchanged"
                if self.checkpoint_path.exists() else "no checkpoint was written")
        return TrainingDiverged(f"{what} at iteration {it}: training stopped; {kept}. Try a lower "
                                "--lr, more --warmup-iters, or --grad-clip")

    def log_train(self, it: int, loss: torch.Tensor, reporter: Reporter, clock: dict) -> float:
        """Logs step it; the one host sync of the interval. Raises TrainingDiverged on NaN/inf."""
        values = torch.stack([loss.float(), self.grad_norm.float(), self.nonfinite.float()])
        loss_value, grad_norm, nonfinite = (self.dist.all_sum(values) / self.dist.world_size).tolist()
        if not math.isfinite(loss_value):
            raise self._diverged(it, f"the loss became {loss_value}")
        if nonfinite:
            raise self._diverged(it, "a NaN/inf loss appeared")
        now = time.perf_counter()
        steps = it + 1 - clock["iter"]
        elapsed = now - clock["time"]
        tokens_per_sec = steps * self.tokens_per_iter / elapsed
        record = {
            "iter": it,
            "loss": loss_value,
            "lr": learning_rate(it, self.cfg),
            "grad_norm": grad_norm if self.cfg.grad_clip > 0 else None,
            "tokens_per_sec": tokens_per_sec,
            "mfu": self.raw_model.mfu(tokens_per_sec / self.dist.world_size,
                                      self.cfg.block_size, self.device),
            "step_ms": 1000 * elapsed / steps,
            "data_wait_ms": 1000 * self.data_wait / steps,
            "peak_memory_gb": peak_memory_gb(self.device),
            "elapsed_s": now - clock["start"],
        }
        reporter.record(record, format_train(record))
        clock.update(iter=it + 1, time=time.perf_counter())
        self.data_wait = 0.0
        return loss_value

    def _check_finite(self, it: int) -> None:
        """Raises TrainingDiverged if any rank has seen a NaN/inf loss (a host sync)."""
        if self.dist.any(bool(self.nonfinite.item())):
            raise self._diverged(it, "a NaN/inf loss appeared")

    def evaluate_and_save(self, it: int, reporter: Reporter, stop: Optional["StopRequest"] = None,
                          save: bool = True) -> None:
        self._check_finite(it)
        if self.val_loader is not None:
            start = time.perf_counter()
            self.val_loss = self.evaluate(it, stop)
            if not math.isfinite(self.val_loss):
                raise self._diverged(it, f"the val loss became {self.val_loss}")
            self.best_val_loss = min(self.val_loss, self.best_val_loss or math.inf)
            record = {"iter": it, "val_loss": self.val_loss,
                      "eval_ms": 1000 * (time.perf_counter() - start)}
            reporter.record(record, f"eval iter {it}: val loss {self.val_loss:.4f}")
        if save:
            self.save(it)

    def save(self, it: int) -> None:
        """Write the checkpoint of the state in self.snapshot (every rank calls this)."""
        self._check_finite(it)
        rng = self.dist.gather(self.snapshot["rng"])
        if not self.dist.is_main:
            return
        model = unwrap_model(self.model)  # no "module." or "_orig_mod." in the keys
        state = {
            "version": CHECKPOINT_VERSION,
            "model": model.state_dict(),
            "model_args": saved_model_args(model.config),
            "optimizer": self.optimizers[0].state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.snapshot["loader"],
            "iter_num": self.snapshot["iter_num"],
            "rng": rng,
            "world_size": self.dist.world_size,
            "config": saved_config(self.cfg, self.data, self.meta),
            "tokenizer": tokenizer_info(self.meta),
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
        }
        if len(self.optimizers) > 1:
            state["muon"] = self.optimizers[1].state_dict()
        save_checkpoint(self.checkpoint_path, state)

    def run(self) -> TrainResult:
        return run_training(self)

    def close(self) -> None:
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()

