"""Byte-level text data: the Python standard library's own sources by default.

The default corpus is every `.py` file of the running interpreter's standard
library (site-packages excluded): real text that nobody here wrote, present on
every machine, no download. Users may pass their own files or folders instead.
Files are split into train and held-out by a stable hash of their path, so no
held-out file is ever trained on; the train bytes are cut into one contiguous
shard per worker.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import ConfigError

HELD_OUT_PERCENT = 5
_BINARY_PROBE = 8192


def stdlib_sources() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    return root, files


def _user_files(paths: list[str]) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.append((str(p), p))
        elif p.is_dir():
            found.extend((str(f.relative_to(p)), f) for f in sorted(p.rglob("*")) if f.is_file())
        else:
            raise ConfigError(f"data path {raw!r} does not exist")
    text = []
    for name, f in found:
        with open(f, "rb") as fh:
            if b"\0" not in fh.read(_BINARY_PROBE):
                text.append((name, f))
    if not text:
        raise ConfigError(f"no text files found in {', '.join(paths)}")
    return text


def _held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


@dataclass
class Corpus:
    description: str
    train: torch.Tensor  # uint8
    held_out: torch.Tensor  # uint8

    @classmethod
    def load(cls, paths: list[str] | None = None, max_bytes: int | None = None) -> "Corpus":
        if paths:
            named = _user_files(paths)
            description = f"{len(named)} text files from {', '.join(paths)}"
        else:
            root, files = stdlib_sources()
            named = [(str(f.relative_to(root)), f) for f in files]
            description = f"Python {sysconfig.get_python_version()} standard library sources ({len(named)} files)"
        named.sort(key=lambda nf: hashlib.sha256(nf[0].encode()).digest())
        is_held = [_held_out(name) for name, _ in named]
        if len(named) > 1 and not any(is_held):  # few files: hold out one
            is_held[-1] = True
        if all(is_held):
            is_held[0] = False
        if not any(is_held):
            raise ConfigError("the data is a single file: give at least two so one can be held out")
        train, held = bytearray(), bytearray()
        for (name, f), h in zip(named, is_held):
            target = held if h else train
            if max_bytes is None or len(target) < max_bytes:
                target += f.read_bytes()
        return cls(description, torch.frombuffer(train, dtype=torch.uint8).clone(),
                   torch.frombuffer(held, dtype=torch.uint8).clone())

    def shard(self, index: int, count: int) -> torch.Tensor:
        n = self.train.numel()
        return self.train[index * n // count:(index + 1) * n // count]

    def eval_batches(self, seq_len: int, batch_size: int, num_batches: int) -> list[torch.Tensor]:
        """Fixed held-out windows, evenly spread over the held-out bytes."""
        window = seq_len + 1
        total = batch_size * num_batches
        if self.held_out.numel() < window * total:
            total = max(1, self.held_out.numel() // window)
        if self.held_out.numel() < window:
            raise ConfigError(f"held-out data has {self.held_out.numel()} bytes, fewer than one window of {window}")
        stride = (self.held_out.numel() - window) // max(total - 1, 1)
        starts = torch.arange(total) * stride
        windows = _gather(self.held_out, starts, window)
        return [windows[i:i + batch_size] for i in range(0, total, batch_size)]


def _gather(data: torch.Tensor, starts: torch.Tensor, window: int) -> torch.Tensor:
    return data[starts[:, None] + torch.arange(window)].long()


def data_seed(peer_id: str) -> int:
    """The seed of a swarm peer's data order: its own (from its peer id), so no two peers read alike."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "little")


class BatchStream:
    """Random windows from one shard, reproducible from (seed, shard index)."""

    def __init__(self, shard: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if shard.numel() < seq_len + 2:
            raise ConfigError(f"a data shard has {shard.numel()} bytes, too few for windows of {seq_len + 1}")
        self.shard, self.seq_len, self.batch_size = shard, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.shard.numel() - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        return _gather(self.shard, starts, self.seq_len + 1)
