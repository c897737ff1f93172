"""8 fake CPU devices for every test, set before JAX initialises its backends."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from stem_jax import sharding  # noqa: E402


def mesh_of(shape):
    """A mesh over the first prod(shape) devices (shape has no -1)."""
    n = 1
    for s in shape:
        n *= s
    return sharding.make_mesh(shape, devices=jax.devices()[:n])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer / token cache per test session, shared with CLI subprocesses."""
    return str(tmp_path_factory.mktemp("stem_cache"))


def tiny_config(**model_overrides):
    """A model small enough to compile in a few seconds; vocab 1000 needs padding to 1024 table rows."""
    from stem_jax.config import Config, ModelConfig, TrainConfig
    model = dict(vocab_size=1000, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=96, seq_len=16,
                 ffn="stem", stem_layers="full")
    model.update(model_overrides)
    return Config(model=ModelConfig(**model), train=TrainConfig(steps=10, batch_size=8, lr=1e-2, warmup_steps=2))
