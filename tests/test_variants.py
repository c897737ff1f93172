"""STEM†, gate replacement and Hash-MoE against numpy; sharded equals unsharded (loss and gradients)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import mesh_of, tiny_config
from stem_jax import data, sharding
from stem_jax.config import ConfigError, moe_width, validate
from stem_jax.trainer import Setup
from stem_jax.variants import HashMoEFFN, StemAdditiveFFN, StemGateFFN, expert_of

D, F, V = 16, 24, 50


def silu(x):
    return x / (1.0 + np.exp(-x))


def _inputs(seed=0, shape=(2, 5)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(*shape, D)).astype(np.float32), rng.integers(0, V, size=shape)


def _np(*params):
    return (np.asarray(p[...]) for p in params)


def test_stem_additive_matches_numpy():
    ffn = StemAdditiveFFN(D, F, V, 0.02, rngs=nnx.Rngs(0))
    x, ids = _inputs()
    wg, wu, wd, table = _np(ffn.w_gate, ffn.w_up, ffn.w_down, ffn.table)
    want = (silu(x @ wg) * (x @ wu + table[ids])) @ wd
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x), jnp.asarray(ids))), want, rtol=1e-5, atol=1e-6)


def test_stem_gate_matches_numpy():
    ffn = StemGateFFN(D, F, V, 0.02, rngs=nnx.Rngs(1))
    x, ids = _inputs(1)
    wu, wd, table = _np(ffn.w_up, ffn.w_down, ffn.table)
    want = (silu(table[ids]) * (x @ wu)) @ wd
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x), jnp.asarray(ids))), want, rtol=1e-5, atol=1e-6)
    assert not hasattr(ffn, "w_gate")


def _np_expert(ids, n):
    return (((ids.astype(np.uint64) * 2654435761) % 2**32) >> 16) % n


def test_hash_routing_is_the_documented_fixed_hash_and_spreads_ids():
    ids = np.arange(4096)
    got = np.asarray(expert_of(jnp.asarray(ids, jnp.int32), 16))
    np.testing.assert_array_equal(got, _np_expert(ids, 16))
    counts = np.bincount(got, minlength=16)
    assert counts.min() > 0.8 * 256 and counts.max() < 1.2 * 256


def test_hash_moe_matches_numpy_per_token_expert():
    E, Fe = 4, 12
    ffn = HashMoEFFN(D, Fe, E, 0.02, rngs=nnx.Rngs(2))
    x, ids = _inputs(2, (3, 7))
    wg, wu, wd = _np(ffn.w_gate, ffn.w_up, ffn.w_down)
    e = _np_expert(ids, E)
    assert len(np.unique(e)) > 1
    want = np.zeros_like(x)
    for b, l in np.ndindex(ids.shape):
        k = e[b, l]
        want[b, l] = (silu(x[b, l] @ wg[k]) * (x[b, l] @ wu[k])) @ wd[k]
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x), jnp.asarray(ids))), want, rtol=1e-5, atol=1e-6)


# stem_gate reads its table through the same _TableFFN lookup as stem_additive, so one of the two covers the
# sharded table path; hash_moe has its own shard_map dispatch.
@pytest.mark.parametrize("ffn", ["stem_additive", "hash_moe"])
def test_variant_loss_and_grads_on_2x4_mesh_equal_single_device(ffn):
    cfg = tiny_config(ffn=ffn, n_layers=2, stem_layers="1", moe_experts=4)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
    results = []
    for shape in ((1, 1, 1), (2, 4, 1)):
        s = Setup(cfg, mesh_of(shape))
        params = s.init_state()["params"]
        fn = jax.jit(jax.value_and_grad(s.loss), in_shardings=(s.state_shardings["params"], s.batch_sharding))
        with jax.set_mesh(s.mesh):
            results.append(jax.device_get(fn(params, data.to_global(batch, s.batch_sharding))))
    (l1, g1), (l8, g8) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    flat8 = dict(jax.tree_util.tree_flatten_with_path(g8)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(g1)[0]:
        np.testing.assert_allclose(flat8[path], g, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    if ffn == "hash_moe":  # experts are sharded over 'data', their d_model side over 'fsdp'
        assert s.state_shardings["params"]["blocks"][1]["ffn"]["w_up"].get_value().spec[:2] == ("data", "fsdp")


def test_moe_width_matches_stem_total_params():
    m = tiny_config(ffn="hash_moe", moe_experts=4, d_ff=96, vocab_size=1000, d_model=32).model
    assert moe_width(m) == 8 * round((2 * 32 + 1000) * 96 / (3 * 32 * 4) / 8)
    assert moe_width(dataclasses.replace(m, moe_d_ff=40)) == 40


def test_variant_errors():
    with pytest.raises(ConfigError, match="did you mean 'hash_moe'"):
        validate(tiny_config(ffn="hash_mo"))
    with pytest.raises(ConfigError, match="moe_experts=0"):
        validate(tiny_config(ffn="hash_moe", moe_experts=0))
    with pytest.raises(ConfigError, match="selects no layer"):
        validate(tiny_config(ffn="stem_gate", stem_layers="none"))
    with pytest.raises(sharding.MeshError, match="moe_experts=3 is not divisible by the 2 expert shards"):
        Setup(tiny_config(ffn="hash_moe", moe_experts=3), mesh_of((2, 4, 1)))
