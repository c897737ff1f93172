"""Two OS processes x 4 CPU devices (gloo collectives on 127.0.0.1) train like one process x 8 devices,
agree on the preemption step, share one checkpoint directory, and the checkpoint restores in one process.
A process that dies (kill -9) stops the others at once, with one line, and a rerun resumes exactly."""
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_script, script_env, start_script
from test_resume import TINY, step_rows, wait_for

ARGS = [*TINY, "--config.train.steps=16", "--config.train.batch_size=8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(work, cache_dir, port=None):
    port = port or free_port()
    return [start_script("train.py", f"--workdir={work}", *ARGS, f"--coordinator_address=127.0.0.1:{port}",
                         "--num_processes=2", f"--process_id={i}", cache_dir=cache_dir, devices=4)
            for i in range(2)]


def finish(procs):
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs[0][0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    """The metrics rows of the run in one process x 8 devices."""
    one = tmp_path_factory.mktemp("one") / "run"
    r = run_script("train.py", f"--workdir={one}", *ARGS, cache_dir=cache_dir, devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    return step_rows(one)


def assert_rows_match(got, want):
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for step in want:
        for key in want[step]:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=2e-6, err_msg=f"{key} @ {step}")


def test_two_processes_match_one_process_through_preemption_and_restore(tmp_path, cache_dir, one_process):
    want = one_process

    two = tmp_path / "two"
    procs = start_pair(two, cache_dir)
    wait_for(two / "checkpoints" / "4", procs[0])
    procs[0].send_signal(signal.SIGTERM)  # a preemption notice reaching one host only
    out = finish(procs)
    assert "devices: 8 x cpu in 2 process(es)" in out
    stopped = int(re.search(r"stopped by \w+ after step (\d+); checkpoint saved", out).group(1))
    assert 4 <= stopped < 16 and (two / "checkpoints" / str(stopped) / "data" / "process_1-of-2.json").is_file()

    out = finish(start_pair(two, cache_dir))
    assert f"resumed from the checkpoint at step {stopped} " in out
    assert_rows_match(step_rows(two), want)

    r = run_script("eval.py", f"--workdir={two}", cache_dir=cache_dir, devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    final = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(json.loads((two / "eval.json").read_text())["val_loss"] - final["val_loss"]) < 1e-4

    # A 1-process resume of this checkpoint is refused: test_trainer.py checks that in-process.


def wait_for_row(work, step, proc, timeout=300):
    """Until metrics.jsonl holds the row of ``step`` (the writer, process 0, is ``proc``)."""
    end = time.time() + timeout
    while step not in (step_rows(work) if (work / "metrics.jsonl").is_file() else {}):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.time() < end, f"no row for step {step}"
        time.sleep(0.01)


def hubs(port):
    """Pids of peer hubs (``python -m stem_jax.peers``) serving the coordinator port ``port``."""
    found = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmd.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"stem_jax.peers" in argv and any(a.endswith(f":{port}".encode()) for a in argv):
            found.append(int(cmd.parent.name))
    return found


def assert_one_line_exit(proc, started, limit=60):
    """``proc`` exits within ``limit`` s of ``started`` with exit code 1 and one error line, no traceback: the
    hub's word (``process N died or failed``) or, when its own collective failed first, the collective's."""
    _, err = proc.communicate(timeout=limit + 30)
    seconds = time.time() - started
    lines = [x for x in err.splitlines() if x.strip()]
    assert proc.returncode == 1 and lines[-1].startswith("error: ") and "died or failed" in lines[-1], err[-3000:]
    assert sum(x.startswith("error: ") for x in lines) == 1, err[-3000:]
    assert "Traceback" not in err and "Check failure" not in err and "Fatal Python error" not in err, err[-3000:]
    assert seconds < limit, f"exited after {seconds:.1f} s"
    return seconds


def test_a_killed_process_stops_the_other_at_once_and_a_rerun_resumes_exactly(tmp_path, cache_dir, one_process):
    """kill -9 of process 1 while the run is past its checkpoint at step 8: process 0, blocked in the step's
    collectives (without the hub it waited 69 s there, then aborted), exits within seconds."""
    work = tmp_path / "run"
    port = free_port()
    procs = start_pair(work, cache_dir, port)
    wait_for_row(work, 10, procs[0])  # checkpoint 8 is saved, steps 9 and 10 are logged
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    procs[1].wait()
    seconds = assert_one_line_exit(procs[0], killed)
    print(f"the surviving process exited {seconds:.2f} s after the kill")
    end = time.time() + 30
    while hubs(port):  # the hub ends once every process has gone
        assert time.time() < end, "the peer hub outlived the run"
        time.sleep(0.05)
    before = step_rows(work)
    assert 10 in before and not (work / "checkpoints" / "16").exists()

    out = finish(start_pair(work, cache_dir))
    resumed = int(re.search(r"resumed from the checkpoint at step (\d+) ", out).group(1))
    assert resumed in (8, 12), out[-2000:]
    after = step_rows(work)
    redone = [s for s in before if s > resumed]
    assert redone and all(after[s] == before[s] for s in redone)  # the replayed steps, bitwise
    assert_rows_match(after, one_process)


_WAITER = """
import sys, threading
from absl import flags
from stem_jax import cli
cli.define_distributed_flags()
flags.FLAGS(["peer", *sys.argv[1:]])
cli.init_distributed()
from jax.experimental import multihost_utils

from jax._src import distributed

def run():
    multihost_utils.sync_global_devices("started")
    print("started", flush=True)
    if flags.FLAGS.process_id == 1:  # in a collective that the others never join
        multihost_utils.sync_global_devices("never")
    if flags.FLAGS.process_id == 2:  # at a barrier of the coordination service, as orbax waits in a save
        distributed.global_state.client.wait_at_barrier("never", 600_000)
    threading.Event().wait()  # the victim and the last one: in no collective, only the hub can wake it
cli.run_user_errors(run)  # as train.py runs its work
"""


@pytest.mark.parametrize("victim", [0, 3])
def test_four_processes_waiting_on_a_peer_exit_when_it_dies(tmp_path, victim):
    """Process 1 waits in a collective, 2 at a barrier, the others idle; the victim is killed. JAX's heartbeats
    are at their default 100 s here; without the hub an idle process waits for them (victim 3), or aborts with
    a stack trace when process 0 takes the coordination service with it (victim 0)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _WAITER, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=4", f"--process_id={i}", "--heartbeat_timeout=100"],
                              cwd=REPO, text=True,
                              env=script_env(str(tmp_path), devices=1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(4)]
    try:
        for p in procs:
            while (line := p.stdout.readline()) != "started\n":  # gloo prints its connections first
                assert line, p.communicate(timeout=60)[1][-3000:]
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.time()
        times = [assert_one_line_exit(p, killed) for i, p in enumerate(procs) if i != victim]
        print(f"the other processes exited {max(times):.2f} s after the kill")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
