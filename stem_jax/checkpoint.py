"""orbax checkpoints under ``<workdir>/checkpoints``: params, optimizer state and step as separate items,
so evaluation restores the parameters alone. Restore targets carry the *current* mesh's shardings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str | Path, max_to_keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
        item_names=("params", "opt_state", "meta"))


def save(mngr: ocp.CheckpointManager, state: dict) -> int:
    step = int(jax.device_get(state["step"]))
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        meta=ocp.args.JsonSave({"step": step})))
    return step


def latest_step(workdir: str | Path) -> int | None:
    """Newest checkpoint step of ``workdir``, or None; never creates anything."""
    if not (Path(workdir) / "checkpoints").is_dir():
        return None
    mngr = manager(workdir, create=False)
    step = mngr.latest_step()
    mngr.close()
    return step


def restore_target(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the new shardings (never the saved layout by accident)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_params(workdir: str | Path, abstract_params: Any, shardings: Any, step: int | None = None):
    """(params, step) from the latest (or given) checkpoint of ``workdir``."""
    where = Path(workdir) / "checkpoints"
    if not where.is_dir():
        raise FileNotFoundError(f"no checkpoint under {where}")
    mngr = manager(workdir, create=False)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None or step not in mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} under {where} "
                                    f"(steps: {list(mngr.all_steps())})")
        out = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(restore_target(abstract_params, shardings))))
    finally:
        mngr.close()
    return out["params"], step
