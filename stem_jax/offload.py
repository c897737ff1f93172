"""Host-memory offload of the STEM tables (``model.stem_offload``) for training and evaluation.

The tables and their row-wise optimizer state (``sparse.py``) live in host memory (memory kind
``pinned_host``, still vocab-sharded); the device holds only the backbone. Each training step k:

1. the host deduplicates the batch's rows and groups them by the device that owns them (``owner_blocks``):
   N blocks of S slots, S a power-of-two bucket so a handful of programs cover every batch;
2. the blocks (parameters, moments, counts) are gathered *on the host* and copied to the devices, block d
   to device d, so they are split like the tables. The gather for step k+1 is dispatched right after step
   k (double buffering: step k+1's rows are staged while step k's are in use), as its own executable;
   whether it overlaps step k's compute depends on the backend's scheduling. On the 2-core CPU, where host
   and device are the same cores, none of it was hidden; it has not been measured on an accelerator
   (docs/offload.md);
3. the device step (``steps.offload_step``) runs the sparse step's row exchange on the blocks as if they
   were the tables: each device fetches its own tokens' rows from the owners' blocks, and the owners sum the
   returned gradients and apply AdamW to their blocks;
4. the new blocks go back and the host scatters them into the tables.

Step k+1's rows were read before step k's write-back, so the device first patches them with step k's new
rows (ids both steps share): the result matches on-device sparse training up to summation order
(tests/test_offload.py: losses to 1e-6, tables and moments to atol 1e-5 + rtol 1e-4, counts exactly).

Gathers and scatters run as host computations (``compute_on('device_host')``) inside jitted functions,
so only the staged blocks cross the host-device boundary. Decoding uses a device-resident hot-row cache
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


def patch_blocks(owners: int, uniq: jax.Array, rows: list[jax.Array], new_uniq: jax.Array,
                 new_rows: list[jax.Array]) -> list[jax.Array]:
    """``patch`` for per-owner blocks (``owner_blocks``): a row is always in its owner's block, and each
    block is sorted, so each block is patched from the same owner's block."""
    split = lambda x: x.reshape(owners, -1, *x.shape[1:])
    out = jax.vmap(patch)(split(uniq), [split(r) for r in rows], split(new_uniq), [split(r) for r in new_rows])
    return [o.reshape(r.shape) for o, r in zip(out, rows)]


def owner_blocks(rows_BxL: np.ndarray, n_rows: int, owners: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """``(uniq_NS, at_BxL)``: the batch's unique stored rows grouped by owner (owner d holds rows
    ``[d * n_rows / N, (d + 1) * n_rows / N)``) into N blocks of S slots, each sorted and padded with
    ``n_rows`` (past the table), S a power-of-two bucket (at most ``cap``); ``at_BxL`` is each token's
    position in them. Staged like this, the blocks split over the devices like the tables do."""
    uniq, inv = np.unique(rows_BxL, return_inverse=True)
    owner = uniq // (n_rows // owners)
    counts = np.bincount(owner, minlength=owners)
    size = bucket(int(counts.max()), cap)
    rank = np.arange(len(uniq)) - (np.cumsum(counts) - counts)[owner]
    uniq_NS = np.full(owners * size, n_rows, np.int32)
    uniq_NS[owner * size + rank] = uniq
    return uniq_NS, (owner * size + rank)[inv].reshape(rows_BxL.shape).astype(np.int32)


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
        self.owners = sharding.axis_size("stem_vocab", ctx.mesh)
        local_tokens = ctx.cfg.train.batch_size * ctx.cfg.model.seq_len // self.owners
        self.cap = min(ctx.tables.rows // self.owners, self.owners * local_tokens)  # rows one owner can be asked for
        sh = ctx.state_shardings
        self._dev_sh = {"backbone": sparse.split_tables(sh["params"])[1], "tx": sh["opt_state"]["tx"],
                        "step": sh["step"]}
        # Staged blocks are split over the devices like the tables, in device memory.
        self._blocks_sh = [s.with_memory_kind("device") for s in host_arrays(sh)]
        self._ids_sh = sharding.named(ctx.mesh, ("stem_vocab",))
        self._gather = jax.jit(gather, out_shardings=self._blocks_sh)
        self._gather_params = jax.jit(gather, out_shardings=self._blocks_sh[:len(ctx.stem_layers)])  # eval
        self._scatter = jax.jit(scatter, donate_argnums=0, out_shardings=host_arrays(sh))
        self._replicated = sharding.replicated(ctx.mesh)
        self._step = jax.jit(self._device_step, donate_argnums=0,
                             out_shardings=(self._dev_sh, self._replicated, (self._ids_sh, self._blocks_sh)))
        self._eval = jax.jit(self._eval_step)
        self._staged: tuple[np.ndarray, tuple] | None = None  # (ids, staged rows) of the next batch
        self._patch: tuple | None = None                      # the last step's (uniq, new rows)
        self._last_host: jax.Array | None = None              # first host array the last step returned

    def stage(self, host: list[jax.Array], local_BxL1: np.ndarray, params_only: bool = False) -> tuple:
        """Group the batch's unique rows by owner on the host (``owner_blocks``) and start their transfer;
        returns device ``(uniq_NS, at_BxL, blocks)``."""
        m = self.ctx.cfg.model
        rows_BxL = sharding.stored_rows(local_BxL1[:, :-1], m.vocab_size, m.stem_row_layout)
        uniq, at_BxL = owner_blocks(rows_BxL, self.fill, self.owners, self.cap)
        uniq = jax.device_put(uniq, self._ids_sh)
        fetch = self._gather_params if params_only else self._gather
        return uniq, data.to_global(at_BxL, self.ctx.batch_sharding), fetch(host, uniq)

    def _device_step(self, dev: dict, staged: tuple, last: tuple, batch_BxL1: jax.Array):
        uniq_NS, at_BxL, blocks = staged
        blocks = patch_blocks(self.owners, uniq_NS, blocks, *last)
        dev, metrics, new_blocks = steps.offload_step(self.ctx, dev, blocks, at_BxL, batch_BxL1)
        return dev, metrics, (uniq_NS, new_blocks)

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
            if last is None:  # nothing to patch: all fill ids, shaped like this step's blocks (one program)
                U = staged[0].shape[0]
                last = jax.device_put((np.full((U,), self.fill, np.int32),
                                       [np.zeros((U, *a.shape[1:]), a.dtype) for a in host]),
                                      (self._ids_sh, self._blocks_sh))
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

    def _eval_step(self, backbone, blocks: list[jax.Array], at_BxL: jax.Array, batch_BxL1: jax.Array) -> dict:
        staged = sparse.with_tables(self.ctx.tables.abstract, blocks)
        rows, inv_BxL, _, _ = sparse.fetch_rows(staged, at_BxL, self.ctx.cfg.model.stem_capacity)
        params = nnx.merge_state(backbone, self.ctx.tables.abstract)  # abstract tables: rows only
        return steps.eval_metrics(self.ctx.graphdef, params, batch_BxL1, rows=StemRows(tuple(rows), inv_BxL, True),
                                  eos_id=self.ctx.eos_id, chunk=self.ctx.cfg.train.eval_loss_chunk)

    def eval_metrics(self, params: nnx.State, local_BxL1: np.ndarray) -> dict:
        tables, backbone = sparse.split_tables(params)
        with jax.set_mesh(self.ctx.mesh):
            _, at_BxL, blocks = self.stage(sparse.table_list(tables), local_BxL1, params_only=True)
            return self._eval(backbone, blocks, at_BxL, data.to_global(local_BxL1, self.ctx.batch_sharding))
