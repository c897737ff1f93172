"""Building a token store (``store.py`` reads one and describes its files), and the tokenizers.

``build_store`` tokenizes the source's units (``sources.py``) in worker processes, one per core by default,
with a progress bar. A unit's shards are named by its key (``sources.Unit.key``: its input's path, size and
modification time, or content hash, and range), so a store whose inputs changed keeps the units of the files
that did not. Every file is written under a temporary name and renamed, so an interrupted build leaves no
half-written shard; a rerun checks the finished units' sha256 and keeps the intact ones. ``python -m
stem_jax.data_prep`` builds a store ahead of training; ``train.py`` builds one in ``data.cache_dir`` on first
use (``load_corpus``).

One process builds a store at a time: the builder holds ``.build.lock``. The other processes of a run that want
the store wait on that lock and then find ``store.json``; a second ``data_prep`` is refused. The kernel releases
the lock when its holder dies, so a waiter then takes the build over and resumes it. Temporary files carry the
host name and pid of their writer; a build removes only those of its own host whose pid has exited. Workers
exit when the process that started them dies (even by SIGKILL), and the first worker error stops the pool.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers

from stem_jax import prep_pool, sources
from stem_jax.prep_pool import ADD_SPECIAL_TOKENS
from stem_jax.store import (SPLITS, STORE_VERSION, Corpus, Split, StoreDamagedError, StoreError,  # noqa: F401
                            content_fingerprint, file_sha256, open_store, shard_path, tokenizer_sha256)

EOS = "<|endoftext|>"  # the trained tokenizer's end-of-document token, id 0
EOS_NAMES = (EOS, "<|end_of_text|>", "</s>", "<eos>")  # looked up in a user's tokenizer, in this order
MIN_BPE_VOCAB = 257  # byte-level BPE: 256 byte tokens + <|endoftext|>
TOKENIZER_SAMPLE_CHARS = 1 << 30  # a BPE is trained on at most this much training text (the first units')
BUILD_LOCK = ".build.lock"  # in a store's folder: held by the process that builds it
SHARD_FILE = re.compile(r"^[0-9a-f]{16}\.(train\.bin|val\.bin|json)$")  # a unit's files in shards/
REPAIR = "python -m stem_jax.data_prep --repair --out"


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
    """``text`` encoded as training encodes a document (``prep_pool.tokenize_unit``): without the tokenizer's
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


# --- building a store ------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("STEM_JAX_CACHE", Path.home() / ".cache" / "stem_jax"))


def fingerprint(data, vocab_size: int, ident: str) -> str:
    """The cache folder's name: the source's content (``sources.plan``'s identity: files with their sizes and
    modification times), the split, the tokenizer and the EOS token. A changed file gets a fresh cache store."""
    key = f"{STORE_VERSION}|{ident}|{data.val_every}|{_tokenizer_spec(data, vocab_size)}|{data.eos_token}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def folder_identity(data, vocab_size: int, units: list[sources.Unit]) -> str:
    """What a store folder is for (``plan.json``'s fingerprint): the source *configuration* (kind, the files'
    resolved paths, text key), the split, the tokenizer and the EOS token, but not the files' sizes or times, so
    a file fixed in place is rebuilt in the same folder (its units get new keys) and the other units are kept."""
    key = (f"{STORE_VERSION}|{sources.config_identity(data, units)}|{data.val_every}|"
           f"{_tokenizer_spec(data, vocab_size)}|{data.eos_token}")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_corpus(data, vocab_size: int, log: Callable[[str], None] = print, workers: int | None = None) -> Corpus:
    """The store ``data.store`` names, or the one for ``data`` in the cache, built on first use. A cache build
    that fails removes its folder (a fixed input is a new cache folder anyway); an interrupted one is kept."""
    check_vocab(data, vocab_size)
    if data.store:
        return open_store(data.store)
    ident, units = sources.plan(data, log)
    fp = fingerprint(data, vocab_size, ident)
    path = (Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()) / fp
    if not (path / "store.json").is_file():
        build_store(data, vocab_size, path, workers=data.workers if workers is None else workers, log=log,
                    planned=(ident, units), discard_failed=True)
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
    prep_pool.write_atomic(path, tok.to_str())
    return tok


# --- building a store ------------------------------------------------------------------------------------------

def build_store(data, vocab_size: int, out: str | Path, workers: int = 0, log: Callable[[str], None] = print,
                progress: bool | None = None, planned: tuple[str, list] | None = None, *, wait: bool = True,
                check: bool = False, discard_failed: bool = False) -> Path:
    """Tokenize ``data``'s source into a store at ``out`` (resuming one that was interrupted, keeping the units
    whose inputs did not change); return ``out``. ``workers``: processes (0 = one per core); ``progress``: show
    the bar (None = when stderr is a terminal); ``wait``: while another process builds ``out``, wait for it
    (the processes of a run) or refuse (``data_prep``); ``check``: a complete store is checked too (sha256 of
    every unit) and its damaged units rebuilt, where otherwise it is returned as is; ``discard_failed``: a build
    that fails removes the folder (a cache store), where otherwise its finished units are kept for a rerun."""
    check_vocab(data, vocab_size)
    ident, units = planned or sources.plan(data, log)
    out = Path(out).expanduser()
    fp = folder_identity(data, vocab_size, units)
    _check_folder(out, fp, start_over=False)  # before anything is written: a folder of the user's stays untouched
    with _one_builder(out, log, wait):
        if not check and (out / "store.json").is_file() and _check_folder(out, fp, start_over=False):
            log(f"the token store at {out} is complete")  # built by the process this one waited for
            return out
        _check_folder(out, fp, start_over=True)  # a folder that is not this store's is never removed below
        try:
            return _build(data, vocab_size, out, fp, ident, units, workers, log, progress)
        except Exception:
            if discard_failed:
                shutil.rmtree(out, ignore_errors=True)  # waiters notice the lock file is gone (_one_builder)
            raise


def repair_store(out: str | Path, workers: int = 0, log: Callable[[str], None] = print,
                 progress: bool | None = None) -> Path:
    """Rebuild the damaged units (missing, wrong size or sha256) of the store at ``out`` from the inputs and
    the ``data`` configuration it was built with (``plan.json``); the intact units are kept."""
    out = Path(out).expanduser()
    try:
        plan = json.loads((out / "plan.json").read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{str(out)!r} is not a token store this version can repair ({out / 'plan.json'}: "
                         f"{getattr(e, 'strerror', None) or e}); build it with the data_prep command") from None
    if plan.get("version") != STORE_VERSION or "data" not in plan:
        raise StoreError(f"the token store {out} was built by an older version of stem-jax (format "
                         f"{plan.get('version', '2')!r}); build it again into a new folder")
    if not (out / "tokenizer.json").is_file():
        raise StoreError(f"{out / 'tokenizer.json'} is missing: the store cannot be repaired without the tokenizer "
                         f"its shards were made with; build it again into a new folder")
    if (out / "store.json").is_file():
        recorded = json.loads((out / "store.json").read_text()).get("tokenizer_sha256")
        if recorded != tokenizer_sha256(Tokenizer.from_file(str(out / "tokenizer.json"))):
            raise StoreError(f"{out / 'tokenizer.json'} is not the tokenizer the store was tokenized with (store.json "
                             f"records sha256 {recorded}): put it back, or build the store again into a new folder")
    data = types.SimpleNamespace(**plan["data"])
    ident, units = sources.plan(data, log)
    was = {u["key"]: u["path"] for u in plan["units"]}
    changed = [u.path for u in units if u.key() not in was]
    if changed or len(units) != len(plan["units"]):
        raise StoreError(f"--repair rebuilds damaged units from the inputs the store was built from, but "
                         f"{changed[0] if changed else 'the list of input files'!r} changed since (size or modification "
                         f"time): run the data_prep command that built the store again, which rebuilds the changed "
                         f"file's units and keeps the others")
    with _one_builder(out, log, wait=False):
        return _build(data, plan["model_vocab_size"], out, plan["fingerprint"], ident, units, workers, log, progress)


def _check_folder(out: Path, fp: str, start_over: bool) -> bool:
    """Whether ``out`` holds (part of) the store ``fp``; a StoreError if it holds anything else. With
    ``start_over``, a build of another fingerprint that stopped before any unit is cleared."""
    if (out / "plan.json").is_file():
        before = json.loads((out / "plan.json").read_text())
        if before.get("fingerprint") == fp:
            return True
        if before.get("version") != STORE_VERSION:
            raise StoreError(f"{str(out)!r} holds (part of) a token store built by an older version of stem-jax "
                             f"(format {before.get('version', '2')!r}); build into a new folder (nothing is deleted)")
        if (out / "store.json").exists() or any((out / "shards").glob("*.json")):
            raise StoreError(f"{str(out)!r} holds (part of) a store of another source or tokenizer "
                             f"({before.get('source')}); choose another folder")
        if start_over:
            (out / "tokenizer.json").unlink(missing_ok=True)  # a build that stopped before any unit: start over
    elif out.exists() and any(p.name != BUILD_LOCK and not prep_pool.is_tmp(p) for p in out.iterdir()):
        # a builder writes plan.json (through a temporary file) before anything else, so a folder with other
        # entries and no plan is not a store, even while another process builds one in it
        raise StoreError(f"{str(out)!r} is not empty and is not a token store; choose another folder")
    return False


@contextlib.contextmanager
def _one_builder(out: Path, log: Callable[[str], None], wait: bool = True) -> Iterator[None]:
    """Hold ``out``'s build lock for the block. While another process holds it, wait (blocked in ``flock``,
    woken by the kernel when it is released, also when its holder dies) or, without ``wait``, raise a
    StoreError naming the holder (the lock file names it)."""
    while True:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / BUILD_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _lock(fd, out, log, wait)
            same = os.fstat(fd).st_ino == os.stat(out / BUILD_LOCK).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder removed the folder (a failed cache build): lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, out: Path, log: Callable[[str], None], wait: bool) -> None:
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise StoreError(f"the token store {out} is being built by {holder} (it holds {out / BUILD_LOCK}); "
                                 f"wait for that build to end, or stop it and run this command again: finished "
                                 f"units are kept") from None
            log(f"waiting for {holder} to finish building the token store at {out} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        raise StoreError(f"cannot lock {out / BUILD_LOCK} ({os.strerror(e.errno)}): this filesystem has no file "
                         f"locks, so concurrent builds could not be kept apart; build the store once with "
                         f"`python -m stem_jax.data_prep` and train with --config.data.store") from None


def _data_record(data) -> dict:
    """The ``data`` configuration as ``plan.json`` / ``store.json`` keep it for ``repair_store``: paths made
    absolute, so it holds from any working directory."""
    d = dataclasses.asdict(data) if dataclasses.is_dataclass(data) else dict(vars(data))
    absolute = lambda p: os.path.abspath(os.path.expanduser(p))  # noqa: E731
    if d.get("files"):
        d["files"] = ",".join(absolute(p.strip()) for p in d["files"].split(",") if p.strip())
    if d.get("tokenizer") not in (None, "", "train"):
        d["tokenizer"] = absolute(d["tokenizer"])
    for k in ("tfds_data_dir", "cache_dir"):
        if d.get(k):
            d[k] = absolute(d[k])
    return d


def _build(data, vocab_size: int, out: Path, fp: str, ident: str, units: list, workers: int,
           log: Callable[[str], None], progress: bool | None) -> Path:
    """``build_store`` under the build lock."""
    _check_folder(out, fp, start_over=True)
    keys = [u.key() for u in units]
    plan = {"version": STORE_VERSION, "fingerprint": fp, "source": ident, "data": _data_record(data),
            "model_vocab_size": vocab_size, "units": [dict(dataclasses.asdict(u), key=k) for u, k in zip(units, keys)]}
    prep_pool.remove_orphans(out)
    prep_pool.write_atomic(out / "plan.json", json.dumps(plan, indent=1))  # first: it marks the folder as a store's
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise prep_pool.write_error(out / "shards", e) from None
    prep_pool.remove_orphans(out / "shards")
    spec = sources.Spec(data.source, data.text_key, data.tfds_data_dir, data.skip_bad_records)
    tok = _tokenizer(data, vocab_size, units, spec, out, log)
    eos = eos_id(tok, data.eos_token)
    dtype = "uint16" if tokenizer_size(tok) <= 1 << 16 else "uint32"
    by_key = dict(zip(keys, units))
    n_cores = workers or os.cpu_count() or 1
    counts = _finished(out, list(by_key), np.dtype(dtype).itemsize, data.skip_bad_records, n_cores, log)
    todo = [(k, u) for k, u in by_key.items() if k not in counts]
    n = min(n_cores, max(len(todo), 1))
    if counts:
        log(f"resuming the token store at {out}: {len(counts)} of {len(by_key)} units already done")
    log(f"tokenizing {len(todo)} unit(s) of {data.source} into {out} with {n} worker process(es) ...")
    t0 = time.perf_counter()
    init = (tok.to_str(), eos, dtype, spec, str(out / "shards"), data.val_every)
    if todo:
        prep_pool.run_workers(todo, n, init, progress, log)
    for k, _ in todo:
        counts[k] = json.loads((out / "shards" / f"{k}.json").read_text())
    skipped = Counter()
    for c in counts.values():
        skipped[c["input"]] += c["skipped"]
    for name, n_bad in skipped.items():
        if n_bad:
            log(f"skipped {n_bad:,} bad record(s) of {name} (data.skip_bad_records=true)")
    if not any(c["val_documents"] for c in counts.values()):
        _hold_out_one(data, by_key, init, counts, skipped, log)
    shards = [counts[k] for k in keys]
    meta = {"version": STORE_VERSION, "fingerprint": fp, "source": ident, "vocab_size": tokenizer_size(tok),
            "eos_id": eos, "eos_token": tok.id_to_token(eos), "dtype": dtype, "val_every": data.val_every,
            "skipped_records": sum(skipped.values()), "shards": shards, "tokenizer_sha256": tokenizer_sha256(tok),
            "data": plan["data"], "model_vocab_size": vocab_size}
    for split in SPLITS:
        meta[split] = {"tokens": sum(s[split] for s in shards), "documents": sum(s[f"{split}_documents"] for s in shards)}
    meta["content_fingerprint"] = content_fingerprint(meta)
    seconds = time.perf_counter() - t0
    made = sum(counts[k]["train"] + counts[k]["val"] for k, _ in todo)
    log(f"token store done: {meta['train']['documents'] + meta['val']['documents']:,} documents, "
        f"{meta['train']['tokens'] + meta['val']['tokens']:,} tokens"
        + (f"; {made:,} tokenized in {seconds:.1f} s ({made / seconds:,.0f} tokens/s)" if made else "")
        + (f", {meta['skipped_records']:,} bad record(s) skipped" if meta["skipped_records"] else ""))
    text = json.dumps(meta, indent=1)
    if not (out / "store.json").is_file() or (out / "store.json").read_text() != text:
        prep_pool.write_atomic(out / "store.json", text)
    _remove_stale(out / "shards", set(keys))
    return out


def _finished(out: Path, keys: list[str], itemsize: int, skip_ok: bool, threads: int,
              log: Callable[[str], None]) -> dict[str, dict]:
    """The counts of the units of ``keys`` that are finished and intact: their ``KEY.json`` reads and both
    shards have the sizes and sha256 it records. A damaged unit is logged and rebuilt; so is one that skipped
    bad records when ``data.skip_bad_records`` is now off (it would fail on them)."""
    found = {}
    for k in keys:
        with contextlib.suppress(OSError, ValueError):
            found[k] = json.loads((out / "shards" / f"{k}.json").read_text())
    if not found:
        return {}
    nbytes = sum((c.get("train", 0) + c.get("val", 0)) * itemsize for c in found.values())
    log(f"checking the sha256 of the {len(found)} finished unit(s) ({nbytes / 1e9:.2f} GB) in {out} ...")

    def problem(k: str) -> str | None:
        c = found[k]
        if c.get("skipped") and not skip_ok:
            return f"it skipped {c['skipped']} bad record(s) and data.skip_bad_records is off"
        for s in SPLITS:
            path = shard_path(out, k, s)
            try:
                have = path.stat().st_size
            except FileNotFoundError:
                return f"{path} is missing"
            if have != c[s] * itemsize:
                return f"{path} has {have} bytes, {k}.json records {c[s] * itemsize}"
            if file_sha256(path) != c[f"{s}_sha256"]:
                return f"{path} has the wrong sha256"
        return None
    with ThreadPoolExecutor(max(threads, 1)) as pool:  # hashlib releases the GIL: the shards hash in parallel
        problems = dict(zip(found, pool.map(problem, found)))
    for k, why in problems.items():
        if why:
            log(f"rebuilding unit {k} ({found[k]['input']}): {why}")
            (out / "shards" / f"{k}.json").unlink(missing_ok=True)
    return {k: c for k, c in found.items() if not problems[k]}


def _remove_stale(shard_dir: Path, keys: set[str]) -> None:
    """Delete the shards of units no longer in the plan (their input changed): the store is complete without
    them."""
    for p in shard_dir.iterdir():
        if SHARD_FILE.match(p.name) and p.name[:16] not in keys:
            p.unlink(missing_ok=True)


def _hold_out_one(data, units: dict[str, sources.Unit], init: tuple, counts: dict[str, dict], skipped: Counter,
                  log: Callable[[str], None]) -> None:
    """No document hashed into the held-out split: hold out the one with the smallest hash (a choice that
    does not depend on how the source is cut) by tokenizing its unit again (``counts`` updated). ``skipped``:
    bad records per input, which an error for a source without documents names."""
    candidates = [c for c in counts.values() if c["min_hash"] is not None]
    if not candidates:
        why = ""
        if sum(skipped.values()):
            worst = ", ".join(f"{n:,} in {name}" for name, n in skipped.most_common(3) if n)
            why = (f": all {sum(skipped.values()):,} record(s) were bad, and data.skip_bad_records=true skipped them "
                   f"({worst}{', ...' if len(+skipped) > 3 else ''}); fix the records or data.text_key")
        raise StoreError(f"data.source={data.source!r} has no documents{why}")
    first = min(candidates, key=lambda c: c["min_hash"])
    total = sum(c["train_documents"] for c in counts.values())
    if total < 2:
        raise StoreError(f"data.source={data.source!r} has {total} document(s); a held-out split needs at least 2")
    log(f"note: none of the {total} documents hashed into the held-out split (data.val_every={data.val_every}); "
        f"holding out the one with the smallest hash")
    key = first["key"]
    (Path(init[4]) / f"{key}.json").unlink()  # the unit is redone as a whole, or not at all
    prep_pool.init_worker(*init, None, None)
    counts[key] = prep_pool.tokenize_unit(key, units[key], force_val=first["min_hash"])
