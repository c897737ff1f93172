"""The decoder: attention against numpy, causality, shapes, ties, rematerialization, and packed documents."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from stem_jax.layers import rope
from stem_jax.model import Attention, Transformer, chunk_size, chunked_metrics, cross_entropy, doc_segments


EOS = 3  # the packed documents' end token in these tests


def _np_rope(x, theta, positions_BxL=None):
    L, K = x.shape[1], x.shape[-1]
    inv = theta ** (-np.arange(0, K, 2) / K)
    pos_BxL = np.arange(L)[None] if positions_BxL is None else positions_BxL
    ang = pos_BxL[..., None] * inv
    cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    x1, x2 = x[..., : K // 2], x[..., K // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def test_rope_matches_numpy_and_preserves_norm():
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 8)).astype(np.float32)
    got = np.asarray(rope(jnp.asarray(x), 10_000.0))
    np.testing.assert_allclose(got, _np_rope(x, 10_000.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_gqa_attention_matches_numpy_plain_and_with_segments_and_positions():
    """Packed rows: RoPE at the given positions (arbitrary ones here: within a segment RoPE only sees their
    differences, which restarting them at a segment's start does not change), keys of the query's segment."""
    cfg = tiny_config(d_model=32, n_heads=4, n_kv_heads=2).model
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(2, 5, 32)).astype(np.float32)
    wq, wk, wv, wo = (np.asarray(p[...]) for p in (attn.wq, attn.wk, attn.wv, attn.wo))

    def want(segments_BxL=np.zeros((2, 5), int), positions_BxL=None):
        q = _np_rope(np.einsum("bld,dhk->blhk", x, wq), cfg.rope_theta, positions_BxL)
        k = _np_rope(np.einsum("bld,dhk->blhk", x, wk), cfg.rope_theta, positions_BxL)
        v = np.einsum("bld,dhk->blhk", x, wv)
        k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # query head h uses kv head h // 2
        s = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
        same_Bx1xLxL = (segments_BxL[:, :, None] == segments_BxL[:, None, :])[:, None]
        s = np.where(np.tril(np.ones((5, 5), bool)) & same_Bx1xLxL, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.einsum("bhqk,bkhd,hdm->bqm", p, v, wo)

    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x))), want(), rtol=1e-4, atol=1e-5)
    segments, positions = np.asarray([[0, 0, 0, 1, 1], [1, 1, 2, 2, 2]]), np.asarray([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    packed = jax.jit(lambda x, s, p: attn(x, segments_BxL=s, positions_BxL=p))  # one compile, not one per op
    got = packed(jnp.asarray(x), jnp.asarray(segments), jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(got), want(segments, positions), rtol=1e-4, atol=1e-5)


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
    """Output dtypes of the traced program's matmuls shaped [B, L, ...] or [B * L, ...] (projections over the
    flattened tokens, FFN and logits; the attention scores are [B, G, L, ...] and softmax-accumulated in fp32 by
    design)."""
    B, L = args[-1].shape
    return [dt for dt, shape in re.findall(r"(\w+)\[(\d+,\d+[\d,]*)\] = dot_general", str(jax.make_jaxpr(fn)(*args)))
            if shape.startswith((f"{B},{L},", f"{B * L},"))]


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


def test_chunk_size_is_the_largest_divisor_not_above_the_chunk():
    assert [chunk_size(12, c) for c in (0, 1, 4, 5, 12, 99)] == [12, 1, 4, 4, 12, 12]
    assert chunk_size(4096, 1024) == 1024 and chunk_size(7, 3) == 1


@pytest.mark.parametrize("chunk", [0, 4, 5])
def test_chunked_loss_and_accuracy_match_numpy_and_the_whole_loss_gradient(chunk):
    """Loss and top-1 accuracy over chunks of the sequence (5 -> chunks of 4 of L=12) equal numpy's over the
    whole [B, L, V] logits; so do the gradients, with the logits recomputed chunk by chunk in the backward."""
    rng = np.random.default_rng(1)
    B, L, D, V = 3, 12, 8, 11
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    t = rng.integers(0, V, (B, L))
    t[0, :5] = np.argmax(x[0, :5] @ w, -1)  # some hits, so the accuracy is not trivially 0
    logits = x @ w
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want_loss = -np.take_along_axis(logp, t[..., None], -1).mean()
    want_acc = (logits.argmax(-1) == t).mean()
    got = chunked_metrics(lambda xc: xc @ jnp.asarray(w), jnp.asarray(x), jnp.asarray(t), chunk)
    np.testing.assert_allclose(float(got["loss"]), want_loss, rtol=1e-6)
    assert float(got["acc"]) == pytest.approx(want_acc) and want_acc > 0

    def grads(fn):
        return jax.grad(lambda x_, w_: fn(x_, w_), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    want_g = grads(lambda x_, w_: cross_entropy(x_ @ w_, jnp.asarray(t)))
    got_g = grads(lambda x_, w_: chunked_metrics(lambda xc: xc @ w_, x_, jnp.asarray(t), chunk, recompute=True,
                                                 acc=False)["loss"])
    for g, wg in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(wg), rtol=1e-5, atol=1e-7)
    if chunk:  # the backward keeps no stack of the chunks' logits: [L / 4 chunks, B, 4, V]
        loss = lambda x_, w_: chunked_metrics(lambda xc: xc @ w_, x_, jnp.asarray(t), chunk, recompute=True,
                                              acc=False)["loss"]
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.asarray(x), jnp.asarray(w)).compile().as_text()
        assert f"f32[{L // 4},{B},4,{V}]" not in hlo and f"f32[{B},4,{V}]" in hlo


@pytest.mark.parametrize("tie", [True, False])
def test_head_and_loss_backward_copy_no_token_by_vocab_array(tie):
    """The LM head is one 2-D matmul over the flattened tokens, like ``layers.project``: with an einsum,
    XLA:CPU transposed the [B, L, V] logits gradient before the head's weight gradient (docs/performance.md)."""
    cfg = tiny_config(tie_embeddings=tie, n_layers=1, ffn="dense").model
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.zeros((4, 17), jnp.int32)
    loss = lambda p: cross_entropy(nnx.merge(graphdef, p)(ids[:, :-1]), ids[:, 1:])
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    V = cfg.vocab_size
    assert f"f32[4,16,{V}]" in hlo or f"f32[64,{V}]" in hlo  # the pattern below can see the logits
    assert not re.findall(rf"= f32\[(?:4,16,{V}|64,{V}|{V},4,16|{V},64)\]\{{[\d,]+\}} (?:transpose|copy)\(", hlo)


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


def test_doc_segments_start_a_segment_at_each_eos():
    ids = jnp.asarray([[5, 6, EOS, 7, 8, 9, EOS, 1],
                       [EOS, 1, 2, EOS, EOS, 4, 5, 6]])
    segments, positions = doc_segments(ids, EOS)
    np.testing.assert_array_equal(segments, [[0, 0, 1, 1, 1, 1, 2, 2], [1, 1, 1, 2, 3, 3, 3, 3]])
    np.testing.assert_array_equal(positions, [[0, 1, 0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 1, 2, 3]])
    assert segments.dtype == positions.dtype == jnp.int32


def _summed_loss_fn(graphdef, packed: bool):
    """jitted ``(params, ids, targets, weights) -> ((sum of weighted token losses, logits), grads)``."""
    def f(p, ids_BxL, targets_BxL, w_BxL):
        segments, positions = doc_segments(ids_BxL, EOS) if packed else (None, None)
        logits_BxLxV = nnx.merge(graphdef, p)(ids_BxL, segments_BxL=segments, positions_BxL=positions)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        ce_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        return jnp.sum(ce_BxL * w_BxL), logits_BxLxV
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def test_packed_documents_equal_each_document_run_alone():
    """Rows packed from documents that each end in EOS: at every document's tokens the logits, and the loss
    and its gradients summed over the rows, equal those of each segment (EOS first, from the second on) run
    alone as its own sequence without packing. The packed rows run sharded (a row per batch shard, heads
    and table columns split) under remat="full", the segments passing through the checkpointed blocks.
    (Restarting the positions changes nothing here but rounding: RoPE sees only position differences.)"""
    from conftest import mesh_of
    from stem_jax import sharding
    cfg = tiny_config(n_layers=1, stem_layers="0").model  # one layer, a STEM one
    L, rng = 12, np.random.default_rng(0)
    rows_BxL1 = rng.integers(EOS + 1, cfg.vocab_size, (2, L + 1))
    rows_BxL1[0, [3, 6]] = EOS  # segments of 3, 3 and 6 tokens
    rows_BxL1[1, [0, 5, 6]] = EOS  # 5, 1 (a lone EOS) and 6; no segment 0 (the row starts with an EOS)
    alone, weights = [], []  # each segment at the start of its own row, filler after it
    for row in rows_BxL1:
        starts = [0, *np.flatnonzero(row[:L] == EOS)]
        for a, b in zip(starts, starts[1:] + [L]):
            if a < b:  # not the empty segment 0 of a row that starts with an EOS
                ids = rng.integers(EOS + 1, cfg.vocab_size, L + 1)
                ids[:b - a + 1] = row[a:b + 1]
                alone.append(ids)
                weights.append(np.arange(L) < b - a)
    alone, weights = np.stack(alone), np.stack(weights)
    assert len(alone) == 6 and weights.sum() == 2 * L
    model = Transformer(dataclasses.replace(cfg, remat="full"), rngs=nnx.Rngs(0))
    assert model.stem_layers == (0,)
    graphdef, params = nnx.split(model)
    plain_graphdef = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[0]  # no remat
    (alone_loss, alone_logits), alone_grads = _summed_loss_fn(plain_graphdef, False)(
        params, jnp.asarray(alone[:, :-1]), jnp.asarray(alone[:, 1:]), jnp.asarray(weights, jnp.float32))
    mesh = mesh_of((2, 1, 2))
    with jax.set_mesh(mesh):
        p = jax.device_put(params, sharding.tree_shardings(mesh, params))
        (packed_loss, packed_logits), packed_grads = _summed_loss_fn(graphdef, True)(
            p, jnp.asarray(rows_BxL1[:, :-1]), jnp.asarray(rows_BxL1[:, 1:]), jnp.ones((2, L)))
    got = np.asarray(packed_logits).reshape(2 * L, -1)  # the segments in stream order fill the rows
    np.testing.assert_allclose(got, np.asarray(alone_logits)[weights], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_loss, alone_loss, rtol=1e-5)
    flat = lambda g: jax.tree_util.tree_flatten_with_path(g)[0]
    for (path, a), (_, b) in zip(flat(packed_grads), flat(alone_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
