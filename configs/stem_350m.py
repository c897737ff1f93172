"""STEM-1/3 at the paper's 350M shape (MobileLLM-350M: 32 layers, d 960, 15/5 heads, d_ff 2560, vocab 32000).

STEM layers [1, 4, ..., 28] (10 of 32). Recipe from the paper's code: AdamW lr 2e-3, warmup 2000, cosine to
10 %, wd 0.1, clip 1.0, seq 4096, batch 512 sequences. The mesh is FSDP over every device.

Memory: on a v5p-64 slice (32 chips) the whole batch runs in one pass without rematerialization, with the
splash attention kernel that ``model.attention=auto`` picks on TPU (docs/performance.md, the fit table).
"""
from stem_jax.config import Config, MeshConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(vocab_size=32_000, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, d_ff=2560,
                          seq_len=4096, rope_theta=10_000.0, ffn="stem", stem_layers="1/3", init_std=0.02,
                          dtype="bfloat16", remat="none", attention="auto", scan_layers=True),
        train=TrainConfig(steps=50_000, batch_size=512, lr=2e-3, warmup_steps=2000, log_every=50, microbatches=1),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    )
