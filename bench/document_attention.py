"""Document-masked and sliding-window attention: gptfast's kernel against FlexAttention with
the same block mask, SDPA with a dense boolean mask, and gptfast's plain causal kernel.

    python -m gptfast.bench.document_attention [--seq 8192] [--head-dim 64] [--tokens 16384]
                                               [--doc-lens 256,2048] [--window 1024]

Cases at one T: documents of random lengths with the given means (the boundaries drawn
per row, seeded), each without a window and with ``--window``, and the window alone (one
document). Query i sees key j when j <= i, both lie in the same document, and i - j < window.

Work is counted exactly on the attended pairs: P = number of (b, i, j) the mask allows
(computed from the document ids in O(B T), checked against the dense mask in the tests),
fwd FLOPs = 4 P H D (QK^T and PV, 2 D each per pair), fwd+bwd = 3.5 x fwd, as the causal
benchmark counts. The plain causal kernel computes another function; it is counted on its
own pairs (B T (T+1) / 2) and is there for the wall time: the point of the mask is to skip
the work. Each provider reports TFLOP/s and milliseconds, forward and forward+backward.
A provider that cannot run (FlexAttention missing from this torch, out of memory) is a result
with its reason, never a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from .common import DTYPES, Measured, Meter, compiled, markdown_table, short_reason

DEFAULT_SEQ = 8192
DEFAULT_DOC_LENS = (256, 2048)
DEFAULT_WINDOW = 1024
PROVIDERS = ("gptfast", "FlexAttention", "SDPA dense mask", "gptfast causal")


@dataclasses.dataclass(frozen=True)
class Case:
    """A mask: documents of mean length ``doc_len`` (None: one document) and ``window``."""

    doc_len: Optional[int]
    window: Optional[int]

    @property
    def label(self) -> str:
        parts = [f"doc{self.doc_len}" if self.doc_len else "one doc"]
        if self.window:
            parts.append(f"window {self.window}")
        return " ".join(parts)


def heads_for(head_dim: int) -> int:
    """The causal benchmark's heads: 12 at hd64, 16 at hd128, width 2048 otherwise."""
    from .attention import heads_for as causal_heads_for

    return causal_heads_for(head_dim)


def default_cases(doc_lens=DEFAULT_DOC_LENS, window=DEFAULT_WINDOW) -> tuple:
    """Each document length without and with the window, then the window alone."""
    cases = [Case(d, w) for d in doc_lens for w in (None, window)]
    return tuple(cases + ([Case(None, window)] if window else []))


# ------------------------------------------------------------------------- the masks --

def random_document_ids(batch: int, seq: int, mean_len: Optional[int], seed: int = 0,
                        device="cpu") -> torch.Tensor:
    """(batch, seq) int64, non-decreasing ids from 0: each position after the first starts a
    new document with probability 1 / mean_len (geometric lengths of mean ``mean_len``, cut
    at the row's end). ``mean_len`` None: a single document."""
    if mean_len is None:
        return torch.zeros(batch, seq, dtype=torch.int64, device=device)
    if mean_len < 1:
        raise ValueError(f"mean document length must be >= 1, got {mean_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq, generator=generator) < 1.0 / mean_len
    starts[:, 0] = False
    return starts.to(torch.int64).cumsum(1).to(device)


def dense_mask(document_ids: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """(B, T, T) bool: query i attends key j (the rule in the module doc)."""
    seq = document_ids.shape[1]
    i = torch.arange(seq, device=document_ids.device)[:, None]
    j = torch.arange(seq, device=document_ids.device)[None, :]
    allowed = (j <= i) & (document_ids[:, :, None] == document_ids[:, None, :])
    if window is not None:
        allowed &= i - j < window
    return allowed


def attended_pairs(document_ids: torch.Tensor, window: Optional[int]) -> int:
    """Exactly ``dense_mask(document_ids, window).sum()``, in O(B T): query i sees
    min(i - start(i) + 1, window) keys, start(i) the first position of its document."""
    batch, seq = document_ids.shape
    ids = document_ids.to(torch.int64)
    positions = torch.arange(seq, device=ids.device).expand(batch, seq)
    new_doc = torch.ones_like(ids, dtype=torch.bool)
    new_doc[:, 1:] = ids[:, 1:] != ids[:, :-1]
    # the start of the current document: running max of the positions where one begins
    start = torch.where(new_doc, positions, torch.zeros_like(positions)).cummax(1).values
    seen = positions - start + 1
    if window is not None:
        seen = seen.clamp(max=window)
    return int(seen.sum())


def causal_pairs(batch: int, seq: int) -> int:
    return batch * seq * (seq + 1) // 2


def forward_flops(pairs: int, heads: int, head_dim: int) -> float:
    return 4.0 * pairs * heads * head_dim


# ------------------------------------------------------------------------- providers --

def flex_attention_missing() -> Optional[str]:
    """None when torch.nn.attention.flex_attention imports, else why not."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"FlexAttention unavailable in torch {torch.__version__}: {short_reason(err)}"
    return None


def _gptfast(document_ids, window):
    import gptfast

    def run(q, k, v):
        with gptfast.use_backend("triton"):
            return gptfast.causal_attention(q, k, v, document_ids=document_ids, window=window)
    return run


def _gptfast_causal(document_ids, window):
    import gptfast

    def run(q, k, v):
        with gptfast.use_backend("triton"):
            return gptfast.causal_attention(q, k, v)
    return run


def flex_block_mask(document_ids: torch.Tensor, window: Optional[int], device):
    """FlexAttention's BlockMask of the same rule (one per batch row, shared by the heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        return allowed

    batch, seq = document_ids.shape
    return create_block_mask(mask_mod, batch, None, seq, seq, device=str(device))


def _flex(document_ids, window):
    missing = flex_attention_missing()
    if missing:
        raise RuntimeError(missing)
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = flex_block_mask(document_ids, window, document_ids.device)
    flex = compiled(flex_attention, dynamic=False)

    def run(q, k, v):
        return flex(q, k, v, block_mask=block_mask)
    return run


def _sdpa_dense(document_ids, window):
    mask = dense_mask(document_ids, window)[:, None]  # (B, 1, T, T), broadcast over heads

    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return run


BUILDERS = {"gptfast": _gptfast, "FlexAttention": _flex, "SDPA dense mask": _sdpa_dense,
            "gptfast causal": _gptfast_causal}


def closures(attention, q, k, v, grad_out):
    """(forward, forward+backward); gradients by autograd.grad (no accumulation). The forward
    gets detached inputs (FlexAttention on a CPU refuses inputs that require grad)."""
    detached = tuple(t.detach() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            attention(*detached)

    def forward_backward():
        torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out)

    return forward, forward_backward


def bench_case(case: Case, seq: int, head_dim: int, heads: int, tokens: int, dtype,
               providers=PROVIDERS, device="cuda", meter: Optional[Meter] = None,
               seed: int = 0) -> list:
    """One dict per provider and direction ("fwd", "fwd+bwd"): the case, the pairs counted,
    ``ms`` and ``tflops`` (None unless ``status`` is "ok"; else ``error`` says why), the
    :class:`~.common.Measured` and, on the forward, the max |difference| of the output from
    that of the first provider whose forward ran (gptfast's, unless it failed)."""
    meter = meter or Meter(device)
    batch = max(1, tokens // seq)
    document_ids = random_document_ids(batch, seq, case.doc_len, seed, device)
    pairs = attended_pairs(document_ids, case.window)
    shape = (batch, heads, seq, head_dim)
    generator = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    results, first_out = [], None
    for name in providers:
        counted = causal_pairs(batch, seq) if name == "gptfast causal" else pairs
        flops = forward_flops(counted, heads, head_dim)
        common = {"provider": name, "case": case.label, "doc_len": case.doc_len,
                  "window": case.window, "B": batch, "H": heads, "T": seq, "D": head_dim,
                  "pairs": counted, "pairs_fraction": counted / causal_pairs(batch, seq)}
        try:
            attention = BUILDERS[name](document_ids, case.window)
        except Exception as err:  # e.g. FlexAttention missing: a result, not a crash
            results += [{**common, "direction": d, "status": "unavailable", "ms": None,
                         "tflops": None, "error": short_reason(err)} for d in ("fwd", "fwd+bwd")]
            continue
        forward, forward_backward = closures(attention, q, k, v, grad_out)
        if name == "FlexAttention" and not meter.cuda:
            measured = {"fwd+bwd": Measured(status="unavailable",
                                            error="FlexAttention has no backward on a CPU")}
        else:
            measured = {"fwd+bwd": meter.measure(forward_backward)}  # first: compiles both ways
        # the forward alone is timed even when the backward failed, unless memory ran out
        measured["fwd"] = meter.measure(forward) if measured["fwd+bwd"].status != "oom" \
            else measured["fwd+bwd"]
        for direction in ("fwd", "fwd+bwd"):
            m = measured[direction]
            work = flops * (3.5 if direction == "fwd+bwd" else 1.0)
            entry = {**common, "direction": direction, "status": m.status, "error": m.error,
                     "ms": m.ms, "tflops": None if m.ms is None else work / m.ms / 1e9,
                     "measured": m}
            if direction == "fwd" and m.status == "ok" and name != "gptfast causal":
                with torch.no_grad():
                    out = attention(q.detach(), k.detach(), v.detach()).float()
                if first_out is None:
                    first_out = out
                else:
                    entry["max_abs_diff"] = (out - first_out).abs().max().item()
            results.append(entry)
    return results


# ------------------------------------------------------------------------------- CLI --

def _ints(text: str) -> tuple:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.document_attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=DEFAULT_SEQ, help="context length T")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=16384, help="B * T per call")
    parser.add_argument("--doc-lens", type=_ints, default=DEFAULT_DOC_LENS,
                        help="mean document lengths (comma-separated)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="0: no window cases")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: this benchmark times GPU kernels. On a CPU run the unit tests "
              "(tests/test_bench.py) or `gptfast bench --suite headline --dry-run`.")
        missing = flex_attention_missing()
        print(missing or f"FlexAttention imports (torch {torch.__version__}).")
        return 0
    columns = ["case", "provider", "direction", "pairs_fraction", "ms", "tflops", "max_abs_diff",
               "status"]
    for case in default_cases(args.doc_lens, args.window or None):
        rows = bench_case(case, args.seq, args.head_dim, args.heads, args.tokens,
                          DTYPES[args.dtype])
        print(markdown_table(rows, columns))
        for r in rows:
            if r.get("error"):
                print(f"- {r['provider']} {r['direction']}: {r['error']}")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
