"""orbax checkpoints: any mesh to any mesh with identical values, the data position, unreadable ones."""
import jax
import numpy as np
import pytest

from conftest import mesh_of, tiny_config
from stem_jax import checkpoint, data, sharding
from stem_jax.config import ConfigError, to_dict
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
