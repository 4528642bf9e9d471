"""What the kernels' backward passes do when autograd is asked for a graph of the gradients.

``torch.autograd.grad(..., create_graph=True)`` (a gradient penalty, a Hessian-vector
product) runs every backward with grad mode on and differentiates their results again. The
Triton backward kernels are opaque to autograd, so a kernel's gradient would come back
either without a ``grad_fn`` (its second-order terms silently dropped) or, worse, with the
history of a tensor it was written into. Each op therefore does one of two things there:

- exact second derivatives, at reference speed and memory, only on the rare create_graph
  backward: :func:`reference_grads` recomputes the op with ``gptfast.reference`` and takes
  its gradients with ``create_graph=True`` (cross_entropy with kept logits,
  linear_cross_entropy); layer_norm, add_layer_norm, rms_norm and add_rms_norm evaluate
  their backward formulas with differentiable torch ops (see ``gptfast.kernels.layernorm``);
- :func:`raise_if_differentiated`: the kernel's first-order gradients, wired to a node that
  raises ``RuntimeError`` if a second backward reaches it (causal_attention, and
  cross_entropy whose logits were overwritten by their gradient, so nothing is left to
  recompute from). Using the gradients as values is fine; differentiating them is an error,
  never a wrong number.

Under ``torch.compile`` neither applies: compiled graphs do not support double backward and
AOTAutograd raises its own error for it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def creating_graph() -> bool:
    """True inside a backward that runs with ``create_graph=True`` (eager mode only)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def reference_grads(fn: Callable, inputs: Sequence[Optional[torch.Tensor]],
                    needed: Sequence[bool],
                    grad_outputs: Sequence[Optional[torch.Tensor]]) -> list:
    """d fn(*inputs) / d inputs[i] for each ``needed[i]`` (None elsewhere), differentiable.

    fn returns a tensor or a tuple of them, matched with ``grad_outputs`` (None: no gradient
    reached that output). ``inputs`` are the tensors the forward saved, still attached to
    their autograd history, so the gradients built here connect to it.
    """
    with torch.enable_grad():
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs)
                 if grad is not None and out.requires_grad]
        wrt = [t for t, need in zip(inputs, needed) if need and t is not None]
        if not pairs or not wrt:
            return [None] * len(inputs)
        grads = iter(torch.autograd.grad([out for out, _ in pairs], wrt,
                                         [grad for _, grad in pairs], create_graph=True,
                                         allow_unused=True))
    return [next(grads) if need and t is not None else None for t, need in zip(inputs, needed)]


def raise_if_differentiated(grads: Sequence[Optional[torch.Tensor]], op: str,
                            why: str) -> tuple:
    """``grads`` with a grad_fn that raises RuntimeError when a second backward reaches it.

    Unlike ``@once_differentiable``, which does this only when an upstream gradient requires
    grad, it always does: the gradients depend on the op's inputs through what the forward
    saved even when the upstream gradient is a constant.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return tuple(grads)
    message = (f"gptfast.{op} on the Triton backend does not support double backward "
               f"(create_graph=True): {why}. Use gptfast.use_backend('reference') for it.")
    error = torch._C._functions.DelayedError(message.encode(), len(present))
    wrapped = error(*[g.detach().requires_grad_() for g in present])
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return tuple(None if g is None else next(wrapped) for g in grads)
