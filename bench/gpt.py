"""The GPT step suite of ``gptfast bench``: one training step or one inference forward, timed
per implementation, batch size B and context length T.

Implementations:

- ``gptfast``: ``gptfast.GPT`` on backend "auto" (Triton kernels on CUDA), its loss from the
  fused linear + cross-entropy (``return_logits=False``);
- ``gptfast-reference``: the same model on the reference ops (backend "reference": plain PyTorch);
- ``gptfast-compile``: ``gptfast.GPT`` (backend "auto") under ``torch.compile``;
- ``nanogpt-eager``: the nanoGPT baseline (:mod:`.nanogpt`: PyTorch, SDPA, fp32-upcast loss),
  the reference point of every speed-up;
- ``nanogpt-compile``: the baseline under ``torch.compile``, as nanoGPT's train.py runs it;
- ``nanochat-eager``, ``nanochat-compile``: nanochat's own ``nanochat.gpt.GPT`` (its SDPA
  fallback off Hopper), when ``import nanochat.gpt`` works (nanochat is not on PyPI: put a checkout
  on PYTHONPATH); otherwise its cells are "unavailable" rows saying why.

Architectures (the ``--arch`` axis): ``gpt2`` (GPT-2 block, the gptfast and nanoGPT impls at
``settings.model``), ``nanochat`` (the gptfast impls run our modern GPT at
``settings.nanochat_model``, a nanochat preset, against the nanochat impls at the same shapes; the
row's impl reads e.g. ``gptfast nanochat``). nanochat's model also carries its value embeddings,
smear, backout and per-layer scalars, which ours does not: same shapes, not the same work.
nanochat computes in its own ``COMPUTE_DTYPE`` (``NANOCHAT_DTYPE``, bf16 on Ampere and later,
fp32 on the CPU) without autocast; a cell whose dtype differs from it is "unavailable".

Attention (the ``--attention`` axis): ``causal`` (every cell), or ``document`` for the gptfast
implementations: ``GPTConfig(attention="document")`` on batches whose tokens hold an end-of-text
token (the vocabulary's last id) with probability 1 / :data:`DOCUMENT_LENGTH` per position, so
documents average that many tokens; the row's impl reads e.g. ``gptfast document``. The
nanoGPT baseline has no document mask: its document cells are left out.

Modes: ``train`` is forward, backward, AdamW step (fused on CUDA) and ``zero_grad``, nanoGPT's
loop without gradient clipping or accumulation; ``infer`` is the forward computing the loss of
all B x T positions under ``torch.no_grad`` (the cost of evaluation or prefill).

Each measurement builds its own seeded model (block_size ``max(1024, T)``: positions beyond 1024
get a fresh, randomly initialised position table) and optimizer, on one random batch, so cells
do not share memory or compiled code. bf16 runs under autocast with fp32 weights, as nanoGPT.
The first warm-up step, which includes ``torch.compile``'s compilation, and the whole warm-up are
timed separately from the timed steps. Timed steps use CUDA events on GPU (``perf_counter``
on CPU); a cell reports their median and spread. An out-of-memory error is a result ("oom"),
as is any other failure ("error", with its message); the sweep goes on after either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import time
from typing import Callable, Optional

import torch

import gptfast
from gptfast.model import GPT, GPTConfig, device_peak_flops

from .common import Meter, compiled, is_out_of_memory, percentile, short_reason
from .nanogpt import NanoGPT


@contextlib.contextmanager
def nanogpt_matmul_precision(device: torch.device):
    """TF32 for fp32 matmuls and convolutions on CUDA, as nanoGPT's train.py sets it."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclasses.dataclass(frozen=True)
class Impl:
    description: str
    family: str                    # "gptfast" or "nanogpt": which model class
    backend: Optional[str] = None  # the gptfast backend the steps run under
    compiled: bool = False


IMPLS = {
    "gptfast": Impl("gptfast.GPT, backend auto (Triton kernels on CUDA), fused linear + CE loss",
                    "gptfast", "auto"),
    "gptfast-reference": Impl("gptfast.GPT on the reference ops (plain PyTorch)", "gptfast",
                              "reference"),
    "gptfast-compile": Impl("gptfast.GPT, backend auto, under torch.compile", "gptfast", "auto",
                            compiled=True),
    "nanogpt-eager": Impl("nanoGPT baseline: PyTorch, SDPA, fp32-upcast cross-entropy", "nanogpt"),
    "nanogpt-compile": Impl("nanoGPT baseline under torch.compile", "nanogpt", compiled=True),
    "nanochat-eager": Impl("nanochat's own GPT (import nanochat.gpt; arch nanochat only)",
                           "nanochat"),
    "nanochat-compile": Impl("nanochat's own GPT under torch.compile (arch nanochat only)",
                             "nanochat", compiled=True),
}
IMPL_ALIASES = {"eager": "nanogpt-eager", "compile": "nanogpt-compile",
                "reference": "gptfast-reference"}
BASELINE = "nanogpt-eager"
MODES = ("train", "infer")
MODELS = ("micro", "tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# "nanochat-tiny": 2 layers, 2 heads, 128 wide, vocab 4096, otherwise nanochat-d12 (CPU runs)
NANOCHAT_MODELS = ("nanochat-tiny", "nanochat-d12", "nanochat-d20", "nanochat-d26")
ARCHS = ("gpt2", "nanochat")
ARCH_FAMILIES = {"gpt2": ("gptfast", "nanogpt"), "nanochat": ("gptfast", "nanochat")}
ARCH_BASELINES = {"gpt2": BASELINE, "nanochat": "nanochat-eager"}
MAX_CONTEXT_LENGTH = 65536  # the longest T the sweep accepts
VOCAB_SIZE = 50304          # GPT-2's 50257 padded to a multiple of 64, as nanoGPT trains it
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTIONS = ("causal", "document")
DOCUMENT_LENGTH = 1024      # mean document length of the "document" cells (FineWeb-like)


@dataclasses.dataclass(frozen=True)
class GPTSettings:
    """What every cell of one sweep shares."""

    model: str
    device: torch.device
    dtype: str
    warmup: int
    repeats: int
    nanochat_model: str = "nanochat-d20"  # the model of the "nanochat" arch cells


@dataclasses.dataclass(frozen=True)
class GPTCell:
    mode: str
    impl: str
    batch_size: int
    context_length: int
    attention: str = "causal"
    arch: str = "gpt2"

    @property
    def row_impl(self) -> str:
        """The impl a result row names: the implementation, plus the arch when gptfast runs
        another than gpt2, plus the attention if not causal."""
        name = self.impl
        if self.arch != "gpt2" and IMPLS[self.impl].family == "gptfast":
            name += f" {self.arch}"
        return name if self.attention == "causal" else f"{name} {self.attention}"

    def model(self, settings: "GPTSettings") -> str:
        return settings.model if self.arch == "gpt2" else settings.nanochat_model

    @property
    def label(self) -> str:
        return f"gpt {self.mode} {self.row_impl} B={self.batch_size} T={self.context_length}"


# ----------------------------------------------------------------------------- models --

def model_config(model: str, context_length: int) -> GPTConfig:
    """The config of ``model`` ("tiny": 2 layers, 4 heads, 128 wide; "micro": 2 layers, 2 heads,
    32 wide and a 512-token vocabulary, for smoke runs; or a GPT-2 size, with nanoGPT's padded
    vocabulary; or a nanochat preset, or "nanochat-tiny") with a block_size that fits
    ``context_length``."""
    if model == "nanochat-tiny":
        base = GPTConfig.preset("nanochat-d12", n_layer=2, n_head=2, n_embd=128, vocab_size=4096)
    elif model in NANOCHAT_MODELS:
        base = GPTConfig.preset(model)
    elif model == "micro":
        base = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=512)
    elif model == "tiny":
        base = GPTConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=VOCAB_SIZE)
    else:
        base = GPTConfig.preset(model, vocab_size=VOCAB_SIZE)
    return dataclasses.replace(base, block_size=max(base.block_size, context_length))


@functools.lru_cache(maxsize=None)
def _meta_model(model: str) -> GPT:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return GPT(model_config(model, 1))


def describe_model(model: str) -> str:
    """e.g. "gpt2 (12 layers, 12 heads, 768 wide, 124.0M parameters, vocab 50304)"."""
    meta = _meta_model(model)
    cfg = meta.config
    return (f"{model} ({cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, "
            f"{meta.num_params() / 1e6:.1f}M parameters, vocab {cfg.vocab_size})")


def flops_per_token(model: str, mode: str, context_length: int) -> float:
    """nanoGPT's count, 6 N + 12 L H D T for a training step (N leaves out the position
    table, so it does not depend on block_size); the forward is a third of it."""
    train = _meta_model(model).flops_per_token(context_length)
    return train if mode == "train" else train / 3


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """nanoGPT's AdamW: decay on matrices and embeddings only, fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")


class Unavailable(RuntimeError):
    """A cell that cannot run on this machine (e.g. nanochat not importable): a result row."""


def nanochat_gpt():
    """The ``nanochat.gpt`` module, or :class:`Unavailable` saying why not."""
    import importlib

    try:
        return importlib.import_module("nanochat.gpt")
    except Exception as err:  # ImportError, or a checkout whose imports fail
        raise Unavailable(f"import nanochat.gpt failed ({type(err).__name__}: {err}); nanochat "
                          "is not on PyPI: put a checkout of karpathy/nanochat on PYTHONPATH") \
            from None


def build_nanochat(config: GPTConfig, dtype: str, device: torch.device) -> torch.nn.Module:
    """nanochat's own GPT at ``config``'s shapes, built as its base_train.py does (meta device,
    ``to_empty``, ``init_weights``)."""
    module = nanochat_gpt()
    compute = getattr(module, "COMPUTE_DTYPE", None)
    if compute is not None and compute != DTYPES[dtype]:
        raise Unavailable(f"nanochat computes in {compute} (its COMPUTE_DTYPE, set by "
                          f"NANOCHAT_DTYPE before it is imported), not {dtype}")
    nano_config = module.GPTConfig(sequence_len=config.block_size, vocab_size=config.vocab_size,
                                   n_layer=config.n_layer, n_head=config.n_head,
                                   n_kv_head=config.kv_heads, n_embd=config.n_embd,
                                   window_pattern=config.window_pattern or "L")
    with torch.device("meta"):
        model = module.GPT(nano_config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def make_step(cell: GPTCell, settings: GPTSettings) -> Callable[[], None]:
    """A fresh model, optimizer and batch for ``cell``, and the function running one step."""
    impl, device = IMPLS[cell.impl], settings.device
    config = model_config(cell.model(settings), cell.context_length)
    eot = config.vocab_size - 1
    if cell.attention == "document":
        config = dataclasses.replace(config, attention="document", eot_token=eot)
    torch.manual_seed(0)
    if impl.family == "nanochat":
        model = build_nanochat(config, settings.dtype, device)
    else:
        with device:
            model = GPT(config) if impl.family == "gptfast" else NanoGPT(config)
    runner = compiled(model) if impl.compiled else model
    tokens = torch.randint(config.vocab_size - 1, (cell.batch_size, cell.context_length + 1),
                           device=device)
    if cell.attention == "document":
        tokens[torch.rand(tokens.shape, device=device) < 1 / DOCUMENT_LENGTH] = eot
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    loss_options = {"return_logits": False} if impl.family == "gptfast" else {}
    # nanochat casts to its own COMPUTE_DTYPE itself; the others run under autocast, as nanoGPT
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if settings.dtype == "bf16" and impl.family != "nanochat"
                else contextlib.nullcontext())

    def backend():
        return gptfast.use_backend(impl.backend) if impl.backend else contextlib.nullcontext()

    def forward():
        with autocast, backend():
            return runner(x, y, **loss_options)

    if cell.mode == "infer":
        def infer_step():
            with torch.no_grad():
                forward()
        return infer_step

    optimizer = adamw(model, device)

    def train_step():
        out = forward()  # logits stay alive through the step, as in nanoGPT's loop
        loss = out if impl.family == "nanochat" else out[1]  # nanochat returns the loss only
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


# ----------------------------------------------------------------------------- timing --

@dataclasses.dataclass
class StepTimes:
    first_step_s: float   # the first call: compilation, autotuning, allocator growth
    warmup_s: float       # every warm-up step, the first included
    samples_ms: list      # one per timed step


def time_steps(step: Callable[[], None], device: torch.device, warmup: int,
               repeats: int) -> StepTimes:
    """Run ``warmup`` untimed steps (timed as a whole), then ``repeats`` timed ones."""
    meter = Meter(device)
    start = time.perf_counter()
    step()
    meter.synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    meter.synchronize()
    warm = time.perf_counter() - start
    return StepTimes(first, warm, meter.samples_ms(step, repeats))


# ------------------------------------------------------------------------------ cells --

def cells(impls, modes, batch_sizes, context_lengths, max_tokens: int = 0,
          attentions=("causal",), archs=("gpt2",)) -> list[GPTCell]:
    """The grid, T-major so that an interrupted sweep leaves whole comparisons behind; cells
    with B*T above ``max_tokens`` (when not 0), baseline cells of a non-causal attention, and
    impls of another arch (nanoGPT under nanochat, nanochat under gpt2) are left out."""
    return [GPTCell(mode, impl, batch, seq, attention, arch)
            for seq in context_lengths for batch in batch_sizes
            if not max_tokens or batch * seq <= max_tokens
            for arch in archs for attention in attentions for impl in impls
            if IMPLS[impl].family in ARCH_FAMILIES[arch]
            and (attention == "causal" or IMPLS[impl].family == "gptfast")
            for mode in modes]


def measure(cell: GPTCell, settings: GPTSettings) -> dict:
    """The measures of one cell (raises on OOM or failure)."""
    device = settings.device
    times = time_steps(make_step(cell, settings), device, settings.warmup, settings.repeats)
    median_ms = percentile(times.samples_ms, 50)
    tokens_per_s = cell.batch_size * cell.context_length / (median_ms / 1e3)
    # nanochat's cells: our model's count at the same shapes (its value embeddings etc. left out)
    flops = flops_per_token(cell.model(settings), cell.mode, cell.context_length) * tokens_per_s
    peak = device_peak_flops(device)
    return {
        "tokens_per_s": tokens_per_s,
        "step_ms": median_ms,
        "step_ms_p20": percentile(times.samples_ms, 20),
        "step_ms_p80": percentile(times.samples_ms, 80),
        "step_ms_min": min(times.samples_ms),
        "step_ms_max": max(times.samples_ms),
        "tflops": flops / 1e12,
        "mfu": None if peak is None else flops / peak,
        "peak_mem_gb": Meter(device).peak_gb(),
        "first_step_s": times.first_step_s,
        "warmup_s": times.warmup_s,
        "warmup_steps": settings.warmup,
        "repeats": settings.repeats,
    }


def _fresh_start(device: torch.device, is_compiled: bool) -> None:
    """Drop what earlier cells left (compiled graphs, cached blocks) and restart peak memory."""
    if is_compiled:
        torch._dynamo.reset()
    meter = Meter(device)
    if meter.cuda:  # on a CPU nothing is measured that a late free would change
        gc.collect()
    meter.empty_cache()
    meter.reset_peak()


def run_cell(cell: GPTCell, settings: GPTSettings) -> dict:
    """One result row: the cell, its status ("ok", "oom", "error") and its measures."""
    row = {"suite": "gpt", "mode": cell.mode, "impl": cell.row_impl, "arch": cell.arch,
           "model": cell.model(settings), "attention": cell.attention,
           "batch_size": cell.batch_size, "context_length": cell.context_length,
           "tokens_per_step": cell.batch_size * cell.context_length}
    is_compiled = IMPLS[cell.impl].compiled
    _fresh_start(settings.device, is_compiled)
    try:
        row.update(measure(cell, settings), status="ok")
    except Unavailable as err:
        row.update(status="unavailable", error=str(err))
    except Exception as err:  # KeyboardInterrupt is not an Exception: it ends the sweep
        row.update(status="oom" if is_out_of_memory(err) else "error", error=short_reason(err))
    # here, after the handler, the traceback and the model its frames held are released
    _fresh_start(settings.device, is_compiled)
    return row
