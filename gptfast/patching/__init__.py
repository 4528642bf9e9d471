"""``gptfast.patch`` by model family, and ``gptfast.unpatch``.

- :mod:`gptfast.patching.nanochat`: nanochat's GPT (norm, attention, fused softcapped loss).
- nanoGPT-style modules and Hugging Face ``GPT2Attention``: still in :mod:`gptfast.nn`;
  :func:`unpatch` undoes them from the marks their patch leaves on the modules.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import nanochat

__all__ = ["unpatch", "nanochat"]

_HF_IMPLEMENTATION = "gptfast"  # gptfast.nn.HF_IMPLEMENTATION (not imported: nn imports this)


def unpatch(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Undo ``gptfast.patch(model)`` in place and return ``model``.

    Restores the original classes (dropping what patch stored on the modules), lm_head's hook
    and, for nanochat, the module-level ``norm`` once no other patched model of that module is
    left (module globals are process-wide). Hugging Face GPT2Attention modules go back to
    ``attn_implementation="sdpa"``. A model with nothing patched is left as it is, with a
    warning saying so. ``verbose=True`` prints what was restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = nanochat.unpatch(model)
    for name, module in model.named_modules():
        if _undo_nn_patch(module):
            restored.append(name or "<root>")
    if not restored:
        warnings.warn(f"gptfast.unpatch: nothing to undo, no module of this "
                      f"{type(model).__name__} was patched by gptfast.patch", stacklevel=2)
    elif verbose:
        print(f"gptfast.unpatch: restored {len(restored)}: {', '.join(restored)}")
    return model


def _undo_nn_patch(module: nn.Module) -> bool:
    """Undoes gptfast.nn's patch of one module (nanoGPT attention, LayerNorms, HF GPT2Attention)."""
    state = vars(module)
    original = getattr(type(module), "_gptfast_original_class", None)
    if original is None:
        original = state.get("_gptfast_replaced_class")  # an exact torch LayerNorm
    hf = state.get("_gptfast_attention", False)
    if original is None and not hf:
        return False
    if original is not None:
        module.__class__ = original
    if hf:
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == _HF_IMPLEMENTATION:
            config._attn_implementation = "sdpa"
    for name in [name for name in state if name.startswith("_gptfast_")]:
        delattr(module, name)
    return True
