"""The command-line flags of ``gptfast train``: one per :class:`TrainConfig` field, with its
help text."""

from __future__ import annotations

import argparse
import dataclasses

from .config import CPU_DEFAULTS, TrainConfig, field_types

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


def add_arguments(parser) -> None:
    parser.epilog = ("On a CPU (no CUDA, or --device cpu) a new run gets nanoGPT's CPU recipe "
                     "for each of these it does not set: " +
                     ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in CPU_DEFAULTS.items()) +
                     " (the model sizes only for a scratch gpt2 preset); the log "
                     "names the ones applied.")
    parser.add_argument("--config", metavar="FILE.toml",
                        help="settings file (TrainConfig keys); command-line flags override it")
    types = field_types()
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

