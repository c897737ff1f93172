"""Parameter groups: the STEM tables get their own lr multiplier, weight decay and clipping."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stem_jax.config import TrainConfig
from stem_jax.optim import group_norms, make_optimizer, param_labels, schedule

PARAMS = {"blocks": {"0": {"ffn": {"table": jnp.ones((4, 3)), "w_gate": jnp.ones((2, 3))}}},
          "norm": jnp.ones((3,))}


def test_labels():
    labels = param_labels(PARAMS)
    assert labels["blocks"]["0"]["ffn"]["table"] == "stem"
    assert labels["blocks"]["0"]["ffn"]["w_gate"] == "backbone" and labels["norm"] == "backbone"


def _step(t: TrainConfig, grads):
    tx = make_optimizer(t)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    return optax.apply_updates(PARAMS, updates)


def test_stem_group_hyperparameters_are_separate():
    t = TrainConfig(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.0, stem_weight_decay=0.0, stem_lr_mult=0.0)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    new = _step(t, grads)
    np.testing.assert_array_equal(new["blocks"]["0"]["ffn"]["table"], PARAMS["blocks"]["0"]["ffn"]["table"])
    assert not np.allclose(new["blocks"]["0"]["ffn"]["w_gate"], 1.0)
    # Weight decay only on the tables: a zero gradient still shrinks the table, not the backbone.
    t = dataclasses.replace(t, stem_lr_mult=1.0, stem_weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    new = _step(t, zero)
    assert np.all(np.asarray(new["blocks"]["0"]["ffn"]["table"]) < 1.0)
    np.testing.assert_array_equal(new["blocks"]["0"]["ffn"]["w_gate"], 1.0)
    np.testing.assert_array_equal(new["norm"], 1.0)


def test_each_group_is_clipped_by_its_own_norm():
    # A huge table gradient must not shrink the backbone update (separate global norms, as in the paper).
    t = TrainConfig(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.0, stem_weight_decay=0.0,
                    b1=0.0, b2=0.0, eps=0.0, clip_norm=1.0, stem_clip_norm=1.0)
    small = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), PARAMS)
    big = dict(small, blocks={"0": {"ffn": {"table": 1e6 * jnp.ones((4, 3)), "w_gate": 0.01 * jnp.ones((2, 3))}}})
    np.testing.assert_allclose(_step(t, big)["blocks"]["0"]["ffn"]["w_gate"],
                               _step(t, small)["blocks"]["0"]["ffn"]["w_gate"], rtol=1e-6)
    norms = group_norms(big)
    np.testing.assert_allclose(norms["stem_grad_norm"], 1e6 * np.sqrt(12), rtol=1e-6)
    np.testing.assert_allclose(norms["backbone_grad_norm"], 0.01 * np.sqrt(6 + 3), rtol=1e-5)


def test_schedule_without_warmup_starts_at_peak():
    s = schedule(TrainConfig(steps=100, warmup_steps=0, lr=1.0, min_lr_ratio=0.1))
    np.testing.assert_allclose([float(s(0)), float(s(100))], [1.0, 0.1], rtol=1e-5)


def test_schedule_warmup_cosine_to_ten_percent():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    s = schedule(t)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), 0.1, rtol=1e-5)
    assert float(s(55)) < 1.0
