"""Whole programs on both backends: the Triton backend agrees with the reference or raises.

Each program builds its inputs from a fixed seed, calls the public ops, and runs autograd
the way user code does; it returns the tensors a user would look at (losses, outputs,
gradients). Programs are generated as the cross product of
- how the inputs are made: leaves, op outputs, views of leaves, expanded (rows sharing
  memory), transposed (strided), sliced, batched, aliased (x passed as its own residual);
- how the outputs are used: once, read again after the loss, read before it, a second
  loss on the same logits, logits returned to the caller, a weight used twice;
- how autograd runs: backward; backward twice with retain_graph; a gradient penalty with
  create_graph; an in-place edit of an input between forward and backward;
- for cross_entropy, keep_logits (default True) and keep_logits=False.

The contract: both backends give the same numbers, or both raise. The Triton backend may
raise where the reference does not only with one of the documented errors, and only where
the docstrings say it does (keep_logits=False, double backward of attention, in-place
edits of tensors its backward reads). Programs that break the keep_logits=False promise
(reading the logits after the loss) are left out: by definition nothing can tell.
"""

import itertools
import re

import pytest
import torch

import gptfast

pytest.importorskip("gptfast.kernels.cross_entropy")

N, V, C = 6, 11, 5  # rows, vocabulary, features
TOL = dict(atol=2e-4, rtol=2e-4)

# what the Triton backend may raise where the reference does not, by cause
VERSION_CHECK = "modified by an inplace operation"
OVERWRITTEN = "already overwritten by their gradient"
SECOND_BACKWARD = "cannot run backward a second time"
NO_DOUBLE_BACKWARD = "does not support double backward"


def run(program, backend):
    """("ok", [tensors]) or ("raised", exception) for program() under ``backend``."""
    torch.manual_seed(0)
    try:
        with gptfast.use_backend(backend):
            return "ok", [t.detach().clone() for t in program()]
    except Exception as error:  # noqa: BLE001 - the outcome is what is compared
        return "raised", error


def check_program(program, triton_may_raise=()):
    reference, triton = run(program, "reference"), run(program, "triton")
    if reference[0] == "raised":
        assert triton[0] == "raised", f"reference raised {reference[1]!r}, triton returned values"
        assert isinstance(triton[1], (RuntimeError, ValueError, TypeError)), repr(triton[1])
        return
    if triton[0] == "raised":
        allowed = "|".join(map(re.escape, triton_may_raise))
        assert allowed and isinstance(triton[1], RuntimeError) and re.search(allowed, str(triton[1])), (
            f"triton raised {triton[1]!r} where the reference returned values")
        return
    assert len(triton[1]) == len(reference[1])
    for got, want in zip(triton[1], reference[1]):
        torch.testing.assert_close(got, want, **TOL)


def finish(loss, leaves, mode, edit):
    """Run autograd on ``loss`` as ``mode`` says; returns the loss and what autograd made."""
    grad = torch.rand(loss.shape) + 0.5 if loss.dim() else torch.tensor(1.3)
    if mode == "edit_between":
        with torch.no_grad():
            edit()
        mode = "backward"
    if mode == "backward":
        loss.backward(grad)
    elif mode == "retain_twice":
        loss.backward(grad, retain_graph=True)
        loss.backward(2 * grad)
    elif mode == "create_graph":
        grads = torch.autograd.grad(loss, leaves, grad, create_graph=True, allow_unused=True)
        penalty = sum(g.square().sum() for g in grads if g is not None)
        penalty.backward()
        return [loss, penalty, *(g for g in grads if g is not None),
                *(t.grad for t in leaves if t.grad is not None)]
    return [loss, *(t.grad for t in leaves if t.grad is not None)]


# --------------------------------------------------------------------- cross_entropy --

def _logits_source(kind):
    """(logits, target, leaves, edit): logits made as ``kind`` says; edit changes in place
    a tensor that the op making the logits (or the loss) saved."""
    h, weight = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    target = torch.randint(0, V, (N,))
    target[1] = -100
    leaves = [h, weight]

    def edit():
        h.mul_(2)

    if kind == "op":
        logits = h @ weight.T
    elif kind == "leaf":
        logits = torch.randn(N, V, requires_grad=True)
        leaves, edit = [logits], (lambda: logits.mul_(2))
    elif kind == "view_of_leaf":
        leaf = torch.randn(2, N // 2, V, requires_grad=True)
        logits, leaves, edit = leaf.view(N, V), [leaf], (lambda: leaf.mul_(2))
    elif kind == "expanded":
        logits = (h[:1] @ weight.T).expand(N, V)
    elif kind == "transposed":
        logits = (weight @ h.T).t()
    elif kind == "column_slice":
        wide = torch.randn(V + 4, C, requires_grad=True)
        logits, leaves = (h @ wide.T)[:, 2:2 + V], [h, wide]
    elif kind == "row_slice":
        tall = torch.randn(2 * N, C, requires_grad=True)
        logits, leaves, edit = (tall @ weight.T)[::2], [tall, weight], (lambda: tall.mul_(2))
    elif kind == "batched":
        logits, target = (h @ weight.T).view(2, N // 2, V), target.view(2, N // 2)
    else:
        raise AssertionError(kind)
    return logits, target, leaves, edit


SOURCES = ["op", "leaf", "view_of_leaf", "expanded", "transposed", "column_slice", "row_slice",
           "batched"]
USES = ["once", "read_after", "read_before", "twice", "returned"]
MODES = ["backward", "retain_twice", "create_graph", "edit_between"]
OPTIONS = [dict(), dict(reduction="sum", label_smoothing=0.1), dict(reduction="none", z_loss=1e-2)]


def _cross_entropy_program(source, use, mode, keep_logits, options):
    def program():
        logits, target, leaves, edit = _logits_source(source)

        def loss_of(t):
            return gptfast.cross_entropy(logits, t, keep_logits=keep_logits, **options)

        extra = []
        if use == "read_before":
            squares = logits.square().mean()
        loss = loss_of(target)
        if use == "read_after":
            loss = loss + logits.square().mean()
        elif use == "read_before":
            loss = loss + squares
        elif use == "twice":
            loss = loss + loss_of(target.flip(0))
        elif use == "returned":
            extra = [logits]
        return finish(loss, leaves, mode, edit) + extra
    return program


def _cross_entropy_cases():
    """Every combination; by default only those where at most one of (source, use, mode)
    leaves its first, plainest value ("op", "once", "backward"): each pair of dimensions is
    still covered in full. The whole product runs with ``pytest -m slow``."""
    for i, (source, use, mode, keep) in enumerate(
            itertools.product(SOURCES, USES, MODES, (True, False))):
        if not keep and use in ("read_after", "returned"):
            continue  # reads after the loss: exactly what keep_logits=False promises not to do
        may_raise = []
        if mode == "edit_between":
            may_raise.append(VERSION_CHECK)
        if not keep:
            may_raise += [VERSION_CHECK, OVERWRITTEN, SECOND_BACKWARD, NO_DOUBLE_BACKWARD]
        options = OPTIONS[i % len(OPTIONS)]
        plain = (source == "op") + (use == "once") + (mode == "backward")
        yield pytest.param(_cross_entropy_program(source, use, mode, keep, options), may_raise,
                           id=f"{source}-{use}-{mode}-{'keep' if keep else 'overwrite'}",
                           marks=() if plain >= 1 else pytest.mark.slow)


@pytest.mark.parametrize("program,may_raise", list(_cross_entropy_cases()))
def test_cross_entropy_programs(program, may_raise):
    check_program(program, may_raise)


# ------------------------------------------------------------------ linear_cross_entropy --

def _linear_program(x_kind, weight_use, mode, options):
    def program():
        h = torch.randn(N, C, requires_grad=True)
        weight = torch.randn(V, C, requires_grad=True)
        bias = torch.randn(V, requires_grad=True) if options.get("reduction") == "sum" else None
        target = torch.randint(0, V, (N,))
        target[2] = -100
        x = {"leaf": lambda: h, "op": lambda: torch.tanh(h), "expanded": lambda: h[:1].expand(N, C),
             "transposed": lambda: h.t().contiguous().t()}[x_kind]()
        loss = gptfast.linear_cross_entropy(x, weight, target, bias, **options)
        if weight_use == "tied":  # the weight also read by another op, as a tied embedding
            embedded = weight[target.clamp(min=0)]
            loss = loss + embedded.square().mean() if loss.dim() == 0 else loss + embedded.sum(-1)
        leaves = [t for t in (h, weight, bias) if t is not None]
        edits = {"x": lambda: h.mul_(2), "weight": lambda: weight.mul_(2)}
        return finish(loss, leaves, "edit_between" if mode.startswith("edit") else mode,
                      edits.get(mode.removeprefix("edit_"), lambda: None))
    return program


def _linear_cases():
    modes = ["backward", "retain_twice", "create_graph", "edit_x", "edit_weight"]
    for i, (x_kind, weight_use, mode) in enumerate(
            itertools.product(["leaf", "op", "expanded", "transposed"], ["alone", "tied"], modes)):
        options = OPTIONS[i % len(OPTIONS)]
        yield pytest.param(_linear_program(x_kind, weight_use, mode, options),
                           id=f"{x_kind}-{weight_use}-{mode}")


@pytest.mark.parametrize("program", list(_linear_cases()))
def test_linear_cross_entropy_programs(program):
    check_program(program)


# ------------------------------------------------------------------- layer norms --

def _norm_program(op, x_kind, mode):
    def program():
        base = torch.randn(N, C, requires_grad=True)
        weight, bias = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
        residual = torch.randn(N, C, requires_grad=True)
        x = {"leaf": lambda: base, "expanded": lambda: base[:1].expand(N, C),
             "transposed": lambda: base.t().contiguous().t(),
             "sliced": lambda: base[:, 1:]}[x_kind]()
        w, b = (weight, bias) if x_kind != "sliced" else (weight[1:], bias[1:])
        scale = torch.randn(x.shape)  # a constant upstream gradient into the norm
        if op == "layer_norm":
            y = gptfast.layer_norm(x, w, b)
            loss = (y * scale).sum() + x.square().sum()
        else:
            r = x if op == "add_layer_norm_aliased" else residual[:, :x.shape[1]]
            y, stream = gptfast.add_layer_norm(x, r, w, b)
            loss = (y * scale).sum() + stream.square().sum() + y.sum() * stream.mean()
        return finish(loss, [base, weight, bias, residual], mode, lambda: weight.mul_(2))
    return program


def _norm_cases():
    for op, x_kind, mode in itertools.product(
            ["layer_norm", "add_layer_norm", "add_layer_norm_aliased"],
            ["leaf", "expanded", "transposed", "sliced"], MODES):
        yield pytest.param(_norm_program(op, x_kind, mode), id=f"{op}-{x_kind}-{mode}")


@pytest.mark.parametrize("program", list(_norm_cases()))
def test_layer_norm_programs(program):
    check_program(program)


# ---------------------------------------------------------------------- attention --

def _attention_program(kind, mode):
    def program():
        B, H, T, D = 1, 2, 5, 4
        qkv = torch.randn(B, T, 3, H, D, requires_grad=True)
        if kind == "fused_projection":  # strided views of one tensor, as nanoGPT makes them
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            leaves = [qkv]
        else:
            q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_()
                       for t in qkv.unbind(2))
            leaves = [q, k, v]
            if kind == "expanded_kv":  # one kv head expanded to all (stride 0)
                k, v = k[:, :1].expand(B, H, T, D), v[:, :1].expand(B, H, T, D)
            elif kind == "gqa":
                k, v = k[:, :1], v[:, :1]
        out = gptfast.causal_attention(q, k, v)
        loss = (out * torch.randn(out.shape)).sum() + out.square().mean()
        return finish(loss, leaves, mode, lambda: leaves[0].mul_(2))
    return program


@pytest.mark.parametrize("program", [
    pytest.param(_attention_program(kind, mode), id=f"{kind}-{mode}")
    for kind, mode in itertools.product(["leaves", "fused_projection", "expanded_kv", "gqa"], MODES)])
def test_attention_programs(program):
    check_program(program, triton_may_raise=(NO_DOUBLE_BACKWARD,))


# ------------------------------------- target dtypes (issue 23, finding 2): cross-entropy --
# Class indices of any integer dtype mean their values: the same program with int64 targets
# must give the same numbers, on each backend (both backends once wrapped ignore_index into a
# uint8 target's range alike, so comparing them with each other could not see it).

TARGET_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
TARGET_OPS = ["cross_entropy", "linear_cross_entropy", "CrossEntropyLoss", "LinearCrossEntropy"]
TARGET_VOCAB = 256  # a byte-level vocabulary: every uint8 value is a class


def _ignore_indices(dtype):
    """-100 and -1 (outside unsigned ranges), a class (3), and 2**bits + 3 (outside the
    dtype's range; wrapped into it, it would be class 3)."""
    values = [-100, -1, 3]
    return values + ([2 ** torch.iinfo(dtype).bits + 3] if dtype != torch.int64 else [])


def _target_values(dtype, ignore_index):
    top = min(torch.iinfo(dtype).max, TARGET_VOCAB - 1)
    values = [0, 3, top, 156 if top >= 156 else 100, 3, 0]
    if torch.iinfo(dtype).min <= ignore_index <= torch.iinfo(dtype).max:
        values[4] = ignore_index
    return torch.tensor(values)


def _target_dtype_program(op, dtype, ignore_index, reduction):
    def program(as_dtype=dtype):
        target = _target_values(dtype, ignore_index).to(as_dtype)
        h = torch.randn(N, C, requires_grad=True)
        if op in ("cross_entropy", "CrossEntropyLoss"):
            weight = torch.randn(TARGET_VOCAB, C, requires_grad=True)
            logits = h @ weight.T
            if op == "cross_entropy":
                loss = gptfast.cross_entropy(logits, target, ignore_index, reduction)
            else:
                loss = gptfast.nn.CrossEntropyLoss(ignore_index, reduction)(logits, target)
            leaves = [h, weight]
        elif op == "linear_cross_entropy":
            weight = torch.randn(TARGET_VOCAB, C, requires_grad=True)
            loss = gptfast.linear_cross_entropy(h, weight, target, None, ignore_index, reduction)
            leaves = [h, weight]
        else:
            head = gptfast.nn.LinearCrossEntropy(C, TARGET_VOCAB, ignore_index=ignore_index,
                                                 reduction=reduction)
            loss, leaves = head(h, target), [h, head.weight]
        return finish(loss, leaves, "backward", None)
    return program


def _target_dtype_cases():
    """Every (dtype, ignore_index) pair with one op by default, the ops taking turns; the
    whole product with every op runs with ``pytest -m slow``."""
    for d, dtype in enumerate(TARGET_DTYPES):
        for i, ignore_index in enumerate(_ignore_indices(dtype)):
            for o, op in enumerate(TARGET_OPS):
                # a wrapped ignore_index beyond the range shows in the mean's count
                reduction = "mean" if i == 3 else ("mean", "none", "sum")[(d + i + o) % 3]
                default = o == (d + i) % len(TARGET_OPS)
                yield pytest.param(
                    _target_dtype_program(op, dtype, ignore_index, reduction),
                    id=f"{op}-{str(dtype).removeprefix('torch.')}-ignore{ignore_index}-{reduction}",
                    marks=() if default else pytest.mark.slow)


@pytest.mark.parametrize("program", list(_target_dtype_cases()))
def test_target_dtype_programs(program):
    check_program(program)
    for backend in ("reference", "triton"):
        narrow, wide = run(program, backend), run(lambda: program(torch.int64), backend)
        assert narrow[0] == wide[0] == "ok", (narrow, wide)
        for got, want in zip(narrow[1], wide[1]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=backend)
