"""GPTConfig, the model's architecture: nanoGPT's fields, today's choices (nanochat,
modded-nanogpt) each defaulting to GPT-2's, their checks, and the named presets (GPT-2's four
sizes, nanochat's depths). :mod:`gptfast.model` re-exports every public name here."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

ATTENTION_KINDS = ("causal", "document")

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
MLP_ACTIVATIONS = ("gelu", "relu2")

# (n_layer, n_head, n_embd) of the four GPT-2 sizes
_PRESETS = {
    "gpt2": (12, 12, 768),          # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),   # 774M
    "gpt2-xl": (48, 25, 1600),      # 1558M
}

# nanochat's depth-d models (karpathy/nanochat at 92d63d4, scripts/base_train.py and
# nanochat/gpt.py): n_embd = 64 * d rounded up to a multiple of the head dim 128
# (--aspect-ratio 64, --head-dim 128), n_head = n_embd / 128, n_kv_head = n_head,
# sequence_len 2048 (--max-seq-len), vocab 32768 (scripts/tok_train.py, 2**15),
# window_pattern "SSSL" with the last layer always long, rotary base 100000, q and k
# RMS-normed and scaled by 1.2, ReLU^2 MLP, untied head, no biases, softcap 15, RMSNorm
# after the embedding. Not modelled here: its value embeddings, smear, backout and the
# per-layer residual scalars (resid_lambdas, x0_lambdas).
_NANOCHAT_DEPTHS = {"nanochat-d12": 12, "nanochat-d20": 20, "nanochat-d26": 26}
NANOCHAT_HEAD_DIM = 128


def _nanochat_fields(depth: int) -> dict:
    n_embd = -(-depth * 64 // NANOCHAT_HEAD_DIM) * NANOCHAT_HEAD_DIM
    return dict(block_size=2048, vocab_size=32768, n_layer=depth, n_head=n_embd // NANOCHAT_HEAD_DIM,
                n_embd=n_embd, bias=False, norm="rmsnorm", position="rotary", rotary_base=100000.0,
                mlp="relu2", qk_norm=True, qk_scale=1.2, tie_embeddings=False,
                window_pattern="SSSL", logit_softcap=15.0, embedding_norm=True)


PRESET_NAMES = (*_PRESETS, *_NANOCHAT_DEPTHS)

# GPTConfig fields beyond GPT-2's block, with the value that keeps GPT-2's choice
MODERN_DEFAULTS = dict(norm="layernorm", position="learned", rotary_base=10000.0, mlp="gelu",
                       qk_norm=False, qk_scale=1.0, tie_embeddings=True, n_kv_head=None,
                       window_pattern=None, short_window=None, logit_softcap=None,
                       embedding_norm=False)


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GPTConfig.{name} must be {'None or ' if allow_none else ''}a positive "
                         f"int, got {value!r}")


def _positive_number(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"GPTConfig.{name} must be {'None or ' if allow_none else ''}a finite "
                         f"number > 0, got {value!r}")


@dataclasses.dataclass
class GPTConfig:
    """nanoGPT's GPTConfig. The default vocab_size 50304 is GPT-2's 50257 padded up to a
    multiple of 64 (faster matmuls); the presets use 50257, the vocabulary of the released
    GPT-2 weights.

    Attention masks (``gptfast.causal_attention``): ``attention="causal"`` lets every token
    see all earlier ones (nanoGPT); ``"document"`` keeps each token within its document, the
    model deriving document ids from its input tokens: a new document begins at each
    ``eot_token`` (GPT-2's ``<|endoftext|>``, 50256), which is the first input of the document
    it precedes. ``window`` (int >= 1) further limits each token to the last ``window``
    positions, itself included.

    Today's choices (nanochat, modded-nanogpt), each defaulting to GPT-2's:
    ``norm`` "layernorm" or "rmsnorm" (parameter-free, as nanochat); ``position`` "learned"
    or "rotary" (``rotary_base``); ``mlp`` "gelu" (tanh) or "relu2" (ReLU squared);
    ``qk_norm`` RMS-normalises q and k per head, times ``qk_scale``; ``tie_embeddings``;
    ``n_kv_head`` (grouped-query attention, None = n_head); ``window_pattern`` a string of
    S/L tiled over the layers, the last layer always L: S layers see ``short_window`` earlier
    tokens (flash-attention's window_left; None: nanochat's rule, a quarter of block_size
    rounded up to a multiple of 128), L layers ``window`` (None: all); ``logit_softcap`` c
    gives logits c * tanh(logits / c); ``embedding_norm`` normalises the embeddings before
    the first block. Any of them away from GPT-2's value makes ``GPT(config)`` the modern
    model of :mod:`gptfast.model_modern`.
    """

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attention: str = "causal"
    window: Optional[int] = None
    eot_token: int = 50256
    norm: str = "layernorm"
    position: str = "learned"
    rotary_base: float = 10000.0
    mlp: str = "gelu"
    qk_norm: bool = False
    qk_scale: float = 1.0
    tie_embeddings: bool = True
    n_kv_head: Optional[int] = None
    window_pattern: Optional[str] = None
    short_window: Optional[int] = None
    logit_softcap: Optional[float] = None
    embedding_norm: bool = False

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be True or False, got {self.bias!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"GPTConfig.attention must be one of {ATTENTION_KINDS}, "
                             f"got {self.attention!r}")
        if self.window is not None and (isinstance(self.window, bool)
                                        or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"GPTConfig.window must be None or an int >= 1, got {self.window!r}")
        if isinstance(self.eot_token, bool) or not isinstance(self.eot_token, int) \
                or self.eot_token < 0:
            raise ValueError(f"GPTConfig.eot_token must be an int >= 0, got {self.eot_token!r}")
        if self.attention == "document" and self.eot_token >= self.vocab_size:
            raise ValueError(f"GPTConfig.eot_token ({self.eot_token}) must be a token id below "
                             f"vocab_size ({self.vocab_size}) when attention='document'")
        self._check_modern()

    def _check_modern(self):
        for name, value, choices in (("norm", self.norm, NORMS), ("position", self.position, POSITIONS),
                                     ("mlp", self.mlp, MLP_ACTIVATIONS)):
            if value not in choices:
                raise ValueError(f"GPTConfig.{name} must be one of {choices}, got {value!r}")
        for name in ("qk_norm", "tie_embeddings", "embedding_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        _positive_number("rotary_base", self.rotary_base)
        _positive_number("qk_scale", self.qk_scale)
        _positive_number("logit_softcap", self.logit_softcap, allow_none=True)
        _positive_int("n_kv_head", self.n_kv_head, allow_none=True)
        _positive_int("short_window", self.short_window, allow_none=True)
        if self.qk_scale != 1.0 and not self.qk_norm:
            raise ValueError("GPTConfig.qk_scale scales the normalised q and k: it needs qk_norm=True")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.kv_heads})")
        if self.position == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: rotary positions need an even head dim, got "
                             f"{self.n_embd // self.n_head}")
        pattern = self.window_pattern
        if pattern is not None and (not isinstance(pattern, str) or not pattern
                                    or set(pattern.upper()) - set("SL")):
            raise ValueError(f"GPTConfig.window_pattern must be None or a string of S and L, got "
                             f"{pattern!r}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def is_modern(self) -> bool:
        """Whether any of today's choices differs from GPT-2's (then GPT builds the modern model)."""
        return any(getattr(self, name) != value for name, value in MODERN_DEFAULTS.items()
                   if name not in ("n_kv_head", "rotary_base", "short_window")) \
            or self.kv_heads != self.n_head

    @property
    def short_window_size(self) -> int:
        """Earlier tokens an S layer sees: short_window, or nanochat's rule for None (a quarter
        of block_size rounded up to a multiple of 128, FA3's key tile: 512 at 2048)."""
        if self.short_window is not None:
            return self.short_window
        return -(-self.block_size // 4 // 128) * 128

    def layer_windows(self) -> list:
        """The attention window of each layer (``gptfast.causal_attention``'s: query i sees keys
        i - w < j <= i; None = unlimited): ``window`` everywhere without a window_pattern."""
        if self.window_pattern is None:
            return [self.window] * self.n_layer
        short = self.short_window_size
        pattern = self.window_pattern.upper()
        kinds = [pattern[i % len(pattern)] for i in range(self.n_layer)]
        kinds[-1] = "L"
        # short_window counts the earlier keys (window_left); causal_attention's counts itself too
        return [short + 1 if kind == "S" else self.window for kind in kinds]

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named architecture with any field overridden, e.g. ``vocab_size=50304``:
        - "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl": the GPT-2 sizes (block_size 1024,
          vocab_size 50257, bias);
        - "nanochat-d12", "nanochat-d20", "nanochat-d26": nanochat's depth-d models (see
          ``_nanochat_fields``: n_embd 768/1280/1664, head dim 128, block_size 2048, vocab 32768,
          rotary, RMSNorm, QK-norm, ReLU^2, untied, "SSSL" windows, softcap 15).
        """
        if name in _NANOCHAT_DEPTHS:
            return cls(**{**_nanochat_fields(_NANOCHAT_DEPTHS[name]), **overrides})
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        n_layer, n_head, n_embd = _PRESETS[name]
        fields = dict(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, bias=True)
        return cls(**{**fields, **overrides})
