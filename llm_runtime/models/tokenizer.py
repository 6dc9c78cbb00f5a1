"""A byte-level tokenizer: every UTF-8 byte is one token.

It needs no vocabulary file and no training, handles any text, and its 256
ids fit ``uint8`` so a tokenised corpus is as small as the text itself, which
is all the demo model needs.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes, each in ``0..255``."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_array(self, text: str, dtype: np.dtype | type = np.uint8) -> np.ndarray:
        """Token ids of ``text`` as a 1-D numpy array (``uint8`` by default, compact on disk).

        Pass ``dtype=np.int64`` for ids ready to become a ``torch.long`` tensor.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        resolved = np.dtype(dtype)
        if resolved.kind not in "iu" or (resolved.kind == "i" and resolved.itemsize < 2):
            raise ValueError(f"dtype must be an integer type that holds 0..255, got {resolved}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(resolved)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; bytes that are not valid UTF-8 become U+FFFD.

        Accepts a list, a numpy array or a 1-D torch tensor of ids.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        values = [int(token) for token in ids]
        for token in values:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the byte vocabulary 0..255")
        return bytes(values).decode("utf-8", errors="replace")
