"""The training loop: sharded init or resume, a jitted train step with explicit shardings and donated
state, logging, periodic / final / on-signal checkpoints, and final validation."""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from stem_jax import accounting, checkpoint, corpus as corpus_lib, data, offload, sharding, sparse
from stem_jax.config import Config, ConfigError, resume_changes, to_dict, validate
from stem_jax.preemption import StopRequests
from stem_jax.model import Transformer, cross_entropy, token_metrics
from stem_jax.optim import group_norms, make_optimizer, schedule
from stem_jax.writer import MetricsWriter


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class Setup:
    """Everything derived from a config and a mesh: model graph, optimizer, shardings, jitted steps."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.sparse = cfg.train.stem_optimizer == "sparse"
        self.tx = make_optimizer(cfg.train, tables=not self.sparse)
        if cfg.model.stem_offload:
            offload.check_supported(mesh)
        with jax.set_mesh(mesh):
            abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
            self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
            self.abstract_tables = sparse.split_tables(abstract_params)[0]
            self.abstract_state = jax.eval_shape(self._init)
        self.stem_layers = abstract_model.stem_layers
        n_dff = sharding.axis_size("stem_dff", mesh)
        if self.stem_layers and cfg.model.ffn != "hash_moe" and cfg.model.d_ff % n_dff:
            raise sharding.MeshError(f"model.d_ff={cfg.model.d_ff} is not divisible by the {n_dff} shards of the "
                                     f"STEM table columns (mesh axes {sharding.mesh_axes('stem_dff')})")
        n_exp = sharding.axis_size("experts", mesh)
        if cfg.model.ffn == "hash_moe" and cfg.model.moe_experts % n_exp:
            raise sharding.MeshError(f"model.moe_experts={cfg.model.moe_experts} is not divisible by the {n_exp} "
                                     f"expert shards (mesh axes {sharding.mesh_axes('experts')}); choose a "
                                     "multiple of it or a smaller data axis")
        self.state_shardings = sharding.tree_shardings(mesh, self.abstract_state)
        if cfg.model.stem_offload:
            self.state_shardings = offload.host_shardings(self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh, cfg.train.batch_size)
        self.counts = accounting.count_params(abstract_params, cfg.model)
        # Sparse optimizer: the batch's unique ids index the rows to gather and update (sparse.py).
        tables = sparse.table_list(self.abstract_tables)  # none for hash_moe
        self.table_rows = tables[0].shape[0] if tables else 0
        self.unique_rows = sparse.unique_size(cfg.train.batch_size * cfg.model.seq_len, self.table_rows)
        self.offloader = offload.Trainer(self) if cfg.model.stem_offload else None
        step_fn = functools.partial(sparse.train_step, self) if self.sparse else self._train_step
        self.train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, NamedSharding(mesh, P())),
                                  donate_argnums=0)
        self.eval_step = jax.jit(self._eval_metrics,
                                 in_shardings=(self.state_shardings["params"], self.batch_sharding),
                                 out_shardings=NamedSharding(mesh, P()))

    def _init(self) -> dict:
        model = Transformer(self.cfg.model, rngs=nnx.Rngs(self.cfg.train.seed))
        params = nnx.state(model, nnx.Param)
        if self.sparse:
            tables, backbone = sparse.split_tables(params)
            opt_state = {"tx": self.tx.init(backbone), "rows": sparse.init_state(tables)}
        else:
            opt_state = self.tx.init(params)
        return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}

    def init_state(self) -> dict:
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init, out_shardings=self.state_shardings)()

    def loss(self, params: Any, batch_BxL1: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, params)
        return cross_entropy(model(batch_BxL1[:, :-1]), batch_BxL1[:, 1:])

    def _eval_metrics(self, params: Any, batch_BxL1: jax.Array) -> dict:
        """Mean loss and next-token top-1 accuracy (the accuracy the tiny comparison's ROI uses)."""
        return token_metrics(nnx.merge(self.graphdef, params)(batch_BxL1[:, :-1]), batch_BxL1)

    def _train_step(self, state: dict, batch_BxL1: jax.Array) -> tuple[dict, dict]:
        loss, grads = jax.value_and_grad(self.loss)(state["params"], batch_BxL1)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "lr": schedule(self.cfg.train)(state["step"]), **group_norms(grads),
                   "param_norm": optax.tree.norm(params)}  # catches an update that overflowed
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def run_train_step(self, state: dict, batch_BxL1: jax.Array) -> tuple[dict, dict]:
        if self.offloader is not None:
            raise ValueError("with model.stem_offload the tables are in host memory: step with "
                             "Setup.offloader.step(state, batch, next_batch), which stages their rows")
        with jax.set_mesh(self.mesh):
            return self.train_step(state, batch_BxL1)

    def evaluate(self, params: Any, batches: Iterable[np.ndarray]) -> dict:
        """Mean loss and accuracy over full batches (every batch has the same number of tokens)."""
        out = []
        with jax.set_mesh(self.mesh):
            for local in batches:
                if self.offloader is not None:
                    out.append(self.offloader.eval_metrics(params, local))
                else:
                    out.append(self.eval_step(params, data.to_global(local, self.batch_sharding)))
        out = jax.device_get(out)
        return {k: float(np.mean([o[k] for o in out])) for k in ("loss", "acc")}

    def validate(self, params: Any, corpus: corpus_lib.Corpus) -> dict:
        """``val_loss`` / ``val_ppl`` / ``val_acc`` over ``train.eval_batches`` batches of the held-out split."""
        m, t = self.cfg.model, self.cfg.train
        batches = data.eval_batches(corpus.val, m.seq_len, t.batch_size, m.vocab_size, t.eval_batches,
                                    name=f"{corpus.path / 'val.bin'}")
        val = self.evaluate(params, batches)
        return {"val_loss": val["loss"], "val_ppl": math.exp(min(val["loss"], 50.0)), "val_acc": val["acc"]}


def describe_run(s: Setup, corpus: corpus_lib.Corpus | None = None) -> None:
    m = s.cfg.model
    log(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es); "
        f"mesh {sharding.describe(s.mesh)}")
    if s.stem_layers:
        rows = sharding.padded_rows(m.vocab_size, mesh=s.mesh)
        kind = "STEM" if m.ffn == "stem" else m.ffn
        log(f"{kind} layers ({m.stem_layers!r} of {m.n_layers}): {list(s.stem_layers)}"
            + ("" if m.ffn == "hash_moe" else f"; lookup={m.stem_lookup}"))
        if rows != m.vocab_size and m.ffn != "hash_moe":
            log(f"STEM tables padded from {m.vocab_size} to {rows} rows (multiple of "
                f"{sharding.ROW_PAD_MULTIPLE} and of {sharding.axis_size('stem_vocab', s.mesh)} vocab shards); "
                "padding rows are never addressed")
        if m.stem_offload:
            log("STEM tables and their row-wise AdamW state in host memory (pinned_host); each step moves only "
                "the batch's unique rows, prefetched during the previous step")
        elif s.sparse:
            log("STEM tables: row-wise AdamW over each batch's unique rows (train.stem_optimizer=sparse)")
    else:
        log("dense model (no STEM layers)")
    log(s.counts.describe())
    if corpus is not None:
        log(f"corpus {corpus.meta['source']}: {corpus.meta['train']['tokens']:,} train / "
            f"{corpus.meta['val']['tokens']:,} val tokens, tokenizer vocab {corpus.vocab_size} ({corpus.path})")


def open_corpus(cfg: Config) -> corpus_lib.Corpus:
    c = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, log=log)
    if c.vocab_size > cfg.model.vocab_size:
        raise data.TokenIdError(f"the tokenizer at {c.path} has {c.vocab_size} tokens but model.vocab_size="
                                f"{cfg.model.vocab_size}; ids >= {cfg.model.vocab_size} would be out of range")
    return c


def _check_finite(step: int, metrics: dict) -> dict:
    values = {k: float(v) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise FloatingPointError(f"non-finite metrics at step {step}: {values}")
    return values


def run_meta(s: Setup, corpus: corpus_lib.Corpus) -> dict:
    """What a checkpoint records about the run, to refuse resuming a different one."""
    rows = sharding.padded_rows(s.cfg.model.vocab_size, mesh=s.mesh) if s.stem_layers else None
    return {"config": to_dict(s.cfg), "tokenizer_sha256": checkpoint.fingerprint(corpus.tokenizer.to_str()),
            "table_rows": rows, "process_count": jax.process_count(), "mesh": dict(s.mesh.shape)}


def _resume_check(cfg: Config, meta: dict, notes: list[str]) -> Callable[[dict], None]:
    """A check that raises ConfigError for a checkpoint this run must not resume; allowed changes go
    to ``notes``."""
    def check(saved: dict) -> None:
        if "config" not in saved:
            raise ConfigError("the checkpoint was written by an older stem-jax without a config; "
                              "use a new --workdir")
        notes[:] = resume_changes(saved["config"], cfg)
        if saved["tokenizer_sha256"] != meta["tokenizer_sha256"]:
            raise ConfigError("the tokenizer differs from the one the checkpoint was trained with (the data "
                              "or its cache changed); use a new --workdir")
        if saved["process_count"] != meta["process_count"]:
            raise ConfigError(f"the checkpoint was written by {saved['process_count']} process(es), this run "
                              f"has {meta['process_count']}: the data-iterator state is per process")
        if saved["mesh"] != meta["mesh"]:
            notes.append(f"mesh: {saved['mesh']} -> {meta['mesh']} (resharded on restore)")
    return check


def _start(s: Setup, workdir: Path, meta: dict, batches) -> tuple[dict, int, Any]:
    """(state, step, manager-or-None): the newest restorable checkpoint of ``workdir``, or a fresh init.
    Checks run before anything in ``workdir`` is written."""
    notes: list[str] = []
    check = _resume_check(s.cfg, meta, notes)
    mngr, restored = None, None
    if checkpoint.directory(workdir).is_dir():
        mngr = checkpoint.manager(workdir, s.cfg.train.keep_checkpoints, create=False)
        restored = checkpoint.restore_latest(mngr, check, s.abstract_state, s.state_shardings, batches, log)
    if restored is None:
        if (workdir / "config.json").is_file():  # a run that died before its first checkpoint
            check({**meta, "config": json.loads((workdir / "config.json").read_text())})
        return s.init_state(), 0, mngr
    state, step = restored
    log(f"resumed from the checkpoint at step {step} ({checkpoint.directory(workdir) / str(step)})")
    for note in notes:
        log(f"  changed since that checkpoint: {note}")
    return state, step, mngr


def train_and_evaluate(cfg: Config, workdir: str | Path) -> dict:
    """Train ``cfg`` into ``workdir``, resuming from its newest checkpoint if there is one; returns the
    final metrics (``val_loss``, ``val_ppl``, ...) or, when stopped by a signal, ``{"stopped_at": step}``."""
    validate(cfg)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"--workdir {workdir} is a file, not a directory")
    mesh = sharding.make_mesh(cfg.mesh.shape)
    corpus = open_corpus(cfg)
    s = Setup(cfg, mesh)
    describe_run(s, corpus)
    t, m = cfg.train, cfg.model
    batches = iter(data.train_dataset(corpus.train, m.seq_len, t.batch_size, t.seed, m.vocab_size,
                                      name=f"{corpus.path / 'train.bin'}"))
    if s.offloader is not None:  # offload stages the next batch's rows while a step runs
        batches = data.Lookahead(batches)
    meta = run_meta(s, corpus)
    state, start, mngr = _start(s, workdir, meta, batches)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        corpus.tokenizer.save(str(workdir / "tokenizer.json"))
    writer = MetricsWriter(workdir, start)
    if start >= t.steps:
        final = next((r for r in reversed(writer.rows()) if "val_loss" in r and r["step"] == start), None)
        if final is None:
            final = s.validate(state["params"], corpus)
            writer.write(start, final)
        writer.close()
        log(f"already trained to step {start} (train.steps={t.steps}); nothing to do")
        return {k: v for k, v in final.items() if k != "step"}
    log(f"training steps {start + 1}..{t.steps} x {t.batch_size} x {m.seq_len} tokens; "
        f"{accounting.flops_per_token(m) / 1e6:,.1f} MFLOPs/token; checkpoints every "
        f"{t.checkpoint_every or t.steps} steps in {checkpoint.directory(workdir)}")
    if t.warmup_steps >= t.steps:
        log(f"note: train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}; warming up over the whole run")
    mngr = mngr or checkpoint.manager(workdir, t.keep_checkpoints)
    stop = StopRequests(mngr.reached_preemption)
    try:
        state, step = _loop(s, state, start, batches, mngr, meta, writer, stop)
    except FloatingPointError as e:
        mngr.wait_until_finished()
        last = mngr.latest_step()
        raise FloatingPointError(f"{e}; training stopped. " + (
            f"The newest checkpoint, step {last}, is intact" if last is not None else "No checkpoint was written")
            + " (lower train.lr or raise train.warmup_steps before resuming)") from None
    finally:
        stop.close()
        mngr.wait_until_finished()
    if step < t.steps:
        writer.close()
        mngr.close()
        log(f"stopped by {stop.signal or 'preemption'} after step {step}; checkpoint saved. "
            "Rerun the same command to resume.")
        return {"stopped_at": step}
    final = s.validate(state["params"], corpus)
    writer.write(t.steps, final)
    writer.close()
    mngr.close()
    log(f"done: val_loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.2f}); "
        f"checkpoint {checkpoint.directory(workdir) / str(t.steps)}")
    return final


def _loop(s: Setup, state: dict, start: int, batches, mngr, meta: dict, writer: MetricsWriter,
          stop: StopRequests) -> tuple[dict, int]:
    """Steps ``start+1 .. train.steps`` (or until a stop request); returns (state, last step done).
    One step stays in flight: a step's metrics are read while the next one runs, except at a save,
    where they are checked first so a non-finite state is never saved."""
    t, m = s.cfg.train, s.cfg.model
    tokens_per_step = t.batch_size * m.seq_len
    bar = tqdm(total=t.steps, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    clock = {"time": time.perf_counter(), "step": start}
    flops_per_token = accounting.flops_per_token(m)

    def finished(step: int, metrics: dict) -> None:
        values = _check_finite(step, jax.device_get(metrics))
        bar.update(1)
        now = time.perf_counter()
        if step == start + 1:  # keep compilation out of the throughput figures
            clock.update(time=now, step=step)
        if step % t.log_every == 0 or step == t.steps:
            values["tokens_per_sec"] = (step - clock["step"]) * tokens_per_step / max(now - clock["time"], 1e-9)
            clock.update(time=now, step=step)
            mfu = accounting.mfu(values["tokens_per_sec"], flops_per_token)
            if mfu is not None:  # known accelerators only
                values["mfu"] = mfu
            writer.write(step, values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:,.0f}")

    pending, step = None, start
    try:
        for step in range(start + 1, t.steps + 1):
            if s.offloader is not None:
                state, metrics = s.offloader.step(state, next(batches), batches.peek() if step < t.steps else None)
            else:
                state, metrics = s.run_train_step(state, data.to_global(next(batches), s.batch_sharding))
            if pending is not None:
                finished(*pending)
            pending = (step, metrics)
            stopping = stop.requested(step)
            if stopping or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
                finished(*pending)
                pending = None
                checkpoint.save(mngr, state, batches, {**meta, "step": step})
            if stopping:
                break
        if pending is not None:
            finished(*pending)
    finally:
        bar.close()
    return state, step
