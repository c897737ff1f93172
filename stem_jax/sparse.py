"""Sparse row-wise AdamW for the STEM tables (``train.stem_optimizer="sparse"``).

A batch reads a few hundred rows of a [V, d_ff] table, but dense AdamW reads and writes all V rows (the
parameter and both moments) every step, so its cost grows with the vocabulary. Here the step deduplicates the
batch's ids (unique + inverse index), gathers only those rows, differentiates the loss w.r.t. the rows
(``Transformer(ids, rows=...)``), and updates only those rows and their state.

Semantics, and how they differ from dense AdamW (they agree to rounding when every row is touched every step):

- **per-row step counts** for bias correction: a row's t-th update is corrected by ``1 - b^t`` whatever the
  global step. This is our choice: lazy Adam (TF Addons ``LazyAdam``, PyTorch ``SparseAdam``) also updates only
  the touched rows' moments, but corrects them with the one global step count;
- **untouched rows do not move**: no moment decay and no weight decay; their parameter and state stay
  bit-identical. Dense AdamW keeps moving a row on its stale momentum for many steps after its last use and
  decays every row every step;
- **weight decay on touched rows only**, by ``lr * stem_weight_decay`` per update (decoupled, as in AdamW);
- the learning-rate schedule and the table group's global-norm clipping use the global step and the norm of
  the rows' gradients, which equals the dense table gradient's norm (untouched rows have zero gradient).

Tables stay vocab-sharded and every row is updated in place by the device that owns it. The train step
(``steps.sparse_step``) runs on the row-owner exchange (``exchange.py``): ``fetch_rows`` deduplicates each
device's own ids and fetches their rows from the owners; after the backward, ``exchange_update`` returns each
device's row gradients to the owners, which sum them per row (a row read by several devices gets one
gradient, as in the dense step), clip with the global norm and apply ``adamw_rows``. No [U, d_ff] array is
replicated over the batch axes: the collectives hold ``N x C`` rows (``exchange.slots``) whatever the batch,
and an owner's row blocks have ``min(its rows, N x local tokens)`` slots. Host offload runs the same exchange
on staged per-owner blocks (``offload.py``). ``update`` applies the rule to rows that every device holds
(the unit the tests check against numpy and optax; the benchmark's control for the replicated layout).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from stem_jax import exchange, sharding
from stem_jax.config import TrainConfig
from stem_jax.optim import schedule


def split_tables(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(tables, backbone) of a parameter state; ``nnx.merge_state`` puts them back together."""
    return nnx.split_state(params, nnx.PathContains("table"), ...)


def table_list(tables: nnx.State) -> list[jax.Array]:
    """The table arrays in layer order."""
    return [v.get_value() for v in jax.tree.leaves(tables, is_leaf=lambda x: isinstance(x, nnx.Variable))]


def with_tables(tables: nnx.State, arrays: list[jax.Array]) -> nnx.State:
    """``tables`` with its arrays replaced, in ``table_list`` order."""
    return jax.tree.unflatten(jax.tree.structure(tables), arrays)


def unique_size(tokens: int, rows: int) -> int:
    """Static number of unique-id slots for a batch of ``tokens`` ids: a batch has at most this many."""
    return min(tokens, rows)


def dedup(ids_BxL: jax.Array, size: int, fill: int) -> tuple[jax.Array, jax.Array]:
    """``(uniq_U, inverse_BxL)`` with ``uniq[inverse] == ids``; unused slots hold ``fill`` (an id past every
    table row, so gathers clip and scatters drop them)."""
    uniq_U, inv = jnp.unique(ids_BxL, size=size, fill_value=fill, return_inverse=True)
    return uniq_U.astype(jnp.int32), inv.reshape(ids_BxL.shape).astype(jnp.int32)


def init_state(tables: nnx.State) -> dict:
    """Zero moments shaped like the tables and an int32 update count per row (sharded like the rows)."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    zeros = lambda: jax.tree.map(lambda v: v.replace(jnp.zeros_like(v.get_value())), tables, is_leaf=is_var)
    count = jax.tree.map(lambda v: v.replace(jnp.zeros(v.get_value().shape[:1], jnp.int32),
                                             logical_axes=("stem_vocab",)), tables, is_leaf=is_var)
    return {"mu": zeros(), "nu": zeros(), "count": count}


def clip(g_rows: list[jax.Array], max_norm: float) -> tuple[list[jax.Array], jax.Array]:
    """optax.clip_by_global_norm over all tables' row gradients; returns (clipped, norm before clipping)."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in g_rows))
    if max_norm <= 0:
        return g_rows, norm
    return [jax.lax.select(norm < max_norm, g, (g / norm) * max_norm) for g in g_rows], norm


def adamw_rows(p_UxF, m_UxF, v_UxF, c_U, g_UxF, lr, t: TrainConfig):
    """One AdamW update of a block of rows, each with its own count; written in optax's operation order so
    that a fully touched table matches ``optax.adamw`` to rounding."""
    b1, b2 = t.b1, t.b2
    c_U = c_U + 1
    m_UxF = (1 - b1) * g_UxF + b1 * m_UxF
    v_UxF = (1 - b2) * (g_UxF ** 2) + b2 * v_UxF
    m_hat = m_UxF / (1 - b1 ** c_U)[:, None].astype(m_UxF.dtype)
    v_hat = v_UxF / (1 - b2 ** c_U)[:, None].astype(v_UxF.dtype)
    u_UxF = m_hat / (jnp.sqrt(v_hat) + t.eps)
    if t.stem_weight_decay:
        u_UxF = u_UxF + t.stem_weight_decay * p_UxF
    return p_UxF + (-lr) * u_UxF, m_UxF, v_UxF, c_U


def _owned(uniq_U: jax.Array, first_row, rows: int) -> jax.Array:
    """Local row index of each id, or ``rows`` (out of range: dropped by scatters) for ids owned elsewhere."""
    local_U = uniq_U - first_row
    return jnp.where((local_U >= 0) & (local_U < rows), local_U, rows)


def gather_rows(arrays: tuple, idx_U: jax.Array) -> tuple:
    return tuple(jnp.take(a, jnp.clip(idx_U, 0, a.shape[0] - 1), axis=0) for a in arrays)


def scatter_rows(arrays: tuple, idx_U: jax.Array, rows: tuple) -> tuple:
    return tuple(a.at[idx_U].set(r, mode="drop") for a, r in zip(arrays, rows))


def update(tables: nnx.State, state: dict, uniq_U: jax.Array, g_rows: list[jax.Array], lr: jax.Array,
           t: TrainConfig) -> tuple[nnx.State, dict, jax.Array]:
    """Apply ``adamw_rows`` to the rows ``uniq_U`` of every table, in place on each vocab shard.

    Returns (tables, state, sum of squares of the updated rows) — the last for the step's param norm."""
    mesh = jax.sharding.get_abstract_mesh()
    vocab_axes = sharding.mesh_axes("stem_vocab") if not mesh.empty else ()

    def local(p_vxf, m_vxf, v_vxf, c_v, uniq_U, g_UxF, lr):
        first = jax.lax.axis_index(vocab_axes) * p_vxf.shape[0] if vocab_axes else 0
        idx_U = _owned(uniq_U, first, p_vxf.shape[0])
        new = adamw_rows(*gather_rows((p_vxf, m_vxf, v_vxf, c_v), idx_U), g_UxF, lr, t)
        # Rows owned elsewhere (or fill slots) were clipped gathers of some other row: leave them out.
        mine_U = idx_U < p_vxf.shape[0]
        sq = jnp.sum(jnp.where(mine_U[:, None], jnp.square(new[0]), 0.0))
        if vocab_axes:  # each device holds a [rows, d_ff] block of the table
            sq = jax.lax.psum(sq, vocab_axes + sharding.mesh_axes("stem_dff"))
        return (*scatter_rows((p_vxf, m_vxf, v_vxf, c_v), idx_U, new), sq)

    if vocab_axes:
        tab, col = sharding.spec(("stem_vocab", "stem_dff")), sharding.spec(("stem_vocab",))
        rows_spec = sharding.spec((None, "stem_dff"))
        local = jax.shard_map(local, in_specs=(tab, tab, tab, col, P(), rows_spec, P()),
                              out_specs=(tab, tab, tab, col, P()))
    out = [local(p, m, v, c, uniq_U, g, lr) for p, m, v, c, g in zip(
        table_list(tables), table_list(state["mu"]), table_list(state["nu"]), table_list(state["count"]), g_rows)]
    new_tables = with_tables(tables, [o[0] for o in out])
    new_state = {k: with_tables(state[k], [o[i] for o in out]) for i, k in enumerate(("mu", "nu", "count"), 1)}
    return new_tables, new_state, sum(o[4] for o in out)


def _exchange_axes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(axes that split the table rows and the batch, axes that split the table columns)."""
    vocab_axes = sharding.mesh_axes("stem_vocab")
    if vocab_axes != sharding.mesh_axes("batch"):
        raise ValueError(f"the sparse table optimizer exchanges rows over the batch axes "
                         f"{sharding.mesh_axes('batch')}, which must be the table's row axes {vocab_axes} "
                         "(sharding.RULES)")
    return vocab_axes, sharding.mesh_axes("stem_dff")


def fetch_rows(tables: nnx.State, rows_BxL: jax.Array, capacity: float):
    """``(rows, inverse_BxL, route, asked_V)``: every table's unique rows of each device's own tokens
    (float32, [N*T, d_ff] split over the batch axes, T = local tokens), each device's inverse into its block,
    the per-device ``exchange.Route`` (split likewise) that ``exchange_update`` sends the gradients back
    along, and which table rows anyone asked for (split like the table rows): the rows to update."""
    axes, _ = _exchange_axes()
    tab, batch = sharding.spec(("stem_vocab", "stem_dff")), sharding.spec(("batch", "length"))
    rows_spec, flat = sharding.spec(("batch", "stem_dff")), sharding.spec(("batch",))

    def local(tables_, rows_bxl):
        rt = exchange.route(rows_bxl.reshape(-1), tables_[0].shape[0], axes, capacity)
        fetched, asked_v = exchange.fetch(tables_, rt, tables_[0].shape[0], axes, capacity, jnp.float32)
        return fetched, rt.inv_T.reshape(rows_bxl.shape), rt, asked_v

    arrays = table_list(tables)
    route_spec = exchange.Route(flat, flat, flat, flat, P())
    return jax.shard_map(local, in_specs=([tab] * len(arrays), batch),
                         out_specs=([rows_spec] * len(arrays), batch, route_spec, sharding.spec(("stem_vocab",))))(
        arrays, rows_BxL)


def exchange_update(tables: nnx.State, state: dict, route: exchange.Route, asked_V: jax.Array, g_rows: list[jax.Array],
                    lr: jax.Array, t: TrainConfig, capacity: float) -> tuple[nnx.State, dict, jax.Array, jax.Array]:
    """``update`` for rows fetched by ``fetch_rows``: gradients go back to their owners, which sum them per
    row, clip by the global norm of the summed gradients and update their rows in place.

    Returns (tables, state, sum of squares of the updated rows, gradient norm before clipping)."""
    axes, col_axes = _exchange_axes()
    tab, col = sharding.spec(("stem_vocab", "stem_dff")), sharding.spec(("stem_vocab",))
    rows_spec, flat = sharding.spec(("batch", "stem_dff")), sharding.spec(("batch",))
    n = len(g_rows)

    def local(p, m, v, c, g, rt, asked_v, lr):
        v_rows, size = p[0].shape[0], min(p[0].shape[0], jax.lax.axis_size(axes) * rt.uniq_T.shape[0])
        slot_v = jnp.where(asked_v, jnp.cumsum(asked_v) - 1, size)
        rows_S = jnp.nonzero(asked_v, size=size, fill_value=v_rows)[0].astype(jnp.int32)
        accs = exchange.send_back(g, rt, axes, capacity, v_rows, slot_v, size, jnp.float32)
        norm = jnp.sqrt(jax.lax.psum(sum(jnp.sum(jnp.square(a)) for a in accs), axes + col_axes))
        if t.stem_clip_norm > 0:
            accs = [jax.lax.select(norm < t.stem_clip_norm, a, (a / norm) * t.stem_clip_norm) for a in accs]
        out, sq = [], 0.0
        for arrays, acc in zip(zip(p, m, v, c), accs):
            new = adamw_rows(*gather_rows(arrays, rows_S), acc, lr, t)
            sq = sq + jnp.sum(jnp.where((rows_S < v_rows)[:, None], jnp.square(new[0]), 0.0))
            out.append(scatter_rows(arrays, rows_S, new))
        return [[o[i] for o in out] for i in range(4)], jax.lax.psum(sq, axes + col_axes), norm

    route_spec = exchange.Route(flat, flat, flat, flat, P())
    (p, m, v, c), sq, norm = jax.shard_map(
        local, in_specs=([tab] * n, [tab] * n, [tab] * n, [col] * n, [rows_spec] * n, route_spec, col, P()),
        out_specs=([[tab] * n, [tab] * n, [tab] * n, [col] * n], P(), P()))(
        table_list(tables), table_list(state["mu"]), table_list(state["nu"]), table_list(state["count"]),
        list(g_rows), route, asked_V, lr)
    new_state = {"mu": with_tables(state["mu"], m), "nu": with_tables(state["nu"], v),
                 "count": with_tables(state["count"], c)}
    return with_tables(tables, p), new_state, sq, norm


def stem_lr(t: TrainConfig, step: jax.Array) -> jax.Array:
    return schedule(t)(step) * t.stem_lr_mult
