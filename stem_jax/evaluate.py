"""Evaluate a trained workdir: restore a checkpoint onto the current devices, then validation loss (or loss on
a text file), multiple-choice tasks, needle-in-a-haystack and the parameter/FLOP accounting, written to
``<workdir>/eval.json`` and ``<workdir>/eval.md``."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from stem_jax import accounting, data, sharding, steps, tasks, workdir as workdir_lib
from stem_jax.config import ModelConfig
from stem_jax.scoring import Scorer
from stem_jax.writer import describe_run, log

NIAH_HAY_TOKENS = 1 << 20  # the needle task samples its haystacks from this much of the held-out split


@dataclasses.dataclass
class EvalOptions:
    """What to evaluate besides the checkpoint's validation loss (all optional)."""
    text_file: str | None = None              # loss/ppl on this file instead of the held-out split
    mc_jsonl: Sequence[str] = ()              # multiple-choice JSONL files; task name = file stem
    mc_template: str = "qa"                   # their prompt: tasks.TEMPLATES name or a string with {question}
    mc_target_delimiter: str = " "            # put before every choice (lm-eval's target_delimiter)
    tfds_tasks: Sequence[str] = ()            # keys of tasks.TFDS_TASKS, e.g. "ai2_arc/ARC-Easy"
    tfds_data_dir: str | None = None
    niah_lengths: Sequence[int] = ()          # needle-in-a-haystack context lengths in tokens
    niah_depths: Sequence[float] = (0.0, 0.5, 1.0)
    limit: int | None = None                  # examples per task (NIAH: per length and depth, default 4)
    eval_batch: int | None = None             # rows per scoring forward (default: 8, rounded to the mesh)


def default_niah_lengths(seq_len: int) -> list[int]:
    return [seq_len // 4, seq_len // 2, seq_len]


def accounting_block(model: ModelConfig, workdir: Path) -> dict:
    """``accounting.report(model)`` plus the training run's median tokens/s and, on a known accelerator,
    its MFU (both from ``metrics.jsonl``, absent when the workdir has none)."""
    out = accounting.report(model)
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
    if tps:
        out["train_tokens_per_sec"] = float(np.median(tps))
        mfus = [r["mfu"] for r in rows if "mfu" in r]
        if mfus:
            out["train_mfu"] = float(np.median(mfus))
    return out


def text_file_loss(scorer: Scorer, path: str | Path) -> dict:
    """Mean next-token loss over every token of a text file (rolling windows of seq_len; the first token is
    predicted from the run's EOS)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--text_file {path} is not a readable file")
    text = path.read_text(encoding="utf-8", errors="replace")
    n_tokens = len(scorer.encode(text))
    if n_tokens == 0:
        raise ValueError(f"--text_file {path} has no text")
    loss = -scorer.loglikelihood_rolling([text])[0] / n_tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": n_tokens,
            "val_source": str(path)}


def evaluate_workdir(workdir: str | Path, mesh_shape: Sequence[int] | str = "auto", step: int | None = None,
                     eval_batches: int | None = None, options: EvalOptions | None = None) -> dict:
    """Evaluate the latest (or ``step``) checkpoint; writes ``<workdir>/eval.json`` and ``eval.md``.

    The checkpoint is restored onto ``mesh_shape`` over the devices present now, whatever mesh trained it.
    """
    opts = options or EvalOptions()
    workdir = Path(workdir)
    cfg = workdir_lib.load_run_config(workdir)
    if eval_batches is not None:
        cfg.train.eval_batches = eval_batches
    # Tasks are read before the checkpoint so a bad file fails fast.
    mc = {Path(p).stem: tasks.load_jsonl(p, opts.limit, opts.mc_template, opts.mc_target_delimiter)
          for p in opts.mc_jsonl}
    for name in opts.tfds_tasks:
        mc[name] = tasks.load_tfds(name, opts.tfds_data_dir, opts.limit)
    corpus = None if opts.text_file else data.open_corpus(cfg, log)
    run = workdir_lib.restore(workdir, mesh_shape, step, cfg=cfg)
    step, cfg = run.step, run.cfg  # the checkpoint's model, should config.json disagree
    describe_run(cfg, run.mesh, accounting.count_params(run.params, cfg.model), corpus)
    if corpus is not None and not (workdir / "tokenizer.json").is_file():
        run.tokenizer = corpus.tokenizer
    workdir_lib.check_tokenizer(workdir, step, run.require_tokenizer())
    scorer = Scorer.from_run(run, opts.eval_batch)

    result: dict = {"step": step}
    if corpus is None:
        result.update(text_file_loss(scorer, opts.text_file))
    else:
        result.update(validate(run, corpus), val_tokens=len(corpus.val), eval_batches=cfg.train.eval_batches,
                      val_source="held-out split")
    log(f"step {step}: val_loss {result['val_loss']:.4f}, val_ppl {result['val_ppl']:.2f} ({result['val_source']})")
    if mc:
        result["tasks"] = {}
        for name, examples in mc.items():
            result["tasks"][name] = tasks.score_mc(scorer.loglikelihood, examples)
            result["tasks"][name]["first_request"] = list(examples[0].pairs()[0])  # the prompt as scored
            r = result["tasks"][name]
            log(f"{name}: acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} over {r['n']} (chance {r['chance']:.3f})")
    if opts.niah_lengths:
        result["niah"] = run_niah(scorer, corpus, opts, cfg.train.seed)
        log(f"niah: acc {result['niah']['acc']:.4f} (chance {result['niah']['chance']:.3f}), by length "
            + ", ".join(f"{k}: {v:.2f}" for k, v in result["niah"]["by_length"].items()))
    result["accounting"] = accounting_block(cfg.model, workdir)
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
        (workdir / "eval.md").write_text(to_markdown(result))
    log(f"-> {workdir / 'eval.json'}, {workdir / 'eval.md'}")
    return result


def validate(run: workdir_lib.Run, corpus) -> dict:
    """The trainer's validation (``train.eval_batches`` batches of the held-out split at the run's batch size)."""
    batch_sh = sharding.batch_sharding(run.mesh, run.cfg.train.batch_size)
    param_sh = jax.tree.map(lambda a: a.sharding, run.params)
    eval_step = steps.eval_step_fn(run.graphdef, param_sh, batch_sh,
                                   eos_id=corpus.eos_id if run.cfg.data.packing else None,
                                   microbatches=run.cfg.train.microbatches, chunk=run.cfg.train.eval_loss_chunk)

    def metrics_of(local_BxL1):
        with jax.set_mesh(run.mesh):
            return eval_step(run.params, data.to_global(local_BxL1, batch_sh))
    return steps.validation(metrics_of, steps.validation_batches(run.cfg, corpus.val))


def run_niah(scorer: Scorer, corpus, opts: EvalOptions, seed: int) -> dict:
    """Needles in held-out text (or the --text_file's text), ranked among 9 distractor numbers."""
    if corpus is not None:
        hay = corpus.val.read(0, NIAH_HAY_TOKENS)
    else:
        hay = np.asarray(scorer.encode(Path(opts.text_file).read_text(encoding="utf-8", errors="replace")))
    bad = [n for n in opts.niah_lengths if n > scorer.seq_len]
    if bad:
        raise ValueError(f"--niah lengths {bad} exceed model.seq_len={scorer.seq_len}")
    examples = tasks.needle_examples(hay, scorer.encode, opts.niah_lengths, opts.niah_depths,
                                     samples=opts.limit or 4, seed=seed, skip_ids=[scorer.eot_id])
    return {**tasks.score_needles(scorer.loglikelihood_tokens, examples),
            "depths": [float(d) for d in opts.niah_depths], "candidates": len(examples[0].candidate_ids)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) >= 1e4 else f"{v:.4f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def to_markdown(r: dict) -> str:
    """eval.json as markdown tables."""
    lines = [f"# Evaluation at step {r['step']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in r.items() if k.startswith("val_")]
    if r.get("tasks"):
        lines += ["", "| task | n | acc | acc_norm | chance |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {t['n']} | {t['acc']:.4f} | {t['acc_norm']:.4f} | {t['chance']:.3f} |"
                  for name, t in r["tasks"].items()]
    if r.get("niah"):
        n = r["niah"]
        depths = [str(d) for d in n["depths"]]
        lines += ["", f"Needle in a haystack: accuracy of ranking the true number first among {n['candidates']} "
                  f"(chance {n['chance']:.3f}); overall {n['acc']:.4f} over {n['n']}.", "",
                  "| length | acc | " + " | ".join(f"depth {d}" for d in depths) + " |",
                  "|---|---|" + "---|" * len(depths)]
        for length, acc in n["by_length"].items():
            cells = [f"{n['by_length_depth'][length][d]:.2f}" for d in depths]
            lines.append(f"| {length} | {acc:.4f} | " + " | ".join(cells) + " |")
    if r.get("accounting"):
        lines += ["", "| accounting | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in r["accounting"].items()]
    return "\n".join(lines) + "\n"
