"""The byte-level vocabulary of ``gptfast prepare --tokenizer byte``: 256 byte ids and an EOT.

Token ``b`` (0..255) is the byte ``b`` of the text's UTF-8 encoding; token 256 is
``<|endoftext|>``, the document separator. ``n_vocab`` is 257 (a scratch model pads it to 320).
:class:`ByteEncoding` has the parts of tiktoken's ``Encoding`` that ``gptfast prepare`` and
``gptfast sample`` use.
"""

from __future__ import annotations

from typing import Iterable

ENCODING_NAME = "byte"
ENDOFTEXT = "<|endoftext|>"
EOT_TOKEN = 256
N_VOCAB = 257


class ByteEncoding:
    name = ENCODING_NAME
    n_vocab = N_VOCAB
    eot_token = EOT_TOKEN
    special_tokens_set = frozenset({ENDOFTEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        """The UTF-8 bytes of text ("<|endoftext|>" in the text is plain text)."""
        return list(text.encode("utf-8"))

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """As encode_ordinary, except that an allowed "<|endoftext|>" becomes token 256."""
        if allowed_special != "all" and ENDOFTEXT not in allowed_special:
            return self.encode_ordinary(text)
        ids = []
        for i, piece in enumerate(text.split(ENDOFTEXT)):
            if i:
                ids.append(EOT_TOKEN)
            ids += self.encode_ordinary(piece)
        return ids

    def encode_single_token(self, text: str) -> int:
        if text != ENDOFTEXT:
            raise KeyError(text)
        return EOT_TOKEN

    def decode(self, ids: Iterable[int]) -> str:
        """UTF-8 text of the bytes (invalid sequences as U+FFFD), token 256 as "<|endoftext|>"."""
        pieces, run = [], bytearray()
        for token in ids:
            token = int(token)
            if 0 <= token < 256:
                run.append(token)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            pieces.append(ENDOFTEXT if token == EOT_TOKEN else "\ufffd")
            run = bytearray()
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __repr__(self) -> str:
        return "ByteEncoding(n_vocab=257)"
