"""``gptfast.patch`` for nanoGPT-style modules (karpathy/nanoGPT ``model.py``), in any model.

Recognised module by module, by what they are and what they compute:

- **LayerNorm**: each exact ``torch.nn.LayerNorm`` over the last dim becomes a
  :class:`gptfast.nn.LayerNorm` (its class is switched; it adds no state). LayerNorms over
  several dims and subclasses of ``torch.nn.LayerNorm`` (which may override forward) are
  skipped.
- **LayerNorm-like** modules of other classes (nanoGPT's ``LayerNorm``: a 1-D ``weight``, an
  optional ``bias``, no other state, ``F.layer_norm`` in forward): their forward is checked
  against ``F.layer_norm`` on probe inputs (which also pins ``eps``, from an
  ``eps``/``variance_epsilon`` attribute or 1e-5); only a match gets a forward on
  ``gptfast.layer_norm``. A module named "*Norm*" that does not match is reported as skipped.
- **attention**: a module with ``c_attn``/``c_proj`` Linears and ``n_head``, ``n_embd``,
  computing causal self-attention as nanoGPT's CausalSelfAttention, gets a forward on
  ``gptfast.causal_attention``, after :mod:`gptfast.patching.probe` found its mask (causal or
  a sliding window) and its dropouts; sequences longer than the probe run its own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional, reference
from ..nn import CausalSelfAttention
from . import classes, probe
from .report import ATTENTION, NORM, PatchReport, declare_kind

LAYER_NORM = declare_kind("LayerNorm", NORM)
NANOGPT_ATTENTION = declare_kind("nanoGPT attention", ATTENTION)


def patch_module(name: str, module: nn.Module, root: nn.Module, report: PatchReport, *,
                 layer_norm: bool, attention: bool) -> bool:
    """Patches ``module`` if it is a LayerNorm, LayerNorm-like or nanoGPT-style attention
    (the ``layer_norm``/``attention`` parts chosen); True when it recognised the module."""
    if isinstance(module, nn.LayerNorm):
        if layer_norm:
            _patch_layer_norm(name, module, report)
        return True
    if layer_norm and _looks_like_layer_norm(module):
        _patch_layer_norm_like(name, module, report)
        return True
    if _looks_like_nanogpt_attention(module):
        if attention:
            reason, found = _patch_nanogpt_attention(module, root)
            if reason is None:
                report._add(name, NANOGPT_ATTENTION, found)
            else:
                report.skipped[name] = reason
        return True
    return False


def _patch_layer_norm(name: str, module: nn.LayerNorm, report: PatchReport) -> None:
    if type(module) is not nn.LayerNorm:
        report.skipped[name] = (f"{type(module).__qualname__} subclasses torch.nn.LayerNorm; its "
                                "forward may differ, so it is left alone")
    elif len(module.normalized_shape) != 1:
        report.skipped[name] = (f"normalized_shape {tuple(module.normalized_shape)} spans more "
                                "than the last dim")
    else:
        classes.switch_to_layer_norm(module)
        report._add(name, LAYER_NORM)


# ---------------------------------------------------------------- nanoGPT attention --

def _looks_like_nanogpt_attention(module: nn.Module) -> bool:
    if isinstance(module, CausalSelfAttention):  # gptfast's own: already on gptfast
        return False
    return all(hasattr(module, attr) for attr in ("c_attn", "c_proj", "n_head", "n_embd"))


def _is_linear(module, in_features: int, out_features: int) -> bool:
    return isinstance(module, nn.Linear) and (module.in_features, module.out_features) == (
        in_features, out_features)


def _nanogpt_shape_problem(module: nn.Module) -> Optional[str]:
    n_head, n_embd = module.n_head, module.n_embd
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n_head, n_embd)) \
            or n_embd % n_head:
        return f"n_head={n_head!r}, n_embd={n_embd!r} are not positive ints with n_head | n_embd"
    c_attn, c_proj = module.c_attn, module.c_proj
    if not _is_linear(c_attn, n_embd, 3 * n_embd):
        return f"c_attn is not a Linear({n_embd}, {3 * n_embd}) projecting to [q | k | v]"
    if not _is_linear(c_proj, n_embd, n_embd):
        return f"c_proj is not a Linear({n_embd}, {n_embd})"
    return None


def _nanogpt_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nanoGPT's CausalSelfAttention.forward on gptfast.causal_attention, with the mask and
    dropouts ``patch`` found in the module (``_gptfast_window``, ``_gptfast_dropout``)."""
    if x.size(1) > self._gptfast_probe_length:  # longer than the probe proved: its own math
        return type(self)._gptfast_original_class.forward(self, x)
    y = _nanogpt_project(self, _nanogpt_attend(self, *_nanogpt_heads(self, x),
                                               self._gptfast_window))
    residual = self._gptfast_dropout.residual
    return y if residual is None else residual.apply(self, y)


def _nanogpt_heads(self, x: torch.Tensor) -> tuple:
    """q, k, v (batch, n_head, seq, head_dim) from c_attn, as nanoGPT splits them."""
    batch, seq, channels = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    return tuple(t.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2)
                 for t in (q, k, v))


def _nanogpt_project(self, y: torch.Tensor) -> torch.Tensor:
    """c_proj of the heads (batch, n_head, seq, head_dim) put back side by side."""
    batch, _, seq, _ = y.shape
    return self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, self.n_embd))


def _nanogpt_attend(self, q, k, v, window: Optional[int]) -> torch.Tensor:
    attention = self._gptfast_dropout.attention
    dropout_p = 0.0 if attention is None else attention.probability(self)
    if dropout_p == 0.0:
        return functional.causal_attention(q, k, v, window=window)
    # SDPA applies the attention dropout, as nanoGPT's flash path does
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    visible = reference.attention_mask(q.shape[-2], k.shape[-2], window=window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)


def _probe_replacement(self, x: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """The patched forward's math in eval mode with ``window``, for the mask probe."""
    return _nanogpt_project(self, functional.causal_attention(*_nanogpt_heads(self, x),
                                                               window=window))


def _patch_nanogpt_attention(module: nn.Module, root: nn.Module) -> tuple:
    """(None, what was found) after switching the module, or (why not, None)."""
    reason = _nanogpt_shape_problem(module)
    if reason is None and module.c_attn.weight.device.type == "meta":
        reason = "its parameters are on the meta device, so the patched forward cannot be checked"
    if reason is not None:
        return reason, None
    original = type(module).forward
    plan, reason = probe.find_dropout_plan(module, original)
    if reason is not None:
        return reason, None
    length = probe.probe_length(module, root)
    window, reason = probe.probe_mask(module, length, original, _probe_replacement)
    if reason is not None:
        return reason, None
    module._gptfast_window = window
    module._gptfast_probe_length = length
    module._gptfast_dropout = plan
    module.__class__ = classes.switched_class(type(module), NANOGPT_ATTENTION,
                                              _nanogpt_attention_forward)
    mask = "causal" if window is None else f"sliding window {window}"
    return None, f"{mask}, checked up to {length} tokens{_describe_dropout(plan)}"


def _describe_dropout(plan) -> str:
    kept = [f"{where} dropout from {source.name}" for where, source in
            (("attention", plan.attention), ("residual", plan.residual)) if source is not None]
    return "; keeps " + " and ".join(kept) if kept else ""


# ------------------------------------------------------------ LayerNorm-like modules --

_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")


def _looks_like_layer_norm(module: nn.Module) -> bool:
    """A leaf whose state is a 1-D ``weight`` and an optional ``bias`` of the same shape."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if next(module.children(), None) is not None or next(module.buffers(), None) is not None:
        return False
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or weight.numel() == 0:
        return False
    if bias is not None and (not isinstance(bias, nn.Parameter) or bias.shape != weight.shape):
        return False
    allowed = {"weight"} | ({"bias"} if bias is not None else set())
    return {name for name, _ in module.named_parameters(recurse=False)} == allowed


def _layer_norm_like_eps(module: nn.Module) -> float:
    for attribute in _EPS_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 1e-5  # nanoGPT's LayerNorm passes 1e-5 to F.layer_norm in its forward


def _layer_norm_like_forward(self, input: torch.Tensor) -> torch.Tensor:
    """A LayerNorm-like module's forward on gptfast.layer_norm (its eps found by the probe)."""
    return functional.layer_norm(input, self.weight, getattr(self, "bias", None), self._gptfast_eps)


def _layer_norm_probe_mismatch(module: nn.Module, eps: float) -> Optional[str]:
    """None when ``F.layer_norm`` with ``eps`` reproduces the module's forward, else why not.

    The probe has ordinary rows and rows of variance ~1e-6, where a different eps shows.
    """
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight.device.type == "meta":
        return "its parameters are on the meta device, so its forward cannot be checked"
    generator = torch.Generator().manual_seed(0)
    features = weight.numel()
    x = torch.randn(2, 3, features, generator=generator, dtype=torch.float64)
    x[1] = 0.5 + 1e-3 * x[1]
    x = x.to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            expected = type(module).forward(module, x)
            actual = F.layer_norm(x, (features,), weight, bias, eps)
    except Exception as err:
        return f"its forward could not be checked on a probe input ({type(err).__name__}: {err})"
    if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
        return "its forward does not return a tensor of its input's shape"
    difference = probe.probe_difference(expected, actual, full_precision_tolerance=1e-4)
    if difference is not None:
        return (f"its forward is not F.layer_norm over the last dim with eps={eps:g} on a probe "
                f"input (max difference {difference:.2e}), so it is left alone")
    return None


def _patch_layer_norm_like(name: str, module: nn.Module, report: PatchReport) -> None:
    eps = _layer_norm_like_eps(module)
    reason = _layer_norm_probe_mismatch(module, eps)
    if reason is None:
        module._gptfast_eps = eps
        module.__class__ = classes.switched_class(type(module), LAYER_NORM,
                                              _layer_norm_like_forward)
        report._add(name, LAYER_NORM)
    elif "norm" in type(module).__name__.lower():
        report.skipped[name] = reason
