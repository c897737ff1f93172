"""STEM math against numpy, the placement rule, and the sharded lookup (forward and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import mesh_of, tiny_config
from stem_jax import sharding
from stem_jax.layers import DenseFFN
from stem_jax.config import stem_layer_indices
from stem_jax.stem import StemFFN, init_table, lookup


def silu(x):
    return x / (1.0 + np.exp(-x))


def test_stem_ffn_matches_numpy():
    D, F, V = 16, 24, 50
    ffn = StemFFN(D, F, V, 0.02, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, D)).astype(np.float32)
    ids = rng.integers(0, V, size=(2, 5))
    got = np.asarray(ffn(jnp.asarray(x), jnp.asarray(ids)))
    wg, wd, table = (np.asarray(p[...]) for p in (ffn.w_gate, ffn.w_down, ffn.table))
    want = (silu(x @ wg) * table[sharding.stored_rows(ids, V)]) @ wd  # the default "spread" row layout
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The output must depend on the looked-up row: a different token changes it.
    ids2 = ids.copy()
    ids2[0, 0] = (ids[0, 0] + 1) % V
    assert not np.allclose(np.asarray(ffn(jnp.asarray(x), jnp.asarray(ids2)))[0, 0], got[0, 0])


def test_dense_ffn_matches_numpy():
    D, F = 16, 24
    ffn = DenseFFN(D, F, 0.02, rngs=nnx.Rngs(1))
    x = np.random.default_rng(1).normal(size=(2, 5, D)).astype(np.float32)
    wg, wu, wd = (np.asarray(p[...]) for p in (ffn.w_gate, ffn.w_up, ffn.w_down))
    want = (silu(x @ wg) * (x @ wu)) @ wd
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "spread"])
def test_table_init_is_xavier_normal_padding_is_zero_and_the_same_on_any_mesh(layout):
    """Rows are drawn in stored order (row r from ``fold_in(key, r)``) on their owners: the table drawn on 4
    vocab shards x 2 column shards equals the one drawn on one device; token rows are Xavier normal, padding
    rows (tokens >= V, wherever the layout stores them) are zero."""
    V, F = 1000, 512
    table = np.asarray(init_table(jax.random.key(0), V, F, 1152, layout))
    assert table.shape == (1152, F)
    by_token = table[sharding.stored_rows(np.arange(1152), V, layout)]
    np.testing.assert_allclose(by_token[:V].std(), np.sqrt(2.0 / (V + F)), rtol=0.02)
    assert np.all(by_token[V:] == 0) and np.all(by_token[:V].std(axis=1) > 0)
    mesh = mesh_of((2, 2, 2))
    with jax.set_mesh(mesh):
        out = sharding.named(mesh, ("stem_vocab", "stem_dff"))
        sharded = jax.jit(lambda k: init_table(k, V, F, 1152, layout), out_shardings=out)(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(sharded), table)


def test_spread_layout_puts_consecutive_ids_on_different_shards():
    m = tiny_config(vocab_size=1000).model
    rows = sharding.stored_rows(np.arange(1152), 1000)
    assert sorted(rows) == list(range(1152))  # a permutation; rows past 1024 (mesh padding) stay put
    np.testing.assert_array_equal(rows[1024:], np.arange(1024, 1152))
    for n in (2, 8, 64, 128):  # equal shards of the 1024 rows: ids t and t + 1 differ, t mod n decides
        shard = rows[:1024] // (1024 // n)
        assert len(set(shard[:n])) == n and np.all(shard[:1024 - n] == shard[n:])
    np.testing.assert_array_equal(sharding.table_by_token(sharding.table_to_stored(np.eye(1152), m), m),
                                  np.eye(1152))
    np.testing.assert_array_equal(np.asarray(sharding.stored_rows(jnp.arange(1152), 1000)), rows)  # jax = numpy


@pytest.mark.parametrize("spec,n,want", [
    ("1/3", 16, (1, 4, 7, 10, 13)),
    ("1/2", 16, (1, 3, 5, 7, 9, 11, 13, 15)),
    ("full", 4, (1, 2, 3)),
    ("1/3", 6, (1, 4)),
    ("7, 2", 8, (2, 7)),
    ((0, 5), 8, (0, 5)),
])
def test_placement(spec, n, want):
    assert stem_layer_indices(spec, n) == want


def test_placement_matches_paper_counts_at_350m():
    assert [len(stem_layer_indices(s, 32)) for s in ("1/3", "1/2", "full")] == [10, 16, 31]


@pytest.mark.parametrize("spec,n,msg", [
    ("1/4", 8, "unknown stem_layers"),
    ("3,9", 8, "out of range"),
    ("-1", 8, "out of range"),
    ("2,2", 8, "duplicates"),
    ("1/3", 2, "selects no layer"),
])
def test_placement_errors(spec, n, msg):
    with pytest.raises(ValueError, match=msg):
        stem_layer_indices(spec, n)


def test_wrong_table_width_is_rejected():
    ffn = StemFFN(8, 16, 20, 0.02, rngs=nnx.Rngs(0))
    ffn.table = nnx.Param(jnp.zeros((128, 12)), logical_axes=("stem_vocab", "stem_dff"))
    with pytest.raises(ValueError, match="d_ff=16"):
        ffn(jnp.zeros((1, 2, 8)), jnp.zeros((1, 2), jnp.int32))


# Sharded lookup vs numpy: V=1000 needs padding (1024 rows); meshes of 1, 8, 2x4, 4x2 devices and
# one with d_ff over the tensor axis; ids of a full batch and of a single (unshardable) row.
V, F = 1000, 32


def _reference(table, ids, w):
    rows = table[ids]
    grad = np.zeros_like(table)
    np.add.at(grad, ids.reshape(-1), w.reshape(-1, F))
    return rows, grad


@pytest.mark.parametrize("mode", ["shard_map", "xla"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 1, 1), (2, 4, 1), (4, 2, 1), (2, 2, 2)])
def test_sharded_lookup_forward_and_grad_match_unsharded(shape, mode):
    mesh = mesh_of(shape)
    rows_padded = sharding.padded_rows(V, mesh=mesh)
    assert rows_padded == 1024
    rng = np.random.default_rng(0)
    table = rng.normal(size=(rows_padded, F)).astype(np.float32)
    table[V:] = 0
    for batch in (8, 1):
        ids = rng.integers(0, V, size=(batch, 6)).astype(np.int32)
        ids[0, :3] = [0, V - 1, 511]  # first / last real row, a shard boundary
        w = rng.normal(size=(batch, 6, F)).astype(np.float32)
        want_rows, want_grad = _reference(table, ids, w)
        with jax.set_mesh(mesh):
            t = jax.device_put(table, sharding.named(mesh, ("stem_vocab", "stem_dff")))
            i = jax.device_put(ids, sharding.named(mesh, ("batch", "length")) if batch % 4 == 0 else
                               jax.sharding.NamedSharding(mesh, jax.P()))
            f = jax.jit(lambda t, i: lookup(t, i, mode))
            got_rows = f(t, i)
            loss = lambda t, i: jnp.sum(lookup(t, i, mode) * w)
            got_grad = jax.jit(jax.grad(loss))(t, i)
        np.testing.assert_array_equal(np.asarray(got_rows), want_rows)
        np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-6, atol=1e-6)
        assert got_grad.sharding.is_equivalent_to(t.sharding, 2)  # the gradient stays vocab-sharded
