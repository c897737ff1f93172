"""Parameter and FLOP accounting (lookups are gathers: zero model FLOPs)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx

from stem_jax.config import ModelConfig, stem_indices
from stem_jax.model import Transformer


@dataclasses.dataclass
class ParamCounts:
    total: int          # every parameter; STEM tables counted at vocab_size rows (padding excluded)
    tables: int         # STEM tables alone
    active: int         # touched per token: total - tables + one d_ff row per STEM layer

    def describe(self) -> str:
        return (f"params: total {self.total / 1e6:,.2f}M (STEM tables {self.tables / 1e6:,.2f}M), "
                f"active per token {self.active / 1e6:,.2f}M")


def count_params(params: Any, cfg: ModelConfig) -> ParamCounts:
    """Counts from a (possibly abstract) parameter state of ``Transformer``."""
    total = tables = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        n = math.prod(leaf.shape)
        if any(getattr(k, "key", None) == "table" for k in path):
            n = cfg.vocab_size * leaf.shape[1]      # padding rows are never addressed
            tables += n
        total += n
    active = total - tables + len(stem_indices(cfg)) * cfg.d_ff
    return ParamCounts(total, tables, active)


def abstract_params(cfg: ModelConfig) -> Any:
    """Parameter shapes without allocating (works for the 1B preset on a laptop)."""
    return nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def flops_per_token(cfg: ModelConfig, training: bool = True) -> float:
    """Model FLOPs per token: 2 per multiply-add of every matmul (x3 for training), attention scores and
    values over the full ``seq_len`` (no causal discount, as in the paper's 2L^2 d term); lookups are free."""
    D, F, L = cfg.d_model, cfg.d_ff, cfg.seq_len
    K = D // cfg.n_heads
    n_stem = len(stem_indices(cfg))
    attn_proj = D * K * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    ffn = 3 * D * F * (cfg.n_layers - n_stem) + 2 * D * F * n_stem
    matmul = cfg.n_layers * attn_proj + ffn + D * cfg.vocab_size  # + LM head
    forward = 2 * matmul + 2 * 2 * cfg.n_layers * L * D
    return float(3 * forward if training else forward)
