"""Open a training workdir for the tools (evaluation, scoring, sampling, editing, export, analysis): its config,
its tokenizer and a checkpoint's parameters on a mesh of the devices present now. No optimizer is built and
no train step is compiled: the model's shapes come from ``nnx.eval_shape`` and its shardings from the rules in
``sharding.py``, so a checkpoint restores onto any mesh. The newest checkpoint that reads is used, with the
model saved in it. Also the one writer of new params-only workdirs (imports, conversions, injections), under
the workdir lock."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tokenizers import Tokenizer

from stem_jax import checkpoint, corpus, lock, offload, scanning, sharding
from stem_jax.config import Config, from_dict, to_dict, validate
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


def eos_id(cfg: Config, tokenizer: Tokenizer, workdir: str | Path) -> int:
    """The run's end-of-document id: its ``data.eos_token`` in its tokenizer, resolved as training resolved it
    (``corpus.eos_id``); the tools stop generation at it and condition on it as the start of a document."""
    return corpus.eos_id(tokenizer, cfg.data.eos_token, f"the tokenizer of {workdir}")


def load_eos_id(workdir: str | Path, tokenizer: Tokenizer | None = None) -> int:
    """``eos_id`` from the workdir's config.json and (unless given) its tokenizer."""
    return eos_id(load_run_config(workdir), tokenizer or load_tokenizer(workdir), workdir)


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

    def eos_id(self) -> int:
        return eos_id(self.cfg, self.require_tokenizer(), self.workdir)


def tool_mesh(mesh_shape: Sequence[int] | str, batch_size: int,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a tool runs on: ``auto`` puts on the data axis the most devices whose count divides
    ``batch_size`` (so any device count works); explicit sizes are checked with a one-line MeshError."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(mesh_shape, str):
        mesh_shape = sharding.parse_mesh(mesh_shape)
    if mesh_shape == "auto":
        mesh_shape, n = sharding.auto_mesh_shape(batch_size, len(devices))
        devices = devices[:n]
    return sharding.make_mesh(mesh_shape, devices=devices)


def _model_changes(json_cfg: Config, saved: Config) -> list[str]:
    a, b = dataclasses.asdict(json_cfg.model), dataclasses.asdict(saved.model)
    return [f"model.{k}: {a[k]!r} in config.json, {b[k]!r} in the checkpoint" for k in a if a[k] != b[k]]


def restore(workdir: str | Path, mesh_shape: Sequence[int] | str = "auto", step: int | None = None, *,
            devices: Sequence[jax.Device] | None = None, tables_on_host: bool = False,
            cfg: Config | None = None, log: Callable[[str], None] = print) -> Run:
    """The newest readable (or exactly ``step``) checkpoint of ``workdir`` on a ``mesh_shape`` mesh (``auto``:
    see ``tool_mesh``) over ``devices`` (default: all). An unreadable newer checkpoint is skipped with a
    one-line warning. The model is the one saved with the checkpoint; a ``config.json`` that disagrees is
    reported. ``tables_on_host`` keeps the STEM tables in host memory (``pinned_host``); ``cfg`` overrides
    the workdir's config.json (e.g. a different evaluation batch). Parameters come in the per-layer layout
    (``blocks[i]``) whatever layout the run trained in: a scanned checkpoint is converted on the devices."""
    workdir = Path(workdir)
    json_cfg = cfg or load_run_config(workdir)
    mesh = tool_mesh(mesh_shape, json_cfg.train.batch_size, devices)  # cfg.mesh stays the training run's
    if tables_on_host:
        offload.check_supported(mesh)
    chosen = {}

    def build(step: int, meta: dict):
        run_cfg = json_cfg
        if isinstance(meta.get("config"), dict):
            saved = validate(from_dict(meta["config"]))
            saved.model.stem_offload = False
            changes = _model_changes(json_cfg, saved)
            if changes:
                log(f"warning: {workdir / 'config.json'} does not match checkpoint {step} ({'; '.join(changes)}); "
                    "using the checkpoint's model")
                run_cfg = dataclasses.replace(json_cfg, model=saved.model)
        chosen["model"] = abstract_model(run_cfg, mesh, tables_on_host)  # in the layout it was saved in
        chosen["cfg"] = scanning.with_scan_layers(run_cfg, False)
        return chosen["model"][1:]

    params, step, _ = checkpoint.restore_params(workdir, build, step, log)
    graphdef = chosen["model"][0]
    if scanning.is_scanned(chosen["model"][1]):
        graphdef, abstract, shardings = abstract_model(chosen["cfg"], mesh, tables_on_host)
        params = scanning.convert_on_device(params, abstract, shardings, chosen["cfg"].model, to_scanned=False)
    return Run(workdir, chosen["cfg"], mesh, graphdef, params, step)


# --- writing a params-only workdir (imports, conversions, injections) ----------------------------------

ParamPath = tuple  # a path in the params pure dict, e.g. ("blocks", 1, "ffn", "w_gate")

ONE_DEVICE = (1, 1, 1)  # conversion is host work, and any mesh restores the result later


def one_device_mesh():
    return sharding.make_mesh(ONE_DEVICE, devices=jax.devices()[:1])


def flat_params(tree) -> dict[ParamPath, object]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_params(workdir: str | Path, step: int | None = None) -> tuple[Config, dict[ParamPath, np.ndarray], int]:
    """(config, {path: float32 host array}, step) of a workdir's latest (or given) checkpoint; STEM tables
    by token (row t is token t's), not in their stored layout."""
    run = restore(workdir, ONE_DEVICE, step, devices=jax.devices()[:1])
    arrays = {p: np.asarray(jax.device_get(a)) for p, a in flat_params(nnx.to_pure_dict(run.params)).items()}
    return run.cfg, {p: sharding.table_by_token(a, run.cfg.model) if p[-1] == "table" else a
                     for p, a in arrays.items()}, run.step


def check_new_workdir(workdir: Path) -> None:
    for existing in (checkpoint.directory(workdir), workdir / "config.json"):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists; refusing to overwrite it (choose a new workdir)")


def _tokenizer_sha(path: Path) -> str | None:
    """The fingerprint train.py records (of the canonical string, not the file's formatting)."""
    try:
        return checkpoint.fingerprint(Tokenizer.from_file(str(path)).to_str())
    except Exception:  # noqa: BLE001 - not a tokenizers file (e.g. a sentencepiece-only HF repo)
        return None


def _remove_new(workdir: Path, keep: set[str]) -> None:
    """Undo a failed write: remove what ``workdir`` holds beyond ``keep``."""
    for name in set(os.listdir(workdir)) - keep:
        p = workdir / name
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def write_workdir(workdir: str | Path, cfg: Config, arrays: dict[ParamPath, np.ndarray], tokenizer: Path | None,
                  source: str, command: str = "stem_jax write_workdir",
                  extra_files: dict[str, str] | None = None) -> Path:
    """A workdir that ``eval.py`` and ``checkpoint.restore_params`` read: config.json, tokenizer.json and a
    step-0 checkpoint holding ``params`` and ``meta`` only (no optimizer or data state, so train.py cannot
    resume it), plus ``extra_files`` (name -> text). ``arrays`` holds every parameter, STEM tables at
    [vocab, d_ff].

    Checks come first, so a refused write creates nothing; the write itself holds the workdir's lock
    (``command`` names the holder), and a failed one removes what it wrote (the directory too, if it made it)."""
    workdir = Path(workdir)
    validate(cfg)
    # ``arrays`` are per layer, and so is the written checkpoint; a run that resumes it may scan its layers.
    cfg = scanning.with_scan_layers(cfg, False)
    check_new_workdir(workdir)
    mesh = one_device_mesh()
    _, abstract, shardings = abstract_model(cfg, mesh)
    extra = arrays.keys() - flat_params(nnx.to_pure_dict(abstract)).keys()
    if extra:
        raise ValueError(f"parameters {sorted(extra)} are not in the model")

    def fill(path, a: jax.ShapeDtypeStruct) -> np.ndarray:
        p = tuple(k.key for k in path)
        w = arrays.get(p)
        if w is not None and p[-1] == "table":  # [vocab, d_ff] by token -> padded rows in the stored layout
            w = sharding.table_to_stored(np.pad(w, ((0, a.shape[0] - w.shape[0]), (0, 0))), cfg.model)
        if w is None or w.shape != a.shape:
            raise ValueError(f"parameter {p}: the model needs shape {a.shape}, got {None if w is None else w.shape}")
        return w.astype(np.float32)

    nnx.replace_by_pure_dict(abstract, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract)))
    params = jax.device_put(abstract, shardings)
    existed, created = workdir.exists(), False
    try:
        with lock.hold(workdir, command):
            before = set(os.listdir(workdir))
            created = not existed and before == {lock.LOCK_FILE}  # made by the lock just now
            try:
                check_new_workdir(workdir)  # again: another writer may have filled it since the check above
                (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
                tok_sha = None
                if tokenizer is not None and tokenizer.is_file():
                    shutil.copyfile(tokenizer, workdir / "tokenizer.json")
                    tok_sha = _tokenizer_sha(workdir / "tokenizer.json")
                checkpoint.save_params(workdir, params, checkpoint.run_meta(cfg, mesh, tok_sha, step=0,
                                                                            params_only=True, source=source))
                for name, text in (extra_files or {}).items():
                    (workdir / name).write_text(text)
            except BaseException:
                _remove_new(workdir, set() if created else before)  # the lock file too when the lock made it
                raise
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty: another writer has come meanwhile
                workdir.rmdir()
        raise
    return workdir
