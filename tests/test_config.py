"""Config validation: every bad value is named."""
import dataclasses

import pytest

from conftest import tiny_config
from stem_jax.config import ConfigError, from_dict, suggest_key, to_dict, validate


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
])
def test_bad_values_are_named(section, field, value, msg):
    cfg = tiny_config()
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=msg):
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
