"""Runs that survive anything, through train.py as users run it: kill -9, SIGTERM, an unreadable
checkpoint, divergence, a changed model and tools reading during a save all leave a run that resumes
exactly (or fails clearly)."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script, script_env, start_script

TINY = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=64", "--config.model.seq_len=16",
        "--config.model.stem_layers=1", "--config.train.batch_size=4", "--config.train.log_every=1",
        "--config.train.warmup_steps=2", "--config.train.eval_batches=2", "--config.train.steps=40",
        "--config.train.checkpoint_every=4"]
EXACT = ("loss", "lr", "backbone_grad_norm", "stem_grad_norm", "param_norm")


def train(work, *extra, cache_dir):
    return run_script("train.py", f"--workdir={work}", *TINY, *extra, cache_dir=cache_dir)


def step_rows(work):
    rows = [json.loads(r) for r in (work / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in EXACT} for r in rows if "loss" in r}


def data_position(work, step=40):
    return json.loads((work / "checkpoints" / str(step) / "data" / "process_0-of-1.json").read_text())


def snapshot(work):
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted 40-step run, checkpoints every 4 steps (the newest 3 kept)."""
    work = tmp_path_factory.mktemp("reference") / "run"
    r = train(work, cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [32, 36, 40]
    rows = step_rows(work)
    assert sorted(rows) == list(range(1, 41))
    return work, rows


def wait_for(path, proc, timeout=300):
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {path} appeared: "
                                 f"{proc.stderr.read()[-2000:]}")
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.01)


def test_kill_9_then_rerun_replays_bitwise_identical_steps(tmp_path, cache_dir, reference):
    work = tmp_path / "run"
    p = start_script("train.py", f"--workdir={work}", *TINY, cache_dir=cache_dir)
    wait_for(work / "checkpoints" / "8", p)
    assert p.poll() is None
    p.send_signal(signal.SIGKILL)  # mid-step or mid-save, wherever it is
    p.wait()
    assert not (work / "checkpoints" / "40").exists()
    r = train(work, cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"resumed from the checkpoint at step (8|12|16|20|24|28)\b", r.stdout), r.stdout[-2000:]
    assert re.search(r"compilation cache .*: [1-9]\d* program\(s\) loaded from it", r.stderr), r.stderr[-2000:]
    assert step_rows(work) == reference[1]  # every step once, same batches, same numbers
    assert data_position(work) == data_position(reference[0])


def test_sigterm_saves_the_current_step_exits_0_and_resumes(tmp_path, cache_dir, reference):
    work = tmp_path / "run"
    p = start_script("train.py", f"--workdir={work}", *TINY, cache_dir=cache_dir)
    wait_for(work / "checkpoints" / "4", p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved", out).group(1))
    assert stopped < 40 and (work / "checkpoints" / str(stopped)).is_dir()
    assert max(step_rows(work)) == stopped
    r = train(work, cache_dir=cache_dir)
    assert r.returncode == 0 and f"resumed from the checkpoint at step {stopped} " in r.stdout, r.stderr[-3000:]
    assert step_rows(work) == reference[1]
    assert data_position(work) == data_position(reference[0])


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, cache_dir, reference):
    work = tmp_path / "run"
    shutil.copytree(reference[0], work)
    files = sorted((work / "checkpoints" / "40" / "opt_state").rglob("ocdbt.process_0/d/*"),
                   key=lambda f: f.stat().st_size)
    files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])
    r = train(work, cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING: checkpoint step 40 is unreadable" in r.stdout and "resuming from step 36" in r.stdout
    assert [p.name.split("-")[0] for p in (work / "checkpoints_unreadable").iterdir()] == ["40"]
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [32, 36, 40]
    assert step_rows(work) == reference[1]


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir,
                                                                              reference):
    work = tmp_path / "run"
    shutil.copytree(reference[0], work)
    r = train(work, "--config.train.steps=48", "--config.train.lr=1e30", cache_dir=cache_dir)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "changed since that checkpoint: train.steps: 40 -> 48" in r.stdout
    assert "changed since that checkpoint: train.lr: 0.003 -> 1e+30" in r.stdout
    assert "non-finite metrics at step 41" in r.stderr
    assert "The newest checkpoint, step 40, is intact" in r.stderr and "Traceback" not in r.stderr
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [32, 36, 40]


@pytest.mark.parametrize("override,field", [
    ("--config.model.d_ff=96", "model.d_ff=96 differs from the checkpoint's model.d_ff=64"),
    ("--config.train.batch_size=8", "train.batch_size=8 differs"),
])
def test_a_different_model_is_refused_and_the_workdir_untouched(tmp_path, cache_dir, reference, override,
                                                                field):
    work = tmp_path / "run"
    shutil.copytree(reference[0], work)
    before = snapshot(work)
    r = train(work, override, cache_dir=cache_dir)
    assert r.returncode == 1 and field in r.stderr, r.stderr[-3000:]
    assert "use a new --workdir" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(work) == before


def test_offloaded_sparse_run_resumes_bitwise_from_a_mid_run_checkpoint(tmp_path, cache_dir):
    """Host tables, row-wise optimizer state and the prefetching data iterator all come back exactly."""
    work = tmp_path / "run"
    offload = ["--config.train.stem_optimizer=sparse", "--config.model.stem_offload=True", "--config.train.steps=12"]
    r = train(work, *offload, cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "STEM tables and their row-wise AdamW state in host memory" in r.stdout
    full = step_rows(work)
    assert sorted(full) == list(range(1, 13))
    for step in (8, 12):
        shutil.rmtree(work / "checkpoints" / str(step))
    r = train(work, *offload, cache_dir=cache_dir)
    assert r.returncode == 0 and "resumed from the checkpoint at step 4" in r.stdout, r.stderr[-3000:]
    assert step_rows(work) == full


# ---- saves that fail, tools on a damaged workdir ----

def checkpoint_bytes(work):
    return {k: v for k, v in snapshot(work).items() if k.startswith("checkpoints/")}


def truncate_largest(work, step, item="params"):
    files = sorted((work / "checkpoints" / str(step) / item).rglob("ocdbt.process_0/d/*"),
                   key=lambda f: f.stat().st_size)
    files[-1].write_bytes(files[-1].read_bytes()[:100])


SMALL_FILES = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_save_that_fails_in_the_background_stops_the_run_and_keeps_every_saved_file(tmp_path, cache_dir, reference):
    """Every checkpoint file over 1 MB fails to write (RLIMIT_FSIZE, a disk that fills up): the step-44 save
    fails inside orbax's background thread and the run stops with one line naming it and the good step 40."""
    work = tmp_path / "run"
    shutil.copytree(reference[0], work)
    before = checkpoint_bytes(work)
    r = subprocess.run([sys.executable, "-c", SMALL_FILES, f"--workdir={work}", *TINY, "--config.train.steps=200",
                        "--config.train.checkpoint_every=44"],
                       cwd=REPO, env=script_env(cache_dir), capture_output=True, text=True, timeout=500)
    assert r.returncode == 1, r.stderr[-3000:]
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: CheckpointError: saving checkpoint step 44 to ") and "failed: " in error, error
    assert "training stopped. The newest checkpoint, step 40, is intact" in error
    assert "Traceback" not in r.stderr and "orbax" not in r.stderr.replace(error, "")
    assert max(step_rows(work)) < 80  # noticed when the background save ended, not at the next save (step 88)
    after = checkpoint_bytes(work)
    assert {k: v for k, v in after.items() if not k.startswith("checkpoints/44")} == before


FULL_DISK = """
import runpy, sys
from stem_jax import checkpoint
checkpoint.free_bytes = lambda path: 3 << 20  # 3 MiB left: less than a checkpoint of this model
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_save_that_cannot_fit_stops_the_run_at_that_step(tmp_path, cache_dir, reference):
    work = tmp_path / "run"
    shutil.copytree(reference[0], work)
    before = checkpoint_bytes(work)
    r = subprocess.run([sys.executable, "-c", FULL_DISK, f"--workdir={work}", *TINY, "--config.train.steps=48"],
                       cwd=REPO, env=script_env(cache_dir), capture_output=True, text=True, timeout=500)
    assert r.returncode == 1, r.stderr[-3000:]
    assert re.search(r"error: CheckpointError: checkpoint step 44 needs about [\d.]+ MiB in \S+/checkpoints, but "
                     r"only 3.0 MiB are free; training stopped. The newest checkpoint, step 40, is intact", r.stderr)
    assert max(step_rows(work)) == 44 and checkpoint_bytes(work) == before


def test_tools_fall_back_past_an_unreadable_newest_checkpoint(tmp_path, cache_dir, reference, capsys):
    from stem_jax import hf, sampling
    work = tmp_path / "run"
    shutil.copytree(reference[0], work)
    truncate_largest(work, 40)
    before = snapshot(work)
    warning = f"WARNING: checkpoint step 40 of {work} is unreadable ("
    r = run_script("eval.py", f"--workdir={work}", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert warning in r.stdout and "); using step 36" in r.stdout
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr and "Event loop" not in r.stderr
    assert json.loads((work / "eval.json").read_text())["step"] == 36

    sampling.main(["--workdir", str(work), "--prompt", "And God", "--max_new_tokens", "2"])
    hf.main(["export", "--workdir", str(work), "--out", str(tmp_path / "hf")])
    out = capsys.readouterr()
    assert out.out.count(warning) == 2 and "exported step 36 of" in out.out, out.out[-2000:]
    assert "Traceback" not in out.err and "Exception ignored" not in out.err
    assert {k: v for k, v in snapshot(work).items() if not k.startswith("eval.")} == before


def test_an_unreadable_step_or_workdir_is_one_line_naming_what_was_tried(tmp_path, reference, capsys):
    from stem_jax import hf
    work = tmp_path / "run"
    shutil.copytree(reference[0], work)
    truncate_largest(work, 40)
    with pytest.raises(SystemExit) as e:
        hf.main(["export", "--workdir", str(work), "--out", str(tmp_path / "a"), "--step", "40"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"error: CheckpointError: no checkpoint of {work} can be read: step 40: " in err
    assert err.strip().endswith("; other steps: [36, 32] (--step)")
    for step in (36, 32):
        truncate_largest(work, step)
    with pytest.raises(SystemExit) as e:
        hf.main(["export", "--workdir", str(work), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert all(f"step {s}: " in err for s in (40, 36, 32)) and not (tmp_path / "b").exists()


# The step-$HOLD_STEP save stops after its files are written, before orbax renames its temporary folder
# (orbax 0.12.8's async_checkpointer._on_commit_callback; if that moves, the run ends before "saving" appears
# and wait_for fails), until $HOLD_EVENTS/go appears; $HOLD_EVENTS/saving (the folder's path) says it got there.
HOLD_SAVE = """
import os, runpy, sys, time
from pathlib import Path
from orbax.checkpoint._src.checkpointers import async_checkpointer
events, commit = Path(os.environ["HOLD_EVENTS"]), async_checkpointer._on_commit_callback
def held(tmpdir, *args, **kwargs):
    if tmpdir.get_final().name == os.environ["HOLD_STEP"]:
        (events / "saving.tmp").write_text(str(tmpdir.get()))
        os.replace(events / "saving.tmp", events / "saving")  # whole: the test reads it as soon as it exists
        while not (events / "go").exists():
            time.sleep(0.01)
    return commit(tmpdir, *args, **kwargs)
async_checkpointer._on_commit_callback = held
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_tools_reading_during_a_save_leave_the_run_alone(tmp_path, cache_dir, reference, capsys):
    """eval.py, sampling and ``editing edit`` read the workdir while its step-8 save is half done (held with its
    temporary folder written, not renamed); the save then lands and the run ends as the undisturbed one."""
    from stem_jax import editing, sampling
    work, events = tmp_path / "run", tmp_path / "events"
    events.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HOLD_SAVE, f"--workdir={work}", *TINY], cwd=REPO,
                         env=script_env(cache_dir, HOLD_EVENTS=str(events), HOLD_STEP="8"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    evaluation = None
    try:
        wait_for(events / "saving", p)
        partial = Path((events / "saving").read_text())
        assert partial.name == "8.orbax-checkpoint-tmp", partial
        before = snapshot(partial)
        evaluation = start_script("eval.py", f"--workdir={work}", cache_dir=cache_dir)  # beside the two below
        sampling.main(["--workdir", str(work), "--prompt", "And God", "--max_new_tokens", "2"])
        editing.main(["edit", "--workdir", str(work), "--prompt", "And God said", "--source", " God",
                      "--target", " Lord", "--max_new_tokens", "2", "--k", "2"])
        out = capsys.readouterr().out
        assert "And God" in out and "before: And God said" in out, out[-2000:]
        eval_out, eval_err = evaluation.communicate(timeout=300)
        assert evaluation.returncode == 0 and "step 4: val_loss" in eval_out, eval_err[-3000:]
        assert snapshot(partial) == before  # the save in progress, untouched
    except BaseException:
        for proc in (p, evaluation):
            if proc is not None:
                proc.kill()
        raise
    finally:
        (events / "go").touch()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert step_rows(work) == reference[1]
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [32, 36, 40]
