"""Host-memory offload of the STEM tables (``model.stem_offload``) for training and evaluation.

The tables and their row-wise optimizer state (``sparse.py``) live in host memory (memory kind
``pinned_host``, still vocab-sharded); the device holds only the backbone. Each training step k:

1. the host deduplicates the batch's ids (``np.unique``: unique ids + inverse index), padded to a
   power-of-two bucket so a handful of programs cover every batch;
2. the unique rows (parameters, moments, counts) are gathered *on the host* and copied to the device.
   The gather for step k+1 is dispatched right after step k (double buffering: step k+1's rows are staged
   while step k's are in use), as its own executable; whether it overlaps step k's compute depends on the
   backend's scheduling. On the 2-core CPU, where host and device are the same cores, none of it was hidden;
   it has not been measured on an accelerator (docs/offload.md);
3. the device computes with ``rows[inverse]`` and applies AdamW to the staged rows (``steps.offload_step``);
4. the new rows go back and the host scatters them into the tables.

Step k+1's rows were read before step k's write-back, so the device first patches them with step k's new
rows (ids both steps share): the result matches on-device sparse training up to summation order
(tests/test_offload.py: losses to 1e-6, tables and moments to atol 1e-5 + rtol 1e-4, counts exactly).

Gathers and scatters run as host computations (``compute_on('device_host')``) inside jitted functions,
so only [U, d_ff] row blocks cross the host-device boundary. Decoding uses a device-resident hot-row cache
instead (``hotrows.py``)."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import compute_on as _compute_on

from stem_jax import data, sharding, sparse, steps
from stem_jax.stem import StemRows

MIN_BUCKET = 64  # smallest padded unique-id count


class OffloadError(ValueError):
    """Offload was asked for where it cannot run."""


def check_supported(mesh) -> None:
    if jax.process_count() > 1:
        raise OffloadError("model.stem_offload=True runs in a single process for now (the host deduplicates the "
                           f"global batch); this run has {jax.process_count()} processes")
    kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    if sharding.HOST not in kinds:
        raise OffloadError(f"model.stem_offload=True needs the {sharding.HOST!r} memory kind, but "
                           f"{mesh.devices.flat[0].platform} devices offer {sorted(kinds)}; "
                           "set --config.model.stem_offload=False")


def on_host(fn):
    """``fn`` jitted as a host computation whose outputs stay in host memory (jax <= 0.11 names this
    ``compute_on2``; later releases renamed it ``compute_on``)."""
    wrap = getattr(_compute_on, "compute_on2", None) or _compute_on.compute_on
    return wrap(jax.jit(fn), compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)


_host_take = on_host(lambda a, i: jnp.take(a, i, axis=0, mode="clip"))
_host_put = on_host(lambda a, i, r: a.at[i].set(r, mode="drop"))


def gather(host: list[jax.Array], uniq_U: jax.Array) -> list[jax.Array]:
    """Rows ``a[uniq]`` of host arrays, gathered on the host and delivered to device memory (jit me)."""
    ids = jax.device_put(uniq_U, jax.memory.Space.Host)
    return [jax.device_put(_host_take(a, ids), jax.memory.Space.Device) for a in host]


def scatter(host: list[jax.Array], uniq_U: jax.Array, rows: list[jax.Array]) -> list[jax.Array]:
    """``a[uniq] = rows`` on the host (ids past the table are dropped) (jit me, donating ``host``)."""
    ids = jax.device_put(uniq_U, jax.memory.Space.Host)
    return [_host_put(a, ids, jax.device_put(r, jax.memory.Space.Host)) for a, r in zip(host, rows)]


def bucket(n: int, cap: int) -> int:
    """Padded size for ``n`` unique ids: the next power of two (at least MIN_BUCKET), at most ``cap``."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), cap)


def dedup_host(rows_BxL: np.ndarray, fill: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """``(uniq_U, inverse_BxL)`` of stored table rows (``sharding.stored_rows``) in numpy; unused slots of
    the bucket hold ``fill``."""
    uniq, inv = np.unique(rows_BxL, return_inverse=True)
    uniq_U = np.full(bucket(len(uniq), cap), fill, np.int32)
    uniq_U[:len(uniq)] = uniq
    return uniq_U, inv.reshape(rows_BxL.shape).astype(np.int32)


def patch(uniq_U: jax.Array, rows: list[jax.Array], new_uniq: jax.Array, new_rows: list[jax.Array]):
    """``rows`` with the entries whose id is in ``new_uniq`` (sorted) replaced by ``new_rows``."""
    pos_U = jnp.clip(jnp.searchsorted(new_uniq, uniq_U), 0, new_uniq.shape[0] - 1)
    hit_U = new_uniq[pos_U] == uniq_U
    return [jnp.where(hit_U.reshape(-1, *(1,) * (r.ndim - 1)), n[pos_U], r) for r, n in zip(rows, new_rows)]


def host_arrays(state: dict) -> list[jax.Array]:
    """The host-resident arrays of a train state: tables, then mu, nu and count of every table."""
    tables = sparse.split_tables(state["params"])[0]
    return sparse.table_list(tables) + [a for k in ("mu", "nu", "count")
                                        for a in sparse.table_list(state["opt_state"]["rows"][k])]


class Offloader:
    """Offloaded training and evaluation steps for a ``steps.StepContext`` (see the module docstring)."""

    def __init__(self, ctx: steps.StepContext):
        check_supported(ctx.mesh)
        self.ctx, self.fill = ctx, ctx.tables.rows
        sh = ctx.state_shardings
        self._dev_sh = {"backbone": sparse.split_tables(sh["params"])[1], "tx": sh["opt_state"]["tx"],
                        "step": sh["step"]}
        self._gather = jax.jit(gather)
        self._scatter = jax.jit(scatter, donate_argnums=0, out_shardings=host_arrays(sh))
        # The patch keeps one fixed (replicated) layout so the first step's empty patch needs no extra program.
        self._replicated = sharding.replicated(ctx.mesh)
        self._step = jax.jit(self._device_step, donate_argnums=0,
                             out_shardings=(self._dev_sh, self._replicated, self._replicated))
        self._eval = jax.jit(self._eval_step)
        self._staged: tuple[np.ndarray, tuple] | None = None  # (ids, staged rows) of the next batch
        self._patch: tuple | None = None                      # the last step's (uniq, new rows)
        self._last_host: jax.Array | None = None              # first host array the last step returned

    def stage(self, host: list[jax.Array], local_BxL1: np.ndarray) -> tuple:
        """Dedup on the host and start the row transfer; returns device ``(uniq, inverse, rows)``."""
        m = self.ctx.cfg.model
        rows_BxL = sharding.stored_rows(local_BxL1[:, :-1], m.vocab_size, m.stem_row_layout)
        uniq, inv = dedup_host(rows_BxL, self.fill, self.ctx.tables.unique_rows)
        uniq = jnp.asarray(uniq)
        return uniq, jnp.asarray(inv), self._gather(host, uniq)

    def _device_step(self, dev: dict, staged: tuple, last: tuple, batch_BxL1: jax.Array):
        uniq_U, inv_BxL, rows = staged
        dev, metrics, new_rows = steps.offload_step(self.ctx, dev, patch(uniq_U, rows, *last), uniq_U, inv_BxL,
                                                    batch_BxL1)
        return dev, metrics, (uniq_U, new_rows)

    def step(self, state: dict, local_BxL1: np.ndarray, next_BxL1: np.ndarray | None) -> tuple[dict, dict]:
        """One training step; stages ``next_BxL1``'s rows (when given) right after dispatching it."""
        ctx = self.ctx
        host = host_arrays(state)
        tables, backbone = sparse.split_tables(state["params"])
        with jax.set_mesh(ctx.mesh):
            # Prefetched rows predate the last write-back and need its patch; they only fit the state that
            # the last step returned and the batch they were staged for.
            continuing = self._last_host is not None and host[0] is self._last_host
            if continuing and self._staged is not None and np.array_equal(self._staged[0], local_BxL1):
                staged, last = self._staged[1], self._patch
            else:
                staged, last = self.stage(host, local_BxL1), None
            if last is None:  # nothing to patch: all fill ids, shaped like this step's rows (one program)
                U = staged[0].shape[0]
                last = jax.device_put((np.full((U,), self.fill, np.int32),
                                       [np.zeros((U, *a.shape[1:]), a.dtype) for a in host]), self._replicated)
            dev = {"backbone": backbone, "tx": state["opt_state"]["tx"], "step": state["step"]}
            batch = data.to_global(local_BxL1, ctx.batch_sharding)
            dev, metrics, self._patch = self._step(dev, staged, last, batch)
            # Read before the write-back below: the next step patches in this step's rows.
            self._staged = None if next_BxL1 is None else (next_BxL1, self.stage(host, next_BxL1))
            host = self._scatter(host, *self._patch)
            self._last_host = host[0]
        n = len(ctx.stem_layers)
        tables = sparse.with_tables(tables, host[:n])
        rows_state = {k: sparse.with_tables(state["opt_state"]["rows"][k], host[(i + 1) * n:(i + 2) * n])
                      for i, k in enumerate(("mu", "nu", "count"))}
        return {"params": nnx.merge_state(dev["backbone"], tables),
                "opt_state": {"tx": dev["tx"], "rows": rows_state}, "step": dev["step"]}, metrics

    def _eval_step(self, backbone, rows: list[jax.Array], inv_BxL: jax.Array, batch_BxL1: jax.Array) -> dict:
        params = nnx.merge_state(backbone, self.ctx.tables.abstract)  # abstract tables: rows only
        return steps.eval_metrics(self.ctx.graphdef, params, batch_BxL1, rows=StemRows(tuple(rows), inv_BxL))

    def eval_metrics(self, params: nnx.State, local_BxL1: np.ndarray) -> dict:
        tables, backbone = sparse.split_tables(params)
        with jax.set_mesh(self.ctx.mesh):
            uniq, inv, rows = self.stage(sparse.table_list(tables), local_BxL1)
            return self._eval(backbone, rows, inv, data.to_global(local_BxL1, self.ctx.batch_sharding))
