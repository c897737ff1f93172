"""Layers scanned in repeating blocks (``model.scan_layers``): which layers repeat, and moving parameters
(and anything shaped like them: optimizer moments, row counts) between the two layouts.

STEM's placements are periodic: ``1/3`` of 32 layers is layer 0, ten blocks of [STEM, dense, dense], then
layer 31. The scanned layout keeps the layers before and after the repeating run as they are
(``pre_blocks``, ``post_blocks``) and stacks each position of the repeating block over the blocks
(``scan_blocks[p]``: every array with a leading ``[n_blocks]`` axis, logical axis ``layers``), so the model
applies them with one ``lax.scan`` and the program no longer grows with depth. The per-layer layout is
``blocks[i]``. Tools read runs in the per-layer layout (``workdir.restore`` converts), and a checkpoint
restores into either layout (``checkpoint``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stem_jax.config import Config, ModelConfig, stem_indices

PER_LAYER, PRE, SCAN, POST = "blocks", "pre_blocks", "scan_blocks", "post_blocks"
LAYERS_AXIS = "layers"  # logical name of the stacked axis (replicated: every device holds all blocks)
MIN_BLOCKS = 2          # fewer repeats than this are not worth a scan


@dataclasses.dataclass(frozen=True)
class ScanPlan:
    """Layers ``[0, pre)`` unscanned, then ``n_blocks`` repeats of ``period`` layers, then the rest."""
    n_layers: int
    pre: int
    period: int
    n_blocks: int

    @property
    def end(self) -> int:
        return self.pre + self.period * self.n_blocks

    def layer(self, p: int, j: int) -> int:
        """The layer at position ``p`` of repeat ``j``."""
        return self.pre + j * self.period + p

    def place(self, i: int) -> tuple:
        """Where layer ``i`` lives in the scanned layout: ``(PRE, i)``, ``(SCAN, p, j)`` or ``(POST, q)``."""
        if i < self.pre:
            return PRE, i
        if i < self.end:
            j, p = divmod(i - self.pre, self.period)
            return SCAN, p, j
        return POST, i - self.end


def plan(m: ModelConfig) -> ScanPlan:
    """The longest run of layers that repeats a block of layer kinds (table FFN or not), with the shortest
    period and the earliest start among equals. No scan (``n_blocks = 0``) when nothing repeats
    ``MIN_BLOCKS`` times."""
    n, tables = m.n_layers, set(stem_indices(m))
    kinds = [i in tables for i in range(n)]
    best = ScanPlan(n, n, 1, 0)
    for period in range(1, n // MIN_BLOCKS + 1):
        for pre in range(n - period * MIN_BLOCKS + 1):
            block = kinds[pre:pre + period]
            k = 1
            while pre + (k + 1) * period <= n and kinds[pre + k * period:pre + (k + 1) * period] == block:
                k += 1
            if k >= MIN_BLOCKS and period * k > best.period * best.n_blocks:
                best = ScanPlan(n, pre, period, k)
    return best


def with_scan_layers(cfg: Config, on: bool) -> Config:
    """``cfg`` with ``model.scan_layers`` set to ``on``."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=on))


def scanned(m: ModelConfig) -> bool:
    """Whether ``m``'s parameters are in the scanned layout: ``scan_layers`` is on and some block repeats."""
    return bool(m.scan_layers) and plan(m).n_blocks >= MIN_BLOCKS


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """The first module with every variable replaced by the stack of all modules' (leading axis added,
    logical axes prefixed with ``LAYERS_AXIS``). The modules must share one structure."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(m) for m in modules))
    template = modules[0]
    nnx.update(template, stacked)
    for _, var in nnx.iter_graph(template):
        if isinstance(var, nnx.Variable) and var.has_metadata("logical_axes"):
            var.set_metadata("logical_axes", (LAYERS_AXIS, *var.get_metadata("logical_axes")))
    return template


# --- converting between the layouts ---------------------------------------------------------------------------

def _key(k) -> Any:
    for name in ("key", "idx", "name"):
        if hasattr(k, name):
            return getattr(k, name)
    return str(k)


def _flat(tree: Any) -> tuple[dict[tuple, Any], Any, list[tuple]]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(_key(k) for k in p) for p, _ in leaves]
    return dict(zip(paths, (x for _, x in leaves))), treedef, paths


def _split(path: tuple) -> tuple[int, str] | None:
    """(position, layout name) of the first block list in ``path`` followed by a layer index, or None."""
    for i, k in enumerate(path[:-1]):
        if k in (PER_LAYER, PRE, SCAN, POST) and isinstance(path[i + 1], int):
            return i, k
    return None


def _source(path: tuple, pl: ScanPlan, to_scanned: bool, stack: Callable, index: Callable,
            src: dict[tuple, Any]) -> Any:
    """The target leaf at ``path`` built from the source leaves ``src`` (keyed by path)."""
    at = _split(path)
    if at is None:
        return src[path]
    i, name = at
    head, rest = path[:i], path[i + 2:]
    if to_scanned:
        n = path[i + 1]
        if name == PRE:
            return src[(*head, PER_LAYER, n, *rest)]
        if name == POST:
            return src[(*head, PER_LAYER, pl.end + n, *rest)]
        if name == SCAN:
            return stack([src[(*head, PER_LAYER, pl.layer(n, j), *rest)] for j in range(pl.n_blocks)])
    elif name == PER_LAYER:
        where = pl.place(path[i + 1])
        if where[0] == SCAN:
            return index(src[(*head, SCAN, where[1], *rest)], where[2])
        return src[(*head, *where, *rest)]
    raise ValueError(f"{'/'.join(map(str, path))} is not a parameter path of the "
                     f"{'scanned' if to_scanned else 'per-layer'} layout")


def is_scanned(tree: Any) -> bool:
    """Whether a parameter tree (or a tree holding one) is in the scanned layout."""
    return any(SCAN in path for path in _flat(tree)[2])


def convert(tree: Any, target: Any, m: ModelConfig, to_scanned: bool, *,
            stack: Callable = lambda xs: jnp.stack(xs), index: Callable = lambda x, j: x[j]) -> Any:
    """``tree`` (per-layer layout, or scanned when ``to_scanned`` is False) rearranged into the structure of
    ``target`` (the other layout of model ``m``; any tree whose paths hold the parameter paths, e.g. an
    optimizer state). ``stack`` and ``index`` build a stacked leaf and take one layer of it (the defaults work
    on arrays inside ``jit``)."""
    src, _, _ = _flat(tree)
    dst, treedef, paths = _flat(target)
    pl = plan(m)
    try:
        leaves = [_source(p, pl, to_scanned, stack, index, src) for p in paths]
    except KeyError as e:
        raise ValueError(f"cannot convert to the {'scanned' if to_scanned else 'per-layer'} layout: the source "
                         f"has no {'/'.join(map(str, e.args[0]))}") from None
    return jax.tree_util.tree_unflatten(treedef, leaves)


def convert_on_device(tree: Any, target: Any, shardings: Any, m: ModelConfig, to_scanned: bool) -> Any:
    """``convert`` of device arrays in one jitted program whose outputs land on ``shardings`` (the source is
    source stays alive until the call returns: a restore holds both layouts once)."""
    return jax.jit(lambda t: convert(t, target, m, to_scanned), out_shardings=shardings)(tree)
