"""The tokenized corpus: a folder of token shards (a *store*), its tokenizer, and how both are built.

    tokenizer.json            the tokenizer: a byte-level BPE trained on the train split, or the user's own
    plan.json                 what the store is built from (its fingerprint); written first
    shards/NNNNN.train.bin    token ids (uint16, or uint32 past 65,536 tokens) of unit NNNNN's training
                              documents, each followed by the end-of-document token
    shards/NNNNN.val.bin      the unit's held-out documents, the same way
    shards/NNNNN.json         the unit's counts, written after its shards: a unit with it is finished
    store.json                the store's description, written last: a store with it is complete
    .build.lock               held (``flock``) by the one process that builds; the others wait on it

``build_store`` tokenizes the source's units (``sources.py``) in worker processes, one per core by default,
with a progress bar. Every file is written under a temporary name and renamed, so an interrupted build leaves
no half-written shard, and a rerun keeps the finished units. ``python -m stem_jax.data_prep`` builds a store
ahead of training; ``train.py`` builds one in ``data.cache_dir`` on first use (``open_corpus``).

One process builds a store at a time: the builder holds ``.build.lock``, and every other process that wants the
store (the other processes of a multi-process run) waits on that lock and then finds ``store.json``. The kernel
releases the lock when its holder dies, so a waiter then takes the build over and resumes it. Temporary files
carry the host name and pid of their writer; a build removes only those of its own host whose pid has exited.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import queue as queue_lib
import re
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from stem_jax import sources

STORE_VERSION = "2"
EOS = "<|endoftext|>"  # the trained tokenizer's end-of-document token, id 0
EOS_NAMES = (EOS, "<|end_of_text|>", "</s>", "<eos>")  # looked up in a user's tokenizer, in this order
ADD_SPECIAL_TOKENS = False  # documents skip the tokenizer's template (e.g. a Llama-3 BOS): the EOS alone separates them
MIN_BPE_VOCAB = 257  # byte-level BPE: 256 byte tokens + <|endoftext|>
TOKENIZER_SAMPLE_CHARS = 1 << 30  # a BPE is trained on at most this much training text (the first units')
ENCODE_BATCH = 64  # documents per encode call
PROGRESS_LINE_SECONDS = 30  # without a terminal for the progress bar, a progress line this often
BUILD_LOCK = ".build.lock"  # in a store's folder: held by the process that builds it


class StoreError(ValueError):
    """A store, tokenizer file or build that cannot be used."""


# --- tokenizers ------------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (HF tokenizers) with ``<|endoftext|>`` as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def read_tokenizer(path: str | Path, field: str = "data.tokenizer") -> Tokenizer:
    """A Hugging Face ``tokenizer.json``, or a one-line StoreError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise StoreError(f"{field}={str(path)!r} is not a file; give a Hugging Face tokenizer.json, or 'train'")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust parser raises a bare Exception
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StoreError(f"{field}={str(path)!r} is not a tokenizer.json the tokenizers library can read: "
                         f"{first}") from None


def tokenizer_size(tok: Tokenizer) -> int:
    """Ids the tokenizer can produce: its vocabulary and added (special) tokens."""
    return tok.get_vocab_size(with_added_tokens=True)


def eos_id(tok: Tokenizer, eos_token: str = "", where: str = "the tokenizer") -> int:
    """The id of the end-of-document token: ``eos_token``, or the first of ``EOS_NAMES`` the tokenizer has."""
    names = (eos_token,) if eos_token else EOS_NAMES
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise StoreError(f"{where} has no end-of-document token {' or '.join(names)}; documents need one between "
                     f"them (and data.packing finds documents by it): set data.eos_token to one it has")


def encode_text(tok: Tokenizer, text: str) -> Encoding:
    """``text`` encoded as training encodes a document (``_tokenize_unit``): without the tokenizer's
    special-token template, so no BOS that training never saw; the tools encode prompts with this."""
    return tok.encode(text, add_special_tokens=ADD_SPECIAL_TOKENS)


def _tokenizer_spec(data, vocab_size: int) -> str:
    if data.tokenizer == "train":
        return f"train:{data.tokenizer_vocab or vocab_size}"
    if data.tokenizer_vocab:
        raise StoreError("data.tokenizer_vocab applies to data.tokenizer=train only; a tokenizer file has its own")
    path = Path(data.tokenizer).expanduser()  # parsed by check_vocab, which every caller runs first
    if not path.is_file():
        raise StoreError(f"data.tokenizer={str(path)!r} is not a file; give a Hugging Face tokenizer.json, or 'train'")
    return f"file:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def check_vocab(data, vocab_size: int) -> None:
    """Before any work: the tokenizer to be trained or read fits ``model.vocab_size``."""
    if data.tokenizer == "train":
        n = data.tokenizer_vocab or vocab_size
        field = "data.tokenizer_vocab" if data.tokenizer_vocab else "model.vocab_size"
        if n < MIN_BPE_VOCAB:
            raise StoreError(f"{field}={n} is too small for the byte-level BPE tokenizer, which needs "
                             f"{MIN_BPE_VOCAB} tokens (256 bytes and {EOS})")
        if n > vocab_size:
            raise StoreError(f"data.tokenizer_vocab={n} is larger than model.vocab_size={vocab_size}: token ids "
                             f">= {vocab_size} would be out of range")
        return
    tok = read_tokenizer(data.tokenizer)
    if tokenizer_size(tok) > vocab_size:
        raise StoreError(f"the tokenizer {data.tokenizer!r} has {tokenizer_size(tok):,} tokens but model.vocab_size="
                         f"{vocab_size:,}; ids >= {vocab_size:,} would be out of range: raise model.vocab_size")
    eos_id(tok, data.eos_token, f"the tokenizer {data.tokenizer!r}")


# --- reading a store -------------------------------------------------------------------------------------------

class Split:
    """The token ids of one split: a list of shards (memmaps opened on use), read as one sequence."""

    def __init__(self, name: str, sizes: list[int], open_shard: Callable[[int], np.ndarray]):
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

    def shards(self) -> Iterable[np.ndarray]:
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
        return tokenizer_size(self.tokenizer)

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]


def open_store(path: str | Path) -> Corpus:
    """A complete store (one with ``store.json``)."""
    path = Path(path).expanduser()
    if not (path / "store.json").is_file():
        raise StoreError(f"{str(path)!r} is not a finished token store (no store.json): build it with "
                         f"`python -m stem_jax.data_prep --out {path} ...`; a rerun resumes an interrupted build")
    meta = json.loads((path / "store.json").read_text())
    if meta.get("version") != STORE_VERSION:
        raise StoreError(f"the store {str(path)!r} has format version {meta.get('version')!r}; this version reads "
                         f"{STORE_VERSION!r}: build it again")
    dtype = np.dtype(meta["dtype"])

    def split(name: str) -> Split:
        shards = [(s["index"], s[name]) for s in meta["shards"] if s[name]]

        @functools.lru_cache(maxsize=256)  # open files are bounded on stores of many shards
        def open_shard(k: int) -> np.ndarray:
            index, n = shards[k]
            return np.memmap(path / "shards" / f"{index:05d}.{name}.bin", dtype=dtype, mode="r", shape=(n,))
        return Split(f"{path}/{name}", [n for _, n in shards], open_shard)

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return Corpus(path, tok, split("train"), split("val"), meta)


# --- building a store ------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("STEM_JAX_CACHE", Path.home() / ".cache" / "stem_jax"))


def fingerprint(data, vocab_size: int, ident: str) -> str:
    """What decides a store's content: the source's identity, the split, the tokenizer and the EOS token."""
    key = f"{STORE_VERSION}|{ident}|{data.val_every}|{_tokenizer_spec(data, vocab_size)}|{data.eos_token}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _host() -> str:
    """This host's name as temporary file names carry it (no dots, so the name splits back)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _tmp_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it: ``.NAME.HOST.PID.tmp``."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.tmp")


def _is_tmp(path: Path) -> bool:
    """Whether ``path`` is a writer's temporary file (``.NAME.HOST.PID.tmp``)."""
    parts = path.name.split(".")
    return path.name.startswith(".") and len(parts) >= 5 and parts[-1] == "tmp" and parts[-2].isdigit()


def _write_atomic(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def load_corpus(data, vocab_size: int, log: Callable[[str], None] = print, workers: int | None = None) -> Corpus:
    """The store ``data.store`` names, or the one for ``data`` in the cache, built on first use."""
    check_vocab(data, vocab_size)
    if data.store:
        return open_store(data.store)
    ident, units = sources.plan(data, log)
    fp = fingerprint(data, vocab_size, ident)
    path = (Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()) / fp
    if not (path / "store.json").is_file():
        build_store(data, vocab_size, path, workers=data.workers if workers is None else workers, log=log,
                    planned=(ident, units))
    return open_store(path)


def _tokenizer(data, vocab_size: int, units: list[sources.Unit], spec: sources.Spec, out: Path,
               log: Callable[[str], None]) -> Tokenizer:
    """The store's tokenizer: kept from an interrupted build, copied from the user's file, or trained on the
    first ``TOKENIZER_SAMPLE_CHARS`` characters of training text."""
    path = out / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if data.tokenizer != "train":
        tok = read_tokenizer(data.tokenizer)
    else:
        n = data.tokenizer_vocab or vocab_size
        log(f"training the tokenizer (byte-level BPE, {n} tokens) on the train split ...")

        def texts():
            seen = 0
            for unit in units:
                for text in sources.documents(unit, spec):
                    if unit.split != "val" and (unit.split == "train" or not sources.held_out(text, data.val_every)):
                        yield text
                        seen += len(text)
                        if seen >= TOKENIZER_SAMPLE_CHARS:
                            return
        tok = train_tokenizer(texts(), n)
    _write_atomic(path, tok.to_str())
    return tok


_WORKER: dict = {}


def _init_worker(tok_json: str, eos: int, dtype: str, spec: sources.Spec, shard_dir: str, val_every: int,
                 progress) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    _WORKER.update(tok=Tokenizer.from_str(tok_json), eos=eos, dtype=np.dtype(dtype), spec=spec,
                   dir=Path(shard_dir), val_every=val_every, progress=progress)


def _tokenize_unit(index: int, unit: sources.Unit, force_val: int | None = None) -> dict:
    """Tokenize one unit into its two shards and its counts file; returns the counts. ``force_val``: the hash
    of a document to hold out whatever ``held_out`` says."""
    w = _WORKER
    tok, eos, dtype, report = w["tok"], w["eos"], w["dtype"], w["progress"]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets: 30 % more tokens/s
    stem = w["dir"] / f"{index:05d}"
    tmp = {s: _tmp_path(stem.with_name(f"{stem.name}.{s}.bin")) for s in ("train", "val")}
    counts = {"index": index, "train": 0, "val": 0, "train_documents": 0, "val_documents": 0, "min_hash": None}
    prog, last, sent = sources.Progress(), time.monotonic(), [0, 0, 0]
    files = {s: open(p, "wb") for s, p in tmp.items()}
    try:
        docs: dict[str, list[str]] = {"train": [], "val": []}

        def flush(split: str) -> None:
            for enc in encode(docs[split], add_special_tokens=ADD_SPECIAL_TOKENS):
                ids = np.asarray(enc.ids + [eos], dtype)
                files[split].write(ids.tobytes())
                counts[split] += ids.size
            counts[f"{split}_documents"] += len(docs[split])
            docs[split] = []

        for text in sources.documents(unit, w["spec"], prog):
            h = sources.doc_hash(text)
            split = unit.split or ("val" if h % w["val_every"] == 0 or h == force_val else "train")
            if split == "train" and not unit.split:
                counts["min_hash"] = h if counts["min_hash"] is None else min(h, counts["min_hash"])
            docs[split].append(text)
            if len(docs[split]) == ENCODE_BATCH:
                flush(split)
            if report is not None and time.monotonic() - last > 0.5:
                now = [prog.done, counts["train_documents"] + counts["val_documents"], counts["train"] + counts["val"]]
                report.put([a - b for a, b in zip(now, sent)])
                sent, last = now, time.monotonic()
        flush("train"), flush("val")
    finally:
        for f in files.values():
            f.close()
    for s, p in tmp.items():
        os.replace(p, stem.with_name(f"{stem.name}.{s}.bin"))
    counts["skipped"] = prog.skipped
    _write_atomic(stem.with_name(f"{stem.name}.json"), json.dumps(counts))
    if report is not None:
        now = [unit.size, counts["train_documents"] + counts["val_documents"], counts["train"] + counts["val"]]
        report.put([a - b for a, b in zip(now, sent)])
    return counts


def _work(args: tuple[int, sources.Unit]) -> dict:
    return _tokenize_unit(*args)


def build_store(data, vocab_size: int, out: str | Path, workers: int = 0, log: Callable[[str], None] = print,
                progress: bool | None = None, planned: tuple[str, list] | None = None) -> Path:
    """Tokenize ``data``'s source into a store at ``out`` (resuming one that was interrupted); return ``out``.
    ``workers``: processes (0 = one per core); ``progress``: show the bar (None = when stderr is a terminal)."""
    check_vocab(data, vocab_size)
    ident, units = planned or sources.plan(data, log)
    out = Path(out).expanduser()
    fp = fingerprint(data, vocab_size, ident)
    _check_folder(out, fp, start_over=False)  # before anything is written: a folder of the user's stays untouched
    with _one_builder(out, log):
        if (out / "store.json").is_file() and _check_folder(out, fp, start_over=False):
            log(f"the token store at {out} is complete")  # built by the process this one waited for
            return out
        return _build(data, vocab_size, out, fp, ident, units, workers, log, progress)


def _check_folder(out: Path, fp: str, start_over: bool) -> bool:
    """Whether ``out`` holds (part of) the store ``fp``; a StoreError if it holds anything else. With
    ``start_over``, a build of another fingerprint that stopped before any unit is cleared."""
    if (out / "plan.json").is_file():
        before = json.loads((out / "plan.json").read_text())
        if before.get("fingerprint") == fp:
            return True
        if (out / "store.json").exists() or any((out / "shards").glob("*.json")):
            raise StoreError(f"{str(out)!r} holds (part of) a store of another source or tokenizer "
                             f"({before.get('source')}); choose another folder")
        if start_over:
            (out / "tokenizer.json").unlink(missing_ok=True)  # a build that stopped before any unit: start over
    elif out.exists() and any(p.name != BUILD_LOCK and not _is_tmp(p) for p in out.iterdir()):
        # a builder writes plan.json (through a temporary file) before anything else, so a folder with other
        # entries and no plan is not a store, even while another process builds one in it
        raise StoreError(f"{str(out)!r} is not empty and is not a token store; choose another folder")
    return False


@contextlib.contextmanager
def _one_builder(out: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold ``out``'s build lock for the block; while another process holds it, wait (blocked in ``flock``,
    woken by the kernel when it is released, also when its holder dies). The file names the holder."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, out, log)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, out: Path, log: Callable[[str], None]) -> None:
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            log(f"waiting for {holder} to finish building the token store at {out} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        raise StoreError(f"cannot lock {out / BUILD_LOCK} ({os.strerror(e.errno)}): this filesystem has no file "
                         f"locks, so concurrent builds could not be kept apart; build the store once with "
                         f"`python -m stem_jax.data_prep` and train with --config.data.store") from None


def _build(data, vocab_size: int, out: Path, fp: str, ident: str, units: list, workers: int,
           log: Callable[[str], None], progress: bool | None) -> Path:
    """``build_store`` under the build lock."""
    _check_folder(out, fp, start_over=True)
    plan = {"fingerprint": fp, "source": ident, "units": [dataclasses.asdict(u) for u in units]}
    _remove_orphans(out)
    _write_atomic(out / "plan.json", json.dumps(plan, indent=1))  # first: it marks the folder as a store's
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _remove_orphans(out / "shards")
    spec = sources.Spec(data.source, data.text_key, data.tfds_data_dir, data.skip_bad_records)
    tok = _tokenizer(data, vocab_size, units, spec, out, log)
    eos = eos_id(tok, data.eos_token)
    dtype = "uint16" if tokenizer_size(tok) <= 1 << 16 else "uint32"
    done = {i for i in range(len(units)) if (out / "shards" / f"{i:05d}.json").is_file()}
    todo = [(i, u) for i, u in enumerate(units) if i not in done]
    n = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    if done:
        log(f"resuming the token store at {out}: {len(done)} of {len(units)} units already done")
    log(f"tokenizing {len(todo)} unit(s) of {data.source} into {out} with {n} worker process(es) ...")
    t0 = time.perf_counter()
    init = (tok.to_str(), eos, dtype, spec, str(out / "shards"), data.val_every)
    if todo:
        _run_workers(todo, n, init, progress, log)
    read_counts = lambda: [json.loads((out / "shards" / f"{i:05d}.json").read_text()) for i in range(len(units))]
    shards = read_counts()
    if not any(s["val_documents"] for s in shards):
        _hold_out_one(data, units, init, shards, log)
        shards = read_counts()
    meta = {"version": STORE_VERSION, "fingerprint": fp, "source": ident, "vocab_size": tokenizer_size(tok),
            "eos_id": eos, "eos_token": tok.id_to_token(eos), "dtype": dtype, "val_every": data.val_every,
            "skipped_records": sum(s["skipped"] for s in shards), "shards": shards}
    for split in ("train", "val"):
        meta[split] = {"tokens": sum(s[split] for s in shards), "documents": sum(s[f"{split}_documents"] for s in shards)}
    seconds, new = time.perf_counter() - t0, {i for i, _ in todo}
    made = sum(s["train"] + s["val"] for s in shards if s["index"] in new)
    log(f"token store done: {meta['train']['documents'] + meta['val']['documents']:,} documents, "
        f"{meta['train']['tokens'] + meta['val']['tokens']:,} tokens"
        + (f"; {made:,} tokenized in {seconds:.1f} s ({made / seconds:,.0f} tokens/s)" if made else "")
        + (f", {meta['skipped_records']:,} bad record(s) skipped" if meta["skipped_records"] else ""))
    _write_atomic(out / "store.json", json.dumps(meta, indent=1))
    return out


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker whose parent died too may linger as a zombie
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_orphans(folder: Path) -> None:
    """Delete the temporary files (``.NAME.HOST.PID.tmp``) of this host's writers that are no longer running.
    Another host's files are never touched: its pids cannot be checked from here."""
    host = _host()
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name.split(".")
        if len(parts) >= 5 and parts[-3] == host and parts[-2].isdigit() and not _running(int(parts[-2])):
            tmp.unlink(missing_ok=True)


def _hold_out_one(data, units: list, init: tuple, shards: list[dict], log: Callable[[str], None]) -> None:
    """No document hashed into the held-out split: hold out the one with the smallest hash (a choice that
    does not depend on how the source is cut) by tokenizing its unit again, then finish the store."""
    candidates = [s for s in shards if s["min_hash"] is not None]
    if not candidates:
        raise StoreError(f"data.source={data.source!r} has no documents")
    first = min(candidates, key=lambda s: s["min_hash"])
    total = sum(s["train_documents"] for s in shards)
    if total < 2:
        raise StoreError(f"data.source={data.source!r} has {total} document(s); a held-out split needs at least 2")
    log(f"note: none of the {total} documents hashed into the held-out split (data.val_every={data.val_every}); "
        f"holding out the one with the smallest hash")
    (Path(init[4]) / f"{first['index']:05d}.json").unlink()  # the unit is redone as a whole, or not at all
    _init_worker(*init, None)
    _tokenize_unit(first["index"], units[first["index"]], force_val=first["min_hash"])


def _run_workers(todo: list, n: int, init: tuple, show: bool | None, log: Callable[[str], None]) -> None:
    """Tokenize ``todo`` on ``n`` worker processes, feeding the progress bar from their reports; a worker's
    error is raised here. Workers fork from a fresh server process that has imported this module only: a fork
    of this process would inherit JAX's threads, and a spawned child would import the entry point (and JAX)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    total = sum(u.size for _, u in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=None if show is None else not show,
               desc="tokenizing", smoothing=0.1)
    docs = tokens = done = 0
    t0 = last_line = time.perf_counter()
    with ctx.Pool(n, initializer=_init_worker, initargs=(*init, reports)) as pool:
        pending = pool.map_async(_work, todo, chunksize=1)
        while True:
            try:
                d_done, d_docs, d_tokens = reports.get(timeout=0.25)
                bar.update(d_done)
                docs, tokens, done = docs + d_docs, tokens + d_tokens, done + d_done
                rate = f"{docs:,} docs, {tokens:,} tokens, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s"
                bar.set_postfix_str(rate, refresh=False)
                if bar.disable and time.perf_counter() - last_line > PROGRESS_LINE_SECONDS:
                    log(f"tokenizing: {100 * done / max(total, 1):.0f} % of the input, {rate}")
                    last_line = time.perf_counter()
            except queue_lib.Empty:
                if pending.ready():
                    break
        bar.close()
        pending.get()  # re-raises a worker's error
