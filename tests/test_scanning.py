"""Scanned layers (model.scan_layers): the plan of the repeating block, the scanned model against the per-layer
one on a 2x2x2 mesh (init, loss, gradients), and checkpoints restored into the other layout both ways."""
import dataclasses
import shutil

import jax
import numpy as np
import pytest

from conftest import mesh_of, tiny_config
from stem_jax import checkpoint, data, scanning, steps
from stem_jax.config import ModelConfig, to_dict
from stem_jax.trainer import Trainer


def _plan(stem_layers, n_layers, ffn="stem"):
    p = scanning.plan(ModelConfig(n_layers=n_layers, stem_layers=stem_layers, ffn=ffn))
    return p.pre, p.period, p.n_blocks


def test_the_plan_scans_the_longest_repeating_block_of_the_placement():
    assert _plan("1/3", 32) == (0, 3, 10)   # [dense, STEM, dense] x 10 (layers 0-29), then 30, 31 unscanned
    assert _plan("1/3", 16) == (0, 3, 5)    # the 1B placement: layers 0-14, then 15
    assert _plan("1/2", 32) == (0, 2, 16)
    assert _plan("full", 32) == (1, 1, 31)  # layer 0 dense, then 31 STEM layers
    assert _plan("none", 12, ffn="dense") == (0, 1, 12)
    assert _plan("2,3,5,7", 10) == (3, 2, 3)  # layers 3-8 repeat [STEM, dense]
    assert _plan("0,2", 3) == (3, 1, 0)      # nothing repeats twice: no scan
    cfg = ModelConfig(n_layers=3, stem_layers="0,2", scan_layers=True)
    assert not scanning.scanned(cfg)
    pl = scanning.plan(ModelConfig(n_layers=32, stem_layers="1/3"))
    assert [pl.place(i) for i in (0, 1, 29, 30, 31)] == [
        (scanning.SCAN, 0, 0), (scanning.SCAN, 1, 0), (scanning.SCAN, 2, 9), (scanning.POST, 0), (scanning.POST, 1)]


def _zipf_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.zipf(1.2, (cfg.train.batch_size, cfg.model.seq_len + 1)) - 1) % cfg.model.vocab_size).astype(np.int32)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _per_layer(tree, cfg):
    """A scanned tree (host arrays) in the per-layer layout, converted on the host."""
    per_layer = dataclasses.replace(cfg.model, scan_layers=False)
    target = Trainer.create(dataclasses.replace(cfg, model=per_layer), mesh_of((1, 1, 1))).ctx.abstract_state
    return scanning.convert(tree, {k: target[k] for k in tree}, cfg.model, to_scanned=False,
                            stack=np.stack, index=lambda x, j: x[j])


def _assert_trees_close(a, b, rtol, atol):
    fa, fb = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fb[k], fa[k], rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(k))


@pytest.mark.parametrize("dtype,remat,stem_layers,n_layers,tol", [
    ("float32", "none", "0,1,3,5", 6, 2e-6),  # STEM layer 0 before, [STEM, dense] x 2 scanned, STEM layer 5 after
    ("bfloat16", "full", "1/2", 4, 2e-2),     # [dense, STEM] x 2 scanned, per-layer remat inside the repeat
])
def test_scanned_model_equals_the_per_layer_model_on_a_2x2x2_mesh(dtype, remat, stem_layers, n_layers, tol):
    """Same init, same loss and same gradients (every parameter, STEM tables included) on a Zipf batch,
    with the tables vocab-sharded over 4 devices and looked up through the exchange."""
    cfg = tiny_config(n_layers=n_layers, stem_layers=stem_layers, dtype=dtype, remat=remat)
    scan_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=True))
    mesh = mesh_of((2, 2, 2))
    flat, scan = Trainer.create(cfg, mesh), Trainer.create(scan_cfg, mesh)
    assert scanning.is_scanned(scan.ctx.abstract_state["params"])
    p_flat, p_scan = flat.init_state()["params"], scan.init_state()["params"]
    _assert_trees_close(_host(p_flat), _per_layer({"params": _host(p_scan)}, scan_cfg)["params"], 0, 0)

    batch = _zipf_batch(cfg)

    def loss_and_grads(t, params):
        with jax.set_mesh(mesh):
            f = jax.jit(jax.value_and_grad(lambda p, b: steps.loss(t.ctx.graphdef, p, b)))
            return f(params, data.to_global(batch, t.ctx.batch_sharding))

    (l_flat, g_flat), (l_scan, g_scan) = loss_and_grads(flat, p_flat), loss_and_grads(scan, p_scan)
    np.testing.assert_allclose(float(l_scan), float(l_flat), rtol=tol)
    g_scan = _per_layer({"params": _host(g_scan)}, scan_cfg)["params"]
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(_host(g_flat)))
    _assert_trees_close(_host(g_flat), g_scan, tol, tol * scale)


def _save(workdir, t, state, batches, step):
    mngr = checkpoint.manager(workdir)
    checkpoint.save(mngr, state, batches, {"step": step, "config": to_dict(t.ctx.cfg), "table_rows": t.ctx.tables.rows})
    mngr.wait_until_finished()
    mngr.close()


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_a_checkpoint_restores_into_the_other_layout_on_a_2x2x2_mesh(tmp_path, saved_scanned):
    """Params and Adam moments after two real steps come back identical in the other layout (and the data
    position with them); the tools read either in the per-layer layout."""
    from stem_jax import workdir as workdir_lib
    cfg = tiny_config(n_layers=4, stem_layers="1/2")
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=True))
    src_cfg, dst_cfg = (other, cfg) if saved_scanned else (cfg, other)
    mesh = mesh_of((2, 2, 1))
    src = Trainer.create(src_cfg, mesh)
    tokens = (np.arange(17 * 200 + 1) % 1000).astype(np.uint16)
    batches = iter(data.train_dataset(tokens, cfg.model.seq_len, cfg.train.batch_size, 0, cfg.model.vocab_size))
    state = src.init_state()
    for _ in range(2):
        state, _ = src.step(state, next(batches))
    _save(tmp_path, src, state, batches, step=2)
    saved = {k: _host(state[k]) for k in ("params", "opt_state")}
    want = _per_layer(saved, src_cfg) if saved_scanned else saved

    dst = Trainer.create(dst_cfg, mesh_of((2, 2, 2)))
    mngr = checkpoint.manager(tmp_path, create=False)
    it = iter(data.train_dataset(tokens, cfg.model.seq_len, cfg.train.batch_size, 0, cfg.model.vocab_size))
    got = checkpoint.restore_state(mngr, 2, checkpoint.read_meta(mngr, 2), dst.ctx.abstract_state,
                                   dst.ctx.state_shardings, it, other_layout=lambda: steps.other_layout(dst.ctx))
    mngr.close()
    assert scanning.is_scanned(got["params"]) != saved_scanned
    leaf = jax.tree.leaves(got["params"])[0]
    got = {k: _host(got[k]) for k in ("params", "opt_state")}
    _assert_trees_close(want, _per_layer(got, dst_cfg) if not saved_scanned else got, 0, 0)
    np.testing.assert_array_equal(next(it), next(batches))
    assert leaf.sharding.mesh.shape == mesh_of((2, 2, 2)).shape

    # A tool opens the run in the per-layer layout whichever layout it was saved in.
    (tmp_path / "config.json").write_text(__import__("json").dumps(to_dict(src_cfg)))
    run = workdir_lib.restore(tmp_path, (2, 2, 2), devices=jax.devices()[:8])
    assert not run.cfg.model.scan_layers and not scanning.is_scanned(run.params)
    _assert_trees_close(want["params"], _host(run.params), 0, 0)


def test_train_py_switches_layout_on_resume_and_trains_as_the_per_layer_model(tmp_path, cache_dir):
    """Through train.py: a per-layer run of 12 steps; a copy of it stopped after step 8's checkpoint resumes
    with scanned layers (the checkpoint converted) and repeats steps 9-12 with the same numbers."""
    from conftest import run_script
    from test_resume import TINY, step_rows
    # A small lr: Adam's normalized first steps turn rounding-level gradient differences of coordinates with
    # near-zero gradients into lr-sized parameter differences, which then grow (3e-3: 1e-3 in a grad norm).
    model = ["--config.model.n_layers=4", "--config.model.stem_layers=1/2", "--config.train.eval_batches=1",
             "--config.train.lr=1e-4", "--config.train.steps=12"]

    def train(work, scan):
        r = run_script("train.py", f"--workdir={work}", *TINY, *model, f"--config.model.scan_layers={scan}",
                       cache_dir=cache_dir)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    train(tmp_path / "ref", "false")
    shutil.copytree(tmp_path / "ref", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "12")  # as if stopped after step 8's checkpoint
    r = train(tmp_path / "run", "true")
    assert "resumed from the checkpoint at step 8 " in r.stdout
    assert "changed since that checkpoint: model.scan_layers: False -> True" in r.stdout, r.stdout[-2000:]
    got, want = step_rows(tmp_path / "run"), step_rows(tmp_path / "ref")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in range(9, 13):
        for k in want[step]:
            # metrics.jsonl keeps 6 decimals
            np.testing.assert_allclose(got[step][k], want[step][k], rtol=1e-4, atol=5e-6, err_msg=f"step {step} {k}")
