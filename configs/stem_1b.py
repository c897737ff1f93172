"""STEM-1/3 at the paper's 1B shape (Llama-3.2-1B: 16 layers, d 2048, 32/8 heads, d_ff 8192, vocab 128256,
RoPE theta 5e5). STEM layers [1, 4, 7, 10, 13]. AdamW lr 4e-4 (paper), warmup 2000, cosine to 10 %,
seq 4096, batch 512 sequences. The mesh is FSDP over every device.

Memory: on a v5p-64 slice (32 chips) the batch runs as 2 microbatches without rematerialization, with the
splash attention kernel that ``model.attention=auto`` picks on TPU (docs/performance.md, the fit table).
"""
from stem_jax.config import Config, MeshConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                          seq_len=4096, rope_theta=500_000.0, ffn="stem", stem_layers="1/3", init_std=0.02,
                          dtype="bfloat16", remat="none", attention="auto", scan_layers=True),
        train=TrainConfig(steps=480_000, batch_size=512, lr=4e-4, warmup_steps=2000, log_every=50, microbatches=2),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    )
