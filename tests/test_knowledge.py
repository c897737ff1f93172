"""The synthetic knowledge benchmark: fact generation, the corpus, and the three rates on a tiny workdir."""
import json

import numpy as np

from stem_jax.experiments.knowledge import TEMPLATES, make_facts, measure, write_corpus


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
    path = tmp_path / "facts.txt"
    write_corpus(facts[:5], path, repeats=3)
    text = path.read_text()
    for c, k in facts[:5]:
        for t in TEMPLATES:
            assert text.count(t.format(c=c, k=k)) == 3


def test_measure_reports_rates_on_a_tiny_stem_workdir(stem_workdir):
    work = stem_workdir
    facts = [("lord", "secret"), ("shall", "number"), ("unto", "thou")]  # words the tiny tokenizer knows
    r = measure(work, facts)
    for key in ("recall", "edit_success", "locality", "recall_heldout_template"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["facts"] == 3 and r["example"]["source"] == "lord"
    json.dumps(r)  # eval.json must be writable
    # The batched right-padded top-1 equals the sampler's own single-prompt logits.
    from stem_jax.sampling import Sampler
    sampler = Sampler.from_workdir(work)
    for f in r["per_fact"]:
        ids = sampler.tokenizer.encode(f"The capital of {f['country']} is").ids
        assert f["predicted_id"] == int(np.argmax(sampler.next_token_logits(ids)))
    assert r["recall"] == np.mean([f["predicted_id"] == f["answer_id"] for f in r["per_fact"]])
