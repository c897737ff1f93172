"""orbax checkpoints: any mesh to any mesh with identical values, the data position, unreadable ones, tools
that never write, and processes that agree on what to restore."""
import hashlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, mesh_of, script_env, tiny_config
from test_multiprocess import free_port
from test_resume import TINY, step_rows
from stem_jax import checkpoint, corpus as corpus_lib, data, lock, sharding, workdir as workdir_lib
from stem_jax.config import ConfigError, DataConfig, to_dict
from stem_jax.trainer import Trainer

TOKENS = (np.arange(17 * 200 + 1) % 1000).astype(np.uint16)


def _batches(cfg):
    return iter(data.train_dataset(TOKENS, cfg.model.seq_len, cfg.train.batch_size, 0, cfg.model.vocab_size))


def _trained_state(cfg, shape, steps):
    """State after ``steps`` real steps (so the Adam moments are not zero) and its data iterator."""
    s = Trainer.create(cfg, mesh_of(shape))
    state, batches = s.init_state(), _batches(cfg)
    for _ in range(steps):
        state, _ = s.step(state, next(batches))
    return s, state, batches


def _save(workdir, s, state, batches, step):
    mngr = checkpoint.manager(workdir)
    rows = state["params"]["blocks"][1]["ffn"]["table"].get_value().shape[0]
    checkpoint.save(mngr, state, batches, {"step": step, "config": to_dict(s.ctx.cfg), "table_rows": rows})
    mngr.wait_until_finished()
    mngr.close()


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_save_on_2x4_restore_on_any_mesh_with_identical_values(tmp_path):
    cfg = tiny_config()
    cfg.train.batch_size = 24  # divisible by 8 and by 6 batch shards
    src, state, batches = _trained_state(cfg, (2, 4, 1), steps=1)
    _save(tmp_path, src, state, batches, step=1)
    want = _flat(jax.device_get({"params": state["params"], "opt_state": state["opt_state"]}))
    next_batch = next(batches).copy()
    # 6 vocab shards pad the tables to lcm(128, 6) = 384k rows: 1152 instead of 1024.
    for shape, rows in [((4, 2, 1), 1024), ((8, 1, 1), 1024), ((1, 1, 1), 1024), ((6, 1, 1), 1152)]:
        dst = Trainer.create(cfg, mesh_of(shape))
        it = _batches(cfg)
        mngr = checkpoint.manager(tmp_path, create=False)
        meta = checkpoint.read_meta(mngr, 1)
        got = checkpoint.restore_state(mngr, 1, meta, dst.ctx.abstract_state, dst.ctx.state_shardings, it)
        mngr.close()
        assert int(got["step"]) == 1
        table = got["params"]["blocks"][1]["ffn"]["table"].get_value()
        want_sharding = dst.ctx.state_shardings["params"]["blocks"][1]["ffn"]["table"].get_value()
        assert table.shape[0] == rows and table.sharding.is_equivalent_to(want_sharding, 2)
        flat = _flat(jax.device_get({"params": got["params"], "opt_state": got["opt_state"]}))
        assert flat.keys() == want.keys()
        for key, a in want.items():
            b = flat[key]
            if b.shape != a.shape:  # a table or its moments: the same rows by token, then zero padding
                b, a = sharding.table_by_token(b, cfg.model), sharding.table_by_token(a, cfg.model)
                np.testing.assert_array_equal(b[:1000], a[:1000], err_msg=key)
                assert not b[1000:].any() and not a[1000:].any(), key
            else:
                np.testing.assert_array_equal(b, a, err_msg=key)
        np.testing.assert_array_equal(next(it), next_batch)  # the data position came back too


def test_unreadable_newest_checkpoint_falls_back_and_is_kept_aside(tmp_path):
    cfg = tiny_config()
    s, state, batches = _trained_state(cfg, (1, 1, 1), steps=1)
    _save(tmp_path, s, state, batches, step=1)
    state, _ = s.step(state, next(batches))
    _save(tmp_path, s, state, batches, step=2)
    files = sorted((tmp_path / "checkpoints" / "2" / "params").rglob("ocdbt.process_0/d/*"),
                   key=lambda p: p.stat().st_size)
    files[-1].write_bytes(files[-1].read_bytes()[:100])  # a truncated write
    logs, checked = [], []
    mngr = checkpoint.manager(tmp_path, create=False)
    with pytest.raises(checkpoint.CheckpointError, match="only the holder of the workdir's lock may set them aside"):
        checkpoint.restore_latest(mngr, lambda m: None, s.ctx.abstract_state, s.ctx.state_shardings, _batches(cfg),
                                  logs.append)
    assert mngr.all_steps() == [1, 2] and not (tmp_path / "checkpoints_unreadable").exists()
    logs.clear()
    with lock.hold(tmp_path, "test"):  # as train.py holds it
        state1, step = checkpoint.restore_latest(mngr, checked.append, s.ctx.abstract_state, s.ctx.state_shardings,
                                                 _batches(cfg), logs.append)
    assert step == 1 and [m["step"] for m in checked] == [2, 1]
    assert len(logs) == 1 and "checkpoint step 2 is unreadable" in logs[0] and "resuming from step 1" in logs[0]
    assert mngr.all_steps() == [1]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_unreadable").iterdir()] == ["2"]

    # A check that refuses the run propagates; with every checkpoint unreadable nothing is moved.
    with pytest.raises(ConfigError, match="different model"):
        checkpoint.restore_latest(mngr, lambda m: (_ for _ in ()).throw(ConfigError("different model")),
                                  s.ctx.abstract_state, s.ctx.state_shardings, _batches(cfg), logs.append)
    for f in (tmp_path / "checkpoints" / "1" / "params").rglob("ocdbt.process_0/d/*"):
        f.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="step 1: "):
        checkpoint.restore_latest(mngr, lambda m: None, s.ctx.abstract_state, s.ctx.state_shardings, _batches(cfg),
                                  logs.append)
    assert mngr.all_steps() == [1]
    mngr.close()


def test_eval_restores_params_alone_and_missing_checkpoints_are_clear_errors(tmp_path):
    cfg = tiny_config()
    cfg.train.batch_size = 24
    s, state, batches = _trained_state(cfg, (2, 4, 1), steps=0)
    _save(tmp_path, s, state, batches, step=0)
    dst = Trainer.create(cfg, mesh_of((6, 1, 1)))  # 1152 table rows instead of 1024
    build = lambda step, meta: (dst.ctx.abstract_state["params"], dst.ctx.state_shardings["params"])
    params, step, meta = checkpoint.restore_params(tmp_path, build)
    assert step == 0 and meta["step"] == 0
    for (key, a), b in zip(_flat(jax.device_get(state["params"])).items(), jax.tree.leaves(params)):
        b = np.asarray(b)
        np.testing.assert_array_equal(b[:len(a)], a, err_msg=key)
        assert not b[len(a):].any()
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5 under"):
        checkpoint.restore_params(tmp_path, build, step=5)
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        checkpoint.restore_params(tmp_path / "empty", build)


def listing(root):
    """Every path under ``root`` with its kind, size, modification time and (files) content hash."""
    def entry(p):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        return p.is_dir(), st.st_size, st.st_mtime_ns, digest
    return {str(p.relative_to(root)): entry(p) for p in sorted(root.rglob("*"))}


def test_tools_leave_a_save_in_progress_and_every_file_alone(tmp_path, stem_workdir):
    """A step-2 save in progress (a temporary folder named as orbax 0.12.8 names it) next to committed step 1:
    every read path of the tools (eval, sampling, scoring, editing, export) leaves the tree exactly as it was.
    The lock holder alone cleans it up, as the leftover of a killed save, and writes step 2 again."""
    work = tmp_path / "work"
    shutil.copytree(stem_workdir, work)
    partial = checkpoint.directory(work) / "2.orbax-checkpoint-tmp"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "manifest.ocdbt").write_bytes(b"half of a save")
    assert ocp.utils.is_tmp_checkpoint(partial)  # orbax's own test of a save in progress
    before = listing(work)

    assert checkpoint.read_step_meta(work, 1)["step"] == 1
    run = workdir_lib.restore(work)  # what eval.py, sampling, scoring and editing restore with
    workdir_lib.check_tokenizer(work, run.step, run.require_tokenizer())  # eval.py
    _, arrays, step = workdir_lib.read_params(work)  # export, inject
    mesh = mesh_of((1, 1, 1))
    build = lambda s, meta: workdir_lib.abstract_model(run.cfg, mesh)[1:]  # noqa: E731
    params, step1, _ = checkpoint.restore_params(work, build, step=1)
    assert run.step == step == step1 == 1 and arrays
    assert listing(work) == before

    with lock.hold(work, "test"):
        checkpoint.save_params(work, params, {"step": 2})
    assert not partial.exists() and checkpoint.read_step_meta(work, 2) == {"step": 2}
    kept = {k: v for k, v in listing(work).items() if k.startswith("checkpoints/1")}
    assert kept == {k: v for k, v in before.items() if k.startswith("checkpoints/1")}


# Process 1 cannot read step 16's arrays and sees 3 MiB free; every process says what it restored.
ONE_PROCESS_FAILS = """
import runpy, sys
from pathlib import Path
import jax
import orbax.checkpoint as ocp
from stem_jax import checkpoint
handler_restore, restore_latest = ocp.CompositeCheckpointHandler.restore, checkpoint.restore_latest
free_bytes = checkpoint.free_bytes
def restore_on_1(self, directory, args=None):
    if jax.process_index() == 1 and Path(directory).name == "16" and "params" in args:
        raise OSError("test: step 16 is unreadable here")
    return handler_restore(self, directory, args=args)
def restore_latest_said(*args, **kwargs):
    state, step = restore_latest(*args, **kwargs)
    print(f"process {jax.process_index()} restored step {step}", flush=True)
    return state, step
ocp.CompositeCheckpointHandler.restore, checkpoint.restore_latest = restore_on_1, restore_latest_said
checkpoint.free_bytes = lambda path: 3 << 20 if jax.process_index() == 1 else free_bytes(path)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
PAIR_ARGS = [*TINY, "--config.train.steps=16", "--config.train.batch_size=8"]  # test_multiprocess.py's flags,
# so the persistent compilation cache can serve both files; checkpoints every 4 steps
TINY_VOCAB = 8192  # configs/tiny.py, train.py's default


def run_pair(work, cache_dir, code=None, timeout=240):
    """train.py (or ``code`` running it) in 2 processes x 4 CPU devices; [(returncode, stdout, stderr)] by
    process. A pair that has not ended within ``timeout`` (a hang) is killed and fails the test."""
    port = free_port()
    cmd = [sys.executable, *(["-c", code] if code else [str(REPO / "train.py")]), f"--workdir={work}", *PAIR_ARGS,
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=REPO, env=script_env(cache_dir, devices=4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def test_processes_agree_on_the_checkpoint_and_on_a_save_that_cannot_fit(tmp_path, cache_dir):
    """Process 1 alone cannot read the newest checkpoint (step 16): both processes restore step 12, process 0
    warns once, step 16 is set aside once, and steps 13..16 replay bitwise. Then process 1 alone lacks the
    space for the step-16 save: both stop with the same one-line error, neither waits on the other."""
    # The pair shares a token store built here first (one build for many processes is another test's part).
    corpus_lib.load_corpus(DataConfig(cache_dir=cache_dir), TINY_VOCAB, log=lambda *_: None)
    work = tmp_path / "run"
    for rc, out, err in run_pair(work, cache_dir):
        assert rc == 0, err[-3000:]
    first = step_rows(work)
    assert sorted(first) == list(range(1, 17))

    (rc0, out0, err0), (rc1, out1, err1) = run_pair(work, cache_dir, ONE_PROCESS_FAILS)
    assert "process 0 restored step 12" in out0 and "process 1 restored step 12" in out1, (err0[-3000:], err1[-3000:])
    warnings = [line for line in (out0 + out1).splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "WARNING: checkpoint step 16 is unreadable (PeerError: process 1: OSError: test: step 16 is unreadable "
        "here); resuming from step 12") and warnings[0] in out0, warnings
    assert [p.name.split("-")[0] for p in (work / "checkpoints_unreadable").iterdir()] == ["16"]
    replayed = step_rows(work)
    assert sorted(replayed) == list(range(1, 17)) and replayed == first

    for rc, err in ((rc0, err0), (rc1, err1)):
        error = err.strip().splitlines()[-1]
        assert rc == 1 and re.fullmatch(
            r"error: CheckpointError: checkpoint step 16 needs about [\d.]+ MiB in \S+/checkpoints, but only 3.0 "
            r"MiB are free on process 1; training stopped. The newest checkpoint, step 12, is intact; .*", error), \
            err[-3000:]
    assert sorted(int(p.name) for p in checkpoint.directory(work).iterdir()) == [8, 12]
