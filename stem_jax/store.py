"""Reading a token store, and its integrity. A store is a folder (``corpus.py`` builds it):

    tokenizer.json            the tokenizer the store was tokenized with
    plan.json                 what the store is built from (its fingerprint); written first
    shards/KEY.train.bin      token ids (uint16, or uint32 past 65,536 tokens) of unit KEY's training documents,
                              each followed by the end-of-document token; KEY: 16 hex chars of sha256 over the
                              unit's input identity (file, size, mtime or content hash, range, split tag)
    shards/KEY.val.bin        the unit's held-out documents, the same way
    shards/KEY.json           the unit's counts and the sha256 of its two shards, written after its shards: a unit
                              with it is finished
    store.json                the store's description, written last: a store with it is complete. Format
                              ``STORE_VERSION``; ``shards`` lists the units' counts in plan order, with
                              ``tokenizer_sha256`` and ``content_fingerprint``
    .build.lock               held (``flock``) by the one process that builds; the others wait on it

``open_store`` checks every shard's size against ``store.json`` (a ``stat`` each); ``verify`` (and
``open_store(verify=True)``) also checks their sha256. A damaged store raises ``StoreDamagedError`` naming the
command that rebuilds only the damaged units. Shards are read with ``pread`` (never ``mmap``: a file truncated
under a mapping kills the process with SIGBUS), and a shard that changes under a reader (truncated, deleted,
rebuilt) raises ``StoreChangedError``. The content fingerprint identifies the tokens, not the folder.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tokenizers import Tokenizer

STORE_VERSION = "3"
MAX_OPEN_SHARDS = 256  # open file descriptors of shards per process, least recently used closed first
SPLITS = ("train", "val")
VERIFY_THREADS = min(os.cpu_count() or 1, 8)  # shards hashed at once by verify
PROGRESS_SECONDS = 10  # verify logs its progress this often


class StoreError(ValueError):
    """A store, tokenizer file or build that cannot be used."""


class StoreDamagedError(StoreError):
    """A shard is missing, of the wrong size or has the wrong checksum; ``data_prep --repair`` rebuilds it."""


class StoreChangedError(StoreError):
    """A shard changed under a reader: truncated, deleted or rebuilt while the store was open."""


def shard_path(root: str | Path, key: str, split: str) -> Path:
    return Path(root) / "shards" / f"{key}.{split}.bin"


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_sha256(tok: Tokenizer | str) -> str:
    """sha256 hex[:16] of the tokenizer's JSON (``checkpoint.fingerprint`` of it)."""
    return hashlib.sha256((tok if isinstance(tok, str) else tok.to_str()).encode()).hexdigest()[:16]


def content_fingerprint(meta: dict) -> str:
    """What the store holds: tokenizer, dtype, EOS and each split's shards (tokens, sha256) in order; not where it
    lies, nor the unit keys or input paths, so an identical copy anywhere has the same fingerprint."""
    splits = {s: [[u[s], u[f"{s}_sha256"]] for u in meta["shards"] if u[s]] for s in SPLITS}
    key = json.dumps([meta["tokenizer_sha256"], meta["dtype"], meta["eos_id"], splits])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _Fds:
    """Open descriptors of shards, at most ``cap`` per process; the least recently used is closed first, once
    no read (of another thread) is using it. Entries: [fd, users, evicted]."""

    def __init__(self, cap: int):
        self.cap, self.lock, self.open = cap, threading.Lock(), collections.OrderedDict()
        # a child forked while another thread held the lock would wait on it for ever
        os.register_at_fork(after_in_child=lambda: setattr(self, "lock", threading.Lock()))

    def acquire(self, shard: "Shard") -> list:
        with self.lock:
            entry = self.open.pop(shard.key, None)
            if entry is None:
                try:
                    fd = os.open(shard.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise shard.changed() from None
                if shard.ino is not None and os.fstat(fd).st_ino != shard.ino:  # replaced since open_store
                    os.close(fd)
                    raise shard.changed(shard.ino)
                entry = [fd, 0, False]
            entry[1] += 1
            self.open[shard.key] = entry
            while len(self.open) > self.cap:
                _, old = self.open.popitem(last=False)
                old[2] = True
                if not old[1]:
                    os.close(old[0])
            return entry

    def release(self, entry: list, drop: tuple | None = None) -> None:
        """End a read; ``drop``: forget the path's descriptor (its file changed: the next read opens it anew)."""
        with self.lock:
            entry[1] -= 1
            if drop and self.open.get(drop) is entry:
                del self.open[drop]
                entry[2] = True
            if entry[2] and not entry[1]:
                os.close(entry[0])


_FDS = _Fds(MAX_OPEN_SHARDS)


class Shard:
    """One shard file of ``n`` tokens, read with ``pread``: ``shard[lo:hi]`` (clipped like numpy) and
    ``np.asarray(shard)`` are arrays. A shard that is not as ``store.json`` records it any more (truncated,
    grown, deleted, replaced) raises StoreChangedError."""

    def __init__(self, root: Path, path: Path, n: int, dtype: np.dtype, ino: int | None = None):
        self.root, self.path, self.n, self.dtype = root, str(path), int(n), np.dtype(dtype)
        self.nbytes = self.n * self.dtype.itemsize
        # the file open_store found: descriptors are shared per (path, inode), so a store opened again after a
        # shard was rebuilt reads the new file, and a reader of the old store never reads the new one
        self.ino, self.key = ino, (self.path, ino)

    def __len__(self) -> int:
        return self.n

    def changed(self, opened: int | None = None) -> StoreChangedError:
        """``opened``: the inode read (or expected)."""
        try:
            st = os.stat(self.path)
            now = f"{st.st_size} bytes" + (", another file" if opened is not None and st.st_ino != opened else "")
        except FileNotFoundError:
            now = "gone"
        return StoreChangedError(f"the token store {self.root} changed while it was being read: {self.path} "
                                 f"({now}, store.json records {self.nbytes} bytes): rebuilt, truncated or deleted "
                                 f"under the run")

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError(f"a shard is read in slices, shard[lo:hi], not with {index!r}")
        lo, hi, step = index.indices(self.n)
        return self.read(lo, hi) if step == 1 else self.read(0, self.n)[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.read(0, self.n).astype(self.dtype if dtype is None else dtype, copy=False)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens ``[lo, hi)``, 0 <= lo and hi <= len."""
        out = np.empty(max(hi - lo, 0), self.dtype)
        view, off, done = memoryview(out).cast("B"), lo * self.dtype.itemsize, 0
        entry, st = _FDS.acquire(self), None
        try:
            while done < len(view):
                got = os.preadv(entry[0], [view[done:]], off + done)
                if not got:  # the end of the file before the recorded size: truncated under the run
                    break
                done += got
            st = os.fstat(entry[0])
        finally:  # a descriptor reads a deleted or replaced file on: its link count is 0 then
            bad = st is None or done < len(view) or st.st_nlink == 0 or st.st_size != self.nbytes
            _FDS.release(entry, drop=self.key if bad else None)
        if bad:
            raise self.changed(st.st_ino if st is not None else None)
        return out


class Split:
    """The token ids of one split: a list of shards (opened on use), read as one sequence."""

    def __init__(self, name: str, sizes: list[int], open_shard: Callable[[int], "Shard | np.ndarray"]):
        self.name, self.sizes, self.open_shard = name, [int(n) for n in sizes], open_shard
        self.starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])

    @classmethod
    def of(cls, arrays: np.ndarray | list[np.ndarray], name: str = "tokens") -> "Split":
        """A split held in memory (one array, or one per shard)."""
        arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
        return cls(name, [len(a) for a in arrays], arrays.__getitem__)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens ``[lo, hi)`` of the split, across shard boundaries."""
        hi = min(hi, len(self))
        parts, s = [], max(int(np.searchsorted(self.starts, lo, side="right")) - 1, 0)
        while lo < hi and s < len(self.sizes):
            off = lo - int(self.starts[s])
            take = min(hi - lo, self.sizes[s] - off)
            parts.append(np.asarray(self.open_shard(s)[off:off + take]))
            lo, s = lo + take, s + 1
        return np.concatenate(parts) if parts else np.zeros((0,), np.int32)

    def shards(self) -> Iterable["Shard | np.ndarray"]:
        return (self.open_shard(s) for s in range(len(self.sizes)))


@dataclasses.dataclass
class Corpus:
    """A store's tokenizer and its train / val splits."""
    path: Path
    tokenizer: Tokenizer
    train: Split
    val: Split
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    @property
    def fingerprint(self) -> str:
        return content_fingerprint(self.meta)

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer_sha256"]


def _read_meta(root: Path) -> dict:
    """``store.json`` of a complete store of this format, or a one-line StoreError."""
    if not (root / "store.json").is_file():
        raise StoreError(f"{str(root)!r} is not a finished token store (no store.json): build it with "
                         f"`python -m stem_jax.data_prep --out {root} ...`; a rerun resumes an interrupted build")
    try:
        meta = json.loads((root / "store.json").read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{root / 'store.json'} cannot be read ({e}): build the store again into a new folder")
    version = str(meta.get("version"))
    if version != STORE_VERSION:
        older = version.isdigit() and int(version) < int(STORE_VERSION)
        raise StoreError(f"the token store {root} has format {version!r} ({'an older' if older else 'another'} "
                         f"stem-jax built it); this version reads format {STORE_VERSION!r}: build it again into a "
                         f"new folder with `python -m stem_jax.data_prep --out NEW_FOLDER ...` (nothing is deleted)")
    return meta


def _files(root: Path, meta: dict) -> list[tuple[Path, int, str]]:
    """(path, bytes, sha256) of every non-empty shard; empty ones are never read."""
    size = np.dtype(meta["dtype"]).itemsize
    return [(shard_path(root, u["key"], s), u[s] * size, u[f"{s}_sha256"])
            for u in meta["shards"] for s in SPLITS if u[s]]


def _size_problem(path: Path, nbytes: int) -> str | None:
    try:
        have = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing (store.json records {nbytes} bytes)"
    return None if have == nbytes else f"{path} has {have} bytes, store.json records {nbytes}"


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:  # deleted since the size check: the first read says so
        return None


def _damaged(root: Path, problems: list[str]) -> StoreDamagedError:
    more = f" (and {len(problems) - 1} more damaged shard(s))" if len(problems) > 1 else ""
    return StoreDamagedError(f"the token store {root} is damaged: {problems[0]}{more}; repair it with `python -m "
                             f"stem_jax.data_prep --repair --out {root}` (rebuilds only the damaged units)")


def _problem(shard: Path, nbytes: int, sha: str) -> str | None:
    try:
        return _size_problem(shard, nbytes) or (None if file_sha256(shard) == sha else f"{shard} has the wrong sha256")
    except OSError as e:
        return f"{shard} cannot be read ({e.strerror})"


def _check(root: Path, log: Callable[[str], None], threads: int) -> dict[str, str]:
    """{shard file: what is wrong} of every damaged shard, ``threads`` shards hashed at once."""
    files, damaged = _files(root, _read_meta(root)), {}
    total, done = sum(n for _, n, _ in files), 0
    log(f"verifying the checksums of {len(files)} shard(s), {total / 1e9:.3g} GB, of the token store {root} ...")
    t0 = last = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        for (shard, nbytes, _), problem in zip(files, pool.map(lambda f: _problem(*f), files)):
            if problem:
                damaged[str(shard)] = problem
                log(f"damaged: {problem}")
            done += nbytes
            if time.perf_counter() - last > PROGRESS_SECONDS:
                last = time.perf_counter()
                log(f"verified {done / 1e9:.3g} of {total / 1e9:.3g} GB ({done / 1e9 / (last - t0):.2f} GB/s)")
    seconds = time.perf_counter() - t0
    log(f"verified {total / 1e9:.3g} GB in {seconds:.1f} s ({total / 1e9 / max(seconds, 1e-9):.2f} GB/s): "
        + (f"{len(damaged)} damaged shard(s)" if damaged else "all shards intact"))
    return damaged


def verify(path: str | Path, log: Callable[[str], None] = print, threads: int = VERIFY_THREADS) -> list[str]:
    """The store's damaged shard files (missing, wrong size or wrong sha256); every shard is read once, by
    ``threads`` threads (hashlib hashes without the GIL). Progress goes to ``log``."""
    return list(_check(Path(path).expanduser(), log, threads))


def open_store(path: str | Path, verify: bool = False, log: Callable[[str], None] = print) -> Corpus:
    """A complete store, every shard's size checked against ``store.json``; with ``verify``, their checksums
    (progress to ``log``)."""
    root = Path(path).expanduser()
    meta = _read_meta(root)
    problems = [p for f, n, _ in _files(root, meta) if (p := _size_problem(f, n))]
    if problems or (verify and (problems := list(_check(root, log, VERIFY_THREADS).values()))):
        raise _damaged(root, problems)
    try:
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - the Rust parser raises a bare Exception
        why = "is missing" if not (root / "tokenizer.json").is_file() else f"cannot be read ({str(e).splitlines()[0]})"
        raise StoreError(f"{root / 'tokenizer.json'} {why}: build the store again into a new folder") from None
    if tokenizer_sha256(tok) != meta["tokenizer_sha256"]:
        raise StoreError(f"{root / 'tokenizer.json'} is not the tokenizer the store was tokenized with (sha256 "
                         f"{tokenizer_sha256(tok)}, store.json records {meta['tokenizer_sha256']}): put it back, or "
                         f"build the store again into a new folder")
    dtype = np.dtype(meta["dtype"])

    def split(name: str) -> Split:
        paths = [(shard_path(root, u["key"], name), u[name]) for u in meta["shards"] if u[name]]
        shards = [Shard(root, p, n, dtype, _inode(p)) for p, n in paths]
        return Split(f"{root}/{name}", [len(s) for s in shards], shards.__getitem__)
    return Corpus(root, tok, split("train"), split("val"), meta)
