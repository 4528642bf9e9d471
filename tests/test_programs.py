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
        elif op == "rms_norm":
            y = gptfast.rms_norm(x, w) + gptfast.rms_norm(x)  # with and without a weight
            loss = (y * scale).sum() + x.square().sum()
        else:
            r = x if op.endswith("_aliased") else residual[:, :x.shape[1]]
            if op.startswith("add_rms_norm"):
                y, stream = gptfast.add_rms_norm(x, r, w)
            else:
                y, stream = gptfast.add_layer_norm(x, r, w, b)
            loss = (y * scale).sum() + stream.square().sum() + y.sum() * stream.mean()
        return finish(loss, [base, weight, bias, residual], mode, lambda: weight.mul_(2))
    return program


def _norm_cases():
    for op, x_kind, mode in itertools.product(
            ["layer_norm", "add_layer_norm", "add_layer_norm_aliased",
             "rms_norm", "add_rms_norm", "add_rms_norm_aliased"],
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


# ------------------------------------------- attention: masks x score magnitude (issue 23) --
# The masked forward once set a row's running max to 0 when its first visited key block was
# entirely masked and kept it: once every score the row may see is far below 0, P underflowed
# and the output came out scaled or 0 with no error. Generated as masks x magnitudes: each
# program runs masked attention at T=40 with the interpreter's 32-row tiles, where rows 33..
# of the last tile see nothing in key block [16, 32) (documents start at 21 and 33; a window
# of 3 starts after 32), with scores near 0, far below it, far above it, or all equal.

ATTENTION_MASKS = {
    "causal": (None, None),
    "documents": ([5, 18, 21, 33], None),
    "window": (None, 3),
    "documents_window": ([5, 18, 21, 33], 6),
}
# scores scale * q.k: "unit" N(0, 1); "far_below" -150 + N(0, 1.5^2); "far_above" +150 +
# N(0, 1.5^2); "equal_far_below": every score -150 (uniform rows)
ATTENTION_MAGNITUDES = ["unit", "far_below", "far_above", "equal_far_below"]


def _scores_at(magnitude, q, k):
    """q, k (B, H, T, D) rescaled in place so their scores sit where ``magnitude`` says."""
    d = q.shape[-1]
    if magnitude == "equal_far_below":
        q.fill_(1.0)
        k.fill_(-150.0 * d ** 0.5 / d)
        return
    if magnitude == "unit":
        return
    offset = 150.0 if magnitude == "far_above" else -150.0
    spread = (1.5 / ((d - 1) ** 0.5 / d ** 0.5)) ** 0.5
    q.mul_(spread)
    k.mul_(spread)
    c = (abs(offset) * d ** 0.5) ** 0.5
    q[..., 0], k[..., 0] = c, c if offset > 0 else -c


def _masked_attention_program(mask, magnitude):
    starts, window = ATTENTION_MASKS[mask]

    def program():
        B, H, Hkv, T, D = 1, 2, 1, 40, 16
        q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
        _scores_at(magnitude, q, k)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        ids = None
        if starts is not None:
            begins = torch.zeros(T, dtype=torch.long)
            begins[starts] = 1
            ids = torch.cumsum(begins, 0)[None]
        out = gptfast.causal_attention(q, k, v, document_ids=ids, window=window)
        loss = (out * torch.randn(out.shape)).sum() + out.square().mean()
        return [out] + finish(loss, [q, k, v], "backward", None)
    return program


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # masked P
@pytest.mark.parametrize("program", [
    pytest.param(_masked_attention_program(mask, magnitude), id=f"{mask}-{magnitude}")
    for mask, magnitude in itertools.product(ATTENTION_MASKS, ATTENTION_MAGNITUDES)])
def test_masked_attention_programs_at_any_magnitude(program):
    check_program(program)


# ------------------------------------ attention: bidirectional masks x autograd (issue 24) --
# causal=False through gptfast.functional.attention, q/k/v as leaves or split from one fused
# projection, at T=40 (bands that start and end inside the interpreter's tiles), the output
# and the (differentiable) logsumexp both in the loss, under every autograd mode. Unit-scale
# scores: at |scores| ~ 150 both backends' fp32 dQ errors pass this file's fixed tolerance
# (tests/test_attention_bidirectional.py compares every magnitude with fp64 instead).

BIDIRECTIONAL_MASKS = {
    "full": (None, (-1, -1)),
    "window": (None, (3, 2)),
    "documents": ([5, 18, 21, 33], (-1, -1)),
    "documents_window": ([5, 18, 21, 33], (6, 1)),
}


def _bidirectional_attention_program(mask, kind, mode):
    starts, (left, right) = BIDIRECTIONAL_MASKS[mask]

    def program():
        B, H, T, D = 1, 2, 40, 16
        qkv = torch.randn(B, T, 3, H, D, requires_grad=True)
        if kind == "fused_projection":
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            leaves = [qkv]
        else:  # leaves, one kv head (GQA)
            q, k, v = (t.detach().transpose(1, 2).contiguous() for t in qkv.unbind(2))
            k, v = k[:, :1].clone(), v[:, :1].clone()
            leaves = [t.requires_grad_() for t in (q, k, v)]
        ids = None
        if starts is not None:
            begins = torch.zeros(T, dtype=torch.long)
            begins[starts] = 1
            ids = torch.cumsum(begins, 0)[None]
        out, lse = gptfast.functional.attention(q, k, v, causal=False, window_left=left,
                                                window_right=right, document_ids=ids,
                                                return_lse=True)
        loss = ((out * torch.randn(out.shape)).sum() + out.square().mean()
                + (lse * torch.randn(lse.shape)).sum())
        return [out, lse] + finish(loss, leaves, mode, lambda: leaves[0].mul_(2))
    return program


@pytest.mark.parametrize("program", [
    pytest.param(_bidirectional_attention_program(mask, kind, mode), id=f"{mask}-{kind}-{mode}")
    for mask, kind, mode in itertools.product(BIDIRECTIONAL_MASKS, ["leaves", "fused_projection"],
                                              MODES)])
def test_bidirectional_attention_programs(program):
    check_program(program, triton_may_raise=(NO_DOUBLE_BACKWARD,))
# ============================================================ patch(): masks, dropout ==
# issue 23 (findings 3 and 4). The programs are attention modules a user can write: a mask
# (causal, sliding windows, a window as long as the block, or anything else) kept as
# nanoGPT's ``bias`` buffer or built in forward for SDPA, times a dropout layout (nanoGPT's
# names, other names, probabilities in number attributes, a dropout gptfast cannot keep).
# The contract: patch() switches exactly the causal and sliding-window modules whose dropouts
# it can keep, and a switched module gives the module's own outputs and gradients in eval
# mode on both backends and the same dropout spread in training; every other module is left
# alone with a reason.

import copy  # noqa: E402
import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

PATCH_BLOCK, PATCH_EMBD, PATCH_HEADS = 24, 16, 2
PATCHABLE_MASKS = ["causal", "window1", "window7", "window8", "window_block"]
OTHER_MASKS = ["prefix_lm", "random", "bidirectional", "hidden_key"]
DROPOUT_LAYOUTS = ["none", "nanogpt", "renamed", "functional", "misplaced"]


def _patch_mask(kind, t):
    """bool (t, t), True = attend."""
    i = torch.arange(t)
    causal = i[None, :] <= i[:, None]
    if kind.startswith("window"):
        window = PATCH_BLOCK if kind == "window_block" else int(kind.removeprefix("window"))
        return causal & (i[None, :] > i[:, None] - window)
    if kind == "prefix_lm":
        return causal | ((i[:, None] < 5) & (i[None, :] < 5))
    if kind == "random":
        generator = torch.Generator().manual_seed(t)
        return (causal & (torch.rand(t, t, generator=generator) < 0.7)) | torch.eye(t, dtype=torch.bool)
    if kind == "bidirectional":
        return torch.ones(t, t, dtype=torch.bool)
    if kind == "hidden_key":  # causal but for one key, past the 7 tokens the old probe saw
        mask = causal.clone()
        if t > 20:
            mask[20, 10] = False
        return mask
    assert kind == "causal", kind
    return causal


class _PatchProgramAttention(nn.Module):
    def __init__(self, mask, kept_as, dropout):
        super().__init__()
        self.c_attn = nn.Linear(PATCH_EMBD, 3 * PATCH_EMBD)
        self.c_proj = nn.Linear(PATCH_EMBD, PATCH_EMBD)
        self.n_head, self.n_embd = PATCH_HEADS, PATCH_EMBD
        self.mask_kind, self.kept_as, self.layout = mask, kept_as, dropout
        if kept_as == "buffer":
            self.register_buffer("bias", _patch_mask(mask, PATCH_BLOCK).float()[None, None])
        p = 0.0 if dropout == "none" else 0.5
        if dropout in ("none", "nanogpt"):
            self.attn_dropout, self.resid_dropout, self.dropout = nn.Dropout(p), nn.Dropout(p), p
        elif dropout == "renamed":
            self.attn_drop, self.proj_drop = nn.Dropout(p), nn.Dropout(p)
        elif dropout == "functional":
            self.attention_p, self.residual_p = p, p
        else:
            self.v_drop = nn.Dropout(p)

    def _attention_p(self):
        return {"none": lambda: self.dropout, "nanogpt": lambda: self.dropout,
                "renamed": lambda: self.attn_drop.p, "functional": lambda: self.attention_p,
                "misplaced": lambda: 0.0}[self.layout]()

    def _drop_probabilities(self, att):
        if self.layout in ("none", "nanogpt"):
            return self.attn_dropout(att)
        if self.layout == "renamed":
            return self.attn_drop(att)
        return F.dropout(att, self.attention_p, self.training) if self.layout == "functional" else att

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        if self.layout == "misplaced":
            v = self.v_drop(v)
        if self.kept_as == "buffer":
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
            y = self._drop_probabilities(att) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_patch_mask(self.mask_kind, T),
                                               dropout_p=self._attention_p() if self.training else 0.0)
        y = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        if self.layout in ("none", "nanogpt"):
            return self.resid_dropout(y)
        if self.layout == "renamed":
            return self.proj_drop(y)
        return F.dropout(y, self.residual_p, self.training) if self.layout == "functional" else y


def _training_spread(module, x, calls=8):
    module.train()
    with torch.no_grad():
        spread = torch.stack([module(x) for _ in range(calls)]).std(0).mean().item()
    module.eval()
    return spread


def _patch_cases():
    """Every mask x where it is kept x dropout layout. By default: every mask in a buffer and
    every patchable one built in forward, without dropout; every dropout layout with a
    window of 7 in a buffer. The whole product runs with ``pytest -m slow``."""
    for mask, kept_as, dropout in itertools.product(PATCHABLE_MASKS + OTHER_MASKS,
                                                    ["buffer", "built_in_forward"], DROPOUT_LAYOUTS):
        default = ((dropout == "none" and (kept_as == "buffer" or mask in PATCHABLE_MASKS))
                   or (mask == "window7" and kept_as == "buffer"))
        yield pytest.param(mask, kept_as, dropout, id=f"{mask}-{kept_as}-{dropout}",
                           marks=() if default else pytest.mark.slow)


@pytest.mark.parametrize("mask,kept_as,dropout", list(_patch_cases()))
def test_patch_programs(mask, kept_as, dropout):
    torch.manual_seed(0)
    module = _PatchProgramAttention(mask, kept_as, dropout).eval()
    original = copy.deepcopy(module)
    _, report = gptfast.patch(nn.Sequential(module), return_report=True)

    patched = mask in PATCHABLE_MASKS and dropout != "misplaced"
    x = torch.randn(2, PATCH_BLOCK, PATCH_EMBD)
    want = _training_spread(original, x)
    got = _training_spread(module, x)
    assert (want == 0.0) == (got == 0.0) and (want == 0.0 or 0.6 < got / want < 1.6), (want, got)
    runs = [("reference", PATCH_BLOCK), ("reference", 9)] + [("triton", PATCH_BLOCK)] * patched
    for backend, seq in runs:
        inputs = x[:, :seq].clone().requires_grad_()
        with gptfast.use_backend(backend):
            out = module(inputs)
            grads = torch.autograd.grad(out.square().sum(), [inputs, *module.parameters()])
        expected_inputs = x[:, :seq].clone().requires_grad_()
        expected = original(expected_inputs)
        expected_grads = torch.autograd.grad(expected.square().sum(),
                                             [expected_inputs, *original.parameters()])
        torch.testing.assert_close(out, expected, **TOL)
        for got_grad, want_grad in zip(grads, expected_grads):
            torch.testing.assert_close(got_grad, want_grad, **TOL)
    if not patched:
        assert report.replaced == [] and report.skipped["0"], report
        assert type(module) is _PatchProgramAttention
    else:
        assert report.names("nanoGPT attention") == ["0"], report.skipped
        if mask == "causal" or (mask == "window_block" and kept_as == "buffer"):
            window = None  # a window as long as the block is causal attention within it
        else:
            window = PATCH_BLOCK if mask == "window_block" else int(mask.removeprefix("window"))
        assert module._gptfast_window == window
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
