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

One module per job, each importing only the ones before it in this list:
errors, checkpoint (files, random state), device (device, DDP), config (TrainConfig, resolve),
flags (the command line), batches (shards, vocabulary, loaders), model (the GPT to train),
schedule (learning rate), report (metrics, progress, summary), signals (Ctrl-C), loop (the
training loop), trainer (a run's state and one step), launch (train() and the CLI's run()).
"""

from .batches import (GPT2_EOT, GPT2_PADDED_VOCAB, VOCAB_MULTIPLE, DataFiles, eot_token,
                      find_data, glob_files, make_loader, model_vocab_size, padded_vocab_size,
                      read_data_meta, shard_paths)
from .checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, load_checkpoint, rng_state,
                         save_checkpoint, seed_everything, set_rng_state)
from .config import (ALIGNS, ARCHITECTURE, ATTENTIONS, BACKENDS, CPU_DEFAULTS, DTYPES, OPTIMIZERS,
                     SAMPLERS, TrainConfig, cpu_defaults, describe_cpu_defaults, read_config_file,
                     resolve, resolve_config, validate)
from .device import Distributed, autocast_dtype, init_distributed, pick_device
from .errors import EvaluationInterrupted, TrainError, TrainingDiverged
from .flags import HELP, METAVARS, add_arguments
from .launch import run, train
from .loop import TrainResult
from .model import (attention_args, build_model, crop_block_size, saved_model_args,
                    unwrap_model)
from .report import METRICS_NAME, EvalProgress, Reporter, peak_memory_gb
from .schedule import learning_rate
from .signals import StopRequest
from .trainer import Trainer

__all__ = [
    "ALIGNS", "ARCHITECTURE", "ATTENTIONS", "BACKENDS", "CHECKPOINT_NAME", "CHECKPOINT_VERSION",
    "CPU_DEFAULTS", "DTYPES", "DataFiles", "Distributed", "EvalProgress", "EvaluationInterrupted",
    "GPT2_EOT", "GPT2_PADDED_VOCAB", "HELP", "METAVARS", "METRICS_NAME", "OPTIMIZERS", "Reporter",
    "SAMPLERS", "StopRequest", "TrainConfig", "TrainError", "TrainResult", "Trainer",
    "TrainingDiverged", "VOCAB_MULTIPLE", "add_arguments", "attention_args", "autocast_dtype",
    "build_model", "cpu_defaults", "crop_block_size", "describe_cpu_defaults", "eot_token",
    "find_data", "glob_files", "init_distributed", "learning_rate", "load_checkpoint",
    "make_loader", "model_vocab_size", "padded_vocab_size", "peak_memory_gb", "pick_device",
    "read_config_file", "read_data_meta", "resolve", "resolve_config", "rng_state", "run",
    "save_checkpoint", "saved_model_args", "seed_everything", "set_rng_state", "shard_paths",
    "train", "unwrap_model", "validate",
]
