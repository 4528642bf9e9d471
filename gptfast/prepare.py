"""Text -> token shards: ``gptfast prepare INPUT... --out DIR``.

Inputs are ``.txt`` files (one document each), ``.jsonl`` files (one document per line, in its
"text" field) or directories, searched recursively for both (in sorted path order). Every
document is encoded with tiktoken (``encode_ordinary``: a literal "<|endoftext|>" in the text
is plain text) with the end-of-text token before it (``--eot prepend``, the default: llm.c's
convention, so the shards hold the same token stream as llm.c's own data scripts write) or
after it (``--eot append``, gptfast's earlier behaviour).

Output, in DIR:
    train_000000.bin, train_000001.bin, ...   llm.c shards of at most --shard-tokens tokens
    val_000000.bin, ...                        (documents run on across shard boundaries)
    meta.json                                  what was written, see ``prepare()``
Shards are llm.c format (see gptfast/data.py): uint16 tokens (magic 20240520, version 1) when
every token id fits, i.e. n_vocab <= 65536, else uint32 (magic 20240801, version 7), so llm.c
and nanoGPT-style loaders can read them. Every file is written to ``NAME.tmp`` and renamed when
complete, meta.json last: an interrupted run leaves no partial shard and no meta.json.

Validation split: document i (0-based, in input order) goes to val when
``(splitmix64(i) >> 11) / 2**53 < val_fraction`` (splitmix64 as in gptfast/data.py), so the
split is deterministic and spread over the corpus. The last document is the exception that
keeps both splits non-empty: it goes to train if train is still empty, else to val if val is
still empty and val_fraction > 0 (so with >= 2 documents and val_fraction > 0 both exist).

Tokenizers (``--tokenizer``, default gpt2):

- a tiktoken encoding name (``gpt2``, ``r50k_base``, ...; the same as ``--encoding NAME``);
- a path to a local ``.tiktoken`` rank file (the same as ``--tokenizer-file PATH``, see below);
- ``byte``: token b (0..255) is byte b of the text's UTF-8 encoding and 256 is
  ``<|endoftext|>`` (vocab_size 257; gptfast/byte_vocab.py); shards and meta.json as above;
- ``char``: nanoGPT's character-level data (its ``data/shakespeare_char/prepare.py``): the
  documents concatenated as they are, in input order, with no end-of-text token; the
  vocabulary is the sorted set of their characters; the first 1 - val_fraction of the
  characters (default 0.9) go to ``train.bin``, the rest to ``val.bin``, raw uint16 without a
  header, and ``meta.pkl`` holds ``{"vocab_size", "itos", "stoi"}``, so nanoGPT's train.py and
  sample.py read the directory as they read shakespeare_char. The whole text is held in memory.

A name wins over a file of the same name (``./char`` names the file). Each kind removes the
other kind's files from DIR (train_*.bin, val_*.bin, meta.json / train.bin, val.bin, meta.pkl),
so ``gptfast train`` never reads a stale mix.

``--encoding NAME`` is ``tiktoken.get_encoding(NAME)``, which downloads the rank file
on first use. Offline, ``--tokenizer-file PATH`` reads a local ``.tiktoken`` rank file (one
"base64(token bytes) rank" per line) and builds a GPT-2-family encoding from it: GPT-2's
pre-tokenizer pattern and ``<|endoftext|>`` = n_vocab of the file (max rank + 1), as gpt2,
r50k_base and p50k_base define it. (The file is parsed here rather than with
tiktoken.load.load_tiktoken_bpe, which caches local files by path in /tmp and would keep
serving an old copy after the file changes.)
"""

from __future__ import annotations

import base64
import binascii
import json
import multiprocessing
import os
import pickle
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .byte_vocab import ByteEncoding
from .char_vocab import META_PKL
from .data import LLMC_HEADER_INTS, LLMC_MAGIC_UINT16, LLMC_MAGIC_UINT32, LLMC_VERSION, splitmix64

ENDOFTEXT = "<|endoftext|>"
# tiktoken's r50k_pat_str: GPT-2's pattern in tiktoken's faster, equivalent form
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_FAMILY = ("gpt2", "r50k_base", "p50k_base")
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")
DOCUMENT_SUFFIXES = (".txt", ".jsonl")
TOKENIZER_KINDS = ("char", "byte")  # besides tiktoken names and rank files
DEFAULT_VAL_FRACTION = 0.0005
CHAR_VAL_FRACTION = 0.1  # nanoGPT's shakespeare_char split
NANOGPT_FILES = ("train.bin", "val.bin", META_PKL)


# --------------------------------------------------------------------------- tokenizer --

def load_rank_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Mergeable ranks from a .tiktoken file: lines of "base64(token bytes) rank"."""
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{number}: expected 'base64-token rank', got {line[:80]!r}") from None
    if not ranks:
        raise ValueError(f"{path}: no token ranks in the file")
    return ranks


def load_encoding(encoding: str = "gpt2", tokenizer_file: str | os.PathLike | None = None):
    """The tiktoken Encoding named `encoding`, or one built from a local rank file."""
    import tiktoken

    if tokenizer_file is not None:
        if encoding not in GPT2_FAMILY:
            raise ValueError(f"--tokenizer-file builds a GPT-2-family encoding {GPT2_FAMILY}; "
                             f"got --encoding {encoding!r}")
        ranks = load_rank_file(tokenizer_file)
        return tiktoken.Encoding(name=encoding, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: max(ranks.values()) + 1})
    try:
        return tiktoken.get_encoding(encoding)
    except Exception as err:
        raise RuntimeError(
            f"could not load tiktoken encoding {encoding!r} ({type(err).__name__}: {err}). tiktoken "
            f"downloads encodings on first use; offline, pass --tokenizer-file PATH (a .tiktoken "
            f"rank file) or point TIKTOKEN_CACHE_DIR at a cache that holds it") from err


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype("<u2") if n_vocab <= 1 << 16 else np.dtype("<u4")


# --------------------------------------------------------------------------- documents --

def find_document_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The .txt/.jsonl files named by `inputs` (directories searched recursively, sorted)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in DOCUMENT_SUFFIXES)
        elif not item.exists():
            raise FileNotFoundError(f"input {item} does not exist")
        elif item.suffix not in DOCUMENT_SUFFIXES:
            raise ValueError(f"input {item}: expected a .txt or .jsonl file or a directory")
        else:
            files.append(item)
    return files


def iter_documents(files: Iterable[Path]) -> Iterator[str]:
    """Documents in order: a .txt file is one, each non-blank .jsonl line one ("text" field)."""
    for path in files:
        if path.suffix == ".txt":
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 ({err})") from None
            continue
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{number}: expected a JSON object with a \"text\" "
                                     f"field ({type(err).__name__}: {err})") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{number}: \"text\" is {type(text).__name__}, not a string")
                yield text


def is_val_document(index: int, val_fraction: float) -> bool:
    return int(splitmix64(index)[0] >> np.uint64(11)) / 2**53 < val_fraction


# ------------------------------------------------------------------------------ shards --

def _atomic_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype | None = None) -> None:
    """Writes one llm.c shard atomically (NAME.tmp, then rename)."""
    path = Path(path)
    dtype = np.dtype(dtype or tokens.dtype)
    writer = _ShardFile(_atomic_path(path), dtype)
    try:
        writer.write(np.asarray(tokens, dtype))
        writer.commit(path)
    finally:
        writer.discard()


def llmc_header(count: int, dtype: np.dtype) -> bytes:
    header = np.zeros(LLMC_HEADER_INTS, "<i4")
    magic = LLMC_MAGIC_UINT16 if dtype.itemsize == 2 else LLMC_MAGIC_UINT32
    header[:3] = magic, LLMC_VERSION[magic], count
    return header.tobytes()


class _ShardFile:
    """One shard being written to its temp path; commit() finishes it under its real name."""

    def __init__(self, temp_path: Path, dtype: np.dtype):
        self.temp_path, self.dtype, self.count = temp_path, dtype, 0
        self.file = open(temp_path, "wb")
        self.file.write(llmc_header(0, dtype))

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.count += len(tokens)

    def commit(self, path: Path) -> None:
        self.file.seek(0)
        self.file.write(llmc_header(self.count, self.dtype))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp_path, path)

    def discard(self) -> None:
        """Removes the temp file unless commit() renamed it."""
        if not self.file.closed:
            self.file.close()
        self.temp_path.unlink(missing_ok=True)


class ShardWriter:
    """Appends tokens to DIR/SPLIT_000000.bin, SPLIT_000001.bin, ... of `shard_tokens` each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.names: list[str] = []
        self.tokens = 0
        self._current: _ShardFile | None = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._current is None:
                name = f"{self.split}_{len(self.names):06d}.bin"
                self._current = _ShardFile(_atomic_path(self.out_dir / name), self.dtype)
            take = min(len(tokens), self.shard_tokens - self._current.count)
            self._current.write(tokens[:take])
            self.tokens += take
            tokens = tokens[take:]
            if self._current.count == self.shard_tokens:
                self._commit()

    def _commit(self) -> None:
        name = f"{self.split}_{len(self.names):06d}.bin"
        self._current.commit(self.out_dir / name)
        self.names.append(name)
        self._current = None

    def close(self) -> None:
        if self._current is not None and self._current.count:
            self._commit()

    def discard(self) -> None:
        if self._current is not None:
            self._current.discard()
            self._current = None


# ------------------------------------------------------------------------------ encode --

EOT_PLACEMENTS = ("prepend", "append")

_worker_state: dict = {}


def _init_worker(encoder, eot: int, dtype: np.dtype, eot_placement: str) -> None:
    _worker_state.update(encoder=encoder, eot=eot, dtype=dtype, eot_placement=eot_placement)


def _encode_document(text: str) -> np.ndarray:
    tokens = _worker_state["encoder"].encode_ordinary(text)
    if _worker_state["eot_placement"] == "prepend":
        tokens.insert(0, _worker_state["eot"])
    else:
        tokens.append(_worker_state["eot"])
    return np.array(tokens, dtype=_worker_state["dtype"])


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_documents(documents: Iterator[str], encoder, eot: int, dtype: np.dtype,
                     workers: int, eot_placement: str = "prepend") -> Iterator[np.ndarray]:
    """Each document's tokens with eot before or after them (`eot_placement`), in input
    order; `workers` processes when > 1.

    Documents go to the pool in blocks, so memory holds a bounded number of texts however
    long the corpus is. The pool forks where the platform can (fast start, nothing re-imported).
    """
    _init_worker(encoder, eot, dtype, eot_placement)
    if workers <= 1:
        yield from map(_encode_document, documents)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    chunksize = 16
    with context.Pool(workers, initializer=_init_worker, initargs=(encoder, eot, dtype, eot_placement)) as pool:
        for block in _batched(documents, workers * chunksize * 8):
            yield from pool.imap(_encode_document, block, chunksize)


# ----------------------------------------------------------------------------- prepare --

def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.endswith(".tiktoken")


def resolve_tokenizer(tokenizer: str | None, encoding: str | None,
                      tokenizer_file: str | os.PathLike | None) -> tuple[str, str | None, str | None]:
    """(kind, tiktoken encoding name, rank file) from --tokenizer, --encoding and
    --tokenizer-file: kind is "char", "byte" or "tiktoken". Conflicting choices are a ValueError."""
    if tokenizer is None:
        return "tiktoken", encoding or "gpt2", tokenizer_file
    if tokenizer in TOKENIZER_KINDS:
        if encoding is not None or tokenizer_file is not None:
            raise ValueError(f"--tokenizer {tokenizer} takes no --encoding or --tokenizer-file")
        return tokenizer, None, None
    if os.path.isfile(tokenizer):
        if tokenizer_file is not None:
            raise ValueError("--tokenizer FILE and --tokenizer-file: pass one of them")
        return "tiktoken", encoding or "gpt2", tokenizer
    if _looks_like_path(tokenizer):
        raise ValueError(f"--tokenizer {tokenizer}: no such rank file")
    if encoding is not None:
        raise ValueError(f"--tokenizer {tokenizer} and --encoding {encoding}: pass one of them")
    return "tiktoken", tokenizer, tokenizer_file


def _remove(out: Path, names) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    temp = _atomic_path(path)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def prepare_char(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
                 val_fraction: float = CHAR_VAL_FRACTION) -> dict:
    """nanoGPT's character-level data in `out_dir` (train.bin, val.bin, meta.pkl; see the
    module docstring); returns a summary (``format``, ``encoding``, ``vocab_size``,
    ``train_tokens``, ``val_tokens``, ``documents``)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = find_document_files(inputs)
    if not files:
        raise ValueError(f"no .txt or .jsonl files in {[os.fspath(i) for i in inputs]}")
    texts = list(iter_documents(files))
    text = "".join(texts)
    code_points = np.frombuffer(text.encode("utf-32-le"), "<u4")
    # sorted code points = nanoGPT's sorted(set(text)); ids index them
    vocabulary, ids = np.unique(code_points, return_inverse=True)
    if len(vocabulary) > 1 << 16:
        raise ValueError(f"{len(vocabulary):,} distinct characters do not fit nanoGPT's uint16 "
                         "tokens; use --tokenizer byte or a tiktoken encoding")
    split = int(len(ids) * (1 - val_fraction))  # nanoGPT: data[:int(n*0.9)], data[int(n*0.9):]
    if split == 0:
        raise ValueError(f"{len(ids)} character(s) of text leave nothing to train on")
    ids = ids.astype("<u2")
    itos = {i: chr(c) for i, c in enumerate(vocabulary.tolist())}
    meta = {"vocab_size": len(itos), "itos": itos, "stoi": {c: i for i, c in itos.items()}}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove(out, [META_PKL, "meta.json"])  # meta.pkl present only once this run is complete
    _remove(out, [p.name for p in out.iterdir() if SHARD_NAME.match(p.name)])
    _write_atomically(out / "train.bin", ids[:split].tobytes())
    if split < len(ids):
        _write_atomically(out / "val.bin", ids[split:].tobytes())
    else:
        _remove(out, ["val.bin"])
    _write_atomically(out / META_PKL, pickle.dumps(meta))
    return {"format": "nanogpt", "encoding": "char", "vocab_size": len(itos),
            "train_tokens": split, "val_tokens": len(ids) - split, "documents": len(texts)}


def prepare(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, *,
            tokenizer: str | None = None, encoding: str | None = None,
            tokenizer_file: str | os.PathLike | None = None,
            encoder=None, val_fraction: float | None = None, shard_tokens: int = 100_000_000,
            workers: int | None = None, progress: bool = True, eot: str = "prepend") -> dict:
    """Tokenizes `inputs` into llm.c shards in `out_dir`; returns the meta.json contents.

    `tokenizer`: see the module docstring (``"char"`` delegates to :func:`prepare_char` and
    returns its summary). `encoder`: a ready tiktoken.Encoding (overrides the rest); it needs
    the special token <|endoftext|>. `eot`: "prepend" (llm.c) or "append" <|endoftext|> to
    every document. `val_fraction`: default 0.0005 of the documents (0.1 of the characters
    for char).
    """
    kind, encoding, tokenizer_file = resolve_tokenizer(tokenizer, encoding, tokenizer_file)
    if kind == "char" and encoder is None:
        return prepare_char(inputs, out_dir, val_fraction=CHAR_VAL_FRACTION
                            if val_fraction is None else val_fraction)
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    if kind == "byte" and encoder is None:
        encoder = ByteEncoding()
    if eot not in EOT_PLACEMENTS:
        raise ValueError(f"eot must be one of {', '.join(EOT_PLACEMENTS)}, got {eot!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    files = find_document_files(inputs)
    if not files:
        raise ValueError(f"no .txt or .jsonl files in {[os.fspath(i) for i in inputs]}")
    if encoder is None:
        encoder = load_encoding(encoding, tokenizer_file)
    if ENDOFTEXT not in encoder.special_tokens_set:
        raise ValueError(f"encoding {encoder.name!r} has no {ENDOFTEXT} special token")
    eot_placement, eot = eot, encoder.encode_single_token(ENDOFTEXT)
    dtype = token_dtype(encoder.n_vocab)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # present only once this run is complete
    _remove(out, NANOGPT_FILES)  # a char run's files
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    documents = {"train": 0, "val": 0}

    def route(tokens: np.ndarray, split: str) -> None:
        writers[split].write(tokens)
        documents[split] += 1

    from tqdm import tqdm

    bar = tqdm(unit="doc", desc="prepare", disable=not progress, file=sys.stderr)
    start = last_postfix = time.perf_counter()
    pending = None  # (index, tokens) of the latest document: routed when the next arrives
    encoded = None
    try:
        encoded = encode_documents(iter_documents(files), encoder, eot, dtype, workers,
                                   eot_placement)
        for index, tokens in enumerate(encoded):
            if pending is not None:
                route(pending[1], "val" if is_val_document(pending[0], val_fraction) else "train")
            pending = (index, tokens)
            bar.update(1)
            now = time.perf_counter()
            if now - last_postfix > 0.5:
                total = writers["train"].tokens + writers["val"].tokens
                bar.set_postfix_str(f"{total / (now - start) / 1e6:.2f}M tok/s")
                last_postfix = now
        if pending is None:
            raise ValueError(f"no documents in {len(files)} input file(s)")
        if documents["train"] == 0:
            last_split = "train"
        elif documents["val"] == 0 and val_fraction > 0:
            last_split = "val"
        else:
            last_split = "val" if is_val_document(pending[0], val_fraction) else "train"
        route(pending[1], last_split)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        if encoded is not None:
            encoded.close()  # stops the worker pool
        bar.close()

    written = set(writers["train"].names + writers["val"].names)
    for stale in out.iterdir():
        if SHARD_NAME.match(stale.name) and stale.name not in written:
            stale.unlink()
    meta = {
        "format": "llm.c",
        "dtype": dtype.name.replace("<", ""),
        "magic": LLMC_MAGIC_UINT16 if dtype.itemsize == 2 else LLMC_MAGIC_UINT32,
        "encoding": encoder.name,
        "tokenizer_file": None if tokenizer_file is None else os.path.abspath(tokenizer_file),
        "vocab_size": encoder.n_vocab,
        "eot_token": eot,
        "eot": eot_placement,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_documents": documents["train"],
        "val_documents": documents["val"],
        "train_shards": writers["train"].names,
        "val_shards": writers["val"].names,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
    }
    temp = _atomic_path(out / "meta.json")
    temp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(temp, out / "meta.json")
    return meta


# --------------------------------------------------------------------------------- CLI --

def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=".txt files (one document each), .jsonl files (a \"text\" field per "
                             "line) or directories of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", metavar="char|byte|NAME|FILE",
                        help="char: nanoGPT's character-level train.bin, val.bin and meta.pkl; "
                             "byte: UTF-8 bytes 0-255 and <|endoftext|> = 256 (vocab 257) in "
                             "llm.c shards; NAME: a tiktoken encoding (default gpt2); FILE: a "
                             "local .tiktoken rank file (as --tokenizer-file)")
    parser.add_argument("--encoding", default=None,
                        help="tiktoken encoding name (default gpt2); with --tokenizer-file, the "
                             "GPT-2 family it belongs to")
    parser.add_argument("--tokenizer-file", metavar="PATH",
                        help="local .tiktoken rank file, for offline use")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"fraction of documents for validation (default "
                             f"{DEFAULT_VAL_FRACTION}); with --tokenizer char the last fraction "
                             f"of the characters (default {CHAR_VAL_FRACTION}, nanoGPT's split)")
    parser.add_argument("--shard-tokens", type=int, default=None,
                        help="tokens per shard (default 100000000)")
    parser.add_argument("--eot", choices=EOT_PLACEMENTS, default=None,
                        help="where <|endoftext|> goes: before every document (prepend, default: "
                             "llm.c's token stream) or after it (append)")
    parser.add_argument("--workers", type=int, default=None,
                        help="encoding processes (default: CPU count)")


def run(args) -> int:
    try:
        if args.tokenizer == "char":
            given = [flag for flag, value in (("--eot", args.eot), ("--shard-tokens", args.shard_tokens))
                     if value is not None]
            if given:
                raise ValueError(f"--tokenizer char writes one train.bin and no end-of-text "
                                 f"token: {' and '.join(given)} do not apply")
        meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, encoding=args.encoding,
                       tokenizer_file=args.tokenizer_file, val_fraction=args.val_fraction,
                       shard_tokens=args.shard_tokens or 100_000_000, workers=args.workers,
                       eot=args.eot or "prepend")
    except (ValueError, OSError, RuntimeError) as err:
        print(f"gptfast prepare: error: {err}", file=sys.stderr)
        return 1
    if meta["format"] == "nanogpt":
        print(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val characters "
              f"({meta['vocab_size']} distinct) of {meta['documents']:,} documents to {args.out}: "
              f"train.bin, val.bin and meta.pkl (nanoGPT's char-level format)")
        return 0
    print(f"wrote {meta['train_tokens']:,} train tokens ({meta['train_documents']:,} documents, "
          f"{len(meta['train_shards'])} shards) and {meta['val_tokens']:,} val tokens "
          f"({meta['val_documents']:,} documents, {len(meta['val_shards'])} shards) of "
          f"{meta['dtype']} to {args.out}")
    return 0
