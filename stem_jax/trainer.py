"""The training loop: sharded init, a jitted train step with explicit shardings and donated state,
logging, final validation and an orbax checkpoint."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from stem_jax import accounting, checkpoint, corpus as corpus_lib, data, sharding
from stem_jax.config import Config, to_dict, validate
from stem_jax.model import Transformer, cross_entropy
from stem_jax.optim import group_norms, make_optimizer, schedule
from stem_jax.writer import MetricsWriter


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class Setup:
    """Everything derived from a config and a mesh: model graph, optimizer, shardings, jitted steps."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.tx = make_optimizer(cfg.train)
        with jax.set_mesh(mesh):
            abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
            self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
            self.abstract_state = jax.eval_shape(self._init)
        self.stem_layers = abstract_model.stem_layers
        n_dff = sharding.axis_size("stem_dff", mesh)
        if self.stem_layers and cfg.model.d_ff % n_dff:
            raise sharding.MeshError(f"model.d_ff={cfg.model.d_ff} is not divisible by the {n_dff} shards of the "
                                     f"STEM table columns (mesh axes {sharding.mesh_axes('stem_dff')})")
        self.state_shardings = sharding.tree_shardings(mesh, self.abstract_state)
        self.batch_sharding = sharding.batch_sharding(mesh, cfg.train.batch_size)
        self.counts = accounting.count_params(abstract_params, cfg.model)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, NamedSharding(mesh, P())),
                                  donate_argnums=0)
        self.eval_step = jax.jit(self.loss,
                                 in_shardings=(self.state_shardings["params"], self.batch_sharding),
                                 out_shardings=NamedSharding(mesh, P()))

    def _init(self) -> dict:
        model = Transformer(self.cfg.model, rngs=nnx.Rngs(self.cfg.train.seed))
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def init_state(self) -> dict:
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init, out_shardings=self.state_shardings)()

    def loss(self, params: Any, batch_BxL1: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, params)
        return cross_entropy(model(batch_BxL1[:, :-1]), batch_BxL1[:, 1:])

    def _train_step(self, state: dict, batch_BxL1: jax.Array) -> tuple[dict, dict]:
        loss, grads = jax.value_and_grad(self.loss)(state["params"], batch_BxL1)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "lr": schedule(self.cfg.train)(state["step"]), **group_norms(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def run_train_step(self, state: dict, batch_BxL1: jax.Array) -> tuple[dict, dict]:
        with jax.set_mesh(self.mesh):
            return self.train_step(state, batch_BxL1)

    def evaluate(self, params: Any, batches: Iterable[np.ndarray]) -> float:
        """Mean loss over full batches (every batch has the same number of tokens)."""
        losses = []
        with jax.set_mesh(self.mesh):
            for local in batches:
                losses.append(self.eval_step(params, data.to_global(local, self.batch_sharding)))
        return float(np.mean(jax.device_get(losses)))

    def validate(self, params: Any, corpus: corpus_lib.Corpus) -> dict:
        """``val_loss`` / ``val_ppl`` over ``train.eval_batches`` batches of the held-out split."""
        m, t = self.cfg.model, self.cfg.train
        batches = data.eval_batches(corpus.val, m.seq_len, t.batch_size, m.vocab_size, t.eval_batches,
                                    name=f"{corpus.path / 'val.bin'}")
        val_loss = self.evaluate(params, batches)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def describe_run(s: Setup, corpus: corpus_lib.Corpus | None = None) -> None:
    m = s.cfg.model
    log(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es); "
        f"mesh {sharding.describe(s.mesh)}")
    if s.stem_layers:
        rows = sharding.padded_rows(m.vocab_size, mesh=s.mesh)
        log(f"STEM layers ({m.stem_layers!r} of {m.n_layers}): {list(s.stem_layers)}; lookup={m.stem_lookup}")
        if rows != m.vocab_size:
            log(f"STEM tables padded from {m.vocab_size} to {rows} rows (multiple of "
                f"{sharding.ROW_PAD_MULTIPLE} and of {sharding.axis_size('stem_vocab', s.mesh)} vocab shards); "
                "padding rows are never addressed")
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


def train_and_evaluate(cfg: Config, workdir: str | Path) -> dict:
    """Train ``cfg`` into ``workdir``; returns the final metrics (``val_loss``, ``val_ppl``, ...)."""
    validate(cfg)
    workdir = Path(workdir)
    existing = checkpoint.latest_step(workdir)
    if existing is not None:  # never overwrite a user's run
        raise FileExistsError(f"{workdir} already holds a checkpoint (step {existing}); choose a new --workdir")
    if (workdir / "metrics.jsonl").exists():
        raise FileExistsError(f"{workdir} holds metrics of an earlier run that did not finish; choose a new "
                              "--workdir or remove that one")
    mesh = sharding.make_mesh(cfg.mesh.shape)
    corpus = open_corpus(cfg)
    s = Setup(cfg, mesh)
    describe_run(s, corpus)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        corpus.tokenizer.save(str(workdir / "tokenizer.json"))
    t, m = cfg.train, cfg.model
    tokens_per_step = t.batch_size * m.seq_len
    log(f"training {t.steps} steps x {t.batch_size} x {m.seq_len} tokens; "
        f"{accounting.flops_per_token(m) / 1e6:,.1f} MFLOPs/token")

    if t.warmup_steps >= t.steps:
        log(f"note: train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}; warming up over the whole run")
    state = s.init_state()
    batches = iter(data.train_dataset(corpus.train, m.seq_len, t.batch_size, t.seed, m.vocab_size,
                                      name=f"{corpus.path / 'train.bin'}"))
    writer = MetricsWriter(workdir)
    bar = tqdm(total=t.steps, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    clock = {"time": time.perf_counter(), "step": 0}

    def finished(step: int, metrics: dict) -> None:
        """Bookkeeping for a step the device has completed: check, count, log."""
        values = _check_finite(step, jax.device_get(metrics))
        bar.update(1)
        now = time.perf_counter()
        if step == 1:  # keep compilation out of the throughput figures
            clock.update(time=now, step=1)
        if step % t.log_every == 0 or step == t.steps:
            values["tokens_per_sec"] = (step - clock["step"]) * tokens_per_step / max(now - clock["time"], 1e-9)
            clock.update(time=now, step=step)
            writer.write(step, values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:,.0f}")

    previous = None
    for step in range(1, t.steps + 1):
        state, metrics = s.run_train_step(state, data.to_global(next(batches), s.batch_sharding))
        if previous is not None:  # one step in flight: the finished one is read while this one runs
            finished(step - 1, previous)
        previous = metrics
    finished(t.steps, previous)
    bar.close()

    final = s.validate(state["params"], corpus)
    writer.write(t.steps, final)
    writer.close()
    mngr = checkpoint.manager(workdir)
    checkpoint.save(mngr, state)
    mngr.wait_until_finished()
    mngr.close()
    log(f"done: val_loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.2f}); "
        f"checkpoint {workdir / 'checkpoints'}")
    return final
