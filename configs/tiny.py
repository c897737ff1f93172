"""Tiny STEM-1/3 model for a CPU: 6 layers, d 128, STEM at layers [1, 4]; the default of `python train.py`."""
from stem_jax.config import Config, MeshConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(vocab_size=8192, d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=512,
                          seq_len=128, rope_theta=10_000.0, ffn="stem", stem_layers="1/3"),
        train=TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup_steps=30, log_every=20),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),
    )
