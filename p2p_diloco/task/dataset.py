"""Text datasets through HF `datasets`: a local JSONL / Parquet / text file or folder, or a hub dataset streamed.

Byte-level like the rest of the task (each row's text as UTF-8, rows joined by a
newline) unless the run names a tokenizer (`task.tokenizer`: each row's ids and an
end-of-text token). No coordinator decides who reads what:

* **held out** are the rows whose text hashes into HELD_OUT_PERCENT % (sha256 of
  the text): the same rows on every peer, never trained on, whichever order a
  peer reads in and whether the dataset is read whole or streamed;
* **a local dataset** is read whole (Arrow, memory-mapped by `datasets`): every
  peer walks one permutation of its rows (from the run's seed), each starting at
  its own place in it (from its peer id), so peers read disjoint stretches until
  one reaches another's start;
* **a stream** (a hub dataset, or a local one with `streaming=True`) is read in
  an order of its own per peer (`datasets`' shuffle buffer seeded by the peer id).

A stream's *position* (rows read, bytes of the current row's encoding used) goes into
checkpoints; `seek` puts a resumed peer back where it was.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import ConfigError
from .data import HELD_OUT_PERCENT
from .tokenizer import ByteTokenizer

# file suffix -> the `datasets` builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
TEXT_FIELDS = ("text", "content")  # looked for in this order when no field is named
SHUFFLE_BUFFER = 10_000  # rows: a stream's per-peer shuffle


def _held_out(text: str) -> bool:
    return hashlib.sha256(text.encode("utf-8", "replace")).digest()[0] * 100 // 256 < HELD_OUT_PERCENT


def _files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) of a local file or folder; ConfigError naming what is wrong."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()
                                                 and not any(part.startswith(".") for part in f.parts))
    builders = {BUILDERS.get(f.suffix.lower()) for f in files}
    if not files or builders == {None}:
        raise ConfigError(f"--dataset {path}: no {', '.join(sorted(BUILDERS))} files in it")
    builders.discard(None)
    if len(builders) > 1:
        raise ConfigError(f"--dataset {path}: holds files of several formats ({', '.join(sorted(builders))}); "
                          "give a folder of one format")
    builder = builders.pop()
    return builder, [str(f) for f in files if BUILDERS.get(f.suffix.lower()) == builder]


@dataclass
class TextDataset:
    """One dataset's rows of text, and where they came from."""

    source: str
    rows: object  # a `datasets.Dataset` (read whole) or `datasets.IterableDataset` (streamed)
    field: str
    streaming: bool
    tokenizer: object = None  # `task.tokenizer`'s ByteTokenizer (None) or HFTokenizer

    def __post_init__(self):
        self.tokenizer = self.tokenizer or ByteTokenizer()

    @classmethod
    def load(cls, source: str, field: str | None = None, streaming: bool | None = None,
             tokenizer=None) -> "TextDataset":
        """`source`: a local file or folder, else a hub dataset name (streamed; needs the network). `streaming`:
        None reads a local dataset whole and streams a hub one. `tokenizer`: None for bytes."""
        try:
            import datasets
        except ImportError:
            raise ConfigError("--dataset needs the `datasets` package: pip install 'p2p-diloco[data]'") from None
        datasets.disable_progress_bars()
        path = Path(source)
        try:
            if path.exists():
                builder, files = _files(path)
                streaming = bool(streaming)
                rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming)
            else:
                if os.sep in source and not source.count("/") == 1:
                    raise ConfigError(f"--dataset {source}: no such file or folder")
                streaming = True if streaming is None else streaming
                rows = datasets.load_dataset(source, split="train", streaming=streaming)
        except ConfigError:
            raise
        except Exception as e:  # a malformed file, an unknown hub name, no network: datasets' many error types
            where = "local dataset" if path.exists() else "hub dataset (not a local path; it needs the network)"
            raise ConfigError(f"--dataset {source}: cannot load it as a {where}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        columns = list(rows.column_names or []) if rows.column_names is not None else []
        if field is None:  # (a stream may not know its columns before it is read: "text" then)
            field = next((f for f in TEXT_FIELDS if f in columns), None if columns else "text")
            if field is None:
                raise ConfigError(f"--dataset {source}: no text field among its columns {columns}; name one with "
                                  "--text-field")
        elif columns and field not in columns:
            raise ConfigError(f"--dataset {source}: no field {field!r}; its columns are {columns}")
        return cls(source, rows, field, streaming, tokenizer)

    def describe(self) -> str:
        how = "streamed" if self.streaming else f"{len(self.rows)} rows"
        return f"dataset {self.source} ({how}, field {self.field!r}, {self.tokenizer.describe()})"

    def guarded(self, rows):
        """`rows`, with whatever `datasets` raises while reading them (a malformed line met in a stream, a lost
        connection) turned into a ConfigError naming the dataset."""
        iterator = iter(rows)
        while True:
            try:
                row = next(iterator)
            except StopIteration:
                return
            except Exception as e:
                raise ConfigError(f"--dataset {self.source}: reading it failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None
            yield row

    def _text(self, row: dict, where: str) -> str:
        value = row.get(self.field)
        if not isinstance(value, str):
            raise ConfigError(f"--dataset {self.source}: {where}: field {self.field!r} is "
                              f"{type(value).__name__}, not text")
        return value

    def eval_batches(self, seq_len: int, batch_size: int, num_batches: int) -> list[torch.Tensor]:
        """Fixed windows of the held-out rows, in the dataset's own order (the same on every peer)."""
        window, item = seq_len + 1, self.tokenizer.itemsize
        want = window * batch_size * num_batches * item
        held = bytearray()
        for i, row in enumerate(self.guarded(self.rows)):
            text = self._text(row, f"row {i}")
            if _held_out(text):
                held += self.tokenizer.encode(text)
                if len(held) >= want:
                    break
        if len(held) < window * item:
            raise ConfigError(f"--dataset {self.source}: its held-out rows (the {HELD_OUT_PERCENT} % whose text "
                              f"hashes there) hold {len(held) // item} tokens, fewer than one window of {window}: "
                              "give a larger dataset")
        data = torch.frombuffer(held, dtype=self.tokenizer.dtype)
        total = min(batch_size * num_batches, data.numel() // window)
        windows = data[:total * window].view(total, window).long()
        return [windows[i:i + batch_size] for i in range(0, total, batch_size)]

    def stream(self, seq_len: int, batch_size: int, run_seed: int, peer_seed: int) -> "DatasetStream":
        return DatasetStream(self, seq_len, batch_size, run_seed, peer_seed)


class DatasetStream:
    """Batches of consecutive windows over one peer's order of the training rows (`next`, like `BatchStream`)."""

    def __init__(self, dataset: TextDataset, seq_len: int, batch_size: int, run_seed: int, peer_seed: int):
        self.dataset, self.window, self.batch_size = dataset, seq_len + 1, batch_size
        self.tokenizer = dataset.tokenizer
        self.peer_seed = peer_seed
        if not dataset.streaming:
            n = len(dataset.rows)
            if n == 0:
                raise ConfigError(f"--dataset {dataset.source}: it has no rows")
            self.order = torch.randperm(n, generator=torch.Generator().manual_seed(run_seed))
            self.start = peer_seed % n
        self.passes, self.rows_read = 0, 0  # where reading stands: passes over the rows done, rows of this one read
        self.buffer = bytearray()  # text of rows read, not yet all cut into windows
        self.buffered: list[tuple[int, int, int]] = []  # (bytes, pass, row) of each row behind the buffer
        self.used = 0  # bytes of the buffer already in windows
        self._iterator = None

    # -- where it stands ------------------------------------------------------------
    def position(self) -> dict:
        """The first row whose text is still (partly) unused, and the bytes of it used: enough to come back."""
        _, passes, row = self.buffered[0] if self.buffered else (0, self.passes, self.rows_read)
        return {"dataset": self.dataset.source, "pass": passes, "row": row, "offset": self.used}

    def seek(self, position: dict) -> None:
        """Come back to a `position` (from a checkpoint of this dataset); ConfigError if it is not one."""
        try:
            passes, row, offset = int(position["pass"]), int(position["row"]), int(position["offset"])
            if position["dataset"] != self.dataset.source or min(passes, row, offset) < 0:
                raise ValueError(position)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"a data position {position!r} that is not one of {self.dataset.source}") from None
        self.passes, self.rows_read, self.buffer, self.buffered, self.used = passes, row, bytearray(), [], 0
        self._iterator = None
        self._fill(offset + 1)
        self.used = min(offset, len(self.buffer))

    # -- reading ------------------------------------------------------------------
    def _rows(self):
        """(text, pass, row) of this peer's rows from where reading stands, endlessly: pass after pass."""
        ds = self.dataset
        while True:
            if ds.streaming:  # an order of this peer's own, another each pass
                rows = ds.rows.shuffle(seed=(self.peer_seed + self.passes) % 2**32, buffer_size=SHUFFLE_BUFFER)
                rows = ds.guarded(rows.skip(self.rows_read) if self.rows_read else rows)
                texts = (ds._text(row, f"row {self.rows_read} of pass {self.passes}") for row in rows)
            else:  # the run's permutation, from this peer's place in it
                n = len(ds.rows)
                indices = (int(self.order[(self.start + k) % n]) for k in range(self.rows_read, n))
                texts = (ds._text(ds.rows[i], f"row {i}") for i in indices)
            whole, trained = self.rows_read == 0, False
            for text in texts:
                row, self.rows_read = self.rows_read, self.rows_read + 1
                trained = trained or not _held_out(text)
                yield text, self.passes, row
            if whole and not trained:
                raise ConfigError(f"--dataset {ds.source}: a whole pass over it found no row to train on "
                                  f"(every row empty or held out): give more rows")
            self.passes, self.rows_read = self.passes + 1, 0

    def _fill(self, need: int) -> None:
        if self._iterator is None:
            self._iterator = self._rows()
        while len(self.buffer) - self.used < need:
            text, passes, row = next(self._iterator)
            data = b"" if _held_out(text) else self.tokenizer.encode(text)
            self.buffer += data
            self.buffered.append((len(data), passes, row))

    def next(self) -> torch.Tensor:
        need = self.window * self.batch_size * self.tokenizer.itemsize
        self._fill(need)
        chunk = torch.frombuffer(self.buffer[self.used:self.used + need], dtype=self.tokenizer.dtype)  # (a copy)
        self.used += need
        # drop the rows wholly used: the position counts from the first row still in the buffer
        while self.buffered and self.buffered[0][0] <= self.used:
            size = self.buffered.pop(0)[0]
            del self.buffer[:size]
            self.used -= size
        return chunk.view(self.batch_size, self.window).long()
