"""steps.py: the frozen StepContext the train steps share (the steps themselves are checked sharded against
unsharded in test_trainer.py, test_sparse.py and test_offload.py)."""
import dataclasses

import jax
import pytest

from conftest import mesh_of, tiny_config
from stem_jax import sharding, steps


def test_context_is_frozen_and_describes_the_tables():
    cfg = tiny_config(stem_layers="1")
    cfg.train.stem_optimizer = "sparse"
    ctx = steps.make_context(cfg, mesh_of((2, 4, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.tx = None
    assert ctx.sparse and ctx.stem_layers == (1,)
    # vocab 1000 padded to a multiple of 128 and of the 8 vocab shards
    assert ctx.tables.rows == 1024
    assert set(ctx.abstract_state["opt_state"]) == {"tx", "rows"}  # backbone optax state + row-wise state
    assert ctx.counts.tables == cfg.model.vocab_size * cfg.model.d_ff


def test_offload_puts_every_table_leaf_and_only_those_in_host_memory():
    cfg = tiny_config(stem_layers="1", stem_offload=True)
    cfg.train.stem_optimizer = "sparse"
    ctx = steps.make_context(cfg, mesh_of((1, 1, 1)))
    kinds = {jax.tree_util.keystr(p): s.memory_kind for p, s in jax.tree_util.tree_flatten_with_path(
        ctx.state_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))[0]}
    host = {k for k, v in kinds.items() if v == sharding.HOST}
    assert host and all("table" in k for k in host)
    assert len(host) == 4  # the table, its two moments and its row counts
    assert all(v != sharding.HOST for k, v in kinds.items() if "table" not in k)


def test_a_mesh_that_does_not_divide_the_model_is_refused():
    with pytest.raises(sharding.MeshError, match="d_ff=96 is not divisible by the 5 shards"):
        steps.make_context(tiny_config(), mesh_of((1, 1, 5)))
