"""Open a training workdir for the tools (evaluation, scoring, sampling, editing, export, analysis): its config,
its tokenizer and a checkpoint's parameters on a mesh of the devices present now. No optimizer is built and
no train step is compiled: the model's shapes come from ``nnx.eval_shape`` and its shardings from the rules in
``sharding.py``, so a checkpoint restores onto any mesh."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh
from tokenizers import Tokenizer

from stem_jax import checkpoint, offload, sharding
from stem_jax.config import Config, from_dict, validate
from stem_jax.model import Transformer


def load_run_config(workdir: str | Path) -> Config:
    """The workdir's ``config.json``, validated. Tools keep the STEM tables on device; the sampler moves them
    to host memory on request (``restore(..., tables_on_host=True)``)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {str(workdir)!r} a stem-jax training workdir?")
    cfg = validate(from_dict(json.loads(path.read_text())))
    cfg.model.stem_offload = False
    return cfg


def load_tokenizer(workdir: str | Path) -> Tokenizer:
    """The tokenizer train.py saved in the workdir."""
    path = Path(workdir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the workdir has no tokenizer (written by train.py)")
    return Tokenizer.from_file(str(path))


def check_tokenizer(workdir: str | Path, step: int, tokenizer: Tokenizer) -> None:
    """The checkpoint was trained with this tokenizer (scores with another one would be meaningless)."""
    saved = checkpoint.read_step_meta(workdir, step).get("tokenizer_sha256")
    mine = checkpoint.fingerprint(tokenizer.to_str())
    if saved and saved != mine:
        raise ValueError(f"the tokenizer does not match checkpoint {step} of {workdir} (fingerprint {mine} vs "
                         f"{saved}): was {Path(workdir) / 'tokenizer.json'} replaced or the data config changed?")


def abstract_model(cfg: Config, mesh: Mesh, tables_on_host: bool = False) -> tuple[Any, nnx.State, Any]:
    """``(graphdef, abstract params, param shardings)`` of ``cfg.model`` on ``mesh``, without allocating."""
    sharding.check_model_fits(cfg.model, mesh)
    with jax.set_mesh(mesh):  # table rows are padded to the mesh's vocab shards
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = sharding.tree_shardings(mesh, params)
    return graphdef, params, sharding.tables_on_host(shardings) if tables_on_host else shardings


@dataclasses.dataclass
class Run:
    """A restored checkpoint: ``model()`` merges graph and parameters; the tokenizer is read on first use
    (``require_tokenizer``) unless one is set."""
    workdir: Path
    cfg: Config
    mesh: Mesh
    graphdef: Any
    params: nnx.State
    step: int
    tokenizer: Tokenizer | None = None

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.workdir)
        return self.tokenizer


def restore(workdir: str | Path, mesh_shape: Sequence[int] = (-1, 1, 1), step: int | None = None, *,
            devices: Sequence[jax.Device] | None = None, tables_on_host: bool = False,
            cfg: Config | None = None) -> Run:
    """The latest (or ``step``) checkpoint of ``workdir`` on a ``mesh_shape`` mesh over ``devices`` (default:
    all). ``tables_on_host`` keeps the STEM tables in host memory (``pinned_host``); ``cfg`` overrides the
    workdir's config.json (e.g. a different evaluation batch)."""
    workdir = Path(workdir)
    cfg = cfg or load_run_config(workdir)
    mesh = sharding.make_mesh(mesh_shape, devices=devices)  # cfg.mesh stays the training run's
    if tables_on_host:
        offload.check_supported(mesh)
    graphdef, abstract, shardings = abstract_model(cfg, mesh, tables_on_host)
    params, step = checkpoint.restore_params(workdir, abstract, shardings, step)
    return Run(workdir, cfg, mesh, graphdef, params, step)
