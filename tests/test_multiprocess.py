"""Two OS processes x 4 CPU devices (gloo collectives on 127.0.0.1) train like one process x 8 devices,
agree on the preemption step, share one checkpoint directory, and the checkpoint restores in one process."""
import json
import re
import signal
import socket

import numpy as np

from conftest import run_script, start_script
from test_resume import TINY, step_rows, wait_for

ARGS = [*TINY, "--config.train.steps=16", "--config.train.batch_size=8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(work, cache_dir):
    port = free_port()
    return [start_script("train.py", f"--workdir={work}", *ARGS, f"--coordinator_address=127.0.0.1:{port}",
                         "--num_processes=2", f"--process_id={i}", cache_dir=cache_dir, devices=4)
            for i in range(2)]


def finish(procs):
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs[0][0]


def test_two_processes_match_one_process_through_preemption_and_restore(tmp_path, cache_dir):
    one = tmp_path / "one"
    r = run_script("train.py", f"--workdir={one}", *ARGS, cache_dir=cache_dir, devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    want = step_rows(one)

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
    got = step_rows(two)
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for step in want:
        for key in want[step]:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=2e-6, err_msg=f"{key} @ {step}")

    r = run_script("eval.py", f"--workdir={two}", cache_dir=cache_dir, devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    final = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(json.loads((two / "eval.json").read_text())["val_loss"] - final["val_loss"]) < 1e-4

    # A 1-process resume of this checkpoint is refused: test_trainer.py checks that in-process.
