"""Cross-entropy and fused linear + cross-entropy: gptfast against eager, torch.compile and Liger.

    python -m gptfast.bench.cross_entropy [--rows 8192,16384,32768] [--vocab 50257]
                                          [--linear-rows 16384,32768] [--hidden 768] [--dtype bf16]

Each cell is "forward+backward ms / extra peak MB": the median time of one loss and its
backward, and the memory it allocated at its peak beyond what existed before (inputs and,
for cross_entropy, the logits; the gradients it produces count as extra), all in one run.
cross_entropy providers: gptfast (gradient written into the logits, as when they come from
lm_head; here with ``logits_policy("overwrite")`` because the benchmark's logits are a leaf),
eager with the fp32 upcast nanoGPT gets under autocast, eager in the logits' dtype,
torch.compile of the upcast version, Liger (when liger_kernel imports). linear providers:
gptfast, eager (x @ W.T, upcast, CE), torch.compile of it, Liger's fused linear CE. The last
column is |loss - eager fp32 loss| on the same inputs. OOM is a result, not a crash. Without
CUDA it says so and runs a tiny check of the kernels through the Triton interpreter.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from gptfast.bench.common import DTYPES, Meter, compiled, markdown_table, parse_ints

IGNORE_EVERY = 50  # every 50th target is ignore_index, as padding would be


def _liger(name):
    """A Liger loss module class by name, or None when liger_kernel does not import."""
    try:
        import liger_kernel.transformers as liger
    except Exception:
        return None
    return getattr(liger, name, None)


# --------------------------------------------------------------------------- providers --

def cross_entropy_providers():
    """name -> loss(logits, target); every loss upcasts or keeps fp32 statistics."""
    import gptfast
    from gptfast.kernels import cross_entropy as kernel

    def ours(logits, target):
        with gptfast.use_backend("triton"), kernel.logits_policy("overwrite"):
            return gptfast.cross_entropy(logits, target)

    def eager_upcast(logits, target):
        return F.cross_entropy(logits.float(), target)

    def eager_native(logits, target):
        return F.cross_entropy(logits, target)

    providers = {"gptfast": ours, "eager fp32 upcast": eager_upcast, "eager native": eager_native,
                 "torch.compile": compiled(eager_upcast, dynamic=False)}
    liger = _liger("LigerCrossEntropyLoss")
    if liger is not None:
        providers["Liger"] = liger()
    return providers


def softcapped(logits, softcap=None):
    """fp32 logits, capped as nanochat caps them: softcap * tanh(logits / softcap)."""
    logits = logits.float()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def linear_providers(softcap=None):
    """name -> loss(x, weight, target) of cross_entropy(softcapped(x @ weight.T), target)."""
    import gptfast

    def ours(x, weight, target):
        with gptfast.use_backend("triton"):
            return gptfast.linear_cross_entropy(x, weight, target, softcap=softcap)

    def eager(x, weight, target):
        return F.cross_entropy(softcapped(x @ weight.t(), softcap), target)

    providers = {"gptfast": ours, "eager": eager, "torch.compile": compiled(eager, dynamic=False)}
    liger = None if softcap is not None else _liger("LigerFusedLinearCrossEntropyLoss")
    if liger is not None:
        module = liger()
        providers["Liger"] = lambda x, weight, target: module(weight, x, target)
    return providers


# --------------------------------------------------------------------------- measuring --

def measure(step, reset, meter):
    """('ms / MB' or OOM / n/a, the failure's reason, the Measured) of step(); reset() between
    runs drops the gradients."""
    measured = meter.measure(step, reset, memory=True)
    if measured.status == "oom":
        return "OOM", None, measured
    if measured.status != "ok":  # a provider that cannot run this case is a result
        return "n/a", measured.error, measured
    extra = "-" if measured.extra_mb is None else f"{measured.extra_mb:.1f}"
    return f"{measured.ms:.2f} / {extra}", None, measured


def _target(rows, vocab, device):
    target = torch.randint(0, vocab, (rows,), device=device)
    target[::IGNORE_EVERY] = -100
    return target


def _loss_gap(loss_fn, inputs, expected):
    """|loss - expected| on fresh inputs, or None when the provider fails there."""
    try:
        with torch.no_grad():
            return f"{abs(float(loss_fn(*inputs)) - expected):.1e}"
    except Exception:
        return None


def _cross_entropy_cell(loss_fn, base, target, expected, meter):
    logits = base.clone().requires_grad_()
    gap = _loss_gap(loss_fn, (base.clone().requires_grad_(), target), expected)

    def step():
        loss_fn(logits, target).backward()

    def reset():
        logits.grad = None

    return (*measure(step, reset, meter), gap)


def _linear_cell(loss_fn, x0, w0, target, expected, meter):
    x, weight = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    gap = _loss_gap(loss_fn, (x, weight, target), expected)

    def step():
        loss_fn(x, weight, target).backward()

    def reset():
        x.grad = weight.grad = None

    return (*measure(step, reset, meter), gap)


def _fill_row(row, notes, cell, name, size):
    row[name], note, row["measured"][name], row[f"{name} |dloss|"] = cell
    if note:
        notes.append(f"{name} N={size}: {note}")


def bench_cross_entropy(rows, vocab, dtype, providers, device="cuda", meter=None):
    """One row: "ms / MB" and |dloss| per provider; ``row["measured"]`` their Measured."""
    meter = meter or Meter(device)
    base = (torch.randn(rows, vocab, device=device) * 2).to(dtype)
    target = _target(rows, vocab, device)
    with torch.no_grad():
        expected = F.cross_entropy(base.float(), target).item()
    row, notes = {"N": rows, "V": vocab, "measured": {}}, []
    for name, loss_fn in providers.items():
        _fill_row(row, notes, _cross_entropy_cell(loss_fn, base, target, expected, meter),
                  name, rows)
    return row, notes


def bench_linear(rows, hidden, vocab, dtype, providers, device="cuda", meter=None, softcap=None):
    """As :func:`bench_cross_entropy`, for cross_entropy(softcapped(x @ W.T), target)."""
    meter = meter or Meter(device)
    x0 = torch.randn(rows, hidden, device=device).to(dtype)
    w0 = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(dtype)
    target = _target(rows, vocab, device)
    with torch.no_grad():
        expected = F.cross_entropy(softcapped(x0 @ w0.t(), softcap), target).item()
    row, notes = {"N": rows, "C": hidden, "V": vocab, "measured": {}}, []
    for name, loss_fn in providers.items():
        _fill_row(row, notes, _linear_cell(loss_fn, x0, w0, target, expected, meter), name, rows)
    return row, notes


# ---------------------------------------------------------------------------- no CUDA --

def cpu_sanity():
    """Both ops through the Triton interpreter on tiny shapes, against the reference."""
    import gptfast
    from gptfast import reference

    logits, weight = torch.randn(64, 1000), torch.randn(1000, 32) / 6
    x, target = torch.randn(64, 32), torch.randint(0, 1000, (64,))
    target[::IGNORE_EVERY] = -100
    cases = {
        "cross_entropy 64x1000": (lambda: gptfast.cross_entropy(logits, target),
                                  lambda: reference.cross_entropy(logits, target)),
        "linear_cross_entropy 64x32 @ 32x1000": (
            lambda: gptfast.linear_cross_entropy(x, weight, target),
            lambda: reference.linear_cross_entropy(x, weight, target)),
    }
    rows, ok = [], True
    for name, (ours, ref) in cases.items():
        with gptfast.use_backend("triton"):
            error = abs(float(ours()) - float(ref()))
            ms = Meter("cpu", 10, 30).time(ours).median_ms
        ok &= error < 1e-4
        rows.append({"op (fp32, Triton interpreter)": name, "ms": ms, "|loss - reference|": f"{error:.1e}"})
    print(markdown_table(rows, list(rows[0])))
    return 0 if ok else 1


def _cpu_sanity_in_interpreter():
    """The interpreter must be on before triton is imported, so run the check in a child."""
    from gptfast.backend import interpreter_enabled

    if interpreter_enabled():
        return cpu_sanity()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "gptfast.bench.cross_entropy", "--cpu-sanity"],
                          env=env).returncode


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gptfast.bench.cross_entropy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="8192,16384,32768", help="cross_entropy N values")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--linear-rows", default="16384,32768", help="linear_cross_entropy N values")
    parser.add_argument("--hidden", type=int, default=768, help="linear_cross_entropy C")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--cpu-sanity", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.cpu_sanity:
        return cpu_sanity()
    if not torch.cuda.is_available():
        print("No CUDA device: the cross-entropy benchmark needs an NVIDIA GPU. "
              "Tiny CPU sanity run instead:\n", flush=True)
        return _cpu_sanity_in_interpreter()

    dtype = DTYPES[args.dtype]
    print(f"# Cross-entropy, V={args.vocab}, {args.dtype}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print("forward+backward ms / extra peak MB; |dloss| = |loss - eager fp32 loss|\n")
    providers = cross_entropy_providers()
    rows, notes = [], []
    for n in parse_ints(args.rows):
        print(f"  cross_entropy N={n}", file=sys.stderr, flush=True)
        row, row_notes = bench_cross_entropy(n, args.vocab, dtype, providers)
        rows.append(row)
        notes += row_notes
    print(markdown_table(rows, ["N", "V", *providers, *(f"{p} |dloss|" for p in providers)]))

    print(f"\n# Fused linear + cross-entropy, C={args.hidden}, V={args.vocab}, {args.dtype}\n")
    providers = linear_providers()
    rows = []
    for n in parse_ints(args.linear_rows):
        print(f"  linear_cross_entropy N={n}", file=sys.stderr, flush=True)
        row, row_notes = bench_linear(n, args.hidden, args.vocab, dtype, providers)
        rows.append(row)
        notes += row_notes
    print(markdown_table(rows, ["N", "C", "V", *providers, *(f"{p} |dloss|" for p in providers)]))
    for note in notes:
        print(f"- n/a: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
