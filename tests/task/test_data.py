"""The byte-level data: stdlib sources by default, user files, a held-out split by file."""

import pytest
import torch

from p2p_diloco.core.config import ConfigError
from p2p_diloco.task.data import BatchStream, Corpus


def test_default_corpus_is_the_stdlib_with_a_held_out_split():
    c = Corpus.load(max_bytes=200_000)
    assert "standard library" in c.description
    assert c.train.numel() >= 200_000 and c.held_out.numel() > 10_000
    assert c.train.dtype == torch.uint8
    text = bytes(c.train[:5000].tolist())
    assert b"def " in text or b"import " in text


def test_user_folder_and_shards(tmp_path):
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_text(f"file {i} " * 300)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)  # binary files are skipped
    c = Corpus.load([str(tmp_path)])
    assert "6 text files" in c.description
    assert b"\0" not in bytes(c.train.tolist())
    shards = [c.shard(i, 3) for i in range(3)]
    assert sum(s.numel() for s in shards) == c.train.numel()
    stream = BatchStream(shards[1], seq_len=16, batch_size=4, seed=1)
    b = stream.next()
    assert b.shape == (4, 17) and b.dtype == torch.long
    again = BatchStream(shards[1], seq_len=16, batch_size=4, seed=1).next()
    assert torch.equal(b, again)
    eval_batches = c.eval_batches(seq_len=16, batch_size=4, num_batches=3)
    assert all(e.shape[1] == 17 for e in eval_batches)


def test_bad_data_paths_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Corpus.load([str(tmp_path / "nope")])
    (tmp_path / "one.txt").write_text("hello " * 100)
    with pytest.raises(ConfigError, match="single file"):
        Corpus.load([str(tmp_path / "one.txt")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no text files"):
        Corpus.load([str(empty)])
    with pytest.raises(ConfigError, match="too few"):
        BatchStream(torch.zeros(10, dtype=torch.uint8), seq_len=16, batch_size=2, seed=0)
