"""Dense twin of stem_350m.py."""
from configs import stem_350m


def get_config():
    cfg = stem_350m.get_config()
    cfg.model.ffn = "dense"
    return cfg
