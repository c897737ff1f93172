"""steps.py: the frozen StepContext the train steps share, and gradient accumulation over microbatches (the
steps themselves are checked sharded against unsharded in test_trainer.py, test_sparse.py and test_offload.py)."""
import dataclasses
import functools
import re

import jax
import numpy as np
import pytest

from conftest import mesh_of, tiny_config
from stem_jax import sharding, steps
from stem_jax.config import ConfigError
from stem_jax.trainer import Trainer


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


EOS = 3  # the packed documents' end token in these tests


@pytest.mark.parametrize("optimizer,remat,eos_id", [("dense", "dots", None), ("sparse", "offload", EOS)])
def test_microbatches_give_the_update_and_loss_of_the_whole_batch(optimizer, remat, eos_id):
    """4 microbatches under a remat policy against the whole batch at once without remat: the same step. The
    sparse one packs documents (``eos_id``): its loss is the packed loss of the batch (``steps.loss``)."""
    cfg = tiny_config(n_layers=2, stem_layers="1")
    cfg.train.stem_optimizer, cfg.train.batch_size = optimizer, 32  # 4 sequences per batch shard
    batch = np.random.default_rng(0).integers(0, 1000, (32, 17)).astype(np.int32)
    batch[np.arange(32), np.arange(32) % 16] = EOS  # documents end at a different place in every row
    mesh = mesh_of((2, 4, 1))
    out = {}
    for k in (1, 4):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=k),
                                      model=dataclasses.replace(cfg.model, remat="none" if k == 1 else remat))
        tr = Trainer(steps.make_context(run_cfg, mesh, eos_id=eos_id))
        state = tr.init_state()
        if k == 1 and eos_id is not None:  # the loss of the parameters before the step
            with jax.set_mesh(mesh):
                packed_loss = np.asarray(jax.jit(functools.partial(steps.loss, tr.ctx.graphdef, eos_id=eos_id))(
                    state["params"], batch))
        state, metrics = tr.step(state, batch)
        out[k] = jax.device_get((state["params"], metrics))
    if eos_id is not None:
        np.testing.assert_allclose(out[1][1]["loss"], packed_loss, rtol=1e-6)
    for k in (4,):
        for name, value in out[1][1].items():
            np.testing.assert_allclose(out[k][1][name], value, rtol=2e-5, err_msg=f"{name}, microbatches={k}")
        for a, b in zip(jax.tree.leaves(out[k][0]), jax.tree.leaves(out[1][0])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_microbatches_must_divide_the_per_device_batch():
    cfg = tiny_config()
    cfg.train.microbatches = 2  # batch 8 over 8 batch shards: one sequence per device
    with pytest.raises(ConfigError, match=r"train.microbatches=2 does not divide the per-device batch 1 "):
        steps.make_context(cfg, mesh_of((8, 1, 1)))


def test_microbatches_keep_every_device_on_its_own_rows():
    mesh = mesh_of((2, 4, 1))
    split = jax.jit(lambda b: steps.microbatches(b, 4), in_shardings=sharding.batch_sharding(mesh, 32))
    batch = np.arange(32 * 3, dtype=np.int32).reshape(32, 3)
    with jax.set_mesh(mesh):
        got = split(batch)
        hlo = split.lower(batch).compile().as_text()
    np.testing.assert_array_equal(got, batch.reshape(8, 4, 3).swapaxes(0, 1))  # microbatch j: rows j, j+4, ...
    assert got.sharding.spec[1] == ("data", "fsdp")
    assert not any(op in hlo for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce"))


def test_packing_reaches_every_step_and_the_eval_step_only_when_asked():
    """Traced, not run: with an ``eos_id`` each program finds the documents of its input ids (the cumulative
    max of ``model.doc_segments``); without one, none does (the numbers are test_model.py's)."""
    mesh = mesh_of((2, 1, 1))
    for optimizer in ("dense", "sparse"):
        cfg = tiny_config(n_layers=1, stem_layers="0")
        cfg.train.stem_optimizer, cfg.train.microbatches = optimizer, 2
        batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len + 1), np.int32)
        for eos_id in (None, EOS):
            ctx = steps.make_context(cfg, mesh, eos_id=eos_id)
            step = steps.sparse_step if ctx.sparse else steps.dense_step
            evaluate = steps.eval_step_fn(ctx.graphdef, ctx.state_shardings["params"], ctx.batch_sharding,
                                          eos_id=eos_id)
            programs = {"step": lambda s, b: step(ctx, s, b), "eval": lambda s, b: evaluate(s["params"], b)}
            for name, f in programs.items():
                with jax.set_mesh(mesh):
                    jaxpr = str(jax.make_jaxpr(f)(ctx.abstract_state, batch))
                assert ("cummax" in jaxpr) == (eos_id is not None), (optimizer, name, eos_id)


def test_validation_runs_in_microbatches_and_chunks_and_never_holds_the_batch_logits():
    """The eval step over 2 microbatches and loss chunks of 4 positions equals one whole-batch pass (loss and
    accuracy, on a 2x4 mesh), and its compiled program has no float32 logits of the whole per-device batch,
    nor of a whole microbatch: the largest logits array is [rows of a microbatch x chunk, V]."""
    cfg = tiny_config(stem_layers="1", seq_len=24)
    cfg.train.batch_size = 16
    ctx = steps.make_context(cfg, mesh_of((2, 4, 1)))
    params = steps.init_state(ctx)["params"]
    batch = np.random.default_rng(0).zipf(1.3, (16, cfg.model.seq_len + 1)) % cfg.model.vocab_size
    batch = jax.device_put(batch.astype(np.int32), ctx.batch_sharding)
    whole = steps.eval_step_fn(ctx.graphdef, ctx.state_shardings["params"], ctx.batch_sharding)
    parts = steps.eval_step_fn(ctx.graphdef, ctx.state_shardings["params"], ctx.batch_sharding, microbatches=2,
                               chunk=4)
    with jax.set_mesh(ctx.mesh):
        want, got = jax.device_get(whole(params, batch)), jax.device_get(parts(params, batch))
        hlo = parts.lower(params, batch).compile().as_text()
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-6)
    np.testing.assert_allclose(got["acc"], want["acc"], rtol=1e-6)
    V, L = cfg.model.vocab_size, cfg.model.seq_len  # per device: 2 rows, 1 per microbatch, chunks of 4
    logits = set(re.findall(rf"f32\[([\d,]*),{V}\]", hlo))
    assert logits & {"1,4", "4"}, logits  # a chunk's logits
    assert not logits & {f"2,{L}", f"{2 * L}", f"1,{L}", f"{L}"}, logits  # never a batch's or microbatch's
    assert steps.eval_microbatches(4, 16, ctx.mesh) == 2  # 2 rows per device: at most 2 microbatches


def _collective_counts(cfg, mesh) -> tuple[int, int]:
    """(all-to-alls, while loops) in the compiled train step of ``cfg`` on ``mesh`` (the exchange's loops are
    its only while loops here: one microbatch)."""
    ctx = steps.make_context(cfg, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ctx.abstract_state,
                         ctx.state_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len + 1), np.int32,
                                 sharding=ctx.batch_sharding)
    with jax.set_mesh(mesh):
        hlo = steps.train_step_fn(ctx).lower(state, batch).compile().as_text()
    return len(re.findall(r" all-to-all(?:-start)?\(", hlo)), len(re.findall(r" while\(", hlo))


def test_one_id_exchange_per_step_whatever_the_stem_layers_and_remat():
    """The route is computed once and every table layer's rows move in one loop each way, so the compiled
    dense step has the same all-to-alls and loops for 2 and 4 STEM layers, and remat=full does not run the
    exchange again in the backward (the looked-up rows are inputs of the checkpointed blocks). (The sparse
    step fetched all tables at once before; XLA:CPU merges its per-table all-to-alls, so only a TPU compile,
    ``python -m stem_jax.aot``, shows that the rows now move in one stacked all-to-all per round.)"""
    mesh = mesh_of((8, 1, 1))
    counts = lambda layers, remat="none": _collective_counts(tiny_config(n_layers=4, stem_layers=layers,
                                                                         remat=remat), mesh)
    base = counts("1,3")
    assert base == (4, 2), base  # ids + rows forward, ids + gradients backward; one loop each way
    assert counts("full") == base
    assert counts("1,3", "full") == base


def test_init_draws_every_table_on_its_owners():
    """The compiled init on a 2x4 mesh: no array of a whole table's rows exists (each device draws its 1/8 of
    the rows, a block at a time), and the per-device peak (state + temporaries) stays near the device's share
    of the state (whole tables drawn and scattered made it 7.9x here; 1.34x now)."""
    cfg = tiny_config(vocab_size=8192, d_model=64, d_ff=512, n_layers=2, stem_layers="full")
    ctx = steps.make_context(cfg, mesh_of((2, 4, 1)))
    with jax.set_mesh(ctx.mesh):
        compiled = steps.init_fn(ctx).lower().compile()
    assert not re.search(r"\[8192,512\]", compiled.as_text())  # the tables' shape: [8192 rows, 512]
    share = sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                for a, s in zip(jax.tree.leaves(ctx.abstract_state), jax.tree.leaves(ctx.state_shardings)))
    mem = compiled.memory_analysis()
    assert mem.output_size_in_bytes <= 1.01 * share
    assert mem.temp_size_in_bytes + mem.output_size_in_bytes <= 1.5 * share, (mem.temp_size_in_bytes, share)
