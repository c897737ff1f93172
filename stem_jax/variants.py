"""The paper's ablations and sparse baseline, next to STEM (``stem.py``) and dense SwiGLU (``layers.py``).

    STEM† (stem_additive)  y = W_down( SiLU(W_gate x) * (W_up x + U[t]) )     keeps W_up, adds the row
    gate replacement       y = W_down( SiLU(U[t]) * (W_up x) )                the row replaces the gate path
    Hash-MoE (hash_moe)    y = W_down[e]( SiLU(W_gate[e] x) * (W_up[e] x) ),  e = hash(t) mod n_experts

Hash-MoE follows Hash Layers (Roller et al. 2021): top-1 of ``n_experts`` SwiGLU experts, chosen by a fixed
hash of the input token id, with no router and no load-balancing loss. Tokens are grouped by expert with a
stable sort and run through ``jax.lax.ragged_dot`` (a grouped matmul: exact, no capacity and no dropped
tokens). On GPU/TPU that is a real grouped GEMM; XLA:CPU lowers it to every expert on every token, so CPU
wall time grows with ``n_experts`` although the model FLOPs do not.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from stem_jax import sharding
from stem_jax.layers import matrix_std, param, project
from stem_jax.stem import RowEdit, RowLookup, StemRows, TableFFN

# Knuth's multiplicative constant (2^32 / golden ratio): consecutive ids land on well-spread experts.
_HASH_MULT = 2654435761


def expert_of(ids: jax.Array, n_experts: int) -> jax.Array:
    """The fixed expert of each token id: the top 16 bits of ``id * 2654435761 mod 2^32``, mod n_experts."""
    h = (ids.astype(jnp.uint32) * jnp.uint32(_HASH_MULT)) >> 16
    return (h % jnp.uint32(n_experts)).astype(jnp.int32)


class StemAdditiveFFN(TableFFN):
    """STEM†: the up-projection is kept and the token row is added to it (more params and FLOPs than STEM)."""

    def __init__(self, d_model: int, d_ff: int, vocab_size: int, init_std: float, *, rngs: nnx.Rngs,
                 table_index: int = 0, dtype=jnp.float32, rows_of: RowLookup = RowLookup()):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), matrix_std(init_std, d_model))
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), matrix_std(init_std, d_model))
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), matrix_std(init_std, d_ff))
        super().__init__(rngs, vocab_size, d_ff, table_index, dtype, rows_of)

    def __call__(self, x_BxLxD: jax.Array, ids_BxL: jax.Array, rows: StemRows | None = None,
                 edit: RowEdit | None = None) -> jax.Array:
        act = ("batch", "length", "act_mlp")
        gate_BxLxF = project(x_BxLxD, self.w_gate, "bld,df->blf", self.dtype, act)
        up_BxLxF = project(x_BxLxD, self.w_up, "bld,df->blf", self.dtype, act) + self.token_rows(ids_BxL, rows, edit)
        return project(jax.nn.silu(gate_BxLxF) * up_BxLxF, self.w_down, "blf,fd->bld", self.dtype,
                       ("batch", "length", "act_embed"))


class StemGateFFN(TableFFN):
    """Gate replacement: SiLU of the token row gates ``W_up x``, so the gate no longer sees the context."""

    def __init__(self, d_model: int, d_ff: int, vocab_size: int, init_std: float, *, rngs: nnx.Rngs,
                 table_index: int = 0, dtype=jnp.float32, rows_of: RowLookup = RowLookup()):
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), matrix_std(init_std, d_model))
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), matrix_std(init_std, d_ff))
        super().__init__(rngs, vocab_size, d_ff, table_index, dtype, rows_of)

    def __call__(self, x_BxLxD: jax.Array, ids_BxL: jax.Array, rows: StemRows | None = None,
                 edit: RowEdit | None = None) -> jax.Array:
        up_BxLxF = project(x_BxLxD, self.w_up, "bld,df->blf", self.dtype, ("batch", "length", "act_mlp"))
        gate_BxLxF = jax.nn.silu(self.token_rows(ids_BxL, rows, edit))
        return project(gate_BxLxF * up_BxLxF, self.w_down, "blf,fd->bld", self.dtype, ("batch", "length", "act_embed"))


def _moe_local(x_BxLxD, ids_BxL, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, dtype):
    """Hash-routed SwiGLU experts on one device's tokens: sort by expert, grouped matmuls, unsort."""
    B, L, D = x_BxLxD.shape
    E = w_gate_ExDxF.shape[0]
    e_N = expert_of(ids_BxL.reshape(-1), E)
    order_N = jnp.argsort(e_N, stable=True)
    sizes_E = jnp.bincount(e_N, length=E).astype(jnp.int32)
    x_NxD = x_BxLxD.reshape(B * L, D)[order_N]
    gate_NxF = jax.lax.ragged_dot(x_NxD, w_gate_ExDxF.astype(dtype), sizes_E)
    up_NxF = jax.lax.ragged_dot(x_NxD, w_up_ExDxF.astype(dtype), sizes_E)
    y_NxD = jax.lax.ragged_dot(jax.nn.silu(gate_NxF) * up_NxF, w_down_ExFxD.astype(dtype), sizes_E)
    return jnp.zeros_like(y_NxD).at[order_N].set(y_NxD).reshape(B, L, D)


class HashMoEFFN(nnx.Module):
    """Top-1 of ``n_experts`` SwiGLU experts of width ``d_expert``, chosen by ``expert_of(token id)``."""

    def __init__(self, d_model: int, d_expert: int, n_experts: int, init_std: float, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        E, D, F = n_experts, d_model, d_expert
        self.w_gate = param(rngs, (E, D, F), ("experts", "embed", "mlp"), matrix_std(init_std, D))
        self.w_up = param(rngs, (E, D, F), ("experts", "embed", "mlp"), matrix_std(init_std, D))
        self.w_down = param(rngs, (E, F, D), ("experts", "mlp", "embed"), matrix_std(init_std, F))
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array, ids_BxL: jax.Array, rows: None = None, edit: None = None) -> jax.Array:
        if rows is not None or edit is not None:
            raise ValueError("Hash-MoE layers have no STEM rows to read or edit")
        weights = (self.w_gate[...], self.w_up[...], self.w_down[...])
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return _moe_local(x_BxLxD, ids_BxL, *weights, self.dtype)
        # Each device routes its own batch rows; the (FSDP-sharded) experts are gathered whole, so the sort
        # never crosses devices and the weight gradients come back as a reduce-scatter.
        x_spec = sharding.fitted_spec(("batch", "length", None), x_BxLxD.shape, mesh)
        out = jax.shard_map(lambda x, i, *w: _moe_local(x, i, *w, self.dtype),
                            in_specs=(x_spec, P(*x_spec[:2]), *(P(),) * 3),
                            out_specs=x_spec)(x_BxLxD, ids_BxL, *weights)
        return sharding.constrain(out, ("batch", "length", "act_embed"))
