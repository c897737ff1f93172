"""The decoder: attention against numpy, causality, shapes, ties, and rematerialization."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import tiny_config
from stem_jax.layers import rope
from stem_jax.model import Attention, Transformer, cross_entropy


def _np_rope(x, theta):
    L, K = x.shape[1], x.shape[-1]
    inv = theta ** (-np.arange(0, K, 2) / K)
    ang = np.arange(L)[:, None] * inv[None]
    cos = np.cos(np.concatenate([ang, ang], -1))[None, :, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[None, :, None]
    x1, x2 = x[..., : K // 2], x[..., K // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def test_rope_matches_numpy_and_preserves_norm():
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 8)).astype(np.float32)
    got = np.asarray(rope(jnp.asarray(x), 10_000.0))
    np.testing.assert_allclose(got, _np_rope(x, 10_000.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_gqa_attention_matches_numpy():
    cfg = tiny_config(d_model=32, n_heads=4, n_kv_heads=2).model
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(2, 5, 32)).astype(np.float32)
    wq, wk, wv, wo = (np.asarray(p[...]) for p in (attn.wq, attn.wk, attn.wv, attn.wo))
    q = _np_rope(np.einsum("bld,dhk->blhk", x, wq), cfg.rope_theta)
    k = _np_rope(np.einsum("bld,dhk->blhk", x, wk), cfg.rope_theta)
    v = np.einsum("bld,dhk->blhk", x, wv)
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # query head h uses kv head h // 2
    s = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd,hdm->bqm", p, v, wo)
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x))), want, rtol=1e-4, atol=1e-5)


def test_transformer_is_causal_and_uses_stem_layers():
    cfg = tiny_config(n_layers=4, stem_layers="1,3").model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.stem_layers == (1, 3)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["DenseFFN", "StemFFN", "DenseFFN", "StemFFN"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)))
    logits = model(ids)
    assert logits.shape == (2, 10, cfg.vocab_size) and logits.dtype == jnp.float32
    changed = model(ids.at[:, 6].set((ids[:, 6] + 1) % cfg.vocab_size))
    np.testing.assert_allclose(changed[:, :6], logits[:, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(changed[:, 6:], logits[:, 6:])


def _projection_dtypes(fn, *args) -> list[str]:
    """Output dtypes of the traced program's matmuls shaped [B, L, ...] (projections, FFN and logits; the
    attention scores are [B, G, L, ...] and softmax-accumulated in fp32 by design)."""
    B, L = args[-1].shape
    return [dt for dt, shape in re.findall(r"(\w+)\[(\d+,\d+[\d,]*)\] = dot_general", str(jax.make_jaxpr(fn)(*args)))
            if shape.startswith(f"{B},{L},")]


def test_tied_embeddings_and_bf16_compute():
    cfg = tiny_config(tie_embeddings=True).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.head is None
    graphdef, params = nnx.split(model)
    bf16_graphdef, bf16_params = nnx.split(
        nnx.eval_shape(lambda: Transformer(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))))
    # Parameters stay fp32, so both forwards below run on the same arrays.
    layout = lambda tree: [(k, a.shape, a.dtype) for k, a in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert layout(bf16_params) == layout(params)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    ids_BxL = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    fwd = lambda g: lambda p, ids: nnx.merge(g, p)(ids)
    want_BxLxV = np.asarray(jax.jit(fwd(graphdef))(params, ids_BxL))
    got_BxLxV = jax.jit(fwd(bf16_graphdef))(params, ids_BxL)
    assert got_BxLxV.dtype == jnp.float32
    err = np.abs(np.asarray(got_BxLxV) - want_BxLxV).max()
    # Within 4 bf16 unit roundoffs (2^-8) of the largest logit, but not fp32's bits: the setting took effect.
    assert 0 < err <= 4 * 2.0 ** -8 * np.abs(want_BxLxV).max(), err
    # Every projection ran in bf16 (none in the fp32 program).
    bf16_dots = _projection_dtypes(fwd(bf16_graphdef), params, ids_BxL)
    fp32_dots = _projection_dtypes(fwd(graphdef), params, ids_BxL)
    n_stem = len(model.stem_layers)  # q k v o per layer, gate up down per dense FFN, gate down per STEM FFN
    assert len(bf16_dots) == len(fp32_dots) == 4 * cfg.n_layers + 3 * (cfg.n_layers - n_stem) + 2 * n_stem + 1
    assert set(bf16_dots) == {"bf16"} and set(fp32_dots) == {"f32"}


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 3))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1).mean()
    np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets))), want, rtol=1e-6)


def test_init_std_zero_uses_fan_in():
    cfg = tiny_config(init_std=0.0, d_model=64, n_heads=2, n_kv_heads=2, d_ff=256).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    down = np.asarray(model.blocks[0].ffn.w_down[...])
    gate = np.asarray(model.blocks[0].ffn.w_gate[...])
    # Truncation at +-3 sigma shrinks the std by ~1.3%.
    np.testing.assert_allclose(down.std(), 256 ** -0.5 * 0.987, rtol=0.05)
    np.testing.assert_allclose(gate.std(), 64 ** -0.5 * 0.987, rtol=0.05)
    assert np.abs(gate).max() <= 3 * 64 ** -0.5


def test_sharded_forward_equals_unsharded_for_full_and_single_row_batches():
    from conftest import mesh_of
    from stem_jax import sharding
    cfg = tiny_config().model
    model = Transformer(cfg, rngs=nnx.Rngs(0))  # no mesh: 1024 table rows, the same on the 2x4 mesh
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12)))
    want = np.asarray(model(ids))
    mesh = mesh_of((2, 4, 1))
    fwd = jax.jit(lambda p, i: nnx.merge(graphdef, p)(i))
    with jax.set_mesh(mesh):
        p = jax.device_put(params, sharding.tree_shardings(mesh, params))
        np.testing.assert_allclose(np.asarray(fwd(p, ids)), want, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(fwd(p, ids[:1])), want[:1], rtol=2e-5, atol=2e-5)


def test_remat_policies_checkpoint_every_block_and_keep_the_gradients():
    """Full recompute against none here; dots and offload against none through a whole train step in
    test_steps.py (with microbatches)."""
    from conftest import mesh_of
    from stem_jax import sharding
    cfg = tiny_config(n_layers=2, stem_layers="1").model
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 13)))
    mesh, grads = mesh_of((2, 2, 2)), {}
    for remat in ("none", "full", "dots", "offload"):
        graphdef, params = nnx.split(Transformer(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0)))
        loss = lambda p, b: cross_entropy(nnx.merge(graphdef, p)(b[:, :-1]), b[:, 1:])
        with jax.set_mesh(mesh):
            p = jax.device_put(params, sharding.tree_shardings(mesh, params))
            if remat in ("none", "full"):
                grads[remat] = jax.device_get(jax.jit(jax.grad(loss))(p, ids))
            jaxpr = str(jax.make_jaxpr(jax.grad(loss))(p, ids))
        # Only "offload" moves arrays to host memory: the block inputs (XLA:CPU then ignores the placement).
        assert ("<host>[" in jaxpr) == (remat == "offload"), remat
        assert jaxpr.count("remat2[") == (0 if remat == "none" else cfg.n_layers), remat  # one per block
    for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["none"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
