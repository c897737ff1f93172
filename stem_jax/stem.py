"""STEM (arXiv 2601.10639): the FFN up-projection replaced by a per-layer table indexed by the token id.

    dense SwiGLU   y = W_down( SiLU(W_gate x) * (W_up x) )
    STEM           y = W_down( SiLU(W_gate x) * U_l[t] )     U_l: [vocab, d_ff],  t = input token at that position

No router, no auxiliary loss, no normalisation of the row. The row is a gather, so a STEM layer does two
matmuls instead of three, while its capacity grows with vocab x d_ff.

Tables are sharded by vocabulary rows over the batch-parallel mesh axes (rules in ``sharding.py``). The
default lookup is a masked local gather inside ``jax.shard_map``: every device gathers the ids of the whole
batch it shares the table with, reads only the rows of its own vocabulary slice (zeros elsewhere), and a
reduce-scatter hands each device the rows of its batch slice. Each position has exactly one owner, so the
sum is exact in any dtype. Autodiff turns this into an all-gather of the row cotangents and a *local*
scatter-add into the table slice: a [V, d_ff] gradient never crosses devices.
"""
from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from stem_jax import sharding
from stem_jax.layers import matrix_std, param, project

RATIO_STRIDE = {"1/3": 3, "1/2": 2}
LOOKUP_MODES = ("shard_map", "xla")


def stem_layer_indices(spec: str | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """The layers whose FFN is STEM.

    ``"1/3"`` / ``"1/2"``: ``n_layers // k`` layers at stride k = 3 / 2 starting at layer 1, e.g. 16 layers
    give 1/3 = [1, 4, 7, 10, 13] (the paper's 1B run) and 32 layers give 10 / 16 layers (its 350M counts).
    ``"full"``: every layer but 0. ``"none"``: no layer. ``"1,4,7"`` or a sequence: those indices.
    """
    if isinstance(spec, str):
        s = spec.strip()
        if s in RATIO_STRIDE:
            k = RATIO_STRIDE[s]
            idx = tuple(1 + i * k for i in range(n_layers // k))
            if not idx:
                raise ValueError(f"stem_layers={s!r} selects no layer of a {n_layers}-layer model; "
                                 "use 'full' or explicit indices")
            return idx
        if s == "full":
            return tuple(range(1, n_layers))
        if s in ("none", ""):
            return ()
        try:
            spec = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"unknown stem_layers {spec!r}: use '1/3', '1/2', 'full', 'none' "
                             "or comma-separated layer indices like '1,4,7'") from None
    idx = tuple(int(i) for i in spec)
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"stem layer indices {bad} are out of range for n_layers={n_layers} "
                         f"(valid: 0..{n_layers - 1})")
    if len(set(idx)) != len(idx):
        raise ValueError(f"stem layer indices {list(idx)} contain duplicates")
    return tuple(sorted(idx))


def lookup(table_VxF: jax.Array, ids_BxL: jax.Array, mode: str = "shard_map", dtype=jnp.float32) -> jax.Array:
    """Rows ``table[ids]`` as [B, L, F] in ``dtype``, batch-sharded like the ids."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jnp.take(table_VxF, ids_BxL, axis=0).astype(dtype)
    # A batch that does not split over the batch shards (e.g. one prompt) is replicated instead.
    batch = "batch" if ids_BxL.shape[0] % sharding.axis_size("batch") == 0 else None
    table_spec = sharding.spec(("stem_vocab", "stem_dff"))
    ids_spec, out_spec = sharding.spec((batch, "length")), sharding.spec((batch, "length", "stem_dff"))
    vocab_axes, batch_axes = sharding.mesh_axes("stem_vocab"), sharding.mesh_axes(batch)

    if mode == "xla":  # XLA's partitioned gather; the reference the shard_map path is tested against
        gather = jax.sharding.explicit_axes(
            lambda t, i: t.at[i].get(out_sharding=out_spec), axes=tuple(mesh.axis_names),
            in_sharding=(table_spec, ids_spec))
        return gather(table_VxF, ids_BxL).astype(dtype)
    if mode != "shard_map":
        raise ValueError(f"unknown STEM lookup mode {mode!r}; choose from {LOOKUP_MODES}")

    def local(table_vxf, ids_bxl):
        ids_all = jax.lax.all_gather(ids_bxl, batch_axes, axis=0, tiled=True) if batch_axes else ids_bxl
        v = table_vxf.shape[0]
        first_row = jax.lax.axis_index(vocab_axes) * v if vocab_axes else 0
        local_ids = ids_all - first_row
        owned = (local_ids >= 0) & (local_ids < v)
        rows = jnp.take(table_vxf, jnp.clip(local_ids, 0, v - 1), axis=0)
        rows = jnp.where(owned[..., None], rows, 0).astype(dtype)
        if batch_axes:
            rows = jax.lax.psum_scatter(rows, batch_axes, scatter_dimension=0, tiled=True)
        rest = tuple(a for a in vocab_axes if a not in batch_axes)
        return jax.lax.psum(rows, rest) if rest else rows

    return jax.shard_map(local, in_specs=(table_spec, ids_spec), out_specs=out_spec)(table_VxF, ids_BxL)


def init_table(key: jax.Array, vocab_size: int, d_ff: int, rows: int) -> jax.Array:
    """Xavier-normal [vocab, d_ff] (std sqrt(2/(V+F)), the official code's init), zero-padded to ``rows``.

    Padding rows exist only so each device holds an equal slice; validated ids never address them.
    """
    std = (2.0 / (vocab_size + d_ff)) ** 0.5
    table_VxF = std * jax.random.normal(key, (vocab_size, d_ff), jnp.float32)
    return jnp.pad(table_VxF, ((0, rows - vocab_size), (0, 0)))


class StemFFN(nnx.Module):
    """``y = W_down(SiLU(W_gate x) * U[t])`` with a vocab-sharded table ``U``."""

    def __init__(self, d_model: int, d_ff: int, vocab_size: int, init_std: float, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, lookup_mode: str = "shard_map"):
        if lookup_mode not in LOOKUP_MODES:
            raise ValueError(f"unknown STEM lookup mode {lookup_mode!r}; choose from {LOOKUP_MODES}")
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), matrix_std(init_std, d_model))
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), matrix_std(init_std, d_ff))
        rows = sharding.padded_rows(vocab_size)
        self.table = nnx.Param(init_table(rngs.params(), vocab_size, d_ff, rows),
                               logical_axes=("stem_vocab", "stem_dff"))
        self.vocab_size, self.dtype, self.lookup_mode = vocab_size, dtype, lookup_mode

    def __call__(self, x_BxLxD: jax.Array, ids_BxL: jax.Array, edit: tuple | None = None,
                 rows: tuple | None = None) -> jax.Array:
        """``edit`` (knowledge editing, ``editing.py``): ``(ids_BxLxM, weights_BxLxM, on)``; where ``on``, the
        row at each position is ``sum_m weights[m] * U[ids[m]]`` instead of ``U[t]``. Weights are unchanged.

        ``rows``: ``(rows_UxF, inverse_BxL)``, the rows already gathered (``U[uniq]``, with ``uniq[inverse] ==
        ids``): the table is not read. The sparse optimizer differentiates w.r.t. them, offload brings them from
        host memory and the decode cache holds them (``sparse.py``, ``offload.py``)."""
        chex.assert_equal_shape_prefix([x_BxLxD, ids_BxL], 2)
        n_rows, width = self.table.shape
        d_ff = self.w_gate.shape[1]
        if width != d_ff or n_rows < self.vocab_size:
            raise ValueError(f"STEM table has shape {self.table.shape} but the layer needs "
                             f"[>= {self.vocab_size}, d_ff={d_ff}]: the row multiplies SiLU(W_gate x) elementwise")
        act = ("batch", "length", "act_mlp")
        gate_BxLxF = project(x_BxLxD, self.w_gate, "bld,df->blf", self.dtype, act)
        if rows is not None:
            if edit is not None:
                raise ValueError("a STEM row edit needs the table, not pre-gathered rows")
            rows_UxF, inv_BxL = rows
            chex.assert_shape(rows_UxF, (None, d_ff))
            rows_UxF = sharding.constrain(rows_UxF.astype(self.dtype), (None, "stem_dff"))
            u_BxLxF = sharding.constrain(jnp.take(rows_UxF, inv_BxL, axis=0), act)
        else:
            u_BxLxF = sharding.constrain(lookup(self.table[...], ids_BxL, self.lookup_mode, self.dtype), act)
        if edit is not None:
            e_ids_BxLxM, e_w_BxLxM, on = edit
            B, L, M = e_ids_BxLxM.shape
            rows_BxLMxF = lookup(self.table[...], e_ids_BxLxM.reshape(B, L * M), self.lookup_mode, self.dtype)
            edited_BxLxF = jnp.einsum("blm,blmf->blf", e_w_BxLxM.astype(self.dtype),
                                      rows_BxLMxF.reshape(B, L, M, d_ff))
            u_BxLxF = jnp.where(on, edited_BxLxF, u_BxLxF)
        return project(jax.nn.silu(gate_BxLxF) * u_BxLxF, self.w_down, "blf,fd->bld", self.dtype,
                       ("batch", "length", "act_embed"))
