"""The reference ops behind the flash-attention API and the modern GPT: masks written out
from flash-attention's documented rules, RMSNorm against torch, rotary against its formula."""

import math

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast import reference


def _fa_visible(i, j, seq_q, length, causal, left, right):
    """flash-attention's docstring, one (query, key) pair at a time: query i is aligned to
    the bottom right, at position i + length - seq_q; a window (left, right) keeps keys in
    [position - left, position + right], -1 meaning unlimited; causal means right = 0."""
    if j >= length:
        return False
    position = i + length - seq_q
    if causal:
        right = 0
    if left >= 0 and j < position - left:
        return False
    if right >= 0 and j > position + right:
        return False
    return True


@pytest.mark.parametrize("seq_q,seq_k", [(5, 5), (2, 7), (7, 3), (1, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (2, 1), (1, -1), (-1, 3), (9, 9)])
def test_flash_mask_is_flash_attentions_rule(seq_q, seq_k, causal, window):
    lengths = torch.tensor([seq_k, max(seq_k - 2, 0)])
    mask = reference.flash_mask(seq_q, seq_k, causal, *window, key_lengths=lengths)
    for b, length in enumerate(lengths.tolist()):
        for i in range(seq_q):
            for j in range(seq_k):
                expected = _fa_visible(i, j, seq_q, length, causal, *window)
                assert bool(mask[b, 0, i, j]) == expected, (b, i, j)


def test_attention_rows_without_keys_are_zero_with_lse_minus_inf():
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64) for n in (4, 2, 2))
    out, lse = gptfast.functional.attention(q, k, v, causal=True, return_lse=True)
    # Tq 4 > Tk 2: queries 0 and 1 sit at positions -2 and -1, before every key
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    scores = q[:, :, 2:] @ k.transpose(-2, -1) / 2.0
    scores = scores.masked_fill(torch.tensor([[True, False], [True, True]]).logical_not(), -math.inf)
    torch.testing.assert_close(lse[:, :, 2:], torch.logsumexp(scores, -1))
    torch.testing.assert_close(out[:, :, 2:], torch.softmax(scores, -1) @ v)


def test_attention_causal_matches_causal_attention():
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]] * 2)
    expected = reference.causal_attention_math(q, k, v, None, ids, 3)
    got = gptfast.functional.attention(q, k, v, causal=True, window_left=2, document_ids=ids)
    torch.testing.assert_close(got, expected)


def test_attention_bad_input_names_the_argument():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="window_left"):
        gptfast.functional.attention(q, q, q, window_left=-2)
    with pytest.raises(TypeError, match="causal"):
        gptfast.functional.attention(q, q, q, causal=1)
    with pytest.raises(ValueError, match="document_ids"):
        gptfast.functional.attention(q, q[:, :, :3], q[:, :, :3], document_ids=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="key_lengths"):
        gptfast.functional.attention(q, q, q, key_lengths=torch.tensor([1, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_is_torchs(dtype):
    x = torch.randn(3, 5, 24).to(dtype)
    w = torch.randn(24).to(dtype)
    eps = torch.finfo(torch.float32).eps  # torch's eps=None for half x: fp32's, not x's dtype's
    expected = F.rms_norm(x.double(), (24,), w.double(), eps=eps).to(dtype)
    torch.testing.assert_close(gptfast.rms_norm(x, w), expected)
    torch.testing.assert_close(gptfast.rms_norm(x, w), F.rms_norm(x, (24,), w))
    small = x * 1e-2  # where bf16's eps (7.8e-3) would dominate the mean square
    torch.testing.assert_close(gptfast.rms_norm(small), F.rms_norm(small, (24,)))
    out, total = gptfast.add_rms_norm(x, x * 2, None, 1e-3)
    torch.testing.assert_close(total, x * 3)
    torch.testing.assert_close(out, F.rms_norm((x * 3).double(), (24,), eps=1e-3).to(dtype))
    with pytest.raises(ValueError, match="eps"):
        gptfast.rms_norm(x, eps=0.0)


def test_rotary_qk_norm_formula_and_nanochat_convention():
    torch.manual_seed(0)
    b, t, h, d = 2, 5, 3, 8
    q, k = torch.randn(b, t, h, d, dtype=torch.float64), torch.randn(b, t, 1, d, dtype=torch.float64)
    theta = torch.randn(t, d // 2, dtype=torch.float64)
    cos, sin = theta.cos(), theta.sin()
    qn, kn = gptfast.rotary_qk_norm(q, k, cos, sin, scale=1.5)
    normed = F.rms_norm(q, (d,))
    x1, x2 = normed[..., : d // 2], normed[..., d // 2:]
    c, s = cos[None, :, None], sin[None, :, None]
    torch.testing.assert_close(qn, 1.5 * torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1))
    # nanochat's apply_rotary_emb: (x1 cos + x2 sin, -x1 sin + x2 cos), norm after rotary
    nano = torch.cat((x1 * c + x2 * s, -x1 * s + x2 * c), -1)
    torch.testing.assert_close(gptfast.rotary_qk_norm(q, k, cos, -sin)[0], nano)
    # interleaved pairs (2i, 2i+1)
    qi = gptfast.rotary_qk_norm(q, k, cos, sin, interleaved=True)[0]
    e, o = normed[..., 0::2], normed[..., 1::2]
    torch.testing.assert_close(qi[..., 0::2], e * c - o * s)
    torch.testing.assert_close(qi[..., 1::2], e * s + o * c)
    assert kn.shape == k.shape
    with pytest.raises(ValueError, match="cos"):
        gptfast.rotary_qk_norm(q, k, cos[:3], sin)
