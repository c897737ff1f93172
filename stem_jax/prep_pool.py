"""The worker processes that tokenize a store's units (``corpus.build_store`` runs them), and the atomic,
host- and pid-tagged temporary files every writer of a store uses.

A worker tokenizes one unit into its two shards (``KEY.train.bin``, ``KEY.val.bin``), hashing them as it writes,
then writes ``KEY.json``; every file goes through a temporary name (``.NAME.HOST.PID.tmp``) and a rename. The
first worker error stops the pool; a worker exits when the builder dies (even by SIGKILL) and never prints a
traceback into the user's terminal.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import multiprocessing
import multiprocessing.connection as mp_connection
import os
import re
import signal
import socket
import sys
import threading
import time
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from stem_jax import sources
from stem_jax.store import SPLITS, StoreError, shard_path

ADD_SPECIAL_TOKENS = False  # documents skip the tokenizer's template (e.g. a Llama-3 BOS): the EOS alone separates them
ENCODE_BATCH = 64  # documents per encode call
PROGRESS_LINE_SECONDS = 30  # without a terminal for the progress bar, a progress line this often
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def host() -> str:
    """This host's name as temporary file names carry it (no dots, so the name splits back)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def tmp_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it: ``.NAME.HOST.PID.tmp``."""
    return path.with_name(f".{path.name}.{host()}.{os.getpid()}.tmp")


def is_tmp(path: Path) -> bool:
    """Whether ``path`` is a writer's temporary file (``.NAME.HOST.PID.tmp``)."""
    parts = path.name.split(".")
    return path.name.startswith(".") and len(parts) >= 5 and parts[-1] == "tmp" and parts[-2].isdigit()


def write_error(path: Path, e: OSError) -> StoreError:
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return StoreError(f"cannot write {path} ({e.strerror or e}); nothing half-written was kept: "
                      + ("make room (or lift the file size limit) and " if full else "")
                      + "run the same command again")


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` or is untouched; an OSError is a StoreError naming ``path``, its temporary file
    removed."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def running(pid: int) -> bool:
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


def remove_orphans(folder: Path) -> None:
    """Delete the temporary files (``.NAME.HOST.PID.tmp``) of this host's writers that are no longer running.
    Another host's files are never touched: its pids cannot be checked from here."""
    here = host()
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name.split(".")
        if len(parts) >= 5 and parts[-3] == here and parts[-2].isdigit() and not running(int(parts[-2])):
            tmp.unlink(missing_ok=True)


_WORKER: dict = {}


def init_worker(tok_json: str, eos: int, dtype: str, spec: sources.Spec, shard_dir: str, val_every: int,
                 progress, parent_alive) -> None:
    """A worker's setup. ``progress``: the write end of the reports pipe (None: no reports); ``parent_alive``:
    the read end of a pipe whose only writer is the builder, so it reads EOF when the builder dies."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    _WORKER.update(tok=Tokenizer.from_str(tok_json), eos=eos, dtype=np.dtype(dtype), spec=spec,
                   dir=Path(shard_dir), val_every=val_every, progress=progress)
    if parent_alive is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the builder, which stops the pool quietly
        _die_with_parent(parent_alive)


def _die_with_parent(parent_alive) -> None:
    """Exit as soon as the builder dies, also by SIGKILL, without a traceback. A forkserver worker's parent is
    the fork server, which outlives the builder while any worker is alive (each holds its "alive" descriptor),
    so PR_SET_PDEATHSIG alone would not do (it covers spawned workers, whose parent is the builder); the
    watcher thread does: it blocks on a pipe that only the builder writes to, and reads EOF when it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch():
        with contextlib.suppress(EOFError, OSError):
            parent_alive.recv()
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-alive").start()


def _report(message: tuple) -> None:
    """Send ``("start", pid, input)`` or ``("done", [input bytes, documents, tokens])`` to the builder; a builder
    that is gone ends the worker quietly (no BrokenPipeError)."""
    try:
        _WORKER["progress"].send(message)  # one small write: atomic on a pipe, so workers share it without a lock
    except (BrokenPipeError, EOFError, OSError):
        os._exit(1)


class _ShardWriter:
    """A unit's shard of one split, written under a temporary name and hashed as it is written; an OSError
    (full disk, file size limit) is a StoreError naming the shard."""

    def __init__(self, path: Path):
        self.path, self.tmp, self.sha = path, tmp_path(path), hashlib.sha256()
        self.f = self._io(lambda: open(self.tmp, "wb"))

    def _io(self, fn):
        try:
            return fn()
        except OSError as e:
            raise write_error(self.path, e) from None

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self._io(lambda: self.f.write(data))

    def commit(self) -> str:
        self._io(self.f.close)
        self._io(lambda: os.replace(self.tmp, self.path))
        return self.sha.hexdigest()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        self.tmp.unlink(missing_ok=True)


def tokenize_unit(key: str, unit: sources.Unit, force_val: int | None = None) -> dict:
    """Tokenize one unit into its two shards and its counts file (``KEY.json``, with the shards' sha256);
    returns the counts. ``force_val``: the hash of a document to hold out whatever ``held_out`` says."""
    w = _WORKER
    tok, eos, dtype, report = w["tok"], w["eos"], w["dtype"], w["progress"]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets: 30 % more tokens/s
    root = w["dir"].parent
    counts = {"key": key, "input": unit.path, "start": unit.start, "stop": unit.stop, "train": 0, "val": 0,
              "train_documents": 0, "val_documents": 0, "min_hash": None}
    prog, last, sent = sources.Progress(), time.monotonic(), [0, 0, 0]
    out: dict[str, _ShardWriter] = {}
    if report is not None:
        _report(("start", os.getpid(), unit.path))
    try:
        for s in SPLITS:
            out[s] = _ShardWriter(shard_path(root, key, s))
        docs: dict[str, list[str]] = {"train": [], "val": []}

        def flush(split: str) -> None:
            for enc in encode(docs[split], add_special_tokens=ADD_SPECIAL_TOKENS):
                ids = np.asarray(enc.ids + [eos], dtype)
                out[split].write(ids.tobytes())
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
                _report(("done", [a - b for a, b in zip(now, sent)]))
                sent, last = now, time.monotonic()
        flush("train"), flush("val")
        for s in SPLITS:
            counts[f"{s}_sha256"] = out[s].commit()
    except BaseException:
        for o in out.values():
            o.discard()
        raise
    counts["skipped"] = prog.skipped
    write_atomic(w["dir"] / f"{key}.json", json.dumps(counts))
    if report is not None:
        now = [unit.size, counts["train_documents"] + counts["val_documents"], counts["train"] + counts["val"]]
        _report(("done", [a - b for a, b in zip(now, sent)]))
    return counts


def _work(args: tuple[str, sources.Unit]) -> dict:
    return tokenize_unit(*args)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (unless it runs) without its warning about the pool's
    semaphores, which it prints into the user's terminal when the builder is killed (it cleans them up)."""
    saved = sys.warnoptions[:]
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")  # the tracker's command line takes these
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions[:] = saved


def run_workers(todo: list, n: int, init: tuple, show: bool | None, log: Callable[[str], None]) -> None:
    """Tokenize ``todo`` on ``n`` worker processes, feeding the progress bar from their reports. The first
    worker error stops the pool (the units finished so far are kept) and is raised here. Workers fork from a
    fresh server process that has imported this module only: a fork of this process would inherit JAX's
    threads, and a spawned child would import the entry point (and JAX)."""
    _quiet_resource_tracker()
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    reports, report_w = ctx.Pipe(duplex=False)
    alive_r, alive_w = ctx.Pipe(duplex=False)  # alive_w stays here only: workers read EOF when this process dies
    total = sum(u.size for _, u in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=None if show is None else not show,
               desc="tokenizing", smoothing=0.1)
    docs = tokens = done = 0
    t0 = last_line = time.perf_counter()
    finished, errors = [], []

    def progress(message: tuple) -> None:
        nonlocal docs, tokens, done, last_line
        if message[0] == "start":  # watch the worker: one that dies (OOM killer, a signal) would hang the pool
            pid, name = message[1:]
            if pid not in watched.values():
                with contextlib.suppress(OSError, AttributeError):  # pidfds: Linux >= 5.3
                    watched[os.pidfd_open(pid)] = pid
            working[pid] = name
            return
        delta = message[1]
        bar.update(delta[0])
        docs, tokens, done = docs + delta[1], tokens + delta[2], done + delta[0]
        rate = f"{docs:,} docs, {tokens:,} tokens, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s"
        bar.set_postfix_str(rate, refresh=False)
        if bar.disable and time.perf_counter() - last_line > PROGRESS_LINE_SECONDS:
            log(f"tokenizing: {100 * done / max(total, 1):.0f} % of the input, {rate}")
            last_line = time.perf_counter()

    watched: dict[int, int] = {}  # pidfd -> pid of each worker
    working: dict[int, str] = {}  # pid -> the input it tokenizes
    wake_r, wake_w = os.pipe()  # the pool's result thread wakes the loop below at once
    os.set_blocking(wake_w, False)

    def ended(into: list):
        def callback(result) -> None:
            into.append(result)
            with contextlib.suppress(BlockingIOError):  # a full pipe: the loop is awake anyway
                os.write(wake_w, b"x")
        return callback
    try:
        with ctx.Pool(n, initializer=init_worker, initargs=(*init, report_w, alive_r)) as pool:
            for item in todo:
                pool.apply_async(_work, (item,), callback=ended(finished), error_callback=ended(errors))
            while not errors and len(finished) < len(todo):
                for c in mp_connection.wait([reports, wake_r, *watched]):
                    if c is reports:
                        progress(reports.recv())
                    elif c == wake_r:
                        os.read(wake_r, 4096)
                    elif not errors and len(finished) < len(todo):  # a worker exited in the middle of the build
                        pid = watched[c]
                        errors.append(StoreError(
                            f"a tokenizer worker (pid {pid}) died while tokenizing {working.get(pid, 'a unit')} "
                            f"(killed by a signal: out of memory?); the units finished so far are kept: run the "
                            f"same command again"))
            while reports.poll():
                progress(reports.recv())
            # leaving the block terminates the pool: on an error, the other workers stop mid-unit
    finally:
        bar.close()
        for c in (reports, report_w, alive_r, alive_w):
            c.close()
        for fd in (wake_r, wake_w, *watched):
            os.close(fd)
    if errors:
        remove_orphans(Path(init[4]))  # the stopped workers' temporary files
        raise errors[0]
