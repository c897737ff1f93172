"""The training loop: sharded init or resume, the jitted train step (``steps.py``) with explicit shardings
and donated state, logging, periodic / final / on-signal checkpoints, and final validation."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from stem_jax import accounting, checkpoint, corpus as corpus_lib, data, lock, offload, sharding, steps
from stem_jax.config import Config, ConfigError, resume_changes, to_dict, validate
from stem_jax.preemption import StopRequests
from stem_jax.writer import MetricsWriter, describe_run, log


class Trainer:
    """The programs of a run over a ``StepContext``: init, the train step (on-device, or offloaded with the
    tables in host memory) and the eval step."""

    def __init__(self, ctx: steps.StepContext):
        self.ctx = ctx
        self.offloader = offload.Offloader(ctx) if ctx.cfg.model.stem_offload else None
        if self.offloader is None:
            self.train_step = steps.train_step_fn(ctx)
            self.eval_step = steps.eval_step_fn(ctx.graphdef, ctx.state_shardings["params"], ctx.batch_sharding,
                                                eos_id=ctx.eos_id, microbatches=ctx.cfg.train.microbatches,
                                                chunk=ctx.cfg.train.eval_loss_chunk)

    @classmethod
    def create(cls, cfg: Config, mesh: Mesh, eos_id: int | None = None) -> "Trainer":
        """``eos_id``: the corpus's end-of-document token, for ``data.packing``."""
        return cls(steps.make_context(cfg, mesh, eos_id=eos_id))

    def init_state(self) -> dict:
        return steps.init_state(self.ctx)

    def step(self, state: dict, local_BxL1: np.ndarray, next_BxL1: np.ndarray | None = None) -> tuple[dict, dict]:
        """One step on this process's rows of the batch; with offload, ``next_BxL1``'s rows are staged too."""
        if self.offloader is not None:
            return self.offloader.step(state, local_BxL1, next_BxL1)
        with jax.set_mesh(self.ctx.mesh):
            return self.train_step(state, data.to_global(local_BxL1, self.ctx.batch_sharding))

    def eval_metrics(self, params: nnx.State, local_BxL1: np.ndarray) -> dict:
        if self.offloader is not None:
            return self.offloader.eval_metrics(params, local_BxL1)
        with jax.set_mesh(self.ctx.mesh):
            return self.eval_step(params, data.to_global(local_BxL1, self.ctx.batch_sharding))

    def validate(self, params: nnx.State, corpus: corpus_lib.Corpus) -> dict:
        """``val_loss`` / ``val_ppl`` / ``val_acc`` over ``train.eval_batches`` batches of the held-out split."""
        batches = steps.validation_batches(self.ctx.cfg, corpus.val)
        return steps.validation(lambda b: self.eval_metrics(params, b), batches)


def _check_finite(step: int, metrics: dict) -> dict:
    values = {k: float(v) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise FloatingPointError(f"non-finite metrics at step {step}: {values}")
    return values


def _resume_check(cfg: Config, meta: dict, notes: list[str]) -> Callable[[dict], None]:
    """A check that raises ConfigError for a checkpoint this run must not resume; allowed changes go
    to ``notes``."""
    def check(saved: dict) -> None:
        if "config" not in saved:
            raise ConfigError("the checkpoint was written by an older stem-jax without a config; "
                              "use a new --workdir")
        notes[:] = resume_changes(saved["config"], cfg)
        _check_store(saved, meta, notes)
        if saved["tokenizer_sha256"] != meta["tokenizer_sha256"]:
            raise ConfigError("the tokenizer differs from the one the checkpoint was trained with (the data "
                              "or its cache changed); use a new --workdir")
        if saved["process_count"] != meta["process_count"]:
            raise ConfigError(f"the checkpoint was written by {saved['process_count']} process(es), this run "
                              f"has {meta['process_count']}: the data-iterator state is per process")
        if saved["mesh"] != meta["mesh"]:
            notes.append(f"mesh: {saved['mesh']} -> {meta['mesh']} (resharded on restore)")
    return check


def _check_store(saved: dict, meta: dict, notes: list[str]) -> None:
    """The run's tokens are the checkpoint's: its store's content fingerprint (not its path) must match. A
    checkpoint from before fingerprints were recorded keeps the old rule: the same ``data.store``."""
    moved = next((i for i, n in enumerate(notes) if n.startswith("data.store:")), None)
    old, new = saved.get("store_fingerprint"), meta.get("store_fingerprint")
    if old is None:
        if moved is not None:
            raise ConfigError(f"{notes[moved]}: the checkpoint records no store fingerprint to compare, so a "
                              f"resumed run must keep data.store (use a new --workdir to start over)")
        return
    if old != new:
        raise ConfigError(f"the token store {meta['store_path']} holds other tokens (content fingerprint {new}) "
                          f"than the store the checkpoint was trained on ({saved.get('store_path')}, fingerprint "
                          f"{old}): point data.store at that store, or use a new --workdir")
    if moved is not None:
        notes[moved] += f" (the same content, fingerprint {new})"


def _start(tr: Trainer, workdir: Path, meta: dict, batches) -> tuple[dict, int, Any]:
    """(state, step, manager-or-None): the newest restorable checkpoint of ``workdir``, or a fresh init.
    Checks run before anything in ``workdir`` is written."""
    notes: list[str] = []
    ctx = tr.ctx
    check = _resume_check(ctx.cfg, meta, notes)
    mngr, restored = None, None
    if checkpoint.directory(workdir).is_dir():
        mngr = checkpoint.manager(workdir, ctx.cfg.train.keep_checkpoints, create=False)
        restored = checkpoint.restore_latest(mngr, check, ctx.abstract_state, ctx.state_shardings, batches, log,
                                             other_layout=lambda: steps.other_layout(ctx))
    if restored is None:
        if (workdir / "config.json").is_file():  # a run that died before its first checkpoint
            check({**meta, "config": json.loads((workdir / "config.json").read_text())})
        return tr.init_state(), 0, mngr
    state, step = restored
    log(f"resumed from the checkpoint at step {step} ({checkpoint.directory(workdir) / str(step)})")
    for note in notes:
        log(f"  changed since that checkpoint: {note}")
    return state, step, mngr


def train_and_evaluate(cfg: Config, workdir: str | Path) -> dict:
    """Train ``cfg`` into ``workdir``, resuming from its newest checkpoint if there is one; returns the
    final metrics (``val_loss``, ``val_ppl``, ...) or, when stopped by a signal, ``{"stopped_at": step}``.

    Preflight: the config, the mesh, the corpus (tokenizer size, a train window and a validation batch at this
    shape) and the step context (batch vs mesh, microbatches, attention kernel) are all checked before the
    workdir is created or locked; a run then holds the workdir's lock (``lock.py``) until it ends."""
    validate(cfg)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"--workdir {workdir} is a file, not a directory")
    mesh = sharding.make_mesh(cfg.mesh.shape)
    corpus = data.open_corpus(cfg, log)
    data.check_splits(cfg, corpus)
    tr = Trainer.create(cfg, mesh, eos_id=corpus.eos_id if cfg.data.packing else None)
    describe_run(cfg, mesh, tr.ctx.counts, corpus)
    if tr.ctx.eos_id is not None:
        log(f"data.packing: attention stays within documents, which end at token {tr.ctx.eos_id} "
            f"({corpus.tokenizer.id_to_token(tr.ctx.eos_id)!r})")
    created = not workdir.exists()
    try:
        with lock.hold(workdir, "train.py", log):
            return _train(tr, corpus, workdir)
    except BaseException:
        if created and jax.process_index() == 0:
            _remove_if_empty(workdir)  # a run that failed before writing anything leaves no workdir
        raise


def _remove_if_empty(workdir: Path) -> None:
    if workdir.is_dir() and all(p.name == lock.LOCK_FILE for p in workdir.iterdir()):
        shutil.rmtree(workdir, ignore_errors=True)


def _write_if_changed(path: Path, text: str) -> None:
    """Replace ``path`` atomically, and only when its content changes (a resume leaves it untouched)."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _train(tr: Trainer, corpus: corpus_lib.Corpus, workdir: Path) -> dict:
    cfg, mesh = tr.ctx.cfg, tr.ctx.mesh
    t, m = cfg.train, cfg.model
    batches = iter(data.train_dataset(corpus.train, m.seq_len, t.batch_size, t.seed, m.vocab_size,
                                      name=corpus.train.name))
    if tr.offloader is not None:  # offload stages the next batch's rows right after a step
        batches = data.Lookahead(batches)
    meta = checkpoint.run_meta(cfg, mesh, checkpoint.fingerprint(corpus.tokenizer.to_str()),
                               store_fingerprint=corpus.fingerprint, store_path=str(corpus.path))
    state, start, mngr = _start(tr, workdir, meta, batches)
    if jax.process_index() == 0:
        _write_if_changed(workdir / "config.json", json.dumps(to_dict(cfg), indent=1))
        _write_if_changed(workdir / "tokenizer.json", corpus.tokenizer.to_str(pretty=True))
    writer = MetricsWriter(workdir, start)
    if start >= t.steps:
        final = next((r for r in reversed(writer.rows()) if "val_loss" in r and r["step"] == start), None)
        if final is None:
            final = tr.validate(state["params"], corpus)
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
        state, step = _loop(tr, state, start, batches, mngr, meta, writer, stop)
    except (FloatingPointError, checkpoint.CheckpointError, corpus_lib.StoreError) as e:
        writer.close()
        raise _stopped(e, mngr) from None
    except BaseException:
        checkpoint.last_good(mngr)  # let a save in flight land before the error ends the process
        raise
    finally:
        stop.close()
    if step < t.steps:
        writer.close()
        mngr.close()
        log(f"stopped by {stop.signal or 'preemption'} after step {step}; checkpoint saved. "
            "Rerun the same command to resume.")
        return {"stopped_at": step}
    try:
        final = tr.validate(state["params"], corpus)
    except corpus_lib.StoreError as e:  # the store changed under the run after the last step was saved
        writer.close()
        raise _stopped(e, mngr) from None
    writer.write(t.steps, final)
    writer.close()
    mngr.close()
    log(f"done: val_loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.2f}); "
        f"checkpoint {checkpoint.directory(workdir) / str(t.steps)}")
    return final


def _stopped(e: Exception, mngr) -> Exception:
    """``e`` (of its own type) completed with the newest intact checkpoint and what to do before resuming."""
    last = checkpoint.last_good(mngr)
    kept = f"The newest checkpoint, step {last}, is intact" if last is not None else "No checkpoint was written"
    if isinstance(e, FloatingPointError):
        hint = " (lower train.lr or raise train.warmup_steps before resuming)"
    elif isinstance(e, checkpoint.CheckpointError):
        hint = "; free space or fix the checkpoint directory, then rerun the same command to resume"
    else:
        hint = "; restore the store (or repair it with data_prep --repair), then rerun the same command to resume"
    return type(e)(f"{e}; training stopped. {kept}{hint}")


def _loop(tr: Trainer, state: dict, start: int, batches, mngr, meta: dict, writer: MetricsWriter,
          stop: StopRequests) -> tuple[dict, int]:
    """Steps ``start+1 .. train.steps`` (or until a stop request); returns (state, last step done).
    One step stays in flight: a step's metrics are read while the next one runs, except at a save,
    where they are checked first so a non-finite state is never saved."""
    t, m = tr.ctx.cfg.train, tr.ctx.cfg.model
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

    pending, step, saved = None, start, None
    try:
        for step in range(start + 1, t.steps + 1):
            peek = tr.offloader is not None and step < t.steps
            state, metrics = tr.step(state, next(batches), batches.peek() if peek else None)
            if pending is not None:
                finished(*pending)
            pending = (step, metrics)
            checkpoint.check_saves(mngr, saved)  # a background save that failed stops the run now
            stopping = stop.requested(step)
            if stopping or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
                finished(*pending)
                pending = None
                checkpoint.check_saves(mngr, saved, wait=True)  # the previous save, before this one starts
                saved = checkpoint.save(mngr, state, batches, {**meta, "step": step})
            if stopping:
                break
        if pending is not None:
            finished(*pending)
        checkpoint.check_saves(mngr, saved, wait=True)
    finally:
        bar.close()
    return state, step
