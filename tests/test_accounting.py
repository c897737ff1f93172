"""Parameter counts of the paper's presets (abstract shapes, nothing allocated) and the FLOP formula."""
import dataclasses

import pytest

from configs import dense_1b, dense_350m, stem_1b, stem_350m, tiny
from conftest import tiny_config
from stem_jax import accounting
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


def test_report_in_the_papers_columns_for_the_1b_presets():
    dense = accounting.report(dense_1b.get_config().model)
    stem = accounting.report(stem_1b.get_config().model)
    assert round(dense["total_params"] / 1e9, 2) == 1.50 and round(dense["gflops"], 2) == 3.00
    assert round(stem["paper_total_params"] / 1e9, 2) == 6.75
    assert round(stem["active_params"] / 1e9, 2) == 1.41
    assert stem["gflops"] == 2 * stem["active_params"] / 1e9 and round(stem["gflops"], 2) == 2.83
    # The paper's ROI arithmetic: (50.90 / 0.70) / (49.72 / 0.74) = 1.08 at 350M.
    assert round(accounting.roi(50.90, 0.70, 49.72, 0.74), 2) == 1.08


def test_variant_counts_and_flops():
    base = tiny_config(stem_layers="1,2", moe_experts=4).model
    D, F, V = base.d_model, base.d_ff, base.vocab_size
    rep = {f: accounting.report(dataclasses.replace(base, ffn=f))
           for f in ("dense", "stem", "stem_additive", "stem_gate", "hash_moe")}
    # STEM and gate replacement each drop one d x d_ff matrix per layer and add a V x d_ff table.
    for f in ("stem", "stem_gate"):
        assert rep[f]["total_params"] == rep["dense"]["total_params"] + 2 * (V * F - D * F)
        assert rep[f]["active_params"] == rep["dense"]["active_params"] - 2 * (D * F - F)
        assert rep["dense"]["infer_flops_per_token"] - rep[f]["infer_flops_per_token"] == 2 * 2 * D * F
    # STEM† keeps W_up: the table is extra, and its FLOPs equal dense.
    assert rep["stem_additive"]["total_params"] == rep["dense"]["total_params"] + 2 * V * F
    assert rep["stem_additive"]["infer_flops_per_token"] == rep["dense"]["infer_flops_per_token"]
    # Hash-MoE: total matched to STEM; one expert of four active. The expert width is read off the built
    # model, not from moe_width; it is the nearest multiple of 8 to the exact match, so at most 4 off per layer.
    moe = rep["hash_moe"]
    w_up_ExDxW = abstract_params(dataclasses.replace(base, ffn="hash_moe"))["blocks"][1]["ffn"]["w_up"]
    W = w_up_ExDxW.shape[-1]
    assert moe["total_params"] == rep["dense"]["total_params"] + 2 * (4 * 3 * D * W - 3 * D * F)
    assert moe["active_params"] == rep["dense"]["active_params"] + 2 * (3 * D * W - 3 * D * F)
    assert abs(moe["total_params"] - rep["stem"]["total_params"]) <= 2 * 4 * 3 * D * 4


def test_tiny_preset_hash_moe_has_the_stem_total():
    # README: width 704 gives Hash-MoE-1/3 the 11.83M total of STEM-1/3 (active 3.72M vs 3.44M).
    cfg = tiny.get_config().model
    stem, moe = accounting.report(cfg), accounting.report(dataclasses.replace(cfg, ffn="hash_moe"))
    assert moe["ffn_layers"] == stem["ffn_layers"] == [1, 4]
    assert moe["total_params"] == stem["total_params"] and round(stem["total_params"] / 1e6, 2) == 11.83
    assert round(moe["active_params"] / 1e6, 2) == 3.72 and round(stem["active_params"] / 1e6, 2) == 3.44


def test_mfu_uses_the_peak_table_and_skips_unknown_devices():
    class Dev:
        def __init__(self, kind):
            self.device_kind = kind
    assert accounting.peak_flops("TPU v5 lite") == 197e12 and accounting.peak_flops("TPU v5p") == 459e12
    assert accounting.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert accounting.mfu(1e5, 6e9, [Dev("NVIDIA H100 80GB HBM3")] * 2) == 1e5 * 6e9 / (2 * 989e12)
    assert accounting.mfu(1e5, 6e9, [Dev("cpu")]) is None
