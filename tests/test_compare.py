"""The matched-FLOPs comparison: step plan, spike counter, and one small end-to-end run through the CLI."""
import json

import numpy as np
import pytest

from conftest import run_script, tiny_config
from stem_jax import accounting
from stem_jax.config import ConfigError
from stem_jax.experiments.compare import count_spikes, plan


def test_plan_matches_training_flops_to_the_dense_run():
    base = tiny_config(n_layers=6)
    runs = plan(base, ["dense", "stem-1/3", "stem-full", "hash-moe"], dense_steps=300)
    budget = accounting.flops_per_token(runs["dense"].model) * 300
    assert runs["dense"].train.steps == 300 and runs["stem-1/3"].model.stem_layers == "1/3"
    for name, cfg in runs.items():
        spent = accounting.flops_per_token(cfg.model) * cfg.train.steps
        assert abs(spent - budget) <= accounting.flops_per_token(cfg.model) / 2, name
    assert runs["stem-full"].train.steps > runs["stem-1/3"].train.steps > 300  # cheaper tokens, more of them
    with pytest.raises(ConfigError, match="unknown comparison run"):
        plan(base, ["stem-1/4"], 10)


def test_spike_counter():
    falling = np.linspace(8.0, 3.0, 100)
    assert count_spikes(falling) == 0
    spiky = falling.copy()
    spiky[[40, 70, 71]] += 1.5
    assert count_spikes(spiky) == 3
    assert count_spikes(falling + np.random.default_rng(0).normal(0, 0.05, 100)) == 0


def test_compare_cli_writes_table_and_plots(tmp_path, cache_dir):
    out = tmp_path / "cmp"
    r = run_script("stem_jax/experiments/compare.py", "--out", out, "--runs", "dense,stem-full",
                   "--dense_steps", "10", "--config.model.d_model=32",
                   "--config.model.n_layers=2", "--config.model.stem_layers=full", "--config.model.d_ff=64",
                   "--config.model.n_heads=2",
                   "--config.model.n_kv_heads=1", "--config.model.seq_len=16", "--config.train.batch_size=4",
                   "--config.train.eval_batches=2", "--config.train.warmup_steps=1", "--config.train.lr=0.03", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [x["name"] for x in results] == ["dense", "stem-full"]
    assert results[0]["val_acc"] > 0, results  # 10 steps learn the most frequent tokens
    assert results[0]["roi"] == 1.0 and results[1]["steps"] >= 10
    assert "| stem-full | [1] |" in (out / "results.md").read_text()
    for png in ("loss_vs_flops.png", "loss_vs_tokens.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
