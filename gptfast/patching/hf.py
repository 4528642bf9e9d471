"""``gptfast.patch`` for Hugging Face transformers models.

- **GPT-2** (``GPT2Attention``, module by module): a module running the "sdpa" implementation
  (HF's default) runs through the attention function "gptfast" registered in transformers'
  ``AttentionInterface`` (:func:`gptfast.hf.register`); cross-attention and models loaded
  with another ``attn_implementation`` (eager, flash, flex) are skipped with the reason.
- **any other model** (Llama, Mistral, Qwen2...) running "sdpa": the whole model switches to
  ``attn_implementation="gptfast"``; its attention modules are reported as ``"HF attention"``.

The attention function itself, and what it runs on gptfast or hands back to HF's SDPA, is
:mod:`gptfast.hf`. transformers is imported only for a transformers model. The LayerNorms of
an HF model (exact ``torch.nn.LayerNorm``) are the nanoGPT family's (:mod:`.nanogpt`).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .. import hf as registration
from .report import ATTENTION, PatchReport, declare_kind

HF_GPT2_ATTENTION = declare_kind("GPT2Attention", ATTENTION)
HF_ATTENTION = declare_kind("HF attention", ATTENTION)  # other models: attn_implementation "gptfast"
HF_IMPLEMENTATION = registration.NAME  # the name gptfast registers in transformers' AttentionInterface


def patch_module(name: str, module: nn.Module, root: nn.Module, report: PatchReport, *,
                 layer_norm: bool, attention: bool) -> bool:
    """Patches a transformers ``GPT2Attention`` (with ``attention``); True when it is one."""
    if not _is_hf_gpt2_attention(module):
        return False
    if attention:
        reason = _patch_gpt2_attention(module)
        if reason is None:
            report._add(name, HF_GPT2_ATTENTION)
        else:
            report.skipped[name] = reason
    return True


def patch_model(model: nn.Module, report: PatchReport, *, layer_norm: bool, attention: bool) -> None:
    """Any transformers model but GPT-2 (patched module by module): its attn_implementation
    becomes "gptfast"."""
    if not attention or report.names(HF_GPT2_ATTENTION) or not is_transformers_model(model):
        return
    names, outcome = switch_model(model)
    for name in names:
        if outcome is None:
            report._add(name, HF_ATTENTION)
        elif outcome == ALREADY:
            report.already.append(name)
        else:
            report.skipped[name] = outcome


def unpatch_module(module: nn.Module) -> None:
    """A patched GPT2Attention's config goes back to "sdpa" (its marks are dropped by
    :func:`gptfast.patching.classes.restore`)."""
    if vars(module).get("_gptfast_attention", False):
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == HF_IMPLEMENTATION:
            config._attn_implementation = "sdpa"


# ------------------------------------------------------------------------------ GPT-2 --

def _is_hf_gpt2_attention(module: nn.Module) -> bool:
    return any(cls.__name__ == "GPT2Attention" and cls.__module__.startswith("transformers.")
               for cls in type(module).__mro__)


def _patch_gpt2_attention(module: nn.Module) -> Optional[str]:
    """None after switching the module's config to "gptfast", else why not."""
    if getattr(module, "is_cross_attention", False):
        return "cross-attention (over encoder states, not causal) keeps HF's forward"
    config = getattr(module, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", HF_IMPLEMENTATION):
        return (f"the model runs attn_implementation={implementation!r}; gptfast.patch replaces "
                "HF's default 'sdpa' (load the model with attn_implementation='sdpa' to patch it)")
    try:
        registration.register()
    except RuntimeError as err:
        return str(err)
    config._attn_implementation = HF_IMPLEMENTATION
    module._gptfast_attention = True
    return None


# ------------------------------------------------------------------- other models --

ALREADY = "already"  # switch_model's outcome for a model already on "gptfast"


def is_transformers_model(model) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (transformers is not imported)."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
               for cls in type(model).__mro__)


def _is_attention_module(module) -> bool:
    """A transformers attention module (``*Attention`` with a config) other than GPT-2's, which
    is patched module by module."""
    cls = type(module)
    return (cls.__module__.startswith("transformers.") and cls.__name__.endswith("Attention")
            and cls.__name__ != "GPT2Attention" and hasattr(module, "config"))


def switch_model(model):
    """Switch a transformers model running "sdpa" (HF's default) to "gptfast". Returns (names
    of its attention modules, outcome): outcome None when switched, :data:`ALREADY`, or why not."""
    names = [name for name, module in model.named_modules() if _is_attention_module(module)]
    if not names:
        return [], None
    implementation = model.config._attn_implementation
    if implementation == HF_IMPLEMENTATION:
        return names, ALREADY
    if implementation != "sdpa":
        return names, (f"the model runs attn_implementation={implementation!r}; gptfast.patch "
                       f"switches HF's default 'sdpa' (or load it with attn_implementation="
                       f"{HF_IMPLEMENTATION!r} after gptfast.hf.register())")
    cls = type(model)
    if not getattr(cls, "_supports_flash_attn", getattr(cls, "_supports_flash_attn_2", True)):
        # gptfast reads sliding_window/position_ids from the attention call, as FA2 does
        return names, (f"{cls.__name__} does not support flash attention, so its attention "
                       f"calls may lack the arguments (sliding_window...) that FA2 and gptfast read")
    try:
        registration.register()
    except RuntimeError as err:
        return names, str(err)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(HF_IMPLEMENTATION)
    else:  # transformers before set_attn_implementation
        model.config._attn_implementation = HF_IMPLEMENTATION
    if model.config._attn_implementation != HF_IMPLEMENTATION:
        return names, (f"transformers kept attn_implementation="
                       f"{model.config._attn_implementation!r} ({type(model).__name__} cannot "
                       f"switch its attention implementation)")
    return names, None
