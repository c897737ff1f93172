"""Llama-style decoder whose FFN is dense SwiGLU or STEM per layer (Flax NNX)."""
from __future__ import annotations

from typing import Callable

import chex
import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from stem_jax import attention, scanning, sharding
from stem_jax.config import DTYPES, ModelConfig, moe_width, stem_indices
from stem_jax.layers import DenseFFN, RMSNorm, matrix_std, param, project, rope
from stem_jax.stem import LayerRows, RowEdit, RowLookup, StemFFN, StemRows, TableFFN, lookup_layers
from stem_jax.variants import HashMoEFFN, StemAdditiveFFN, StemGateFFN

TABLE_FFNS = {"stem": StemFFN, "stem_additive": StemAdditiveFFN, "stem_gate": StemGateFFN}
_cp = jax.checkpoint_policies
# model.remat -> what a block's checkpoint keeps for the backward pass ("none" runs no checkpoint). "dots"
# keeps the projections' outputs (no batch dims), not attention's batched score matmuls.
REMAT_POLICIES = {
    "full": _cp.nothing_saveable,
    "dots": _cp.dots_with_no_batch_dims_saveable,
    "offload": _cp.save_and_offload_only_these_names(names_which_can_be_saved=[],
                                                     names_which_can_be_offloaded=["block_input"],
                                                     offload_src="device", offload_dst="pinned_host"),
}
# What a scanned repeat keeps for the backward under model.remat="none": the matmul outputs, recomputing the
# rest (norms, activations, the attention kernel's forward). A scan stores every value its backward reads as
# a stacked loop output, where the unrolled program recomputes elementwise ones in its fusions. stem_1b on
# v5p-64 (2 microbatches): unrolled 79.2 GiB per chip; scanned, saving everything: out of memory (104.7 GB of
# temporaries); saving the matmuls and the attention kernel's outputs: 97.4 GiB; this policy: 79.3 GiB.
SCANNED_NO_REMAT = _cp.dots_saveable


class Attention(nnx.Module):
    """Causal grouped-query attention with rotary embeddings."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, platform: str | None = None):
        D, H, KV = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        K = D // H
        std = matrix_std(cfg.init_std, D)
        self.wq = param(rngs, (D, H, K), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (D, KV, K), ("embed", "kv_heads", "head_dim"), std)
        self.wv = param(rngs, (D, KV, K), ("embed", "kv_heads", "head_dim"), std)
        self.wo = param(rngs, (H, K, D), ("heads", "head_dim", "embed"), std)
        self.theta, self.dtype = cfg.rope_theta, DTYPES[cfg.dtype]
        # Resolved when called: a model built only for its parameters (init, counting) never needs the kernel.
        self.kernel, self.platform = cfg.attention, platform

    def __call__(self, x_BxLxD: jax.Array, cache: "KVCache | None" = None, layer: int = 0,
                 segments_BxL: jax.Array | None = None, positions_BxL: jax.Array | None = None):
        """Causal self-attention over ``x``; with ``segments_BxL``, within each segment, and RoPE at
        ``positions_BxL`` (default 0..L-1; see ``doc_segments``). With ``cache``, over the cached keys too: the
        new keys/values are written at slot ``cache.start`` and ``(out, k_BxSxGxK, v_BxSxGxK)`` is returned."""
        heads = ("batch", "length", "act_heads", None)
        pos = positions_BxL if cache is None else cache.positions_BxT
        q_BxLxHxK = rope(project(x_BxLxD, self.wq, "bld,dhk->blhk", self.dtype, heads), self.theta, pos)
        k_BxLxGxK = rope(project(x_BxLxD, self.wk, "bld,dhk->blhk", self.dtype, heads), self.theta, pos)
        v_BxLxGxK = project(x_BxLxD, self.wv, "bld,dhk->blhk", self.dtype, heads)
        if cache is None:
            impl = attention.resolve(self.kernel, self.platform or jax.default_backend(), x_BxLxD.shape[1],
                                     jnp.dtype(self.dtype).name)
            out_BxLxHxK = attention.causal(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, impl, segments_BxL)
            return project(out_BxLxHxK, self.wo, "blhk,hkd->bld", self.dtype, ("batch", "length", "act_embed"))
        at = (0, cache.start, 0, 0)
        k_BxSxGxK = jax.lax.dynamic_update_slice(cache.k[layer], k_BxLxGxK.astype(cache.k[layer].dtype), at)
        v_BxSxGxK = jax.lax.dynamic_update_slice(cache.v[layer], v_BxLxGxK.astype(cache.v[layer].dtype), at)
        out_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK.astype(self.dtype),
                                                   v_BxSxGxK.astype(self.dtype), mask=cache.mask_Bx1xTxS())
        out = project(out_BxLxHxK, self.wo, "blhk,hkd->bld", self.dtype, ("batch", "length", "act_embed"))
        return out, k_BxSxGxK, v_BxSxGxK


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``S`` slots, for decoding.

    Prompts are left-padded to a common length, so every row writes the same slots: ``start`` is the slot of
    the first token of the current call, ``positions_BxT`` the tokens' RoPE positions (slot minus the row's
    padding), and ``valid_BxS`` marks the slots that hold real tokens (padding is never attended to)."""
    k: tuple          # per layer [B, S, G, K]
    v: tuple
    valid_BxS: jax.Array
    start: jax.Array  # int32 scalar
    positions_BxT: jax.Array

    def mask_Bx1xTxS(self) -> jax.Array:
        T, S = self.positions_BxT.shape[1], self.valid_BxS.shape[1]
        slot_T = self.start + jnp.arange(T)
        causal_TxS = jnp.arange(S)[None, :] <= slot_T[:, None]
        return (causal_TxS[None] & self.valid_BxS[:, None, :])[:, None]


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x), ids)."""

    def __init__(self, cfg: ModelConfig, table_index: int | None, *, rngs: nnx.Rngs, platform: str | None = None):
        """``table_index``: this layer's position among the layers whose FFN is ``cfg.ffn`` (STEM or a variant),
        or None for SwiGLU; ``platform``: the devices' platform, for ``model.attention=auto``."""
        dtype = DTYPES[cfg.dtype]
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs, platform=platform)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if table_index is not None and cfg.ffn == "hash_moe":
            self.ffn = HashMoEFFN(cfg.d_model, moe_width(cfg), cfg.moe_experts, cfg.init_std, rngs=rngs,
                                  dtype=dtype)
        elif table_index is not None:
            self.ffn = TABLE_FFNS[cfg.ffn](cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.init_std, rngs=rngs,
                                           table_index=table_index, dtype=dtype, rows_of=RowLookup.of(cfg))
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.init_std, rngs=rngs, dtype=dtype)

    def __call__(self, x_BxLxD: jax.Array, ids_BxL: jax.Array, rows: StemRows | None = None,
                 edit: RowEdit | None = None, segments_BxL: jax.Array | None = None,
                 positions_BxL: jax.Array | None = None) -> jax.Array:
        x_BxLxD = checkpoint_name(x_BxLxD, "block_input")  # what remat="offload" moves to host memory
        # Named scopes only label the HLO ops (their op_name), for profiles (benchmarks/step_profile.py).
        with jax.named_scope("attention"):
            x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), segments_BxL=segments_BxL,
                                          positions_BxL=positions_BxL)
        with jax.named_scope("ffn"):
            return x_BxLxD + self.ffn(self.ffn_norm(x_BxLxD), ids_BxL, rows, edit)

    def decode(self, x_BxTxD: jax.Array, ids_BxT: jax.Array, cache: KVCache, layer: int,
               rows: StemRows | None = None, edit: RowEdit | None = None):
        attn, k, v = self.attn(self.attn_norm(x_BxTxD), cache, layer)
        x_BxTxD = x_BxTxD + attn
        return x_BxTxD + self.ffn(self.ffn_norm(x_BxTxD), ids_BxT, rows, edit), k, v


def _checkpointed(block: Block, policy, x_BxLxD: jax.Array, ids_BxL: jax.Array, rows: StemRows | None,
                  edit: RowEdit | None, segments_BxL: jax.Array | None, positions_BxL: jax.Array | None) -> jax.Array:
    """``block(x, ...)`` under ``jax.checkpoint(policy)``, as a pure function of the block's arrays. Variables
    that hold no array (the abstract tables of the sparse steps' rows-only model) stay outside the checkpoint."""
    graphdef, arrays, rest = nnx.split(block, lambda _, v: isinstance(v.get_value(), jax.Array), ...)
    run = jax.checkpoint(lambda a, *args: nnx.merge(graphdef, a, rest)(*args), policy=policy)
    return run(arrays, x_BxLxD, ids_BxL, rows, edit, segments_BxL, positions_BxL)


class Transformer(nnx.Module):
    """``ids [B, L] -> logits [B, L, V]`` (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, platform: str | None = None):
        """``platform``: of the devices the model runs on ('cpu', 'gpu', 'tpu'; default: JAX's default
        backend); it decides ``model.attention=auto``."""
        self.cfg = cfg
        self.stem_layers = stem_indices(cfg)
        D, V = cfg.d_model, cfg.vocab_size
        self.embed = param(rngs, (V, D), ("vocab", "embed"), D ** -0.5)
        table_index = {layer: k for k, layer in enumerate(self.stem_layers)}
        # Built layer by layer in both layouts, so a scanned model starts from the per-layer model's weights.
        blocks = [Block(cfg, table_index.get(i), rngs=rngs, platform=platform) for i in range(cfg.n_layers)]
        self.plan = scanning.plan(cfg) if scanning.scanned(cfg) else None
        if self.plan is None:
            self.blocks = nnx.List(blocks)
        else:
            pl = self.plan
            self.pre_blocks, self.post_blocks = nnx.List(blocks[:pl.pre]), nnx.List(blocks[pl.end:])
            stacked = []
            for p in range(pl.period):
                block = scanning.stack_modules([blocks[pl.layer(p, j)] for j in range(pl.n_blocks)])
                if isinstance(block.ffn, TableFFN):  # its entry among the table layers of one repeat
                    block.ffn.table_index = sum(pl.layer(q, 0) in table_index for q in range(p))
                stacked.append(block)
            self.scan_blocks = nnx.List(stacked)
        self.final_norm = RMSNorm(D, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else param(rngs, (D, V), ("embed", "vocab"), D ** -0.5)

    def stored_rows(self, ids):
        """The rows of this model's stored STEM tables that hold tokens ``ids`` (``sharding.stored_rows``)."""
        return sharding.stored_rows(ids, self.cfg.vocab_size, self.cfg.stem_row_layout)

    def __call__(self, ids_BxL: jax.Array, rows: StemRows | None = None, edit: RowEdit | None = None,
                 segments_BxL: jax.Array | None = None, positions_BxL: jax.Array | None = None) -> jax.Array:
        """``rows``: pre-gathered STEM rows, read instead of the tables; ``edit``: a STEM row override
        (``stem.StemRows``, ``stem.RowEdit``). Packed documents: ``segments_BxL`` keeps attention within each
        segment and ``positions_BxL`` gives the RoPE positions (``doc_segments`` makes both)."""
        return self.logits(self.hidden(ids_BxL, rows, edit, segments_BxL, positions_BxL))

    def hidden(self, ids_BxL: jax.Array, rows: StemRows | None = None, edit: RowEdit | None = None,
               segments_BxL: jax.Array | None = None, positions_BxL: jax.Array | None = None) -> jax.Array:
        """The last block's output [B, L, D] (before the final norm): ``logits`` of any slice of its positions
        equals that slice of ``model(ids)``, which is how the loss avoids holding every position's logits."""
        x_BxLxD = self._embed(ids_BxL)
        packing = (segments_BxL, positions_BxL)
        rows = self._layer_rows(ids_BxL) if rows is None and edit is None else rows
        if self.plan is not None:
            return self._scanned(x_BxLxD, ids_BxL, rows, edit, packing)
        for block in self.blocks:
            x_BxLxD = self._apply(block, x_BxLxD, ids_BxL, rows, edit, packing)
        return x_BxLxD

    def _apply(self, block: Block, x_BxLxD, ids_BxL, rows, edit, packing) -> jax.Array:
        if self.cfg.remat == "none":
            return block(x_BxLxD, ids_BxL, rows, edit, *packing)
        return _checkpointed(block, REMAT_POLICIES[self.cfg.remat], x_BxLxD, ids_BxL, rows, edit, *packing)

    def _scanned(self, x_BxLxD, ids_BxL, rows: LayerRows | None, edit, packing) -> jax.Array:
        """The scanned layout's forward: ``pre_blocks``, one ``lax.scan`` over the repeats of ``scan_blocks``
        (each layer checkpointed as in the per-layer model), ``post_blocks``. ``rows`` (``_layer_rows``) holds
        the pre blocks' rows, each scanned table's stacked [n_blocks, B, L, F] rows, then the post blocks'."""
        if edit is not None or isinstance(rows, StemRows):
            raise ValueError("row edits and pre-gathered rows need the per-layer layout (model.scan_layers=false; "
                             "workdir.restore converts a scanned run)")
        is_table = lambda b: isinstance(b.ffn, TableFFN)  # noqa: E731
        n_pre, n_scan = sum(map(is_table, self.pre_blocks)), sum(map(is_table, self.scan_blocks))
        per_repeat, pre_rows, post_rows = None, None, None
        if rows is not None:
            per_repeat = rows.per_layer[n_pre:n_pre + n_scan]
            pre_rows = LayerRows(rows.per_layer[:n_pre])
            # The post blocks' table_index counts every table layer before them.
            before = n_pre + n_scan * self.plan.n_blocks
            post_rows = LayerRows((None,) * before + rows.per_layer[n_pre + n_scan:])
        for block in self.pre_blocks:
            x_BxLxD = self._apply(block, x_BxLxD, ids_BxL, pre_rows, None, packing)
        splits = [nnx.split(b, lambda _, v: isinstance(v.get_value(), jax.Array), ...) for b in self.scan_blocks]

        def body(x_BxLxD, xs):
            arrays, rows_repeat = xs
            layer_rows = None if rows_repeat is None else LayerRows(rows_repeat)
            for (graphdef, _, rest), a in zip(splits, arrays):
                x_BxLxD = self._apply(nnx.merge(graphdef, a, rest), x_BxLxD, ids_BxL, layer_rows, None, packing)
            return x_BxLxD, None

        if self.cfg.remat == "none":
            body = jax.checkpoint(body, policy=SCANNED_NO_REMAT, prevent_cse=False)
        x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, (tuple(a for _, a, _ in splits), per_repeat))
        for block in self.post_blocks:
            x_BxLxD = self._apply(block, x_BxLxD, ids_BxL, post_rows, None, packing)
        return x_BxLxD

    def decode(self, ids_BxT: jax.Array, cache: KVCache, rows: StemRows | None = None,
               edit: RowEdit | None = None, last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Logits of ``T`` new tokens given the cached ones (prefill: T = prompt length; decode: T = 1), and
        the cache with their keys/values written at ``cache.start``. ``last_only``: the last position's logits
        only ([B, 1, V]: all a prefill needs)."""
        if self.plan is not None:
            raise ValueError("decoding needs the per-layer layout (model.scan_layers=false; workdir.restore "
                             "converts a scanned run)")
        x_BxTxD = self._embed(ids_BxT)
        rows = self._layer_rows(ids_BxT) if rows is None and edit is None else rows
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x_BxTxD, k, v = block.decode(x_BxTxD, ids_BxT, cache, i, rows, edit)
            ks.append(k)
            vs.append(v)
        return self.logits(x_BxTxD[:, -1:] if last_only else x_BxTxD), cache.replace(k=tuple(ks), v=tuple(vs))

    def _layer_rows(self, ids_BxL: jax.Array) -> LayerRows | None:
        """Every table layer's rows in one exchange, before the blocks and outside any remat (``lookup_layers``;
        None where each layer looks up its own)."""
        with jax.named_scope("stem_lookup"):
            blocks = self.blocks if self.plan is None else [*self.pre_blocks, *self.scan_blocks, *self.post_blocks]
            return lookup_layers([b.ffn for b in blocks if isinstance(b.ffn, TableFFN)], ids_BxL)

    def init_cache(self, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        K = self.cfg.d_model // self.cfg.n_heads
        zeros = lambda: tuple(jnp.zeros((batch, slots, self.cfg.n_kv_heads, K), dtype)
                              for _ in range(self.cfg.n_layers))
        return KVCache(zeros(), zeros(), jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32),
                       jnp.zeros((batch, 1), jnp.int32))

    def _embed(self, ids_BxL: jax.Array) -> jax.Array:
        chex.assert_rank(ids_BxL, 2)
        chex.assert_type(ids_BxL, int)
        dtype = DTYPES[self.cfg.dtype]
        ids_BxL = sharding.constrain(ids_BxL, ("batch", "length"))
        with jax.named_scope("embed"):
            x_BxLxD = jnp.take(self.embed[...], ids_BxL, axis=0).astype(dtype)
        return sharding.constrain(x_BxLxD, ("batch", "length", "act_embed"))

    def logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """Final norm and LM head: [B, L, D] hidden states -> [B, L, V] float32 logits."""
        dtype = DTYPES[self.cfg.dtype]
        with jax.named_scope("lm_head"):
            x_BxLxD = self.final_norm(x_BxLxD)
            out_axes = ("batch", "length", "act_vocab")
            if self.head is None:  # tied: contract with the embedding's trailing dim, over the flattened tokens
                B, L, D = x_BxLxD.shape
                logits = jax.lax.dot_general(x_BxLxD.reshape(B * L, D), self.embed[...].astype(dtype),
                                             (((1,), (1,)), ((), ())))
                logits = sharding.constrain(logits.reshape(B, L, -1), out_axes)
            else:
                logits = project(x_BxLxD, self.head, "bld,dv->blv", dtype, out_axes)
        return sharding.constrain(logits.astype(jnp.float32), out_axes)


def doc_segments(ids_BxL: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """``(segments_BxL, positions_BxL)`` of rows cut from a stream where every document ends in ``eos_id``.

    An EOS *starts* a segment: it is the BOS of the next document (its target is that document's first
    token). So ``segments = cumsum(ids == eos_id)`` (inclusive; tokens before the row's first EOS are segment
    0) and ``positions`` count from 0 at each EOS (at the row's start for segment 0)."""
    L = ids_BxL.shape[1]
    is_eos_BxL = ids_BxL == eos_id
    segments_BxL = jnp.cumsum(is_eos_BxL, axis=1, dtype=jnp.int32)
    at_L = jnp.arange(L, dtype=jnp.int32)
    start_BxL = jax.lax.cummax(jnp.where(is_eos_BxL, at_L, 0), axis=1)  # where the token's segment begins
    return segments_BxL, at_L - start_BxL


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32."""
    with jax.named_scope("loss"):
        return jnp.mean(_nll(logits_BxLxV, targets_BxL))


def _nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    # logsumexp minus the target's logit: the backward is softmax minus one-hot, with no [B, L, V]
    # log-probabilities kept for it.
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    return lse_BxL - jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


def chunk_size(length: int, chunk: int) -> int:
    """The largest divisor of ``length`` that is at most ``chunk`` (``chunk`` <= 0: the whole length)."""
    if chunk <= 0 or chunk >= length:
        return length
    return max(d for d in range(1, chunk + 1) if length % d == 0)


def chunked_metrics(logits_of: Callable[[jax.Array], jax.Array], x_BxLxD: jax.Array, targets_BxL: jax.Array,
                    chunk: int, *, recompute: bool = False, acc: bool = True) -> dict:
    """``{"loss", "acc"}`` (means over all B x L positions) of ``logits_of(x)`` computed ``chunk`` positions
    of the sequence at a time (``chunk_size``), so at most [B, chunk, V] float32 logits exist at once. Sums
    are float32. ``recompute``: the backward recomputes each chunk's logits from its [B, chunk, D] input
    instead of keeping them (a training loss: memory of one chunk, one more LM-head matmul). ``acc=False``:
    the loss only (no argmax over the logits)."""
    B, L, D = x_BxLxD.shape
    c = chunk_size(L, chunk)
    with jax.named_scope("loss"):
        if c == L:  # one chunk: no scan, the program of an unchunked loss
            logits_BxLxV = logits_of(x_BxLxD)
            out = {"loss": jnp.mean(_nll(logits_BxLxV, targets_BxL))}
            return {**out, "acc": _hits(logits_BxLxV, targets_BxL) / (B * L)} if acc else out
        xs_NxBxCxD = sharding.constrain(x_BxLxD.reshape(B, L // c, c, D).swapaxes(0, 1),
                                        (None, "batch", "length", "act_embed"))
        ts_NxBxC = targets_BxL.reshape(B, L // c, c).swapaxes(0, 1)

        def sums(x_BxCxD, t_BxC):
            logits_BxCxV = logits_of(x_BxCxD)
            return jnp.sum(_nll(logits_BxCxV, t_BxC)), _hits(logits_BxCxV, t_BxC) if acc else jnp.zeros(())

        if recompute:
            sums = jax.checkpoint(sums, policy=jax.checkpoint_policies.nothing_saveable)

        def body(carry, xt):
            nll, hits = sums(*xt)
            return (carry[0] + nll, carry[1] + hits), None

        (nll, hits), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                                      (xs_NxBxCxD, ts_NxBxC))
        return {"loss": nll / (B * L), "acc": hits / (B * L)} if acc else {"loss": nll / (B * L)}


def _hits(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    return jnp.sum((jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32))
