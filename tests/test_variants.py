"""STEM†, gate replacement and Hash-MoE against numpy; sharded equals unsharded (loss and gradients)."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from conftest import mesh_of, tiny_config
from stem_jax import data, sharding, steps
from stem_jax.config import ConfigError, stem_indices, validate
from stem_jax.model import Transformer
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
    want = (silu(x @ wg) * (x @ wu + table[sharding.stored_rows(ids, V)])) @ wd
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x), jnp.asarray(ids))), want, rtol=1e-5, atol=1e-6)


def test_stem_gate_matches_numpy():
    ffn = StemGateFFN(D, F, V, 0.02, rngs=nnx.Rngs(1))
    x, ids = _inputs(1)
    wu, wd, table = _np(ffn.w_up, ffn.w_down, ffn.table)
    want = (silu(table[sharding.stored_rows(ids, V)]) * (x @ wu)) @ wd
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
        ctx = steps.make_context(cfg, mesh_of(shape))
        params = steps.init_state(ctx)["params"]
        fn = jax.jit(jax.value_and_grad(functools.partial(steps.loss, ctx.graphdef)),
                     in_shardings=(ctx.state_shardings["params"], ctx.batch_sharding))
        with jax.set_mesh(ctx.mesh):
            results.append(jax.device_get(fn(params, data.to_global(batch, ctx.batch_sharding))))
    (l1, g1), (l8, g8) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    flat8 = dict(jax.tree_util.tree_flatten_with_path(g8)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(g1)[0]:
        np.testing.assert_allclose(flat8[path], g, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    if ffn == "hash_moe":  # experts are sharded over 'data', their d_model side over 'fsdp'
        assert ctx.state_shardings["params"]["blocks"][1]["ffn"]["w_up"].get_value().spec[:2] == ("data", "fsdp")


def _param_counts(m) -> tuple[int, dict]:
    """(total parameters, {layer: (parameters, shapes)} of each FFN in stem_indices) from the built model's
    abstract state; a table counts ``vocab_size`` rows, as its padding rows are never addressed."""
    state = nnx.state(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))), nnx.Param)

    def count(tree):
        shapes = {k: v.shape for k, v in nnx.to_flat_state(tree)}
        return sum(m.vocab_size * s[1] if k[-1] == "table" else math.prod(s) for k, s in shapes.items()), shapes
    ffn = {}
    for layer in stem_indices(m):
        n, shapes = count(state["blocks"][layer]["ffn"])
        ffn[layer] = n, {k[0]: s for k, s in shapes.items()}
    return count(state)[0], ffn


@pytest.mark.parametrize("stem", [tiny_config(d_ff=100, moe_experts=4, stem_layers="1").model,  # width 277.1 -> 280
                                  tiny.get_config().model], ids=["small", "tiny_preset"])
def test_hash_moe_layer_has_the_parameters_of_a_stem_layer(stem):
    # The default expert width matches each MoE layer's parameters (E experts of 3 d x width matrices) to a STEM
    # layer's (W_gate, W_down, a [vocab, d_ff] table), the width rounded to the nearest multiple of 8.
    moe = dataclasses.replace(stem, ffn="hash_moe")
    D, E = stem.d_model, stem.moe_experts
    (stem_total, stem_ffn), (moe_total, moe_ffn) = _param_counts(stem), _param_counts(moe)
    assert list(moe_ffn) == list(stem_ffn) == list(stem_indices(stem))
    for layer, (n_stem, stem_shapes) in stem_ffn.items():
        n_moe, moe_shapes = moe_ffn[layer]
        assert sorted(stem_shapes) == ["table", "w_down", "w_gate"]
        W = moe_shapes["w_up"][-1]
        assert moe_shapes == {"w_gate": (E, D, W), "w_up": (E, D, W), "w_down": (E, W, D)}
        assert W % 8 == 0 and abs(n_moe - n_stem) <= 3 * D * E * 4, (W, n_moe, n_stem)
    if stem == tiny.get_config().model:  # (2 * 128 + 8192) * 512 / (3 * 128 * 16) = 704 exactly
        assert W == 704 and n_moe == n_stem
        assert moe_total == stem_total and round(stem_total / 1e6, 2) == 11.83  # README's presets table
    # An explicit width is taken as given.
    assert _param_counts(dataclasses.replace(moe, moe_d_ff=40))[1][layer][1]["w_up"] == (E, D, 40)


def test_variant_errors():
    with pytest.raises(ConfigError, match="did you mean 'hash_moe'"):
        validate(tiny_config(ffn="hash_mo"))
    with pytest.raises(ConfigError, match="moe_experts=0"):
        validate(tiny_config(ffn="hash_moe", moe_experts=0))
    with pytest.raises(ConfigError, match="selects no layer"):
        validate(tiny_config(ffn="stem_gate", stem_layers="none"))
    with pytest.raises(sharding.MeshError, match="moe_experts=3 is not divisible by the 2 expert shards"):
        steps.make_context(tiny_config(ffn="hash_moe", moe_experts=3), mesh_of((2, 4, 1)))
