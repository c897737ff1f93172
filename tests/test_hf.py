"""Hugging Face interop: safetensors export/import round trips, the documented key set, dense -> STEM
initialisation, clear errors, one-line CLI errors for bad HF directories, the workdir lock around writes, and
(when torch + transformers are installed) logit parity with LlamaForCausalLM."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO, mesh_of, script_env, tiny_config
from stem_jax import checkpoint, data, hf, lock, workdir as workdir_lib
from stem_jax.config import ConfigError, to_dict
from stem_jax.trainer import Trainer
from stem_jax.workdir import restore

V, D, F, L = 1000, 32, 96, 3  # tiny_config shapes
IDS = np.random.default_rng(0).integers(0, V, (2, 16))


def _train_workdir(path, **model):
    """A workdir in train.py's format (config, tokenizer, full 4-item checkpoint) without training."""
    cfg = tiny_config(**model)
    s = Trainer.create(cfg, mesh_of((1, 1, 1)))
    path.mkdir()
    (path / "config.json").write_text(json.dumps(to_dict(cfg)))
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    tokens = (np.arange(17 * 200 + 1) % V).astype(np.uint16)
    batches = iter(data.train_dataset(tokens, cfg.model.seq_len, cfg.train.batch_size, 0, V))
    mngr = checkpoint.manager(path)
    checkpoint.save(mngr, s.init_state(), batches, {"step": 7, "config": to_dict(cfg), "table_rows": 1024})
    mngr.wait_until_finished()
    mngr.close()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    r = {"dense": _train_workdir(root / "dense", ffn="dense"), "stem": _train_workdir(root / "stem", stem_layers="1")}
    for name in ("dense", "stem"):
        r[f"{name}_hf"] = hf.export_safetensors(r[name], root / f"{name}_hf")
    r["root"] = root
    return r


def _logits(workdir):
    run = restore(workdir, (1, 1, 1), devices=jax.devices()[:1])
    with jax.default_matmul_precision("highest"), jax.set_mesh(run.mesh):
        return np.asarray(run.model()(jax.numpy.asarray(IDS)))


def _assert_same_params(a, b):
    _, pa, _ = workdir_lib.read_params(a)
    _, pb, _ = workdir_lib.read_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def _expected_keys(stem_layers=(), tied=False):
    keys = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i in range(L):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        keys |= {p + "mlp.gate_proj.weight", p + "mlp.down_proj.weight"}
        keys.add(p + ("mlp.stem_table.weight" if i in stem_layers else "mlp.up_proj.weight"))
    return keys


def test_dense_export_import_round_trip(runs, tmp_path):
    out = runs["dense_hf"]
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == _expected_keys()
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (D, D)      # [out, in]
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (D // 2, D)  # 1 of 2 kv heads
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (D, F)
    assert tensors["lm_head.weight"].shape == (V, D)
    c = json.loads((out / "config.json").read_text())
    assert (c["model_type"], c["architectures"], c["head_dim"], c["max_position_embeddings"]) == \
        ("llama", ["LlamaForCausalLM"], 16, 16)
    assert c["stem_jax"]["ffn"] == "dense" and c["stem_jax"]["stem_layers"] == []
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'

    hf.import_llama(out, tmp_path / "back")
    _assert_same_params(runs["dense"], tmp_path / "back")
    np.testing.assert_array_equal(_logits(runs["dense"]), _logits(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == to_dict(tiny_config(ffn="dense"))


def test_stem_export_has_tables_instead_of_up_proj_and_round_trips(runs, tmp_path):
    out = runs["stem_hf"]
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == _expected_keys(stem_layers=(1,))
    assert tensors["model.layers.1.mlp.stem_table.weight"].shape == (V, F)  # padding rows cut
    assert "model.layers.1.mlp.up_proj.weight" not in tensors
    c = json.loads((out / "config.json").read_text())
    assert c["model_type"] == "stem_llama" and c["stem_jax"]["stem_layers"] == [1]
    assert c["stem_jax"]["stem_table_key"] == "model.layers.{i}.mlp.stem_table.weight"
    hf.import_llama(out, tmp_path / "back")
    _assert_same_params(runs["stem"], tmp_path / "back")


def test_sharded_checkpoint_and_tied_embeddings_import(runs, tmp_path):
    tensors = load_file(str(runs["dense_hf"] / "model.safetensors"))
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(runs["dense_hf"] / "config.json", src)
    names = sorted(tensors)
    weight_map = {}
    for j, part in enumerate((names[:10], names[10:])):
        f = f"model-0000{j + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(src / f), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, f)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf.import_llama(src, tmp_path / "back")
    _assert_same_params(runs["dense"], tmp_path / "back")

    # Tied: HF writes no lm_head (or one equal to the embedding); our model gets no head.
    tied = tmp_path / "tied"
    tied.mkdir()
    c = json.loads((runs["dense_hf"] / "config.json").read_text())
    del c["stem_jax"]
    (tied / "config.json").write_text(json.dumps(c | {"tie_word_embeddings": True}))
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, str(tied / "model.safetensors"))
    hf.import_llama(tied, tmp_path / "tied_back")
    cfg, params, _ = workdir_lib.read_params(tmp_path / "tied_back")
    assert cfg.model.tie_embeddings and ("head",) not in params
    hf.export_safetensors(tmp_path / "tied_back", tmp_path / "tied_out")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied_out" / "model.safetensors"))
    assert json.loads((tmp_path / "tied_out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_dense_to_stem_tables_are_w_up_of_the_normed_embedding(runs, tmp_path):
    hf.dense_to_stem(runs["dense"], tmp_path / "stem", stem_layers="0,2")
    _, dense, _ = workdir_lib.read_params(runs["dense"])
    cfg, stem, _ = workdir_lib.read_params(tmp_path / "stem")
    assert (cfg.model.ffn, cfg.model.stem_layers) == ("stem", "0,2")
    assert (tmp_path / "stem" / "tokenizer.json").is_file()
    E = dense[("embed",)].astype(np.float64)
    for i in (0, 2):
        g, w_up = dense[("blocks", i, "ffn_norm", "scale")], dense[("blocks", i, "ffn", "w_up")]
        x = E / np.sqrt((E ** 2).mean(-1, keepdims=True) + 1e-5) * g
        table = stem[("blocks", i, "ffn", "table")]
        assert table.shape == (1024, F) and not table[V:].any()
        np.testing.assert_allclose(table[:V], x @ w_up, rtol=1e-5, atol=1e-6)
        assert ("blocks", i, "ffn", "w_up") not in stem
    for k, v in stem.items():  # everything else is copied
        if k[-1] != "table":
            np.testing.assert_array_equal(v, dense[k], err_msg=str(k))


def _broken_copy(runs, tmp_path, *, config=None, drop=(), add=None, reshape=None):
    d = tmp_path / "broken"
    shutil.copytree(runs["dense_hf"], d)
    c = json.loads((d / "config.json").read_text()) | (config or {})
    (d / "config.json").write_text(json.dumps(c))
    t = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k not in drop} | (add or {})
    if reshape:
        t[reshape] = t[reshape][:-1]
    save_file(t, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("change, error, match", [
    ({"config": {"model_type": "mistral"}}, ValueError, "model_type='mistral' is not supported"),
    ({"config": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}}, ValueError, "RoPE scaling"),
    ({"config": {"mlp_bias": True}}, ValueError, "mlp_bias=True"),
    ({"drop": ["model.layers.2.mlp.up_proj.weight"]}, ValueError, r"missing keys \['model.layers.2.mlp.up_proj"),
    ({"add": {"model.layers.0.mlp.extra": np.zeros(2, np.float32)}}, ValueError, r"unexpected keys \['model.layers.0"),
    ({"reshape": "model.layers.1.self_attn.o_proj.weight"}, ValueError,
     r"model.layers.1.self_attn.o_proj.weight has shape \[31, 32\], expected \[32, 32\]"),
    ({"add": {"model.norm.weight": np.ones(D, np.int32)}}, ValueError, "model.norm.weight has dtype I32"),
])
def test_import_errors_name_the_problem(runs, tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        hf.import_llama(_broken_copy(runs, tmp_path, **change), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refusals_and_missing_inputs(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf.import_llama(tmp_path / "nowhere", tmp_path / "out")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(runs["dense_hf"] / "config.json", no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors .*pytorch_model.bin"):
        hf.import_llama(no_weights, tmp_path / "out")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):  # a workdir with a checkpoint
        hf.import_llama(runs["dense_hf"], runs["stem"])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        hf.export_safetensors(runs["dense"], runs["dense_hf"])
    with pytest.raises(FileNotFoundError, match="stem-jax training workdir"):
        hf.export_safetensors(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="model.ffn='stem'; dense_to_stem needs a dense model"):
        hf.dense_to_stem(runs["stem"], tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown stem_layers '1/5'"):
        hf.dense_to_stem(runs["dense"], tmp_path / "out", stem_layers="1/5")
    with pytest.raises(ValueError, match="model.ffn='hash_moe' is not supported"):
        hf._check_ffn(tiny_config(ffn="hash_moe"), "export")
    assert not (tmp_path / "out").exists()


def test_cli_export_and_one_line_error(runs, tmp_path, cache_dir):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "stem_jax.hf", *map(str, args)], cwd=REPO, text=True,
                              capture_output=True, env=script_env(cache_dir), timeout=300)
    ok = run("to_stem", "--workdir", runs["dense"], "--out", tmp_path / "s", "--stem_layers", "1/3")
    assert ok.returncode == 0, ok.stderr
    assert "STEM layers [1] initialised" in ok.stdout
    bad = run("import", "--hf_dir", tmp_path / "missing", "--workdir", tmp_path / "w")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: FileNotFoundError: {tmp_path / 'missing' / 'config.json'} not found: is {tmp_path / 'missing'} "
        "a Hugging Face model directory?"]


def _files(d):
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(Path(d).rglob("*")) if f.is_file()}


def _hf_dir(runs, tmp_path, config=None, config_text=None, files=None, weights=False):
    """A fake HF directory: the dense export's config.json (changed by ``config``, a function of it, or replaced by
    ``config_text``), its weights if ``weights``, and ``files`` (name -> text or bytes)."""
    d = tmp_path / "hf"
    d.mkdir()
    c = json.loads((runs["dense_hf"] / "config.json").read_text())
    (d / "config.json").write_text(config_text if config_text is not None else json.dumps(config(c) if config else c))
    if weights:
        shutil.copy(runs["dense_hf"] / "model.safetensors", d)
    for name, content in (files or {}).items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def _without(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


@pytest.mark.parametrize("make, line", [
    (dict(config=lambda c: c | {"hidden_size": "32"}),
     r"ValueError: {cfg}: hidden_size must be a positive integer, got '32'"),
    (dict(config=lambda c: c | {"num_attention_heads": 0}),
     r"ValueError: {cfg}: num_attention_heads must be a positive integer, got 0"),
    (dict(config=lambda c: c | {"tie_word_embeddings": "false"}),
     r"ValueError: {cfg}: tie_word_embeddings must be true or false, got 'false'"),
    (dict(config=lambda c: c | {"rope_parameters": {"rope_theta": "1e4"}}),
     r"ValueError: {cfg}: rope_parameters.rope_theta must be a finite number, got '1e4'"),
    (dict(config=lambda c: c | {"stem_jax": {"config": [1]}}),
     r"ValueError: {cfg}: stem_jax.config must be an object, got \[1\]"),
    (dict(config_text="[1, 2]"), r"ValueError: {cfg} holds an array, not a JSON object"),
    (dict(config_text='{"vocab_size": 1000,'), r"ValueError: {cfg} is not valid JSON: Expecting property name .*"),
    (dict(config=_without("vocab_size")), r"ValueError: {cfg} has no 'vocab_size', which a Llama config needs"),
    (dict(), r"FileNotFoundError: no model.safetensors or model.safetensors.index.json in {d}"),
    (dict(files={"model.safetensors": b"not safetensors"}),
     r"ValueError: {d}/model.safetensors is not a readable safetensors file: .*"),
    (dict(files={"model.safetensors.index.json": "[]"}),
     r"ValueError: {d}/model.safetensors.index.json holds an array, not a JSON object"),
    (dict(files={"model.safetensors.index.json": "{}"}),
     r"ValueError: {d}/model.safetensors.index.json: weight_map must be an object of tensor name -> file name, "
     r"got nothing"),
    (dict(files={"model.safetensors.index.json": '{"weight_map": {"lm_head.weight": "part-1.safetensors"}}'}),
     r"FileNotFoundError: {d}/part-1.safetensors \(listed in the safetensors index\) not found"),
], ids=["string_int", "zero_int", "string_bool", "string_rope_theta", "stem_config_list", "json_list",
        "invalid_json", "missing_key", "no_weights", "bad_safetensors", "index_list", "index_without_map",
        "missing_shard"])
def test_cli_import_of_a_bad_hf_dir_is_one_line(runs, tmp_path, capsys, make, line):
    d = _hf_dir(runs, tmp_path, **make)
    with pytest.raises(SystemExit) as e:
        hf.main(["import", "--hf_dir", str(d), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    expected = "error: " + line.format(cfg=re.escape(str(d / "config.json")), d=re.escape(str(d)))
    assert len(err.strip().splitlines()) == 1 and re.fullmatch(expected, err.strip()), err
    assert not (tmp_path / "w").exists()


def test_cli_import_into_a_locked_workdir_is_refused_naming_the_holder(runs, tmp_path, capsys):
    work = tmp_path / "w"
    fd = lock.acquire(work, "other-writer")  # flock locks are per open file: our own later acquire conflicts
    try:
        before = _files(work)
        with pytest.raises(SystemExit) as e:
            hf.main(["import", "--hf_dir", str(runs["dense_hf"]), "--workdir", str(work)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: WorkdirLockedError: {work} is in use by other-writer (pid {os.getpid()} on ")
        assert _files(work) == before  # the holder's record is intact, nothing written
    finally:
        lock.release(fd)
    # Free again: a directory holding only an (empty) lock file counts as new.
    hf.main(["import", "--hf_dir", str(runs["dense_hf"]), "--workdir", str(work)])
    assert (work / "config.json").is_file() and (work / lock.LOCK_FILE).read_text() == ""
    assert workdir_lib.read_params(work)[2] == 0


def test_a_failed_write_holds_the_lock_and_leaves_no_workdir_behind(runs, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="the model needs shape"):  # refused by the checks: creates nothing
        workdir_lib.write_workdir(tmp_path / "refused", tiny_config(ffn="dense"), {}, None, "test")
    assert not (tmp_path / "refused").exists()

    holders = []

    def fail(workdir, *args, **kwargs):  # a write that fails halfway, under the lock
        holders.append(json.loads((Path(workdir) / lock.LOCK_FILE).read_text()))
        checkpoint.directory(workdir).mkdir()
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_params", fail)
    with pytest.raises(OSError, match="No space left"):
        hf.import_llama(runs["dense_hf"], tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert (holders[0]["command"], holders[0]["pid"]) == (f"stem_jax.hf import of {runs['dense_hf']}", os.getpid())

    existing = tmp_path / "existing"  # a directory that was there keeps what it held, and only that
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="No space left"):
        hf.import_llama(runs["dense_hf"], existing)
    assert _files(existing) == {"notes.txt": b"mine", lock.LOCK_FILE: b""}


def test_transformers_llama_gives_the_same_logits(runs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.LlamaForCausalLM.from_pretrained(str(runs["dense_hf"]), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(IDS)).logits.numpy()
    ours = _logits(runs["dense"])
    diff = float(np.abs(ours - theirs).max())
    print(f"max |logit diff| vs transformers: {diff:.3g} (logits up to {np.abs(theirs).max():.2f})")
    assert diff < 1e-4
    with pytest.raises(ValueError, match="stem_llama"):  # a STEM export is not a Llama
        transformers.AutoModelForCausalLM.from_pretrained(str(runs["stem_hf"]))
