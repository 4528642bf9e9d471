"""gptfast: fast GPT training on NVIDIA GPUs with Triton kernels, plain PyTorch everywhere else.

The ops (``layer_norm``, ``add_layer_norm``, ``rms_norm``, ``add_rms_norm``,
``rotary_qk_norm``, ``causal_attention``, ``cross_entropy``,
``linear_cross_entropy``) dispatch between Triton kernels and reference PyTorch through
``gptfast.functional``; ``use_backend`` chooses. Importing gptfast imports torch but never
triton or CUDA: heavier pieces (the model, modules) load on first attribute access.
"""

from __future__ import annotations

import importlib

from .backend import BackendUnavailable, get_backend, use_backend
from .functional import (
    add_layer_norm,
    add_rms_norm,
    causal_attention,
    cross_entropy,
    layer_norm,
    linear_cross_entropy,
    rms_norm,
    rotary_qk_norm,
)

__version__ = "0.1.0"

# name -> module that defines it, imported on first access
_LAZY = {
    "GPT": "gptfast.model",
    "GPTConfig": "gptfast.model",
    "TokenLoader": "gptfast.data",
    "patch": "gptfast.patching",
    "unpatch": "gptfast.patching",
    "nn": "gptfast.nn",
    "reference": "gptfast.reference",
    "functional": "gptfast.functional",
    "backend": "gptfast.backend",
    "testing": "gptfast.testing",
    "flash_attn_interface": "gptfast.flash_attn_interface",
    "hf": "gptfast.hf",
}

__all__ = [
    "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "rotary_qk_norm",
    "causal_attention", "cross_entropy", "linear_cross_entropy",
    "use_backend", "get_backend", "BackendUnavailable", "__version__", *_LAZY,
]


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gptfast' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
