"""STEM (arXiv 2601.10639): the FFN up-projection replaced by a per-layer table indexed by the token id.

    dense SwiGLU   y = W_down( SiLU(W_gate x) * (W_up x) )
    STEM           y = W_down( SiLU(W_gate x) * U_l[t] )     U_l: [vocab, d_ff],  t = input token at that position

No router, no auxiliary loss, no normalisation of the row. The row is a gather, so a STEM layer does two
matmuls instead of three, while its capacity grows with vocab x d_ff.

Tables are sharded by vocabulary rows over the batch-parallel mesh axes (rules in ``sharding.py``). The
default lookup (``exchange``, in ``exchange.py``) sends each device's unique ids to the devices that own
their rows and gets the rows back, so a device moves rows for its own tokens only. The reference mode
``shard_map`` is a masked local gather: every device gathers the ids of the whole batch it shares the table
with, reads only the rows of its own vocabulary slice (zeros elsewhere), and a reduce-scatter hands each
device the rows of its batch slice (exact in any dtype: each position has one owner), which costs
O(global batch) per device. In both, the table gradient is a *local* scatter-add into the table slice: a
[V, d_ff] gradient never crosses devices.
"""
from __future__ import annotations

import dataclasses
import math

import chex
import flax
import jax
import jax.numpy as jnp
from flax import nnx

from stem_jax import sharding
from stem_jax.config import EXCHANGE_CAPACITY, LOOKUP_MODES
from stem_jax.exchange import exchange_rows
from stem_jax.layers import matrix_std, param, project
from stem_jax.scanning import LAYERS_AXIS


@flax.struct.dataclass
class StemRows:
    """Rows gathered before the forward, read instead of the tables: ``per_layer[k]`` is ``U_k[uniq]`` [U, d_ff]
    for the k-th table layer and ``inverse_BxL`` indexes it (``uniq[inverse] == ids``). The sparse optimizer
    differentiates w.r.t. them, offload brings them from host memory, the decode cache holds them.

    ``per_device``: the rows are split over the batch axes like the batch, and each device's inverse indexes
    its own block (the sparse optimizer's exchange, ``exchange.fetch``); otherwise every device holds all U."""
    per_layer: tuple
    inverse_BxL: jax.Array
    per_device: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class LayerRows:
    """Token rows of every table layer, looked up once before the blocks (``lookup_layers``): ``per_layer[k]``
    is ``U_k[ids]`` [B, L, d_ff] in the compute dtype. Under remat they are inputs of the checkpointed blocks,
    so the backward reuses them instead of running the exchange again."""
    per_layer: tuple


@flax.struct.dataclass
class RowEdit:
    """A knowledge edit (``editing.py``): where ``on_S[k]``, table layer k reads ``sum_m weights[b, l, m] *
    U_k[ids[b, l, m]]`` at position (b, l) instead of ``U_k[t]``. The weights of the model are unchanged."""
    ids_BxLxM: jax.Array
    weights_BxLxM: jax.Array
    on_S: jax.Array


def lookup(table_VxF: jax.Array, ids_BxL: jax.Array, mode: str = "exchange", dtype=jnp.float32,
           capacity: float = EXCHANGE_CAPACITY) -> jax.Array:
    """Rows ``table[ids]`` as [B, L, F] in ``dtype``, batch-sharded like the ids.

    ``exchange`` sends each device's unique ids to their owners and gets the rows back (``exchange.py``;
    ``capacity``: slots per round as a fraction of the local tokens); ``shard_map`` is the masked gather of
    the whole batch described above; ``xla`` is XLA's partitioned gather. Exchange falls back to the masked
    gather when the ids are not split over the table's row shards (e.g. one prompt)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jnp.take(table_VxF, ids_BxL, axis=0).astype(dtype)
    table_spec = sharding.spec(("stem_vocab", "stem_dff"))
    ids_spec = sharding.fitted_spec(("batch", "length"), ids_BxL.shape, mesh)  # one prompt: replicated
    out_spec = sharding.fitted_spec(("batch", "length", "stem_dff"), (*ids_BxL.shape, table_VxF.shape[1]), mesh)
    vocab_axes, batch_axes = sharding.mesh_axes("stem_vocab"), sharding.fitted_axes("batch", ids_BxL.shape[0], mesh)

    if mode == "xla":  # XLA's partitioned gather; the reference the shard_map path is tested against
        gather = jax.sharding.explicit_axes(
            lambda t, i: t.at[i].get(out_sharding=out_spec), axes=tuple(mesh.axis_names),
            in_sharding=(table_spec, ids_spec))
        return gather(table_VxF, ids_BxL).astype(dtype)
    if mode not in LOOKUP_MODES:
        raise ValueError(f"unknown STEM lookup mode {mode!r}; choose from {LOOKUP_MODES}")
    if mode == "exchange" and batch_axes and batch_axes == vocab_axes:
        if _exchange_axes(ids_BxL.shape, mesh) is None:  # one owner
            return jnp.take(table_VxF, ids_BxL, axis=0).astype(dtype)
        return jax.shard_map(lambda t, i: exchange_rows((t,), i, vocab_axes, capacity, dtype)[0],
                             in_specs=(table_spec, ids_spec), out_specs=out_spec)(table_VxF, ids_BxL)

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


def _exchange_axes(ids_shape: tuple[int, ...], mesh) -> tuple[str, ...] | None:
    """The mesh axes the exchange runs over for ids of ``ids_shape``: those that split both the table rows
    and the ids (more than one owner); None where ``lookup`` gathers another way."""
    if mesh.empty:
        return None
    vocab_axes, batch_axes = sharding.mesh_axes("stem_vocab"), sharding.fitted_axes("batch", ids_shape[0], mesh)
    if not batch_axes or batch_axes != vocab_axes or math.prod(mesh.shape[a] for a in vocab_axes) == 1:
        return None
    return vocab_axes


@dataclasses.dataclass(frozen=True)
class RowLookup:
    """How a table layer reads rows: ``mode`` and ``capacity`` of ``lookup``, ``layout`` of the stored rows
    (``model.stem_row_layout``, see ``sharding.stored_rows``)."""
    mode: str = "exchange"
    capacity: float = EXCHANGE_CAPACITY
    layout: str = "spread"

    @classmethod
    def of(cls, m) -> "RowLookup":
        return cls(m.stem_lookup, m.stem_capacity, m.stem_row_layout)

    def __call__(self, table_VxF: jax.Array, ids_BxL: jax.Array, vocab_size: int, dtype) -> jax.Array:
        """Token rows ``U[ids]`` [B, L, F] in ``dtype``."""
        rows_BxL = sharding.stored_rows(ids_BxL, vocab_size, self.layout)
        return lookup(table_VxF, rows_BxL, self.mode, dtype, self.capacity)


def take_per_device(rows_UxF: jax.Array, inverse_BxL: jax.Array) -> jax.Array:
    """``rows[inverse]`` where both are split over the batch axes and each device's inverse indexes its own
    block of rows: a local gather (its gradient a local scatter-add)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jnp.take(rows_UxF, inverse_BxL, axis=0)
    return jax.shard_map(lambda r, i: jnp.take(r, i, axis=0),
                         in_specs=(sharding.spec(("batch", "stem_dff")), sharding.spec(("batch", "length"))),
                         out_specs=sharding.spec(("batch", "length", "stem_dff")))(rows_UxF, inverse_BxL)


INIT_ROWS_PER_DRAW = 256  # rows drawn at once by init_table: its temporaries are this many rows, not a shard


def init_table(key: jax.Array, vocab_size: int, d_ff: int, rows: int, layout: str = "spread") -> jax.Array:
    """Xavier-normal [vocab, d_ff] (std sqrt(2/(V+F)), the official code's init), zero-padded to ``rows``
    and stored in ``layout`` (token t's row at ``sharding.stored_rows(t)``).

    Created on its owners: stored row r is drawn from its own key ``fold_in(key, r)`` (rows are i.i.d.), so
    each device draws just its rows, ``INIT_ROWS_PER_DRAW`` at a time, and zeroes the padding rows among
    them by an elementwise mask (``sharding.stored_token``). No device holds more than its shard and one
    block of draws, and the values do not depend on the mesh. Padding rows exist only so each device holds
    an equal slice; validated ids never address them.
    """
    std = (2.0 / (vocab_size + d_ff)) ** 0.5

    def draw(first_row, n_rows: int) -> jax.Array:  # stored rows first_row .. first_row + n_rows - 1
        def one(r):  # the mask inside the loop: its output is the table, with no second [rows, F] buffer
            row_F = std * jax.random.normal(jax.random.fold_in(key, r), (d_ff,), jnp.float32)
            return jnp.where(sharding.stored_token(r, vocab_size, layout) < vocab_size, row_F, 0.0)
        rows_R = first_row + jnp.arange(n_rows, dtype=jnp.int32)
        return jax.lax.map(one, rows_R, batch_size=min(n_rows, INIT_ROWS_PER_DRAW))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return draw(0, rows)
    row_axes, col_axes = sharding.mesh_axes("stem_vocab"), sharding.mesh_axes("stem_dff")

    def local():
        v = rows // math.prod(mesh.shape[a] for a in row_axes)
        block_vxF = draw(jax.lax.axis_index(row_axes) * v if row_axes else 0, v)
        if not col_axes:
            return block_vxF
        f = d_ff // math.prod(mesh.shape[a] for a in col_axes)
        return jax.lax.dynamic_slice_in_dim(block_vxF, jax.lax.axis_index(col_axes) * f, f, axis=1)

    return jax.shard_map(local, in_specs=(), out_specs=sharding.spec(("stem_vocab", "stem_dff")))()


class TableFFN(nnx.Module):
    """An FFN that owns a vocab-sharded ``[V_pad, d_ff]`` table (STEM and its ablations in ``variants.py``).
    ``table_index`` is the layer's position among the model's table layers (its entry in ``StemRows`` and
    ``RowEdit``)."""

    def __init__(self, rngs: nnx.Rngs, vocab_size: int, d_ff: int, table_index: int, dtype, rows_of: RowLookup):
        self.table = nnx.Param(init_table(rngs.params(), vocab_size, d_ff, sharding.padded_rows(vocab_size),
                                          rows_of.layout), logical_axes=("stem_vocab", "stem_dff"))
        self.vocab_size, self.table_index, self.dtype, self.rows_of = vocab_size, table_index, dtype, rows_of

    def token_rows(self, ids_BxL: jax.Array, rows: "StemRows | LayerRows | None" = None,
                   edit: RowEdit | None = None) -> jax.Array:
        """``U[ids]`` as [B, L, d_ff] in the compute dtype: from the table, or from pre-gathered ``rows``;
        ``edit`` swaps in other rows where it is on for this layer."""
        act = ("batch", "length", "act_mlp")
        if rows is not None and edit is not None:
            raise ValueError("a STEM row edit needs the table, not pre-gathered rows")
        if isinstance(rows, LayerRows):
            u_BxLxF = rows.per_layer[self.table_index]
            chex.assert_shape(u_BxLxF, (*ids_BxL.shape, self.table.shape[1]))
            return u_BxLxF
        if rows is not None:  # gather in the rows' dtype, cast after: the gradient's sums stay float32
            rows_UxF = rows.per_layer[self.table_index]
            chex.assert_shape(rows_UxF, (None, self.table.shape[1]))
            if rows.per_device:
                return take_per_device(rows_UxF, rows.inverse_BxL).astype(self.dtype)
            rows_UxF = sharding.constrain(rows_UxF, (None, "stem_dff"))
            return sharding.constrain(jnp.take(rows_UxF, rows.inverse_BxL, axis=0).astype(self.dtype), act)
        u_BxLxF = sharding.constrain(self.rows_of(self.table[...], ids_BxL, self.vocab_size, self.dtype), act)
        if edit is None:
            return u_BxLxF
        B, L, M = edit.ids_BxLxM.shape
        rows_BxLMxF = self.rows_of(self.table[...], edit.ids_BxLxM.reshape(B, L * M), self.vocab_size, self.dtype)
        edited_BxLxF = jnp.einsum("blm,blmf->blf", edit.weights_BxLxM.astype(self.dtype),
                                  rows_BxLMxF.reshape(B, L, M, -1))
        return jnp.where(edit.on_S[self.table_index], edited_BxLxF, u_BxLxF)


class StemFFN(TableFFN):
    """``y = W_down(SiLU(W_gate x) * U[t])``."""

    def __init__(self, d_model: int, d_ff: int, vocab_size: int, init_std: float, *, rngs: nnx.Rngs,
                 table_index: int = 0, dtype=jnp.float32, rows_of: RowLookup = RowLookup()):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), matrix_std(init_std, d_model))
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), matrix_std(init_std, d_ff))
        super().__init__(rngs, vocab_size, d_ff, table_index, dtype, rows_of)

    def __call__(self, x_BxLxD: jax.Array, ids_BxL: jax.Array, rows: "StemRows | LayerRows | None" = None,
                 edit: RowEdit | None = None) -> jax.Array:
        chex.assert_equal_shape_prefix([x_BxLxD, ids_BxL], 2)
        n_rows, width = self.table.shape
        d_ff = self.w_gate.shape[1]
        if width != d_ff or n_rows < self.vocab_size:
            raise ValueError(f"STEM table has shape {self.table.shape} but the layer needs "
                             f"[>= {self.vocab_size}, d_ff={d_ff}]: the row multiplies SiLU(W_gate x) elementwise")
        gate_BxLxF = project(x_BxLxD, self.w_gate, "bld,df->blf", self.dtype, ("batch", "length", "act_mlp"))
        with jax.named_scope("stem_lookup"):
            u_BxLxF = self.token_rows(ids_BxL, rows, edit)
        return project(jax.nn.silu(gate_BxLxF) * u_BxLxF, self.w_down, "blf,fd->bld", self.dtype,
                       ("batch", "length", "act_embed"))


def lookup_layers(ffns: list[TableFFN], ids_BxL: jax.Array) -> LayerRows | None:
    """Every table layer's token rows through one exchange (one route, one loop each way: the step's
    collectives do not grow with the number of STEM layers), or None where the layers look up their own
    rows (no exchange on this mesh, or another lookup mode). A stacked table (a scanned model's repeats,
    ``[n, V, F]``) is read with one gather and gives ``[n, B, L, F]`` rows."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = _exchange_axes(ids_BxL.shape, mesh)
    if not ffns or ffns[0].rows_of.mode != "exchange" or axes is None:
        return None
    first = ffns[0]
    tables = tuple(f.table[...] for f in ffns)
    if any(t.shape[-2:] != tables[0].shape[-2:] or f.dtype != first.dtype for f, t in zip(ffns, tables)):
        return None
    rows_BxL = sharding.stored_rows(ids_BxL, first.vocab_size, first.rows_of.layout)
    lead = lambda t: (LAYERS_AXIS,) * (t.ndim - 2)  # noqa: E731 - a scanned model's stacked repeats
    ids_spec = sharding.fitted_spec(("batch", "length"), ids_BxL.shape, mesh)
    table_specs = tuple(sharding.spec((*lead(t), "stem_vocab", "stem_dff")) for t in tables)
    out_specs = tuple(sharding.fitted_spec((*lead(t), "batch", "length", "stem_dff"),
                                           (*t.shape[:-2], *ids_BxL.shape, t.shape[-1]), mesh) for t in tables)
    per_layer = jax.shard_map(lambda ts, i: exchange_rows(ts, i, axes, first.rows_of.capacity, first.dtype),
                              in_specs=(table_specs, ids_spec), out_specs=out_specs)(tables, rows_BxL)
    return LayerRows(tuple(sharding.constrain(u, (*lead(t), "batch", "length", "act_mlp"))
                           for u, t in zip(per_layer, tables)))
