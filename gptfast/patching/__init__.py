"""``gptfast.patch(model)`` and ``gptfast.unpatch(model)``: foreign models on gptfast's ops.

One file per model family, each recognising its own modules and probing them before it
switches anything; all share :mod:`.probe` (running a module's own code on probe inputs),
:mod:`.classes` (switching a module's class, and back) and :mod:`.report` (:class:`PatchReport`):

- :mod:`.nanochat`: nanochat's GPT, recognised as a whole model and patched alone (its
  module-level norm, attention, fused softcapped loss).
- :mod:`.hf`: Hugging Face transformers (GPT-2's ``GPT2Attention`` module by module; any other
  model switched to ``attn_implementation="gptfast"``).
- :mod:`.nanogpt`: nanoGPT-style modules in any model (torch and nanoGPT LayerNorms,
  ``c_attn``/``c_proj`` causal attention).

A family is a module with either ``recognises(model)`` and ``patch(model, report, **parts)``
(it takes the whole model: :data:`_WHOLE_MODEL`), or ``patch_module(name, module, root,
report, **parts)`` returning whether it recognised the module, and optionally
``patch_model(model, report, **parts)`` run after the walk (:data:`_PER_MODULE`, asked in
order). Adding a family is adding a file and naming it in one of the two tuples.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import classes, hf, nanochat, nanogpt
from .report import PatchReport

__all__ = ["patch", "unpatch", "PatchReport"]

_WHOLE_MODEL = (nanochat,)
_PER_MODULE = (hf, nanogpt)  # asked in this order for each module


def patch(model: nn.Module, verbose: bool = False, return_report: bool = False, *,
          layer_norm: bool = True, attention: bool = True, loss: bool = True):
    """Make ``model`` compute its norms, causal attention (and, for nanochat, its loss) with
    gptfast's ops, in place.

    Each family (see the module docstring, and each family's module for what it recognises
    and checks) probes a module's own forward before switching it: a module whose math
    differs from what gptfast runs is left alone, named in ``report.skipped`` with the
    reason; ``report.checked`` says what the probes found. ``layer_norm``, ``attention`` and
    ``loss`` choose the parts.

    Module objects keep their identity, Parameters, hooks and state_dict keys, so optimisers
    already holding the parameters and existing checkpoints are unaffected. Patch before
    ``torch.compile``. Patching twice is harmless: the second report lists the modules as
    ``already`` on gptfast. Returns ``model``, or ``(model, PatchReport)`` with
    ``return_report=True``; ``verbose=True`` prints the report. :func:`unpatch` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    whole = next((family for family in _WHOLE_MODEL if family.recognises(model)), None)
    if whole is not None:
        whole.patch(model, report, layer_norm=layer_norm, attention=attention, loss=loss)
    else:
        parts = dict(layer_norm=layer_norm, attention=attention)
        for name, module in model.named_modules():
            if classes.runs_on_gptfast(module):
                report.already.append(name)
                continue
            for family in _PER_MODULE:
                if family.patch_module(name, module, model, report, **parts):
                    break
        for family in _PER_MODULE:
            if hasattr(family, "patch_model"):
                family.patch_model(model, report, **parts)
    if verbose:
        print(report)
    return (model, report) if return_report else model


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
        hf.unpatch_module(module)
        if classes.restore(module):
            restored.append(name or "<root>")
    if not restored:
        warnings.warn(f"gptfast.unpatch: nothing to undo, no module of this "
                      f"{type(model).__name__} was patched by gptfast.patch", stacklevel=2)
    elif verbose:
        print(f"gptfast.unpatch: restored {len(restored)}: {', '.join(restored)}")
    return model
