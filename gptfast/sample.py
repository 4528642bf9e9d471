"""``gptfast sample``: generate text from a checkpoint (nanoGPT's sample.py).

``--ckpt`` is a training output directory (ckpt.pt), a checkpoint file, or a local Hugging Face
GPT-2 directory (anything :meth:`gptfast.GPT.from_pretrained` loads). Text is encoded and decoded
with tiktoken: the encoding recorded in the checkpoint (the data's meta.json, including its
local rank file), else gpt2; ``--tokenizer-file`` reads a local rank file instead (offline).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch

SEPARATOR = "---------------"


class SampleError(RuntimeError):
    """A problem with the arguments, the checkpoint or the tokenizer (printed without a traceback)."""


def checkpoint_file(ckpt) -> Optional[Path]:
    """The gptfast/nanoGPT checkpoint file behind --ckpt, or None for a Hugging Face directory."""
    path = Path(ckpt)
    if path.is_file():
        return path
    if (path / "ckpt.pt").is_file() and not (path / "config.json").is_file():
        return path / "ckpt.pt"
    return None


def tokenizer_info(ckpt) -> Optional[dict]:
    """The tokenizer a gptfast training checkpoint recorded (its data's meta.json), if any."""
    file = checkpoint_file(ckpt)
    if file is None:
        return None
    checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get("tokenizer") if isinstance(checkpoint, dict) else None


def load_tokenizer(ckpt, tokenizer_file=None):
    """A tiktoken Encoding: --tokenizer-file, else the checkpoint's, else gpt2."""
    from .prepare import load_encoding

    info = tokenizer_info(ckpt) or {}
    encoding = info.get("encoding") or "gpt2"
    if tokenizer_file is None:
        recorded = info.get("tokenizer_file")
        if recorded and not os.path.exists(recorded):
            raise SampleError(f"the checkpoint's tokenizer file {recorded} is gone; pass "
                              "--tokenizer-file PATH")
        tokenizer_file = recorded
    try:
        return load_encoding(encoding, tokenizer_file)
    except (OSError, ValueError, RuntimeError) as err:
        raise SampleError(str(err)) from None


def read_start(start: str) -> str:
    """The prompt: the text itself, or the contents of a file given as FILE:path (nanoGPT)."""
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as err:
            raise SampleError(f"cannot read the prompt file {path}: {err}") from None
    return start


def decode(encoding, ids: list[int]) -> str:
    """Text of ids; ids outside the tokenizer (the padded tail of the vocabulary) print as U+FFFD."""
    pieces, run = [], []
    for token in ids:
        if token < encoding.n_vocab:
            run.append(token)
            continue
        pieces.append(encoding.decode(run))
        pieces.append("\ufffd")
        run = []
    pieces.append(encoding.decode(run))
    return "".join(pieces)


def generate_samples(model, encoding, start: str, num_samples: int, max_new_tokens: int,
                     temperature: float, top_k: Optional[int], device: torch.device,
                     dtype: torch.dtype) -> list[str]:
    """num_samples continuations of start, each decoded with the start text in front."""
    prompt = encoding.encode(start, allowed_special={"<|endoftext|>"})
    lead = []
    if not prompt:  # generation needs one token to condition on
        lead = prompt = [encoding.eot_token]
    idx = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    autocast = (contextlib.nullcontext() if dtype == torch.float32
                else torch.autocast(device_type=device.type, dtype=dtype))
    with torch.no_grad(), autocast:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    return [decode(encoding, row[len(lead):]) for row in out.tolist()]


def _device_and_dtype(device_name: Optional[str], dtype_name: str) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"device {device} requested but CUDA is not available")
    if dtype_name == "auto":
        if device.type != "cuda":
            return device, torch.float32
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, getattr(torch, dtype_name)


def add_arguments(parser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="PATH",
                        help="training output directory (ckpt.pt), a checkpoint file, or a local "
                             "Hugging Face GPT-2 directory")
    parser.add_argument("--start", default="\n",
                        help="prompt text, or FILE:path to read it from a file (default a newline)")
    parser.add_argument("--num-samples", type=int, default=10, help="samples to draw (default 10)")
    parser.add_argument("--max-new-tokens", type=int, default=500,
                        help="tokens generated per sample (default 500)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=200,
                        help="sample among the k most likely tokens; 0 for all (default 200)")
    parser.add_argument("--tokenizer-file", metavar="PATH",
                        help="local .tiktoken rank file (default: the checkpoint's, else gpt2)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")


def run(args) -> int:
    from .model import GPT

    try:
        if args.num_samples < 1 or args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
            raise SampleError("need --num-samples >= 1, --max-new-tokens >= 0, --temperature >= 0 "
                              "and --top-k >= 0")
        if not os.path.exists(args.ckpt):
            raise SampleError(f"--ckpt {args.ckpt} does not exist")
        device, dtype = _device_and_dtype(args.device, args.dtype)
        encoding = load_tokenizer(args.ckpt, args.tokenizer_file)
        start = read_start(args.start)
        try:
            model = GPT.from_pretrained(args.ckpt)
        except (OSError, ValueError) as err:
            raise SampleError(f"--ckpt {args.ckpt}: {err}") from None
    except SampleError as err:
        print(f"gptfast sample: error: {err}", file=sys.stderr)
        return 1
    model.eval().to(device)
    torch.manual_seed(args.seed)
    samples = generate_samples(model, encoding, start, args.num_samples, args.max_new_tokens,
                               args.temperature, args.top_k or None, device, dtype)
    for text in samples:
        print(text)
        print(SEPARATOR, flush=True)
    return 0
