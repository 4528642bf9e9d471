"""gptfast.nn: the drop-in modules against their torch / nanoGPT counterparts, and patch()."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gptfast
from gptfast.nn import (
    CausalSelfAttention,
    CrossEntropyLoss,
    KVCache,
    LayerNorm,
    LinearCrossEntropy,
    PatchReport,
    patch,
)

TOL = dict(atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------- LayerNorm --

@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch_and_loads_its_state_dict(affine, bias):
    theirs = nn.LayerNorm(12, eps=1e-6, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
            if bias:
                theirs.bias.normal_()
    ours = LayerNorm(12, eps=1e-6, elementwise_affine=affine, bias=bias)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert isinstance(ours, nn.LayerNorm) and ours.normalized_shape == (12,)


def test_layer_norm_gradients_match_torch():
    theirs = nn.LayerNorm(8)
    ours = LayerNorm(8)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 8)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(3, 8)
    ours(x_ours).backward(grad_out)
    theirs(x_theirs).backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **TOL)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TOL)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **TOL)


def test_layer_norm_add_and_norm():
    norm = LayerNorm(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, residual = torch.randn(4, 6), torch.randn(4, 6)
    normed, total = norm.add_and_norm(x, residual)
    torch.testing.assert_close(total, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, F.layer_norm(x + residual, (6,), norm.weight, norm.bias), **TOL)


def test_layer_norm_over_several_dims_is_refused():
    with pytest.raises(ValueError, match="last dim only"):
        LayerNorm((4, 8))
    LayerNorm([8])  # a one-element shape is fine


# ------------------------------------------------------------------------------ losses --

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_matches_torch(reduction):
    logits = torch.randn(7, 11)
    target = torch.tensor([0, 3, -100, 10, 5, 5, 1])
    ours = CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)(logits, target)
    theirs = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    if reduction == "none":  # torch also gives 0 at ignored rows
        theirs = theirs.masked_fill(target == -100, 0.0)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_cross_entropy_loss_z_loss_and_ignore_index():
    logits, target = torch.randn(5, 9), torch.tensor([1, -1, 2, 3, -1])
    loss = CrossEntropyLoss(ignore_index=-1, z_loss=1e-2)(logits, target)
    keep = target != -1
    expected = (F.cross_entropy(logits[keep], target[keep])
                + 1e-2 * torch.logsumexp(logits[keep], -1).square().mean())
    torch.testing.assert_close(loss, expected, **TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_linear_then_cross_entropy(bias):
    module = LinearCrossEntropy(16, 23, bias=bias, ignore_index=-1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    target = torch.randint(0, 23, (2, 5))
    target[0, 1] = -1
    loss = module(x, target)
    x_ref = x.detach().clone().requires_grad_()
    reference = F.cross_entropy(F.linear(x_ref, module.weight, module.bias).view(-1, 23),
                                target.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, reference, **TOL)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    assert list(module.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    assert module.weight.shape == (23, 16)


# -------------------------------------------------------------------------- attention --

def nanogpt_attention(attn: CausalSelfAttention, x):
    """nanoGPT's slow-path attention written out, GQA by repeating k/v heads."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=2)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = v.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
    y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
    return attn.c_proj(y)


@pytest.mark.parametrize("n_head, n_kv_head", [(4, None), (4, 2), (4, 1)])
def test_attention_matches_nanogpt(n_head, n_kv_head):
    attn = CausalSelfAttention(32, n_head, n_kv_head).eval()
    kv = n_head if n_kv_head is None else n_kv_head
    assert attn.c_attn.weight.shape == ((n_head + 2 * kv) * 8, 32)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x), nanogpt_attention(attn, x), **TOL)


def test_attention_state_dict_is_nanogpts():
    attn = CausalSelfAttention(24, 3, bias=False)
    assert list(attn.state_dict()) == ["c_attn.weight", "c_proj.weight"]
    assert attn.c_attn.weight.shape == (72, 24)


@pytest.mark.parametrize("n_kv_head", [None, 2])
@pytest.mark.parametrize("chunks", [[9], [4, 5], [3, 1, 1, 4], [1] * 9])
def test_kv_cache_chunks_equal_full_attention(n_kv_head, chunks):
    attn = CausalSelfAttention(32, 4, n_kv_head).eval()
    x = torch.randn(2, sum(chunks), 32)
    full = attn(x)
    cache = KVCache(max_length=12)
    outputs, start = [], 0
    for size in chunks:
        outputs.append(attn(x[:, start:start + size], kv_cache=cache))
        start += size
    assert cache.length == sum(chunks)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, **TOL)


def test_kv_cache_overflow_and_reset():
    attn = CausalSelfAttention(16, 2).eval()
    cache = KVCache(max_length=4)
    attn(torch.randn(1, 3, 16), kv_cache=cache)
    with pytest.raises(ValueError, match="KVCache overflow"):
        attn(torch.randn(1, 2, 16), kv_cache=cache)
    cache.reset()
    x = torch.randn(1, 4, 16)
    torch.testing.assert_close(attn(x, kv_cache=cache), attn(x), **TOL)
    with pytest.raises(ValueError, match="positive int"):
        KVCache(0)


def test_attention_dropout_in_training_only():
    attn = CausalSelfAttention(32, 4, dropout=0.5)
    x = torch.randn(2, 6, 32)
    attn.eval()
    torch.testing.assert_close(attn(x), nanogpt_attention(attn, x), **TOL)
    attn.train()
    torch.manual_seed(1)
    first = attn(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, attn(x))


def test_attention_bad_arguments():
    with pytest.raises(ValueError, match="divisible by n_head"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        CausalSelfAttention(32, 4, n_kv_head=3)
    with pytest.raises(ValueError, match="dropout"):
        CausalSelfAttention(32, 4, dropout=1.0)
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, 32\)"):
        CausalSelfAttention(32, 4)(torch.randn(2, 6, 16))


# ------------------------------------------------------------------------------ patch --

class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norms = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8, bias=False)])
        self.plane_norm = nn.LayerNorm((3, 8))  # over two dims: left alone
        self.head = nn.Sequential(nn.GELU(), nn.LayerNorm(8, elementwise_affine=False))

    def forward(self, x):
        h = self.embed(x)
        for norm in self.norms:
            h = norm(h) * 2
        return self.head(self.plane_norm(h))


def test_patch_replaces_layer_norms_and_keeps_parameters():
    model = SmallNet()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = torch.randn(2, 3, 6)
    before = model(x)
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    patched, report = patch(model, return_report=True)

    assert patched is model
    assert isinstance(report, PatchReport)
    assert report.replaced == ["norms.0", "norms.1", "head.1"]
    assert list(report.skipped) == ["plane_norm"]
    assert type(model.norms[0]) is LayerNorm and type(model.head[1]) is LayerNorm
    assert type(model.plane_norm) is nn.LayerNorm
    for name, p in model.named_parameters():
        assert p is params_before[name]
    assert list(model.state_dict()) == keys_before
    torch.testing.assert_close(model(x), before, **TOL)

    (model(x) * torch.randn_like(before)).sum().backward()  # the optimiser drives the same params
    weight = model.norms[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.norms[0].weight, weight)


def test_patch_root_layer_norm_subclasses_and_repeat():
    class CustomNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) + 1

    norm = nn.LayerNorm(4)
    assert isinstance(gptfast.patch(norm), LayerNorm)
    model = nn.Sequential(CustomNorm(4), nn.LayerNorm(4))
    _, report = patch(model, return_report=True)
    assert report.replaced == ["1"] and "subclasses" in report.skipped["0"]
    _, again = patch(model, return_report=True)
    assert again.replaced == [] and list(again.skipped) == ["0"]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch("not a model")


def test_patch_verbose_prints_report(capsys):
    patch(nn.Sequential(nn.LayerNorm(4)))
    assert capsys.readouterr().out == ""
    patch(nn.Sequential(nn.LayerNorm(4), nn.LayerNorm((2, 4))), verbose=True)
    out = capsys.readouterr().out
    assert "1 LayerNorm(s)" in out and "skipped 1" in out


def test_modules_under_triton_backend_match_reference(triton_backend):
    """The same modules with the kernels forced (interpreter on CPU) match the reference."""
    from gptfast.backend import triton_unavailable

    device = torch.device("cpu")
    missing = [op for op in ("layer_norm", "causal_attention", "cross_entropy")
               if triton_unavailable(op, device, check_case=False)]
    if missing:
        pytest.skip(f"no usable Triton kernel for {missing}")
    norm, attn = LayerNorm(32), CausalSelfAttention(32, 2).eval()
    x, target = torch.randn(2, 8, 32), torch.randint(0, 32, (16,))
    out = CrossEntropyLoss()(attn(norm(x)).view(16, 32), target)
    with gptfast.use_backend("reference"):
        expected = CrossEntropyLoss()(attn(norm(x)).view(16, 32), target)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
