"""One writer per workdir: a second writer is refused naming the holder; a dead holder's lock is taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stem_jax import lock

HOLD = """
import sys, time
from stem_jax import lock
lock.acquire(sys.argv[1], "holder-under-test")
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of ``tmp_path / 'w'``; killed (-9) when the test ends."""
    work = tmp_path / "w"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    yield work, p
    p.kill()
    p.wait()


def test_a_second_writer_is_refused_naming_the_holder(holder):
    work, p = holder
    (work / "notes.txt").write_text("mine")
    before = {f.name: f.read_bytes() for f in work.iterdir()}
    with pytest.raises(lock.WorkdirLockedError, match=rf"is in use by holder-under-test \(pid {p.pid} on "):
        with lock.hold(work, "second"):
            raise AssertionError("the block must not run")
    assert {f.name: f.read_bytes() for f in work.iterdir()} == before  # the holder's record is intact


def test_a_dead_holders_lock_is_taken_over_with_a_message(holder):
    work, p = holder
    p.send_signal(signal.SIGKILL)  # dies holding it: the record stays, the kernel drops the flock
    p.wait()
    assert json.loads((work / lock.LOCK_FILE).read_text())["pid"] == p.pid
    said = []
    with lock.hold(work, "next", log=said.append):
        held = json.loads((work / lock.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["command"] == "next" and time.time() - held["started"] < 60
    assert len(said) == 1 and f"from holder-under-test (pid {p.pid} on" in said[0] and "no longer running" in said[0]
    assert (work / lock.LOCK_FILE).read_text() == ""  # released: no holder, no message for the next writer
    with lock.hold(work, "third", log=said.append):
        pass
    assert len(said) == 1


def test_the_lock_is_released_when_the_block_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with lock.hold(tmp_path, "failing"):
            1 / 0
    with lock.hold(tmp_path, "after"):
        pass
