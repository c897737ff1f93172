"""Parameter counts of the paper's presets (abstract shapes, nothing allocated) and the FLOP formula."""
import dataclasses

import pytest

from configs import dense_1b, dense_350m, stem_1b, stem_350m
from conftest import tiny_config
from stem_jax.accounting import abstract_params, count_params, flops_per_token
from stem_jax.config import stem_indices


def _counts(cfg):
    return count_params(abstract_params(cfg.model), cfg.model)


def test_1b_preset_counts():
    dense = _counts(dense_1b.get_config())
    assert round(dense.total / 1e9, 2) == 1.50 and dense.active == dense.total and dense.tables == 0
    cfg = stem_1b.get_config()
    assert stem_indices(cfg.model) == (1, 4, 7, 10, 13)
    stem = _counts(cfg)
    assert stem.tables == 5 * 128_256 * 8192
    assert round(stem.active / 1e9, 2) == 1.41          # the paper's active count
    # The paper's 6.75B total is dense + 5 tables; the model itself drops 5 up-projections (16.8M each).
    assert round((dense.total + stem.tables) / 1e9, 2) == 6.75
    assert stem.total == dense.total + stem.tables - 5 * 2048 * 8192


def test_350m_preset_counts():
    dense = _counts(dense_350m.get_config())
    assert round(dense.total / 1e9, 2) == 0.38          # paper: 0.37 (untied embeddings)
    stem = _counts(stem_350m.get_config())
    assert len(stem_indices(stem_350m.get_config().model)) == 10
    assert round(stem.active / 1e9, 2) == 0.35          # paper: 0.35


def test_flops_match_the_paper_formula_for_full_mha():
    cfg = tiny_config(n_heads=2, n_kv_heads=2, ffn="dense").model
    d, f, L, n, V = cfg.d_model, cfg.d_ff, cfg.seq_len, cfg.n_layers, cfg.vocab_size
    macs = n * (4 * d * d + 2 * L * d + 3 * d * f) + d * V  # per token; + LM head
    assert flops_per_token(cfg, training=False) == 2 * macs
    assert flops_per_token(cfg) == 6 * macs
    stem = dataclasses.replace(cfg, ffn="stem", stem_layers="1,2")
    assert flops_per_token(cfg, training=False) - flops_per_token(stem, training=False) == 2 * 2 * d * f


@pytest.mark.parametrize("ffn", ["dense", "stem"])
def test_counts_exclude_table_padding(ffn):
    cfg = tiny_config(ffn=ffn)
    c = _counts(cfg)
    n_stem = len(stem_indices(cfg.model))
    assert c.tables == n_stem * cfg.model.vocab_size * cfg.model.d_ff
    assert c.active == c.total - c.tables + n_stem * cfg.model.d_ff
