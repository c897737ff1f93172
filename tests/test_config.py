"""Config validation: every bad value is named."""

import pytest

from conftest import tiny_config
from stem_jax.config import Config, ConfigError, from_dict, resume_changes, suggest_key, to_dict, validate


@pytest.mark.parametrize("section,field,value,msg", [
    ("model", "stem_layers", "1/4", "unknown stem_layers"),
    ("model", "stem_layers", "1,7", "out of range for n_layers=3"),
    ("model", "stem_dim", 64, "must equal model.d_ff=96"),
    ("model", "ffn", "stemm", "did you mean 'stem'"),
    ("model", "dtype", "fp16", "model.dtype"),
    ("model", "n_kv_heads", 3, "not divisible by model.n_kv_heads=3"),
    ("model", "d_model", 31, "not divisible by model.n_heads"),
    ("model", "d_model", 30, "must be even for rotary"),
    ("model", "vocab_size", 0, "must be positive"),
    ("model", "stem_lookup", "onehot", "model.stem_lookup"),
    ("model", "stem_layers", "none", "selects no layer"),
    ("train", "batch_size", 0, "train.batch_size must be positive"),
    ("data", "source", "web", "data.source"),
    ("model", "remat", "dot", r"model.remat='dot' is not one of \('none', 'full', 'dots', 'offload'\)"),
    ("model", "attention", "flash", r"model.attention='flash' is not one of \('auto', 'xla', 'cudnn', 'splash'\)"),
    ("model", "attention", "splash", "needs model.seq_len a multiple of 128, got 16"),
    ("model", "attention", "cudnn", "model.attention='cudnn' needs model.dtype='bfloat16'"),
    ("train", "microbatches", 3, "train.microbatches=3 does not divide train.batch_size=8"),
    ("train", "microbatches", 0, "train.microbatches must be positive"),
])
def test_bad_values_are_named(section, field, value, msg):
    cfg = tiny_config()
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=msg):
        validate(cfg)


def test_the_sparse_table_optimizer_refuses_scanned_layers():
    cfg = tiny_config(scan_layers=True)
    cfg.train.stem_optimizer = "sparse"
    with pytest.raises(ConfigError, match="does not work with model.scan_layers=true yet; set "
                                          "--config.model.scan_layers=false"):
        validate(cfg)


def test_dense_ignores_stem_layers_and_round_trips():
    cfg = tiny_config(ffn="dense", stem_layers="whatever")
    assert validate(cfg) is cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_from_dict_rejects_unknown_fields():
    d = to_dict(tiny_config())
    d["model"]["d_modle"] = 3
    with pytest.raises(ConfigError, match="d_modle"):
        from_dict(d)


def test_suggest_key():
    cfg = tiny_config()
    assert "did you mean 'train.steps'" in suggest_key(cfg, "train.stesp")
    assert "did you mean 'model'" in suggest_key(cfg, "modle.d_model")
    assert suggest_key(cfg, "train.steps") == ""


@pytest.mark.parametrize("section,field,value", [
    ("model", "vocab_size", 4096), ("model", "d_model", 64), ("model", "d_ff", 1024),
    ("model", "stem_layers", "full"), ("model", "ffn", "dense"), ("model", "n_layers", 7),
    ("data", "source", "text"), ("train", "batch_size", 32), ("train", "seed", 1),
])
def test_resume_refuses_a_different_model_or_data_order_naming_the_field(section, field, value):
    saved = to_dict(Config())
    cfg = Config()
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=rf"{section}\.{field}={value!r} differs from the checkpoint's "
                                          rf"{section}\.{field}="):
        resume_changes(saved, cfg)


def test_resume_allows_and_lists_training_knobs_mesh_and_lookup():
    saved = to_dict(Config())
    del saved["train"]["keep_checkpoints"]  # written by a version without the field: its default applies
    cfg = Config()
    cfg.train.steps, cfg.train.lr, cfg.train.log_every = 1200, 1e-3, 5
    cfg.mesh.data, cfg.mesh.fsdp, cfg.model.stem_lookup = 2, 4, "xla"
    cfg.model.remat, cfg.train.microbatches = "full", 2  # memory knobs: same update
    assert resume_changes(saved, cfg) == [
        "model.stem_lookup: 'exchange' -> 'xla'", "model.remat: 'none' -> 'full'", "train.steps: 600 -> 1200",
        "train.lr: 0.003 -> 0.001", "train.microbatches: 1 -> 2", "train.log_every: 20 -> 5", "mesh.data: -1 -> 2",
        "mesh.fsdp: 1 -> 4"]
    assert resume_changes(saved, Config()) == []


def test_configs_saved_before_the_row_layout_read_as_contiguous():
    saved = to_dict(Config())
    del saved["model"]["stem_row_layout"]  # a run saved before the field existed stored row t at t
    assert from_dict(saved).model.stem_row_layout == "contiguous"
    assert Config().model.stem_row_layout == "spread"  # new runs spread rows over the vocab shards
    cfg = from_dict(saved)
    cfg.model.stem_row_layout = "spread"
    with pytest.raises(ConfigError, match="stem_row_layout"):  # the stored tables would be misread
        resume_changes(to_dict(from_dict(saved)), cfg)


def test_configs_saved_with_renamed_data_fields_still_read():
    saved = to_dict(Config())
    for old, new in (("text_files", "files"), ("tfds_text_key", "text_key")):
        saved["data"][old] = saved["data"].pop(new)
    saved["data"]["text_files"], saved["data"]["tfds_text_key"] = "a.txt,b.txt", "body"
    cfg = from_dict(saved)
    assert (cfg.data.files, cfg.data.text_key) == ("a.txt,b.txt", "body")
