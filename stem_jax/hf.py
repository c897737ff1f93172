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

import numpy as np
from absl import flags
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from stem_jax import cli, workdir as workdir_lib
from stem_jax.config import Config, ConfigError, ModelConfig, from_dict, stem_indices, to_dict, validate
from stem_jax.workdir import ParamPath, check_new_workdir, flat_params, one_device_mesh, read_params, write_workdir

STEM_TABLE_KEY = "model.layers.{i}.mlp.stem_table.weight"
STEM_MODEL_TYPE = "stem_llama"
EXPORTABLE_FFN = ("dense", "stem")


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


def _check_ffn(cfg: Config, what: str) -> None:
    if cfg.model.ffn not in EXPORTABLE_FFN:
        raise ValueError(f"{what} of model.ffn={cfg.model.ffn!r} is not supported: only {EXPORTABLE_FFN} map "
                         "onto Llama weights plus STEM tables")


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

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}

# The config.json fields that config_from_hf reads: name -> (type, required). Optional ones may be null.
HF_FIELDS = {
    "vocab_size": ("int", True), "hidden_size": ("int", True), "num_hidden_layers": ("int", True),
    "num_attention_heads": ("int", True), "intermediate_size": ("int", True), "num_key_value_heads": ("int", False),
    "head_dim": ("int", False), "max_position_embeddings": ("int", False), "rope_theta": ("float", False),
    "rms_norm_eps": ("float", False), "initializer_range": ("float", False), "tie_word_embeddings": ("bool", False),
    "attention_bias": ("bool", False), "mlp_bias": ("bool", False), "model_type": ("str", False),
    "hidden_act": ("str", False), "rope_parameters": ("dict", False), "rope_scaling": ("dict", False),
    "stem_jax": ("dict", False),
}
_WANT = {"int": "a positive integer", "float": "a finite number", "bool": "true or false", "str": "a string",
         "dict": "an object"}


def _type_ok(kind: str, v) -> bool:
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool) and v > 0
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, {"bool": bool, "str": str, "dict": dict}[kind])


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; errors name the file."""
    try:
        value = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds {_JSON_TYPES.get(type(value), type(value).__name__)}, not a JSON object")
    return value


def check_hf_config(hf: dict, where: str | Path = "config.json") -> dict:
    """``hf`` without its null optional fields, after checking the type of every field config_from_hf reads
    (errors name the field and ``where``, the file it came from)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where} holds {_JSON_TYPES.get(type(hf), type(hf).__name__)}, not a JSON object")
    optional = {name for name, (_, required) in HF_FIELDS.items() if not required}
    hf = {k: v for k, v in hf.items() if not (v is None and k in optional)}
    for name, (kind, required) in HF_FIELDS.items():
        if name not in hf:
            if required:
                raise ValueError(f"{where} has no {name!r}, which a Llama config needs")
        elif not _type_ok(kind, hf[name]):
            raise ValueError(f"{where}: {name} must be {_WANT[kind]}, got {hf[name]!r}")
    for section in ("rope_parameters", "rope_scaling"):
        for name, kind in (("rope_theta", "float"), ("rope_type", "str"), ("type", "str")):
            v = hf.get(section, {}).get(name)
            if v is not None and not _type_ok(kind, v):
                raise ValueError(f"{where}: {section}.{name} must be {_WANT[kind]}, got {v!r}")
    if not isinstance(hf.get("stem_jax", {}).get("config", {}), dict):
        raise ValueError(f"{where}: stem_jax.config must be an object, got {hf['stem_jax']['config']!r}")
    return hf


def config_from_hf(hf: dict, seq_len: int | None = None, where: str | Path = "config.json") -> Config:
    """Our Config for an HF Llama (or our STEM export) config.json; unsupported Llama features are errors.
    ``where`` (the file) is named in errors."""
    hf = check_hf_config(hf, where)
    if hf.get("model_type") not in ("llama", STEM_MODEL_TYPE):
        raise ValueError(f"model_type={hf.get('model_type')!r} is not supported: only Llama ('llama') checkpoints "
                         "can be imported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {rope} is not supported (only rope_type 'default')")
    for name, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(name, ok) != ok:
            raise ValueError(f"{where} has {name}={hf[name]!r}; only {ok!r} is supported")
    stem = hf.get("stem_jax", {})
    try:
        cfg = from_dict(stem["config"]) if "config" in stem else Config()  # keeps our train/data sections
    except (ConfigError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: stem_jax.config cannot be read: {e}") from None
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, d // heads):
        raise ValueError(f"{where}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {d // heads}")
    # Our own export also carries the fields Llama has no name for (ffn, stem_layers, stem_lookup, dtype, ...).
    cfg.model = dataclasses.replace(
        cfg.model if "config" in stem else ModelConfig(ffn="dense"), vocab_size=hf["vocab_size"],
        d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
        # Llama 3 advertises 131072 positions; train/eval batches only need a practical length.
        seq_len=seq_len or min(hf.get("max_position_embeddings", 2048), 4096),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=float(hf.get("initializer_range", 0.02)))
    _check_ffn(cfg, "import")
    try:
        return validate(cfg)
    except (TypeError, AttributeError) as e:  # a wrongly typed field of the stem_jax.config section
        raise ValueError(f"{where}: stem_jax.config: {e}") from None


def _some(keys: list[str], n: int = 8) -> str:
    return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''}"


FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors dtype names


def _weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: weight_map must be an object of tensor name -> file name, got "
                             f"{'nothing' if weight_map is None else repr(weight_map)[:80]}")
        return [hf_dir / f for f in sorted(set(weight_map.values()))]
    other = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt*"))
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}"
                            + (f" (found {other}: convert them to safetensors first)" if other else ""))


def import_llama(hf_dir: str | Path, workdir: str | Path, seq_len: int | None = None) -> Path:
    """Read an HF Llama directory (single or sharded safetensors) into a new stem-jax workdir."""
    hf_dir, workdir = Path(hf_dir), Path(workdir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} not found: is {hf_dir} a Hugging Face model directory?")
    cfg = config_from_hf(_read_json_object(hf_dir / "config.json"), seq_len, where=hf_dir / "config.json")
    check_new_workdir(workdir)  # before reading gigabytes of weights
    abstract = workdir_lib.abstract_model(cfg, one_device_mesh())[1]
    shapes = {p: a.shape for p, a in flat_params(nnx.to_pure_dict(abstract)).items()}
    names = key_map(cfg.model)
    handles = {}  # HF key -> open file
    for f in _weight_files(hf_dir):
        if not f.is_file():
            raise FileNotFoundError(f"{f} (listed in the safetensors index) not found")
        try:
            h = safe_open(str(f), framework="np")
        except SafetensorError as e:
            raise ValueError(f"{f} is not a readable safetensors file: {e}") from None
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
        dtype = handles[key].get_slice(key).get_dtype()
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{key} has dtype {dtype}; only {', '.join(FLOAT_DTYPES)} weights can be imported")
        arrays[p] = from_hf(kind, handles[key].get_tensor(key).astype(np.float32), shapes[p])
        n += math.prod(got)
    if tied_head and not np.array_equal(handles["lm_head.weight"].get_tensor("lm_head.weight"), arrays[("embed",)]):
        raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    write_workdir(workdir, cfg, arrays, hf_dir / "tokenizer.json", f"import of {hf_dir.absolute()}",
                  command=f"stem_jax.hf import of {hf_dir}")
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
    check_new_workdir(Path(workdir_out))
    new = copy.deepcopy(cfg)
    new.model.ffn, new.model.stem_layers = "stem", stem_layers
    validate(new)  # names the field for a bad stem_layers
    cfg, arrays, step = read_params(workdir_in, step)
    for i in stem_indices(new.model):
        w_up_DxF = arrays.pop(("blocks", i, "ffn", "w_up"))
        x_VxD = rms_norm(arrays[("embed",)], arrays[("blocks", i, "ffn_norm", "scale")], cfg.model.norm_eps)
        arrays[("blocks", i, "ffn", "table")] = x_VxD @ w_up_DxF
    out = write_workdir(workdir_out, new, arrays, workdir_in / "tokenizer.json",
                        source=f"dense_to_stem of {workdir_in.absolute()} step {step}",
                        command=f"stem_jax.hf to_stem of {workdir_in}")
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
