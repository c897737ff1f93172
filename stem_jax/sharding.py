"""Every sharding decision of stem-jax: the mesh and the logical-axis -> mesh-axis rules.

Model code names logical axes only (``('stem_vocab', 'stem_dff')``, ``('batch', 'length', 'act_embed')``);
this module is the single place that maps them onto the ``('data', 'fsdp', 'tensor')`` mesh.
The mesh uses ``AxisType.Auto``: XLA propagates shardings through the backbone, the train step pins
parameter and optimizer shardings, and the STEM lookup runs under ``jax.shard_map`` (see ``stem.py``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from stem_jax.config import ModelConfig, stem_indices

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. None = replicated.
RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",              # rows of the input embedding / columns of the LM head
    "embed": "fsdp",                # d_model side of every backbone matrix (FSDP)
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",                # d_ff side of gate/up/down (tensor parallel)
    "norm": None,
    "stem_vocab": ("data", "fsdp"),  # STEM table rows: over every batch-parallel axis (see check below)
    "stem_dff": "tensor",            # STEM table columns line up with the tensor-parallel gate
    "experts": "data",               # Hash-MoE experts (embed/mlp as above): fully sharded over the mesh
    "layers": None,                  # the repeats of a scanned block (scanning.py): every device holds all
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


class MeshError(ValueError):
    """The requested mesh cannot be built on the available devices."""


def mesh_axes(logical: str | None, rules: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Mesh axes a logical axis maps to, as a tuple (empty = replicated)."""
    if logical is None:
        return ()
    rules = RULES if rules is None else rules
    if logical not in rules:
        raise KeyError(f"logical axis {logical!r} has no sharding rule; known: {sorted(rules)}")
    axes = rules[logical]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_rules(rules: dict[str, Any]) -> None:
    # A table replicated over a batch axis would need its [V, d_ff] gradient all-reduced over that axis.
    missing = set(mesh_axes("batch", rules)) - set(mesh_axes("stem_vocab", rules))
    if missing:
        raise ValueError(f"'stem_vocab' must cover every 'batch' mesh axis; missing {sorted(missing)}")


_check_rules(RULES)


def part(axes: tuple[str, ...]):
    """One PartitionSpec entry for a tuple of mesh axes."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def spec(logical_axes: Sequence[str | None], rules: dict[str, Any] | None = None) -> P:
    """PartitionSpec for a tuple of logical axis names."""
    return P(*(part(mesh_axes(name, rules)) for name in logical_axes))


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over ``MESH_AXES``; one entry may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh shape {tuple(shape)}: sizes must be positive, with at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise MeshError(f"mesh shape {tuple(shape)}: {n} devices are not divisible by {known}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        desc = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
        raise MeshError(f"mesh {desc} needs {math.prod(shape)} devices, but {n} are available "
                        f"(set --config.mesh.* so the product is {n}, or use -1 for one axis)")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def axis_size(logical: str, mesh=None) -> int:
    """Number of shards of a logical axis on ``mesh`` (default: the mesh set with ``jax.set_mesh``)."""
    mesh = mesh if mesh is not None else _context_mesh()
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in mesh_axes(logical))


# Table rows are padded to a multiple of this (and of the shard count): one padded shape for every
# power-of-two mesh up to 128 vocab shards, so checkpoints move between such meshes unchanged.
ROW_PAD_MULTIPLE = 128


def padded_rows(rows: int, logical: str = "stem_vocab", mesh=None) -> int:
    """``rows`` rounded up so every device holds an equal slice; padding rows are never addressed."""
    k = math.lcm(ROW_PAD_MULTIPLE, axis_size(logical, mesh))
    return -(-rows // k) * k


# Stored row of token t ("spread" layout), with V' = vocab rounded up to ROW_PAD_MULTIPLE = 2^7:
#   bitreverse7(t mod 128) * V'/128 + t // 128       for t < V';  t itself beyond (mesh padding).
# Vocab shards hold contiguous blocks of stored rows, so with a power-of-two count N <= 128 of equal shards
# token t lands on shard bitreverse(t mod N): consecutive ids sit on different shards and the frequent
# small BPE ids spread evenly, which the exchange lookup's fixed per-owner slots need. The map depends on
# the vocab only, so a mesh that pads more rows only appends zero rows and checkpoints move unchanged.
_BITREV = np.array([int(f"{i:07b}"[::-1], 2) for i in range(ROW_PAD_MULTIPLE)], np.int32)


def stored_rows(ids, vocab_size: int, layout: str = "spread"):
    """Rows of the stored STEM tables that hold tokens ``ids`` (numpy or jax arrays, any shape), for
    ``model.stem_row_layout`` = ``layout``."""
    if layout == "contiguous":
        return ids
    xp = np if isinstance(ids, (np.ndarray, np.generic, int, list)) else jnp
    ids = xp.asarray(ids)
    base = -(-vocab_size // ROW_PAD_MULTIPLE) * ROW_PAD_MULTIPLE
    spread = xp.asarray(_BITREV)[ids % ROW_PAD_MULTIPLE] * (base // ROW_PAD_MULTIPLE) + ids // ROW_PAD_MULTIPLE
    return xp.where(ids < base, spread, ids).astype(ids.dtype)


def stored_token(rows, vocab_size: int, layout: str = "spread"):
    """Inverse of ``stored_rows``: the token whose row each stored row index holds (elementwise, so a sharded
    iota maps shard by shard). ``bitreverse7`` is its own inverse."""
    if layout == "contiguous":
        return rows
    xp = np if isinstance(rows, (np.ndarray, np.generic, int, list)) else jnp
    rows = xp.asarray(rows)
    per = -(-vocab_size // ROW_PAD_MULTIPLE)  # V' / 128 stored rows per bit-reversed residue
    residue = xp.asarray(_BITREV)[xp.clip(rows // per, 0, ROW_PAD_MULTIPLE - 1)]
    return xp.where(rows < per * ROW_PAD_MULTIPLE, (rows % per) * ROW_PAD_MULTIPLE + residue, rows).astype(rows.dtype)


def table_by_token(stored_VxF: np.ndarray, m: ModelConfig) -> np.ndarray:
    """A stored table (numpy) reordered so that row t belongs to token t."""
    return stored_VxF[stored_rows(np.arange(stored_VxF.shape[0]), m.vocab_size, m.stem_row_layout)]


def table_to_stored(by_token_VxF: np.ndarray, m: ModelConfig) -> np.ndarray:
    """Inverse of ``table_by_token``."""
    out = np.empty_like(by_token_VxF)
    out[stored_rows(np.arange(by_token_VxF.shape[0]), m.vocab_size, m.stem_row_layout)] = by_token_VxF
    return out


def fitted_axes(logical: str | None, size: int, mesh) -> tuple[str, ...]:
    """The mesh axes of ``logical`` when they divide ``size`` evenly, else () (that dimension stays replicated:
    e.g. 1 kv head on a 2-way tensor axis, or a batch of one prompt)."""
    axes = mesh_axes(logical)
    return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def fitted_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh) -> P:
    """``spec(logical_axes)`` with the mesh axes dropped on any dimension they do not divide (``fitted_axes``)."""
    return P(*(part(fitted_axes(name, size, mesh)) for name, size in zip(logical_axes, shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (metrics, small index arrays)."""
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is set."""
    mesh = _context_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fitted_spec(logical_axes, x.shape, mesh)))


def named(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, spec(logical_axes))


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings for a pytree of nnx Variables (by their ``logical_axes``) and plain arrays (replicated).

    Works for parameters and for optimizer states, whose moments keep the parameters' Variable metadata.
    """
    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            if not hasattr(leaf.get_value(), "shape"):
                return leaf  # e.g. optax.MaskedNode: a parameter outside this optimizer group
            axes = leaf.get_metadata().get("logical_axes")
            shape = leaf.get_value().shape
            if axes is not None and len(axes) != len(shape):
                raise ValueError(f"logical axes {axes} do not match shape {shape}")
            return leaf.replace(NamedSharding(mesh, fitted_spec(axes, shape, mesh) if axes is not None else P()))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Sharding of a [batch, length] array of token ids."""
    n = axis_size("batch", mesh)
    if batch_size % n:
        near = sorted({batch_size - batch_size % n, batch_size + n - batch_size % n} - {0})
        raise MeshError(f"global batch size {batch_size} is not divisible by the {n} batch shards of mesh "
                        f"{describe(mesh)} (mesh axes {mesh_axes('batch')}); use a batch size that is a multiple "
                        f"of {n} ({' or '.join(map(str, near))}), or {auto_mesh_shape(batch_size, mesh.size)[1]} "
                        f"batch shards (tools: --mesh=auto)")
    return named(mesh, ("batch", "length"))


def auto_mesh_shape(batch_size: int, n_devices: int) -> tuple[tuple[int, int, int], int]:
    """``((data, 1, 1), d)``: the most devices ``d <= n_devices`` whose count divides ``batch_size``, all on the
    data axis (what the tools' ``--mesh=auto`` uses: any device count, any batch)."""
    d = max(k for k in range(1, n_devices + 1) if batch_size % k == 0)
    return (d, 1, 1), d


def parse_mesh(value: str | Sequence[str]) -> tuple[int, int, int] | str:
    """``--mesh``: ``auto`` or three sizes ``data,fsdp,tensor`` (one may be -1); MeshError otherwise."""
    parts = [str(x).strip() for x in (value.split(",") if isinstance(value, str) else value) if str(x).strip()]
    if [p.lower() for p in parts] == ["auto"]:
        return "auto"
    try:
        shape = tuple(int(x) for x in parts)
    except ValueError:
        shape = ()
    if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"--mesh={','.join(parts)}: expected 'auto' or three sizes data,fsdp,tensor such as "
                        "4,2,1 (one of them may be -1 for the remaining devices)")
    return shape


def check_model_fits(m: ModelConfig, mesh: Mesh) -> None:
    """Raise MeshError for a model whose sharded dimensions the mesh does not divide."""
    if not stem_indices(m):
        return
    if m.ffn == "hash_moe":
        n_exp = axis_size("experts", mesh)
        if m.moe_experts % n_exp:
            raise MeshError(f"model.moe_experts={m.moe_experts} is not divisible by the {n_exp} expert shards "
                            f"(mesh axes {mesh_axes('experts')}); choose a multiple of it or a smaller data axis")
        return
    n_dff = axis_size("stem_dff", mesh)
    if m.d_ff % n_dff:
        raise MeshError(f"model.d_ff={m.d_ff} is not divisible by the {n_dff} shards of the STEM table columns "
                        f"(mesh axes {mesh_axes('stem_dff')})")


HOST = "pinned_host"  # memory kind of host-resident STEM tables (model.stem_offload, the decode cache)


def is_table_path(path) -> bool:
    """Whether a pytree path leads to a STEM table (or its optimizer state): any parameter named ``table``."""
    return any(getattr(k, "key", None) == "table" for k in path)


def tables_on_host(shardings: Any) -> Any:
    """``shardings`` with every STEM table and table-state leaf moved to host memory."""
    return jax.tree_util.tree_map_with_path(lambda p, s: s.with_memory_kind(HOST) if is_table_path(p) else s,
                                            shardings)


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{a}={s}" for a, s in mesh.shape.items())
