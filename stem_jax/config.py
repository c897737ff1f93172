"""Typed run configuration. Presets in ``configs/*.py`` return a ``Config``; the CLI overrides any field
with ``--config.<section>.<field>=value`` (ml_collections config flags)."""

import dataclasses
import difflib
import math
from typing import Sequence

import jax.numpy as jnp

FFN_KINDS = ("dense", "stem", "stem_additive", "stem_gate", "hash_moe")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATA_SOURCES = ("default", "text", "jsonl", "parquet", "tfds")
TABLE_OPTIMIZERS = ("dense", "sparse")
# "exchange" (ids to their row owners and rows back), "shard_map" (masked local gather of the whole batch +
# reduce-scatter) or "xla" (XLA-partitioned gather, the reference): stem.lookup.
LOOKUP_MODES = ("exchange", "shard_map", "xla")
ROW_LAYOUTS = ("spread", "contiguous")
# Per-block rematerialization (model.remat): what a block keeps for the backward pass; model.REMAT_POLICIES.
REMAT = ("none", "full", "dots", "offload")
# Attention kernel (model.attention); "auto" picks by the mesh's platform: splash on TPU, cudnn on GPU, xla else.
ATTENTION = ("auto", "xla", "cudnn", "splash")
# Default exchange slots per round, as a fraction of a device's tokens: one round for batches whose distinct
# ids are at most ~30 % of their tokens (2 x 4096 tokens of the embedded corpus hold 20 %: docs/sharding.md).
EXCHANGE_CAPACITY = 0.3
# The value a field had before it existed: a saved config without it reads as this.
LEGACY = {("model", "stem_row_layout"): "contiguous"}
# Fields renamed since a saved config was written: (section, old name) -> new name.
RENAMED = {("data", "text_files"): "files", ("data", "tfds_text_key"): "text_key"}
RATIO_STRIDE = {"1/3": 3, "1/2": 2}


def stem_layer_indices(spec: str | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """The layers whose FFN is STEM.

    ``"1/3"`` / ``"1/2"``: ``n_layers // k`` layers at stride k = 3 / 2 starting at layer 1, e.g. 16 layers
    give 1/3 = [1, 4, 7, 10, 13] (the paper's 1B run) and 32 layers give 10 / 16 layers (its 350M counts).
    ``"full"``: every layer but 0. ``"none"``: no layer. ``"1,4,7"`` or a sequence: those indices.
    """
    if isinstance(spec, str):
        s = spec.strip()
        if s in RATIO_STRIDE:
            k = RATIO_STRIDE[s]
            idx = tuple(1 + i * k for i in range(n_layers // k))
            if not idx:
                raise ValueError(f"stem_layers={s!r} selects no layer of a {n_layers}-layer model; "
                                 "use 'full' or explicit indices")
            return idx
        if s == "full":
            return tuple(range(1, n_layers))
        if s in ("none", ""):
            return ()
        try:
            spec = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"unknown stem_layers {spec!r}: use '1/3', '1/2', 'full', 'none' "
                             "or comma-separated layer indices like '1,4,7'") from None
    idx = tuple(int(i) for i in spec)
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"stem layer indices {bad} are out of range for n_layers={n_layers} "
                         f"(valid: 0..{n_layers - 1})")
    if len(set(idx)) != len(idx):
        raise ValueError(f"stem layer indices {list(idx)} contain duplicates")
    return tuple(sorted(idx))


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 512
    seq_len: int = 128
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    # FFN of the layers in `stem_layers` (SwiGLU elsewhere): "stem", the ablations "stem_additive" (STEM†,
    # W_up kept plus the row) and "stem_gate" (the row replaces the gate), or the "hash_moe" baseline;
    # "dense" is SwiGLU everywhere. Equations in stem.py and variants.py.
    ffn: str = "stem"
    # "1/3" | "1/2" | "full" | comma-separated indices; the rule is in stem_layer_indices.
    stem_layers: str = "1/3"
    # hash_moe: experts per layer, and their width; 0 = the width that matches the STEM twin's total
    # parameters (see moe_width).
    moe_experts: int = 16
    moe_d_ff: int = 0
    # Width of the STEM rows; 0 means d_ff. Any other value is an error (the row gates d_ff features).
    stem_dim: int = 0
    # "exchange": each device sends its unique ids to the rows' owners and gets the rows back (exchange.py);
    # "shard_map": masked gather of the whole batch + reduce-scatter; "xla": XLA's partitioned gather.
    stem_lookup: str = "exchange"
    # exchange: id/row slots per round as a fraction of a device's tokens (more rounds run if needed).
    stem_capacity: float = EXCHANGE_CAPACITY
    # Where token t's row is stored: "spread" puts consecutive ids (BPE's most frequent are the smallest) on
    # different vocab shards (sharding.stored_rows); "contiguous" stores row t at t (runs saved before spread
    # existed read as contiguous). Fixed for the life of a run.
    stem_row_layout: str = "spread"
    # Keep the STEM tables and their optimizer state in host memory ("pinned_host"); each step moves only
    # the batch's unique rows to the device, prefetched during the previous step (offload.py). Needs
    # train.stem_optimizer="sparse" and one process.
    stem_offload: bool = False
    tie_embeddings: bool = False
    # Std of every backbone matrix (trunc-normal, +-3 sigma); 0 uses Lingua's fan_in**-0.5.
    init_std: float = 0.02
    # Compute dtype; parameters stay float32.
    dtype: str = "float32"
    # What each block saves for the backward pass: "none" (everything), "dots" (matmul outputs without batch
    # dims: recompute norms, activations and attention), "full" (only the block input; recompute the block),
    # "offload" (like full, with block inputs in host memory).
    remat: str = "none"
    # Apply the layers that repeat a block of the placement's period with one lax.scan over stacked
    # parameters (scanning.py): the compiled program stops growing with depth. Checkpoints restore into
    # either layout; tools read the per-layer one.
    scan_layers: bool = False
    # "auto" | "xla" (materialises [B, H, L, L]) | "cudnn" (GPU flash attention) | "splash" (TPU Pallas kernel).
    attention: str = "auto"


@dataclasses.dataclass
class DataConfig:
    # "default" (embedded KJV + Shakespeare), "text", "jsonl" or "parquet" (`files`), or "tfds" (`tfds_name`).
    source: str = "default"
    files: str = ""                 # comma-separated paths or glob patterns (.txt, .jsonl[.gz|.zst], .parquet)
    text_key: str = "text"          # the text field of a JSONL record, Parquet column or TFDS feature
    tfds_name: str = ""             # e.g. "my_builder/config:1.0.0", prepared as array_record
    tfds_data_dir: str = ""
    skip_bad_records: bool = False  # skip (and count) JSONL lines that do not parse or lack the text field
    # "train" (byte-level BPE trained on the train split) or the path of a Hugging Face tokenizer.json.
    tokenizer: str = "train"
    tokenizer_vocab: int = 0        # BPE vocabulary to train; 0 = model.vocab_size
    eos_token: str = ""             # appended after each document; "" = the tokenizer's own (see corpus.EOS_NAMES)
    val_every: int = 20             # a document is held out when its content hash is 0 modulo val_every
    cache_dir: str = ""             # token stores built by train.py; "" = ~/.cache/stem_jax
    store: str = ""                 # a store written by `python -m stem_jax.data_prep`; "" = built in cache_dir
    workers: int = 0                # tokenizer processes when a store is built; 0 = one per core
    packing: bool = False           # attention stays within each document; positions restart at each EOS


@dataclasses.dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16            # global, in sequences
    lr: float = 3e-3
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # The STEM tables are their own parameter group; defaults equal the backbone, as in the paper's code.
    stem_lr_mult: float = 1.0
    stem_weight_decay: float = 0.1
    stem_clip_norm: float = 1.0
    # "dense": optax AdamW over whole tables. "sparse": row-wise AdamW over the batch's unique rows only,
    # with per-row step counts (semantics in sparse.py); needs model.ffn="stem".
    stem_optimizer: str = "dense"
    # Gradient accumulation: the batch runs as this many forward/backward passes (a scan inside the jitted
    # step, fp32 sums) before one update. Must divide the per-device batch; data, update and checkpoints
    # do not depend on it.
    microbatches: int = 1
    # The loss over chunks of this many sequence positions (model.chunked_metrics), so no [B, L, V] float32
    # logits exist at once. Training (0 = the whole sequence): each chunk's logits are recomputed in the
    # backward (one more LM-head matmul). Validation and eval.py always chunk, and run in train.microbatches.
    loss_chunk: int = 0
    eval_loss_chunk: int = 1024
    seed: int = 0
    log_every: int = 20
    eval_batches: int = 16          # validation batches at the end of training (0 = whole split)
    # Checkpoints also go out on the last step and on SIGTERM/SIGINT; rerunning the command resumes.
    checkpoint_every: int = 100     # steps between checkpoints (0 = only the last step and preemption)
    keep_checkpoints: int = 3       # newest checkpoints kept; older ones are deleted after a newer one lands


@dataclasses.dataclass
class MeshConfig:
    # Sizes of the ('data', 'fsdp', 'tensor') mesh axes; one may be -1 (all remaining devices).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


class ConfigError(ValueError):
    """A configuration value that cannot work, with the field named."""


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        raise ConfigError(f"{name}={value!r} is not one of {tuple(choices)}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))


def stem_indices(m: ModelConfig) -> tuple[int, ...]:
    """STEM layer indices of a model config (empty for a dense model)."""
    return () if m.ffn == "dense" else stem_layer_indices(m.stem_layers, m.n_layers)


def moe_width(m: ModelConfig) -> int:
    """Expert width of hash_moe. ``moe_d_ff=0`` matches each MoE layer's parameters to a STEM layer's
    (W_gate, W_down and a [vocab, d_ff] table): 3 * d * width * experts = (2 * d + vocab) * d_ff, rounded to
    a multiple of 8. Per-token compute then differs from STEM's; the comparison matches training FLOPs."""
    if m.moe_d_ff:
        return m.moe_d_ff
    exact = (2 * m.d_model + m.vocab_size) * m.d_ff / (3 * m.d_model * max(m.moe_experts, 1))
    return max(8, 8 * round(exact / 8))


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the field for anything that cannot work; return cfg."""
    m, t = cfg.model, cfg.train
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "seq_len"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name} must be positive, got {getattr(m, name)}")
    _choice("model.ffn", m.ffn, FFN_KINDS)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.stem_lookup", m.stem_lookup, LOOKUP_MODES)
    _choice("model.stem_row_layout", m.stem_row_layout, ROW_LAYOUTS)
    _choice("model.remat", m.remat, REMAT)
    _choice("model.attention", m.attention, ATTENTION)
    if m.attention == "splash" and m.seq_len % 128:
        raise ConfigError(f"model.attention='splash' needs model.seq_len a multiple of 128, got {m.seq_len}")
    if m.attention == "cudnn" and m.dtype != "bfloat16":
        raise ConfigError(f"model.attention='cudnn' needs model.dtype='bfloat16', got {m.dtype!r}")
    if not m.stem_capacity > 0:
        raise ConfigError(f"model.stem_capacity={m.stem_capacity} must be positive (a fraction of a device's tokens)")
    _choice("data.source", cfg.data.source, DATA_SOURCES)
    _choice("train.stem_optimizer", t.stem_optimizer, TABLE_OPTIMIZERS)
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"head dim {m.d_model // m.n_heads} must be even for rotary embeddings")
    if m.stem_dim not in (0, m.d_ff):
        raise ConfigError(f"model.stem_dim={m.stem_dim} must equal model.d_ff={m.d_ff} (or be 0): "
                          "the STEM row multiplies the d_ff gate activations elementwise")
    try:
        idx = stem_indices(m)
    except ValueError as e:
        raise ConfigError(f"model.stem_layers: {e}") from None
    if m.ffn != "dense" and not idx:
        raise ConfigError(f"model.ffn={m.ffn!r} but model.stem_layers selects no layer; use ffn='dense'")
    if m.moe_experts < 1 or m.moe_d_ff < 0:
        raise ConfigError(f"model.moe_experts={m.moe_experts} must be >= 1 and model.moe_d_ff={m.moe_d_ff} >= 0")
    if t.stem_optimizer == "sparse" and m.ffn != "stem":
        raise ConfigError(f"train.stem_optimizer='sparse' updates STEM table rows and needs model.ffn='stem', "
                          f"not {m.ffn!r}")
    if t.stem_optimizer == "sparse" and m.scan_layers:
        raise ConfigError("train.stem_optimizer='sparse' reads each table on its own and does not work with "
                          "model.scan_layers=true yet; set --config.model.scan_layers=false")
    if m.stem_offload and t.stem_optimizer != "sparse":
        raise ConfigError("model.stem_offload=True needs train.stem_optimizer='sparse': the host applies the "
                          "row updates, and dense AdamW would touch every row of the table every step")
    for name in ("steps", "batch_size", "log_every", "keep_checkpoints", "microbatches"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.batch_size % t.microbatches:
        raise ConfigError(f"train.microbatches={t.microbatches} does not divide train.batch_size={t.batch_size}")
    if t.loss_chunk < 0 or t.eval_loss_chunk < 0:
        raise ConfigError(f"train.loss_chunk={t.loss_chunk} and train.eval_loss_chunk={t.eval_loss_chunk} must "
                          "be >= 0 (sequence positions per chunk of the loss; 0 = the whole sequence)")
    if t.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every={t.checkpoint_every} must be >= 0 (0 = last step only)")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
    if t.lr <= 0 or t.stem_lr_mult < 0:
        raise ConfigError("train.lr must be positive and train.stem_lr_mult non-negative")
    if cfg.data.val_every < 2:
        raise ConfigError(f"data.val_every={cfg.data.val_every} must be >= 2")
    _check_ranges(cfg)
    return cfg


# (section, field) -> (lowest, highest, whether the lowest is allowed); every float field is also finite.
RANGES = {
    ("model", "rope_theta"): (0.0, math.inf, False), ("model", "norm_eps"): (0.0, math.inf, False),
    ("model", "init_std"): (0.0, math.inf, False),
    ("train", "min_lr_ratio"): (0.0, 1.0, True), ("train", "b1"): (0.0, 1.0, True),
    ("train", "b2"): (0.0, 1.0, True), ("train", "eps"): (0.0, math.inf, True),
    ("train", "weight_decay"): (0.0, math.inf, True), ("train", "stem_weight_decay"): (0.0, math.inf, True),
    ("train", "clip_norm"): (0.0, math.inf, True), ("train", "stem_clip_norm"): (0.0, math.inf, True),
    ("train", "eval_batches"): (0, math.inf, True), ("data", "tokenizer_vocab"): (0, math.inf, True),
    ("data", "workers"): (0, math.inf, True),
}


def _check_ranges(cfg: Config) -> None:
    for section in ("model", "data", "train", "mesh"):
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            value, name = getattr(sub, f.name), f"{section}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name}={value} must be a finite number")
            lo, hi, lo_ok = RANGES.get((section, f.name), (None, None, None))
            if lo is not None and not ((value >= lo if lo_ok else value > lo) and value <= hi):
                bounds = f"{'[' if lo_ok else '('}{lo}, {hi}]" if hi != math.inf else f"{'>=' if lo_ok else '>'} {lo}"
                raise ConfigError(f"{name}={value} is out of range: must be {bounds}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Inverse of ``to_dict``; unknown keys (e.g. from a newer version) raise ConfigError."""
    kwargs = {}
    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig), ("mesh", MeshConfig)):
        sub = {RENAMED.get((name, k), k): v for k, v in d.get(name, {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(sub) - known
        if unknown:
            raise ConfigError(f"unknown field(s) {sorted(unknown)} in config section {name!r}")
        legacy = {f: v for (section, f), v in LEGACY.items() if section == name and f not in sub}
        kwargs[name] = cls(**sub, **legacy)
    unknown = set(d) - set(kwargs)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}")
    return Config(**kwargs)


def _may_change_on_resume(section: str, name: str) -> bool:
    """Whether a resumed run may differ in this field: not in anything that shapes the parameters, the
    tokens, or the order of batches (the saved data-iterator state indexes batches of that size/seed)."""
    if section in ("mesh",):
        return True  # checkpoints restore onto any mesh
    if section == "train":
        return name not in ("batch_size", "seed", "stem_optimizer")  # the optimizer state differs
    if section == "model":
        # Same parameters and (up to rounding) the same function; offload moves the same arrays to the host.
        return name in ("stem_lookup", "stem_capacity", "dtype", "stem_offload", "remat", "attention",
                        "scan_layers")  # checkpoints convert between the layouts on restore
    return name in ("cache_dir", "workers", "store")  # the store is known by its content (trainer._check_store)


def resume_changes(saved: dict, cfg: Config) -> list[str]:
    """The allowed differences between a checkpoint's config and ``cfg`` as 'field: old -> new' lines;
    raise ConfigError naming the first field that may not change."""
    try:
        old = to_dict(from_dict(saved))  # fills fields added since the checkpoint with their defaults
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"the checkpoint's config cannot be read by this version: {e}") from None
    new, changes = to_dict(cfg), []
    for section, fields in new.items():
        for name, value in fields.items():
            if old[section][name] == value:
                continue
            if not _may_change_on_resume(section, name):
                raise ConfigError(
                    f"{section}.{name}={value!r} differs from the checkpoint's {section}.{name}="
                    f"{old[section][name]!r}; a resumed run must keep it (use a new --workdir to start over)")
            changes.append(f"{section}.{name}: {old[section][name]!r} -> {value!r}")
    return changes


def suggest_key(cfg: Config, dotted: str) -> str:
    """Explain why ``dotted`` (e.g. 'train.stesp') is not a config field, with the closest match."""
    obj, path = cfg, []
    for part in dotted.split("."):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if part not in names:
            hint = difflib.get_close_matches(part, names, n=1)
            where = ".".join(path) or "config"
            msg = f"unknown config key {dotted!r}: {where!s} has no field {part!r}"
            if hint:
                msg += f"; did you mean {'.'.join(path + [hint[0]])!r}?"
            return msg + f" (fields: {', '.join(names)})"
        obj, path = getattr(obj, part), path + [part]
    return ""
