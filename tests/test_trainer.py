"""The jitted train step: sharded equals unsharded, in both lookup modes; the trainer and its token store."""
import os
import re
import shutil

import jax
import numpy as np
import pytest

from conftest import mesh_of, tiny_config
from stem_jax import checkpoint, corpus, sharding, trainer
from stem_jax.config import ConfigError, DataConfig
from stem_jax.trainer import Trainer


def _one_step(cfg, shape, batch):
    s = Trainer.create(cfg, mesh_of(shape))
    state = s.init_state()
    init = jax.device_get(state["params"])  # before the step donates the state
    state, metrics = s.step(state, batch)
    return jax.device_get(state["params"]), jax.device_get(metrics), s, init


# The default lookup end to end; "shard_map" and "xla" are checked against numpy in test_stem.py.
@pytest.mark.parametrize("lookup", ["exchange"])
def test_train_step_on_2x4_mesh_equals_single_device(lookup):
    cfg = tiny_config(stem_lookup=lookup)
    cfg.train.warmup_steps = 0  # a warmup starts at lr 0: the first step would not move the parameters
    rng = np.random.default_rng(0)
    batch = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
    p1, m1, _, init = _one_step(cfg, (1, 1, 1), batch)
    p8, m8, s8, _ = _one_step(cfg, (2, 4, 1), batch)
    assert float(m1["lr"]) == pytest.approx(cfg.train.lr)
    assert s8.ctx.state_shardings["params"]["blocks"][1]["ffn"]["table"].get_value().spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m8["stem_grad_norm"], m1["stem_grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(m8["backbone_grad_norm"], m1["backbone_grad_norm"], rtol=1e-4)
    flat1 = jax.tree_util.tree_flatten_with_path(p1)[0]
    flat8 = dict(jax.tree_util.tree_flatten_with_path(p8)[0])
    flat0 = dict(jax.tree_util.tree_flatten_with_path(init)[0])
    for path, a in flat1:
        assert np.max(np.abs(a - flat0[path])) > 1e-3, f"{jax.tree_util.keystr(path)} did not move"
        # Adam's first update is g / (|g| + eps): where |g| is near eps, summation-order noise in g moves it by
        # up to ~lr * 1e-2 (a sign error would be 2 * lr).
        np.testing.assert_allclose(flat8[path], a, rtol=2e-4, atol=cfg.train.lr * 1e-2,
                                   err_msg=jax.tree_util.keystr(path))
    # Only the rows of tokens in the batch moved (plus weight decay on every row).
    table0 = p1["blocks"][1]["ffn"]["table"]
    assert table0.shape == (1024, cfg.model.d_ff)
    by_token = sharding.table_by_token(table0, cfg.model)
    assert np.all(by_token[cfg.model.vocab_size:] == 0)  # padding rows: zero grad, zero decay


def test_dense_twin_has_no_tables_and_trains():
    cfg = tiny_config(ffn="dense")
    batch = np.zeros((cfg.train.batch_size, cfg.model.seq_len + 1), np.int32)
    params, metrics, s, _ = _one_step(cfg, (8, 1, 1), batch)
    assert s.ctx.stem_layers == ()
    assert "table" not in str(jax.tree_util.tree_structure(params))
    assert float(metrics["stem_grad_norm"]) == 0.0 and np.isfinite(metrics["loss"])


def test_non_finite_metrics_stop_training_with_the_step_named():
    from stem_jax.trainer import _check_finite
    assert _check_finite(3, {"loss": np.float32(2.5)}) == {"loss": 2.5}
    with pytest.raises(FloatingPointError, match="non-finite metrics at step 7"):
        _check_finite(7, {"loss": np.float32(np.nan), "stem_grad_norm": np.float32(1.0)})


def test_resume_refuses_a_checkpoint_of_another_process_count():
    from stem_jax.config import ConfigError, to_dict
    from stem_jax.trainer import _resume_check
    cfg = tiny_config()
    check = _resume_check(cfg, {"tokenizer_sha256": "t", "process_count": 1, "mesh": {}}, [])
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1"):
        check({"config": to_dict(cfg), "tokenizer_sha256": "t", "process_count": 2, "mesh": {}})


def test_resume_with_an_old_checkpoint_keeps_the_store_path_rule():
    """Checkpoints from before store fingerprints: data.store may not move (nothing to compare it by)."""
    from stem_jax.config import ConfigError, to_dict
    from stem_jax.trainer import _resume_check
    cfg = tiny_config()
    cfg.data.store = "/data/new"
    meta = {"tokenizer_sha256": "t", "process_count": 1, "mesh": {}, "store_fingerprint": "f",
            "store_path": "/data/new"}
    saved = {"config": to_dict(tiny_config()), "tokenizer_sha256": "t", "process_count": 1, "mesh": {}}
    saved["config"]["data"]["store"] = "/data/old"
    with pytest.raises(ConfigError, match="records no store fingerprint to compare"):
        _resume_check(cfg, meta, [])(saved)
    notes = []
    _resume_check(cfg, meta, notes)({**saved, "store_fingerprint": "f"})
    assert notes == ["data.store: '/data/old' -> '/data/new' (the same content, fingerprint f)"]


def _store(root, name, seed):
    from test_corpus import _write_jsonl
    f = _write_jsonl(root / f"{name}.jsonl", 300, seed)
    return corpus.build_store(DataConfig(source="jsonl", files=f, val_every=4), 1000, root / name, workers=1,
                              log=lambda *_: None)


def _run_cfg(store, steps, **data):
    cfg = tiny_config(n_layers=2, stem_layers="1")
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches, cfg.train.log_every = steps, 2, 1, 1
    cfg.data.store = str(store)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _files(work):
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}


def test_a_run_knows_its_store_by_content_not_by_path(tmp_path, capsys):
    """A store's tokenizer only; an identical copy at a new path resumes (with a note); another corpus built at
    the same path is refused with both fingerprints and the workdir untouched."""
    a, work = _store(tmp_path, "a", 0), tmp_path / "run"
    corpus.train_tokenizer(["gate down row " * 50], 300).save(str(tmp_path / "other.json"))
    with pytest.raises(corpus.StoreError, match="is not the tokenizer of the store"):
        trainer.train_and_evaluate(_run_cfg(a, 2, tokenizer=str(tmp_path / "other.json")), work)
    assert not work.exists()  # refused before any work
    with pytest.raises(corpus.StoreError, match="is not the store's end-of-document token"):
        trainer.train_and_evaluate(_run_cfg(a, 2, eos_token="gate"), work)
    trainer.train_and_evaluate(_run_cfg(a, 2), work)
    fp = corpus.open_store(a).fingerprint
    moved = shutil.copytree(a, tmp_path / "moved")
    capsys.readouterr()
    trainer.train_and_evaluate(_run_cfg(moved, 4), work)
    assert f"data.store: '{a}' -> '{moved}' (the same content, fingerprint {fp})" in capsys.readouterr().out
    shutil.rmtree(moved)
    _store(tmp_path, "moved", 1)  # another corpus rebuilt at the same path
    other = corpus.open_store(moved).fingerprint
    before = _files(work)
    with pytest.raises(ConfigError, match=f"holds other tokens \\(content fingerprint {other}\\).*fingerprint {fp}"):
        trainer.train_and_evaluate(_run_cfg(moved, 6), work)
    assert _files(work) == before


@pytest.mark.parametrize("damage", ["truncate a train shard", "delete the store"])
def test_a_store_that_changes_under_a_run_stops_it_naming_its_newest_checkpoint(tmp_path, monkeypatch, damage):
    """No SIGBUS, no traceback from deep in a reader: one error naming the store, the shard and the newest
    checkpoint, which restores."""
    store, work = _store(tmp_path, "s", 0), tmp_path / "run"
    save, steps = checkpoint.save, (12 if damage.startswith("truncate") else 4)

    def save_then_damage(mngr, state, it, meta):
        step = save(mngr, state, it, meta)
        if damage.startswith("truncate") and step == 2:
            for p in (store / "shards").glob("*.train.bin"):
                os.truncate(p, p.stat().st_size // 3)
        elif damage.startswith("delete") and step == steps:
            shutil.rmtree(store)  # the train shard stays readable through its open file; validation is next
        return step
    monkeypatch.setattr(checkpoint, "save", save_then_damage)
    with pytest.raises(corpus.StoreError, match=r"changed .* training stopped\. The newest checkpoint, step (\d+), "
                                                r"is intact; restore the store") as e:
        trainer.train_and_evaluate(_run_cfg(store, steps), work)
    assert str(store) in str(e.value) and "\n" not in str(e.value)
    last = int(re.search(r"step (\d+), is intact", str(e.value)).group(1))
    assert (last == steps) if damage.startswith("delete") else (2 <= last < steps)
    assert checkpoint.read_step_meta(work, last)["step"] == last
