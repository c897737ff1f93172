"""Hugging Face interop: safetensors export / import with Llama key names, and dense -> STEM conversion.

    python -m stem_jax.hf export  --workdir runs/tiny_dense --out exports/tiny_dense
    python -m stem_jax.hf import  --hf_dir exports/tiny_dense --workdir runs/imported
    python -m stem_jax.hf to_stem --workdir runs/tiny_dense --out runs/tiny_stem --stem_layers 1/3

Keys of ``model.safetensors`` (float32; linear weights [out, in], as ``torch.nn.Linear`` stores them):

    model.embed_tokens.weight                           [V, D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight    [H*K, D], [KV*K, D], [KV*K, D], [D, H*K]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight     [F, D], [F, D], [D, F]   (no up_proj in a STEM layer)
    model.layers.{i}.mlp.stem_table.weight              [V, F]   STEM layers only; not a Llama key
    model.layers.{i}.{input,post_attention}_layernorm.weight   [D]
    model.norm.weight                                   [D]
    lm_head.weight                                      [V, D]   absent when the embeddings are tied

A dense export is a plain ``LlamaForCausalLM`` checkpoint (our RoPE already uses HF's half-split layout).
A STEM export has ``model_type: "stem_llama"`` so that transformers refuses it instead of loading it with
randomly initialised up-projections; its ``stem_jax`` config section records the FFN kind and STEM layers.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
from absl import flags
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from stem_jax import checkpoint, cli, sharding, workdir as workdir_lib
from stem_jax.config import Config, ModelConfig, from_dict, stem_indices, to_dict, validate

STEM_TABLE_KEY = "model.layers.{i}.mlp.stem_table.weight"
STEM_MODEL_TYPE = "stem_llama"
EXPORTABLE_FFN = ("dense", "stem")
ParamPath = tuple  # a path in the params pure dict, e.g. ("blocks", 1, "ffn", "w_gate")


def key_map(m: ModelConfig) -> dict[ParamPath, tuple[str, str]]:
    """Our param path -> (HF key, kind); kind says how the array is laid out (see ``to_hf``)."""
    stem = stem_indices(m)
    out = {("embed",): ("model.embed_tokens.weight", "copy"), ("final_norm", "scale"): ("model.norm.weight", "copy")}
    if not m.tie_embeddings:
        out[("head",)] = ("lm_head.weight", "linear")
    for i in range(m.n_layers):
        b, p = ("blocks", i), f"model.layers.{i}."
        for ours, theirs in (("wq", "q"), ("wk", "k"), ("wv", "v")):
            out[b + ("attn", ours)] = (f"{p}self_attn.{theirs}_proj.weight", "linear")
        out[b + ("attn", "wo")] = (f"{p}self_attn.o_proj.weight", "linear_2in")  # wo is [H, K, D]: 2 input dims
        out[b + ("attn_norm", "scale")] = (f"{p}input_layernorm.weight", "copy")
        out[b + ("ffn_norm", "scale")] = (f"{p}post_attention_layernorm.weight", "copy")
        out[b + ("ffn", "w_gate")] = (f"{p}mlp.gate_proj.weight", "linear")
        out[b + ("ffn", "w_down")] = (f"{p}mlp.down_proj.weight", "linear")
        if i in stem:
            out[b + ("ffn", "table")] = (STEM_TABLE_KEY.format(i=i), "table")
        else:
            out[b + ("ffn", "w_up")] = (f"{p}mlp.up_proj.weight", "linear")
    return out


def to_hf(kind: str, w: np.ndarray, vocab: int) -> np.ndarray:
    """copy: same layout; linear: ours [in, out...] -> HF [out, in]; linear_2in: wo [H, K, D] -> [D, H*K]
    (its first two dims are the input); table: cut to the vocabulary."""
    if kind == "copy":
        return w
    if kind == "table":
        return w[:vocab]  # drop the all-zero padding rows that only even out the shards
    n_in = 2 if kind == "linear_2in" else 1
    return np.ascontiguousarray(w.reshape(math.prod(w.shape[:n_in]), -1).T)


def from_hf(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``to_hf``, except that tables keep their vocab rows (``write_workdir`` pads them)."""
    if kind in ("copy", "table"):
        return w
    return np.ascontiguousarray(w.T).reshape(shape)


def hf_shape(kind: str, shape: tuple[int, ...], vocab: int) -> tuple[int, ...]:
    if kind == "copy":
        return tuple(shape)
    if kind == "table":
        return (vocab, shape[1])
    n_in = 2 if kind == "linear_2in" else 1
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


# --- stem-jax workdirs ---------------------------------------------------------------------------------

ONE_DEVICE = (1, 1, 1)  # conversion is host work, and any mesh restores the result later


def _one_device_mesh():
    return sharding.make_mesh(ONE_DEVICE, devices=jax.devices()[:1])


def _flat(tree) -> dict[ParamPath, object]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_ffn(cfg: Config, what: str) -> None:
    if cfg.model.ffn not in EXPORTABLE_FFN:
        raise ValueError(f"{what} of model.ffn={cfg.model.ffn!r} is not supported: only {EXPORTABLE_FFN} map "
                         "onto Llama weights plus STEM tables")


def read_params(workdir: str | Path, step: int | None = None) -> tuple[Config, dict[ParamPath, np.ndarray], int]:
    """(config, {path: float32 host array}, step) of a workdir's latest (or given) checkpoint; STEM tables
    by token (row t is token t's), not in their stored layout."""
    run = workdir_lib.restore(workdir, ONE_DEVICE, step, devices=jax.devices()[:1])
    arrays = {p: np.asarray(jax.device_get(a)) for p, a in _flat(nnx.to_pure_dict(run.params)).items()}
    return run.cfg, {p: sharding.table_by_token(a, run.cfg.model) if p[-1] == "table" else a
                     for p, a in arrays.items()}, run.step


def _check_new_workdir(workdir: Path) -> None:
    for existing in (checkpoint.directory(workdir), workdir / "config.json"):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists; refusing to overwrite it (choose a new workdir)")


def _tokenizer_sha(path: Path) -> str | None:
    """The fingerprint train.py records (of the canonical string, not the file's formatting)."""
    try:
        return checkpoint.fingerprint(Tokenizer.from_file(str(path)).to_str())
    except Exception:  # noqa: BLE001 - not a tokenizers file (e.g. a sentencepiece-only HF repo)
        return None


def write_workdir(workdir: str | Path, cfg: Config, arrays: dict[ParamPath, np.ndarray], tokenizer: Path | None,
                  source: str) -> Path:
    """A workdir that ``eval.py`` and ``checkpoint.restore_params`` read: config.json, tokenizer.json and a
    step-0 checkpoint holding ``params`` and ``meta`` only (no optimizer or data state, so train.py cannot
    resume it). ``arrays`` holds every parameter, STEM tables at [vocab, d_ff]."""
    workdir = Path(workdir)
    validate(cfg)
    _check_new_workdir(workdir)
    mesh = _one_device_mesh()
    _, abstract, shardings = workdir_lib.abstract_model(cfg, mesh)
    extra = arrays.keys() - _flat(nnx.to_pure_dict(abstract)).keys()
    if extra:
        raise ValueError(f"parameters {sorted(extra)} are not in the model")

    def fill(path, a: jax.ShapeDtypeStruct) -> np.ndarray:
        p = tuple(k.key for k in path)
        w = arrays.get(p)
        if w is not None and p[-1] == "table":  # [vocab, d_ff] by token -> padded rows in the stored layout
            w = sharding.table_to_stored(np.pad(w, ((0, a.shape[0] - w.shape[0]), (0, 0))), cfg.model)
        if w is None or w.shape != a.shape:
            raise ValueError(f"parameter {p}: the model needs shape {a.shape}, got {None if w is None else w.shape}")
        return w.astype(np.float32)

    nnx.replace_by_pure_dict(abstract, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract)))
    params = jax.device_put(abstract, shardings)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    tok_sha = None
    if tokenizer is not None and tokenizer.is_file():
        shutil.copyfile(tokenizer, workdir / "tokenizer.json")
        tok_sha = _tokenizer_sha(workdir / "tokenizer.json")
    checkpoint.save_params(workdir, params, checkpoint.run_meta(cfg, mesh, tok_sha, step=0, params_only=True,
                                                                source=source))
    return workdir


# --- export --------------------------------------------------------------------------------------------

def hf_config(cfg: Config) -> dict:
    m = cfg.model
    stem = stem_indices(m)
    return {
        # A STEM export is not a Llama: its own type makes transformers' Auto classes refuse it.
        "architectures": ["StemLlamaForCausalLM" if stem else "LlamaForCausalLM"],
        "model_type": STEM_MODEL_TYPE if stem else "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.d_model // m.n_heads, "hidden_act": "silu", "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps, "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings,
        # rope_theta for transformers 4.x, rope_parameters for 5.x
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "dtype": "float32",
        "stem_jax": {"ffn": m.ffn, "stem_layers": list(stem), "stem_table_key": STEM_TABLE_KEY,
                     "config": to_dict(cfg)},
    }


def export_safetensors(workdir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Write ``out_dir/{model.safetensors, config.json, tokenizer.json}`` from a workdir's checkpoint."""
    workdir, out_dir = Path(workdir), Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        raise FileExistsError(f"{out_dir / 'model.safetensors'} already exists; refusing to overwrite it")
    _check_ffn(workdir_lib.load_run_config(workdir), "export")
    cfg, arrays, step = read_params(workdir, step)
    names = key_map(cfg.model)
    if names.keys() != arrays.keys():  # e.g. a parameter added by a newer FFN variant
        raise ValueError(f"cannot map parameters {sorted(arrays.keys() - names.keys())} to Hugging Face keys")
    tensors = {key: to_hf(kind, arrays[p], cfg.model.vocab_size) for p, (key, kind) in names.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})  # transformers wants "pt"
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    if (workdir / "tokenizer.json").is_file():
        shutil.copyfile(workdir / "tokenizer.json", out_dir / "tokenizer.json")
    n = sum(t.size for t in tensors.values())
    print(f"exported step {step} of {workdir}: {len(tensors)} tensors, {n / 1e6:.2f}M parameters "
          f"-> {out_dir / 'model.safetensors'}", flush=True)
    return out_dir


# --- import --------------------------------------------------------------------------------------------

def _field(hf: dict, name: str, default=None):
    if name not in hf and default is None:
        raise ValueError(f"config.json has no {name!r}")
    return hf.get(name, default)


def config_from_hf(hf: dict, seq_len: int | None = None) -> Config:
    """Our Config for an HF Llama (or our STEM export) config.json; unsupported Llama features are errors."""
    if hf.get("model_type") not in ("llama", STEM_MODEL_TYPE):
        raise ValueError(f"model_type={hf.get('model_type')!r} is not supported: only Llama ('llama') checkpoints "
                         "can be imported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {rope} is not supported (only rope_type 'default')")
    for name, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(name, ok) != ok:
            raise ValueError(f"config.json has {name}={hf[name]!r}; only {ok!r} is supported")
    stem = hf.get("stem_jax", {})
    cfg = from_dict(stem["config"]) if "config" in stem else Config()  # keeps our train/data sections
    heads, d = _field(hf, "num_attention_heads"), _field(hf, "hidden_size")
    if hf.get("head_dim") not in (None, d // heads):
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {d // heads}")
    # Our own export also carries the fields Llama has no name for (ffn, stem_layers, stem_lookup, dtype, ...).
    cfg.model = dataclasses.replace(
        cfg.model if "config" in stem else ModelConfig(ffn="dense"), vocab_size=_field(hf, "vocab_size"),
        d_model=d, n_layers=_field(hf, "num_hidden_layers"), n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=_field(hf, "intermediate_size"),
        # Llama 3 advertises 131072 positions; train/eval batches only need a practical length.
        seq_len=seq_len or min(hf.get("max_position_embeddings", 2048), 4096),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)))
    _check_ffn(cfg, "import")
    return validate(cfg)


def _some(keys: list[str], n: int = 8) -> str:
    return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''}"


def _weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    other = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt*"))
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}"
                            + (f" (found {other}: convert them to safetensors first)" if other else ""))


def import_llama(hf_dir: str | Path, workdir: str | Path, seq_len: int | None = None) -> Path:
    """Read an HF Llama directory (single or sharded safetensors) into a new stem-jax workdir."""
    hf_dir, workdir = Path(hf_dir), Path(workdir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} not found: is {hf_dir} a Hugging Face model directory?")
    cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()), seq_len)
    _check_new_workdir(workdir)  # before reading gigabytes of weights
    shapes = {p: a.shape for p, a in _flat(nnx.to_pure_dict(workdir_lib.abstract_model(cfg, _one_device_mesh())[1])).items()}
    names = key_map(cfg.model)
    handles = {}  # HF key -> open file
    for f in _weight_files(hf_dir):
        if not f.is_file():
            raise FileNotFoundError(f"{f} (listed in the safetensors index) not found")
        h = safe_open(str(f), framework="np")
        handles.update({k: h for k in h.keys() if not k.endswith("rotary_emb.inv_freq")})  # old RoPE buffers
    wanted = {key for key, _ in names.values()}
    tied_head = "lm_head.weight" in handles and cfg.model.tie_embeddings
    missing = sorted(wanted - handles.keys())
    unexpected = sorted(handles.keys() - wanted - ({"lm_head.weight"} if tied_head else set()))
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: missing keys {_some(missing)}, unexpected keys {_some(unexpected)}")
    arrays, n = {}, 0
    for p, (key, kind) in names.items():
        got, need = tuple(handles[key].get_slice(key).get_shape()), hf_shape(kind, shapes[p], cfg.model.vocab_size)
        if got != need:
            raise ValueError(f"{key} has shape {list(got)}, expected {list(need)} for this config")
        arrays[p] = from_hf(kind, handles[key].get_tensor(key).astype(np.float32), shapes[p])
        n += math.prod(got)
    if tied_head and not np.array_equal(handles["lm_head.weight"].get_tensor("lm_head.weight"), arrays[("embed",)]):
        raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    write_workdir(workdir, cfg, arrays, hf_dir / "tokenizer.json", f"import of {hf_dir.absolute()}")
    print(f"imported {hf_dir} ({len(arrays)} tensors, {n / 1e6:.2f}M parameters) -> {workdir}", flush=True)
    return workdir


# --- dense -> STEM -------------------------------------------------------------------------------------

def rms_norm(x_NxD: np.ndarray, scale_D: np.ndarray, eps: float) -> np.ndarray:
    return x_NxD / np.sqrt(np.mean(x_NxD * x_NxD, axis=-1, keepdims=True) + eps) * scale_D


def dense_to_stem(workdir_in: str | Path, workdir_out: str | Path, stem_layers: str = "1/3",
                  step: int | None = None) -> Path:
    """A STEM model from a dense one: chosen layers drop W_up and get the table U[t] = W_up RMSNorm_ffn(E[t]).

    A heuristic starting point, not an equivalent model: the FFN's real input is the residual stream at that
    layer, not the raw embedding of the token, so the STEM model needs further training."""
    workdir_in = Path(workdir_in)
    cfg = workdir_lib.load_run_config(workdir_in)
    if cfg.model.ffn != "dense":
        raise ValueError(f"{workdir_in} has model.ffn={cfg.model.ffn!r}; dense_to_stem needs a dense model")
    _check_new_workdir(Path(workdir_out))
    new = copy.deepcopy(cfg)
    new.model.ffn, new.model.stem_layers = "stem", stem_layers
    validate(new)  # names the field for a bad stem_layers
    cfg, arrays, step = read_params(workdir_in, step)
    for i in stem_indices(new.model):
        w_up_DxF = arrays.pop(("blocks", i, "ffn", "w_up"))
        x_VxD = rms_norm(arrays[("embed",)], arrays[("blocks", i, "ffn_norm", "scale")], cfg.model.norm_eps)
        arrays[("blocks", i, "ffn", "table")] = x_VxD @ w_up_DxF
    out = write_workdir(workdir_out, new, arrays, workdir_in / "tokenizer.json",
                        source=f"dense_to_stem of {workdir_in.absolute()} step {step}")
    print(f"STEM layers {list(stem_indices(new.model))} initialised from W_up and the embedding -> {out}", flush=True)
    return out


# --- CLI -----------------------------------------------------------------------------------------------

COMMANDS = {"export": "workdir checkpoint -> model.safetensors + HF config.json",
            "import": "HF Llama directory -> new stem-jax workdir",
            "to_stem": "dense workdir -> new STEM workdir (tables from W_up and the embedding)"}


def _define(fv: flags.FlagValues, command: str) -> None:
    flags.DEFINE_string("workdir", None, "The stem-jax workdir (read by export and to_stem, written by import).",
                        required=True, flag_values=fv)
    if command == "import":
        flags.DEFINE_string("hf_dir", None, "A Hugging Face Llama directory.", required=True, flag_values=fv)
        flags.DEFINE_integer("seq_len", None, "Default: min(max_position_embeddings, 4096).", flag_values=fv)
        return
    flags.DEFINE_string("out", None, "Output directory (a new workdir for to_stem).", required=True, flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    if command == "to_stem":
        flags.DEFINE_string("stem_layers", "1/3", "Layers to convert: 1/3, 1/2, full or indices.", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    command, f = cli.parse_command(argv, "python -m stem_jax.hf", __doc__.split("\n\n")[0], _define, COMMANDS)
    if command == "export":
        cli.run_user_errors(export_safetensors, f.workdir, f.out, f.step)
    elif command == "import":
        cli.run_user_errors(import_llama, f.hf_dir, f.workdir, f.seq_len)
    else:
        cli.run_user_errors(dense_to_stem, f.workdir, f.out, f.stem_layers, f.step)


if __name__ == "__main__":
    main()
