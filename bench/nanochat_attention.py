"""nanochat's attention shapes: gptfast against what nanochat runs, and against its peers.

    python -m gptfast.bench.nanochat_attention [--dtype bf16]

nanochat calls ``flash_attn_func(q, k, v, causal=True, window_size=(w, 0))`` on (B, T, H, D)
bf16 tensors, with w = 768 in its short-window layers (a quarter of T=2048 rounded up to 128)
and w = 2048 in its long ones; FA counts w in keys before the query, so a query sees w + 1
keys. The cases, at nanochat's B=16 T=2048 H=10 D=128:

- ``window 768`` and ``window 2048`` (the long layers: as wide as the context, plain causal);
- ``varlen doc2048``: one row of T=8192 tokens packed with documents of seeded random lengths
  (uniform on 1..4095, mean 2048) given as int32 ``cu_seqlens``, causal within each document, as
  ``flash_attn_varlen_func`` takes them (modded-nanogpt's call).

Providers, all fed the same (B, T, H, D) tensors:

- ``gptfast``: :func:`_ours`, our op on (B, H, T, D) views;
- ``SDPA nanochat fallback``: what nanochat's ``flash_attention.py`` runs without FA3 (Blackwell,
  consumer GPUs, fp16): ``is_causal=True`` when the window covers the context, otherwise an
  explicit boolean (T, T) mask; the documents get an explicit mask as well;
- ``FlexAttention``: compiled (``torch.compile(flex_attention)``, as its docs require) with a
  block mask of the same rule;
- ``FA2`` (``flash_attn``) and ``FA3`` (a top-level ``flash_attn_interface``, else Hugging Face's
  ``kernels-community/flash-attn3`` when it is already in the local hub cache: nothing is
  downloaded), each an ``unavailable`` result with the reason when it does not load.

Work is counted on the visible pairs only: P = number of (b, i, j) the mask allows, fwd FLOPs =
4 P H D, fwd+bwd = 3.5 x fwd (as bench/document_attention.py counts). Each provider reports
ms, TFLOP/s and extra peak memory, forward and forward+backward, and how far its output and
gradients are from ``gptfast.reference.attention`` in fp32 on upcast inputs. Out of memory, a
failure or a missing peer is a result, never a crash. Without CUDA the same code runs tiny
cases (:data:`CPU_CASES`, fp32) so that ``gptfast bench`` always works.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from .common import COMPILE_BACKEND_ENV, DTYPES, Measured, Meter, compile_backend, \
    markdown_table, relative_error, short_reason
from .document_attention import attended_pairs, closures, forward_flops

PROVIDERS = ("gptfast", "SDPA nanochat fallback", "FlexAttention", "FA2", "FA3")
PEERS = PROVIDERS[1:]
HUB_FA3 = "kernels-community/flash-attn3"
HUB_FA3_VERSION = 1
CHECKED = ("out", "dq", "dk", "dv")


@dataclasses.dataclass(frozen=True)
class Case:
    """(B, T, H, D) q, k, v; FA's ``window_left`` (-1: unlimited); documents of mean length
    ``doc_mean`` packed in each row (None: one document per row)."""

    batch: int
    seq: int
    heads: int
    head_dim: int
    window_left: int = -1
    doc_mean: Optional[int] = None

    @property
    def label(self) -> str:
        if self.doc_mean is not None:
            mask = f"varlen doc{self.doc_mean}"
            return mask + (f" window {self.window_left}" if self.window_left >= 0 else "")
        return f"window {self.window_left}" if self.window_left >= 0 else "causal"

    @property
    def shape(self) -> str:
        return f"B{self.batch} T{self.seq} H{self.heads} D{self.head_dim} {self.label}"


GPU_CASES = (Case(16, 2048, 10, 128, 768), Case(16, 2048, 10, 128, 2048),
             Case(1, 8192, 10, 128, -1, 2048))
# the same three kinds at shapes the Triton interpreter and a small CPU get through in seconds
CPU_CASES = (Case(1, 64, 2, 16, 24), Case(1, 64, 2, 16, 64), Case(1, 96, 2, 16, -1, 24))


class Unavailable(RuntimeError):
    """A provider that cannot run here (not installed, no CUDA): a result, not a failure."""


# ------------------------------------------------------------------------ the masks --

def random_cu_seqlens(total: int, mean_len: int, seed: int = 0) -> torch.Tensor:
    """int32 [0, ..., total]: cumulative lengths of documents packed in one row of ``total``
    tokens, the lengths drawn (seeded) uniformly from 1 .. 2 * mean_len - 1 (mean ``mean_len``;
    a geometric draw, as bench/document_attention.py makes, spreads so much that the few
    documents of one 8192-token row can average half the asked mean), the last one cut at the
    end of the row."""
    if mean_len < 1:
        raise ValueError(f"mean_len must be >= 1, got {mean_len}")
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 2 * mean_len, (total,), generator=generator)
    ends = lengths.cumsum(0)  # total draws of >= 1 each: the last end >= total
    count = int(torch.searchsorted(ends, torch.tensor(total))) + 1
    ends = ends[:count].clamp(max=total)
    return torch.cat([torch.zeros(1, dtype=torch.int64), ends]).to(torch.int32)


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """(batch, seq) int64 document ids of the ``batch * seq`` packed tokens (documents must not
    cross a row boundary, which :func:`case_documents` guarantees)."""
    positions = torch.arange(batch * seq, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)
    ids = ids.view(batch, seq)
    return ids - ids[:, :1]  # each row numbers its documents from 0


def case_documents(case: Case, seed: int = 0, device="cpu"):
    """(cu_seqlens int32 over all B*T tokens, document ids (B, T)) of a varlen case, each row
    drawn on its own (seed + row); (None, None) without documents."""
    if case.doc_mean is None:
        return None, None
    pieces, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for row_index in range(case.batch):
        cu = random_cu_seqlens(case.seq, case.doc_mean, seed + row_index)
        pieces.append(cu[1:] + offset)
        offset += case.seq
    cu_seqlens = torch.cat(pieces).to(device)
    return cu_seqlens, document_ids_from_cu_seqlens(cu_seqlens, case.batch, case.seq)


def visible_pairs(case: Case, document_ids: Optional[torch.Tensor]) -> int:
    """The (b, i, j) the mask allows: query i sees keys i - window_left .. i of its document."""
    ids = document_ids if document_ids is not None else torch.zeros(case.batch, case.seq,
                                                                    dtype=torch.int64)
    return attended_pairs(ids.cpu(), None if case.window_left < 0 else case.window_left + 1)


def nanochat_sdpa_mask(seq_q: int, seq_k: int, window: int, device) -> torch.Tensor:
    """The (Tq, Tk) bool mask nanochat's SDPA fallback builds (True = attend): causal aligned to
    the bottom right, and ``row - col <= window`` when 0 <= window < Tk."""
    row = (seq_k - seq_q) + torch.arange(seq_q, device=device)[:, None]
    col = torch.arange(seq_k, device=device)[None, :]
    mask = col <= row
    if 0 <= window < seq_k:
        mask = mask & ((row - col) <= window)
    return mask


# ------------------------------------------------------------------------ providers --

def _ours(q, k, v, window_left, cu_seqlens=None, max_seqlen=None):
    """gptfast on (B, T, H, D) tensors, nanochat's layout, through its flash-attention API:
    ``flash_attn_func(causal=True, window_size=(window_left, 0))``, or with documents
    ``flash_attn_varlen_func`` on the B*T packed tokens with their cu_seqlens."""
    from gptfast import flash_attn_interface as flash_attn

    window = (window_left, 0)
    if cu_seqlens is None:
        return flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window)
    packed = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]  # cu_seqlens spans all B*T
    out = flash_attn.flash_attn_varlen_func(*packed, cu_seqlens, cu_seqlens, max_seqlen,
                                            max_seqlen, causal=True, window_size=window)
    return out.view(q.shape)


def _ours_backend(device: torch.device) -> str:
    """The Triton kernels where they run (CUDA, or the interpreter on a CPU); else "auto",
    which is the reference ops on a CPU (the quick variant of ``gptfast bench`` there)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return "triton" if device.type == "cuda" or interpreted else "auto"


def _build_ours(case, document_ids, cu_seqlens, device):
    import gptfast

    backend = _ours_backend(device)
    max_seqlen = None if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

    def run(q, k, v):
        with gptfast.use_backend(backend):
            return _ours(q, k, v, case.window_left, cu_seqlens, max_seqlen)
    run.note = None if backend == "triton" else \
        "reference backend (no CUDA and no TRITON_INTERPRET=1: the Triton kernels cannot run)"
    return run


def _build_sdpa(case, document_ids, cu_seqlens, device):
    seq, window = case.seq, case.window_left
    covers = window < 0 or window >= seq  # nanochat: full context, same length -> is_causal
    doc_mask = None
    if document_ids is not None:  # nanochat has no documents: the same explicit mask, once
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]
        doc_mask = (nanochat_sdpa_mask(seq, seq, window, device) & same_doc)[:, None]

    def run(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if doc_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask)
        elif covers:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # built in every call, as nanochat's _sdpa_attention does
            mask = nanochat_sdpa_mask(q.shape[2], k.shape[2], window, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2)
    if doc_mask is not None:
        run.note = f"explicit bool mask {tuple(doc_mask.shape)} (documents), built once"
    else:
        run.note = ("is_causal=True (the window covers the context)" if covers else
                    f"explicit bool mask ({seq}, {seq}) built in each call, as nanochat does")
    return run


def flex_missing() -> Optional[str]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as err:
        return f"FlexAttention unavailable in torch {torch.__version__}: {short_reason(err)}"
    return None


def _flex_backend(device: torch.device) -> str:
    # inductor's CPU code generation takes 30+ s per graph; a CPU run traces with aot_eager
    if device.type == "cuda":
        return compile_backend()
    return os.environ.get(COMPILE_BACKEND_ENV, "aot_eager")


def _build_flex(case, document_ids, cu_seqlens, device):
    missing = flex_missing()
    if missing:
        raise Unavailable(missing)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    left, docs = case.window_left, document_ids

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if left >= 0:
            allowed = allowed & (q_idx - kv_idx <= left)
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        return allowed

    block_mask = create_block_mask(mask_mod, case.batch if docs is not None else None, None,
                                   case.seq, case.seq, device=str(device))
    flex = torch.compile(flex_attention, backend=_flex_backend(device), dynamic=False)

    def run(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   block_mask=block_mask)
        return out.transpose(1, 2)
    run.note = f"compiled with {_flex_backend(device)}"
    return run


def _first_output(result):
    # FA3 builds have returned (out, softmax_lse) from the plain call; FA2 returns out
    return result[0] if isinstance(result, (tuple, list)) else result


def _fa_runner(module, case, cu_seqlens, note):
    window = (case.window_left, 0)
    if cu_seqlens is None:
        def run(q, k, v):
            return _first_output(module.flash_attn_func(q, k, v, causal=True,
                                                        window_size=window))
    else:
        total, heads, dim = case.batch * case.seq, case.heads, case.head_dim
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # once, not per call

        def run(q, k, v):
            out = module.flash_attn_varlen_func(
                q.reshape(total, heads, dim), k.reshape(total, heads, dim),
                v.reshape(total, heads, dim), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                causal=True, window_size=window)
            return _first_output(out).view(case.batch, case.seq, heads, dim)
    run.note = note
    return run


def _needs_cuda(name, device):
    if device.type != "cuda":
        raise Unavailable(f"{name} runs on CUDA only (this run is on {device.type})")


def _build_fa2(case, document_ids, cu_seqlens, device):
    try:
        import flash_attn
    except Exception as err:  # ImportError, or a build against another torch
        raise Unavailable(f"flash_attn does not import: {short_reason(err)}") from None
    _needs_cuda("FA2", device)
    return _fa_runner(flash_attn, case, cu_seqlens, f"flash_attn {flash_attn.__version__}")


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face hub calls inside answer from the local cache only (no download)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_fa3():
    """(module with flash_attn_func / flash_attn_varlen_func, where it came from); raises
    Unavailable with every reason when neither source loads. Never downloads."""
    reasons = []
    try:
        import flash_attn_interface

        return flash_attn_interface, "flash_attn_interface (top level)"
    except Exception as err:
        reasons.append(f"flash_attn_interface does not import ({short_reason(err)})")
    try:
        import kernels

        if not hasattr(kernels, "get_kernel"):  # the repository's own kernels/ folder, say
            raise ImportError(f"'kernels' at {getattr(kernels, '__file__', '?')} is not "
                              "Hugging Face's kernels package")
        with _hub_offline():
            hub = kernels.get_kernel(HUB_FA3, version=HUB_FA3_VERSION)
        module = getattr(hub, "flash_attn_interface", hub)
        return module, f"{HUB_FA3} (hub cache)"
    except Exception as err:
        reasons.append(f"{HUB_FA3} not loadable without a download ({short_reason(err)})")
    raise Unavailable("; ".join(reasons))


def _build_fa3(case, document_ids, cu_seqlens, device):
    _needs_cuda("FA3", device)  # before the hub is asked anything
    module, source = load_fa3()
    return _fa_runner(module, case, cu_seqlens, source)


BUILDERS = {"gptfast": _build_ours, "SDPA nanochat fallback": _build_sdpa,
            "FlexAttention": _build_flex, "FA2": _build_fa2, "FA3": _build_fa3}


# ---------------------------------------------------------------------- measuring --

def make_inputs(case: Case, dtype, device, seed: int = 0):
    """q, k, v (B, T, H, D) requiring grad, and the output gradient."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator)
               .requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(shape, device=device, dtype=dtype, generator=generator)


def reference_outputs(case, q, k, v, grad_out, document_ids) -> dict:
    """out, dq, dk, dv of ``gptfast.reference.attention`` in fp32 on upcast copies."""
    from gptfast import reference

    inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = reference.attention(*(t.transpose(1, 2) for t in inputs), causal=True,
                              window_left=case.window_left,
                              document_ids=document_ids).transpose(1, 2)
    grads = torch.autograd.grad(out, inputs, grad_out.float())
    return dict(zip(CHECKED, [out.detach(), *grads]))


def check_outputs(attention, q, k, v, grad_out, expected: dict, backward: bool) -> dict:
    """{name: (rel_err, max_abs_err)} of one provider's output (and gradients)."""
    if backward:
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        values = [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]
    else:
        with torch.no_grad():
            values = [attention(q.detach(), k.detach(), v.detach())]
    return {name: relative_error(value, expected[name])
            for name, value in zip(CHECKED, values)}


def bench_case(case: Case, dtype, providers=PROVIDERS, device="cuda",
               meter: Optional[Meter] = None, seed: int = 0, check: bool = True) -> list:
    """One dict per provider and direction ("fwd", "fwd+bwd"): status ("ok", "oom", "error",
    "unavailable"), ``error`` (why not ok), ``ms``, ``tflops`` on the visible pairs,
    ``extra_mb`` (peak beyond the inputs; None on a CPU), the :class:`~.common.Measured`, and
    with ``check`` ``errors`` = {"out"/"dq"/"dk"/"dv": (rel_err, max_abs_err)} against the
    fp32 reference (the gradients on the fwd+bwd entry)."""
    device = torch.device(device)
    meter = meter or Meter(device)
    cu_seqlens, document_ids = case_documents(case, seed, device)
    pairs = visible_pairs(case, document_ids)
    flops = forward_flops(pairs, case.heads, case.head_dim)
    q, k, v, grad_out = make_inputs(case, dtype, device, seed)
    expected, no_check = None, None
    if check:
        try:  # the fp32 reference holds B H T T scores: it may not fit where the kernels do
            expected = reference_outputs(case, q, k, v, grad_out, document_ids)
        except Exception as err:
            no_check = {"error": f"no fp32 reference to check against: {short_reason(err)}"}
        meter.empty_cache()
    results = []
    for name in providers:
        common = {"provider": name, "case": case.label, "shape": case.shape, "B": case.batch,
                  "T": case.seq, "H": case.heads, "D": case.head_dim,
                  "window_left": case.window_left, "doc_mean": case.doc_mean, "pairs": pairs,
                  "documents": None if cu_seqlens is None else len(cu_seqlens) - 1}
        try:
            attention = BUILDERS[name](case, document_ids, cu_seqlens, device)
        except Exception as err:
            status = "unavailable" if isinstance(err, Unavailable) else "error"
            results += [{**common, "direction": d, "status": status, "ms": None, "tflops": None,
                         "extra_mb": None, "error": str(err) if status == "unavailable"
                         else short_reason(err)} for d in ("fwd", "fwd+bwd")]
            continue
        forward, forward_backward = closures(attention, q, k, v, grad_out)
        if name == "FlexAttention" and device.type != "cuda":
            measured = {"fwd+bwd": Measured(status="unavailable",
                                            error="FlexAttention has no backward on a CPU")}
        else:  # first: its first call compiles / autotunes both directions
            measured = {"fwd+bwd": meter.measure(forward_backward, memory=meter.cuda)}
        measured["fwd"] = (meter.measure(forward, memory=meter.cuda)
                           if measured["fwd+bwd"].status != "oom" else measured["fwd+bwd"])
        for direction in ("fwd", "fwd+bwd"):
            m = measured[direction]
            work = flops * (3.5 if direction == "fwd+bwd" else 1.0)
            entry = {**common, "direction": direction, "status": m.status, "error": m.error,
                     "ms": m.ms, "tflops": None if m.ms is None else work / m.ms / 1e9,
                     "extra_mb": m.extra_mb, "measured": m, "note": attention.note}
            if check and m.status == "ok":
                entry["errors"] = no_check or _check(attention, q, k, v, grad_out, expected,
                                                     direction)
            results.append(entry)
    return results


def _check(attention, q, k, v, grad_out, expected, direction) -> dict:
    try:
        errors = check_outputs(attention, q, k, v, grad_out, expected,
                               backward=direction == "fwd+bwd")
    except Exception as err:  # the check failing is a result of the check
        return {"error": short_reason(err)}
    return errors if direction == "fwd" else {n: e for n, e in errors.items() if n != "out"}


def cases_for(device) -> tuple:
    return GPU_CASES if torch.device(device).type == "cuda" else CPU_CASES


# ------------------------------------------------------------------------------ CLI --

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.nanochat_attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bf16 on CUDA, fp32 on a CPU")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type != "cuda":
        print("No CUDA device: the tiny CPU cases (timings say nothing about a GPU).\n")
    columns = ["provider", "direction", "status", "ms", "tflops", "extra_mb", "out rel_err"]
    for case in cases_for(device):
        rows = bench_case(case, dtype, device=device,
                          meter=Meter(device, *((25, 100) if device.type == "cuda" else (0, 30))))
        print(f"## {case.shape}, {rows[0]['pairs']} visible pairs\n")
        table = [{**r, "out rel_err": (r.get("errors") or {}).get("out", (None,))[0]}
                 for r in rows]
        print(markdown_table(table, columns))
        for r in rows:
            if r.get("error") or r.get("note"):
                print(f"- {r['provider']} {r['direction']}: {r.get('error') or r['note']}")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
