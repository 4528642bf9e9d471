"""``gptfast.patch`` for nanochat's ``GPT`` (karpathy/nanochat, ``nanochat/gpt.py``).

nanochat's classes are recognised by structure, not by module name:

- the model: ``lm_head`` (a bias-free Linear), ``transformer.h`` (the blocks) and
  ``forward(idx, targets, kv_cache, loss_reduction)``;
- attention: ``c_q``, ``c_k``, ``c_v``, ``c_proj``, ``n_head``, ``n_kv_head``, ``head_dim``,
  ``ve_gate`` and ``forward(x, ve, cos_sin, window_size, kv_cache)``;
- the norm: a module-level function ``norm`` that the model's forwards call.

What changes, each part only after a probe shows the replacement computes what the model's
own code computes:

- **norm** (process-wide): the module-level ``norm`` of every module whose forwards call it
  becomes :func:`patched_norm` (``gptfast.rms_norm``, parameter-free). Module globals are
  shared by every model of that module, patched or not; ``gptfast.unpatch`` puts the original
  back when the last patched model using it is unpatched.
- **attention**: the same projections and value-embedding gate, then one
  ``gptfast.rotary_qk_norm(q, k, cos, -sin, scale=s)`` (nanochat rotates by -theta: ours with
  ``-sin``; RMSNorm and rotation commute) and ``gptfast.functional.attention(causal=True,
  window_left=left)`` with flash-attention's ``window_size=(left, 0)`` (-1: unlimited), then
  ``c_proj``. The q/k factor ``s`` is read by the probe (1.2 in nanochat today). Calls with a
  ``kv_cache`` (inference) run nanochat's own forward and its ``flash_attn`` namespace.
- **loss**: with ``targets``, the model's own forward runs up to ``lm_head`` (embeddings, smear,
  value embeddings, backout, the lambdas: all nanochat's code, unchanged); lm_head's input is
  taken there and ``lm_head`` + vocab slice + softcap + cross-entropy run as one
  ``gptfast.linear_cross_entropy(x, lm_head.weight[:vocab], targets, ignore_index=-1,
  softcap=c)``, never materialising the (B*T, V) logits. The vocab size and the softcap ``c``
  (15 in nanochat today) are read by the probe. ``targets=None`` returns the logits from
  nanochat's own forward.

This family takes the whole model (:func:`recognises`): no other family looks at a nanochat
GPT. Patched modules switch class (:mod:`.classes`: a subclass with another ``forward``); they
keep identity, parameters, hooks and state_dict keys, and survive deepcopy and pickling. The
probes use :mod:`.probe`'s shared helpers; the report is :class:`.report.PatchReport`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend, functional, reference
from . import classes, probe
from . import report as reports
from .report import PatchReport

NORM = reports.declare_kind("nanochat norm (module global)", reports.NORM)
ATTENTION = reports.declare_kind("nanochat attention", reports.ATTENTION)
LOSS = reports.declare_kind("nanochat loss", reports.LOSS)

_GPT_ARGUMENTS = ("self", "idx", "targets", "kv_cache", "loss_reduction")
_ATTENTION_ARGUMENTS = ("self", "x", "ve", "cos_sin", "window_size", "kv_cache")
_ATTENTION_PARTS = ("c_q", "c_k", "c_v", "c_proj")
_REDUCTIONS = ("mean", "none", "sum")
_IGNORE_INDEX = -1  # nanochat's F.cross_entropy(..., ignore_index=-1); checked by the probe
_FP64_TOLERANCE = 1e-7  # relative, as the nanoGPT attention probe
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------- recognising --

def _arguments(cls: type) -> tuple:
    try:
        return tuple(inspect.signature(classes.original_class(cls).forward).parameters)
    except (TypeError, ValueError):
        return ()


def _has_weight(module) -> bool:
    return isinstance(module, nn.Module) and isinstance(getattr(module, "weight", None), torch.Tensor)


def is_nanochat_gpt(model) -> bool:
    """nanochat's GPT by structure: lm_head, transformer.h and its forward's arguments."""
    head = getattr(model, "lm_head", None)
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    return (isinstance(model, nn.Module) and _has_weight(head) and head.weight.dim() == 2
            and getattr(head, "bias", None) is None and isinstance(blocks, nn.Module)
            and _arguments(type(model)) == _GPT_ARGUMENTS)


def is_nanochat_attention(module) -> bool:
    """nanochat's CausalSelfAttention by structure: projections, head counts, ve_gate, forward."""
    return (all(_has_weight(getattr(module, part, None)) for part in _ATTENTION_PARTS)
            and all(isinstance(getattr(module, name, None), int)
                    for name in ("n_head", "n_kv_head", "head_dim"))
            and hasattr(module, "ve_gate") and _arguments(type(module)) == _ATTENTION_ARGUMENTS)


_kind = classes.kind_of  # the kind a module was switched as


# ----------------------------------------------------------------------------- norm --

def patched_norm(x: torch.Tensor) -> torch.Tensor:
    """nanochat's ``norm`` (``F.rms_norm`` over the last dim, no weight, torch's default eps:
    fp32's for half x, which gptfast's eps=None is too) on ``gptfast.rms_norm``."""
    return functional.rms_norm(x)


@dataclasses.dataclass
class _NormSwap:
    namespace: dict  # the module's globals
    original: Callable
    users: weakref.WeakSet  # the patched models that rely on it


_NORM_SWAPS: dict = {}  # module name -> _NormSwap


def _norm_namespaces(model: nn.Module) -> dict:
    """module name -> globals, for every module whose model, block or attention forward calls
    a global ``norm``."""
    found = {}
    for module in model.modules():
        forward = getattr(classes.original_class(type(module)), "forward", None)
        code = getattr(forward, "__code__", None)
        if code is not None and "norm" in code.co_names and "norm" in forward.__globals__:
            found.setdefault(forward.__globals__.get("__name__", "?"), forward.__globals__)
    return found


def _norm_mismatch(norm: Callable) -> Optional[str]:
    """None when ``norm(x)`` is ``F.rms_norm(x, (C,))`` (torch's eps) in fp64, fp32 and bf16,
    rows of mean square near the eps in use included, else why not."""
    if not callable(norm):
        return "the module-level norm is not callable"
    generator = torch.Generator().manual_seed(0)
    for dtype, small in ((torch.float64, 1e-8), (torch.float32, 1e-4), (torch.bfloat16, 1e-4)):
        x = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64).to(dtype)
        x[1] *= small
        try:
            with torch.no_grad():
                got = norm(x)
        except Exception as err:
            return f"the module-level norm could not be checked ({type(err).__name__}: {err})"
        expected = F.rms_norm(x, (x.shape[-1],))
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            return "the module-level norm does not return a tensor of its input's shape"
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 2e-2)  # bf16: 1 ulp at 2
        difference = (got.double() - expected.double()).abs().max().item()
        if difference > tolerance:
            return (f"the module-level norm is not a parameter-free F.rms_norm over the last dim "
                    f"in {dtype} (max difference {difference:.2e}); left alone")
    return None


def _patch_norms(model: nn.Module, report: PatchReport) -> None:
    for module_name, namespace in _norm_namespaces(model).items():
        name = f"{module_name}.norm"
        swap = _NORM_SWAPS.get(module_name)
        if namespace["norm"] is patched_norm and swap is not None:
            swap.users.add(model)
            report.already.append(name)
            continue
        reason = _norm_mismatch(namespace["norm"])
        if reason is not None:
            report.skipped[name] = reason
            continue
        swap = _NormSwap(namespace, namespace["norm"], weakref.WeakSet([model]))
        _NORM_SWAPS[module_name] = swap
        namespace["norm"] = patched_norm
        report._add(name, NORM, "F.rms_norm over the last dim, torch's eps")
    patched = [name for name in report.replaced + report.already if name.endswith(".norm")]
    model._gptfast_norm_modules = [name[: -len(".norm")] for name in patched]
    report.process_wide += [f"{name} is gptfast.rms_norm for every model of that module, until "
                            "the last patched one is unpatched" for name in patched]


def _release_norms(model: nn.Module) -> list:
    """Drops ``model`` from the users of its swapped norms; restores those left unused."""
    restored = []
    for module_name in vars(model).get("_gptfast_norm_modules", ()):
        swap = _NORM_SWAPS.get(module_name)
        if swap is None:
            continue
        swap.users.discard(model)
        if not swap.users:
            swap.namespace["norm"] = swap.original
            del _NORM_SWAPS[module_name]
            restored.append(f"{module_name}.norm")
    return restored


# ------------------------------------------------------------------------ attention --

def _window_left(window_size, seq: int) -> Optional[int]:
    """flash-attention's causal ``window_size=(left, right)`` as ``window_left`` (-1: unlimited;
    a window reaching past the first token is unlimited too), None if not two ints."""
    try:
        left, _right = window_size  # causal: flash-attention takes right as 0
    except (TypeError, ValueError):
        return None
    if isinstance(left, bool) or not isinstance(left, int):
        return None
    return -1 if left < 0 or left >= seq - 1 else left


def _rotary_tables(cos_sin, seq: int, half: int) -> Optional[tuple]:
    """nanochat's (1, T, 1, D/2) cos and sin as (T, D/2) views; None for another layout."""
    try:
        cos, sin = cos_sin
    except (TypeError, ValueError):
        return None
    layout = (1, seq, 1, half)
    if not all(isinstance(t, torch.Tensor) and tuple(t.shape) == layout for t in (cos, sin)):
        return None
    return cos.reshape(seq, half), sin.reshape(seq, half)


def _project(self, x: torch.Tensor, ve: Optional[torch.Tensor]) -> tuple:
    """q (B, T, H, D), k and v (B, T, Hkv, D), v with the gated value embedding mixed in."""
    batch, seq, _ = x.shape
    q = self.c_q(x).view(batch, seq, self.n_head, self.head_dim)
    k = self.c_k(x).view(batch, seq, self.n_kv_head, self.head_dim)
    v = self.c_v(x).view(batch, seq, self.n_kv_head, self.head_dim)
    if ve is not None:
        gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (0, 3) per kv head
        v = v + gate.unsqueeze(-1) * ve.view_as(v)
    return q, k, v


def _attend(self, x, ve, cos, sin, left: int, scale: float) -> torch.Tensor:
    batch, seq, _ = x.shape
    q, k, v = _project(self, x, ve)
    # nanochat rotates by -theta; eps=None is torch's default, as nanochat's norm(q) has
    q, k = functional.rotary_qk_norm(q, k, cos, -sin, scale=scale)
    y = functional.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             causal=True, window_left=left)
    return self.c_proj(y.transpose(1, 2).reshape(batch, seq, -1))


def _attention_forward(self, x, ve, cos_sin, window_size, kv_cache):
    """nanochat's CausalSelfAttention.forward on gptfast's ops; with a kv_cache (inference)
    or an unusual window/rotary layout, nanochat's own forward."""
    seq = x.shape[1]
    left = _window_left(window_size, seq)
    tables = _rotary_tables(cos_sin, seq, self.head_dim // 2)
    if kv_cache is not None or left is None or tables is None:
        return classes.original_class(type(self)).forward(self, x, ve, cos_sin, window_size, kv_cache)
    return _attend(self, x, ve, *tables, left, self._gptfast_qk_scale)


def _recording_flash_attn(calls: list) -> types.SimpleNamespace:
    """A flash_attn namespace whose flash_attn_func records (q, k, causal, window_size, extra
    arguments) and computes flash-attention's answer with gptfast.reference (any dtype)."""
    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1), **kwargs):
        calls.append((q, k, causal, tuple(window_size), kwargs))
        left, right = window_size
        y = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                causal=causal, window_left=left, window_right=right)
        return y.transpose(1, 2)

    def flash_attn_with_kvcache(*args, **kwargs):
        raise RuntimeError("the probe runs without a KV cache")

    return types.SimpleNamespace(flash_attn_func=flash_attn_func,
                                 flash_attn_with_kvcache=flash_attn_with_kvcache)


def _fitted_scale(captured: torch.Tensor, unscaled: torch.Tensor) -> float:
    """The least-squares factor s in captured ~ s * unscaled."""
    return (captured * unscaled).sum().item() / max((unscaled * unscaled).sum().item(), 1e-300)


def _probe_attention(module: nn.Module) -> tuple:
    """``(scale, None)`` when the patched forward with q/k factor ``scale`` reproduces the
    module's own forward (fp64, kv_cache None, a sliding window), else ``(None, why not)``.

    During the probe the module's ``flash_attn`` global is a recorder computing
    flash-attention's answer in fp64 (FA3 has no fp64): it gives the q and k the module hands
    to attention, hence the factor, and checks the call is causal with the window passed in.
    """
    original = classes.original_class(type(module)).forward
    namespace = original.__globals__
    if "flash_attn" not in original.__code__.co_names or "flash_attn" not in namespace:
        return None, "its forward does not call a module-level flash_attn namespace"
    weight = module.c_q.weight
    if weight.device.type == "meta":
        return None, "its parameters are on the meta device, so its forward cannot be checked"
    dtype = probe.probe_dtype(weight.device)
    generator = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(weight.device, dtype)

    batch, seq, window, half = 2, 8, (3, 0), module.head_dim // 2
    x = draw(batch, seq, module.n_embd if hasattr(module, "n_embd") else weight.shape[1])
    ve = None if module.ve_gate is None else draw(batch, seq, module.n_kv_head * module.head_dim)
    angles = draw(seq, half)
    cos_sin = (angles.cos()[None, :, None, :], angles.sin()[None, :, None, :])
    calls, saved = [], namespace["flash_attn"]
    try:
        namespace["flash_attn"] = _recording_flash_attn(calls)
        with probe.as_probe(module, training=False, dtype=dtype), \
                backend.use_backend("reference"):
            expected = original(module, x, ve, cos_sin, window, None)
            if len(calls) != 1:
                return None, f"its forward called flash_attn_func {len(calls)} times, not once"
            q_seen, k_seen, causal, window_seen, extra = calls[0]
            if causal is not True or window_seen != window or extra:
                return None, (f"its forward called flash_attn_func(causal={causal!r}, window_size="
                              f"{window_seen!r}, {sorted(extra)}), not causal with the layer's "
                              f"window {window!r}")
            q, k, _ = _project(module, x, ve)
            cos, sin = cos_sin[0].reshape(seq, half), cos_sin[1].reshape(seq, half)
            q_unit, k_unit = reference.rotary_qk_norm(q, k, cos, -sin)
            # only the product of q's and k's factors reaches the scores
            product = _fitted_scale(q_seen, q_unit) * _fitted_scale(k_seen, k_unit)
            if not product > 0:
                return None, (f"the factors it puts on q and k multiply to {product:g}; "
                              "rotary_qk_norm's scale squared must be positive")
            scale = float(f"{math.sqrt(product):.12g}")
            actual = _attend(module, x, ve, cos, sin, window[0], scale)
    except Exception as err:
        return None, f"its forward could not be checked on a probe input ({type(err).__name__}: {err})"
    finally:
        namespace["flash_attn"] = saved
    difference = probe.probe_difference(expected, actual, _FP64_TOLERANCE
                                              if dtype == torch.float64 else 1e-4)
    if difference is not None:
        return None, (f"its forward differs from nanochat's attention (rotary by -theta, QK "
                      f"norm, q and k * {scale:g}) on a probe (max difference {difference:.2e}); "
                      "left alone")
    return scale, None


def _patch_attention(name: str, module: nn.Module, report: PatchReport) -> None:
    if _kind(module) == ATTENTION:
        report.already.append(name)
        return
    scale, reason = _probe_attention(module)
    if reason is not None:
        report.skipped[name] = reason
        return
    module._gptfast_qk_scale = scale
    module.__class__ = classes.switched_class(type(module), ATTENTION, _attention_forward)
    report._add(name, ATTENTION, f"q and k * {scale:g} after rotary and QK norm, causal with "
                                 "flash-attention's window_size; kv_cache calls keep nanochat's path")


# ----------------------------------------------------------------------------- loss --

class _HeadInput(Exception):
    """Raised by lm_head's pre-hook, with lm_head's input as its argument, while the patched
    forward only wants that input (no __init__ of its own: torch.compile traces it)."""


def _stop_at_head(head: nn.Module, args: tuple) -> None:
    """lm_head's forward pre-hook: stops the model's forward there when asked to."""
    if vars(head).get("_gptfast_stop", False):
        raise _HeadInput(args[0])


def _head_input(model: nn.Module, original: Callable, idx, targets, reduction) -> tuple:
    """(lm_head's input, None) from the model's own forward stopped at lm_head, or (None, what
    the forward returned) when it never called lm_head."""
    head = model.lm_head
    head._gptfast_stop = True
    try:
        result = original(model, idx, targets, None, reduction)
    except _HeadInput as stop:
        return stop.args[0], None
    finally:
        head._gptfast_stop = False
    return None, result


def _fused_loss(model, x, targets, reduction, vocab: int, softcap: Optional[float]):
    weight = model.lm_head.weight[:vocab]
    if weight.dtype != x.dtype and not (x.dtype in _HALF and weight.dtype == torch.float32):
        weight = weight.to(x.dtype)  # as nanochat's Linear: the weight in the activations' dtype
    loss = functional.linear_cross_entropy(x, weight, targets.reshape(-1),
                                           ignore_index=_IGNORE_INDEX, reduction=reduction,
                                           softcap=softcap)
    return loss.float()  # nanochat's loss is fp32 (its logits are .float()ed)


def _gpt_forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
    """nanochat's GPT.forward; with targets (no kv_cache), lm_head + softcap + cross-entropy
    run as one gptfast.linear_cross_entropy on lm_head's input."""
    original = classes.original_class(type(self)).forward
    if targets is None or kv_cache is not None or loss_reduction not in _REDUCTIONS:
        return original(self, idx, targets, kv_cache, loss_reduction)
    x, result = _head_input(self, original, idx, targets, loss_reduction)
    if x is None:  # the forward never reached lm_head: its own result stands
        return result
    return _fused_loss(self, x, targets, loss_reduction, self._gptfast_vocab, self._gptfast_softcap)


def _solve_softcap(raw: float, capped: float) -> float:
    """c > 0 with c * tanh(raw / c) == capped, for 0 < capped < raw (c * tanh(raw / c) grows
    from 0 to raw with c)."""
    low, high = capped, capped
    for _ in range(200):
        if high * math.tanh(raw / high) >= capped:
            break
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if middle * math.tanh(raw / middle) < capped else (low, middle)
    return float(f"{high:.6g}")


def _read_softcap(model, original, idx) -> tuple:
    """(vocab, softcap or None, None) read from the model's logits for chosen lm_head outputs
    (spread up to +-1e4, so a tanh cap shows), or (None, None, why not)."""
    chosen = []

    def choose_logits(head, args, output):
        generator = torch.Generator().manual_seed(2)
        logits = torch.randn(output.shape, generator=generator) * 8
        logits[..., 0], logits[..., 1] = 1e4, -1e4
        chosen.append(logits.to(output.device, output.dtype))
        return chosen[-1]

    handle = model.lm_head.register_forward_hook(choose_logits)
    try:
        returned = original(model, idx, None, None, "mean")
    finally:
        handle.remove()
    if len(chosen) != 1 or not isinstance(returned, torch.Tensor):
        return None, None, "its forward without targets does not return logits made by lm_head once"
    vocab = returned.shape[-1]
    if returned.shape[:-1] != chosen[0].shape[:-1] or vocab > chosen[0].shape[-1]:
        return None, None, (f"its logits {tuple(returned.shape)} are not a vocab slice of lm_head's "
                            f"output {tuple(chosen[0].shape)}")
    raw = chosen[0][..., :vocab].float()
    tolerance = 1e-5
    if probe.probe_difference(returned, raw, tolerance) is None:
        return vocab, None, None
    at = raw.abs().argmax()
    softcap = _solve_softcap(raw.flatten()[at].abs().item(), returned.flatten()[at].abs().item())
    difference = probe.probe_difference(returned, softcap * torch.tanh(raw / softcap), tolerance)
    if difference is not None:
        return None, None, (f"its logits are neither lm_head's nor softcap * tanh(logits / softcap) "
                            f"(closest softcap {softcap:g}, max difference {difference:.2e})")
    return vocab, softcap, None


def _probe_loss(model: nn.Module) -> tuple:
    """``((vocab, softcap), None)`` when the fused loss reproduces the model's own loss
    ('none' and 'mean', targets with ignored -1 rows) on a small input, else ``(None, why)``."""
    original = classes.original_class(type(model)).forward
    weight = model.lm_head.weight
    if weight.device.type == "meta":
        return None, "its parameters are on the meta device, so its loss cannot be checked"
    tokens = getattr(getattr(model, "config", None), "vocab_size", None) or weight.shape[0]
    generator = torch.Generator().manual_seed(3)
    idx = torch.randint(0, tokens, (2, 6), generator=generator).to(weight.device)
    targets = torch.randint(0, tokens, (2, 6), generator=generator).to(weight.device)
    targets[0, 0] = targets[1, -1] = _IGNORE_INDEX
    try:
        with probe.as_probe(model, training=False), backend.use_backend("reference"):
            vocab, softcap, reason = _read_softcap(model, original, idx)
            if reason is not None:
                return None, reason
            for reduction in ("none", "mean"):
                expected = original(model, idx, targets, None, reduction)
                x, _ = _head_input(model, original, idx, targets, reduction)
                if x is None:
                    return None, "its forward with targets does not call lm_head"
                actual = _fused_loss(model, x, targets, reduction, vocab, softcap)
                if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
                    return None, f"its loss with loss_reduction={reduction!r} is not F.cross_entropy's"
                difference = probe.probe_difference(expected, actual, 1e-4)
                if difference is not None:
                    return None, (f"its loss (reduction {reduction!r}) differs from "
                                  f"linear_cross_entropy(softcap={softcap}, ignore_index=-1) on a "
                                  f"probe (max difference {difference:.2e}); left alone")
    except Exception as err:
        return None, f"its loss could not be checked on a probe input ({type(err).__name__}: {err})"
    return (vocab, softcap), None


def _patch_loss(model: nn.Module, report: PatchReport) -> None:
    if _kind(model) == LOSS:
        report.already.append("")
        return
    head = model.lm_head
    hook = head.register_forward_pre_hook(_stop_at_head)
    found, reason = _probe_loss(model)
    if reason is not None:
        hook.remove()
        report.skipped[""] = reason
        return
    model._gptfast_vocab, model._gptfast_softcap = found
    model.__class__ = classes.switched_class(type(model), LOSS, _gpt_forward)
    report._add("", LOSS, f"lm_head.weight[:{found[0]}] of {head.weight.shape[0]} rows, softcap "
                          f"{found[1]}, ignore_index -1, reductions 'mean'/'none'/'sum'")



# ---------------------------------------------------------------------- entry points --

def recognises(model: nn.Module) -> bool:
    """The whole model is nanochat's GPT (:func:`is_nanochat_gpt`): this family patches it alone."""
    return is_nanochat_gpt(model)


def patch(model: nn.Module, report: PatchReport, *, layer_norm: bool = True,
          attention: bool = True, loss: bool = True) -> None:
    """Patch a model :func:`is_nanochat_gpt` recognises, in place; see the module docstring.

    ``layer_norm`` (the module-level norm), ``attention``, ``loss`` choose the parts. Each part
    is probed first and left alone, with the reason in ``report``, where its math differs from
    what gptfast runs.
    """
    if not is_nanochat_gpt(model):
        raise TypeError(f"{type(model).__name__} is not nanochat's GPT (lm_head, transformer.h, "
                        "forward(idx, targets, kv_cache, loss_reduction))")
    if layer_norm:
        _patch_norms(model, report)
    if attention:
        for name, module in model.named_modules():
            if is_nanochat_attention(module):
                _patch_attention(name, module, report)
    if loss:
        _patch_loss(model, report)


def unpatch(model: nn.Module) -> list:
    """Undoes :func:`patch` on ``model``: classes, attributes, lm_head's hook and (when no
    other patched model uses them) the module-level norms. Returns what was restored."""
    restored = _release_norms(model)
    vars(model).pop("_gptfast_norm_modules", None)
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind == LOSS:
            hooks = module.lm_head._forward_pre_hooks
            for key in [key for key, hook in hooks.items() if hook is _stop_at_head]:
                del hooks[key]
            vars(module.lm_head).pop("_gptfast_stop", None)
        if kind in (LOSS, ATTENTION):
            classes.restore(module)
            restored.append(name or "<root>")
    return restored
