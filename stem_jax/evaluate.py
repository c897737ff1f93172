"""Evaluate a trained workdir: restore the latest checkpoint onto the current devices and write eval.json."""
from __future__ import annotations

import json
from pathlib import Path

import jax

from stem_jax import checkpoint, sharding
from stem_jax.config import Config, from_dict, validate
from stem_jax.trainer import Setup, describe_run, log, open_corpus


def load_run_config(workdir: str | Path) -> Config:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a stem-jax training workdir?")
    return validate(from_dict(json.loads(path.read_text())))


def evaluate_workdir(workdir: str | Path, mesh_shape=(-1, 1, 1), step: int | None = None,
                     eval_batches: int | None = None) -> dict:
    """Validation loss / perplexity of the latest (or ``step``) checkpoint; writes ``<workdir>/eval.json``.

    The checkpoint is restored onto ``mesh_shape`` over the devices present now, whatever mesh trained it.
    """
    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
    if eval_batches is not None:
        cfg.train.eval_batches = eval_batches
    s = Setup(cfg, sharding.make_mesh(cfg.mesh.shape))
    corpus = open_corpus(cfg)
    describe_run(s, corpus)
    params, step = checkpoint.restore_params(workdir, s.abstract_state["params"], s.state_shardings["params"], step)
    result = {"step": step, **s.validate(params, corpus), "val_tokens": len(corpus.val),
              "eval_batches": cfg.train.eval_batches}
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"step {step}: val_loss {result['val_loss']:.4f}, val_ppl {result['val_ppl']:.2f} "
        f"-> {workdir / 'eval.json'}")
    return result
