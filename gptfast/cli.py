"""The ``gptfast`` command (also ``python -m gptfast``).

Subcommands are listed in ``COMMANDS`` as (help, module); the module provides
``add_arguments(parser)`` and ``run(args)``, which returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

OPS = ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "rotary_qk_norm",
       "causal_attention", "attention", "cross_entropy", "linear_cross_entropy")

# What "auto" does beyond the per-op line, worth knowing before a benchmark or a long run.
NOTES = (
    "attention dropout > 0 in training (gptfast.nn.CausalSelfAttention) runs PyTorch SDPA, "
    "not the Triton kernel",
    "attn_implementation='gptfast' (Hugging Face) runs transformers' SDPA for padding masks, "
    "KV-cache decoding and attention dropout in training, and logs why once",
    "cross_entropy keeps the logits by default (backward allocates an N x V gradient); "
    "keep_logits=False lets triton write the gradient into op-made logits instead",
)


# ------------------------------------------------------------------------------ info --

def _triton_version():
    from .backend import triton_import_error

    error = triton_import_error()
    if error is not None:
        return None, error
    import triton

    return triton.__version__, None


def _extension_info():
    try:
        from . import _C
    except ImportError as err:
        return {"present": False, "error": str(err)}
    info = {"present": True, **_C.build_info()}
    if info.get("cuda"):
        info["driver_version"] = _C.cuda_driver_version()
        info["devices_seen"] = _C.cuda_device_count()
    return info


def _optional_info() -> dict:
    """Each optional dependency: its version or null, what it is for, how to install it."""
    from .extras import OPTIONAL, install_hint, installed_versions

    return {module: {"version": version, "for": OPTIONAL[module][2],
                     "install": install_hint(module)}
            for module, version in installed_versions().items()}


def _hf_availability() -> str:
    from .hf import availability

    return availability()


def _cuda_version_string(version):
    """13000 -> '13.0' (CUDA encodes major*1000 + minor*10)."""
    return None if not version else f"{version // 1000}.{version % 1000 // 10}"


def collect_info() -> dict:
    """Everything ``gptfast info`` reports, as a dict (also printed with --json)."""
    import torch

    from . import __version__
    from .backend import describe, get_backend, interpreter_enabled

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    triton_version, triton_error = _triton_version()
    info = {
        "gptfast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_error": triton_error,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "backend_setting": get_backend(),
        "GPTFAST_BACKEND": os.environ.get("GPTFAST_BACKEND"),
        "TRITON_INTERPRET": interpreter_enabled(),
        "extension": _extension_info(),
        "ops": {op: describe(op, device) for op in OPS},
        "optional": _optional_info(),
        "hf_attention": _hf_availability(),
        "notes": list(NOTES),
    }
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        info["compute_capability"] = f"{major}.{minor}"
        info["device_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return info


def format_info(info: dict) -> str:
    ext = info["extension"]
    if not ext["present"]:
        ext_line = f"missing ({ext['error']}); reinstall with pip to build it"
    elif ext.get("cuda"):
        ext_line = (f"present, CUDA part built with CUDA {_cuda_version_string(ext['cuda_runtime_version'])}"
                    f", driver {_cuda_version_string(ext['driver_version']) or 'none'}"
                    f", {ext['devices_seen']} device(s) seen")
    else:
        ext_line = "present, CPU-only build (no nvcc at build time)"
    device = info["device"]
    if info["cuda_available"]:
        device += f" (sm_{info['compute_capability'].replace('.', '')}, {info['device_memory_gb']} GB)"
    lines = [
        f"gptfast    {info['gptfast']}",
        f"python     {info['python']} on {info['platform']}",
        f"torch      {info['torch']} (CUDA build: {info['torch_cuda'] or 'none'})",
        f"triton     {info['triton'] or 'unavailable: ' + str(info['triton_error'])}",
        f"device     {device}",
        f"extension  gptfast._C {ext_line}",
        f"backend    {info['backend_setting']}"
        + (" (from GPTFAST_BACKEND)" if info["GPTFAST_BACKEND"] else " (default; set GPTFAST_BACKEND to change)")
        + (", TRITON_INTERPRET=1" if info["TRITON_INTERPRET"] else ""),
        "",
        "what 'auto' runs on this device:",
    ]
    width = max(len(op) for op in info["ops"])
    lines += [f"  {op:<{width}}  {choice}" for op, choice in info["ops"].items()]
    lines += ["", "optional dependencies:"]
    width = max(len(module) for module in info["optional"])
    lines += [f"  {module:<{width}}  "
              + (entry["version"] if entry["version"] else f"not installed ({entry['install']})")
              + f": {entry['for']}" for module, entry in info["optional"].items()]
    lines += ["", f"attn_implementation='gptfast' (Hugging Face): {info['hf_attention']}"]
    lines += ["", "notes:"] + [f"  - {note}" for note in info["notes"]]
    return "\n".join(lines)


def add_arguments(parser):
    """Arguments of ``gptfast info`` (this module is its entry in COMMANDS)."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    """``gptfast info``."""
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ------------------------------------------------------------------------------ main --

# name -> (help, module). Each module has add_arguments(parser) and run(args) -> exit code;
# it is imported only to build its subparser, so heavy imports belong inside its run().
COMMANDS = {
    "info": ("versions, device, compiled extension, and which backend each op uses",
             "gptfast.cli"),
    "prepare": ("tokenize .txt/.jsonl documents (tiktoken, UTF-8 bytes or nanoGPT's characters) "
                "into token shards",
                "gptfast.prepare"),
    "bench": ("benchmark the GPT step, the kernels and the token loader over batch size x "
              "context length; writes results.jsonl, results.md and PNG plots. "
              "--suite headline: the whole GPU verdict against bench/ANCHORS.md in one "
              "time-boxed run",
              "gptfast.bench.sweep"),
    "train": ("train a GPT on token shards (nanoGPT's recipe; DDP under torchrun), with "
              "checkpoints that resume exactly", "gptfast.train"),
    "sample": ("generate text from a training checkpoint or a local Hugging Face GPT-2",
               "gptfast.sample"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="gptfast", description="Fast GPT training: Triton kernels with PyTorch fallbacks.")
    parser.add_argument("--version", action="version", version=f"gptfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, module) in COMMANDS.items():
        importlib.import_module(module).add_arguments(
            sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _, module = COMMANDS[args.command]
    from .extras import MissingExtra

    try:
        return importlib.import_module(module).run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MissingExtra as missing:  # an optional dependency: one line, no traceback
        print(f"gptfast {args.command}: error: {missing}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
