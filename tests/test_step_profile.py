"""benchmarks/step_profile.py: op_name grouping, the compiled step's labels, and reading a real trace."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import step_profile
from conftest import mesh_of, tiny_config
from stem_jax import data
from stem_jax.config import validate
from stem_jax.trainer import Trainer


@pytest.mark.parametrize("op_name, group", [
    ("jit(<lambda>)/jvp(attention)/bld,dhk->blhk/dot_general", "attention"),
    ("jit(<lambda>)/transpose(jvp(ffn))/jit(silu)", "FFN matmuls"),
    ("jit(<lambda>)/jvp(ffn)/stem_lookup/jit(_take)/gather", "STEM lookup forward"),
    ("jit(<lambda>)/transpose(jvp(ffn))/stem_lookup/jit(_take)/scatter-add", "STEM lookup backward"),
    ("jit(<lambda>)/optimizer/add", "optimizer"),
    ("jit(<lambda>)/transpose(jvp(lm_head))/bld,dv->blv/dot_general", "LM head + loss"),
    ("jit(<lambda>)/jvp(loss)/jit(log_softmax)/reduce_max", "LM head + loss"),
    ("jit(<lambda>)/jvp(embed)/jit(_take)/gather", "other"),
    ("jit(<lambda>)/ffn_extra/add", "other"),  # a scope is matched whole, not as a prefix
    ("", "other"),
])
def test_groups_follow_named_scopes_through_transformations(op_name, group):
    assert step_profile.group_of(op_name) == group


def test_every_group_of_a_stem_train_step_is_labelled():
    """The model's and the step's named scopes reach the compiled HLO: every group has instructions, and the
    lookup's backward holds the scatter-add of the row gradients."""
    mesh = mesh_of((1, 1, 1))
    s = Trainer.create(validate(tiny_config(n_layers=2)), mesh)
    state = s.init_state()
    batch = data.to_global(np.zeros((8, 17), np.int32), s.ctx.batch_sharding)
    with jax.set_mesh(mesh):
        hlo = s.train_step.lower(state, batch).compile().as_text()
    names = step_profile.op_names(hlo)
    by_group = collections.defaultdict(list)
    for op, name in names.items():
        by_group[step_profile.group_of(name)].append(name)
    assert set(step_profile.GROUPS) - set(by_group) == set()
    assert any("scatter" in n for n in by_group["STEM lookup backward"])
    assert any("gather" in n for n in by_group["STEM lookup forward"])


def test_trace_times_are_read_per_op_of_the_module(tmp_path):
    @jax.jit
    def f(x_NxN):
        with jax.named_scope("ffn"):
            return jnp.tanh(x_NxN @ x_NxN).sum()

    x = jnp.ones((256, 256))
    compiled = f.lower(x).compile()
    f(x).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(3):
        f(x).block_until_ready()
    jax.profiler.stop_trace()
    times = step_profile.op_times(str(tmp_path), step_profile.module_name(compiled.as_text()))
    names = step_profile.op_names(compiled.as_text())
    assert times and all(ns > 0 for ns in times.values())
    assert {step_profile.group_of(names.get(op, "")) for op in times} >= {"FFN matmuls"}
