"""The sparse row-wise table optimizer: against numpy lazy Adam and optax AdamW, untouched rows bit-identical,
sharded equals unsharded, and the sparse train step equals the dense one when every row is touched."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import mesh_of, tiny_config
from stem_jax import sharding, sparse
from stem_jax.config import ConfigError, TrainConfig, validate
from stem_jax.trainer import Trainer

T = TrainConfig(lr=0.05, b1=0.9, b2=0.95, eps=1e-8, stem_weight_decay=0.1)
V, F = 64, 8  # rows split over 4 vocab shards on the 2x2x2 mesh


def _tables(rng):
    return nnx.State({"table": nnx.Param(jnp.asarray(rng.normal(size=(V, F)), jnp.float32),
                                         logical_axes=("stem_vocab", "stem_dff"))})


def _run(touches, grads, mesh=None):
    """Apply sparse.update for each step's touched ids (sorted, padded with the fill id V)."""
    tables = _tables(np.random.default_rng(0))
    state = sparse.init_state(tables)
    fn = jax.jit(lambda tb, st, u, g: sparse.update(tb, st, u, [g], jnp.float32(T.lr), T)[:2])
    for ids, g in zip(touches, grads):
        uniq = np.full(len(ids) + 3, V, np.int32)
        uniq[:len(ids)] = np.sort(ids)
        g_pad = np.zeros((len(uniq), F), np.float32)
        g_pad[:len(ids)] = g[np.argsort(ids)]
        if mesh is None:
            tables, state = fn(tables, state, jnp.asarray(uniq), jnp.asarray(g_pad))
        else:
            with jax.set_mesh(mesh):
                tables, state = fn(tables, state, jnp.asarray(uniq), jnp.asarray(g_pad))
    return [np.asarray(x) for x in (tables["table"].get_value(), state["mu"]["table"].get_value(),
                                    state["nu"]["table"].get_value(), state["count"]["table"].get_value())]


def _numpy_lazy_adamw(touches, grads):
    p = np.random.default_rng(0).normal(size=(V, F)).astype(np.float64)
    m, v, c = np.zeros_like(p), np.zeros_like(p), np.zeros(V, np.int64)
    for ids, g in zip(touches, grads):
        c[ids] += 1
        m[ids] = T.b1 * m[ids] + (1 - T.b1) * g
        v[ids] = T.b2 * v[ids] + (1 - T.b2) * g ** 2
        mh, vh = m[ids] / (1 - T.b1 ** c[ids, None]), v[ids] / (1 - T.b2 ** c[ids, None])
        p[ids] -= T.lr * (mh / (np.sqrt(vh) + T.eps) + T.stem_weight_decay * p[ids])
    return p, m, v, c


def _partial_touches(rng, steps=4):
    touches = [rng.choice(V // 2, size=n, replace=False) for n in (5, 12, 3, 20)[:steps]]  # rows >= V/2 never
    return touches, [rng.normal(size=(len(t), F)).astype(np.float32) for t in touches]


def test_partial_touches_follow_numpy_lazy_adamw_and_leave_other_rows_bit_identical():
    touches, grads = _partial_touches(np.random.default_rng(1))
    p, m, v, c = _run(touches, grads)
    rp, rm, rv, rc = _numpy_lazy_adamw(touches, grads)
    np.testing.assert_allclose(p, rp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, rm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, rv, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(c, rc)
    p0 = np.asarray(_tables(np.random.default_rng(0))["table"].get_value())
    never = np.setdiff1d(np.arange(V), np.concatenate(touches))
    np.testing.assert_array_equal(p[never], p0[never])  # bitwise: no decay, no stale momentum
    assert not m[never].any() and not v[never].any() and not c[never].any()


def test_sharded_update_equals_unsharded():
    touches, grads = _partial_touches(np.random.default_rng(2))
    for a, b in zip(_run(touches, grads, mesh_of((2, 2, 2))), _run(touches, grads)):
        np.testing.assert_array_equal(a, b)


def test_every_row_touched_equals_optax_adamw():
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=(V, F)).astype(np.float32) for _ in range(3)]
    p, m, v, _ = _run([np.arange(V)] * 3, grads)
    tx = optax.adamw(T.lr, b1=T.b1, b2=T.b2, eps=T.eps, weight_decay=T.stem_weight_decay)
    ref = jnp.asarray(np.asarray(_tables(np.random.default_rng(0))["table"].get_value()))
    st = tx.init(ref)
    for g in grads:
        u, st = tx.update(jnp.asarray(g), st, ref)
        ref = optax.apply_updates(ref, u)
    np.testing.assert_allclose(p, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m, st[0].mu, rtol=1e-6, atol=1e-7)  # cancellation near 0
    np.testing.assert_allclose(v, st[0].nu, rtol=1e-6, atol=1e-9)


def test_dedup_and_clip():
    ids = jnp.asarray([[3, 1, 3], [5, 1, 9]])
    uniq, inv = sparse.dedup(ids, 6, 99)
    np.testing.assert_array_equal(uniq, [1, 3, 5, 9, 99, 99])
    np.testing.assert_array_equal(uniq[inv], ids)
    g = [jnp.full((2, 2), 3.0), jnp.full((1, 2), 4.0)]
    clipped, norm = sparse.clip(g, 1.0)
    np.testing.assert_allclose(norm, np.sqrt(4 * 9 + 2 * 16), rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(sum(float(jnp.sum(x ** 2)) for x in clipped)), 1.0, rtol=1e-6)


def _batches(vocab, n, B, L, rng):
    """Batches whose inputs (all but the last column) hold every id of the vocabulary."""
    out = []
    for _ in range(n):
        ids = np.concatenate([rng.permutation(vocab) for _ in range(-(-B * L // vocab))])[:B * L]
        out.append(np.concatenate([ids.reshape(B, L), rng.integers(0, vocab, (B, 1))], 1).astype(np.int32))
    return out


def _train(cfg, shape, batches):
    s = Trainer.create(cfg, mesh_of(shape))
    state, losses = s.init_state(), []
    for b in batches:
        state, metrics = s.step(state, b)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state["params"]), losses, jax.device_get(metrics)


def test_sparse_step_on_2x2x2_mesh_equals_dense_adamw_on_one_device_when_every_row_is_touched():
    dense = tiny_config(vocab_size=128, n_layers=2, stem_layers="1")  # 128 ids <= 8 x 16 input positions, no padding rows
    sparse_cfg = dataclasses.replace(dense, train=dataclasses.replace(dense.train, stem_optimizer="sparse"))
    batches = _batches(128, 2, dense.train.batch_size, dense.model.seq_len, np.random.default_rng(0))
    _assert_same_training(_train(sparse_cfg, (2, 2, 2), batches), _train(dense, (1, 1, 1), batches), 1e-6, 1e-5)


def _assert_same_training(got, want, loss_rtol: float, norm_rtol: float) -> None:
    """Two ``_train`` results agree: losses, the last step's norms, and every parameter."""
    (p_got, l_got, m_got), (p_want, l_want, m_want) = got, want
    np.testing.assert_allclose(l_got, l_want, rtol=loss_rtol)
    for k in ("stem_grad_norm", "backbone_grad_norm", "param_norm"):
        np.testing.assert_allclose(m_got[k], m_want[k], rtol=norm_rtol, err_msg=k)
    # Adam's m / (sqrt(v) + eps) turns float32 rounding in a gradient near eps (one table entry's gradient was
    # 4.6e-8 against a typical 2.5e-4, differing by 0.4 % between meshes) into a ~6e-6 parameter difference. A
    # wrong or dropped row moves whole rows by ~lr (1e-2), and double counting shows in the grad norms above.
    flat_got = dict(jax.tree_util.tree_flatten_with_path(p_got)[0])
    for path, a in jax.tree_util.tree_flatten_with_path(p_want)[0]:
        np.testing.assert_allclose(flat_got[path], a, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def _adversarial_batches(cfg, rng):
    """Inputs that stress the exchange: one id everywhere; ids all stored on one of 8 row shards; all
    distinct; the first and last ids and shard edges."""
    V, B, L = cfg.model.vocab_size, cfg.train.batch_size, cfg.model.seq_len + 1
    stored = sharding.stored_rows(np.arange(V), V)
    last_shard = np.flatnonzero(stored >= 1024 - 128)
    edges = np.flatnonzero(np.isin(stored % 128, (0, 127)))[:40]
    inputs = [np.full(B * L, 7), rng.choice(last_shard, B * L), rng.permutation(V)[:B * L],
              np.resize(np.concatenate([[0, V - 1], edges]), B * L)]
    return [x.reshape(B, L).astype(np.int32) for x in inputs]


@pytest.fixture(scope="module")
def adversarial_run():
    """(config, batches, the sparse run on one device) shared by the mesh cases."""
    cfg = tiny_config(n_layers=2, stem_layers="1", stem_capacity=0.1)  # 0.1: several exchange rounds per step
    cfg.train.stem_optimizer = "sparse"
    batches = _adversarial_batches(cfg, np.random.default_rng(0))
    return cfg, batches, _train(cfg, (1, 1, 1), batches)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (4, 2, 1)])
def test_sparse_steps_on_a_mesh_equal_one_device_on_adversarial_batches(adversarial_run, shape):
    cfg, batches, one_device = adversarial_run
    _assert_same_training(_train(cfg, shape, batches), one_device, 1e-5, 1e-4)


@pytest.mark.parametrize("change,msg", [
    (dict(train={"stem_optimizer": "sparce"}), "did you mean 'sparse'"),
    (dict(train={"stem_optimizer": "sparse"}, model={"ffn": "hash_moe"}), "needs model.ffn='stem'"),
    (dict(model={"stem_offload": True}), "needs train.stem_optimizer='sparse'"),
])
def test_bad_optimizer_settings_are_clear_errors(change, msg):
    cfg = tiny_config()
    for section, fields in change.items():
        for k, v in fields.items():
            setattr(getattr(cfg, section), k, v)
    with pytest.raises(ConfigError, match=msg):
        validate(cfg)
