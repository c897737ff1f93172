"""Synthetic knowledge benchmark: train a tiny STEM model on invented facts, then measure what it knows and
whether row-swap edits and injections move exactly that knowledge.

    python -m stem_jax.experiments.knowledge --out runs/knowledge            # generate, train, measure

Facts are "capital of <country>" pairs over invented names, written with several templates. Three rates go
to ``<out>/eval.json`` (and ``results.md``):
- recall: top-1 next token of "The capital of <country> is" is the capital's first token;
- edit success: with the rows of <country> swapped for those of the next country (``editing.Editor``, mode
  auto, every STEM layer), the top-1 token is the *target* country's capital;
- locality: after injecting that swap permanently (the source token's rows overwritten), the other facts'
  top-1 predictions are unchanged.
Prompts use a training template; ``recall_heldout_template`` also reports a template never trained on.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import tiny
from stem_jax import cli
from stem_jax.editing import Editor, format_comparison
from stem_jax.trainer import train_and_evaluate
from stem_jax.writer import log

TEMPLATES = ("The capital of {c} is {k}.", "{k} is the capital of {c}.", "{c} has its capital in {k}.",
             "People in {c} travel to {k}, the capital.", "The government of {c} sits in {k}.")
PROMPT = "The capital of {c} is"
HELDOUT_PROMPT = "Everyone knows that the capital city of {c} is"
_ONSETS = "b br d dr f g gr k kl l m n p pr r s st t tr v z".split()
_VOWELS = "a e i o u ai ea io".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]


def invent_names(n: int, rng: np.random.Generator, syllables: int = 3) -> list[str]:
    """``n`` distinct capitalised pseudo-words."""
    names: set[str] = set()
    while len(names) < n:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        names.add(w.capitalize())
    ordered = sorted(names)  # a set's order depends on PYTHONHASHSEED; the facts must not
    rng.shuffle(ordered)
    return ordered


def make_facts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    names = invent_names(2 * n, rng)
    return list(zip(names[:n], names[n:]))


def write_corpus(facts: list[tuple[str, str]], path: Path, repeats: int, seed: int = 0) -> None:
    """Every fact in every template, ``repeats`` times, shuffled into lines of 2 sentences."""
    rng = np.random.default_rng(seed)
    sentences = [t.format(c=c, k=k) for c, k in facts for t in TEMPLATES] * repeats
    rng.shuffle(sentences)
    lines = [" ".join(sentences[i:i + 2]) for i in range(0, len(sentences), 2)]
    path.write_text("\n".join(lines) + "\n")


def base_config(corpus: Path, steps: int):
    cfg = tiny.get_config()
    # STEM in every layer but 0: the more of the FFN capacity sits in per-token rows, the more of a fact
    # an edit of those rows can move (the input embedding, which an edit leaves alone, also names the country).
    cfg.model = dataclasses.replace(cfg.model, vocab_size=2048, seq_len=64, stem_layers="full")
    cfg.data = dataclasses.replace(cfg.data, source="text", files=str(corpus), val_every=10)
    cfg.train = dataclasses.replace(cfg.train, steps=steps, batch_size=32, warmup_steps=20, lr=3e-3,
                                    log_every=25, checkpoint_every=0, eval_batches=4)
    return cfg


def _last_logits_fn(graphdef):
    @jax.jit
    def f(params, ids_BxL, last_B):
        logits = nnx.merge(graphdef, params)(ids_BxL)
        return jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0]
    return f


def measure(workdir: Path, facts: list[tuple[str, str]]) -> dict:
    editor = Editor.from_workdir(workdir)
    sampler, tok = editor.sampler, editor.tokenizer
    last_logits = _last_logits_fn(sampler.graphdef)

    def top1(params, prompts: list[str]) -> np.ndarray:
        ids = [tok.encode(p).ids for p in prompts]
        L = max(len(i) for i in ids)
        ids_BxL = np.zeros((len(ids), L), np.int32)
        for b, i in enumerate(ids):
            ids_BxL[b, :len(i)] = i  # right padding: causal attention keeps the last real logits exact
        with jax.set_mesh(sampler.mesh):
            out = last_logits(params, jnp.asarray(ids_BxL), jnp.asarray([len(i) - 1 for i in ids]))
        return np.asarray(jnp.argmax(out, axis=-1))

    answer = np.array([tok.encode(PROMPT.format(c=c) + " " + k).ids[len(tok.encode(PROMPT.format(c=c)).ids)]
                       for c, k in facts])
    prompts = [PROMPT.format(c=c) for c, _ in facts]
    base = top1(sampler.params, prompts)
    heldout = top1(sampler.params, [HELDOUT_PROMPT.format(c=c) for c, _ in facts])
    n = len(facts)
    edit_hits, local_kept, local_total, single = 0, 0, 0, 0
    params_host = jax.device_get(sampler.params)
    row = nnx.merge(sampler.graphdef, params_host).stored_rows  # token ids -> rows of the stored tables
    for i, (c, _) in enumerate(facts):
        j = (i + 1) % n
        e = editor.prepare(prompts[i], c, facts[j][0])
        single += len(e.source_ids) == 1
        edit_hits += int(np.argmax(sampler.next_token_logits(e.prompt_ids, e.arrays())) == answer[j])
        # Injection of the same swap: overwrite the source rows at every STEM layer, then re-ask everyone else.
        injected = jax.tree.map(lambda x: np.array(x), params_host)
        for layer in editor.stem_layers:
            table = injected["blocks"][layer]["ffn"]["table"].get_value()
            src, tgt = row(np.asarray(e.source_ids)), row(np.asarray(e.target_ids))
            table[src] = np.mean(table[tgt], axis=0) if len(tgt) != len(src) else table[tgt]
        after = top1(injected, prompts)
        others = np.arange(n) != i
        local_kept += int(np.sum(after[others] == base[others]))
        local_total += int(others.sum())
    per_fact = [{"country": c, "capital": k, "answer_id": int(a), "predicted_id": int(b)}
                for (c, k), a, b in zip(facts, answer, base)]
    return {"facts": n, "recall": float(np.mean(base == answer)), "per_fact": per_fact,
            "recall_heldout_template": float(np.mean(heldout == answer)),
            "edit_success": edit_hits / n, "locality": local_kept / local_total,
            "single_token_countries": single / n, "prompt": PROMPT, "heldout_prompt": HELDOUT_PROMPT,
            "example": editor.compare(prompts[0], facts[0][0], facts[1][0], k=3)}


def run(out: str | Path, n_facts: int, steps: int, repeats: int) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts = make_facts(n_facts)
    (out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    corpus = out / "facts.txt"
    write_corpus(facts, corpus, repeats)
    t0 = time.time()
    train_and_evaluate(base_config(corpus, steps), out / "model")
    train_s = time.time() - t0
    r = measure(out / "model", facts)
    r.update(train_seconds=round(train_s, 1), total_seconds=round(time.time() - t0, 1), steps=steps)
    (out / "eval.json").write_text(json.dumps(r, indent=1) + "\n")
    md = (f"| facts | recall | edit success | locality | recall (held-out template) | train time |\n"
          f"|---|---|---|---|---|---|\n| {n_facts} | {r['recall']:.1%} | {r['edit_success']:.1%} | "
          f"{r['locality']:.1%} | {r['recall_heldout_template']:.1%} | {train_s / 60:.1f} min |\n")
    (out / "results.md").write_text(md)
    log("\n" + md)
    log(format_comparison(r["example"]))
    return r


def _define_flags():
    """Flags are defined only when run as a script, so importing this module (tests) defines none."""
    flags.DEFINE_string("out", "runs/knowledge", "Where the facts, the model and eval.json go.")
    flags.DEFINE_integer("facts", 64, "Number of invented country/capital pairs.")
    flags.DEFINE_integer("steps", 1200, "Training steps (batch 32 x 64 tokens).")
    flags.DEFINE_integer("repeats", 20, "Copies of each fact sentence in the corpus.")


def main(argv):
    cli.check_no_args(argv)
    cli.enable_compilation_cache()
    f = flags.FLAGS
    cli.run_user_errors(run, f.out, f.facts, f.steps, f.repeats)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
