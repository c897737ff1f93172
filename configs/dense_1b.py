"""Dense twin of stem_1b.py."""
from configs import stem_1b


def get_config():
    cfg = stem_1b.get_config()
    cfg.model.ffn = "dense"
    return cfg
