"""Mesh construction, logical rules, and the compiled train step's collectives."""
import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import mesh_of, tiny_config
from stem_jax import sharding, steps


def test_make_mesh_fills_minus_one_and_uses_auto_axis_types():
    # Auto on purpose (see sharding.py): XLA propagates the backbone's shardings, the lookup is a shard_map.
    mesh = sharding.make_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


@pytest.mark.parametrize("shape,msg", [
    ((2, 2, 1), "needs 4 devices, but 8 are available"),
    ((3, -1, 1), "not divisible by 3"),
    ((-1, -1, 1), "at most one -1"),
    ((0, 1, 1), "must be positive"),
    ((8, 1), "must have 3 entries"),
])
def test_mesh_errors(shape, msg):
    with pytest.raises(sharding.MeshError, match=msg):
        sharding.make_mesh(shape)


def test_logical_rules():
    assert sharding.spec(("stem_vocab", "stem_dff")) == P(("data", "fsdp"), "tensor")
    assert sharding.spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.spec(("nonsense",))
    bad = dict(sharding.RULES, stem_vocab="fsdp")
    with pytest.raises(ValueError, match="must cover every 'batch' mesh axis"):
        sharding._check_rules(bad)


def test_padded_rows():
    mesh = mesh_of((2, 4, 1))
    assert sharding.padded_rows(1000, mesh=mesh) == 1024
    assert sharding.padded_rows(8192, mesh=mesh) == 8192
    assert sharding.padded_rows(1000, mesh=mesh_of((3, 1, 1))) == 1152  # lcm(128, 3) = 384


def table_sized_collectives(hlo: str, rows: set[int], width: int) -> list[str]:
    """Collective instructions with an operand or result shaped like (a slice of) a [rows, width] table."""
    found = []
    for line in hlo.splitlines():
        if not re.search(r"\b(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(-start)?\(", line):
            continue
        for dims in re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", line):
            ds = [int(d) for d in dims.split(",") if d]
            n = math.prod(ds)
            if (width in ds and rows & set(ds)) or (len(ds) == 1 and any(n == r * width for r in rows)):
                found.append(line.strip())
                break
    return found


def _table_row_counts(total: int, shards: int) -> set[int]:
    return {total // shards * k for k in range(1, shards + 1)}


def test_detector_flags_a_replicated_table_gradient():
    """Control: a data-parallel gather from a replicated table all-reduces a table-sized gradient."""
    mesh = mesh_of((8, 1, 1))
    table = jax.device_put(jnp.ones((1024, 96)), NamedSharding(mesh, P()))
    ids = jax.device_put(jnp.zeros((8, 16), jnp.int32), NamedSharding(mesh, P("data")))
    grad = jax.jit(jax.grad(lambda t, i: jnp.sum(jnp.take(t, i, axis=0) ** 2)),
                   out_shardings=NamedSharding(mesh, P()))
    hlo = grad.lower(table, ids).compile().as_text()
    assert table_sized_collectives(hlo, _table_row_counts(1024, 8), 96)


@pytest.mark.parametrize("shape", [(2, 4, 1)])
def test_train_step_moves_no_table_sized_data(shape):
    cfg = tiny_config()
    mesh = mesh_of(shape)
    ctx = steps.make_context(cfg, mesh)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len + 1), jnp.int32,
                                 sharding=ctx.batch_sharding)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         ctx.abstract_state, ctx.state_shardings)
    with jax.set_mesh(mesh):
        hlo = steps.train_step_fn(ctx).lower(state, batch).compile().as_text()
    table = ctx.abstract_state["params"]["blocks"][1]["ffn"]["table"]
    rows, width = table.shape
    assert (rows, width) == (1024, 96)
    # The lookup's own exchange is there (ids and rows), but nothing table-shaped crosses devices.
    assert "all-to-all" in hlo
    assert table_sized_collectives(hlo, _table_row_counts(rows, 8) | {cfg.model.vocab_size}, width) == []
    # The table and its Adam moments stay vocab-sharded.
    assert ctx.state_shardings["params"]["blocks"][1]["ffn"]["table"].get_value().spec == P(("data", "fsdp"), "tensor")
