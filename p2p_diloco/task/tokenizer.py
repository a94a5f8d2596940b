"""Text to token ids: byte-level by default (no download), or a local HF tokenizer directory.

A run names its tokenizer by a hash of what it does (`Tokenizer.sha256`: the
vocabulary, the special tokens and the ids of a fixed probe text), not of its
files: peers with copies saved by other library versions agree when they encode
alike, and a peer whose copy encodes differently refuses the run. Encoded text
is raw bytes of a fixed item type (uint8 for bytes, int32 for ids), so the data
streams cut windows from it the same way whatever the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array

import torch

from ..core.config import ConfigError

PROBE = "Streaming DiLoCo, peer-to-peer: 4-bit fragments über the internet.\n\tdef f(x): return x ** 2  # 42 ✓"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class ByteTokenizer:
    """Each row's text as UTF-8, a newline after it."""

    vocab_size = 256
    dtype = torch.uint8
    itemsize = 1
    sha256 = ""  # byte-level: what a run config says when it names no tokenizer

    def encode(self, text: str) -> bytes:
        return text.encode("utf-8", "replace") + b"\n"

    def describe(self) -> str:
        return "byte-level"


class HFTokenizer:
    """A local HF tokenizer (`AutoTokenizer.from_pretrained(directory)`, no download): each row's ids, then the
    end-of-text token when it has one, as int32."""

    dtype = torch.int32
    itemsize = 4

    def __init__(self, directory: str, tokenizer):
        self.directory, self.tokenizer = directory, tokenizer
        self.vocab_size = len(tokenizer)
        self.end = tokenizer.eos_token_id
        identity = {"vocab": sorted(tokenizer.get_vocab().items()), "end": self.end,
                    "special": sorted(map(str, tokenizer.all_special_tokens)), "probe": self._ids(PROBE)}
        self.sha256 = hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).hexdigest()

    @classmethod
    def load(cls, directory: str) -> "HFTokenizer":
        if not os.path.isdir(directory):
            raise ConfigError(f"--tokenizer {directory}: no such directory")
        if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
            raise ConfigError(f"--tokenizer {directory}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)})")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # malformed files: transformers' and tokenizers' many error types
            raise ConfigError(f"--tokenizer {directory}: cannot load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return cls(directory, tokenizer)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> bytes:
        ids = self._ids(text) + ([self.end] if self.end is not None else [])
        return array("i", ids).tobytes()

    def describe(self) -> str:
        return f"tokenizer {os.path.basename(os.path.normpath(self.directory))} ({self.vocab_size} tokens)"


def has_tokenizer(directory: str) -> bool:
    return os.path.isdir(directory) and any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES)


def load_tokenizer(directory: str | None) -> ByteTokenizer | HFTokenizer:
    return HFTokenizer.load(directory) if directory else ByteTokenizer()


def check_fits(tokenizer, vocab_size: int, where: str) -> None:
    """ConfigError when the tokenizer's ids reach past the model's embedding."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"{where}: the {tokenizer.describe()} has {tokenizer.vocab_size} tokens, more than the "
                          f"model's vocabulary of {vocab_size}")
