"""The jitted train step: sharded equals unsharded, in both lookup modes."""
import jax
import numpy as np
import pytest

from conftest import mesh_of, tiny_config
from stem_jax import sharding
from stem_jax.trainer import Trainer


def _one_step(cfg, shape, batch):
    s = Trainer.create(cfg, mesh_of(shape))
    state = s.init_state()
    init = jax.device_get(state["params"])  # before the step donates the state
    state, metrics = s.step(state, batch)
    return jax.device_get(state["params"]), jax.device_get(metrics), s, init


# The default lookup end to end; "shard_map" and "xla" are checked against numpy in test_stem.py.
@pytest.mark.parametrize("lookup", ["exchange"])
def test_train_step_on_2x4_mesh_equals_single_device(lookup):
    cfg = tiny_config(stem_lookup=lookup)
    cfg.train.warmup_steps = 0  # a warmup starts at lr 0: the first step would not move the parameters
    rng = np.random.default_rng(0)
    batch = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
    p1, m1, _, init = _one_step(cfg, (1, 1, 1), batch)
    p8, m8, s8, _ = _one_step(cfg, (2, 4, 1), batch)
    assert float(m1["lr"]) == pytest.approx(cfg.train.lr)
    assert s8.ctx.state_shardings["params"]["blocks"][1]["ffn"]["table"].get_value().spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m8["stem_grad_norm"], m1["stem_grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(m8["backbone_grad_norm"], m1["backbone_grad_norm"], rtol=1e-4)
    flat1 = jax.tree_util.tree_flatten_with_path(p1)[0]
    flat8 = dict(jax.tree_util.tree_flatten_with_path(p8)[0])
    flat0 = dict(jax.tree_util.tree_flatten_with_path(init)[0])
    for path, a in flat1:
        assert np.max(np.abs(a - flat0[path])) > 1e-3, f"{jax.tree_util.keystr(path)} did not move"
        # Adam's first update is g / (|g| + eps): where |g| is near eps, summation-order noise in g moves it by
        # up to ~lr * 1e-2 (a sign error would be 2 * lr).
        np.testing.assert_allclose(flat8[path], a, rtol=2e-4, atol=cfg.train.lr * 1e-2,
                                   err_msg=jax.tree_util.keystr(path))
    # Only the rows of tokens in the batch moved (plus weight decay on every row).
    table0 = p1["blocks"][1]["ffn"]["table"]
    assert table0.shape == (1024, cfg.model.d_ff)
    by_token = sharding.table_by_token(table0, cfg.model)
    assert np.all(by_token[cfg.model.vocab_size:] == 0)  # padding rows: zero grad, zero decay


def test_dense_twin_has_no_tables_and_trains():
    cfg = tiny_config(ffn="dense")
    batch = np.zeros((cfg.train.batch_size, cfg.model.seq_len + 1), np.int32)
    params, metrics, s, _ = _one_step(cfg, (8, 1, 1), batch)
    assert s.ctx.stem_layers == ()
    assert "table" not in str(jax.tree_util.tree_structure(params))
    assert float(metrics["stem_grad_norm"]) == 0.0 and np.isfinite(metrics["loss"])


def test_non_finite_metrics_stop_training_with_the_step_named():
    from stem_jax.trainer import _check_finite
    assert _check_finite(3, {"loss": np.float32(2.5)}) == {"loss": 2.5}
    with pytest.raises(FloatingPointError, match="non-finite metrics at step 7"):
        _check_finite(7, {"loss": np.float32(np.nan), "stem_grad_norm": np.float32(1.0)})


def test_resume_refuses_a_checkpoint_of_another_process_count():
    from stem_jax.config import ConfigError, to_dict
    from stem_jax.trainer import _resume_check
    cfg = tiny_config()
    check = _resume_check(cfg, {"tokenizer_sha256": "t", "process_count": 1, "mesh": {}}, [])
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1"):
        check({"config": to_dict(cfg), "tokenizer_sha256": "t", "process_count": 2, "mesh": {}})
