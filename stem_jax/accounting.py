"""Parameter, FLOP and efficiency accounting in the paper's conventions (lookups are gathers: zero FLOPs).

- total params count every parameter once, STEM tables at ``vocab_size`` rows (padding excluded);
- active params per token: the total minus the tables plus one ``d_ff`` row per table layer, minus the
  experts a token does not use (Hash-MoE); the input embedding counts in full, as in the paper;
- "GFLOPs" (the paper's column) is 2 x active params, in 1e9;
- ROI is metric per FLOP normalised to the dense twin: ``(m / f) / (m_dense / f_dense)``;
- MFU is model FLOPs per second over the devices' peak (bf16 dense-matmul peaks; unknown device -> None).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx

from stem_jax import sharding
from stem_jax.config import ModelConfig, moe_width, stem_indices
from stem_jax.model import Transformer

# Peak dense bf16 FLOP/s per device (vendor figures), matched as lowercase substrings of ``device_kind``;
# more specific names first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu7x", 2307e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12), ("tpu v3", 123e12),
    ("h200", 989e12), ("h100", 989e12), ("gh200", 989e12), ("b200", 2250e12),
    ("a100", 312e12), ("l40s", 362e12), ("l4", 121e12), ("a10g", 125e12), ("v100", 125e12),
)


@dataclasses.dataclass
class ParamCounts:
    total: int          # every parameter; STEM tables counted at vocab_size rows (padding excluded)
    tables: int         # STEM tables alone
    active: int         # touched per token
    paper_total: int    # the paper's convention: the dense twin's total plus the tables (6.75B for STEM-1B)

    def describe(self) -> str:
        return (f"params: total {self.total / 1e6:,.2f}M (STEM tables {self.tables / 1e6:,.2f}M), "
                f"active per token {self.active / 1e6:,.2f}M")


def count_params(params: Any, cfg: ModelConfig) -> ParamCounts:
    """Counts from a (possibly abstract) parameter state of ``Transformer``."""
    total = tables = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        n = math.prod(leaf.shape)
        if sharding.is_table_path(path):
            n = cfg.vocab_size * math.prod(leaf.shape) // leaf.shape[-2]  # padding rows are never addressed
            tables += n
        total += n
    n_layers = len(stem_indices(cfg))
    if cfg.ffn == "hash_moe":  # a token runs one expert of each MoE layer
        unused = n_layers * (cfg.moe_experts - 1) * 3 * cfg.d_model * moe_width(cfg)
        return ParamCounts(total, 0, total - unused, total)
    # STEM and gate replacement drop one d x d_ff matrix per layer, which the paper's totals still count.
    dropped = n_layers * cfg.d_model * cfg.d_ff if cfg.ffn in ("stem", "stem_gate") else 0
    return ParamCounts(total, tables, total - tables + n_layers * cfg.d_ff, total + dropped)


def abstract_params(cfg: ModelConfig) -> Any:
    """Parameter shapes without allocating (works for the 1B preset on a laptop)."""
    return nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def ffn_macs_per_token(cfg: ModelConfig) -> int:
    """Multiply-adds per token of all FFNs: SwiGLU 3·d·d_ff, STEM and gate-replacement 2·d·d_ff (one matmul
    became a lookup), STEM† 3·d·d_ff (the row is added, nothing removed), Hash-MoE 3·d·width."""
    D, F = cfg.d_model, cfg.d_ff
    n_var = len(stem_indices(cfg))
    per_layer = {"dense": 3 * D * F, "stem": 2 * D * F, "stem_gate": 2 * D * F, "stem_additive": 3 * D * F,
                 "hash_moe": 3 * D * moe_width(cfg)}[cfg.ffn]
    return 3 * D * F * (cfg.n_layers - n_var) + per_layer * n_var


def flops_per_token(cfg: ModelConfig, training: bool = True) -> float:
    """Model FLOPs per token: 2 per multiply-add of every matmul (x3 for training), attention scores and
    values over the full ``seq_len`` (no causal discount, as in the paper's 2L^2 d term); lookups are free.
    With full MHA one layer is the paper's 4d^2 + 2Ld + 3d·d_ff (dense) or 4d^2 + 2Ld + 2d·d_ff (STEM)."""
    D, L = cfg.d_model, cfg.seq_len
    K = D // cfg.n_heads
    attn_proj = D * K * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    matmul = cfg.n_layers * attn_proj + ffn_macs_per_token(cfg) + D * cfg.vocab_size  # + LM head
    forward = 2 * matmul + 2 * 2 * cfg.n_layers * L * D
    return float(3 * forward if training else forward)


def roi(metric: float, flops: float, dense_metric: float, dense_flops: float) -> float:
    """The paper's training ROI: metric per FLOP relative to the dense twin (higher is better)."""
    return (metric / flops) / (dense_metric / dense_flops)


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def mfu(tokens_per_sec: float, train_flops_per_token: float, devices: list | None = None) -> float | None:
    """Model FLOPs utilisation of a training run over ``devices`` (default: all); None for unknown devices
    (CPUs included)."""
    devices = jax.devices() if devices is None else devices
    peaks = [peak_flops(d.device_kind) for d in devices]
    if not peaks or None in peaks:
        return None
    return tokens_per_sec * train_flops_per_token / sum(peaks)


def report(cfg: ModelConfig) -> dict:
    """The accounting row of a model config: params (total / active / tables), the paper's GFLOPs column,
    and training / inference FLOPs per token."""
    c = count_params(abstract_params(cfg), cfg)
    return {"ffn": cfg.ffn, "ffn_layers": list(stem_indices(cfg)), "total_params": c.total,
            "paper_total_params": c.paper_total, "active_params": c.active, "table_params": c.tables, "gflops": 2 * c.active / 1e9,
            "train_flops_per_token": flops_per_token(cfg), "infer_flops_per_token": flops_per_token(cfg, False)}
