"""``gptfast sample``: generate text from a checkpoint (nanoGPT's sample.py).

``--ckpt`` is a training output directory (ckpt.pt), a checkpoint file, or a local Hugging Face
GPT-2 directory (anything :meth:`gptfast.GPT.from_pretrained` loads). The tokenizer, first match:

1. ``--meta PATH``: a nanoGPT char-level ``meta.pkl`` (read as plain data only);
2. ``--tokenizer-file PATH``: a local tiktoken rank file (offline);
3. the tokenizer a gptfast training checkpoint recorded: its data's tiktoken encoding (with
   its local rank file), the bytes of ``gptfast prepare --tokenizer byte``, or the characters
   of its data's nanoGPT ``meta.pkl``;
4. for a nanoGPT checkpoint whose ``config`` names a ``dataset``: ``data/<dataset>/meta.pkl``
   relative to the working directory, where it exists (nanoGPT's sample.py rule);
5. tiktoken's gpt2.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from .byte_vocab import ENCODING_NAME as BYTE_ENCODING
from .byte_vocab import ByteEncoding
from .char_vocab import ENCODING_NAME as CHAR_ENCODING
from .char_vocab import META_PKL, CharEncoding, MetaPickleError

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


def _read_checkpoint(ckpt) -> dict:
    file = checkpoint_file(ckpt)
    if file is None:
        return {}
    checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint if isinstance(checkpoint, dict) else {}


def nanogpt_meta_path(checkpoint: dict) -> Optional[str]:
    """data/<config.dataset>/meta.pkl, relative to the working directory, where it exists: the
    file nanoGPT's sample.py decodes a char-level checkpoint with."""
    dataset = (checkpoint.get("config") or {}).get("dataset")
    if not isinstance(dataset, str) or not dataset:
        return None
    path = os.path.join("data", dataset, META_PKL)
    return path if os.path.isfile(path) else None


def _char_encoding(meta_path) -> CharEncoding:
    try:
        return CharEncoding.from_meta_pkl(meta_path)
    except OSError as err:
        raise SampleError(f"cannot read {meta_path}: {err}") from None
    except MetaPickleError as err:
        raise SampleError(str(err)) from None


def load_tokenizer(ckpt, tokenizer_file=None, meta=None):
    """The encoding to sample with (see the module docstring for the order): a tiktoken
    Encoding or a :class:`~gptfast.char_vocab.CharEncoding`."""
    from .prepare import load_encoding

    if meta is not None:
        if tokenizer_file is not None:
            raise SampleError("pass --meta or --tokenizer-file, not both")
        return _char_encoding(meta)
    checkpoint = _read_checkpoint(ckpt)
    info = checkpoint.get("tokenizer") or {}
    if tokenizer_file is None:
        if info.get("encoding") == CHAR_ENCODING:
            return CharEncoding.from_tokenizer_info(info)
        if info.get("encoding") == BYTE_ENCODING:
            return ByteEncoding()
        meta_path = None if info else nanogpt_meta_path(checkpoint)
        if meta_path is not None:
            return _char_encoding(meta_path)
    encoding = info.get("encoding") or "gpt2"
    if encoding in (CHAR_ENCODING, BYTE_ENCODING):
        encoding = "gpt2"  # --tokenizer-file given for a char/byte checkpoint: the user's call
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


def empty_prompt_token(encoding) -> int:
    """The token an empty prompt conditions on: end-of-text, or a char vocabulary's stand-in."""
    token = getattr(encoding, "empty_prompt_token", None)
    return encoding.eot_token if token is None else token


def encode_prompt(encoding, start: str, model_vocab: int) -> list[int]:
    """Ids of the prompt, each checked against the model's vocabulary (a mismatched tokenizer
    is an error here rather than an index error inside the embedding)."""
    try:
        prompt = encoding.encode(start, allowed_special={"<|endoftext|>"})
    except ValueError as err:
        raise SampleError(f"--start: {err}") from None
    beyond = [token for token in prompt if token >= model_vocab]
    if beyond:
        raise SampleError(f"the prompt encodes to token {beyond[0]}, beyond the model's "
                          f"{model_vocab}-token vocabulary: the tokenizer ({encoding.name}, "
                          f"{encoding.n_vocab} tokens) is not the model's; pass --meta or "
                          "--tokenizer-file")
    return prompt


def generate_samples(model, encoding, start: str, num_samples: int, max_new_tokens: int,
                     temperature: float, top_k: Optional[int], device: torch.device,
                     dtype: torch.dtype) -> list[str]:
    """num_samples continuations of start, each decoded with the start text in front."""
    prompt = encode_prompt(encoding, start, model.config.vocab_size)
    lead = []
    if not prompt:  # generation needs one token to condition on
        lead = prompt = [empty_prompt_token(encoding)]
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
    parser.add_argument("--meta", metavar="PATH",
                        help="nanoGPT char-level meta.pkl to decode with (default: the "
                             "checkpoint's characters, else data/<dataset>/meta.pkl of a nanoGPT "
                             "checkpoint's config, as nanoGPT's sample.py)")
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
        encoding = load_tokenizer(args.ckpt, args.tokenizer_file, args.meta)
        start = read_start(args.start)
        try:
            model = GPT.from_pretrained(args.ckpt)
        except (OSError, ValueError) as err:
            raise SampleError(f"--ckpt {args.ckpt}: {err}") from None
        model.eval().to(device)
        torch.manual_seed(args.seed)
        samples = generate_samples(model, encoding, start, args.num_samples, args.max_new_tokens,
                                   args.temperature, args.top_k or None, device, dtype)
    except SampleError as err:
        print(f"gptfast sample: error: {err}", file=sys.stderr)
        return 1
    for text in samples:
        print(text)
        print(SEPARATOR, flush=True)
    return 0
