"""The row-owner exchange behind ``model.stem_lookup="exchange"``: each device pays for its own tokens only.

Tables are sharded by vocabulary rows over the batch-parallel mesh axes, so the N devices that split the
batch also split the rows: device d owns stored rows ``[d*v, (d+1)*v)`` (``sharding.stored_rows`` spreads
frequent tokens over the owners). For its local rows a device

1. deduplicates them (``jnp.unique`` with a static size of ``T`` local tokens);
2. buckets the unique rows by owner (they come sorted, so each owner's are one contiguous run);
3. sends each owner its rows through an ``all_to_all`` of ``[N, C]`` slots, ``C = ceil(capacity * T / N)``;
   the owner gathers them and a second ``all_to_all`` returns them as ``[N, C, d_ff]``;
4. expands the unique rows back to ``[b, l, d_ff]`` with the inverse index.

A device whose unique rows for some owner exceed ``C`` sends the rest in further rounds; every device runs
``max over devices of ceil(count / C)`` rounds (one scalar ``pmax``), so nothing is dropped, whatever the
batch. The backward pass (a ``custom_vjp``) sums each unique row's cotangents locally, sends them to the
owners by the same routing, and each owner scatter-adds into its own table slice: the table gradient stays
local and no collective is larger than ``N x C`` rows per table. Cotangents are summed in the table's dtype
(float32), never in the bfloat16 of the compute: a bf16 sum stops registering a frequent token's additions.
``exchange_rows`` looks up every table layer of a model at once (one route, one loop each way, one stacked
``all_to_all`` per round), so the train step's collectives do not grow with the number of STEM layers. Per device, one round moves ``N x C ~ capacity x T``
rows each way, independent of N. ``fetch`` and ``send_back`` are the same two halves for the sparse table
optimizer, which exchanges the ids once for all table layers.

Everything has static shapes (``ragged_all_to_all`` does not run on XLA:CPU), so the CPU test suite runs the
code that runs on a pod.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def slots(local_tokens: int, owners: int, capacity: float) -> int:
    """Slots per owner and round: ``ceil(capacity * local_tokens / owners)``, at least 1."""
    return max(1, math.ceil(capacity * local_tokens / owners))


class Route(NamedTuple):
    """Where one device's rows go: its unique rows (sorted, fill ``v * N`` past the table), the inverse
    index of its tokens, each owner's (start, count) run in the unique rows, and the rounds every device runs."""
    uniq_T: jax.Array
    inv_T: jax.Array
    start_N: jax.Array
    count_N: jax.Array
    rounds: jax.Array


def route(rows_T: jax.Array, v: int, axes: tuple[str, ...], capacity: float) -> Route:
    """The route of ``rows_T`` (stored table rows) to owners of ``v`` rows each over mesh ``axes``."""
    t, n = rows_T.shape[0], jax.lax.axis_size(axes)
    uniq_T, inv_T = jnp.unique(rows_T, size=t, fill_value=v * n, return_inverse=True)
    owner_T = uniq_T // v  # fill slots get owner n: no bucket
    count_N = jnp.zeros(n, jnp.int32).at[owner_T].add(1, mode="drop")
    start_N = jnp.cumsum(count_N) - count_N
    rounds = jax.lax.pmax(jnp.max(-(-count_N // slots(t, n, capacity))), axes)
    return Route(uniq_T.astype(jnp.int32), inv_T.reshape(-1).astype(jnp.int32), start_N, count_N, rounds)


def _round_slots(rt: Route, r, c: int):
    """Positions in the unique rows of round ``r``'s [N, C] send slots, and which slots are in use."""
    j_NxC = r * c + jnp.arange(c)[None, :]
    return rt.start_N[:, None] + j_NxC, j_NxC < rt.count_N[:, None]


def _requests(rt: Route, pos_NxC, used_NxC, v: int, axes):
    """Each owner receives, per source, the owner-local rows it must serve (-1 = empty slot)."""
    n = pos_NxC.shape[0]
    local = rt.uniq_T[jnp.clip(pos_NxC, 0, rt.uniq_T.shape[0] - 1)] - v * jnp.arange(n, dtype=jnp.int32)[:, None]
    return jax.lax.all_to_all(jnp.where(used_NxC, local, -1), axes, 0, 0, tiled=True)


def _varying(x: jax.Array, axes) -> jax.Array:
    """``x`` typed as varying over mesh ``axes``, like the loop results it starts (a loop carry keeps one
    ``shard_map`` type)."""
    return jax.lax.pcast(x, tuple(axes), to="varying") if axes else x


def _stacks(arrays: list[jax.Array]) -> list[jax.Array]:
    """Each ``[..., rows, F]`` array as ``[k, rows, F]`` (k = 1 for a plain table, the repeats for a scanned
    model's stacked table): one gather or scatter serves all k."""
    return [a.reshape(-1, *a.shape[-2:]) for a in arrays]


def _concat(parts: list[jax.Array]) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _split_k(x_KxNxCxF: jax.Array, ks: list[int]) -> list[jax.Array]:
    return jnp.split(x_KxNxCxF, list(itertools.accumulate(ks))[:-1]) if len(ks) > 1 else [x_KxNxCxF]


def fetch(tables: list[jax.Array], rt: Route, v: int, axes, capacity: float,
          dtype) -> tuple[list[jax.Array], jax.Array]:
    """``([..., T, F] unique rows of every [..., v, F] table block in dtype, [v] which of my rows anyone asked
    for)``; a table with leading dims (a scanned model's repeats) is read with one gather. Each round moves the
    ids once and every table's rows in one ``all_to_all`` of the stacked [K, N, C, F] rows (with no table: only
    the ids move), so the program has the same collectives for 1 or 16 tables. Rows are gathered in the tables'
    dtype and cast after, for the trip."""
    t, n = rt.uniq_T.shape[0], jax.lax.axis_size(axes)
    c = slots(t, n, capacity)
    mesh_axes = jax.sharding.get_abstract_mesh().axis_names
    blocks = _stacks(tables)
    ks = [b.shape[0] for b in blocks]

    def one_round(r, carry):
        rows, asked_v = carry
        pos_NxC, used_NxC = _round_slots(rt, r, c)
        want_NxC = _requests(rt, pos_NxC, used_NxC, v, axes)
        asked_v = asked_v.at[jnp.where(want_NxC >= 0, want_NxC, v)].set(True, mode="drop")
        if not tables:
            return rows, asked_v
        served_KxNxCxF = _concat([jnp.take(b, jnp.clip(want_NxC, 0, v - 1), axis=1) for b in blocks])
        served_KxNxCxF = jnp.where((want_NxC >= 0)[None, ..., None], served_KxNxCxF, 0).astype(dtype)
        got_KxNxCxF = jax.lax.all_to_all(served_KxNxCxF, axes, 1, 1, tiled=True)
        at_NxC = jnp.where(used_NxC, pos_NxC, t)
        return [rows_kxTxF.at[:, at_NxC].set(got, mode="drop")
                for rows_kxTxF, got in zip(rows, _split_k(got_KxNxCxF, ks))], asked_v

    init = ([_varying(jnp.zeros((k, t, b.shape[-1]), dtype), mesh_axes) for k, b in zip(ks, blocks)],
            _varying(jnp.zeros(v, bool), axes))
    rows, asked_v = jax.lax.fori_loop(0, rt.rounds, one_round, init)
    return [r.reshape(*tb.shape[:-2], t, -1) for r, tb in zip(rows, tables)], asked_v


def send_back(grads: list[jax.Array], rt: Route, axes, capacity: float, v: int, slot_v: jax.Array, size: int,
              dtype) -> list[jax.Array]:
    """Each table's [..., T, F] unique-row gradients summed on their owners into ``[..., size, F]``
    accumulators in ``dtype`` (the gradients travel in it too: a float32 sum of bfloat16 cotangents stays
    float32); owner-local row i lands in slot ``slot_v[i]`` (out of range: dropped). One stacked
    ``all_to_all`` per round."""
    t, n = rt.uniq_T.shape[0], jax.lax.axis_size(axes)
    c = slots(t, n, capacity)
    mesh_axes = jax.sharding.get_abstract_mesh().axis_names
    blocks = _stacks(grads)
    ks = [b.shape[0] for b in blocks]

    def one_round(r, accs):
        pos_NxC, used_NxC = _round_slots(rt, r, c)
        want_NxC = _requests(rt, pos_NxC, used_NxC, v, axes)
        at_NxC = jnp.where(want_NxC >= 0, slot_v[jnp.clip(want_NxC, 0, v - 1)], size)
        send_KxNxCxF = _concat([g.astype(dtype)[:, jnp.clip(pos_NxC, 0, t - 1)] for g in blocks])
        send_KxNxCxF = jnp.where(used_NxC[None, ..., None], send_KxNxCxF, 0)
        got_KxNxCxF = jax.lax.all_to_all(send_KxNxCxF, axes, 1, 1, tiled=True)
        return [acc.at[:, at_NxC].add(got, mode="drop") for acc, got in zip(accs, _split_k(got_KxNxCxF, ks))]

    init = [_varying(jnp.zeros((k, size, g.shape[-1]), dtype), mesh_axes) for k, g in zip(ks, blocks)]
    accs = jax.lax.fori_loop(0, rt.rounds, one_round, init)
    return [a.reshape(*g.shape[:-2], size, -1) for a, g in zip(accs, grads)]


def _forward(tables, rows_bxl, axes, capacity, dtype):
    v = tables[0].shape[-2]
    rt = route(rows_bxl.reshape(-1), v, axes, capacity)
    fetched, _ = fetch(list(tables), rt, v, axes, capacity, dtype)
    return tuple(jnp.take(r, rt.inv_T, axis=-2).reshape(*r.shape[:-2], *rows_bxl.shape, -1) for r in fetched), rt


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def exchange_rows(tables: tuple[jax.Array, ...], rows_bxl: jax.Array, axes: tuple[str, ...], capacity: float,
                  dtype) -> tuple[jax.Array, ...]:
    """Rows ``table[..., rows, :]`` of every table (equal [v, F] blocks, with any leading dims) for this
    device's stored rows, inside a ``shard_map`` whose ``axes`` split both the table rows and the batch: one
    route and one exchange for all tables. Returns a [..., b, l, F] array in ``dtype`` per table."""
    return _forward(tables, rows_bxl, axes, capacity, dtype)[0]


def _fwd(tables, rows_bxl, axes, capacity, dtype):
    out, rt = _forward(tables, rows_bxl, axes, capacity, dtype)
    # The tables' leading dims, rows and dtype, without holding the tables.
    return out, (rt, tuple(jnp.zeros((*tb.shape[:-1], 0), tb.dtype) for tb in tables))


def _bwd(axes, capacity, dtype, saved, gs):
    rt, likes = saved
    v, t = likes[0].shape[-2], rt.inv_T.shape[0]
    # Cast before any sum: a token's cotangents (bfloat16 under bf16 compute) add up in the table's dtype.
    sums = jax.vmap(lambda g_TxF: jax.ops.segment_sum(g_TxF, rt.inv_T, num_segments=t))
    g_TxFs = [sums(g.reshape(-1, t, g.shape[-1]).astype(like.dtype)).reshape(*like.shape[:-2], t, -1)
              for g, like in zip(gs, likes)]
    grads = send_back(g_TxFs, rt, axes, capacity, v, jnp.arange(v), v, likes[0].dtype)
    return tuple(grads), None


exchange_rows.defvjp(_fwd, _bwd)
