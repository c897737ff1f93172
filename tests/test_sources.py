"""Sources read as a stream of documents, cut into units, and the held-out split by document hash."""
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from stem_jax import sources
from stem_jax.config import DataConfig


def _docs(data: DataConfig, progress: list | None = None) -> list[str]:
    """Every document of every unit; ``progress`` collects the units' Progress."""
    spec = sources.Spec(data.source, data.text_key, data.tfds_data_dir, data.skip_bad_records)
    docs = []
    for unit in sources.plan(data)[1]:
        p = sources.Progress()
        docs += sources.documents(unit, spec, p)
        if progress is not None:
            progress.append(p)
    return docs


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["stem", "table", "row", "token", "gate", "é", "\u2603", "shard", "the", "of"]
    return [{"id": i, "text": " ".join(rng.choice(words, rng.integers(1, 40)))} for i in range(n)]


def test_default_corpus_documents():
    docs = sources.default_documents()
    assert len(docs) == 66 + 42
    assert docs[0].startswith("Genesis\n\nIn the beginning God created") and "[" not in docs[0]
    assert sum(len(t) for t in docs) > 9_000_000
    assert _docs(DataConfig()) == docs  # the four units read the same documents in the same order


def test_held_out_is_a_stable_hash_of_the_text():
    texts = [f"document {i}" for i in range(4000)]
    chosen = [t for t in texts if sources.held_out(t, 20)]
    assert 150 < len(chosen) < 250  # about 1 in 20
    assert [t for t in reversed(texts) if sources.held_out(t, 20)] == chosen[::-1]  # order plays no part


@pytest.mark.parametrize("unit_bytes", [7, 64, 100, 1 << 20])
def test_jsonl_byte_ranges_read_every_line_once(tmp_path, monkeypatch, unit_bytes):
    recs = _records(60)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" + ("\n" if r["id"] % 7 == 0 else "")
                            for r in recs))
    monkeypatch.setattr(sources, "UNIT_BYTES", unit_bytes)
    data = DataConfig(source="jsonl", files=str(path))
    units = sources.plan(data)[1]
    assert len(units) == -(-path.stat().st_size // unit_bytes)
    assert _docs(data) == [r["text"] for r in recs]


def test_compressed_jsonl_and_globs(tmp_path):
    recs = _records(30)
    lines = [json.dumps(r) + "\n" for r in recs]
    (tmp_path / "part-0.jsonl.gz").write_bytes(gzip.compress("".join(lines[:15]).encode()))
    (tmp_path / "part-1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines[15:]).encode()))
    data = DataConfig(source="jsonl", files=str(tmp_path / "part-*"))
    assert [u.stop for u in sources.plan(data)[1]] == [-1, -1]  # a compressed file is one unit
    assert _docs(data) == [r["text"] for r in recs]
    with pytest.raises(FileNotFoundError, match=r"data.files: '.*nothing-\*.jsonl' matches no file"):
        sources.plan(DataConfig(source="jsonl", files=str(tmp_path / "nothing-*.jsonl")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt' is not a jsonl file \(expected .jsonl"):
        sources.plan(DataConfig(source="jsonl", files=str(tmp_path / "notes.txt")))


def test_bad_jsonl_records_are_named_or_skipped(tmp_path, monkeypatch):
    good = [json.dumps(r) for r in _records(12)]
    lines = good[:5] + ["{not json"] + good[5:9] + ['{"body": "no text field"}', "[1, 2]"] + good[9:]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sources, "UNIT_BYTES", 200)  # the bad lines fall in later units: line numbers still count
    data = DataConfig(source="jsonl", files=str(path))
    with pytest.raises(sources.BadRecordError, match=r"bad.jsonl:6: the record is not JSON \(.*\); fix it, or set "
                                                     r"data.skip_bad_records=true"):
        _docs(data)
    lines[5] = good[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(sources.BadRecordError, match=r"bad.jsonl:11: the record has no field 'text' \(data.text_key; it has body\)"):
        _docs(data)
    data.skip_bad_records, progress = True, []
    docs = _docs(data, progress)
    assert len(docs) == 13 and sum(p.skipped for p in progress) == 2


def test_parquet_row_groups_become_units(tmp_path, monkeypatch):
    recs = _records(50)
    table = pa.table({"id": [r["id"] for r in recs], "content": [r["text"] for r in recs]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=8)
    monkeypatch.setattr(sources, "UNIT_BYTES", 1)  # one row group per unit
    data = DataConfig(source="parquet", files=str(tmp_path / "*.parquet"), text_key="content")
    assert len(sources.plan(data)[1]) == 7
    assert _docs(data) == [r["text"] for r in recs]
    with pytest.raises(ValueError, match=r"a.parquet' has no column 'text' \(columns: id, content\); set data.text_key"):
        sources.plan(DataConfig(source="parquet", files=str(tmp_path / "a.parquet")))
    (tmp_path / "b.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"b.parquet' is not a Parquet file"):
        sources.plan(DataConfig(source="parquet", files=str(tmp_path / "b.parquet")))


def test_text_files_are_cut_into_documents_and_checked(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("".join(f"line {i}\n" for i in range(450)))
    docs = _docs(DataConfig(source="text", files=str(path)))
    assert [d.count("\n") for d in docs] == [200, 200, 50] and "".join(docs) == path.read_text()
    with pytest.raises(FileNotFoundError, match="'/no/such.txt' is not a readable file"):
        sources.plan(DataConfig(source="text", files="/no/such.txt"))


def test_text_files_that_are_not_text_are_named():
    said = []
    sources.check_text("plain text\n".encode() * 100, "a.txt", said.append)
    assert said == []
    sources.check_text(b"caf\xe9 " + "fine text\n".encode() * 200, "latin1.txt", said.append)
    assert said == ["warning: data.files: 'latin1.txt' has 1 undecodable byte sequence(s), read as U+FFFD"]
    with pytest.raises(ValueError, match=r"'model.bin' is not a text file \(it has a NUL byte at offset 3\)"):
        sources.check_text(b"abc\x00def", "model.bin")
    with pytest.raises(ValueError, match=r"'img.jpg' is not UTF-8 text \(20 undecodable byte sequences in 20 bytes\)"):
        sources.check_text(b"\xff\xd8" * 10, "img.jpg")
