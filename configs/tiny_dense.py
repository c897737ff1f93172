"""Dense twin of tiny.py (SwiGLU in every layer)."""
from configs import tiny


def get_config():
    cfg = tiny.get_config()
    cfg.model.ffn = "dense"
    return cfg
