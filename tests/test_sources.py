"""Sources read as a stream of documents, cut into units, and the held-out split by document hash."""
import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import re

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


# --- broken files: errors naming the file, never skipped records -----------------------------------------------

def _lines(n: int) -> list[bytes]:
    return [(json.dumps(r, ensure_ascii=False) + "\n").encode() for r in _records(n, seed=1)]


def _zst_blocks(lines: list[bytes], per_block: int) -> tuple[bytes, list[int]]:
    """One streamed zstd frame, flushed every ``per_block`` lines; (bytes, the offsets where blocks end)."""
    buf, ends = io.BytesIO(), []
    with zstandard.ZstdCompressor().stream_writer(buf, closefd=False) as w:
        for i in range(0, len(lines), per_block):
            w.write(b"".join(lines[i:i + per_block]))
            w.flush(zstandard.FLUSH_BLOCK)
            ends.append(buf.tell())
    return buf.getvalue(), ends


def _read_until_error(path, skip: bool) -> tuple[list[str], sources.Progress, Exception | None]:
    data = DataConfig(source="jsonl", files=str(path), skip_bad_records=skip)
    spec, got, progress = sources.Spec("jsonl", skip_bad_records=skip), [], sources.Progress()
    try:
        for unit in sources.plan(data)[1]:
            for text in sources.documents(unit, spec, progress):
                got.append(text)
    except Exception as e:  # noqa: BLE001 - the test looks at what it is
        return got, progress, e
    return got, progress, None


def _broken_files(tmp_path) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, what the message says), each broken as downloads and disks break files."""
    lines = _lines(120)
    whole = b"".join(lines)
    zst, ends = _zst_blocks(lines, 10)
    crc = bytearray(gzip.compress(whole))
    crc[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    flipped = bytearray(gzip.compress(whole))
    flipped[len(flipped) // 2] ^= 0xFF  # a byte of the deflate stream
    two = zstandard.ZstdCompressor().compress(whole[:3000]) + zstandard.ZstdCompressor().compress(whole[3000:])
    return {
        "cut.jsonl.gz": (gzip.compress(whole)[:len(gzip.compress(whole)) * 2 // 3], "it is cut short"),
        # cut where a block ends: every line before decodes, and stream_reader would end without a word
        "cut-at-block.jsonl.zst": (zst[:ends[5]], "it is cut short (the file ends inside a zstd frame)"),
        "cut-mid.jsonl.zst": (zst[:ends[5] + 7], "it is cut short"),
        "cut-second-frame.jsonl.zst": (two[:-20], "it is cut short"),
        "crc.jsonl.gz": (bytes(crc), "its gzip data is corrupt (CRC check failed"),
        "flipped.jsonl.gz": (bytes(flipped), "its gzip data is corrupt"),
        "garbage.jsonl.zst": (b"\x28\xb5\x2f\xfd" + b"\xff" * 64, "its zstd data is corrupt"),
    }


@pytest.mark.parametrize("skip", [False, True])
def test_truncated_or_corrupt_compressed_files_are_broken_files_not_bad_records(tmp_path, skip):
    texts = [json.loads(x)["text"] for x in _lines(120)]
    for name, (raw, why) in _broken_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(raw)
        got, progress, e = _read_until_error(path, skip)
        assert isinstance(e, sources.BrokenFileError), (name, e)
        msg = str(e)
        assert "\n" not in msg and f"data.files: {str(path)!r} is broken: {why}" in msg, msg
        assert f"of {len(raw):,} compressed bytes read, at line " in msg and msg.endswith(
            "; copy/download it again or remove it from data.files"), msg
        if name != "flipped.jsonl.gz":  # garbled deflate data is only caught by the CRC at the end: the unit fails
            assert got == texts[:len(got)] and progress.skipped == 0, name  # what was read is right; none skipped
        assert pickle.loads(pickle.dumps(e)).args == e.args  # workers raise it through a process pool


def test_a_streamed_zst_of_several_frames_reads_whole(tmp_path):
    lines = _lines(50)
    zst, _ = _zst_blocks(lines, 7)
    path = tmp_path / "whole.jsonl.zst"
    path.write_bytes(zst + zstandard.ZstdCompressor().compress(b"".join(lines)))  # two frames, the first streamed
    got, progress, e = _read_until_error(path, False)
    assert e is None and got == [json.loads(x)["text"] for x in lines] * 2


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_cut_last_line_is_a_broken_file_even_when_skipping(tmp_path, suffix):
    lines = _lines(20)
    whole = b"".join(lines)
    path = tmp_path / f"cut{suffix}"
    pack = gzip.compress if suffix.endswith(".gz") else bytes
    path.write_bytes(pack(whole[:-15]))  # line 20 loses its end and its newline
    for skip in (False, True):
        got, progress, e = _read_until_error(path, skip)
        assert isinstance(e, sources.BrokenFileError) and progress.skipped == 0
        assert str(e) == (f"data.files: {path}:20: the last line is cut off (not JSON, and no newline at the end of "
                          f"the file): the file looks truncated; copy/download it again or remove it from data.files")
        assert len(got) == 19
    path.write_bytes(pack(whole[:-1]))  # a last line without its newline is still a record
    assert _read_until_error(path, False)[0] == [json.loads(x)["text"] for x in lines]


def test_a_file_gone_or_changed_after_the_plan_names_it(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(_lines(10)))
    spec = sources.Spec("jsonl")
    (unit,) = sources.plan(DataConfig(source="jsonl", files=str(path)))[1]
    path.write_bytes(b"".join(_lines(11)))
    with pytest.raises(sources.BrokenFileError, match=rf"'{path}' changed while the store was being built \(now "):
        list(sources.documents(unit, spec))
    path.unlink()
    with pytest.raises(sources.BrokenFileError, match=rf"^data.files: '{path}' cannot be read \(No such file or "
                                                      r"directory\); copy/download it again"):
        list(sources.documents(unit, spec))


def test_a_damaged_parquet_row_group_names_the_file_and_group(tmp_path):
    recs = _records(40)
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in recs]}), path, row_group_size=10)
    page = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[page:page + 16] = b"\xff" * 16  # the page header of row group 2
    path.write_bytes(raw)
    data = DataConfig(source="parquet", files=str(path), skip_bad_records=True)
    (unit,) = sources.plan(data)[1]
    got = []
    with pytest.raises(sources.BrokenFileError, match=rf"^data.files: '{path}': row group 2 \(of 4\) cannot be read "
                                                      r"\(.*\); copy/download it again or remove it from data.files$"):
        got += sources.documents(unit, sources.Spec("parquet", skip_bad_records=True))
    assert got == [r["text"] for r in recs[:20]]


def test_edit_and_task_lines_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_bytes(b'{"source": "Paris"}\n\n{"source": "caf\xe9 \xff"}\n')
    with pytest.raises(KeyError, match=rf"{path}:3: not UTF-8 text \(byte 0xe9 at column 16\); save the file as UTF-8"):
        list(sources.json_objects(path, KeyError))
    path.write_bytes(b'\xef\xbb\xbf{"source": "a\xe2\x80\xa8b"}\r\n')  # a BOM; U+2028 in a string is no line break
    assert list(sources.json_objects(path, KeyError)) == [(f"{path}:1", {"source": "a\u2028b"})]


# --- unit keys -----------------------------------------------------------------------------------------------

def test_unit_keys_name_the_input_and_its_range(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(_lines(40)))
    monkeypatch.setattr(sources, "UNIT_BYTES", 1000)
    data = DataConfig(source="jsonl", files=str(path))
    units = sources.plan(data)[1]
    keys = [u.key() for u in units]
    assert len(units) > 2 and len(set(keys)) == len(keys) and all(len(k) == 16 and int(k, 16) >= 0 for k in keys)
    monkeypatch.chdir(tmp_path)
    assert [u.key() for u in sources.plan(DataConfig(source="jsonl", files="a.jsonl"))[1]] == keys  # same file
    ident = sources.config_identity(data, units)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # touched: read again
    again = sources.plan(data)[1]
    assert [u.key() for u in again] != keys and sources.config_identity(data, again) == ident
    other = DataConfig(source="jsonl", files=str(path), text_key="body")
    assert sources.config_identity(other, again) != ident
    # the key is sha256 over what names the input (an independent spelling of the contract)
    u = units[1]
    want = json.dumps(["jsonl", str(path.resolve()), u.file_size, u.mtime_ns, "", u.start, u.stop, ""])
    assert u.key() == hashlib.sha256(want.encode()).hexdigest()[:16]


def test_text_unit_keys_follow_the_content_not_the_time(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text\n" * 10)
    data = DataConfig(source="text", files=str(path))
    (key,) = [u.key() for u in sources.plan(data)[1]]
    os.utime(path, ns=(1, 1))
    assert [u.key() for u in sources.plan(data)[1]] == [key]
    path.write_text("more text\n" * 10)
    assert [u.key() for u in sources.plan(data)[1]] != [key]
    assert len({u.key() for u in sources.plan(DataConfig())[1]}) == 4  # the default corpus's parts


def test_a_broken_file_stops_a_store_build_through_the_worker_pool(tmp_path):
    """The error crosses the process pool whole (it pickles), and skipping bad records does not hide it."""
    from stem_jax import corpus  # a later layer: only this test builds a store
    lines = _lines(200)
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines))
    zst, ends = _zst_blocks(lines, 20)
    (tmp_path / "b.jsonl.zst").write_bytes(zst[:ends[3]])  # 80 whole lines, then the frame stops
    good = corpus.build_store(DataConfig(source="jsonl", files=str(tmp_path / "a.jsonl")), 300, tmp_path / "good",
                              workers=1, log=lambda *_: None)
    data = DataConfig(source="jsonl", files=f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl.zst", skip_bad_records=True,
                      tokenizer=str(good / "tokenizer.json"))
    with pytest.raises(sources.BrokenFileError) as e:
        corpus.build_store(data, 300, tmp_path / "both", workers=2, log=lambda *_: None)
    assert str(e.value).startswith(f"data.files: '{tmp_path}/b.jsonl.zst' is broken: it is cut short (the file "
                                   f"ends inside a zstd frame), after {ends[3]:,} of {ends[3]:,} compressed bytes "
                                   f"read, at line 81; ")


class _FailingDisk(io.RawIOBase):
    """A file whose reads fail with EIO past byte ``limit``, as a bad sector or a dropped network mount does."""

    def __init__(self, path, limit: int):
        self.f, self.limit = open(path, "rb"), limit  # noqa: SIM115 - closed with this object

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.f.tell() >= self.limit:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        data = self.f.read(min(len(b), self.limit - self.f.tell()))
        b[:len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_an_io_error_while_reading_names_the_file(tmp_path, monkeypatch, suffix):
    lines = _lines(6000)  # the gzip reader reads ahead 64 KiB or so: some lines come before the failure
    path = tmp_path / f"a{suffix}"
    path.write_bytes(gzip.compress(b"".join(lines)) if suffix.endswith(".gz") else b"".join(lines))
    (unit,) = sources.plan(DataConfig(source="jsonl", files=str(path)))[1]
    limit = path.stat().st_size // 2
    real_open = open
    monkeypatch.setattr(sources, "open", lambda p, mode="r", **kw: io.BufferedReader(_FailingDisk(p, limit))
                        if p == str(path) and mode == "rb" else real_open(p, mode, **kw), raising=False)
    got = []
    with pytest.raises(sources.BrokenFileError) as e:
        got += sources.documents(unit, sources.Spec("jsonl", skip_bad_records=True))
    assert re.fullmatch(rf"data.files: '{re.escape(str(path))}' is broken: reading it failed \(Input/output error\), "
                        rf"after {limit:,} of {path.stat().st_size:,} (compressed )?bytes read, at line \d+; "
                        rf"copy/download it again or remove it from data.files", str(e.value)), str(e.value)
    assert got == [json.loads(x)["text"] for x in lines[:len(got)]] and 0 < len(got) < len(lines)
