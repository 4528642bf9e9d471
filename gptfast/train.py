"""The trainer: ``gptfast train`` (also under ``torchrun --nproc_per_node N -m gptfast train``).

nanoGPT's train.py on gptfast's model, ops and token loader: GPT-2 124M by default, warmup +
cosine learning rate, AdamW without decay on biases and LayerNorms (fused on CUDA), gradient
accumulation, gradient clipping, bf16 autocast (fp16 with a GradScaler), periodic evaluation on
the val shards, checkpoints that resume exactly, and DDP. ``--preset nanochat-d20`` trains
today's architecture (:mod:`gptfast.model_modern`), ``--optimizer muon`` with nanochat's Muon +
AdamW split (:mod:`gptfast.optim`).

Settings come from :class:`TrainConfig`'s defaults, then (``--init resume``) the checkpoint's
saved settings, then ``--config FILE.toml``, then command-line flags, each overriding the last.

Iterations: an iteration is one optimizer step over ``grad_accum`` micro-batches of
``batch_size`` x ``block_size`` tokens on each of the ``world_size`` ranks. Iteration ``i``
(0-based) is logged as ``"iter": i``; an evaluation at ``"iter": n`` sees the model after n
iterations (nanoGPT's convention). Checkpoints hold ``iter_num``, the iterations done.

Output directory: ``ckpt.pt`` (written atomically; loads with ``torch.load(weights_only=True)``,
and with :meth:`gptfast.GPT.from_pretrained`) and ``metrics.jsonl``, one JSON object per log
line: train lines carry ``loss``, eval lines ``val_loss``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import glob
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import typing
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .char_vocab import META_PKL, CharEncoding, MetaPickleError, read_meta_pkl
from .optim import EMBEDDING_LR, MATRIX_LR, UNEMBEDDING_LR

CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_VERSION = 1
VOCAB_MULTIPLE = 64  # nanoGPT pads GPT-2's 50257 to 50304 for faster matmuls
GPT2_PADDED_VOCAB = 50304
DTYPES = ("auto", "bfloat16", "float16", "float32")
SAMPLERS = ("random", "sequential", "shuffle")
ATTENTIONS = ("causal", "document")
ALIGNS = ("none", "eot")
GPT2_EOT = 50256
BACKENDS = ("auto", "triton", "reference")
OPTIMIZERS = ("adamw", "muon")


class TrainError(RuntimeError):
    """A problem the user can fix (settings, data, checkpoint); the CLI prints it without a traceback."""


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite; the last good checkpoint was left in place."""


class EvaluationInterrupted(Exception):
    """Ctrl-C/SIGTERM arrived during an evaluation, which stops at its next batch."""


# ----------------------------------------------------------------------------- settings --

@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; each field is also a command-line flag (``--batch-size``) and a
    TOML key (``batch_size`` or ``batch-size``). The defaults train GPT-2 124M as nanoGPT does."""

    data: Optional[str] = None
    train_files: Optional[str] = None
    val_files: Optional[str] = None
    out: Optional[str] = None
    init: str = "scratch"
    model: str = "gpt2"
    preset: Optional[str] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    bias: Optional[bool] = None
    block_size: int = 1024
    batch_size: int = 12
    grad_accum: int = 40
    max_iters: int = 600_000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 2000
    lr_decay_iters: int = 600_000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    matrix_lr: float = MATRIX_LR
    embedding_lr: float = EMBEDDING_LR
    unembedding_lr: float = UNEMBEDDING_LR
    dropout: float = 0.0
    eval_interval: int = 2000
    eval_iters: int = 200
    log_interval: int = 10
    dtype: str = "auto"
    compile: bool = False
    backend: str = "auto"
    sampler: str = "random"
    attention: str = "causal"
    window: Optional[int] = None
    align: str = "none"
    seed: int = 1337
    device: str = "auto"


HELP = {
    "data": "data directory: token shards found by name (gptfast prepare's train_*.bin / "
            "val_*.bin, nanoGPT's train.bin / val.bin, llm.c's NAME_train_*.bin / NAME_val_*.bin "
            "and NAME_train.bin / NAME_val.bin) and the vocabulary: meta.json (gptfast prepare; "
            "vocab padded to a multiple of 64) or nanoGPT's meta.pkl (vocab_size used exactly, "
            "as nanoGPT does; its characters are saved in the checkpoint for gptfast sample); "
            "neither: GPT-2's 50304",
    "train_files": "glob of the train shards, instead of finding them in --data by name "
                   "(quote it); the vocabulary is then read from --data, or else from the "
                   "directory of the first match",
    "val_files": "glob of the val shards, instead of finding them by name",
    "out": "output directory: ckpt.pt and metrics.jsonl",
    "init": "scratch, resume (from OUT/ckpt.pt), or a path: a local Hugging Face GPT-2 directory "
            "or a nanoGPT checkpoint",
    "model": "architecture preset for --init scratch: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
             "(or any --preset name)",
    "preset": "architecture preset for --init scratch, as --model: gpt2, gpt2-medium, gpt2-large, "
              "gpt2-xl, or nanochat-d12, nanochat-d20, nanochat-d26 (today's GPT: rotary, RMSNorm, "
              "QK-norm, ReLU^2, untied head, SSSL windows, logit softcap 15; --block-size "
              "defaults to the preset's, 2048). --n-layer/--n-head/--n-embd/--block-size override "
              "its sizes",
    "n_layer": "override the preset's number of layers",
    "n_head": "override the preset's number of heads",
    "n_embd": "override the preset's width",
    "bias": "biases in the Linear layers and LayerNorms (nanoGPT's bias). --init scratch: "
            "default --no-bias, nanoGPT's train.py default; from a checkpoint or pretrained "
            "weights the model decides and a conflicting flag is an error",
    "block_size": "context length T",
    "batch_size": "micro-batch size B per rank",
    "grad_accum": "micro-batches per optimizer step and rank (tokens per step: B*T*K*ranks)",
    "max_iters": "optimizer steps to reach (a resumed run continues up to it)",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "linear warmup steps",
    "lr_decay_iters": "step at which the cosine decay reaches --min-lr",
    "weight_decay": "AdamW weight decay on matrices and embeddings",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "optimizer": "adamw (nanoGPT's: --lr, --weight-decay, --beta1/2 for every parameter) or muon "
                 "(nanochat's: torch.optim.Muon for the blocks' matrices at --matrix-lr with "
                 "--weight-decay, AdamW for the head at --unembedding-lr and the embeddings at "
                 "--embedding-lr, both times (n_embd/768)^-0.5; every rate follows the warmup + "
                 "cosine shape of --lr/--min-lr)",
    "matrix_lr": "--optimizer muon: Muon's peak learning rate (nanochat's default)",
    "embedding_lr": "--optimizer muon: AdamW's peak rate for embeddings before the width scaling "
                    "(nanochat's default)",
    "unembedding_lr": "--optimizer muon: AdamW's peak rate for lm_head, biases and norm weights "
                      "before the width scaling (nanochat's default)",
    "dropout": "dropout rate (0 for pretraining)",
    "eval_interval": "evaluate on the val shards and write a checkpoint every N steps",
    "eval_iters": "val batches per evaluation",
    "log_interval": "log every N steps",
    "dtype": "autocast dtype: auto (bfloat16 on CUDA where supported, else float16; float32 on "
             "CPU), bfloat16, float16 (with a GradScaler), float32",
    "compile": "torch.compile the model",
    "backend": "gptfast op backend: auto, triton, reference",
    "sampler": "train batch sampler: random (nanoGPT), sequential, shuffle",
    "attention": "causal (every token sees all earlier tokens of its window, as nanoGPT) or "
                 "document (only earlier tokens of its own document; a document starts at each "
                 "end-of-text token, the data's meta.json eot_token or GPT-2's 50256)",
    "window": "sliding-window attention: each token sees at most the last N tokens, itself "
              "included (combines with --attention document; 0: no window)",
    "align": "none, or eot: every train window starts at a document start (an end-of-text "
             "token, or the start of the data) so no window opens mid-document; evaluation "
             "stays sequential and unaligned. Warns when the aligned windows can read less "
             "than half of the train tokens (few, long documents)",
    "seed": "random seed (model init, data order, dropout)",
    "device": "auto, cuda, cuda:N or cpu (under torchrun: cuda:LOCAL_RANK)",
}

METAVARS = {"data": "DIR", "out": "DIR", "train_files": "GLOB", "val_files": "GLOB"}


def _field_types() -> dict:
    hints = typing.get_type_hints(TrainConfig)
    return {name: next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            for name, hint in hints.items()}


def _coerce(name: str, value, source: str):
    wanted = _field_types()[name]
    if value is None:
        return None
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, wanted) or (wanted is not bool and isinstance(value, bool)):
        raise TrainError(f"{source}: {name} must be {wanted.__name__}, got {value!r}")
    return value


def read_config_file(path) -> dict:
    """Settings from a TOML file: TrainConfig keys, with - or _ (unknown keys are an error)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as err:
        raise TrainError(f"cannot read --config {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise TrainError(f"--config {path} is not valid TOML: {err}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise TrainError(f"--config {path}: unknown setting {key!r}; known: "
                             f"{', '.join(sorted(known))}")
        settings[name] = _coerce(name, value, f"--config {path}")
    return settings


def _check_choice(name, value, choices):
    if value not in choices:
        raise TrainError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    if not cfg.out:
        raise TrainError("--out DIR is required")
    if not cfg.data and not cfg.train_files:
        raise TrainError("--data DIR (or --train-files GLOB) is required (a resumed run takes "
                         "it from the checkpoint)")
    for name in ("block_size", "batch_size", "grad_accum", "eval_interval", "eval_iters",
                 "log_interval"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise TrainError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "seed"):
        if getattr(cfg, name) < 0:
            raise TrainError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr_decay_iters < cfg.warmup_iters:
        raise TrainError(f"lr_decay_iters ({cfg.lr_decay_iters}) must be >= warmup_iters "
                         f"({cfg.warmup_iters})")
    if not (cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr):
        raise TrainError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={cfg.lr}, min_lr={cfg.min_lr}")
    if not (0 <= cfg.dropout < 1 and cfg.grad_clip >= 0 and cfg.weight_decay >= 0):
        raise TrainError("need 0 <= dropout < 1, grad_clip >= 0 and weight_decay >= 0")
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("sampler", cfg.sampler, SAMPLERS)
    _check_choice("backend", cfg.backend, BACKENDS)
    _check_choice("attention", cfg.attention, ATTENTIONS)
    _check_choice("align", cfg.align, ALIGNS)
    _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    for name in ("matrix_lr", "embedding_lr", "unembedding_lr"):
        if not getattr(cfg, name) > 0:
            raise TrainError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.preset is not None and cfg.model not in ("gpt2", cfg.preset):
        raise TrainError(f"--preset {cfg.preset} and --model {cfg.model} name two architectures; "
                         "give one")
    if cfg.window is not None and cfg.window < 0:
        raise TrainError(f"window must be >= 1 (or 0 for none), got {cfg.window}")
    if cfg.window == 0:
        cfg.window = None
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except RuntimeError:
            raise TrainError(f"device {cfg.device!r} is not a torch device") from None
    return cfg


# A run on a CPU gets nanoGPT's own CPU recipe (its README's shakespeare_char command and
# config: a 0.8M-parameter model, 20 eval batches) for every one of these it does not set, so
# the first log line comes in seconds rather than after GPT-2 124M's 200-batch evaluation.
CPU_DEFAULTS = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
                "grad_accum": 1, "max_iters": 2000, "lr_decay_iters": 2000, "warmup_iters": 100,
                "eval_interval": 250, "eval_iters": 20, "log_interval": 10}
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size")


def cpu_defaults(given: dict) -> dict:
    """The CPU_DEFAULTS for the settings not in `given` (a config file's and the command
    line's). The architecture ones only for a scratch model of the default preset (--model or
    --init PATH decide the architecture otherwise); lr_decay_iters follows a given max_iters."""
    chosen = {}
    for name, value in CPU_DEFAULTS.items():
        if name in given:
            continue
        if name in ARCHITECTURE and (given.get("init", "scratch") != "scratch" or "model" in given
                                     or "preset" in given):
            continue
        chosen[name] = value
    if "lr_decay_iters" in chosen and "max_iters" in given:
        chosen["lr_decay_iters"] = given["max_iters"]
    if "warmup_iters" in chosen:
        decay = chosen.get("lr_decay_iters", given.get("lr_decay_iters"))
        chosen["warmup_iters"] = min(chosen["warmup_iters"], decay)
    return chosen


def resolve(overrides: dict, config_file=None) -> tuple[TrainConfig, Optional[dict], dict]:
    """(settings, checkpoint to resume or None, the CPU defaults applied): defaults (CPU
    defaults on a CPU, see cpu_defaults) < checkpoint < config file < overrides. A resumed
    run takes every setting it does not override from its checkpoint."""
    given = read_config_file(config_file) if config_file else {}
    given.update({k: _coerce(k, v, "command line") for k, v in overrides.items() if v is not None})
    base = dataclasses.asdict(TrainConfig())
    checkpoint = None
    applied = {}
    if given.get("init") == "resume":
        if not given.get("out"):
            raise TrainError("--init resume needs --out DIR holding ckpt.pt")
        checkpoint = load_checkpoint(Path(given["out"]) / CHECKPOINT_NAME)
        saved = {k: v for k, v in checkpoint["config"].items() if k in base}
        base.update(saved)
    else:
        base["block_size"] = _preset_block_size(given.get("preset"), base["block_size"])
        if _device_is_cpu(given.get("device", base["device"])):
            applied = cpu_defaults(given)
            base.update(applied)
    base.update(given)
    for name in ("data", "out", "train_files", "val_files"):
        if base[name]:
            base[name] = os.path.abspath(base[name])  # a resumed run may start elsewhere
    return validate(TrainConfig(**base)), checkpoint, applied


def _preset_block_size(preset: Optional[str], default: int) -> int:
    """The context length of a --preset (nanochat's 2048), else default."""
    from .model import GPTConfig

    try:
        return GPTConfig.preset(preset).block_size if preset else default
    except ValueError:
        return default  # an unknown name: build_model reports it


def _device_is_cpu(setting: str) -> bool:
    """Whether the run will be on a CPU (pick_device's choice)."""
    try:
        return pick_device(setting, local_rank=0).type == "cpu"
    except (RuntimeError, TrainError):
        return False  # not a device, or CUDA asked for and missing: reported later


def resolve_config(overrides: dict, config_file=None) -> tuple[TrainConfig, Optional[dict]]:
    """(settings, checkpoint to resume or None): see resolve()."""
    cfg, checkpoint, _ = resolve(overrides, config_file)
    return cfg, checkpoint


def describe_cpu_defaults(applied: dict) -> str:
    flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in applied.items())
    return f"CPU defaults (no GPU; a flag or --config setting overrides each): {flags}"


# ---------------------------------------------------------------------------- devices --

@dataclasses.dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control_group: object = None  # gloo group for host-side agreement (no GPU sync under nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when flag is True on any: one tiny CPU collective under DDP."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0])
        torch.distributed.all_reduce(value, group=self.control_group)
        return bool(value.item())

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        objects = [None] * self.world_size
        torch.distributed.all_gather_object(objects, obj, group=self.control_group)
        return objects

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=self.control_group)


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device {setting!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_setting: str) -> tuple[Distributed, torch.device]:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK and joins the process group (nccl on CUDA,
    gloo on CPU); a plain process gets rank 0 of 1 and no group."""
    env = os.environ
    dist = Distributed(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")),
                       int(env.get("LOCAL_RANK", "0")))
    device = pick_device(device_setting, dist.local_rank)
    if dist.enabled and device.type == "cuda":
        torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl", device_id=device)
        dist.control_group = torch.distributed.new_group(backend="gloo")
    elif dist.enabled:
        torch.distributed.init_process_group(backend="gloo")
        dist.control_group = torch.distributed.group.WORLD
    return dist, device


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, setting)


# ------------------------------------------------------------------------------- data --

def read_data_meta(data_dir) -> Optional[dict]:
    """The data's vocabulary: meta.json (gptfast prepare), else nanoGPT's meta.pkl (as
    ``{"vocab_size", "itos", "meta_pkl": path}``), else None."""
    path = Path(data_dir) / "meta.json"
    if path.exists():
        with open(path) as f:
            return json.load(f)
    pkl = Path(data_dir) / META_PKL
    if pkl.exists():
        try:
            return {**read_meta_pkl(pkl), "meta_pkl": str(pkl)}
        except MetaPickleError as err:
            raise TrainError(str(err)) from None
    return None


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_vocab_size(meta: Optional[dict]) -> int:
    """A scratch model's vocabulary: nanoGPT's meta.pkl vocab_size as it is (nanoGPT's rule),
    meta.json's padded to a multiple of 64, GPT-2's 50304 without either."""
    if meta is None:
        return GPT2_PADDED_VOCAB
    if "meta_pkl" in meta:
        return meta["vocab_size"]
    return padded_vocab_size(meta["vocab_size"])


# llm.c's names: PREFIX_SPLIT_NNNNNN.bin (fineweb_train_000001.bin) or PREFIX_SPLIT.bin
# (tiny_shakespeare_train.bin)
_LLMC_SHARD = r"(?P<prefix>.+)_{split}(?P<number>_\d+)?\.bin"


def shard_paths(data_dir, split: str) -> list[str]:
    """The SPLIT shards of data_dir, found by name: gptfast prepare's SPLIT_*.bin, else
    nanoGPT's SPLIT.bin, else llm.c's PREFIX_SPLIT_NNNNNN.bin (numbered shards before a single
    PREFIX_SPLIT.bin). Files of two naming schemes or two llm.c prefixes are an error, not a
    silent mix of datasets."""
    data_dir = str(data_dir)
    names = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
    families = {}  # naming scheme -> (numbered shards, single file)
    pattern = re.compile(_LLMC_SHARD.format(split=re.escape(split)))
    for name in names:
        if fnmatch.fnmatchcase(name, f"{split}_*.bin") or name == f"{split}.bin":
            prefix, numbered = "", name != f"{split}.bin"
        elif (match := pattern.fullmatch(name)):
            prefix, numbered = match["prefix"] + "_", match["number"] is not None
        else:
            continue
        shards, single = families.setdefault(prefix, ([], []))
        (shards if numbered else single).append(os.path.join(data_dir, name))
    if len(families) > 1:
        found = ", ".join(f"{prefix}{split}*.bin" for prefix in families)
        flag = f"--{split}-files"
        raise TrainError(f"{data_dir} holds {split} shards of {len(families)} datasets ({found}); "
                         f"choose with {flag} GLOB")
    for shards, single in families.values():
        return shards or single
    return []


def glob_files(pattern: str, flag: str) -> list[str]:
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise TrainError(f"{flag} {pattern!r} matches no file")
    return paths


@dataclasses.dataclass
class DataFiles:
    train: list
    val: list
    directory: str  # where the vocabulary (meta.json / meta.pkl) is read


def find_data(cfg: TrainConfig) -> DataFiles:
    """Train and val shards: --train-files / --val-files globs, else found by name in --data."""
    if cfg.train_files:
        train = glob_files(cfg.train_files, "--train-files")
    else:
        train = shard_paths(cfg.data, "train")
        if not train:
            raise TrainError(f"{cfg.data} holds no train shards (train_*.bin, train.bin, or "
                             "llm.c's NAME_train_*.bin); make them with `gptfast prepare`, or "
                             "name them with --train-files GLOB")
    directory = cfg.data or os.path.dirname(train[0])
    if cfg.val_files:
        val = glob_files(cfg.val_files, "--val-files")
    else:
        val = shard_paths(directory, "val")
    return DataFiles(train, val, directory)


def eot_token(meta: Optional[dict]) -> int:
    """The data's end-of-text token id: meta.json's eot_token (gptfast prepare), else GPT-2's."""
    value = (meta or {}).get("eot_token")
    return GPT2_EOT if value is None else int(value)


def make_loader(paths, cfg: TrainConfig, sampler: str, dist: Distributed, device, prefetch=4,
                align: str = "none", eot: int = GPT2_EOT):
    from .data import TokenLoader

    return TokenLoader(paths, cfg.batch_size, cfg.block_size, sampler=sampler, seed=cfg.seed,
                       rank=dist.rank, world_size=dist.world_size, device=device, prefetch=prefetch,
                       align=None if align == "none" else align, eot_token=eot)


# ------------------------------------------------------------------------------ model --

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, so saved
    keys never carry their prefixes."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def crop_block_size(model, block_size: int) -> None:
    """Shrink a loaded model's context to block_size (nanoGPT's crop_block_size)."""
    try:
        model.crop_block_size(block_size)
    except ValueError as err:
        raise TrainError(f"--block-size: {err}") from None


def _check_architecture(cfg: TrainConfig, config, checkpoint) -> None:
    """Size flags must agree with a model that comes from a checkpoint or pretrained weights."""
    for name in ("n_layer", "n_head", "n_embd", "bias", "block_size"):
        wanted, actual = getattr(cfg, name), getattr(config, name)
        if wanted is not None and wanted != actual:
            source = "the checkpoint being resumed" if checkpoint is not None else f"--init {cfg.init}"
            raise TrainError(f"{name} {wanted} differs from the model of {source} ({actual}); the "
                             "architecture comes from there")


def attention_args(cfg: TrainConfig, eot: int) -> dict:
    """GPTConfig's attention fields for this run (masks only: no parameter depends on them,
    so a run may change them on resume or on top of pretrained weights)."""
    return {"attention": cfg.attention, "window": cfg.window, "eot_token": eot}


def _config_error(err: ValueError, cfg: TrainConfig) -> TrainError:
    if cfg.attention == "document" and "eot_token" in str(err):
        return TrainError(f"--attention document: {err} (the data's vocabulary has no GPT-2 "
                          "end-of-text token; give meta.json an eot_token)")
    return TrainError(str(err))


def build_model(cfg: TrainConfig, data_vocab: int, checkpoint: Optional[dict],
                scratch_vocab: Optional[int] = None, eot: int = GPT2_EOT):
    """The GPT to train: from scratch (a preset with ``scratch_vocab`` tokens, default
    data_vocab padded to a multiple of 64), the checkpoint being resumed, or pretrained weights
    (GPT.from_pretrained); with this run's attention masks (:func:`attention_args`)."""
    from .model import GPT, GPTConfig

    masks = attention_args(cfg, eot)
    if checkpoint is not None:
        args = {**checkpoint["model_args"], "dropout": cfg.dropout, **masks}
        try:
            config = GPTConfig(**args)
        except ValueError as err:
            raise _config_error(err, cfg) from None
        model = GPT(config)
        model.load_state_dict(checkpoint["model"])
    elif cfg.init == "scratch":
        sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
        try:
            vocab = scratch_vocab or padded_vocab_size(data_vocab)
            config = GPTConfig.preset(cfg.preset or cfg.model, vocab_size=vocab,
                                      block_size=cfg.block_size,
                                      dropout=cfg.dropout, bias=bool(cfg.bias),  # unset: False
                                      **sizes, **masks)
        except ValueError as err:
            raise _config_error(err, cfg) from None
        model = GPT(config)
    else:
        try:
            model = GPT.from_pretrained(cfg.init, dropout=cfg.dropout)
        except (OSError, ValueError) as err:
            raise TrainError(f"--init {cfg.init}: {err}") from None
        crop_block_size(model, cfg.block_size)
        if any(getattr(model.config, k) != v for k, v in masks.items()):
            try:  # the masks are set up when the layers are built: build them again
                config = dataclasses.replace(model.config, **masks)
            except ValueError as err:
                raise _config_error(err, cfg) from None
            state = model.state_dict()
            model = GPT(config)
            model.load_state_dict(state)
    _check_architecture(cfg, model.config, checkpoint)
    if model.config.vocab_size < data_vocab:
        raise TrainError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                         f"data's ({data_vocab})")
    return model


# ------------------------------------------------------------------------ checkpoints --

def save_checkpoint(path, state: dict) -> None:
    """torch.save to PATH.tmp, fsync, then os.replace: PATH is always a whole checkpoint."""
    path = Path(path)
    temp = path.with_name(path.name + ".tmp")
    try:
        with open(temp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise TrainError(f"no checkpoint to resume at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path} is not a gptfast training checkpoint (version {CHECKPOINT_VERSION})")
    return checkpoint


def rng_state(device: torch.device) -> dict:
    """Every random generator the run uses, in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ----------------------------------------------------------------------------- schedule --

def learning_rate(it: int, cfg: TrainConfig) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# ---------------------------------------------------------------------------- logging --

def _format_train(r: dict) -> str:
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


# ---------------------------------------------------------------------------- trainer --

@dataclasses.dataclass
class TrainResult:
    iter_num: int
    last_loss: Optional[float]
    val_loss: Optional[float]
    interrupted: bool
    checkpoint: Optional[str]


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current step; a second Ctrl-C stops at once,
    unless ``second_interrupt_quits`` is off (under torchrun every rank gets Ctrl-C twice, from
    the terminal and from the agent, which itself kills workers that do not exit in time)."""

    def __init__(self, second_interrupt_quits: bool = True):
        self.requested = False
        self.second_interrupt_quits = second_interrupt_quits
        self._previous = {}
        self._raise = None

    @contextlib.contextmanager
    def raising(self, error: type):
        """Within it, a stop request also raises `error` at once, from wherever the main thread
        is (between two torch ops, or in the loader's wait): for work that may stop midway
        without losing anything, like an evaluation."""
        self._raise = error
        try:
            yield
        finally:
            self._raise = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and self.second_interrupt_quits:
            raise KeyboardInterrupt
        self.requested = True
        if self._raise is not None:
            error, self._raise = self._raise, None
            raise error

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
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
        from .optim import muon_and_adamw

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

    def _take_snapshot(self, iter_num: int) -> None:
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
        reporter.record(record, _format_train(record))
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
            "config": _saved_config(self.cfg, self.data, self.meta),
            "tokenizer": _tokenizer_info(self.meta),
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
        }
        if len(self.optimizers) > 1:
            state["muon"] = self.optimizers[1].state_dict()
        save_checkpoint(self.checkpoint_path, state)

    # -- the loop --

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        reporter = Reporter(self.out_dir, self.dist.is_main, self.start_iter, cfg.max_iters,
                            resuming=self.start_iter > 0)
        try:
            reporter.message(self._summary())
            for note in self.notes:
                reporter.message(note)
            with StopRequest(second_interrupt_quits=not self.dist.enabled) as stop:
                return self._loop(reporter, stop)
        finally:
            reporter.close()

    def _loop(self, reporter: Reporter, stop: StopRequest) -> TrainResult:
        cfg = self.cfg
        it = self.start_iter
        last_loss = None
        self._take_snapshot(it)
        try:
            if it == 0 and self.val_loader is not None:
                self.evaluate_and_save(it, reporter, stop, save=False)
            clock = {"start": time.perf_counter(), "time": time.perf_counter(), "iter": it}
            while it < cfg.max_iters:
                if self.dist.any(stop.requested):
                    return self._interrupted(it, reporter, last_loss)
                loss = self.train_step(it)
                it += 1
                self._take_snapshot(it)
                reporter.advance()
                if (it - 1) % cfg.log_interval == 0 or it == cfg.max_iters:
                    last_loss = self.log_train(it - 1, loss, reporter, clock)
                if it % cfg.eval_interval == 0 and it < cfg.max_iters:
                    self.evaluate_and_save(it, reporter, stop)
                    clock.update(iter=it, time=time.perf_counter())  # eval time is not step time
                    self.data_wait = 0.0
            if it > self.start_iter or not self.checkpoint_path.exists():
                self.evaluate_and_save(it, reporter, stop)
        except EvaluationInterrupted:
            reporter.message(f"evaluation at iteration {it} stopped")
            return self._interrupted(it, reporter, last_loss)
        except KeyboardInterrupt:
            # A second Ctrl-C means now; under DDP the other ranks could not join a save; and
            # mid-update the weights are half-stepped: in each case no consistent state to save.
            if stop.requested or self.dist.enabled or self.in_update:
                reporter.message("interrupted: no checkpoint written")
                raise
            return self._interrupted(self.snapshot["iter_num"], reporter, last_loss)
        reporter.message(f"done: {it} iterations, checkpoint {self.checkpoint_path}")
        return TrainResult(it, last_loss, self.val_loss, False, str(self.checkpoint_path))

    def _interrupted(self, it: int, reporter: Reporter, last_loss) -> TrainResult:
        self.save(it)
        reporter.message(f"interrupted: checkpoint of iteration {it} written to "
                         f"{self.checkpoint_path}; continue with --init resume")
        return TrainResult(it, last_loss, self.val_loss, True, str(self.checkpoint_path))

    def _summary(self) -> str:
        cfg, config = self.cfg, self.raw_model.config
        return (f"gptfast train: {self.raw_model.num_params() / 1e6:.2f}M parameters "
                f"(n_layer {config.n_layer}, n_head {config.n_head}, n_embd {config.n_embd}, "
                f"vocab {config.vocab_size}, block {config.block_size}, "
                f"{'' if config.bias else 'no '}bias{_modern_text(config)}) on {self.device}, "
                f"{self._attention_text()}, optimizer {cfg.optimizer}, "
                f"{str(self.dtype).removeprefix('torch.')}, backend {cfg.backend}"
                f"{', compiled' if cfg.compile else ''}, {self.dist.world_size} rank(s); "
                f"{self.tokens_per_iter:,} tokens per iteration; iterations "
                f"{self.start_iter} -> {cfg.max_iters}")

    def _attention_text(self) -> str:
        cfg, config = self.cfg, self.raw_model.config
        text = f"{getattr(config, 'attention', 'causal')} attention"
        if getattr(config, "attention", "causal") == "document":
            text += f" (eot {config.eot_token})"
        if getattr(config, "window", None):
            text += f", window {config.window}"
        return text + (", windows aligned to documents" if cfg.align == "eot" else "")

    def close(self) -> None:
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()


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


def saved_model_args(config) -> dict:
    """The checkpoint's model_args: GPTConfig's fields, without the attention fields when they
    are the defaults (plain causal attention) and without today's choices left at GPT-2's
    values, so that nanoGPT's own GPTConfig(**model_args) still loads a plain run's
    checkpoint. GPT.from_pretrained reads every kind."""
    from .model import MODERN_DEFAULTS

    args = dataclasses.asdict(config)
    if args.get("attention", "causal") == "causal" and args.get("window") is None:
        for name in ("attention", "window", "eot_token"):
            args.pop(name, None)
    for name, default in MODERN_DEFAULTS.items():
        if name in args and args[name] == default:
            args.pop(name)
    return args


def _tokenizer_info(meta: Optional[dict]) -> Optional[dict]:
    """What gptfast sample needs to decode: the data's tiktoken encoding and rank file, or the
    characters of a nanoGPT meta.pkl vocabulary."""
    if meta is None:
        return None
    if "meta_pkl" in meta:
        if meta["itos"] is None:
            return None
        return CharEncoding(meta["itos"], meta["vocab_size"]).tokenizer_info()
    return {k: meta.get(k) for k in ("encoding", "tokenizer_file", "vocab_size", "eot_token")}


def _saved_config(cfg: TrainConfig, data: DataFiles, meta: Optional[dict]) -> dict:
    """The settings, plus nanoGPT's ``dataset`` for a meta.pkl vocabulary: nanoGPT's sample.py
    then decodes with data/<dataset>/meta.pkl, as it does for its own checkpoints."""
    config = dataclasses.asdict(cfg)
    if meta is not None and "meta_pkl" in meta:
        config["dataset"] = os.path.basename(os.path.normpath(data.directory))
    return config


def train(cfg: TrainConfig, checkpoint: Optional[dict] = None,
          cpu_defaults_applied: Optional[dict] = None) -> TrainResult:
    """Run training as configured (under torchrun, on every rank); ``cpu_defaults_applied``
    (from resolve()) is reported after the run's summary."""
    from .backend import use_backend

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


# -------------------------------------------------------------------------------- CLI --

def add_arguments(parser) -> None:
    parser.epilog = ("On a CPU (no CUDA, or --device cpu) a new run gets nanoGPT's CPU recipe "
                     "for each of these it does not set: " +
                     ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in CPU_DEFAULTS.items()) +
                     " (the model sizes only for a scratch gpt2 preset); the log "
                     "names the ones applied.")
    parser.add_argument("--config", metavar="FILE.toml",
                        help="settings file (TrainConfig keys); command-line flags override it")
    types = _field_types()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        help_text = HELP[field.name] + ("" if default is None else f" (default {default})")
        if types[field.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=types[field.name], default=argparse.SUPPRESS,
                                metavar=METAVARS.get(field.name, field.name.upper()),
                                help=help_text)


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
