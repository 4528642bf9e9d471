"""Peak FLOP/s for MFU: the dense bf16 tensor-core peak of a GPU by name
(:data:`PEAK_BF16_FLOPS`, :func:`peak_flops_for_name`) and of a torch device
(:func:`device_peak_flops`), and the A100 figure nanoGPT's estimate_mfu divides by on every
device. :mod:`gptfast.model` re-exports these names."""

from __future__ import annotations

import re
from typing import Optional

import torch

A100_BF16_FLOPS = 312e12  # the peak nanoGPT's estimate_mfu divides by, on every device


# Dense (no sparsity) bf16 tensor-core peak FLOP/s (fp16 for V100) by device name, most
# specific first: the first entry whose name appears as whole words in the CUDA device name
# wins ("H100 PCIe" before "H100", and "L4" does not match "L40S").
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,   # SXM, reported as e.g. "NVIDIA H100 80GB HBM3"
    "H200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def _name_pattern(key):
    words = r"[\s_-]+".join(re.escape(word) for word in key.split())
    # whole words only, and not a "Ti"/"Super" variant, which is a different product
    return re.compile(rf"(?<![a-z0-9]){words}(?![a-z0-9])(?![\s_-]*(?:ti|super)\b)", re.IGNORECASE)


_PEAK_PATTERNS = [(_name_pattern(key), flops) for key, flops in PEAK_BF16_FLOPS.items()]


def peak_flops_for_name(device_name: str) -> Optional[float]:
    """The dense bf16 peak FLOP/s of a GPU from its name (as torch.cuda.get_device_name
    reports it), or None when the GPU is not in :data:`PEAK_BF16_FLOPS`."""
    for pattern, flops in _PEAK_PATTERNS:
        if pattern.search(device_name):
            return flops
    return None


def device_peak_flops(device=None) -> Optional[float]:
    """The dense bf16 peak FLOP/s of ``device`` (default: the current CUDA device, if any).

    None for CPUs and other non-CUDA devices, and for GPUs not in :data:`PEAK_BF16_FLOPS`.
    """
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))
