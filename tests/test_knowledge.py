"""The synthetic knowledge benchmark: fact generation, the corpus, and the three rates recounted on a tiny
workdir."""
import collections
import json
import re

import jax
import numpy as np

from stem_jax import sharding, workdir as workdir_lib
from stem_jax.experiments import knowledge
from stem_jax.experiments.knowledge import HELDOUT_PROMPT, PROMPT, TEMPLATES, make_facts, measure, write_corpus


def test_facts_are_distinct_invented_names_and_deterministic(tmp_path):
    facts = make_facts(40, seed=3)
    names = [n for pair in facts for n in pair]
    assert len(set(names)) == 80 and all(n[0].isupper() and n.isalpha() for n in names)
    assert make_facts(40, seed=3) == facts and make_facts(40, seed=4) != facts
    # The same in a process with another hash seed (set order must not leak into the facts).
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "from stem_jax.experiments.knowledge import make_facts; "
                          "print(make_facts(40, seed=3))"], env={"PYTHONHASHSEED": "123", "JAX_PLATFORMS": "cpu",
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(facts)


def _corpus(tmp_path, facts, repeats, seed):
    path = tmp_path / f"facts_{seed}.txt"
    write_corpus(facts, path, repeats=repeats, seed=seed)
    return path.read_text()


def test_corpus_holds_every_fact_in_every_template_exactly_repeats_times(tmp_path):
    facts = make_facts(5, seed=3)
    text = _corpus(tmp_path, facts, 3, seed=1)
    assert text.endswith("\n")
    # No template has ". " inside, so that splits a line into its sentences.
    lines = [re.split(r"(?<=\.) ", line) for line in text[:-1].split("\n")]
    n = len(facts) * len(TEMPLATES) * 3
    assert [len(s) for s in lines] == [2] * (n // 2) + [1] * (n % 2)  # lines of 2 sentences
    sentences = [s for line in lines for s in line]
    assert collections.Counter(sentences) == {t.format(c=c, k=k): 3 for c, k in facts for t in TEMPLATES}
    # Shuffled, reproducibly per seed.
    assert sentences != [t.format(c=c, k=k) for c, k in facts for t in TEMPLATES] * 3
    assert _corpus(tmp_path, facts, 3, seed=1) == text != _corpus(tmp_path, facts, 3, seed=2)


def test_measure_recounts_on_a_tiny_stem_workdir(stem_workdir, monkeypatch):
    from stem_jax.sampling import Sampler
    work = stem_workdir
    cfg = workdir_lib.load_run_config(work)
    # Words the tiny tokenizer knows; " thouwhat" is two tokens, so the edits to and from it average rows and
    # its prompt is one token longer (the batched top-1 pads the others).
    facts = [("lord", "secret"), ("shall", "number"), ("unto", "thou"), ("thouwhat", "what")]
    # Record the parameters of every batched top-1 measure runs, to see the injected tables.
    seen, make = [], knowledge._last_logits_fn

    def spy(graphdef):
        f = make(graphdef)
        return lambda params, *a: seen.append(jax.tree.map(np.array, jax.device_get(params))) or f(params, *a)
    monkeypatch.setattr(knowledge, "_last_logits_fn", spy)
    r = measure(work, facts)
    assert r["facts"] == 4 and r["example"]["source"] == "lord"
    json.dumps(r)  # eval.json must be writable

    sampler = Sampler.from_workdir(work)
    tok, base = sampler.tokenizer, jax.device_get(sampler.params)
    on_device = jax.tree.map(lambda a: a.sharding, sampler.params)

    def top1(params, prompt):  # one prompt at a time through the sampler: independent of measure's batching
        sampler.params = jax.device_put(params, on_device)
        return int(np.argmax(sampler.next_token_logits(tok.encode(prompt).ids)))

    countries = [tok.encode(" " + c).ids for c, _ in facts]
    answers = [tok.encode(" " + k).ids[0] for _, k in facts]
    assert [len(c) for c in countries] == [1, 1, 1, 2] and r["single_token_countries"] == 0.75
    assert [f["answer_id"] for f in r["per_fact"]] == answers
    prompts = [PROMPT.format(c=c) for c, _ in facts]
    pred = [top1(base, p) for p in prompts]
    assert [f["predicted_id"] for f in r["per_fact"]] == pred
    assert r["recall"] == np.mean(np.equal(pred, answers))
    assert r["recall_heldout_template"] == np.mean([top1(base, HELDOUT_PROMPT.format(c=c)) == a
                                                    for (c, _), a in zip(facts, answers)])

    # Injection of fact i's edit: at every STEM layer the source token's rows, and nothing else, become the
    # next country's rows (their mean when the lengths differ), each in a fresh copy of the params. On this
    # untrained model the rates come out 0 (edits) and 1 (locality); the exact rows and recounts are what can fail.
    leaves, flat = jax.tree.leaves, jax.tree_util.tree_flatten_with_path
    injected = [p for p in seen if not all(np.array_equal(a, b) for a, b in zip(leaves(p), leaves(base)))]
    assert len(injected) == len(facts)
    edit_hits, kept = [], []
    for i, got in enumerate(injected):
        j = (i + 1) % len(facts)
        want, src, tgt = jax.tree.map(np.array, base), countries[i], countries[j]
        tables = [a for path, a in flat(want)[0] if any(getattr(k, "key", None) == "table" for k in path)]
        assert len(tables) == 1  # the workdir's one STEM layer
        rows = lambda t: sharding.stored_rows(np.asarray(t), cfg.model.vocab_size, cfg.model.stem_row_layout)
        for table_VxF in tables:
            table_VxF[rows(src)] = table_VxF[rows(tgt)] if len(src) == len(tgt) else table_VxF[rows(tgt)].mean(axis=0)
        for a, b in zip(leaves(got), leaves(want)):
            np.testing.assert_array_equal(a, b)
        # Each country occurs once in its prompt, so the edit there equals this injection.
        edit_hits.append(top1(want, prompts[i]) == answers[j])
        kept += [top1(want, prompts[k]) == pred[k] for k in range(len(facts)) if k != i]
    assert r["edit_success"] == np.mean(edit_hits) and r["locality"] == np.mean(kept)
