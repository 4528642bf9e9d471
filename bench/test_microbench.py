"""pytest-benchmark microbenchmarks of the five gptfast ops, forward and forward+backward.

    python -m pytest bench/test_microbench.py --benchmark-only

On a CUDA device: backend "auto" (the Triton kernels) at GPU-sized bf16 shapes, each call
synchronised so that pytest-benchmark's wall clock sees the GPU time. Without one: the
reference backend at small fp32 shapes, so the file runs anywhere. Outside tests/, so not part
of the default test run; it needs nothing from tests/conftest.py (no interpreter, no fixtures).
"""

import pytest
import torch

import gptfast

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKEND = "auto" if CUDA else "reference"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PASSES = ("fwd", "fwd+bwd")

# op -> (CPU shape, CUDA shape)
SHAPES = {
    "layer_norm": ((512, 768), (16384, 768)),                     # N, C
    "add_layer_norm": ((512, 768), (16384, 768)),                 # N, C
    "causal_attention": ((1, 4, 256, 64), (8, 12, 1024, 64)),     # B, H, T, D
    "cross_entropy": ((256, 8192), (8192, 50257)),                # N, V
    "linear_cross_entropy": ((256, 256, 8192), (8192, 768, 50257)),  # N, C, V
}


def _tensor(*shape, dtype=DTYPE, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()


def _case(op):
    """(function of the inputs, inputs) for ``op`` at this machine's shape; params fp32."""
    shape = SHAPES[op][CUDA]
    if op == "layer_norm":
        n, c = shape
        inputs = (_tensor(n, c), _tensor(c, dtype=torch.float32), _tensor(c, dtype=torch.float32))
        return gptfast.layer_norm, inputs
    if op == "add_layer_norm":
        n, c = shape
        inputs = (_tensor(n, c), _tensor(n, c), _tensor(c, dtype=torch.float32),
                  _tensor(c, dtype=torch.float32))
        return lambda *args: gptfast.add_layer_norm(*args)[0], inputs
    if op == "causal_attention":
        return gptfast.causal_attention, tuple(_tensor(*shape) for _ in range(3))
    target = torch.randint(0, shape[-1], (shape[0],), device=DEVICE)
    if op == "cross_entropy":
        n, v = shape
        return lambda logits: gptfast.cross_entropy(logits, target), (_tensor(n, v, scale=2.0),)
    n, c, v = shape
    return (lambda x, w: gptfast.linear_cross_entropy(x, w, target),
            (_tensor(n, c), _tensor(v, c, scale=c ** -0.5)))


@pytest.mark.parametrize("direction", PASSES)
@pytest.mark.parametrize("op", list(SHAPES))
def test_op(benchmark, op, direction):
    torch.manual_seed(0)
    fn, inputs = _case(op)
    benchmark.extra_info.update(device=DEVICE, backend=BACKEND, dtype=str(DTYPE),
                                shape=SHAPES[op][CUDA])

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def forward_backward():
        out = fn(*inputs)
        # autograd.grad: no .grad accumulates between rounds
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    step = forward if direction == "fwd" else forward_backward

    def call():
        result = step()
        if CUDA:
            torch.cuda.synchronize()
        return result

    with gptfast.use_backend(BACKEND):
        call()  # compile / autotune outside the measured rounds
        benchmark(call)
