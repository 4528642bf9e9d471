"""The probe every ``gptfast.patch`` family shares: run a module's own code on probe inputs.

Shared by every family: :func:`as_probe` (a module in a chosen mode and dtype, RNG and
parameters restored), :func:`probe_dtype` and :func:`probe_difference`. For nanoGPT-style
attention (``gptfast.patching.nanogpt``) it also answers two questions:

- **Which mask?** (:func:`probe_mask`) The module runs in fp64 on a probe as long as its block
  size, and the replacement (plain causal) must reproduce it to fp64 precision. Where it does
  not, moving the first token changes exactly the rows that see key 0: for causal attention
  with a sliding window ``w`` (``i - w < j <= i``) that is rows ``0..w-1``. That gives the one
  candidate window, which must then reproduce the module at the block size and at 7 tokens:
  any other mask (random, prefix LM, bidirectional, a window the rows disagree on) fails and
  the module is left alone.
- **Which dropout, where?** (:func:`find_dropout_plan`) The module runs once in training mode
  while a ``TorchFunctionMode`` records every dropout call (any ``nn.Dropout`` of any name, a
  functional dropout, SDPA's ``dropout_p``) with the tensor it drops. Dropout on the softmax
  probabilities (or SDPA's) is attention dropout; dropout on ``c_proj``'s output, returned as
  the result, is residual dropout. Where its ``p`` comes from is proved by changing the
  candidate attribute and seeing the recorded ``p`` follow. Any other dropout, or one whose
  ``p`` cannot be traced, makes the module be left alone.

The caller's RNG state, training flags and parameters are restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import backend

# Probe lengths: the block size when the module or model names one, else DEFAULT; capped
# where the fp64 probe's (heads, T, T) scores would pass _PROBE_SCORE_BYTES. A patched module
# runs its own forward for sequences longer than its probe.
DEFAULT_PROBE_LENGTH = 1024
MIN_PROBE_CAP = 1024
_PROBE_SCORE_BYTES = 512 * 2**20
_BLOCK_SIZE_NAMES = ("block_size", "n_positions", "max_position_embeddings", "n_ctx",
                     "max_seq_len", "context_length")
# relative to the output's scale: fp64 rounding is ~1e-15; one key more or less in a row of
# 4096 uniform keys moves the row by ~1e-4
_FP64_TOLERANCE = 1e-7
_SENTINEL_P = 0.3125  # a dropout probability no module uses by accident


# ------------------------------------------------------------------------- block size --

def _positive_int(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def block_size(module: nn.Module, root: Optional[nn.Module] = None) -> Optional[int]:
    """The longest sequence ``module`` takes: its square ``bias`` mask buffer's size, else a
    block size named on the module, its config, the model or the model's config."""
    bias = module._buffers.get("bias")
    if isinstance(bias, torch.Tensor) and bias.dim() >= 2 and bias.shape[-1] == bias.shape[-2]:
        return bias.shape[-1]
    for owner in (module, getattr(module, "config", None), root, getattr(root, "config", None)):
        for name in _BLOCK_SIZE_NAMES:
            found = _positive_int(getattr(owner, name, None)) if owner is not None else None
            if found:
                return found
    return None


def probe_length(module: nn.Module, root: Optional[nn.Module] = None) -> int:
    """The block size, capped so the fp64 probe's (heads, T, T) scores stay within 512 MiB
    (at least 1024 tokens: GPT-2 XL's 25 heads get their whole block)."""
    cap = max(MIN_PROBE_CAP, math.isqrt(_PROBE_SCORE_BYTES // (8 * module.n_head)))
    return min(block_size(module, root) or DEFAULT_PROBE_LENGTH, cap)


# ---------------------------------------------------------------- shared by families --

@contextlib.contextmanager
def as_probe(module: nn.Module, training: bool, dtype: Optional[torch.dtype] = None):
    """The module in ``training`` mode (and its floating tensors in ``dtype``), RNG untouched."""
    modes = {m: m.training for m in module.modules()}
    swapped = []
    devices = [t.device for t in module.parameters() if t.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.train(training)
            if dtype is not None:
                for t in list(module.parameters()) + list(module.buffers()):
                    if t.is_floating_point() and t.dtype != dtype:
                        swapped.append((t, t.data))
                        t.data = t.data.to(dtype)
            yield
    finally:
        for t, data in reversed(swapped):
            t.data = data
        for m, mode in modes.items():
            m.training = mode


def probe_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no fp64


# ------------------------------------------------------------------------------ mask --

def probe_mask(module: nn.Module, length: int, original: Callable, replacement: Callable
               ) -> tuple[Optional[int], Optional[str]]:
    """``(window, None)`` when ``replacement(module, x, window)`` reproduces ``original(module,
    x)`` in eval mode on a probe of ``length`` tokens and a short one (window None: plain
    causal), else ``(None, why not)``."""
    weight = module.c_attn.weight
    dtype = probe_dtype(weight.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, length, module.n_embd, generator=generator, dtype=torch.float64)
    x = x.to(weight.device, dtype)
    try:
        with as_probe(module, training=False, dtype=dtype), backend.use_backend("reference"):
            expected = original(module, x)
            if not isinstance(expected, torch.Tensor) or expected.shape != x.shape:
                return None, "its forward does not return nanoGPT's (batch, seq, n_embd) tensor"
            window = None
            difference = _difference(expected, replacement(module, x, None))
            if difference is not None:  # not causal: which rows see key 0?
                window, reason = _window_of(module, original, x, expected)
                if reason is not None:
                    return None, reason
                if window is not None:
                    difference = _difference(expected, replacement(module, x, window))
            short = min(length, 7)  # a mask sliced from a buffer must agree at other lengths
            if difference is None and short < length:
                length = short
                difference = _difference(original(module, x[:, :short]),
                                         replacement(module, x[:, :short], window))
    except Exception as err:  # a forward taking other arguments, or failing on the probe
        return None, f"its forward could not be checked on a probe input ({type(err).__name__}: {err})"
    if difference is not None:
        mask = "" if window is None else f" with a sliding window of {window}"
        return None, (f"its forward differs from nanoGPT's causal attention{mask} on a probe of "
                      f"{length} tokens (max difference {difference:.2e}), so it is left alone")
    return window, None


def _window_of(module, original, x, expected) -> tuple[Optional[int], Optional[str]]:
    """Moves token 0: under a sliding window w exactly rows 0..w-1 see key 0 and change.
    ``(w, None)``; ``(None, None)`` when every row sees key 0 (no window: the math differs in
    another way); ``(None, why)`` when the rows that see key 0 are not a leading run."""
    moved = x.clone()
    generator = torch.Generator().manual_seed(1)
    moved[:, 0] += torch.randn(x.shape[-1], generator=generator, dtype=torch.float64).to(x)
    seen = (original(module, moved) - expected).abs().amax(-1)[0]
    rows = (seen > _FP64_TOLERANCE * (expected.abs().max() + 1e-2)).tolist()
    window = rows.index(False) if False in rows else len(rows)
    if window == len(rows):
        return None, None
    if window == 0 or any(rows[window:]):
        return None, (f"its forward differs from nanoGPT's causal attention on a probe of "
                      f"{len(rows)} tokens and its mask is neither causal nor a sliding window "
                      f"(key 0 is seen by rows {_ranges(rows)}), so it is left alone")
    return window, None


def probe_difference(expected, actual, full_precision_tolerance) -> Optional[float]:
    """None when ``actual`` matches ``expected`` (relative to its scale), else the max difference.

    Half-precision modules get a tolerance of 3e-2, fp32/fp64 ones the one given."""
    full = expected.dtype in (torch.float32, torch.float64)
    tolerance = full_precision_tolerance if full else 3e-2
    difference = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return None if difference <= tolerance * (scale + 1e-2) else difference


def _difference(expected: torch.Tensor, actual: torch.Tensor) -> Optional[float]:
    """probe_difference of the mask probe's outputs (fp64, or fp32 where there is no fp64)."""
    if expected.shape != actual.shape:
        return float("inf")
    return probe_difference(expected, actual, _FP64_TOLERANCE
                            if expected.dtype == torch.float64 else 1e-3)


def _ranges(flags: list) -> str:
    """[T, T, F, T] -> '0-1, 3' (at most a few ranges)."""
    spans, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append(f"{start}" if i - 1 == start else f"{start}-{i - 1}")
            start = None
    return ", ".join(spans[:4]) + (", ..." if len(spans) > 4 else "") if spans else "none"


# --------------------------------------------------------------------------- dropout --

@dataclasses.dataclass(frozen=True)
class DropoutSource:
    """Where a dropout probability lives: a dropout submodule (``kind="module"``, applied by
    calling it) or a number attribute of the attention module (``kind="attribute"``)."""

    kind: str
    name: str

    def probability(self, owner: nn.Module) -> float:
        """The probability in effect now (0 when the owner of the dropout is in eval mode)."""
        if self.kind == "module":
            dropout = owner.get_submodule(self.name)
            return float(dropout.p) if dropout.training else 0.0
        return float(getattr(owner, self.name)) if owner.training else 0.0

    def apply(self, owner: nn.Module, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "module":
            return owner.get_submodule(self.name)(y)
        return F.dropout(y, self.probability(owner), owner.training)


@dataclasses.dataclass(frozen=True)
class DropoutPlan:
    """The attention module's dropouts, by where they apply (None: none there)."""

    attention: Optional[DropoutSource] = None
    residual: Optional[DropoutSource] = None


_DROPOUTS = {  # function -> (default p, default training)
    F.dropout: (0.5, True), F.dropout1d: (0.5, True), F.dropout2d: (0.5, True),
    F.dropout3d: (0.5, True), F.alpha_dropout: (0.5, False),
    F.feature_alpha_dropout: (0.5, False), torch.dropout: (None, None),
    torch.alpha_dropout: (None, None), torch.feature_alpha_dropout: (None, None),
    torch.feature_dropout: (None, None),
}
_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax, torch._softmax)


def _argument(args, kwargs, index, names, default):
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return default


@dataclasses.dataclass
class _DropoutCall:
    function: Callable
    p: float
    input: torch.Tensor
    output: torch.Tensor
    module: Optional[str]  # the dropout submodule that made the call, if one did


class _Recorder(TorchFunctionMode):
    """Records dropout calls, SDPA's dropout_p and softmax outputs during a forward."""

    def __init__(self):
        super().__init__()
        self.dropouts: list = []
        self.sdpa: list = []  # dropout_p of each SDPA call
        self.softmax_outputs: list = []
        self.calling: list = []  # stack of dropout submodules being called (set by hooks)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _DROPOUTS:
            default_p, default_training = _DROPOUTS[func]
            p = _argument(args, kwargs, 1, ("p",), default_p)
            training = _argument(args, kwargs, 2, ("training", "train"), default_training)
            if training:
                source = self.calling[-1] if self.calling else None
                self.dropouts.append(_DropoutCall(func, float(p), args[0] if args else kwargs["input"],
                                                  out, source))
        elif func is F.scaled_dot_product_attention:
            self.sdpa.append(float(_argument(args, kwargs, 4, ("dropout_p",), 0.0)))
        elif func in _SOFTMAXES:
            self.softmax_outputs.append(out)
        return out


def _dropout_modules(module: nn.Module) -> dict:
    return {name: m for name, m in module.named_modules()
            if name and isinstance(m, nn.modules.dropout._DropoutNd)}


def _record(module: nn.Module, original: Callable, x: torch.Tensor):
    """(recorder, c_proj outputs, result) of one training-mode forward."""
    recorder, projected, handles = _Recorder(), [], []
    for name, dropout in _dropout_modules(module).items():
        handles.append(dropout.register_forward_pre_hook(
            lambda m, a, name=name: recorder.calling.append(name)))
        handles.append(dropout.register_forward_hook(lambda m, a, o: recorder.calling.pop() and None))
    handles.append(module.c_proj.register_forward_hook(lambda m, a, o: projected.append(o)))
    try:
        with recorder:
            result = original(module, x)
    finally:
        for handle in handles:
            handle.remove()
    return recorder, projected, result


def find_dropout_plan(module: nn.Module, original: Callable) -> tuple[Optional[DropoutPlan], Optional[str]]:
    """``(plan, None)`` when every dropout the module's training forward applies is attention
    dropout or residual dropout with a traceable probability, else ``(None, why not)``."""
    weight = module.c_attn.weight
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, module.n_embd, generator=generator).to(weight.device, weight.dtype)
    try:
        with as_probe(module, training=True):
            return _plan(module, original, x)
    except Exception as err:
        return None, (f"its training forward could not be checked on a probe input "
                      f"({type(err).__name__}: {err})")


def _plan(module, original, x):
    recorder, projected, result = _record(module, original, x)
    attention, residual = [], []
    for index, call in enumerate(recorder.dropouts):
        where = _placement(call, recorder, projected, result)
        described = f"{call.function.__name__}(p={call.p:g}{_from(call)})"
        if where is None:
            return None, (f"its {described} drops a tensor that is neither the attention "
                          "probabilities nor c_proj's returned output; gptfast's forward cannot "
                          "keep it, so the module is left alone")
        if call.module is not None and call.module.split(".")[0] in ("c_attn", "c_proj"):
            return None, f"its {described} sits inside {call.module.split('.')[0]}; left alone"
        if where == "attention" and call.function is not F.dropout:
            return None, f"its attention {described} is not plain dropout; left alone"
        source = (DropoutSource("module", call.module) if call.module is not None
                  else _traced_source(module, original, x, "dropouts", index, call.p))
        if isinstance(source, str):
            return None, f"its {described}: {source}"
        (attention if where == "attention" else residual).append(source)
    for index, p in enumerate(recorder.sdpa):
        source = _traced_source(module, original, x, "sdpa", index, p)
        if isinstance(source, str):
            return None, f"its scaled_dot_product_attention(dropout_p={p:g}): {source}"
        if source is not None:
            attention.append(source)
    if len(attention) > 1 or len(residual) > 1:
        return None, ("it applies more than one attention or residual dropout; gptfast's "
                      "forward applies one of each, so the module is left alone")
    return DropoutPlan(attention[0] if attention else None, residual[0] if residual else None), None


def _from(call: _DropoutCall) -> str:
    return f", from {call.module}" if call.module else ""


def _placement(call, recorder, projected, result) -> Optional[str]:
    if any(call.input is s for s in recorder.softmax_outputs):
        return "attention"
    if any(call.input is p for p in projected) and call.output is result:
        return "residual"
    return None


def _traced_source(module, original, x, kind: str, index: int, p: float):
    """The attribute or dropout submodule whose value the recorded call's p is (proved by
    changing it and seeing the p follow); None for a constant 0; a reason string otherwise."""
    candidates = [("attribute", name) for name, value in vars(module).items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)]
    candidates += [("module", name) for name in _dropout_modules(module)]
    found = []
    for candidate in candidates:
        if _follows(module, original, x, candidate, kind, index):
            found.append(DropoutSource(*candidate))
    if len(found) == 1:
        return found[0]
    if not found and p == 0.0:
        return None  # a literal 0: no dropout here, whatever the attributes say
    if not found:
        return "gptfast cannot tell which attribute its probability comes from; left alone"
    return f"its probability follows several attributes ({', '.join(s.name for s in found)}); left alone"


def _follows(module, original, x, candidate, kind, index) -> bool:
    where, name = candidate
    owner, attribute = (module, name) if where == "attribute" else (module.get_submodule(name), "p")
    saved = getattr(owner, attribute)
    try:
        setattr(owner, attribute, _SENTINEL_P)
        recorder, _, _ = _record(module, original, x)
    except Exception:
        return False
    finally:
        setattr(owner, attribute, saved)
    calls = recorder.dropouts if kind == "dropouts" else recorder.sdpa
    if index >= len(calls):
        return False
    p = calls[index].p if kind == "dropouts" else calls[index]
    return p == _SENTINEL_P
