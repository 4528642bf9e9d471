"""The optimizers of ``gptfast train --optimizer muon``: Muon for the hidden matrices, AdamW for
the rest, with nanochat's settings.

nanochat (karpathy/nanochat 92d63d4: scripts/base_train.py's defaults, GPT.setup_optimizer in
nanochat/gpt.py) trains the 2-D weights of the blocks with Muon at lr 0.02 (momentum 0.95,
5 Newton-Schulz steps, lr times sqrt(max(1, rows / cols))), and with AdamW (eps 1e-10) the
lm_head at 0.008 (betas 0.8, 0.96, weight decay 0.01) and the token embedding at 0.3 (betas
0.8, 0.995, decay 0.001), the AdamW rates times (n_embd / 768)^-0.5. Here Muon is
``torch.optim.Muon`` (its default "original" lr adjustment is that sqrt(max(1, rows / cols));
its Newton-Schulz coefficients are Keller Jordan's, where nanochat uses Polar Express and a
NorMuon-style second moment). Parameters nanochat does not have go to AdamW: biases and norm
weights at the lm_head's rate without decay; position embeddings with the token embedding; a
tied embedding/head matrix with the head.
"""

from __future__ import annotations

import inspect

import torch

MATRIX_LR = 0.02
EMBEDDING_LR = 0.3
UNEMBEDDING_LR = 0.008
REFERENCE_WIDTH = 768  # nanochat scales the AdamW rates by (n_embd / 768) ** -0.5


def muon_class() -> type:
    """``torch.optim.Muon``, or a clear error on a torch without it (it arrived in torch 2.9)."""
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise RuntimeError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this is "
                           f"torch {torch.__version__}. Use --optimizer adamw, or upgrade torch")
    return muon


def split_parameters(model: torch.nn.Module) -> dict:
    """The trainable parameters by role: "matrices" (2-D weights inside the blocks,
    ``transformer.h.*``), "head" (lm_head, also when tied to the embedding), "embeddings"
    (the other 2-D weights: token and position embeddings) and "vectors" (biases, norm weights)."""
    head = model.lm_head.weight
    roles = {"matrices": [], "head": [], "embeddings": [], "vectors": []}
    for name, param in model.named_parameters():  # a tied weight is listed once
        if not param.requires_grad:
            continue
        if param is head:
            role = "head"
        elif param.dim() == 2:
            role = "matrices" if name.startswith("transformer.h.") else "embeddings"
        else:
            role = "vectors"
        roles[role].append(param)
    return roles


def muon_and_adamw(model: torch.nn.Module, matrix_lr: float = MATRIX_LR,
                   embedding_lr: float = EMBEDDING_LR, unembedding_lr: float = UNEMBEDDING_LR,
                   weight_decay: float = 0.0, device_type: str = "cpu") -> list:
    """[AdamW, Muon] over model's parameters as the module docstring says; ``weight_decay`` is
    Muon's (decoupled, lr * weight_decay per step). Each group carries its peak rate as
    ``peak_lr``, which a schedule scales."""
    muon = muon_class()
    roles = split_parameters(model)
    scale = (model.config.n_embd / REFERENCE_WIDTH) ** -0.5
    adamw_groups = [
        dict(params=roles["head"], lr=unembedding_lr * scale, betas=(0.8, 0.96), weight_decay=0.01),
        dict(params=roles["embeddings"], lr=embedding_lr * scale, betas=(0.8, 0.995),
             weight_decay=0.001),
        dict(params=roles["vectors"], lr=unembedding_lr * scale, betas=(0.8, 0.95), weight_decay=0.0),
    ]
    adamw_groups = [group for group in adamw_groups if group["params"]]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    optimizers = [torch.optim.AdamW(adamw_groups, eps=1e-10, **({"fused": True} if fused else {}))]
    if roles["matrices"]:
        optimizers.append(muon(roles["matrices"], lr=matrix_lr, weight_decay=weight_decay,
                               momentum=0.95, nesterov=True, ns_steps=5))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers
