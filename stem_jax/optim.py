"""optax AdamW with the STEM tables as their own parameter group."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from stem_jax import sharding
from stem_jax.config import TrainConfig

STEM, BACKBONE = "stem", "backbone"


def param_labels(params: Any) -> Any:
    """'stem' for STEM tables (any parameter named ``table``), 'backbone' for the rest."""
    def label(path, _):
        return STEM if sharding.is_table_path(path) else BACKBONE
    return jax.tree_util.tree_map_with_path(label, params)


def schedule(t: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup to ``lr``, cosine to ``lr * min_lr_ratio`` at ``steps`` (warmup capped at ``steps``)."""
    warmup = min(t.warmup_steps, t.steps - 1)
    if warmup <= 0:
        return optax.cosine_decay_schedule(t.lr, max(t.steps, 1), alpha=t.min_lr_ratio)
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, warmup, t.steps, end_value=t.lr * t.min_lr_ratio)


def _adamw(t: TrainConfig, lr_mult: float, weight_decay: float, clip: float) -> optax.GradientTransformation:
    sched = schedule(t)
    # Decay matrices and tables, not norm scales.
    decay_mask = lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p)
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
        optax.adamw(lambda s: sched(s) * lr_mult, b1=t.b1, b2=t.b2, eps=t.eps,
                    weight_decay=weight_decay, mask=decay_mask),
    )


def make_optimizer(t: TrainConfig, tables: bool = True) -> optax.GradientTransformation:
    """Each group is clipped by its own global norm, like the paper's two AdamW optimizers. With
    ``tables=False`` the backbone's alone: the sparse table optimizer (``sparse.py``) updates the tables."""
    if not tables:
        return _adamw(t, 1.0, t.weight_decay, t.clip_norm)
    return optax.partition(
        {BACKBONE: _adamw(t, 1.0, t.weight_decay, t.clip_norm),
         STEM: _adamw(t, t.stem_lr_mult, t.stem_weight_decay, t.stem_clip_norm)},
        param_labels)


def group_norms(grads: Any) -> dict[str, jax.Array]:
    """Global gradient norm of each group (0 for an empty group)."""
    labels = jax.tree.leaves(param_labels(grads))
    leaves = jax.tree.leaves(grads)
    out = {}
    for name in (BACKBONE, STEM):
        sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g, lab in zip(leaves, labels) if lab == name]
        out[f"{name}_grad_norm"] = jnp.sqrt(sum(sq)) if sq else jnp.zeros((), jnp.float32)
    return out
