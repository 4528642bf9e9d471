"""What a run tells: metrics.jsonl, the progress bar or log lines, evaluation progress, and
the summary line that opens a run."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

METRICS_NAME = "metrics.jsonl"


def format_train(r: dict) -> str:
    parts = [f"iter {r['iter']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
             f"{r['tokens_per_sec']:,.0f} tok/s"]
    if r["mfu"] is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts += [f"step {r['step_ms']:.1f} ms", f"data {r['data_wait_ms']:.2f} ms",
              f"mem {r['peak_memory_gb']:.2f} GB"]
    return " | ".join(parts)


class Reporter:
    """Rank 0's output: metrics.jsonl, and a tqdm bar on a terminal or plain lines otherwise."""

    def __init__(self, out_dir: Path, enabled: bool, start_iter: int, max_iters: int, resuming: bool):
        self.enabled = enabled
        self.bar = None
        self.file = None
        if not enabled:
            return
        path = out_dir / METRICS_NAME
        _keep_metrics_before(path, start_iter if resuming else 0)
        self.file = open(path, "a")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                            file=sys.stderr)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def record(self, record: dict, line: str) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}, {record['tokens_per_sec']:,.0f} tok/s")
        else:
            self.message(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


class EvalProgress:
    """Progress of one evaluation on rank 0's stderr: a transient tqdm bar on a terminal;
    otherwise plain lines, the first once the evaluation looks longer than QUIET_S (after its
    first batch, with an estimate of the time left), then one every EVERY_S."""

    QUIET_S = 5.0
    EVERY_S = 30.0

    def __init__(self, enabled: bool, it: int, total: int):
        self.enabled, self.it, self.total = enabled, it, total
        self.start = time.perf_counter()
        self.last_line = None
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"eval iter {it}", unit="batch", leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        elapsed = now - self.start
        left = elapsed / done * (self.total - done)
        if self.last_line is None:
            if done == self.total or elapsed + left <= self.QUIET_S:
                return
        elif now - self.last_line < self.EVERY_S:
            return
        self.last_line = now
        print(f"eval iter {self.it}: {done:,}/{self.total:,} val batches in {elapsed:.1f} s, "
              f"about {left:.0f} s left (--eval-iters sets the batches; Ctrl-C stops and saves)",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _keep_metrics_before(path: Path, start_iter: int) -> None:
    """Drop what a resumed run will log again: train lines from start_iter, eval lines after it."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        it = record.get("iter", 0)
        if it < start_iter or (it == start_iter and "val_loss" in record):
            kept.append(line)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("".join(line + "\n" for line in kept))
    os.replace(temp, path)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on device; on CPU, the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux



def summary(trainer) -> str:
    """The line that opens a run: the model, device, attention, optimizer, dtype and iterations
    of the trainer ``trainer``."""
    cfg, config = trainer.cfg, trainer.raw_model.config
    return (f"gptfast train: {trainer.raw_model.num_params() / 1e6:.2f}M parameters "
            f"(n_layer {config.n_layer}, n_head {config.n_head}, n_embd {config.n_embd}, "
            f"vocab {config.vocab_size}, block {config.block_size}, "
            f"{'' if config.bias else 'no '}bias{_modern_text(config)}) on {trainer.device}, "
            f"{_attention_text(cfg, config)}, optimizer {cfg.optimizer}, "
            f"{str(trainer.dtype).removeprefix('torch.')}, backend {cfg.backend}"
            f"{', compiled' if cfg.compile else ''}, {trainer.dist.world_size} rank(s); "
            f"{trainer.tokens_per_iter:,} tokens per iteration; iterations "
            f"{trainer.start_iter} -> {cfg.max_iters}")


def _attention_text(cfg, config) -> str:
    text = f"{getattr(config, 'attention', 'causal')} attention"
    if getattr(config, "attention", "causal") == "document":
        text += f" (eot {config.eot_token})"
    if getattr(config, "window", None):
        text += f", window {config.window}"
    return text + (", windows aligned to documents" if cfg.align == "eot" else "")


def _modern_text(config) -> str:
    """Today's choices of a modern GPT for the summary line ("" for GPT-2's block)."""
    if not getattr(config, "is_modern", False):
        return ""
    parts = [config.norm, f"{config.position} positions", config.mlp]
    if config.qk_norm:
        parts.append(f"qk-norm x{config.qk_scale:g}")
    if config.kv_heads != config.n_head:
        parts.append(f"{config.kv_heads} kv heads")
    if not config.tie_embeddings:
        parts.append("untied head")
    if config.window_pattern:
        parts.append(f"windows {config.window_pattern} (short {config.short_window_size})")
    if config.logit_softcap is not None:
        parts.append(f"softcap {config.logit_softcap:g}")
    return ", " + ", ".join(parts)
