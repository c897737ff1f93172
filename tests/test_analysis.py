"""Angular spread and activated-parameter analysis: statistics against direct numpy computations, the Heaps
fit on synthetic data, and both tools end to end on tiny untrained workdirs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, mesh_of, script_env, tiny_config
from stem_jax import analysis, checkpoint, corpus as corpus_lib, sharding
from stem_jax.config import to_dict
from stem_jax.trainer import Trainer
from stem_jax.workdir import load_run_config

WORDS = "the of and to in that he shall unto for his a lord they be is him not them it with all thou".split()


def test_cosine_stats_equal_a_direct_computation():
    rows = np.random.default_rng(0).normal(size=(7, 5))
    want = [rows[i] @ rows[j] / np.linalg.norm(rows[i]) / np.linalg.norm(rows[j])
            for i in range(7) for j in range(i + 1, 7)]
    cos = analysis.pairwise_cosines(rows.astype(np.float32))
    np.testing.assert_allclose(np.sort(cos), np.sort(want), rtol=1e-6, atol=1e-7)
    st = analysis.cosine_stats(cos)
    assert st["pairs"] == 21
    assert st["mean"] == pytest.approx(np.mean(want)) and st["std"] == pytest.approx(np.std(want))
    assert st["p95_abs"] == pytest.approx(np.percentile(np.abs(want), 95))
    ortho = analysis.cosine_stats(analysis.pairwise_cosines(np.eye(4)))
    assert ortho["p95_abs"] == 0 and ortho["pairs"] == 6


def test_heaps_fit_recovers_k_and_beta():
    L = np.array(analysis.context_lengths(4096), np.float64)
    fit = analysis.heaps_fit(L, 3.5 * L ** 0.62)
    assert fit["K"] == pytest.approx(3.5) and fit["beta"] == pytest.approx(0.62) and fit["r2"] == pytest.approx(1.0)
    noisy = 3.5 * L ** 0.62 * np.exp(np.random.default_rng(1).normal(0, 0.03, L.size))
    fit = analysis.heaps_fit(L, noisy)
    assert fit["K"] == pytest.approx(3.5, rel=0.15) and fit["beta"] == pytest.approx(0.62, abs=0.02)
    assert 0.98 < fit["r2"] < 1.0


def test_unique_counts_and_activated_params():
    assert analysis.context_lengths(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert analysis.context_lengths(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    tokens = np.random.default_rng(2).integers(0, 50, size=300)
    rows = analysis.unique_counts(tokens, [1, 16, 300], windows=1000, seed=0)
    assert rows[0] == {"L": 1, "L_uniq": 1.0, "L_uniq_std": 0.0, "windows": 300}
    want16 = [len(set(tokens[s:s + 16])) for s in range(300 - 16 + 1)]  # every offset when windows >= offsets
    assert rows[1]["windows"] == 285 and rows[1]["L_uniq"] == pytest.approx(np.mean(want16))
    assert rows[2]["L_uniq"] == len(np.unique(tokens)) and rows[2]["windows"] == 1
    few = analysis.unique_counts(tokens, [16], windows=5, seed=3)[0]
    assert few["windows"] == 5 and 1 <= few["L_uniq"] <= 16
    with pytest.raises(ValueError, match="exceeds"):
        analysis.unique_counts(tokens, [301])
    assert analysis.activated_params(5, 8192, 100.0) == 5 * 8192 * 100.0
    np.testing.assert_allclose(analysis.activated_params(2, 512, np.array([1.0, 3.0])), [1024, 3072])


def make_workdir(root: Path, name: str, cache_dir: str, **model) -> Path:
    """A workdir as the analysis reads it (config.json, tokenizer.json, a step-1 checkpoint of ``params`` and
    ``meta``) without training or compiling: the parameters are random normals of the model's shapes. Every
    workdir of a session shares one text corpus and tokenizer."""
    import jax
    import orbax.checkpoint as ocp
    text = root / "corpus.txt"
    if not text.is_file():
        rng = np.random.default_rng(0)
        text.write_text("".join(" ".join(rng.choice(WORDS, 8)) + f" {i * 7919 % 1000}.\n" for i in range(1500)))
    cfg = tiny_config(**{"vocab_size": 384, "d_model": 32, "n_layers": 3, "seq_len": 32, "d_ff": 64,
                         "stem_layers": "1", **model})
    cfg.data.source, cfg.data.files, cfg.data.cache_dir = "text", str(text), cache_dir
    corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
    s = Trainer.create(cfg, mesh_of((1, 1, 1)))
    rng = np.random.default_rng(len(name))
    params = jax.device_put(jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(a.dtype),
                                         s.ctx.abstract_state["params"]), jax.devices()[0])
    work = root / name
    meta = {"step": 1, "config": to_dict(cfg), "table_rows": checkpoint._table_rows(params),
            "tokenizer_sha256": checkpoint.fingerprint(corpus.tokenizer.to_str())}
    mngr = checkpoint.manager(work)
    mngr.save(1, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    mngr.close()
    (work / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    corpus.tokenizer.save(str(work / "tokenizer.json"))
    return work


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("analysis")
    return make_workdir(root, "stem", cache_dir), make_workdir(root, "dense", cache_dir, ffn="dense")


@pytest.fixture(scope="module")
def models(workdirs):
    """The restored (model, config) of each workdir."""
    out = []
    for work in workdirs:
        cfg = load_run_config(work)
        out.append((analysis.restore_model(work, cfg)[0], cfg))
    return out


@pytest.mark.parametrize("dense_x", ["first", "mean"])
def test_angular_spread_matches_the_tables_and_dense_up_outputs(workdirs, models, tmp_path, dense_x):
    stem, dense = workdirs
    (model, cfg), (dmodel, _) = models
    W = 20  # held-out windows: two chunks of the dense forward
    s = analysis.angular_spread(stem, dense, top_n=40, out=tmp_path, dense_windows=W, dense_x=dense_x)
    assert list(s["layers"]) == ["1"] and s["step"] == 1 and s["dense_step"] == 1
    n = s["tokens"]
    assert n + s["dropped_tokens"] == 40 and n > 20
    # Rebuild the STEM side directly: top-n train tokens (those in the dense windows) and their table rows.
    corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
    assert len(corpus.val) >= W * 32
    freq = np.bincount(corpus.train.read(0, len(corpus.train)).astype(np.int64), minlength=cfg.model.vocab_size)
    ids = corpus.val.read(0, W * 32).astype(np.int64).reshape(W, 32)
    tokens = np.array([t for t in np.argsort(-freq, kind="stable")[:40] if t in set(ids.reshape(-1).tolist())])
    table = sharding.table_by_token(np.asarray(model.blocks[1].ffn.table[...]), cfg.model)
    want = analysis.cosine_stats(analysis.pairwise_cosines(table[tokens]))
    assert s["layers"]["1"]["stem"] == pytest.approx(want)
    assert s["layers"]["1"]["stem"]["pairs"] == n * (n - 1) // 2
    # Dense side: W_up of the FFN input at each token's first occurrence (or averaged over its occurrences).
    h = analysis.ffn_inputs(dmodel, ids, (1,))[1]
    h = h.reshape(-1, h.shape[-1])
    flat = ids.reshape(-1)
    x = np.stack([h[np.argmax(flat == t)] if dense_x == "first" else h[flat == t].mean(0) for t in tokens])
    up = x @ np.asarray(dmodel.blocks[1].ffn.w_up[...])
    assert s["layers"]["1"]["dense"] == pytest.approx(analysis.cosine_stats(analysis.pairwise_cosines(up)), rel=1e-4)
    for f in ("angular_spread.json", "angular_spread.md", "angular_layer1.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "dense W_up x" in (tmp_path / "angular_spread.md").read_text()


def test_ffn_inputs_reproduce_the_model_forward(models):
    """The re-implemented forward loop agrees with the model's: each captured FFN input, pushed through the
    rest of the model's own blocks, gives the model's logits."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    model, _ = models[0]
    ids = np.random.default_rng(0).integers(0, 384, size=(2, 32))
    got = analysis.ffn_inputs(model, ids, (0, 2))
    graphdef, state = nnx.split(model)

    @jax.jit
    def reference(state, ids):
        m = nnx.merge(graphdef, state)
        x, h = jnp.take(m.embed[...], ids, axis=0), {}
        for i, block in enumerate(m.blocks):
            x = x + block.attn(block.attn_norm(x))
            h[i] = block.ffn_norm(x)
            x = x + block.ffn(h[i], ids)
        return h, m.logits(x), m(ids)

    h, logits, want = reference(state, jnp.asarray(ids))
    for i in (0, 2):
        np.testing.assert_allclose(got[i], h[i], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_activated_from_workdir_and_text_file(workdirs, tmp_path):
    stem, _ = workdirs
    r = analysis.activated_vs_context(stem, out=tmp_path, windows=8)
    assert [x["L"] for x in r["lengths"]] == [1, 2, 4, 8, 16, 32]
    assert r["stem_layers"] == [1] and r["d_ff"] == 64
    for x in r["lengths"]:
        assert x["activated_params"] == pytest.approx(64 * x["L_uniq"]) and 1 <= x["L_uniq"] <= x["L"]
    assert 0 < r["heaps"]["beta"] <= 1.01 and r["heaps"]["r2"] > 0.9
    for f in ("activated_params.json", "activated_params.md", "activated_params.png"):
        assert (tmp_path / f).stat().st_size > 0
    text = tmp_path / "t.txt"
    text.write_text("the lord shall be with him and with them all " * 20)
    r = analysis.activated_vs_context(stem, text_file=text, max_len=64, out=tmp_path / "t")
    assert r["text"] == str(text) and r["lengths"][-1]["L"] == 64 and r["lengths"][-1]["L_uniq"] <= 12


def test_errors_for_dense_and_missing_workdirs(workdirs, tmp_path, capsys):
    stem, dense = workdirs
    with pytest.raises(ValueError, match="has no STEM layers"):
        analysis.angular_spread(dense, out=tmp_path)
    with pytest.raises(ValueError, match="has no STEM layers"):
        analysis.activated_vs_context(dense, out=tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        analysis.angular_spread(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"layers \[1\] of the dense workdir have no W_up \(StemFFN\)"):
        analysis.angular_spread(stem, stem, top_n=5, out=tmp_path)
    for argv, msg in ((["angular", "--workdir", dense], "has no STEM layers"),
                      (["activated", "--workdir", tmp_path / "nope"], "FileNotFoundError"),
                      (["activated", "--workdir", stem, "--config", "c.py"], "exactly one of")):
        with pytest.raises(SystemExit) as e:
            analysis.main([str(a) for a in argv])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err, err


def test_cli_module_runs(workdirs, tmp_path, cache_dir):
    stem, _ = workdirs
    p = subprocess.run([sys.executable, "-m", "stem_jax.analysis", "activated", "--workdir", str(stem), "--max_len",
                        "16", "--windows", "4", "--out", str(tmp_path)], cwd=REPO, env=script_env(cache_dir),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Heaps fit" in p.stdout and json.loads((tmp_path / "activated_params.json").read_text())["d_ff"] == 64
