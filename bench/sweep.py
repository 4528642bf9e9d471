"""``gptfast bench``: sweep the GPT step, the kernels and the token loader; write jsonl,
markdown and PNG plots.

    gptfast bench [--suite gpt|kernels|loader|all] [--model gpt2] [--batch-sizes 1,4,16,64]
                  [--context-lengths 256,1024,4096,16384] [--impls gptfast,nanogpt-eager,...]
                  [--modes train,infer] [--dtype bf16|fp32] [--device cuda|cpu] [--quick]
                  [--max-tokens 65536] [--warmup N] [--repeats N] [--out DIR]
                  [--attention causal,document] [--arch gpt2,nanochat]

Without CUDA (or with ``--device cpu``) it runs a quick sweep of a tiny model on the CPU
(reference ops against the nanoGPT baseline, small B and T) so that the command always works
and writes the same kinds of files; of the kernels suite only the tiny nanochat attention
cases run there (the other kernels need a GPU).
``--quick`` gives the small sweep on a GPU too. Ctrl-C stops the sweep and still writes the
reports of the cells finished so far (results.jsonl is written as the sweep goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time
from pathlib import Path
from typing import Optional

import torch

from . import gpt, headline, kernel_suite, loader_suite, report
from .common import ResultsWriter, run_context, usage_error

SUITES = ("gpt", "kernels", "loader")

# (full, quick) sweep defaults on CUDA; a CPU run is always the CPU quick sweep
CUDA_BATCH_SIZES = ((1, 4, 16, 64), (1, 8))
CUDA_CONTEXT_LENGTHS = ((256, 1024, 4096, 16384), (256, 1024))
CUDA_WARMUP_REPEATS = ((3, 20), (2, 10))
CPU_BATCH_SIZES, CPU_CONTEXT_LENGTHS, CPU_WARMUP_REPEATS = (1, 2, 4), (64, 128), (2, 5)
CPU_IMPLS = ("gptfast-reference", "nanogpt-eager")  # "auto" runs the reference ops on CPU anyway
CPU_NANOCHAT_IMPLS = ("gptfast-reference", "nanochat-eager")
NANOCHAT_MODEL = ("nanochat-d20", "nanochat-tiny")  # --arch nanochat's model: (CUDA, CPU)
DEFAULT_MAX_TOKENS = 65536


class UsageError(ValueError):
    """Arguments that are fine one by one but not together (or not on this machine)."""


# ----------------------------------------------------------------------- argument types --

def _int_list(text: str, what: str, maximum: Optional[int] = None) -> tuple:
    values = []
    for item in text.split(","):
        try:
            value = int(item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be comma-separated integers like 1,2,4; {item.strip()!r} is not "
                "an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{what} must be positive, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"{what}: {value} is larger than supported (at most {maximum})")
        values.append(value)
    return tuple(dict.fromkeys(values))


def batch_sizes(text: str) -> tuple:
    return _int_list(text, "batch sizes")


def context_lengths(text: str) -> tuple:
    return _int_list(text, "context lengths", gpt.MAX_CONTEXT_LENGTH)


def _name_list(text: str, known, aliases, what: str) -> tuple:
    names = []
    for item in (part.strip() for part in text.split(",")):
        name = aliases.get(item, item)
        if name not in known:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {item!r}; choose from {', '.join(known)}"
                + (f" (aliases: {', '.join(f'{a}={n}' for a, n in aliases.items())})" if aliases else ""))
        names.append(name)
    return tuple(dict.fromkeys(names))


def impl_list(text: str) -> tuple:
    return _name_list(text, gpt.IMPLS, gpt.IMPL_ALIASES, "implementation")


def mode_list(text: str) -> tuple:
    return _name_list(text, gpt.MODES, {}, "mode")


def attention_list(text: str) -> tuple:
    return _name_list(text, gpt.ATTENTIONS, {}, "attention")


def arch_list(text: str) -> tuple:
    return _name_list(text, gpt.ARCHS, {}, "arch")


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    impls = "; ".join(f"{name}: {impl.description}" for name, impl in gpt.IMPLS.items())
    parser.add_argument("--suite", choices=(*SUITES, "all", "headline"), default="all",
                        help="what to run (default all): the GPT step sweep, the kernel "
                             "benchmarks (CUDA; on a CPU only tiny nanochat attention cases), the "
                             "token loader; or headline: the "
                             "whole GPU verdict against bench/ANCHORS.md (the goals and "
                             "figures, with their sources) in one time-boxed run "
                             "(its own options below; the sweep options do not apply)")
    parser.add_argument("--model", choices=gpt.MODELS, default=None,
                        help="GPT size for the gpt suite (default gpt2 on CUDA, tiny on CPU: "
                             "2 layers, 128 wide)")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=None, metavar="B,B,...",
                        help="batch sizes (default 1,4,16,64 on CUDA; 1,8 with --quick; 1,2,4 on CPU)")
    parser.add_argument("--context-lengths", type=context_lengths, default=None, metavar="T,T,...",
                        help="context lengths, each at most %d (default 256,1024,4096,16384 on "
                             "CUDA; 256,1024 with --quick; 64,128 on CPU)" % gpt.MAX_CONTEXT_LENGTH)
    parser.add_argument("--max-tokens", type=_count(0), default=DEFAULT_MAX_TOKENS, metavar="N",
                        help="leave out cells with B*T > N (default %(default)s; 0: no limit)")
    parser.add_argument("--impls", type=impl_list, default=None, metavar="NAME,...",
                        help=f"gpt suite implementations (default all on CUDA, "
                             f"{','.join(CPU_IMPLS)} on CPU). {impls}")
    parser.add_argument("--modes", type=mode_list, default=gpt.MODES, metavar="MODE,...",
                        help="train (forward, backward, AdamW) and/or infer (forward, no grad); "
                             "default both")
    parser.add_argument("--attention", type=attention_list, default=("causal",),
                        metavar="KIND,...",
                        help="attention masks to sweep (default causal): causal, and/or document. "
                             "gpt suite: the gptfast implementations with GPTConfig(attention="
                             f"'document') on documents of mean length {gpt.DOCUMENT_LENGTH} "
                             "(nanoGPT has no document mask). kernels suite: at T=8192, mean "
                             "document lengths 256 and 2048, with and without a 1024 window, "
                             "and the window alone: gptfast vs FlexAttention (same block mask, "
                             "compiled) vs SDPA with a dense boolean mask vs gptfast's plain "
                             "causal kernel, TFLOP/s on the attended pairs and ms")
    parser.add_argument("--arch", type=arch_list, default=("gpt2",), metavar="ARCH,...",
                        help="gpt suite architectures (default gpt2): gpt2 (gptfast vs nanoGPT "
                             "at --model), and/or nanochat: our modern GPT at nanochat-d20 "
                             "(CPU: a 2-layer model of the same family) vs nanochat's own model "
                             "(nanochat-eager/-compile, when import nanochat.gpt works; else "
                             "'unavailable' rows)")
    parser.add_argument("--dtype", choices=tuple(gpt.DTYPES), default=None,
                        help="bf16 (autocast, fp32 weights) or fp32 (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="the small sweep (always the case on CPU)")
    parser.add_argument("--warmup", type=_count(1), default=None, metavar="N",
                        help="untimed steps per cell, the first one timed apart (compilation)")
    parser.add_argument("--repeats", type=_count(1), default=None, metavar="N",
                        help="timed steps per cell")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output directory (default bench-results/<timestamp>/)")
    headline.add_arguments(parser)
    parser.set_defaults(bench_parser=parser)


# --------------------------------------------------------------------------------- plan --

@dataclasses.dataclass
class Plan:
    """Everything a run does, resolved from the arguments and the machine."""

    suites: tuple
    device: torch.device
    dtype: str
    quick: bool
    gpt: gpt.GPTSettings
    impls: tuple
    modes: tuple
    batch_sizes: tuple
    context_lengths: tuple
    max_tokens: int
    attention: tuple
    archs: tuple
    out_dir: Path
    started: datetime.datetime

    def settings_text(self) -> str:
        text = f"suites {','.join(self.suites)}, {'quick' if self.quick else 'full'} sweep"
        if "gpt" in self.suites:
            text += (f"; gpt: impls {','.join(self.impls)}, modes {','.join(self.modes)}, "
                     f"B {','.join(map(str, self.batch_sizes))}, "
                     f"T {','.join(map(str, self.context_lengths))}, "
                     f"max tokens {self.max_tokens or 'none'}, warm-up {self.gpt.warmup}, "
                     f"repeats {self.gpt.repeats}")
        if self.attention != ("causal",):
            text += f"; attention {','.join(self.attention)}"
        if self.archs != ("gpt2",):
            text += f"; arch {','.join(self.archs)} (nanochat: {self.gpt.nanochat_model})"
        return text


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve the defaults for this machine and check what only makes sense together."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    quick = args.quick or not on_cuda
    pick = int(quick)  # index of the quick sweep in the (full, quick) defaults
    warmup, repeats = CUDA_WARMUP_REPEATS[pick] if on_cuda else CPU_WARMUP_REPEATS
    dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    started = datetime.datetime.now()
    archs = getattr(args, "arch", ("gpt2",))
    plan = Plan(
        suites=SUITES if args.suite == "all" else (args.suite,),
        device=device,
        dtype=dtype,
        quick=quick,
        gpt=gpt.GPTSettings(model=args.model or ("gpt2" if on_cuda else "tiny"), device=device,
                            dtype=dtype, warmup=args.warmup or warmup,
                            repeats=args.repeats or repeats,
                            nanochat_model=NANOCHAT_MODEL[0 if on_cuda else 1]),
        impls=args.impls or _default_impls(on_cuda, archs),
        modes=args.modes,
        batch_sizes=args.batch_sizes or (CUDA_BATCH_SIZES[pick] if on_cuda else CPU_BATCH_SIZES),
        context_lengths=args.context_lengths or (
            CUDA_CONTEXT_LENGTHS[pick] if on_cuda else CPU_CONTEXT_LENGTHS),
        max_tokens=args.max_tokens,
        attention=getattr(args, "attention", ("causal",)),
        archs=archs,
        out_dir=args.out or Path("bench-results") / started.strftime("%Y%m%d-%H%M%S"),
        started=started,
    )
    if plan.out_dir.exists() and not plan.out_dir.is_dir():
        raise UsageError(f"--out {plan.out_dir} exists and is not a directory")
    if "gpt" in plan.suites and not gpt.cells(plan.impls, plan.modes, (1,), (1,),
                                             attentions=plan.attention, archs=plan.archs):
        raise UsageError(
            f"no --impls {','.join(plan.impls)} runs under --arch {','.join(plan.archs)} "
            "(nanogpt-* are gpt2's baselines, nanochat-* nanochat's)")
    if "gpt" in plan.suites and not _gpt_cells(plan):
        raise UsageError(
            f"no gpt cell has B*T <= --max-tokens {plan.max_tokens} (the smallest B*T is "
            f"{min(plan.batch_sizes) * min(plan.context_lengths)}); raise --max-tokens or pass 0")
    return plan


def _default_impls(on_cuda: bool, archs: tuple) -> tuple:
    """Every impl on CUDA; on the CPU the reference ops against each arch's eager baseline."""
    if on_cuda:
        return tuple(gpt.IMPLS)
    per_arch = {"gpt2": CPU_IMPLS, "nanochat": CPU_NANOCHAT_IMPLS}
    return tuple(dict.fromkeys(i for arch in archs for i in per_arch[arch]))


def _gpt_cells(plan: Plan) -> list:
    return gpt.cells(plan.impls, plan.modes, plan.batch_sizes, plan.context_lengths,
                     plan.max_tokens, plan.attention, plan.archs)


def collect_units(plan: Plan) -> tuple[list, list]:
    """((label, run) pairs to run in order, notes about what is skipped and why)."""
    units, notes = [], []
    if "gpt" in plan.suites:
        cells = _gpt_cells(plan)
        units += [(cell.label, lambda cell=cell: [gpt.run_cell(cell, plan.gpt)]) for cell in cells]
        left_out = len(plan.batch_sizes) * len(plan.context_lengths) - len(
            {(c.batch_size, c.context_length) for c in cells})
        if left_out:
            notes.append(f"gpt: {left_out} B x T cell(s) with B*T > --max-tokens "
                         f"{plan.max_tokens} left out")
        if any(a != "causal" for a in plan.attention) and any(
                gpt.IMPLS[i].family != "gptfast" for i in plan.impls):
            notes.append("gpt: nanoGPT has no document mask: its cells run causal attention only")
    if "kernels" in plan.suites:
        if plan.device.type == "cuda":
            sizes = kernel_suite.QUICK if plan.quick else kernel_suite.FULL
            units += kernel_suite.KernelSuite(plan.dtype, sizes, plan.attention).units()
        else:  # the nanochat attention cases, tiny: the other kernels are timed on a GPU only
            units += kernel_suite.KernelSuite(plan.dtype, kernel_suite.CPU, attention=(),
                                              device=plan.device).units()
            notes.append(f"kernels suite: the tiny nanochat attention cases only; the rest "
                         f"needs {kernel_suite.REQUIRES}")
    if "loader" in plan.suites:
        missing = loader_suite.missing_reason()
        if missing is None:
            sizes = loader_suite.QUICK if plan.quick else loader_suite.FULL
            units += loader_suite.units(plan.device, sizes)
        else:
            notes.append(f"loader suite skipped: {missing}")
    return units, notes


# ---------------------------------------------------------------------------------- run --

def _sweep(units, writer, device) -> bool:
    """Run every unit, writing its rows; True when Ctrl-C stopped it."""
    from tqdm import tqdm

    # disable=None: a bar on a terminal only; the per-row lines go to stdout either way
    with gpt.nanogpt_matmul_precision(device), tqdm(total=len(units), unit="cell", disable=None,
                                                 dynamic_ncols=True) as bar:
        try:
            for label, run in units:
                bar.set_description(label)
                for row in run():
                    bar.write(report.format_row(writer.write(row)))
                bar.update()
        except KeyboardInterrupt:
            bar.write(f"interrupted: keeping the {len(writer.rows)} rows finished so far")
            return True
    return False


def _plot_writer():
    """(plots.write_plots, None), or (None, the one-line note) when matplotlib is missing."""
    from gptfast.extras import MissingExtra

    try:
        from . import plots
    except MissingExtra as missing:
        return None, f"PNG plots skipped: matplotlib is not installed ({missing.hint} gives them)"
    return plots.write_plots, None


def run(args: argparse.Namespace) -> int:
    if args.suite == "headline":
        return headline.run(args)
    given = [f"--{name.replace('_', '-')}" for name in headline.HEADLINE_ONLY
             if getattr(args, name, None) not in (None, False)]
    if given:
        return usage_error(args, UsageError(f"{', '.join(given)}: only with --suite headline"))
    try:
        plan = make_plan(args)
    except UsageError as err:
        return usage_error(args, err)
    units, notes = collect_units(plan)
    write_plots, skipped = _plot_writer()
    if skipped:
        notes.append(skipped)
    context = run_context(plan.device, plan.dtype, plan.started)
    model = None
    if "gpt" in plan.suites:
        names = [plan.gpt.model if arch == "gpt2" else plan.gpt.nanochat_model
                 for arch in plan.archs]
        model = "; ".join(gpt.describe_model(name) for name in names)
    print(f"gptfast bench on {context['device_name']}, {plan.dtype}"
          + (f", model {model}" if model else ""))
    print(plan.settings_text())
    for note in notes:
        print(note)
    plan.out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    with ResultsWriter(plan.out_dir / "results.jsonl", context) as writer:
        interrupted = _sweep(units, writer, plan.device)
    meta = {**context, "model": model, "model_name": plan.gpt.model,
            "settings": plan.settings_text(), "notes": notes, "interrupted": interrupted,
            "elapsed_s": time.perf_counter() - start, "baseline": gpt.BASELINE,
            "arch_baselines": gpt.ARCH_BASELINES,
            "impl_order": tuple(gpt.IMPLS)}
    written = [report.write_markdown(writer.rows, plan.out_dir / "results.md", meta)]
    if write_plots is not None:
        written += write_plots(writer.rows, plan.out_dir, meta)
    else:
        print(skipped)
    print(f"\n{len(writer.rows)} rows in {meta['elapsed_s']:.0f} s"
          + (" (interrupted)" if interrupted else "") + f"; wrote {plan.out_dir}/:")
    for path in [plan.out_dir / "results.jsonl", *written]:
        print(f"  {path.name}")
    return 130 if interrupted else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gptfast bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
