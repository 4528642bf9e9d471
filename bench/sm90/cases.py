"""The cases the sm_90 report compiles, one table per kernel set (attention, layernorm,
cross_entropy, rotary): each yields (case, shape, dtype, thunk), the thunk calling gptfast's own
launch wrapper on ``meta`` tensors of the benchmark shapes; plus the attention pruner's shared
memory estimators and how cases are grouped over worker processes."""

from __future__ import annotations


def _meta(*shape, dtype):
    import torch
    return torch.empty(*shape, dtype=dtype, device="meta")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def attention_cases(subset: str):
    """(case, shape, dtype, thunk): forward, and backward on both dQ paths, bf16, with q/k/v
    split from a fused (B, T, 3, H, D) projection as in the GPT model."""
    import torch
    from gptfast.kernels import attention as attn

    # GPT-2 small's 12 heads of 64 and a 16 x 128 model; T only picks the T_BUCKET key, so
    # both lengths share their compiled kernels (H's divisibility would not: it is kept).
    shapes = [(8, 12, 1024, 64), (1, 12, 8192, 64), (8, 16, 1024, 128), (1, 16, 8192, 128)]
    if subset == "full":
        shapes += [(4, 8, 1024, 256), (2, 16, 1000, 64)]  # the largest head dim; a ragged T
    dtype = torch.bfloat16
    for b, h, t, d in shapes:
        shape = f"B{b} H{h} T{t} D{d}"
        qkv = _meta(b, t, 3, h, d, dtype=dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        o = _meta(b, t, h, d, dtype=dtype).transpose(1, 2)
        lse2 = _meta(b, h, t, dtype=torch.float32)
        do = _meta(b, t, h, d, dtype=dtype).transpose(1, 2)
        scale = d ** -0.5
        yield ("attention fwd", shape, dtype,
               lambda q=q, k=k, v=v, s=scale: attn.attention_forward(q, k, v, s))
        for atomic in (False, True):
            yield (f"attention bwd {'atomic_dq' if atomic else 'deterministic'}", shape, dtype,
                   lambda q=q, k=k, v=v, o=o, lse2=lse2, do=do, s=scale, a=atomic:
                   attn._launch_backward(do, q, k, v, o, lse2, s, a))
        if t < 8192:
            continue
        # document + sliding-window masks (both flags: the largest masked variant)
        ids, window = _meta(b, t, dtype=torch.int64), 1024
        yield ("attention fwd documents+window", shape, dtype,
               lambda q=q, k=k, v=v, s=scale, i=ids: attn.attention_forward(q, k, v, s, i, window))
        for atomic in (False, True):
            yield (f"attention bwd {'atomic_dq' if atomic else 'deterministic'} documents+window",
                   shape, dtype,
                   lambda q=q, k=k, v=v, o=o, lse2=lse2, do=do, s=scale, a=atomic, i=ids:
                   attn._launch_backward(do, q, k, v, o, lse2, s, a, i, window))
        # bidirectional (causal=False): no window, and documents with (left, right) windows
        for name, i, w, right in (("bidirectional", None, None, None),
                                  ("bidirectional documents+windows", ids, window, window)):
            yield (f"attention fwd {name}", shape, dtype,
                   lambda q=q, k=k, v=v, s=scale, i=i, w=w, r=right:
                   attn.attention_forward(q, k, v, s, i, w, r))
            for atomic in (False, True):
                yield (f"attention bwd {'atomic_dq' if atomic else 'deterministic'} {name}",
                       shape, dtype,
                       lambda q=q, k=k, v=v, o=o, lse2=lse2, do=do, s=scale, a=atomic, i=i, w=w,
                       r=right: attn._launch_backward(do, q, k, v, o, lse2, s, a, i, w, r))


def layernorm_cases(subset: str):
    """layer_norm and add_layer_norm forward and backward (with dw, db) at the benchmark rows,
    and rms_norm / add_rms_norm (the same kernels, CENTER off) at the same rows."""
    import torch
    from gptfast.kernels import layernorm as ln

    shapes = [(65536, 768, torch.float32), (65536, 768, torch.bfloat16),
              (16384, 4096, torch.bfloat16), (8192, 8192, torch.bfloat16),
              (4096, 16384, torch.bfloat16), (2048, 32768, torch.bfloat16)]
    if subset == "full":
        shapes += [(16384, 4096, torch.float32), (8192, 8192, torch.float32),
                   (4096, 16384, torch.float32), (2048, 32768, torch.float32),
                   (4096, 50000, torch.bfloat16)]
    for n, c, dtype in shapes:
        shape = f"{n}x{c}"
        x = _meta(n, c, dtype=dtype)
        w, b = _meta(c, dtype=dtype), _meta(c, dtype=dtype)
        stats = _meta(n, dtype=torch.float32)
        for residual in (None, _meta(n, c, dtype=dtype)):
            op = "layer_norm" if residual is None else "add_layer_norm"
            yield (f"{op} fwd", shape, dtype,
                   lambda x=x, r=residual, w=w, b=b: ln._forward(x, r, w, b, 1e-5))
            ds = None if residual is None else x
            yield (f"{op} bwd", shape, dtype,
                   lambda x=x, w=w, b=b, st=stats, ds=ds, dt=dtype:
                   ln._backward(x, x, w, b, st, st, ds, dt, None, True, True))
        # RMSNorm: the same kernels with CENTER off, no bias; with a weight, and without one
        # (nanochat's norm) at the 768-wide rows
        for residual in (None, _meta(n, c, dtype=dtype)):
            op = "rms_norm" if residual is None else "add_rms_norm"
            ds = None if residual is None else x
            for weight in (w, None) if c == 768 else (w,):
                label = op if weight is not None else f"{op} no weight"
                yield (f"{label} fwd", shape, dtype,
                       lambda x=x, r=residual, w=weight: ln._forward(x, r, w, None, 1e-6, center=False))
                yield (f"{label} bwd", shape, dtype,
                       lambda x=x, w=weight, st=stats, ds=ds, dt=dtype:
                       ln._backward(x, x, w, None, None, st, ds, dt, None, True, False))


def cross_entropy_cases(subset: str):
    """The CE kernel's loss-only, loss+grad (one scale, and one scale per row) variants and
    the row-scaling kernel, at N=16384, V=50257; linear CE runs the same kernels on a
    (chunk rows, V) buffer, whose row stride is V as here."""
    import torch
    from gptfast.kernels import cross_entropy as ce

    shapes = [(16384, 50257, torch.bfloat16), (16384, 50257, torch.float32)]
    if subset == "full":
        shapes += [(16384, 50304, torch.bfloat16), (4096, 128256, torch.bfloat16)]
    for n, vocab, dtype in shapes:
        shape = f"N{n} V{vocab}"
        logits = _meta(n, vocab, dtype=dtype)
        target = _meta(n, dtype=torch.int64)
        loss = _meta(n, dtype=torch.float32)
        flag = _meta(1, dtype=torch.int32)
        one, per_row = _meta((), dtype=torch.float32), _meta(n, dtype=torch.float32)
        yield ("cross_entropy loss", shape, dtype, lambda lg=logits, t=target, l=loss, f=flag:
               ce._launch_cross_entropy(lg, t, l, None, None, f, -100, 0.0, 0.0))
        for scale, name in ((one, "mean/sum"), (per_row, "per-row")):
            yield (f"cross_entropy loss+grad {name}", shape, dtype,
                   lambda lg=logits, t=target, l=loss, f=flag, s=scale:
                   ce._launch_cross_entropy(lg, t, l, lg, s, f, -100, 0.1, 1e-4))
            yield (f"cross_entropy scale_rows {name}", shape, dtype,
                   lambda lg=logits, s=scale: ce._launch_scale_rows(lg, s))
        if dtype == torch.bfloat16 and vocab == 50257:
            # every option at once: softcap, class weights with smoothing, split z-loss term
            class_weight, z_term = _meta(vocab, dtype=torch.float32), _meta(n, dtype=torch.float32)
            yield ("cross_entropy loss+grad softcap+weight", shape, dtype,
                   lambda lg=logits, t=target, l=loss, f=flag, s=one, w=class_weight, z=z_term:
                   ce._launch_cross_entropy(lg, t, l, lg, s, f, -100, 0.1, 1e-4, class_weight=w,
                                            softcap=30.0, z_term=z, z_grad_scale=s))


def rotary_cases(subset: str):
    """rotary_qk_norm forward and backward at nanochat's shapes: q and k as views of one fused
    (B, T, (H + 2 Hkv) D) projection, rotate-half and interleaved pairs."""
    import torch
    from gptfast.kernels import rotary

    shapes = [(8, 2048, 10, 10, 128, torch.bfloat16), (16, 1024, 12, 12, 64, torch.bfloat16)]
    if subset == "full":
        shapes += [(4, 2048, 32, 8, 128, torch.bfloat16), (8, 2048, 10, 10, 128, torch.float32),
                   (4, 1024, 16, 16, 256, torch.bfloat16), (4, 1024, 8, 1, 96, torch.float16)]
    for b, t, h, hkv, d, dtype in shapes:
        shape = f"B{b} T{t} H{h} Hkv{hkv} D{d}"
        heads = _meta(b, t, h + 2 * hkv, d, dtype=dtype)
        q, k = heads[:, :, :h], heads[:, :, h:h + hkv]
        cos, sin = _meta(t, d // 2, dtype=dtype), _meta(t, d // 2, dtype=dtype)
        dqo, dko = _meta(b, t, h, d, dtype=dtype), _meta(b, t, hkv, d, dtype=dtype)
        for interleaved in (False, True):
            pairs = "interleaved" if interleaved else "rotate-half"
            yield (f"rotary_qk_norm fwd {pairs}", shape, dtype,
                   lambda q=q, k=k, c=cos, s=sin, i=interleaved:
                   rotary.rotary_qk_norm_forward(q, k, c, s, 1.2, None, i))
            yield (f"rotary_qk_norm bwd {pairs}", shape, dtype,
                   lambda q=q, k=k, c=cos, s=sin, i=interleaved, dq=dqo, dk=dko:
                   rotary.rotary_qk_norm_backward(dq, dk, q, k, c, s, 1.2, None, i, True, True))


def _attention_smem_estimators():
    from gptfast.kernels import attention as attn

    def estimator(kind):
        def estimate(constexprs, num_stages):
            return attn._smem_estimate(kind, constexprs["BLOCK_M"], constexprs["BLOCK_N"],
                                       num_stages, constexprs["BLOCK_D"], 2,
                                       bool(constexprs.get("ATOMIC_DQ", False)),
                                       bool(constexprs.get("TMA", False)),
                                       bool(constexprs.get("PERSISTENT", 0)))
        return estimate
    return {"_attn_fwd_kernel": estimator("fwd"), "_attn_bwd_dkdv_kernel": estimator("dkdv"),
            "_attn_bwd_dq_kernel": estimator("dq")}


KERNEL_SETS = {"attention": attention_cases, "layernorm": layernorm_cases,
               "cross_entropy": cross_entropy_cases, "rotary": rotary_cases}


def _cases(kernels, subset):
    """Every (kernel set, case, shape, dtype, thunk), in report order."""
    return [(name, *case) for name in kernels for case in KERNEL_SETS[name](subset)]


def _group(kernel_set: str, shape: str, dtype) -> str:
    """Cases that compile the same specialisations (attention at one head dim, any T) go to
    one worker, so no two workers compile the same kernel."""
    if kernel_set == "attention":
        return shape.split()[-1]
    return f"{kernel_set} {shape} {dtype}" if kernel_set == "layernorm" else kernel_set
