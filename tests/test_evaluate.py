"""The Scorer against a direct computation from the model's logits, and eval.py end to end."""
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import mesh_of, run_script, tiny_config
from stem_jax import checkpoint, corpus as corpus_lib, data
from stem_jax.config import to_dict
from stem_jax.scoring import Scorer, ScoringError, _cut
from stem_jax.trainer import Trainer

DATA = Path(__file__).parent / "data"
WORDS = "the of and to in that he shall unto for his a lord they be is him not them it with all thou secret number what".split()


def corpus_text(lines: int = 2400) -> str:
    """Deterministic prose-like lines with numbers, so a tiny BPE vocabulary covers digits."""
    rng = np.random.default_rng(0)
    return "".join(" ".join(rng.choice(WORDS, 8)) + f" {i * 7919 % 10000}.\n" for i in range(lines))


def small_config(cache_dir: str, text_file: Path, **model):
    cfg = tiny_config(**{"vocab_size": 512, "d_model": 32, "n_layers": 2, "seq_len": 64, "d_ff": 64,
                         "stem_layers": "1", **model})
    cfg.data.source, cfg.data.files, cfg.data.cache_dir = "text", str(text_file), cache_dir
    cfg.train.eval_batches = 2
    return cfg


def make_workdir(root: Path, cache_dir: str, **model) -> tuple[Path, object]:
    """A workdir as train.py leaves it (config.json, tokenizer.json, a step-1 checkpoint of the initial
    params) without a training subprocess. Returns (workdir, config)."""
    text = root / "corpus.txt"
    text.write_text(corpus_text())
    work = root / "work"
    work.mkdir()
    cfg = small_config(cache_dir, text, **model)
    corpus = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
    s = Trainer.create(cfg, mesh_of((1, 1, 1)))
    state = s.init_state()
    batches = iter(data.train_dataset(corpus.train, cfg.model.seq_len, cfg.train.batch_size, 0, cfg.model.vocab_size))
    mngr = checkpoint.manager(work)
    checkpoint.save(mngr, {**state, "step": 1}, batches,
                    {"step": 1, "config": to_dict(cfg), "table_rows": checkpoint._table_rows(state["params"]),
                     "tokenizer_sha256": checkpoint.fingerprint(corpus.tokenizer.to_str())})
    mngr.wait_until_finished()
    mngr.close()
    (work / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    corpus.tokenizer.save(str(work / "tokenizer.json"))
    return work, cfg


@pytest.fixture(scope="module")
def scorer_and_model():
    """A random tiny STEM model on a 2x2x2 mesh (rows over 4 batch shards, vocab and heads over 2), its
    unsharded twin, and a BPE tokenizer of 300 tokens."""
    cfg = tiny_config()
    s = Trainer.create(cfg, mesh_of((2, 2, 2)))
    params = s.init_state()["params"]
    tok = corpus_lib.train_tokenizer([corpus_text(300)], 300)
    scorer = Scorer(s.ctx.graphdef, params, tok, s.ctx.mesh, cfg.model.seq_len, 4, cfg.model.vocab_size)
    model = nnx.merge(s.ctx.graphdef, jax.device_get(params))
    return scorer, model


def direct_logp(model, tokens: list[int], n_cont: int, seq_len: int) -> tuple[float, bool]:
    """Sum of log_softmax over the last ``n_cont`` tokens, from one unsharded, unpadded forward."""
    tokens = tokens[-(seq_len + 1):]
    logits = np.asarray(model(np.asarray([tokens[:-1]], np.int32))[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    pos = range(len(tokens) - 1 - n_cont, len(tokens) - 1)
    return (sum(logp[p, tokens[p + 1]] for p in pos),
            all(int(np.argmax(logits[p])) == tokens[p + 1] for p in pos))


def test_loglikelihood_equals_direct_computation_including_truncation(scorer_and_model):
    scorer, model = scorer_and_model
    L = scorer.seq_len
    long_context = "the lord shall be with him and with them all " * 6
    pairs = [("Question: what is it?\nAnswer:", " the lord"),
             ("he shall ", "be"),                       # trailing space moves to the continuation
             ("", "unto them"),                          # empty context: conditioned on <|endoftext|>
             (long_context, " and it is not"),          # longer than seq_len + 1: context cut from the left
             ("the lord", " 7")]  # 5 requests: two batches of 4, the second partial
    assert len(scorer.encode(long_context)) > L + 1
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), (logp, greedy) in zip(pairs, got):
        ctx_ids, cont_ids = scorer.encode_pair(ctx, cont)
        want, want_greedy = direct_logp(model, ctx_ids + cont_ids, len(cont_ids), L)
        assert logp == pytest.approx(want, rel=1e-4, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy
    assert scorer.encode_pair("he shall ", "be") == scorer.encode_pair("he shall", " be")
    assert scorer.encode_pair("", "unto them")[0] == [scorer.eot_id]
    assert scorer.forward.fn._cache_size() == 1  # one compiled forward for every batch


def test_rolling_loglikelihood_covers_every_token_once(scorer_and_model):
    scorer, model = scorer_and_model
    L = scorer.seq_len
    short = "the lord shall be"
    ids = scorer.encode(short)
    want, _ = direct_logp(model, [scorer.eot_id] + ids, len(ids), L)
    assert scorer.loglikelihood_rolling([short])[0] == pytest.approx(want, rel=1e-4)
    long_ids = list(range(1, 3 * L + 5))
    windows = scorer.rolling_windows(long_ids)
    assert [t for _, cont in windows for t in cont] == long_ids
    assert all(len(ctx) + len(cont) <= L + 1 for ctx, cont in windows)
    assert all(len(ctx) + len(cont) == L + 1 for ctx, cont in windows[1:])  # later windows: full context


def test_greedy_generation_matches_argmax_loop(scorer_and_model):
    scorer, model = scorer_and_model
    prompt = "the lord shall"
    ids = scorer.encode(prompt)
    for _ in range(3):
        nxt = int(np.argmax(np.asarray(model(np.asarray([ids[-scorer.seq_len:]], np.int32))[0, -1])))
        if nxt == scorer.eot_id:
            break
        ids.append(nxt)
    want = scorer.decode(ids[len(scorer.encode(prompt)):])
    assert scorer.generate_until([prompt, "he"], max_tokens=3)[0] == want
    assert _cut("abc\n\ndef", ["\n\n", "d"]) == "abc" and _cut("abc", ["x"]) == "abc"


def test_empty_requests_are_clear_errors(scorer_and_model):
    scorer, _ = scorer_and_model
    with pytest.raises(ScoringError, match="empty continuation"):
        scorer.loglikelihood([("context", "")])
    with pytest.raises(ScoringError, match="text 1 is empty"):
        scorer.loglikelihood_rolling(["fine", ""])
    with pytest.raises(ScoringError, match="more than model.seq_len"):
        scorer.loglikelihood_tokens([([1], list(range(1, 40)))])


def test_eval_cli_with_tasks_and_niah_writes_json_and_markdown(tmp_path, cache_dir):
    work, cfg = make_workdir(tmp_path, cache_dir)
    r = run_script("eval.py", f"--workdir={work}", f"--mc_jsonl={DATA / 'tiny_mc.jsonl'}", "--niah=32,64",
                   "--limit=2", "--eval_batches=1", "--mc_template=Q: {question} A:", "--mc_target_delimiter=",
                   cache_dir=cache_dir, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((work / "eval.json").read_text())
    assert ev["step"] == 1 and math.isfinite(ev["val_loss"])
    assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]))
    mc = ev["tasks"]["tiny_mc"]
    assert mc["n"] == 2 and 0 <= mc["acc"] <= 1 and 0 <= mc["acc_norm"] <= 1
    assert mc["first_request"] == ["Q: What color is the clear daytime sky? A:", "blue"]  # the flags reached it
    niah = ev["niah"]
    assert niah["n"] == 2 * 3 * 2 and set(niah["by_length"]) == {"32", "64"}
    assert niah["chance"] == pytest.approx(0.1)
    assert ev["accounting"]["total_params"] > ev["accounting"]["active_params"] > 0
    md = (work / "eval.md").read_text()
    assert "| tiny_mc | 2 |" in md and "| 64 |" in md and "| total_params |" in md
    assert "tiny_mc: acc" in r.stdout and "niah: acc" in r.stdout

    text = tmp_path / "other.txt"
    text.write_text("the lord shall be with them. " * 60)
    from stem_jax import evaluate, tasks  # a bad task file fails before the restore (in-process: no startup)
    with pytest.raises(tasks.TaskError, match="/no/such.jsonl: no such task file"):
        evaluate.evaluate_workdir(work, options=evaluate.EvalOptions(text_file=str(text), mc_jsonl=["/no/such.jsonl"]))


def test_text_file_loss_in_process(tmp_path, cache_dir):
    from stem_jax import evaluate
    work, _ = make_workdir(tmp_path, cache_dir)
    text = tmp_path / "other.txt"
    text.write_text("the lord shall be with them. " * 60)
    r = evaluate.evaluate_workdir(work, (-1, 1, 1), options=evaluate.EvalOptions(text_file=str(text)))
    assert r["val_source"] == str(text) and r["val_tokens"] > 64  # more than one window
    assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert json.loads((work / "eval.json").read_text())["val_loss"] == pytest.approx(r["val_loss"])


def test_a_replaced_tokenizer_is_refused(tmp_path, cache_dir):
    from stem_jax import evaluate
    work, _ = make_workdir(tmp_path, cache_dir)
    corpus_lib.train_tokenizer([corpus_text(50)], 300).save(str(work / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer does not match checkpoint 1"):
        evaluate.evaluate_workdir(work, (-1, 1, 1), options=evaluate.EvalOptions(text_file=str(work / "config.json")))
