"""The GPT to train: from scratch, from the checkpoint being resumed, or from pretrained
weights; and the model_args a checkpoint records."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .batches import GPT2_EOT, padded_vocab_size
from .config import TrainConfig
from .errors import TrainError


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
    from ..model import GPT, GPTConfig

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



def saved_model_args(config) -> dict:
    """The checkpoint's model_args: GPTConfig's fields, without the attention fields when they
    are the defaults (plain causal attention) and without today's choices left at GPT-2's
    values, so that nanoGPT's own GPTConfig(**model_args) still loads a plain run's
    checkpoint. GPT.from_pretrained reads every kind."""
    from ..model import MODERN_DEFAULTS

    args = dataclasses.asdict(config)
    if args.get("attention", "causal") == "causal" and args.get("window") is None:
        for name in ("attention", "window", "eot_token"):
            args.pop(name, None)
    for name, default in MODERN_DEFAULTS.items():
        if name in args and args[name] == default:
            args.pop(name)
    return args
