"""Settings of a run: :class:`TrainConfig`, reading a TOML file, validation, the CPU defaults,
and :func:`resolve`, which layers defaults < checkpoint < config file < command line."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Optional

import torch

from ..optim import EMBEDDING_LR, MATRIX_LR, UNEMBEDDING_LR
from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .device import pick_device
from .errors import TrainError

DTYPES = ("auto", "bfloat16", "float16", "float32")
SAMPLERS = ("random", "sequential", "shuffle")
ATTENTIONS = ("causal", "document")
ALIGNS = ("none", "eot")
BACKENDS = ("auto", "triton", "reference")
OPTIMIZERS = ("adamw", "muon")


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



def field_types() -> dict:
    hints = typing.get_type_hints(TrainConfig)
    return {name: next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            for name, hint in hints.items()}


def _coerce(name: str, value, source: str):
    wanted = field_types()[name]
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
    from ..model import GPTConfig

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

