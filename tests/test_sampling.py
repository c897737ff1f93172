"""The KV-cache sampler: greedy equals re-running the full forward each step, batched equals one by one,
sharded equals unsharded, and the top-k / top-p filters against numpy. A run trained with ``</s>`` as its EOS
and a tokenizer whose template adds a BOS: sampling, scoring, evaluation, editing and injection read its EOS
from the run and encode as training did."""
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import mesh_of, tiny_config
from stem_jax import (corpus as corpus_lib, data, edit_batch, editing, editor as editor_lib, evaluate, sampling,
                      sources, tasks, trainer, workdir as workdir_lib)
from stem_jax.sampling import Sampler, SamplingConfig, SamplingError, filter_logits
from stem_jax.scoring import Scorer
from stem_jax.trainer import Trainer
from test_evaluate import DATA, corpus_text, small_config

PROMPTS = [[5, 17, 250, 3], [9], [44, 2, 7, 7, 130, 61, 99, 12, 400, 8, 1, 73, 27, 301, 5, 6, 77]]


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(f"word{i % 97} and {i % 13}." for i in range(3000))
    return corpus_lib.train_tokenizer([text], 300)


def _sampler(tokenizer, shape=(1, 1, 1), **model):
    cfg = tiny_config(seq_len=32, stem_layers="1", **model)
    s = Trainer.create(cfg, mesh_of(shape))
    params = s.init_state()["params"]
    return Sampler(s.ctx.graphdef, params, tokenizer, s.ctx.mesh, cfg.model.seq_len), s, params


@pytest.fixture(scope="module")
def stem_sampler(tokenizer):
    return _sampler(tokenizer)


def _greedy_by_full_forward(s, params, prompt, n, eos):
    """Greedy decoding without a cache: the full forward over the whole sequence for every new token (one
    compiled program: right-padded to seq_len, where causal attention keeps the real positions exact)."""
    L = s.ctx.cfg.model.seq_len
    fwd = jax.jit(lambda p, ids, i: nnx.merge(s.ctx.graphdef, p)(ids)[0, i])
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, L), np.int32)
        padded[0, :len(ids)] = ids
        nxt = int(np.argmax(np.asarray(fwd(params, jnp.asarray(padded), len(ids) - 1))))
        if nxt == eos:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def _strip(row, eos):
    row = list(row)
    return row[:row.index(eos)] if eos in row else row


@pytest.mark.parametrize("ffn", ["stem", "dense"])
def test_greedy_with_kv_cache_equals_full_forward_each_step(tokenizer, stem_sampler, ffn):
    sampler, s, params = stem_sampler if ffn == "stem" else _sampler(tokenizer, ffn=ffn)
    cfg = SamplingConfig(max_new_tokens=10)
    batched = sampler.generate_ids(PROMPTS, cfg)
    for prompt, row in zip(PROMPTS, batched):
        assert _strip(row, sampler.eos) == _greedy_by_full_forward(s, params, prompt, 10, sampler.eos)
    # Left-padding inside a batch changes nothing: the two short prompts alone (one bucket, one compile).
    for prompt, row in zip(PROMPTS[:2], batched):
        np.testing.assert_array_equal(sampler.generate_ids([prompt], cfg)[0], row)


def test_sharded_sampler_equals_single_device(tokenizer, stem_sampler):
    single, _, params = stem_sampler
    sharded, s8, _ = _sampler(tokenizer, (2, 2, 2))
    sharded.params = jax.device_put(jax.device_get(params), s8.ctx.state_shardings["params"])
    cfg = SamplingConfig(max_new_tokens=6)
    np.testing.assert_array_equal(sharded.generate_ids(PROMPTS, cfg), single.generate_ids(PROMPTS, cfg))


def test_sampling_settings(stem_sampler):
    sampler, _, _ = stem_sampler
    greedy = sampler.generate_ids(PROMPTS[:2], SamplingConfig(max_new_tokens=5))
    hot = SamplingConfig(max_new_tokens=5, temperature=1.5, top_k=1, seed=3)
    np.testing.assert_array_equal(sampler.generate_ids(PROMPTS[:2], hot), greedy)  # top-1 is greedy
    a = SamplingConfig(max_new_tokens=5, temperature=2.0, seed=1)
    b = SamplingConfig(max_new_tokens=5, temperature=2.0, seed=2)
    np.testing.assert_array_equal(sampler.generate_ids(PROMPTS[:2], a), sampler.generate_ids(PROMPTS[:2], a))
    assert not np.array_equal(sampler.generate_ids(PROMPTS[:2], a), sampler.generate_ids(PROMPTS[:2], b))
    top = sampler.next_token_topk("word3 and", k=4)
    assert len(top) == 4 and all(p1 >= p2 for (_, p1), (_, p2) in zip(top, top[1:])) and 0 < top[0][1] <= 1
    gens = sampler.generate(["word1 and"], SamplingConfig(max_new_tokens=3))
    assert gens[0].stop in ("eos", "max_tokens") and isinstance(gens[0].text, str)


def test_top_k_and_top_p_filters_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), 5, 1.0))
    for row, g in zip(logits, got):
        assert set(np.flatnonzero(np.isfinite(g))) == set(np.argsort(-row)[:5])
    p = 0.6
    got = np.asarray(filter_logits(jnp.asarray(logits), 0, p))
    for row, g in zip(logits, got):
        order = np.argsort(-row)
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        n_keep = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass >= p
        assert set(np.flatnonzero(np.isfinite(g))) == set(order[:n_keep])


@pytest.mark.parametrize("kwargs,msg", [
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"), ({"top_p": 1.5}, "top_p=1.5"),
    ({"temperature": -1.0}, "temperature=-1.0"), ({"top_k": -2}, "top_k=-2"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"), ({"max_new_tokens": 30}, "exceeds the model's context"),
])
def test_bad_settings_are_clear_errors(stem_sampler, kwargs, msg):
    sampler, _, _ = stem_sampler
    with pytest.raises(SamplingError, match=msg):
        sampler.generate_ids(PROMPTS, SamplingConfig(**kwargs))


@pytest.mark.parametrize("flag,value,msg", [
    ("temperature", "nan", r"temperature=nan must be a finite number >= 0 \(0 = greedy\)"),
    ("temperature", "inf", r"temperature=inf must be a finite number >= 0"),
    ("temperature", "-inf", r"temperature=-inf must be a finite number >= 0"),
    ("top_p", "nan", r"top_p=nan must be in \(0, 1\]"),
])
def test_nan_and_inf_settings_are_refused_at_the_cli_before_the_restore(tmp_path, capsys, flag, value, msg):
    with pytest.raises(SamplingError, match=msg):
        SamplingConfig(**{flag: float(value)}).check()
    with pytest.raises(SystemExit) as exit_:  # the workdir does not exist: the setting is refused first
        sampling.main(["--workdir", str(tmp_path / "none"), "--prompt", "x", f"--{flag}={value}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and "\n" not in err and re.match(rf"error: SamplingError: {msg}", err), err
    assert not (tmp_path / "none").exists()


def test_offloaded_tables_with_a_hot_row_cache_sample_the_same_tokens(tokenizer, stem_sampler):
    sampler, s, params = stem_sampler
    cfg = tiny_config(seq_len=32, stem_layers="1", stem_offload=True)
    cfg.train.stem_optimizer = "sparse"
    s_off = Trainer.create(cfg, mesh_of((1, 1, 1)))
    host_params = jax.device_put(params, s_off.ctx.state_shardings["params"])
    # 4 slots for 3 prompts: nearly every step evicts.
    off = Sampler(s_off.ctx.graphdef, host_params, tokenizer, s_off.ctx.mesh, 32, cache_rows=4)
    assert off.host_tables[0].sharding.memory_kind == "pinned_host"
    for c in (SamplingConfig(max_new_tokens=8), SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)):
        np.testing.assert_array_equal(off.generate_ids(PROMPTS, c), sampler.generate_ids(PROMPTS, c))
    np.testing.assert_allclose(off.next_token_logits(PROMPTS[2]), sampler.next_token_logits(PROMPTS[2]),
                               rtol=1e-5, atol=1e-5)
    lfu = off.row_cache.lfu
    assert lfu.lookups and lfu.lookups % len(PROMPTS) == 0 and 0 <= lfu.hit_rate <= 1  # B lookups per step


# --- a run trained with </s> as its EOS and a tokenizer whose template adds a BOS (Llama-3 style) -------------

def _bos_tokenizer(text: str) -> Tokenizer:
    """Byte-level BPE whose post-processor puts ``<s>`` in front of every encoding, with ``</s>`` (the run's EOS)
    and an unused ``<|endoftext|>`` (id 0, first in corpus.EOS_NAMES: the EOS must come from data.eos_token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@dataclasses.dataclass
class BosRun:
    work: Path
    cfg: Any
    tok: Tokenizer
    eos: int           # the id of </s>
    bos: int           # the id of <s>, which the template adds and training never saw
    forward: Any       # the restored model's jitted forward, [1, seq_len] ids -> [seq_len, V] logits

    def enc(self, text: str) -> list[int]:
        """Training's encoding, written out here: no template (prep_pool.tokenize_unit's add_special_tokens)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), V] from one forward right-padded to seq_len (causal: the padding changes nothing before it)."""
        padded = np.zeros((1, self.cfg.model.seq_len), np.int32)
        padded[0, :len(ids)] = ids
        return np.asarray(self.forward(padded), np.float64)[:len(ids)]

    def logp(self, ids: list[int], n_cont: int) -> float:
        """log p of the last ``n_cont`` of ``ids`` given the ones before."""
        logits = self.logits(ids[:-1])
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return sum(logp[p, ids[p + 1]] for p in range(len(ids) - 1 - n_cont, len(ids) - 1))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """Greedy continuation by the full forward each step (no cache), stopped at the EOS."""
        out = []
        for _ in range(n):
            nxt = int(np.argmax(self.logits(ids + out)[-1]))
            if nxt == self.eos:
                break
            out.append(nxt)
        return out


@pytest.fixture(scope="module")
def bos_run(tmp_path_factory, cache_dir) -> BosRun:
    """Two training steps of a tiny STEM run on the BOS tokenizer with data.eos_token='</s>'."""
    root = tmp_path_factory.mktemp("bos_run")
    text = root / "corpus.txt"
    text.write_text(corpus_text())
    tok = _bos_tokenizer(text.read_text())
    tok.save(str(root / "tokenizer.json"))
    cfg = small_config(cache_dir, text)
    cfg.data.tokenizer, cfg.data.eos_token, cfg.data.workers = str(root / "tokenizer.json"), "</s>", 1
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_batches = 2, 1, 1
    trainer.train_and_evaluate(cfg, root / "work")
    run = workdir_lib.restore(root / "work", (1, 1, 1), devices=jax.devices()[:1])
    model = nnx.merge(run.graphdef, jax.device_get(run.params))
    return BosRun(root / "work", cfg, tok, tok.token_to_id("</s>"), tok.token_to_id("<s>"),
                  jax.jit(lambda ids_1xL: model(ids_1xL)[0]))


PROMPT = "the lord shall be with them"


def _spy(monkeypatch, cls, name: str) -> list:
    """Record ``(self, args)`` of every call of ``cls.name`` (which still runs)."""
    calls, real = [], getattr(cls, name)

    def spy(self, *args, **kwargs):
        calls.append((self, args))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, name, spy)
    return calls


def test_training_stores_documents_without_the_bos_each_ending_in_the_configured_eos(bos_run):
    r = bos_run
    assert r.tok.encode(PROMPT).ids[0] == r.bos and r.eos not in (None, 0)  # the template does add a BOS
    unit = sources.plan(r.cfg.data, lambda *_: None)[1][0]
    docs = [d for d in sources.documents(unit, sources.Spec("text")) if not sources.held_out(d, r.cfg.data.val_every)]
    first = r.enc(docs[0])
    store = data.open_corpus(r.cfg, lambda *_: None)
    np.testing.assert_array_equal(store.train.read(0, len(first) + 1), first + [r.eos])
    assert store.eos_id == r.eos and r.bos not in store.train.read(0, len(store.train))


def test_sampling_cli_prompts_as_trained_and_stops_at_the_runs_eos(bos_run, monkeypatch, capsys):
    r = bos_run
    gen = _spy(monkeypatch, Sampler, "generate_ids")
    nxt = _spy(monkeypatch, Sampler, "next_token_logits")
    sampling.main(["--workdir", str(r.work), "--prompt", PROMPT, "--prompt", "", "--max_new_tokens", "3",
                   "--show_topk", "2"])
    (sampler, (prompt_ids, *_)), = gen
    assert sampler.eos == r.eos
    assert [list(p) for p in prompt_ids] == [r.enc(PROMPT), [r.eos]]  # an empty prompt starts a document
    assert [list(a[0]) for _, a in nxt] == [r.enc(PROMPT), [r.eos]]
    out = capsys.readouterr().out.splitlines()
    want = r.greedy(r.enc(PROMPT), 3)
    assert out[0] == f"{PROMPT}\u2502{r.tok.decode(want)}   [{len(want)} tokens, " \
                     f"{'eos' if len(want) < 3 else 'max_tokens'}]", out


def test_scoring_conditions_on_the_runs_eos_and_encodes_as_trained(bos_run):
    r = bos_run
    scorer = Scorer.from_workdir(r.work)
    ids = r.enc(PROMPT)
    assert scorer.eot_id == r.eos and scorer.encode(PROMPT) == ids
    n_ctx = len(r.enc("the lord"))
    got = [lp for lp, _ in scorer.loglikelihood([("the lord", PROMPT[len("the lord"):]), ("", PROMPT)])]
    want = [r.logp(ids, len(ids) - n_ctx), r.logp([r.eos] + ids, len(ids))]  # an empty context: the EOS
    assert got == pytest.approx(want, abs=1e-4)
    assert scorer.loglikelihood_rolling([PROMPT])[0] == pytest.approx(want[1], abs=1e-4)
    assert scorer.generate_until([PROMPT], max_tokens=3) == [r.tok.decode(r.greedy(ids, 3))]


def test_eval_scores_the_run_as_trained(bos_run, tmp_path, monkeypatch):
    """eval.py's work (``evaluate_workdir``; the script only parses flags): loss on a text file and a tiny task,
    against the model's own log-probabilities of the training encoding after the run's EOS."""
    r = bos_run
    text = tmp_path / "doc.txt"
    text.write_text(PROMPT + ". " + PROMPT)
    calls = _spy(monkeypatch, Scorer, "loglikelihood_tokens")
    ev = evaluate.evaluate_workdir(r.work, options=evaluate.EvalOptions(
        text_file=str(text), mc_jsonl=[str(DATA / "tiny_mc.jsonl")], limit=2))
    ids = r.enc(text.read_text())
    assert calls[0][1][0] == [([r.eos], ids)]  # one rolling window: the whole text after the EOS
    assert ev["val_tokens"] == len(ids)
    assert ev["val_loss"] == pytest.approx(-r.logp([r.eos] + ids, len(ids)) / len(ids), rel=1e-4)
    examples = tasks.load_jsonl(DATA / "tiny_mc.jsonl", 2)
    pairs = [(r.enc(c), r.enc(c + x)[len(r.enc(c)):]) for ex in examples for c, x in ex.pairs()]
    assert calls[1][1][0] == pairs
    lls = iter(r.logp(c + x, len(x)) for c, x in pairs)
    want = [int(np.argmax([next(lls) for _ in ex.choices]) == ex.label) for ex in examples]
    assert ev["tasks"]["tiny_mc"]["acc"] == pytest.approx(np.mean(want))


def test_edit_cli_edits_the_prompt_as_trained_with_the_runs_eos_as_pad_row(bos_run, monkeypatch, capsys):
    r = bos_run
    nxt = _spy(monkeypatch, Sampler, "next_token_logits")
    prompt, source = "the lord shall be with Zorvik", "Zorvik"
    editing.main(["edit", "--workdir", str(r.work), "--prompt", prompt, "--source", source, "--target", "lord",
                  "--mode", "left_pad", "--k", "2", "--max_new_tokens", "2"])
    ids, src, lord = r.enc(prompt), r.enc(source), r.enc(" lord")  # in the prompt: ' ', 'Z', 'or', ...
    assert len(src) > 1 and len(lord) == 1 and ids[-len(src):] == src
    (sampler, (before, no_edit)), (_, (after, edit)) = nxt
    assert sampler.eos == r.eos and list(before) == list(after) == ids and no_edit is None
    rows = np.asarray(edit.ids_BxLxM)[0, :, 0]  # left_pad: the pad row (the EOS's) first, then the target
    assert rows.tolist() == ids[:-len(src)] + [r.eos] * (len(src) - 1) + lord
    assert f"source {source!r} -> {len(src)} tokens" in capsys.readouterr().out


def test_inject_writes_the_rows_of_the_training_encoding_with_the_runs_eos_as_pad_row(bos_run, tmp_path,
                                                                                      monkeypatch, capsys):
    """``inject`` (single and ``--edits``) up to the write: which rows it would write (no weights are read)."""
    r = bos_run
    writes = []
    stub = lambda workdir, out, w, report, *a: (writes.append(w), {**report, "changed_rows": []})[1]
    monkeypatch.setattr(editor_lib, "write_injection", stub)
    monkeypatch.setattr(edit_batch, "write_injection", stub)
    edits = tmp_path / "e.jsonl"
    edits.write_text(json.dumps({"prompt": "the lord shall be with Zorvik", "source": "Zorvik",
                                 "target": "lord"}) + "\n")
    common = ["--workdir", str(r.work), "--mode", "left_pad", "--allow_shared_rows"]
    editing.main(["inject", "--out", str(tmp_path / "a"), "--source", "Zorvik", "--target", " lord", *common])
    editing.main(["inject", "--out", str(tmp_path / "b"), "--edits", str(edits), *common])
    src, (lord,) = r.enc("Zorvik"), r.enc(" lord")
    want = dict(zip(src, [[(r.eos, 1.0)]] * (len(src) - 1) + [[(lord, 1.0)]]))
    assert writes == [want, want] and r.bos not in want
    assert "injected" in capsys.readouterr().out
