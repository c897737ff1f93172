"""orbax checkpoints under ``<workdir>/checkpoints``, one directory per step holding four items:
``params`` and ``opt_state`` (sharded arrays), ``data`` (the grain iterator position of every process)
and ``meta`` (step, resolved config, tokenizer fingerprint, table rows, process count).

Saves are async and atomic (orbax writes a temporary directory and renames it), and older steps are
deleted only after a newer one has landed. Restore targets always carry the *current* mesh's shardings,
so any checkpoint restores onto any mesh; STEM tables whose padded row count differs between meshes are
padded or cut at the end, where only all-zero padding rows live."""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from stem_jax import sharding
from stem_jax.config import Config, ConfigError, to_dict


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be restored."""


def directory(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def manager(workdir: str | Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory(workdir), options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=True,
        cleanup_tmp_directories=True))  # leftovers of a save that was killed


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_meta(cfg: Config, mesh, tokenizer_sha256: str | None, **extra) -> dict:
    """What a checkpoint records about its run: the resolved config, the tokenizer's fingerprint, the STEM
    tables' padded row count (None without tables), the process count and the mesh; plus ``extra``."""
    tables = cfg.model.ffn not in ("dense", "hash_moe")
    rows = sharding.padded_rows(cfg.model.vocab_size, mesh=mesh) if tables else None
    return {"config": to_dict(cfg), "tokenizer_sha256": tokenizer_sha256, "table_rows": rows,
            "process_count": jax.process_count(), "mesh": dict(mesh.shape), **extra}


SPACE_MARGIN = 1.1  # orbax's metadata and the OCDBT index on top of the arrays' bytes


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def save(mngr: ocp.CheckpointManager, state: dict, data_iter: Any, meta: dict) -> int:
    """Start an async save of ``state`` at its step; returns the step. Device buffers are copied to host
    before this returns, so ``state`` may be donated right after.

    A save that cannot fit the free space, or that fails to start, raises CheckpointError before anything of
    it is written; a failure in the background is raised by ``check_saves`` at the next step."""
    step = int(meta["step"])
    where = Path(mngr.directory)
    need = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")) * SPACE_MARGIN
    free = free_bytes(where)
    if free < need:
        raise CheckpointError(f"checkpoint step {step} needs about {need / 2**20:,.1f} MiB in {where}, but only "
                              f"{free / 2**20:,.1f} MiB are free")
    try:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(state["params"]),
            opt_state=ocp.args.PyTreeSave(state["opt_state"]),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; the user needs what, where and why
        raise CheckpointError(f"saving checkpoint step {step} to {where} failed: {type(e).__name__}: "
                              f"{_short(e, 200)}") from e
    return step


def check_saves(mngr: ocp.CheckpointManager, step: int | None, wait: bool = False) -> None:
    """Raise CheckpointError if the background save of ``step`` (the newest one started) failed; ``wait``
    first waits for it to finish."""
    try:
        if wait or not mngr.is_saving_in_progress():  # joining an ended save raises what it raised
            mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"saving checkpoint step {step} to {mngr.directory} failed: {type(e).__name__}: "
                              f"{_short(e, 200)}") from e


def last_good(mngr: ocp.CheckpointManager) -> int | None:
    """The newest committed step after any save in flight has ended (successfully or not)."""
    try:
        mngr.wait_until_finished()
    except Exception:  # noqa: BLE001 - the failure is being reported already
        pass
    mngr.reload()
    return mngr.latest_step()


def save_params(workdir: str | Path, params: Any, meta: dict) -> None:
    """A params-only checkpoint at ``meta["step"]`` (imports, conversions, injections): no optimizer or data
    state, so train.py cannot resume it, but every tool reads it."""
    mngr = manager(workdir)
    try:
        mngr.save(int(meta["step"]), args=ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                                             meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    finally:
        mngr.close()


def restore_target(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the new shardings (never the saved layout by accident)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _restore_args(abstract: Any, shardings: Any, resize_tables: bool) -> ocp.args.PyTreeRestore:
    """Restore onto the new shardings; only STEM tables (and their optimizer moments) may change rows."""
    def one(path, a, s):
        return ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape, dtype=a.dtype,
                                    strict=not (resize_tables and sharding.is_table_path(path)))
    return ocp.args.PyTreeRestore(item=restore_target(abstract, shardings),
                                  restore_args=jax.tree_util.tree_map_with_path(one, abstract, shardings))


def _table_rows(abstract_params: Any) -> int | None:
    rows = [a.shape[0] for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0] if sharding.is_table_path(p)]
    return rows[0] if rows else None


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def read_step_meta(workdir: str | Path, step: int) -> dict:
    """The ``meta`` item of checkpoint ``step`` of ``workdir``."""
    mngr = manager(workdir, create=False)
    try:
        return read_meta(mngr, step)
    finally:
        mngr.close()


def restore_state(mngr: ocp.CheckpointManager, step: int, meta: dict, abstract_state: dict,
                  shardings: dict, data_iter: Any) -> dict:
    """The train state of ``step`` on the new shardings; ``data_iter`` is moved to the saved position."""
    rows = _table_rows(abstract_state["params"])
    resize = rows is not None and meta.get("table_rows") not in (None, rows)
    if resize and meta["table_rows"] < meta["config"]["model"]["vocab_size"]:
        raise CheckpointError(f"step {step}: saved tables have {meta['table_rows']} rows, fewer than the vocab")
    out = mngr.restore(step, args=ocp.args.Composite(
        params=_restore_args(abstract_state["params"], shardings["params"], resize),
        opt_state=_restore_args(abstract_state["opt_state"], shardings["opt_state"], resize),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    step_array = jax.device_put(np.asarray(step, np.int32), shardings["step"])
    return {"params": out["params"], "opt_state": out["opt_state"], "step": step_array}


def restore_latest(mngr: ocp.CheckpointManager, check: Callable[[dict], None], abstract_state: dict,
                   shardings: dict, data_iter: Any, log: Callable[[str], None]) -> tuple[dict, int] | None:
    """(state, step) of the newest checkpoint that restores, or None when there is none.

    ``check(meta)`` raises for a checkpoint this run must not resume (a different model); that error
    propagates. A checkpoint that fails to read (a kill during a save on a filesystem without atomic
    rename, truncated or corrupted files) is skipped with a warning for the next older one; skipped
    newer ones are moved to ``checkpoints_unreadable/`` (kept, never deleted) so their step numbers can
    be written again. If none restores, nothing is moved and CheckpointError names every failure."""
    def load(step: int, meta: dict, _) -> dict:
        return restore_state(mngr, step, meta, abstract_state, shardings, data_iter)

    steps = sorted(mngr.all_steps(), reverse=True)
    state, step, _, failures = newest_readable(mngr, steps, lambda s, meta: check(meta), load)
    if step is not None:
        for bad, err in failures:
            log(f"WARNING: checkpoint step {bad} is unreadable ({type(err).__name__}: {_short(err)}); "
                f"resuming from step {step}")
        _set_aside(mngr, [bad for bad, _ in failures])
        return state, step
    if failures:
        raise CheckpointError(f"no checkpoint under {mngr.directory} can be restored: " + "; ".join(
            f"step {s}: {type(e).__name__}: {_short(e)}" for s, e in failures))
    return None


def newest_readable(mngr: ocp.CheckpointManager, steps: list[int], prepare: Callable[[int, dict], Any],
                    load: Callable[[int, dict, Any], Any]) -> tuple[Any, int | None, dict | None, list]:
    """``(load(step, meta, prepare(step, meta)), step, meta, failures)`` for the first of ``steps`` whose meta
    and arrays read, with ``failures`` the ``(step, error)`` of those before it that did not; step None when
    none reads. ``prepare``'s errors (a checkpoint this run must refuse) and ConfigError / CheckpointError from
    ``load`` propagate: they are about the request, not about damaged files."""
    failures = []
    for step in steps:
        try:
            meta = read_meta(mngr, step)
        except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
            failures.append((step, e))
            continue
        prepared = prepare(step, meta)
        try:
            return load(step, meta, prepared), step, meta, failures
        except (ConfigError, CheckpointError):
            raise
        except Exception as e:  # noqa: BLE001 - truncated or corrupt array files
            failures.append((step, e))
    return None, None, None, failures


def _short(err: Exception, limit: int = 300) -> str:
    text = " ".join(str(err).split()).split(" See full TensorStore details")[0]  # a page of JSON follows
    return text if len(text) <= limit else text[:limit] + " ..."


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    if not steps:
        return
    if jax.process_index() == 0:
        aside = Path(mngr.directory).parent / "checkpoints_unreadable"
        aside.mkdir(exist_ok=True)
        for step in steps:
            shutil.move(str(Path(mngr.directory) / str(step)), str(aside / f"{step}-{int(time.time())}"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("stem_jax_set_aside")
    mngr.reload()


def restore_params(workdir: str | Path, build: Callable[[int, dict], tuple[Any, Any]], step: int | None = None,
                   log: Callable[[str], None] = print) -> tuple[Any, int, dict]:
    """(params, step, meta) of the newest readable checkpoint of ``workdir``, or of exactly ``step``.

    ``build(step, meta)`` returns ``(abstract params, shardings)`` for that checkpoint (its saved config is the
    authority on shapes); its errors propagate. A checkpoint that fails to read is skipped for the next older
    one with a one-line warning naming it and the step used; if none reads, CheckpointError lists every step
    tried. Nothing is moved or deleted: tools only read."""
    where = directory(workdir)
    if not where.is_dir():
        raise FileNotFoundError(f"no checkpoint under {where}")
    mngr = manager(workdir, create=False)
    try:
        available = sorted(mngr.all_steps(), reverse=True)
        if step is not None and step not in available or not available:
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} under {where} "
                                    f"(steps: {sorted(available)})")

        def load(s: int, meta: dict, built: tuple[Any, Any]) -> Any:
            abstract, shardings = built
            rows = meta.get("table_rows")
            resize = rows is not None and rows != _table_rows(abstract)
            return mngr.restore(s, args=ocp.args.Composite(params=_restore_args(abstract, shardings, resize)))

        out, s, meta, failures = newest_readable(mngr, [step] if step is not None else available, build, load)
        if s is not None:
            for bad, err in failures:
                log(f"WARNING: checkpoint step {bad} of {workdir} is unreadable ({type(err).__name__}: "
                    f"{_short(err, 160)}); using step {s}")
            return out["params"], s, meta
    finally:
        mngr.close()
    others = [s for s in available if s != step]
    hint = f"; other steps: {others} (--step)" if step is not None and others else ""
    raise CheckpointError(f"no checkpoint of {workdir} can be read: " + "; ".join(
        f"step {s}: {type(e).__name__}: {_short(e, 160)}" for s, e in failures) + hint)
