"""One writer per workdir: an OS-level lock (``flock``) on ``<workdir>/.lock`` for anything that writes into a
workdir (train.py, injection, imports). The file names its holder (host, pid, command, start time) while it is
held and is emptied on release, so a non-empty file whose lock is free was left by a writer that died (kill -9,
a lost host): the next writer takes it over and says so. Readers (eval, sampling, export) take no lock; they
only ever see committed checkpoints, and they never create, move or delete anything in a workdir: only the
holder cleans the temporary folders of a save that was killed (``holds``, used by ``checkpoint.manager``).

``flock`` is released by the kernel when the holder's process dies, so a stale lock can never block a run.
A multi-process run locks once, on process 0, and every process learns the outcome before going on."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = ".lock"
_HELD: set[Path] = set()  # workdirs this run holds, on every process of a multi-process run


def holds(workdir: str | Path) -> bool:
    """Whether this run holds ``workdir``'s lock (inside ``hold``): the only writer allowed to clean up."""
    return Path(workdir).resolve() in _HELD


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {started})")


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"command": f"unreadable lock file ({text[:60]!r})"}
    return holder if isinstance(holder, dict) else {"command": repr(holder)[:60]}


def _write_holder(fd: int, holder: dict | None) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)


def acquire(workdir: str | Path, command: str, log: Callable[[str], None] = print) -> int:
    """Lock ``workdir`` (created if missing) for ``command``; returns the lock's file descriptor. Raises
    WorkdirLockedError naming the holder when another live process has it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirLockedError(f"{workdir} is in use by {_describe(holder) if holder else 'another process'}; "
                                 "wait for it to finish, or stop it, or choose another --workdir") from None
    stale = _read_holder(fd)
    if stale is not None:
        log(f"note: taking over the lock of {workdir} from {_describe(stale)}, which is no longer running")
    _write_holder(fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "command": command, "argv": sys.argv})
    return fd


def release(fd: int) -> None:
    """Empty the lock file (a clean exit leaves no holder behind) and unlock."""
    try:
        _write_holder(fd, None)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def hold(workdir: str | Path, command: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``workdir``'s lock for the block. With several processes only process 0 locks; the others
    wait for its outcome and fail with it."""
    multi = jax.process_count() > 1
    fd, error = None, None
    if jax.process_index() == 0:
        try:
            fd = acquire(workdir, command, log)
        except (WorkdirLockedError, OSError) as e:
            error = e
    if multi:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirLockedError(f"process 0 could not lock {workdir}; see its error")
    if error is not None:
        raise error
    held = Path(workdir).resolve()
    _HELD.add(held)
    try:
        yield
    finally:
        _HELD.discard(held)
        if fd is not None:
            release(fd)
