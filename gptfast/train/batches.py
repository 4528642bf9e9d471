"""The data of a run: finding the train and val shards by name or glob, the vocabulary
(meta.json or nanoGPT's meta.pkl), and the token loaders that serve the batches."""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import re
from pathlib import Path
from typing import Optional

from ..char_vocab import META_PKL, MetaPickleError, read_meta_pkl
from .config import TrainConfig
from .device import Distributed
from .errors import TrainError

VOCAB_MULTIPLE = 64  # nanoGPT pads GPT-2's 50257 to 50304 for faster matmuls
GPT2_PADDED_VOCAB = 50304
GPT2_EOT = 50256


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
    from ..data import TokenLoader

    return TokenLoader(paths, cfg.batch_size, cfg.block_size, sampler=sampler, seed=cfg.seed,
                       rank=dist.rank, world_size=dist.world_size, device=device, prefetch=prefetch,
                       align=None if align == "none" else align, eot_token=eot)

