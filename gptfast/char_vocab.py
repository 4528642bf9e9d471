"""nanoGPT's character-level vocabularies: ``meta.pkl`` read safely, and a codec for them.

nanoGPT's ``data/shakespeare_char/prepare.py`` writes ``meta.pkl``, a pickle of plain data:
``{"vocab_size": int, "itos": {int: str}, "stoi": {str: int}}``. :func:`read_meta_pkl` loads it
with an unpickler that refuses every global (class, function, module attribute), so a pickle
that would import or call anything is an error naming the file instead of running code;
plain dicts, lists, strings and numbers need no global.

:class:`CharEncoding` is the part of tiktoken's ``Encoding`` that ``gptfast sample`` uses
(``name``, ``n_vocab``, ``encode``, ``decode``), over one character per token.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Iterable, Optional

META_PKL = "meta.pkl"
ENCODING_NAME = "char"
MAX_META_BYTES = 64 << 20  # a character vocabulary is kilobytes; refuse to unpickle a huge file


class MetaPickleError(ValueError):
    """meta.pkl is not the plain-data vocabulary nanoGPT writes (or would run code to load)."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds only what pickle constructs without globals: dicts, lists, tuples, sets,
    strings, bytes, numbers, booleans and None."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it references {module}.{name}; a vocabulary needs no "
                                     "classes or functions")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference")


def _unpickle_plain_data(path: str) -> object:
    size = os.path.getsize(path)
    if size > MAX_META_BYTES:
        raise MetaPickleError(f"{path}: {size:,} bytes is too large for a vocabulary pickle")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return _PlainDataUnpickler(io.BytesIO(raw)).load()
    except Exception as err:  # any malformed or hostile pickle: one clear error
        raise MetaPickleError(f"{path} was not loaded: {err}. gptfast reads meta.pkl only as "
                              "plain data (nanoGPT's {'vocab_size', 'itos', 'stoi'})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_meta_pkl(path) -> dict:
    """``{"vocab_size": int, "itos": {id: char} or None}`` from a nanoGPT meta.pkl.

    ``stoi``/``itos`` are optional (nanoGPT's train.py reads only vocab_size); when present
    they must be inverse maps of strings and ids in [0, vocab_size)."""
    path = os.fspath(path)
    meta = _unpickle_plain_data(path)
    if not isinstance(meta, dict) or not _is_int(meta.get("vocab_size")) or meta["vocab_size"] < 1:
        keys = f" with keys {sorted(map(str, meta))}" if isinstance(meta, dict) else ""
        raise MetaPickleError(f"{path}: expected a dict with a positive int 'vocab_size' "
                              f"(nanoGPT's meta.pkl), got {type(meta).__name__}{keys}")
    vocab_size = meta["vocab_size"]
    itos, stoi = meta.get("itos"), meta.get("stoi")
    if itos is None and stoi is None:
        return {"vocab_size": vocab_size, "itos": None}
    if not isinstance(itos, dict) or not isinstance(stoi, dict):
        raise MetaPickleError(f"{path}: 'itos' and 'stoi' must both be dicts")
    for token, char in itos.items():
        if not (_is_int(token) and 0 <= token < vocab_size and isinstance(char, str)):
            raise MetaPickleError(f"{path}: itos maps {token!r} to {char!r}; expected ids in "
                                  f"[0, {vocab_size}) mapped to strings")
    if {char: token for token, char in itos.items()} != stoi:
        raise MetaPickleError(f"{path}: 'stoi' is not the inverse of 'itos'")
    return {"vocab_size": vocab_size, "itos": dict(itos)}


class CharEncoding:
    """Text <-> ids, one vocabulary entry per token (nanoGPT's char-level encode/decode).

    ``itos`` maps ids to strings (single characters in nanoGPT); ids it does not name, up to
    ``n_vocab``, decode as U+FFFD. Encoding is greedy longest-match, which for single-character
    entries is nanoGPT's ``[stoi[c] for c in s]``."""

    def __init__(self, itos: dict, n_vocab: Optional[int] = None, name: str = ENCODING_NAME):
        if not itos:
            raise ValueError("a character vocabulary needs at least one entry")
        self.itos = {int(token): char for token, char in itos.items()}
        self.stoi = {char: token for token, char in self.itos.items()}
        self.n_vocab = n_vocab if n_vocab is not None else max(self.itos) + 1
        self.name = name
        self._longest = max(len(char) for char in self.stoi)

    @classmethod
    def from_meta_pkl(cls, path) -> "CharEncoding":
        meta = read_meta_pkl(path)
        if meta["itos"] is None:
            raise MetaPickleError(f"{os.fspath(path)} has a vocab_size but no 'itos'/'stoi' to "
                                  "decode with")
        return cls(meta["itos"], meta["vocab_size"])

    @classmethod
    def from_tokenizer_info(cls, info: dict) -> "CharEncoding":
        """From the ``tokenizer`` entry gptfast train writes in its checkpoints."""
        itos = {token: char for token, char in enumerate(info["itos"]) if char is not None}
        return cls(itos, info["vocab_size"])

    def tokenizer_info(self) -> dict:
        """What a checkpoint stores to decode without the data directory (weights_only-safe)."""
        return {"encoding": self.name, "vocab_size": self.n_vocab,
                "itos": [self.itos.get(token) for token in range(self.n_vocab)]}

    @property
    def empty_prompt_token(self) -> int:
        """What generation conditions on when the prompt is empty (there is no end-of-text
        token): a newline where the vocabulary has one (nanoGPT's default start), else id 0."""
        return self.stoi.get("\n", min(self.itos))

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Ids of text; a character outside the vocabulary is a ValueError naming it.
        ``allowed_special`` is accepted for tiktoken's signature; there are no special tokens."""
        ids, i = [], 0
        while i < len(text):
            for width in range(min(self._longest, len(text) - i), 0, -1):
                token = self.stoi.get(text[i:i + width])
                if token is not None:
                    ids.append(token)
                    i += width
                    break
            else:
                raise ValueError(f"character {text[i]!r} at position {i} is not in the "
                                 f"{self.n_vocab}-entry character vocabulary")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos.get(int(token), "\ufffd") for token in ids)

    def __repr__(self) -> str:
        return f"CharEncoding(n_vocab={self.n_vocab})"
