"""The train and eval steps, side by side over one frozen ``StepContext``:

- ``dense_step``: optax AdamW over every parameter, the STEM tables as their own group (``optim.py``);
- ``sparse_step``: the backbone through optax, the tables by row-wise AdamW over the batch's unique rows
  (``train.stem_optimizer=sparse``; the row optimizer is ``sparse.py``);
- ``offload_step``: ``sparse_step`` when the tables live in host memory: the batch's rows arrive staged by
  ``offload.py`` in per-owner blocks, the exchange runs on them, and the new blocks go back to it.

Each runs the forward/backward pass over ``train.microbatches`` slices of the batch (``accumulate``) and
applies one update. With ``data.packing`` (the context's ``eos_id``), every forward pass, eval included, keeps
attention within each document of the rows and restarts RoPE positions at each EOS (``model.doc_segments``,
computed on the device from the input ids).

The trainer loop (``trainer.py``) jits one of them with the context's shardings and donates the state.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from stem_jax import accounting, attention, data, scanning, sharding, sparse
from stem_jax.config import Config, ConfigError
from stem_jax.model import Transformer, chunked_metrics, doc_segments
from stem_jax.optim import group_norms, make_optimizer, schedule
from stem_jax.stem import StemRows


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """The STEM tables as the steps see them."""
    abstract: nnx.State   # shapes of every table (empty without tables)
    rows: int             # padded rows of each table (0 without tables)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Everything a step needs that is fixed for a run: config, mesh, model graph, optimizer, shardings."""
    cfg: Config
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation  # the backbone's alone under the sparse table optimizer
    abstract_state: dict              # {"params", "opt_state", "step"} as ShapeDtypeStructs
    state_shardings: dict
    batch_sharding: NamedSharding
    tables: TableLayout
    stem_layers: tuple[int, ...]
    counts: accounting.ParamCounts
    eos_id: int | None = None         # packed documents end in it (``data.packing``); None: no packing

    @property
    def sparse(self) -> bool:
        return self.cfg.train.stem_optimizer == "sparse"


def _init(cfg: Config, tx: optax.GradientTransformation) -> dict:
    params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), nnx.Param)
    if cfg.train.stem_optimizer == "sparse":
        tables, backbone = sparse.split_tables(params)
        opt_state = {"tx": tx.init(backbone), "rows": sparse.init_state(tables)}
    else:
        opt_state = tx.init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}


def make_context(cfg: Config, mesh: Mesh, *, eos_id: int | None = None) -> StepContext:
    """The context of ``cfg`` on ``mesh``: shapes from ``eval_shape`` (nothing is allocated), shardings from
    the rules in ``sharding.py``; host memory for the tables under ``model.stem_offload``. ``eos_id``: the
    corpus' EOS id when ``data.packing`` is on (the steps then attend within documents), else None."""
    sharding.check_model_fits(cfg.model, mesh)
    batch_sharding = sharding.batch_sharding(mesh, cfg.train.batch_size)  # the batch divides the batch shards
    per_device = cfg.train.batch_size // sharding.axis_size("batch", mesh)
    if per_device % cfg.train.microbatches:
        raise ConfigError(f"train.microbatches={cfg.train.microbatches} does not divide the per-device batch "
                          f"{per_device} (train.batch_size={cfg.train.batch_size} over "
                          f"{sharding.axis_size('batch', mesh)} batch shards)")
    platform = mesh.devices.flat[0].platform  # decides model.attention=auto (a TPU topology compiled on a CPU)
    attention.resolve(cfg.model.attention, platform, cfg.model.seq_len, cfg.model.dtype)  # errors before any step
    tx = make_optimizer(cfg.train, tables=cfg.train.stem_optimizer != "sparse")
    with jax.set_mesh(mesh):  # table rows are padded to the mesh's vocab shards
        model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0), platform=platform))
        graphdef, abstract_params = nnx.split(model, nnx.Param)
        abstract_state = jax.eval_shape(lambda: _init(cfg, tx))
    state_shardings = sharding.tree_shardings(mesh, abstract_state)
    if cfg.model.stem_offload:
        state_shardings = sharding.tables_on_host(state_shardings)
    tables = sparse.split_tables(abstract_params)[0]
    rows = sparse.table_list(tables)[0].shape[-2] if sparse.table_list(tables) else 0  # none for hash_moe
    layout = TableLayout(tables, rows)
    return StepContext(cfg, mesh, graphdef, tx, abstract_state, state_shardings,
                       batch_sharding, layout, model.stem_layers,
                       accounting.count_params(abstract_params, cfg.model), eos_id)


def other_layout(ctx: StepContext) -> tuple[dict, dict]:
    """``(abstract state, shardings)`` of this run in the other layer layout (``model.scan_layers``): what a
    checkpoint saved in it restores into before ``scanning.convert``."""
    other = make_context(scanning.with_scan_layers(ctx.cfg, not ctx.cfg.model.scan_layers), ctx.mesh,
                         eos_id=ctx.eos_id)
    return other.abstract_state, other.state_shardings


def init_fn(ctx: StepContext) -> Callable[[], dict]:
    """The jitted ``() -> state`` that initialises a fresh train state directly into its shardings (call and
    lower it under ``jax.set_mesh(ctx.mesh)``)."""
    return jax.jit(lambda: _init(ctx.cfg, ctx.tx), out_shardings=ctx.state_shardings)


def init_state(ctx: StepContext) -> dict:
    """A fresh train state, initialised directly into its shardings."""
    with jax.set_mesh(ctx.mesh):
        return init_fn(ctx)()


def hidden(model: Transformer, ids_BxL: jax.Array, rows: StemRows | None = None,
           eos_id: int | None = None) -> jax.Array:
    """``model.hidden(ids)``; with ``eos_id``, as packed documents (segments and positions from the ids)."""
    if eos_id is None:
        return model.hidden(ids_BxL, rows=rows)
    segments_BxL, positions_BxL = doc_segments(ids_BxL, eos_id)
    return model.hidden(ids_BxL, rows=rows, segments_BxL=segments_BxL, positions_BxL=positions_BxL)


def loss(graphdef: Any, params: nnx.State, batch_BxL1: jax.Array, rows: StemRows | None = None,
         eos_id: int | None = None, chunk: int = 0) -> jax.Array:
    """Mean next-token loss; ``chunk``: over chunks of that many positions (``model.chunked_metrics``)."""
    model = nnx.merge(graphdef, params)
    x_BxLxD = hidden(model, batch_BxL1[:, :-1], rows, eos_id)
    return chunked_metrics(model.logits, x_BxLxD, batch_BxL1[:, 1:], chunk, recompute=True, acc=False)["loss"]


def microbatches(x_Bx: jax.Array, k: int) -> jax.Array:
    """``[B, ...] -> [k, B/k, ...]``: microbatch j holds rows j, j+k, j+2k, ... of the batch, so each device's
    rows stay on it (its block of B/N rows splits into k slices of B/(N k)) and no data moves."""
    x = x_Bx.reshape(x_Bx.shape[0] // k, k, *x_Bx.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch", *(None,) * (x.ndim - 2)))


def accumulate(loss_and_grads: Callable, k: int, shardings: Any, *batch_major: jax.Array):
    """``loss_and_grads(*batch_major)`` as the mean over ``k`` microbatches (``microbatches``): a ``lax.scan``
    that sums in float32, its carry pinned to ``shardings`` (a tree like the output; None = let XLA choose).
    Every microbatch has the same number of tokens, so the mean of their mean losses is the batch's."""
    if k == 1:
        return loss_and_grads(*batch_major)
    parts = [microbatches(x, k) for x in batch_major]
    shapes = jax.eval_shape(loss_and_grads, *(p[0] for p in parts))
    pin = lambda tree: jax.tree.map(lambda a, s: a if s is None else jax.lax.with_sharding_constraint(a, s),
                                    tree, shardings)  # ``shardings`` is flattened up to ``tree``'s leaves

    def body(acc, part):
        return pin(jax.tree.map(lambda a, o: a + o.astype(jnp.float32), acc, loss_and_grads(*part))), None

    zero = pin(jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes))
    total, _ = jax.lax.scan(body, zero, parts)
    return jax.tree.map(lambda a, s: (a / k).astype(s.dtype), total, shapes)


def dense_step(ctx: StepContext, state: dict, batch_BxL1: jax.Array) -> tuple[dict, dict]:
    loss_and_grads = lambda b: jax.value_and_grad(loss, argnums=1)(ctx.graphdef, state["params"], b,
                                                                   eos_id=ctx.eos_id, chunk=ctx.cfg.train.loss_chunk)
    loss_value, grads = accumulate(loss_and_grads, ctx.cfg.train.microbatches,
                                   (None, _plain(ctx.state_shardings["params"])), batch_BxL1)
    with jax.named_scope("optimizer"):
        updates, opt_state = ctx.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss_value, "lr": schedule(ctx.cfg.train)(state["step"]), **group_norms(grads),
                   "param_norm": optax.tree.norm(params)}  # catches an update that overflowed
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


# ---- the sparse table optimizer: gradients w.r.t. the batch's unique rows, never a [V, d_ff] array ----

def rows_model(graphdef: Any, backbone: nnx.State, abstract_tables: nnx.State) -> Transformer:
    """The model with *abstract* tables: it runs only with pre-gathered rows (``model(ids, rows=...)``), so it
    can neither read a host-resident table nor form a [V, d_ff] gradient."""
    return nnx.merge(graphdef, backbone, abstract_tables)


def _plain(shardings: Any) -> Any:
    """Shardings as device-memory NamedShardings (an accumulator lives on the device even when its
    parameter lives in host memory)."""
    return jax.tree.map(lambda s: s.with_memory_kind("device") if isinstance(s, NamedSharding) else s, shardings)


def _row_loss_grads(ctx: StepContext, backbone: nnx.State, rows: list[jax.Array], inv_BxL: jax.Array,
                    batch_BxL1: jax.Array):
    """``(loss, (backbone grads, row grads))`` with each device's unique STEM rows given (``fetch_rows``),
    never the tables; over ``train.microbatches`` slices of the batch, every slice reading the same rows."""
    def f(inv_BxL, batch_BxL1):
        def of(backbone, rows):
            model = rows_model(ctx.graphdef, backbone, ctx.tables.abstract)
            stem_rows = StemRows(tuple(rows), inv_BxL, per_device=True)
            x_BxLxD = hidden(model, batch_BxL1[:, :-1], stem_rows, ctx.eos_id)
            return chunked_metrics(model.logits, x_BxLxD, batch_BxL1[:, 1:], ctx.cfg.train.loss_chunk,
                                   recompute=True, acc=False)["loss"]
        return jax.value_and_grad(of, argnums=(0, 1))(backbone, list(rows))

    back = sparse.split_tables(_plain(ctx.state_shardings["params"]))[1]
    row = NamedSharding(ctx.mesh, sharding.spec(("batch", "stem_dff")))
    return accumulate(f, ctx.cfg.train.microbatches, (None, (back, [row] * len(rows))), inv_BxL, batch_BxL1)


def _backbone_update(ctx: StepContext, step: jax.Array, backbone: nnx.State, tx_state, g_back: nnx.State,
                     loss_value: jax.Array, stem_norm: jax.Array, rows_sq: jax.Array):
    """optax update of the backbone and the step's metrics (``param_norm`` covers the backbone and the rows
    updated this step: a norm over the whole tables would cost O(V) again)."""
    with jax.named_scope("optimizer"):
        updates, tx_state = ctx.tx.update(g_back, tx_state, backbone)
        backbone = optax.apply_updates(backbone, updates)
        metrics = {"loss": loss_value, "lr": schedule(ctx.cfg.train)(step),
                   "backbone_grad_norm": optax.tree.norm(g_back), "stem_grad_norm": stem_norm,
                   "param_norm": jnp.sqrt(jnp.square(optax.tree.norm(backbone)) + rows_sq)}
    return backbone, tx_state, metrics


def sparse_step(ctx: StepContext, state: dict, batch_BxL1: jax.Array) -> tuple[dict, dict]:
    """Each device fetches its own tokens' unique rows from their owners, the loss is differentiated w.r.t.
    them, and the owners sum the returned gradients and update their rows (``sparse.py``)."""
    t, m = ctx.cfg.train, ctx.cfg.model
    tables, backbone = sparse.split_tables(state["params"])
    rows_BxL = sharding.stored_rows(batch_BxL1[:, :-1], m.vocab_size, m.stem_row_layout)
    with jax.named_scope("stem_lookup"):
        rows, inv_BxL, route, asked_V = sparse.fetch_rows(tables, rows_BxL, m.stem_capacity)
    loss_value, (g_back, g_rows) = _row_loss_grads(ctx, backbone, rows, inv_BxL, batch_BxL1)
    with jax.named_scope("optimizer"):
        tables, rows_state, rows_sq, stem_norm = sparse.exchange_update(
            tables, state["opt_state"]["rows"], route, asked_V, g_rows, sparse.stem_lr(t, state["step"]), t,
            m.stem_capacity)
    backbone, tx_state, metrics = _backbone_update(ctx, state["step"], backbone, state["opt_state"]["tx"], g_back,
                                                   loss_value, stem_norm, rows_sq)
    return {"params": nnx.merge_state(backbone, tables), "opt_state": {"tx": tx_state, "rows": rows_state},
            "step": state["step"] + 1}, metrics


def offload_step(ctx: StepContext, dev: dict, blocks: list[jax.Array], rows_BxL: jax.Array,
                 batch_BxL1: jax.Array) -> tuple[dict, dict, list[jax.Array]]:
    """``sparse_step`` on rows staged from host memory: ``dev`` holds ``backbone``, ``tx`` and ``step``;
    ``blocks`` are the staged parameters, then mu, nu and count of every table (``offload.host_arrays``
    order), laid out like the tables but holding only the batch's rows: owner d's block holds the rows d
    would own. ``rows_BxL`` indexes them. The exchange runs on these blocks as it runs on the tables. Returns
    the new device state, the metrics and the new blocks in the same order."""
    t, m, n = ctx.cfg.train, ctx.cfg.model, len(blocks) // 4
    tables = sparse.with_tables(ctx.tables.abstract, blocks[:n])
    state = {k: sparse.with_tables(ctx.abstract_state["opt_state"]["rows"][k], blocks[(i + 1) * n:(i + 2) * n])
             for i, k in enumerate(("mu", "nu", "count"))}
    with jax.named_scope("stem_lookup"):
        rows, inv_BxL, route, asked_V = sparse.fetch_rows(tables, rows_BxL, m.stem_capacity)
    loss_value, (g_back, g_rows) = _row_loss_grads(ctx, dev["backbone"], rows, inv_BxL, batch_BxL1)
    with jax.named_scope("optimizer"):
        tables, state, rows_sq, stem_norm = sparse.exchange_update(tables, state, route, asked_V, g_rows,
                                                                   sparse.stem_lr(t, dev["step"]), t, m.stem_capacity)
    backbone, tx_state, metrics = _backbone_update(ctx, dev["step"], dev["backbone"], dev["tx"], g_back,
                                                   loss_value, stem_norm, rows_sq)
    new = sparse.table_list(tables) + [a for k in ("mu", "nu", "count") for a in sparse.table_list(state[k])]
    return {"backbone": backbone, "tx": tx_state, "step": dev["step"] + 1}, metrics, new


def train_step_fn(ctx: StepContext) -> Callable:
    """The jitted on-device train step ``(state, batch) -> (state, metrics)``, state donated."""
    step = sparse_step if ctx.sparse else dense_step
    return jax.jit(lambda state, batch: step(ctx, state, batch),
                   in_shardings=(ctx.state_shardings, ctx.batch_sharding),
                   out_shardings=(ctx.state_shardings, sharding.replicated(ctx.mesh)), donate_argnums=0)


# ---- evaluation ----

def eval_metrics(graphdef: Any, params: nnx.State, batch_BxL1: jax.Array, rows: StemRows | None = None,
                 eos_id: int | None = None, chunk: int = 0) -> dict:
    """Mean loss and next-token top-1 accuracy (the accuracy the tiny comparison's ROI uses); ``eos_id``:
    packed documents (``hidden``); ``chunk``: positions per chunk of the loss (``model.chunked_metrics``)."""
    model = nnx.merge(graphdef, params)
    return chunked_metrics(model.logits, hidden(model, batch_BxL1[:, :-1], rows, eos_id), batch_BxL1[:, 1:], chunk)


def eval_microbatches(k: int, global_batch: int, mesh: Mesh) -> int:
    """The most microbatches, at most ``k``, that divide the per-device batch of ``global_batch`` on ``mesh``
    (a tool's mesh may split the batch over fewer or more devices than training did)."""
    per_device = global_batch // sharding.axis_size("batch", mesh)
    return max(d for d in range(1, min(k, per_device) + 1) if per_device % d == 0)


def eval_step_fn(graphdef: Any, param_shardings: Any, batch_sharding: NamedSharding, *,
                 eos_id: int | None = None, microbatches: int = 1, chunk: int = 0) -> Callable:
    """The jitted ``(params, batch) -> {"loss", "acc"}``, replicated outputs; ``eos_id``: packed documents.
    The batch runs as ``microbatches`` forward passes (``accumulate``; at most ``eval_microbatches`` of them)
    and the loss over ``chunk`` positions at a time: no program holds the whole batch's logits."""
    mesh = batch_sharding.mesh

    def metrics(params, batch_BxL1):
        k = eval_microbatches(microbatches, batch_BxL1.shape[0], mesh)
        return accumulate(lambda b: eval_metrics(graphdef, params, b, eos_id=eos_id, chunk=chunk), k,
                          {"loss": None, "acc": None}, batch_BxL1)
    return jax.jit(metrics, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=sharding.replicated(mesh))


def validation(metrics_of: Callable[[np.ndarray], dict], batches: Iterable[np.ndarray]) -> dict:
    """``val_loss`` / ``val_ppl`` / ``val_acc``: means of ``metrics_of(local batch)`` over full batches (every
    batch has the same number of tokens)."""
    out = jax.device_get([metrics_of(local) for local in batches])
    loss_value = float(np.mean([o["loss"] for o in out]))
    return {"val_loss": loss_value, "val_ppl": math.exp(min(loss_value, 50.0)),
            "val_acc": float(np.mean([o["acc"] for o in out]))}


def validation_batches(cfg: Config, val: data.Tokens, name: str = "") -> Iterable[np.ndarray]:
    """This process's rows of ``train.eval_batches`` batches of the held-out split (0 = all of it)."""
    m, t = cfg.model, cfg.train
    return data.eval_batches(val, m.seq_len, t.batch_size, m.vocab_size, t.eval_batches,
                             name=name or getattr(val, "name", "val split"))
