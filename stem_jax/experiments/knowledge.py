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

``--name_tokens N`` (N > 1) names every country with N words drawn from a small pool, so each country spans
N tokens whose rows it shares with other countries, as the pieces of real multi-token names are. Capitals stay
one word. ``variants`` then measures where the fact sits: STEM edits by mode, of the last token only, of a
subset of layers, and two controls that are not STEM edits (the target's tokens put in the prompt, with and
without their STEM rows). Every edit goes through ``edit_batch.run_edits``, the path of ``edit --edits``,
whose JSONL (``edits.jsonl``) the run also writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import tiny
from stem_jax import cli, corpus as corpus_lib, edit_batch
from stem_jax.edit_batch import EditRequest, run_edits
from stem_jax.editor import EditError, Editor, format_comparison
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


def make_facts(n: int, seed: int = 0, name_tokens: int = 1) -> list[tuple[str, str]]:
    """(country, capital) pairs. ``name_tokens`` > 1: countries of that many words from a pool of about
    ``2 n^(1/name_tokens)`` words, so every word is part of several countries."""
    rng = np.random.default_rng(seed)
    if name_tokens < 1:
        raise ValueError(f"name_tokens={name_tokens} must be >= 1")
    if name_tokens == 1:
        names = invent_names(2 * n, rng)
        return list(zip(names[:n], names[n:]))
    pool = invent_names(max(4, 2 * math.ceil(n ** (1 / name_tokens))), rng, syllables=2)
    capitals = [c for c in invent_names(n + len(pool), rng) if c not in pool][:n]
    countries: list[str] = []
    while len(countries) < n:
        name = " ".join(rng.choice(pool, name_tokens, replace=False))
        if name not in countries:
            countries.append(name)
    return list(zip(countries, capitals))


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


def edit_variants(stem_layers: tuple[int, ...]) -> list[tuple[str, dict]]:
    """(label, run_edits arguments) of the edits measured: where in the model a fact can be moved from."""
    half = len(stem_layers) // 2 or 1
    return [("STEM rows, every source token, auto", {}),
            *[(f"STEM rows, every source token, {m}", dict(mode=m))
              for m in ("one_to_one", "average", "copy", "left_pad", "right_pad")],
            ("STEM rows, last source token", dict(positions="last")),
            (f"STEM rows, layers {list(stem_layers[:half])}", dict(layers=stem_layers[:half])),
            (f"STEM rows, layers {list(stem_layers[half:])}", dict(layers=stem_layers[half:])),
            ("control: STEM rows + input embedding", dict(mode="copy", swap="stem+embedding")),
            ("control: input embedding only", dict(mode="copy", swap="embedding"))]


def edit_requests(facts: list[tuple[str, str]]) -> list[EditRequest]:
    """Fact i's prompt with its country edited into the next one's, expecting the next one's capital."""
    n = len(facts)
    return [EditRequest(c, facts[(i + 1) % n][0], PROMPT.format(c=c), facts[(i + 1) % n][1], f"fact {i}")
            for i, (c, _) in enumerate(facts)]


def _variant(editor: Editor, facts, prompts, kw: dict) -> dict:
    """Edit success of one variant, and how often the model still gives the source's own capital."""
    try:
        r = run_edits(editor, edit_requests(facts), k=1, **kw)
    except EditError as e:  # a mode that does not fit these lengths
        return {"error": str(e)}
    own = [edit_batch.expected_id(editor.tokenizer, p, k) for p, (_, k) in zip(prompts, facts)]
    kept = [editor.tokenizer.decode([o]) == x["after"][0][0] for o, x in zip(own, r["edits"])]
    return {"edit_success": r["success"], "still_source_answer": float(np.mean(kept))}


def measure(workdir: Path, facts: list[tuple[str, str]]) -> dict:
    editor = Editor.from_workdir(workdir)
    sampler, tok = editor.sampler, editor.tokenizer
    last_logits = _last_logits_fn(sampler.graphdef)

    def top1(params, prompts: list[str]) -> np.ndarray:
        ids = [corpus_lib.encode_text(tok, p).ids for p in prompts]
        L = max(len(i) for i in ids)
        ids_BxL = np.zeros((len(ids), L), np.int32)
        for b, i in enumerate(ids):
            ids_BxL[b, :len(i)] = i  # right padding: causal attention keeps the last real logits exact
        with jax.set_mesh(sampler.mesh):
            out = last_logits(params, jnp.asarray(ids_BxL), jnp.asarray([len(i) - 1 for i in ids]))
        return np.asarray(jnp.argmax(out, axis=-1))

    answer = np.array([corpus_lib.encode_text(tok, PROMPT.format(c=c) + " " + k).ids[len(corpus_lib.encode_text(tok, PROMPT.format(c=c)).ids)]
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
    variants = {label: _variant(editor, facts, prompts, kw) for label, kw in edit_variants(editor.stem_layers)}
    per_fact = [{"country": c, "capital": k, "answer_id": int(a), "predicted_id": int(b)}
                for (c, k), a, b in zip(facts, answer, base)]
    return {"facts": n, "recall": float(np.mean(base == answer)), "per_fact": per_fact,
            "recall_heldout_template": float(np.mean(heldout == answer)),
            "edit_success": edit_hits / n, "locality": local_kept / local_total,
            "single_token_countries": single / n, "prompt": PROMPT, "heldout_prompt": HELDOUT_PROMPT,
            "country_tokens": float(np.mean([len(corpus_lib.encode_text(tok, " " + c).ids) for c, _ in facts])), "variants": variants,
            "example": editor.compare(prompts[0], facts[0][0], facts[1][0], k=3)}


def run(out: str | Path, n_facts: int, steps: int, repeats: int, name_tokens: int = 1) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts = make_facts(n_facts, name_tokens=name_tokens)
    (out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    (out / "edits.jsonl").write_text("".join(json.dumps({"prompt": r.prompt, "source": r.source, "target": r.target,
                                                         "expect": r.expect}) + "\n" for r in edit_requests(facts)))
    corpus = out / "facts.txt"
    write_corpus(facts, corpus, repeats)
    t0 = time.time()
    train_and_evaluate(base_config(corpus, steps), out / "model")
    train_s = time.time() - t0
    r = measure(out / "model", facts)
    r.update(train_seconds=round(train_s, 1), total_seconds=round(time.time() - t0, 1), steps=steps,
             name_tokens=name_tokens)
    (out / "eval.json").write_text(json.dumps(r, indent=1) + "\n")
    md = (f"| facts | tokens per country | recall | edit success | locality | recall (held-out template) | "
          f"steps | train time |\n|---|---|---|---|---|---|---|---|\n| {n_facts} | {r['country_tokens']:.2f} | "
          f"{r['recall']:.1%} | {r['edit_success']:.1%} | {r['locality']:.1%} | {r['recall_heldout_template']:.1%} | "
          f"{steps} | {train_s / 60:.1f} min |\n\n| edit | edit success | still the source's capital |\n|---|---|---|\n")
    md += "".join(f"| {label} | " + (f"{v['edit_success']:.1%} | {v['still_source_answer']:.1%} |\n" if "error" not in v
                                     else f"n/a: {v['error']} | |\n") for label, v in r["variants"].items())
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
    flags.DEFINE_integer("name_tokens", 1, "Words per country name (1: one invented word, one token each).")


def main(argv):
    cli.check_no_args(argv)
    f = flags.FLAGS
    cli.run_user_errors(run, f.out, f.facts, f.steps, f.repeats, f.name_tokens)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
