"""Tokenizers for prepare-data: the built-in byte tokenizer, or a Hugging Face ``tokenizer.json``.

A ``tokenizer.json`` is read with the ``tokenizers`` library (``pip install 'llm-runtime[tokenizers]'``).
Its name in index.json carries the file's sha256, so data made with another vocabulary is
recognisable; documents are separated by the tokenizer's end-of-text token when it has one.
"""
from __future__ import annotations

import functools
import hashlib
import os

import numpy as np

from ..models import ByteTokenizer

__all__ = ["EOS_CANDIDATES", "TokenizerError", "load_tokenizer"]

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message names the file."""


class _Byte:
    name = "byte"
    vocab_size = ByteTokenizer.vocab_size

    def encode_document(self, text: str) -> np.ndarray:
        return ByteTokenizer().encode_array(text)


class _HuggingFace:
    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"--tokenizer {path}: reading tokenizer.json needs the tokenizers package: "
                                 "pip install 'llm-runtime[tokenizers]'") from None
        try:
            with open(path, "rb") as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
            self.tokenizer = Tokenizer.from_file(path)
        except OSError as err:
            raise TokenizerError(f"--tokenizer {path}: {err.strerror or err}") from None
        except Exception as err:  # noqa: BLE001 - the library's own parse errors
            raise TokenizerError(f"--tokenizer {path}: not a tokenizer.json ({err})") from None
        self.name = f"{os.path.basename(path)}@sha256:{digest[:16]}"
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos = next((self.tokenizer.token_to_id(t) for t in EOS_CANDIDATES
                         if self.tokenizer.token_to_id(t) is not None), None)

    def encode_document(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.eos is not None:
            ids.append(self.eos)
        return np.asarray(ids, dtype=np.uint32)


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str):
    """``byte`` or a path to a tokenizer.json -> an object with name, vocab_size, encode_document()."""
    if spec == "byte":
        return _Byte()
    return _HuggingFace(spec)
