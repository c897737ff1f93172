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


def _np_adamw_group(params, grad_steps, t: TrainConfig, lr_mult, weight_decay, clip):
    """Independent AdamW over one parameter group: the group's gradient clipped by its own global norm, Adam
    with bias correction, decoupled weight decay on matrices only, cosine lr without warmup. Returns the
    parameters after ``len(grad_steps)`` steps (float64)."""
    p = [np.asarray(x, np.float64) for x in params]
    m, v = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
    for step, grads in enumerate(grad_steps):
        norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads))
        scale = min(1.0, clip / norm)
        lr = lr_mult * t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * step / t.steps)))
        for k, g in enumerate(grads):
            g = scale * np.asarray(g, np.float64)
            m[k] = t.b1 * m[k] + (1 - t.b1) * g
            v[k] = t.b2 * v[k] + (1 - t.b2) * g * g
            m_hat, v_hat = m[k] / (1 - t.b1 ** (step + 1)), v[k] / (1 - t.b2 ** (step + 1))
            decay = weight_decay * p[k] if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + t.eps) + decay)
    return p


def _tree(table, w_gate, norm):
    return {"blocks": {"0": {"ffn": {"table": table, "w_gate": w_gate}}}, "norm": norm}


def test_each_group_is_clipped_by_its_own_norm_against_numpy_adamw():
    # Adam's first step is ~sign(g) whatever the scale, so clipping only shows in later steps: step 1 has both
    # groups far above their clip norms, step 2 has each group between the two clip norms (0.5 < norm < 1).
    # Distinct clip norms, lr multipliers and decays per group, so swapping or sharing them shows too.
    t = TrainConfig(steps=10, warmup_steps=0, lr=0.1, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                    weight_decay=0.1, stem_weight_decay=0.2, clip_norm=1.0, stem_clip_norm=0.5, stem_lr_mult=0.5)
    rng = np.random.default_rng(0)
    params = _tree(*(rng.normal(size=s).astype(np.float32) for s in ((4, 3), (2, 3), (3,))))

    def grads(backbone_norm, table_norm):
        table_4x3, gate_2x3, norm_3 = (rng.normal(size=s) for s in ((4, 3), (2, 3), (3,)))
        bb = np.sqrt(np.sum(gate_2x3 ** 2) + np.sum(norm_3 ** 2))
        return _tree(*(x.astype(np.float32) for x in (table_4x3 * table_norm / np.linalg.norm(table_4x3),
                                               gate_2x3 * backbone_norm / bb, norm_3 * backbone_norm / bb)))
    steps = [grads(3.0, 1e3), grads(0.7, 0.8)]

    tx = make_optimizer(t)
    state, new = tx.init(params), jax.tree.map(jnp.asarray, params)
    for g in steps:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, new)
        new = optax.apply_updates(new, updates)

    def leaves(tree, keys):
        return [tree["blocks"]["0"]["ffn"][k] if k != "norm" else tree["norm"] for k in keys]
    for keys, lr_mult, wd, clip, other_clip in ((("w_gate", "norm"), 1.0, 0.1, 1.0, 0.5),
                                                (("table",), 0.5, 0.2, 0.5, 1.0)):
        want = _np_adamw_group(leaves(params, keys), [leaves(g, keys) for g in steps], t, lr_mult, wd, clip)
        for k, got, w, p0 in zip(keys, leaves(new, keys), want, leaves(params, keys)):
            np.testing.assert_allclose(np.asarray(got) - p0, w - p0, rtol=1e-5, atol=1e-7, err_msg=k)
        # The steps are chosen so that no clipping, or the other group's norm, moves parameters far more
        # than the tolerance above.
        for wrong in (np.inf, other_clip):
            far = _np_adamw_group(leaves(params, keys), [leaves(g, keys) for g in steps], t, lr_mult, wd, wrong)
            assert max(np.max(np.abs(a - b)) for a, b in zip(far, want)) > 1e-3, (keys, wrong)

    big = _tree(1e6 * jnp.ones((4, 3)), 0.01 * jnp.ones((2, 3)), 0.01 * jnp.ones((3,)))
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
