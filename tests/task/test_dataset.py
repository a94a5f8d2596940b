"""`--dataset`: text rows through HF `datasets` (local JSONL / Parquet / text, read whole or streamed), held-out
rows by hash, each peer its own stretch, a position that a checkpoint can bring back."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")

from p2p_diloco.core.config import ConfigError  # noqa: E402
from p2p_diloco.task.dataset import TextDataset, _held_out  # noqa: E402
from p2p_diloco.task.tokenizer import HFTokenizer  # noqa: E402
from pretrained import write_pretrained  # noqa: E402

SEPARATOR = b"\n"  # byte-level rows are joined by it


def stdlib_rows(count: int, size: int = 1500) -> list[str]:
    """`count` rows of real text: consecutive pieces of a few standard library modules."""
    text = ""
    for module in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += module.read_text(errors="replace")
        if len(text) >= count * size:
            break
    return [text[i * size:(i + 1) * size] for i in range(count)]


def write_jsonl(path: Path, rows: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": i, field: r}) + "\n")
    return path


@pytest.fixture(scope="module")
def rows() -> list[str]:
    return stdlib_rows(300)


@pytest.fixture
def folder(tmp_path, rows) -> Path:
    write_jsonl(tmp_path / "data" / "a.jsonl", rows[:150])
    write_jsonl(tmp_path / "data" / "b.jsonl", rows[150:])
    return tmp_path / "data"


def batches(stream, n: int) -> list[torch.Tensor]:
    return [stream.next() for _ in range(n)]


@pytest.mark.parametrize("streaming", [False, True])
def test_peers_read_their_own_rows_and_never_a_held_out_one(folder, rows, streaming):
    ds = TextDataset.load(str(folder), streaming=streaming)
    assert ds.field == "text" and ds.streaming == streaming
    held = [r for r in rows if _held_out(r)]
    assert 3 <= len(held) <= 40  # about 5 % of 300
    evals = ds.eval_batches(seq_len=32, batch_size=4, num_batches=2)
    assert [tuple(b.shape) for b in evals] == [(4, 33), (4, 33)]
    held_text = SEPARATOR.join(r.encode() for r in held)
    assert bytes(evals[0][0].to(torch.uint8).tolist()) in held_text  # eval windows come from held-out rows...
    a, b = ds.stream(32, 4, run_seed=0, peer_seed=1), ds.stream(32, 4, run_seed=0, peer_seed=2)
    seen_a = b"".join(bytes(w.to(torch.uint8).tolist()) for batch in batches(a, 30) for w in batch)
    seen_b = b"".join(bytes(w.to(torch.uint8).tolist()) for batch in batches(b, 30) for w in batch)
    for r in held:  # ...and no training window from one
        assert r[200:260].encode() not in seen_a and r[200:260].encode() not in seen_b
    # two peers read different rows (a 4 KB window of text lies in one of them only)
    assert seen_a[:4000] not in seen_b and seen_b[:4000] not in seen_a
    train_text = SEPARATOR.join(r.encode() for r in rows if not _held_out(r))
    assert seen_a[1000:1100] in train_text


@pytest.mark.parametrize("streaming", [False, True])
def test_a_stream_comes_back_to_its_position(folder, streaming):
    ds = TextDataset.load(str(folder), streaming=streaming)
    first = ds.stream(1023, 4, run_seed=5, peer_seed=7)  # 4 KB a batch
    batches(first, 11)
    where = json.loads(json.dumps(first.position()))  # (as a checkpoint's metadata keeps it)
    expected = batches(first, 120)  # (past the end of a pass over the 450 KB: the reading starts over)
    assert first.passes == 1
    again = ds.stream(1023, 4, run_seed=5, peer_seed=7)
    again.seek(where)
    assert all(torch.equal(x, y) for x, y in zip(expected, batches(again, 120)))
    with pytest.raises(ConfigError, match="not one of"):
        again.seek({"dataset": "elsewhere", "pass": 0, "row": 0, "offset": 0})
    with pytest.raises(ConfigError, match="not one of"):
        again.seek({"dataset": str(folder), "row": -1})


def test_parquet_and_text_files_and_a_named_field(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"body": rows, "n": list(range(len(rows)))}), tmp_path / "pq" / "rows.parquet")
    ds = TextDataset.load(str(tmp_path / "pq"), field="body")
    assert len(ds.rows) == 300 and "300 rows" in ds.describe()
    assert ds.stream(32, 2, 0, 0).next().shape == (2, 33)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "lines.txt").write_text("\n".join(r.replace("\n", " ") for r in rows))
    assert TextDataset.load(str(tmp_path / "txt")).field == "text"


def test_bad_datasets_are_refused_by_name(tmp_path, rows):
    with pytest.raises(ConfigError, match="no such file or folder"):
        TextDataset.load(str(tmp_path / "nowhere" / "at" / "all"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.bin").write_bytes(b"\0\1")
    with pytest.raises(ConfigError, match="no .*files in it"):
        TextDataset.load(str(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    write_jsonl(mixed / "a.jsonl", rows[:5])
    (mixed / "b.txt").write_text("x")
    with pytest.raises(ConfigError, match="several formats"):
        TextDataset.load(str(mixed))
    other = write_jsonl(tmp_path / "other" / "a.jsonl", rows[:20], field="body")
    with pytest.raises(ConfigError, match=r"no text field among its columns \['id', 'body'\]"):
        TextDataset.load(str(other))
    with pytest.raises(ConfigError, match="no field 'title'"):
        TextDataset.load(str(other), field="title")
    with pytest.raises(ConfigError, match="field 'id' is int, not text"):
        TextDataset.load(str(other), field="id").stream(32, 2, 0, 0).next()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(ConfigError, match="cannot load it as a local dataset"):
        TextDataset.load(str(broken))
    small = write_jsonl(tmp_path / "small" / "a.jsonl", [r for r in rows if not _held_out(r)][:10])
    with pytest.raises(ConfigError, match="held-out rows .* hold 0 tokens"):
        TextDataset.load(str(small)).eval_batches(32, 2, 2)


def test_a_malformed_line_met_in_a_stream_is_an_error_naming_the_dataset(tmp_path, rows):
    folder = tmp_path / "late"
    write_jsonl(folder / "a.jsonl", rows[:50])
    with open(folder / "a.jsonl", "a") as f:
        f.write('{"text": unquoted}\n')
    ds = TextDataset.load(str(folder), streaming=True)  # (a stream is read lazily: the load passes)
    with pytest.raises(ConfigError, match=f"--dataset {folder}: reading it failed"):
        batches(ds.stream(1023, 4, 0, 0), 30)


def test_a_tokenizer_s_ids_stream_come_back_to_their_position_and_identify_it(tmp_path, folder, rows):
    model = write_pretrained(tmp_path / "model", "".join(rows[:60]))
    tokenizer = HFTokenizer.load(str(model))
    assert tokenizer.vocab_size == 400 and tokenizer.describe() == "tokenizer model (400 tokens)"
    assert HFTokenizer.load(str(model)).sha256 == tokenizer.sha256  # the same tokenizer, the same name
    other = write_pretrained(tmp_path / "other", "".join(rows[60:120]))
    assert HFTokenizer.load(str(other)).sha256 != tokenizer.sha256  # other merges learnt: another name
    ds = TextDataset.load(str(folder), tokenizer=tokenizer)
    assert ds.describe().endswith("tokenizer model (400 tokens))")
    evals = ds.eval_batches(seq_len=32, batch_size=4, num_batches=2)
    assert [tuple(b.shape) for b in evals] == [(4, 33), (4, 33)] and evals[0].dtype == torch.long
    first = ds.stream(63, 4, run_seed=5, peer_seed=7)
    start = batches(first, 5)
    assert all(b.dtype == torch.long and b.max() < 400 and b.min() >= 0 for b in start)
    eos = tokenizer.end
    assert any((b == eos).any() for b in start)  # rows end with the end-of-text token
    ids = torch.cat([b.reshape(-1) for b in start]).tolist()  # the peer's first rows, as the tokenizer encodes them
    first_row = rows[int(first.order[first.start])] if not _held_out(rows[int(first.order[first.start])]) else None
    if first_row is not None:
        expected = tokenizer._ids(first_row) + [eos]
        assert ids[:len(expected)] == expected[:len(ids)]
    where = json.loads(json.dumps(first.position()))
    assert where["offset"] % 4 == 0  # (a byte offset into the current row's int32 ids)
    expected = batches(first, 30)
    again = ds.stream(63, 4, run_seed=5, peer_seed=7)
    again.seek(where)
    assert all(torch.equal(x, y) for x, y in zip(expected, batches(again, 30)))
    for bad, message in ((tmp_path / "nowhere", "no such directory"), (folder, "no tokenizer in it")):
        with pytest.raises(ConfigError, match=message):
            HFTokenizer.load(str(bad))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load it"):
        HFTokenizer.load(str(broken))
