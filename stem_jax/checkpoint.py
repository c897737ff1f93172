"""orbax checkpoints under ``<workdir>/checkpoints``, one directory per step holding four items:
``params`` and ``opt_state`` (sharded arrays), ``data`` (the grain iterator position of every process)
and ``meta`` (step, resolved config, tokenizer fingerprint, table rows, process count).

Saves are async and atomic (orbax writes a temporary directory and renames it), and older steps are
deleted only after a newer one has landed. Restore targets always carry the *current* mesh's shardings,
so any checkpoint restores onto any mesh; STEM tables whose padded row count differs between meshes are
padded or cut at the end, where only all-zero padding rows live. A checkpoint written in the other layer
layout (``model.scan_layers``, ``scanning.py``) is read in its own layout and converted on the devices.

Only the holder of the workdir's lock (``lock.hold``: train.py, the params-only writers) writes: its manager
cleans the temporary folders of a killed save. Tools open checkpoints read-only (``reader``) and never create,
move or delete anything, so they can read next to a run that is saving. With several processes, process 0's
list of steps is the one tried, every process confirms it can read a step before any uses it, and the
pre-save space check's outcome is shared: all processes restore the same step and raise the same errors."""
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

from stem_jax import lock, scanning, sharding
from stem_jax.config import Config, ConfigError, from_dict, to_dict


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be restored."""


def directory(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def manager(workdir: str | Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    """The writer's manager. It deletes the temporary folders of a killed save only while this run holds the
    workdir's lock: anyone else's cleanup would delete the save a live run is writing."""
    return ocp.CheckpointManager(directory(workdir), options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=True,
        cleanup_tmp_directories=lock.holds(workdir)))


def reader(workdir: str | Path) -> ocp.CheckpointManager:
    """A read-only manager for tools: orbax skips saves, deletions, temporary-folder cleanup and directory or
    metadata creation (``read_only``), and lists steps without reading their metadata files."""
    return ocp.CheckpointManager(directory(workdir), options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, lightweight_initialize=True))


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
    fits, free_mib = _gather(np.array([free >= need, free / 2**20], np.float32)).T  # all raise, or none does
    if not fits.all():
        k = int(np.argmin(free_mib))
        on = f" on process {k}" if jax.process_count() > 1 else ""
        raise CheckpointError(f"checkpoint step {step} needs about {need / 2**20:,.1f} MiB in {where}, but only "
                              f"{free_mib[k]:,.1f} MiB are free{on}")
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
    rows = [a.shape[-2] for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0] if sharding.is_table_path(p)]
    return rows[0] if rows else None


def _restore_items(mngr: ocp.CheckpointManager, step: int, **items: Any) -> dict:
    """Restore ``items`` (name -> orbax restore args) of checkpoint ``step`` on this process alone. The item
    handlers hold no barrier (orbax's ``Checkpointer.restore`` ends with one), so a process that fails here
    leaves the collectives of the others in step, and ``_on_every_process`` shares the outcome."""
    handler = ocp.CompositeCheckpointHandler()
    try:
        return handler.restore(Path(mngr.directory) / str(step), args=ocp.args.Composite(**items))
    finally:
        handler.close()


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return dict(_restore_items(mngr, step, meta=ocp.args.JsonRestore())["meta"])


def read_step_meta(workdir: str | Path, step: int) -> dict:
    """The ``meta`` item of checkpoint ``step`` of ``workdir`` (read-only)."""
    mngr = reader(workdir)
    try:
        return read_meta(mngr, step)
    finally:
        mngr.close()


Layout = Callable[[], tuple[dict, dict]]  # () -> (abstract state, shardings) in the other layer layout


def restore_state(mngr: ocp.CheckpointManager, step: int, meta: dict, abstract_state: dict,
                  shardings: dict, data_iter: Any, other_layout: Layout | None = None) -> dict:
    """The train state of ``step`` on the new shardings; ``data_iter`` is moved to the saved position.
    ``other_layout``: the state in the other layer layout, for a checkpoint saved in it."""
    state = _restore_arrays(mngr, step, meta, abstract_state, shardings, data_iter, other_layout)
    return {**_to_layout(state, meta, abstract_state, shardings), "step": _step_array(step, shardings)}


def saved_model(meta: dict):
    """The model config a checkpoint was saved with (None for a checkpoint without one)."""
    return from_dict(meta["config"]).model if isinstance(meta.get("config"), dict) else None


def _layout_differs(meta: dict, abstract: Any) -> bool:
    model = saved_model(meta)
    return model is not None and scanning.scanned(model) != scanning.is_scanned(abstract)


def _to_layout(state: dict, meta: dict, abstract_state: dict, shardings: dict) -> dict:
    """``state`` (restored in the checkpoint's layout) in the layout of ``abstract_state``, on ``shardings``.
    Runs a program on every device: call it after every process has read the checkpoint."""
    if not _layout_differs(meta, abstract_state["params"]):
        return state
    to_scanned, model = scanning.is_scanned(abstract_state["params"]), saved_model(meta)
    return {k: scanning.convert_on_device(v, abstract_state[k], shardings[k], model, to_scanned)
            for k, v in state.items()}


def _restore_arrays(mngr: ocp.CheckpointManager, step: int, meta: dict, abstract_state: dict,
                    shardings: dict, data_iter: Any, other_layout: Layout | None = None) -> dict:
    """``params`` and ``opt_state`` of ``step`` (in the checkpoint's layer layout: ``_to_layout`` converts),
    and the data position; no collective, so one process can fail it alone."""
    if _layout_differs(meta, abstract_state["params"]):
        if other_layout is None:
            raise CheckpointError(f"step {step} is saved with model.scan_layers="
                                  f"{saved_model(meta).scan_layers} and no conversion was offered")
        abstract_state, shardings = other_layout()
    rows = _table_rows(abstract_state["params"])
    resize = rows is not None and meta.get("table_rows") not in (None, rows)
    if resize and meta["table_rows"] < meta["config"]["model"]["vocab_size"]:
        raise CheckpointError(f"step {step}: saved tables have {meta['table_rows']} rows, fewer than the vocab")
    out = _restore_items(mngr, step,
                         params=_restore_args(abstract_state["params"], shardings["params"], resize),
                         opt_state=_restore_args(abstract_state["opt_state"], shardings["opt_state"], resize),
                         data=grain.checkpoint.CheckpointRestore(data_iter))
    return {"params": out["params"], "opt_state": out["opt_state"]}


def _step_array(step: int, shardings: dict) -> jax.Array:
    return jax.device_put(np.asarray(step, np.int32), shardings["step"])  # collective with several processes


def restore_latest(mngr: ocp.CheckpointManager, check: Callable[[dict], None], abstract_state: dict,
                   shardings: dict, data_iter: Any, log: Callable[[str], None],
                   other_layout: Layout | None = None) -> tuple[dict, int] | None:
    """(state, step) of the newest checkpoint that restores, or None when there is none.

    ``check(meta)`` raises for a checkpoint this run must not resume (a different model); that error
    propagates. A checkpoint that fails to read (a kill during a save on a filesystem without atomic
    rename, truncated or corrupted files) is skipped with a warning for the next older one; skipped
    newer ones are moved to ``checkpoints_unreadable/`` (kept, never deleted) so their step numbers can
    be written again. If none restores, nothing is moved and CheckpointError names every failure.
    Collective: every process gets the same step and moves the same steps aside; process 0 warns.
    ``other_layout``: as in ``restore_state``."""
    def load(step: int, meta: dict, _) -> dict:
        return _restore_arrays(mngr, step, meta, abstract_state, shardings, data_iter, other_layout)

    steps = sorted(mngr.all_steps(), reverse=True)
    state, step, meta, failures = newest_readable(mngr, steps, lambda s, meta: check(meta), load)
    if step is not None:
        for bad, err in failures if jax.process_index() == 0 else ():
            log(f"WARNING: checkpoint step {bad} is unreadable ({type(err).__name__}: {_short(err)}); "
                f"resuming from step {step}")
        _set_aside(mngr, [bad for bad, _ in failures])
        state = _to_layout(state, meta, abstract_state, shardings)
        return {**state, "step": _step_array(step, shardings)}, step
    if failures:
        raise CheckpointError(f"no checkpoint under {mngr.directory} can be restored: " + "; ".join(
            f"step {s}: {type(e).__name__}: {_short(e)}" for s, e in failures))
    return None


def newest_readable(mngr: ocp.CheckpointManager, steps: list[int], prepare: Callable[[int, dict], Any],
                    load: Callable[[int, dict, Any], Any]) -> tuple[Any, int | None, dict | None, list]:
    """``(load(step, meta, prepare(step, meta)), step, meta, failures)`` for the first of ``steps`` whose meta
    and arrays read, with ``failures`` the ``(step, error)`` of those before it that did not; step None when
    none reads. ``prepare``'s errors (a checkpoint this run must refuse) and ConfigError / CheckpointError from
    ``load`` propagate: they are about the request, not about damaged files.

    With several processes the steps are process 0's, and a step is used only when every process read it;
    otherwise all go on to the next older one together, with the same ``failures``. ``load`` must hold no
    collective (a process that failed would not join it)."""
    failures = []
    everything = lambda e: True  # noqa: E731
    request = lambda e: isinstance(e, (ConfigError, CheckpointError))  # noqa: E731
    for step in _from_process_0(steps):
        meta, err = _on_every_process(lambda: read_meta(mngr, step), refuses=lambda e: False)
        if err is not None:  # any read failure means this step is unusable
            failures.append((step, err))
            continue
        prepared, _ = _on_every_process(lambda: prepare(step, meta), refuses=everything)
        out, err = _on_every_process(lambda: load(step, meta, prepared), refuses=request)
        if err is None:
            return out, step, meta, failures
        failures.append((step, err))  # truncated or corrupt array files
    return None, None, None, failures


def _gather(x: np.ndarray) -> np.ndarray:
    """``x`` of every process, stacked ``[processes, ...]``."""
    if jax.process_count() == 1:
        return x[None]
    return np.asarray(multihost_utils.process_allgather(x))


def _from_process_0(steps: list[int]) -> list[int]:
    """Process 0's ``steps`` on every process (on a filesystem without read-after-write consistency the
    listings may differ)."""
    if jax.process_count() == 1:
        return list(steps)
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    mine = np.asarray(steps if jax.process_index() == 0 else [0] * n, np.int32)
    return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)] if n else []


ERROR_BYTES = 240  # of each process's error message shared with the others


class PeerError(CheckpointError):
    """What failed on one process of a multi-process run, as every process reports it."""


def _on_every_process(fn: Callable[[], Any], refuses: Callable[[Exception], bool]) -> tuple[Any, Exception | None]:
    """``(fn(), None)`` when ``fn`` succeeded on every process, else ``(None, error)``: alone, this process's
    error; with several processes, the same PeerError on each, naming the first process that failed and its
    error. An error that ``refuses`` (about the request, not the files) is raised on every process instead."""
    try:
        value, err = fn(), None
    except Exception as e:  # noqa: BLE001 - classified below, by every process alike
        value, err = None, e
    if jax.process_count() == 1:
        if err is not None and refuses(err):
            raise err
        return value, err
    code = 0 if err is None else 2 if refuses(err) else 1
    text = b"" if err is None else f"{type(err).__name__}: {_short(err)}".encode()[:ERROR_BYTES]
    rows = _gather(np.frombuffer(bytes([code]) + text.ljust(ERROR_BYTES, b"\0"), np.uint8).astype(np.int32))
    codes = rows[:, 0]
    if not codes.any():
        return value, None
    k = int(np.argmax(codes == codes.max()))  # the first process with the gravest outcome
    peer = PeerError(f"process {k}: " + bytes(rows[k, 1:].astype(np.uint8)).rstrip(b"\0").decode(errors="replace"))
    if codes.max() == 2:
        raise err if code == 2 else peer
    return None, peer


def _short(err: Exception, limit: int = 300) -> str:
    text = " ".join(str(err).split()).split(" See full TensorStore details")[0]  # a page of JSON follows
    return text if len(text) <= limit else text[:limit] + " ..."


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move ``steps`` to ``checkpoints_unreadable/``: the trainer (the lock holder) only, on every process with
    the same ``steps`` (``newest_readable`` makes them agree); process 0 moves, then all reload."""
    if not steps:
        return
    if not lock.holds(Path(mngr.directory).parent):  # every process alike: the lock's outcome is shared
        raise CheckpointError(f"checkpoint steps {steps} of {mngr.directory} are unreadable; only the holder of the "
                              "workdir's lock may set them aside")
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
    tried. Nothing is created, moved or deleted (``reader``): tools only read, even next to a run that saves."""
    where = directory(workdir)
    if not where.is_dir():
        raise FileNotFoundError(f"no checkpoint under {where}")
    mngr = reader(workdir)
    try:
        available = sorted(mngr.all_steps(), reverse=True)
        if step is not None and step not in available or not available:
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} under {where} "
                                    f"(steps: {sorted(available)})")

        def load(s: int, meta: dict, built: tuple[Any, Any]) -> Any:
            abstract, shardings = built
            rows = meta.get("table_rows")
            resize = rows is not None and rows != _table_rows(abstract)
            return _restore_items(mngr, s, params=_restore_args(abstract, shardings, resize))

        out, s, meta, failures = newest_readable(mngr, [step] if step is not None else available, build, load)
        if s is not None:
            for bad, err in failures if jax.process_index() == 0 else ():
                log(f"WARNING: checkpoint step {bad} of {workdir} is unreadable ({type(err).__name__}: "
                    f"{_short(err, 160)}); using step {s}")
            return out["params"], s, meta
    finally:
        mngr.close()
    others = [s for s in available if s != step]
    hint = f"; other steps: {others} (--step)" if step is not None and others else ""
    raise CheckpointError(f"no checkpoint of {workdir} can be read: " + "; ".join(
        f"step {s}: {type(e).__name__}: {_short(e, 160)}" for s, e in failures) + hint)
