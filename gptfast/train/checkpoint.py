"""Checkpoint files: atomic writes, loading with a version check, the random state of every
generator, and the settings and tokenizer a checkpoint records. What goes into a checkpoint is
assembled in :meth:`gptfast.train.trainer.Trainer.save` and read back in ``Trainer._restore``."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..char_vocab import CharEncoding
from .errors import TrainError

CHECKPOINT_NAME = "ckpt.pt"
CHECKPOINT_VERSION = 1


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



def tokenizer_info(meta: Optional[dict]) -> Optional[dict]:
    """What gptfast sample needs to decode: the data's tiktoken encoding and rank file, or the
    characters of a nanoGPT meta.pkl vocabulary."""
    if meta is None:
        return None
    if "meta_pkl" in meta:
        if meta["itos"] is None:
            return None
        return CharEncoding(meta["itos"], meta["vocab_size"]).tokenizer_info()
    return {k: meta.get(k) for k in ("encoding", "tokenizer_file", "vocab_size", "eot_token")}


def saved_config(cfg, data, meta: Optional[dict]) -> dict:
    """The settings (``cfg``, a TrainConfig), plus nanoGPT's ``dataset`` for a meta.pkl
    vocabulary (the name of ``data.directory``, ``data`` the run's DataFiles): nanoGPT's
    sample.py then decodes with data/<dataset>/meta.pkl, as it does for its own checkpoints."""
    config = dataclasses.asdict(cfg)
    if meta is not None and "meta_pkl" in meta:
        config["dataset"] = os.path.basename(os.path.normpath(data.directory))
    return config

