"""The paper's comparison at matched training FLOPs: dense, STEM-1/3, STEM-1/2, STEM-full and Hash-MoE.

    python -m stem_jax.experiments.compare --out runs/compare                       # tiny preset
    python -m stem_jax.experiments.compare --config configs/tiny.py --dense_steps 400 --out runs/compare

Every run starts from the same preset (model shape, data, seed, batch) and differs only in its FFNs. The
dense run trains ``--dense_steps`` steps; each other run trains the number of steps that spends the same
training FLOPs (``accounting.flops_per_token``), so cheaper-per-token models see more tokens. Runs are
ordinary training workdirs under ``--out``: rerunning resumes or skips finished ones. Writes
``results.md`` / ``results.json`` (the paper's columns plus validation loss, perplexity, next-token
accuracy, ROI and loss-spike counts) and ``loss_vs_flops.png`` / ``loss_vs_tokens.png``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure  # the object API: files only, no pyplot state or display

from stem_jax import accounting, cli
from stem_jax.config import ConfigError, validate
from stem_jax.trainer import train_and_evaluate
from stem_jax.writer import log

# name -> (model.ffn, model.stem_layers); Hash-MoE takes STEM-1/3's placement and matches its total params.
VARIANTS = {
    "dense": ("dense", "none"), "stem-1/3": ("stem", "1/3"), "stem-1/2": ("stem", "1/2"),
    "stem-full": ("stem", "full"), "hash-moe": ("hash_moe", "1/3"),
    "stem-additive": ("stem_additive", "1/3"), "stem-gate": ("stem_gate", "1/3"),
}
DEFAULT_RUNS = "dense,stem-1/3,stem-1/2,stem-full,hash-moe"


def count_spikes(losses: np.ndarray, window: int = 20, threshold: float = 0.5) -> int:
    """Steps whose loss exceeds the median of the previous ``window`` steps by more than ``threshold`` nats
    (a falling curve never triggers it; a spike that lasts several steps counts once per step)."""
    losses = np.asarray(losses, np.float64)
    return int(sum(losses[i] > np.median(losses[i - window:i]) + threshold for i in range(window, len(losses))))


def plan(base, names: list[str], dense_steps: int) -> dict:
    """Config of each run, with steps chosen to match the dense run's training FLOPs."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown comparison run(s) {unknown}; choose from {list(VARIANTS)}")
    dense_model = dataclasses.replace(base.model, ffn="dense", stem_layers="none")
    budget = accounting.flops_per_token(dense_model) * dense_steps
    runs = {}
    for name in names:
        ffn, layers = VARIANTS[name]
        model = dataclasses.replace(base.model, ffn=ffn, stem_layers=layers)
        steps = max(1, round(budget / accounting.flops_per_token(model)))
        train = dataclasses.replace(base.train, steps=steps, log_every=1,
                                    warmup_steps=round(base.train.warmup_steps * steps / dense_steps))
        runs[name] = validate(dataclasses.replace(base, model=model, train=train))
    return runs


def _curves(workdir: Path, cfg) -> tuple[np.ndarray, np.ndarray, dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    final = next(r for r in reversed(rows) if "val_loss" in r)
    return np.array([r["step"] for r in train]), np.array([r["loss"] for r in train]), final


def summarize(out: Path, runs: dict) -> list[dict]:
    results = []
    for name, cfg in runs.items():
        steps, losses, final = _curves(out / name.replace("/", "_"), cfg)
        rep = accounting.report(cfg.model)
        tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
        results.append({"name": name, **rep, "steps": int(cfg.train.steps),
                        "tokens": int(cfg.train.steps * tokens_per_step),
                        "train_flops": rep["train_flops_per_token"] * cfg.train.steps * tokens_per_step,
                        "val_loss": final["val_loss"], "val_ppl": final["val_ppl"], "val_acc": final.get("val_acc"),
                        "loss_spikes": count_spikes(losses), "curve_steps": steps.tolist(),
                        "curve_loss": losses.tolist(), "tokens_per_step": tokens_per_step})
    dense = next((r for r in results if r["ffn"] == "dense"), None)
    for r in results:  # the paper's ROI: accuracy per inference GFLOP, relative to dense
        r["roi"] = (accounting.roi(r["val_acc"], r["gflops"], dense["val_acc"], dense["gflops"])
                    if dense and r["val_acc"] is not None and dense["val_acc"] else None)
    return results


def table(results: list[dict]) -> str:
    head = ("| model | FFN layers | total params (M) | paper-style total (M) | active (M) | GFLOPs | steps | "
            "tokens (M) | train PFLOPs | val loss | val ppl | val acc | ROI | loss spikes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        roi = f"{r['roi']:.2f}×" if r["roi"] else "–"
        lines.append(
            f"| {r['name']} | {r['ffn_layers'] or '–'} | {r['total_params'] / 1e6:.2f} | "
            f"{r['paper_total_params'] / 1e6:.2f} | {r['active_params'] / 1e6:.2f} | {r['gflops']:.4f} | "
            f"{r['steps']} | {r['tokens'] / 1e6:.2f} | {r['train_flops'] / 1e15:.3f} | {r['val_loss']:.3f} | "
            f"{r['val_ppl']:.1f} | {r['val_acc']:.4f} | {roi} | {r['loss_spikes']} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> None:
    for x_key, label, fname in (("flops", "training FLOPs", "loss_vs_flops.png"),
                                ("tokens", "training tokens", "loss_vs_tokens.png")):
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        for r in results:
            steps, loss = np.array(r["curve_steps"]), np.array(r["curve_loss"])
            per_step = r["tokens_per_step"] * (r["train_flops_per_token"] if x_key == "flops" else 1)
            smooth = np.convolve(loss, np.ones(10) / 10, mode="valid") if len(loss) > 10 else loss
            ax.plot(steps[len(steps) - len(smooth):] * per_step, smooth, label=r["name"], lw=1.3)
        ax.set_xlabel(label)
        ax.set_ylabel("train loss (10-step mean)")
        ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)


def compare(base, out: str | Path, names: list[str], dense_steps: int) -> list[dict]:
    out = Path(out)
    runs = plan(base, names, dense_steps)
    for name, cfg in runs.items():
        log(f"=== {name}: ffn={cfg.model.ffn} layers={cfg.model.stem_layers!r} steps={cfg.train.steps}")
        result = train_and_evaluate(cfg, out / name.replace("/", "_"))
        if "stopped_at" in result:
            log("stopped; rerun the same command to continue the comparison")
            return []
    results = summarize(out, runs)
    (out / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if not k.startswith("curve")} for r in results], indent=1) + "\n")
    md = table(results)
    (out / "results.md").write_text(md)
    plot(results, out)
    log("\n" + md + f"\nwrote {out / 'results.md'}, {out / 'loss_vs_flops.png'}, {out / 'loss_vs_tokens.png'}")
    return results


def _define_flags():
    """Flags are defined only when run as a script, so importing this module (tests) defines none."""
    flags.DEFINE_string("out", "runs/compare", "Directory of the runs, the results table and the plots.")
    flags.DEFINE_list("runs", DEFAULT_RUNS.split(","), f"Runs to compare, from {list(VARIANTS)}.")
    flags.DEFINE_integer("dense_steps", 200, "Steps of the dense run; the FLOP budget of every run.")
    global _CONFIG
    _CONFIG = cli.define_config_flag()


def main(argv):
    cli.check_no_args(argv)
    f = flags.FLAGS
    cli.run_user_errors(compare, cli.checked(_CONFIG), f.out, f.runs, f.dense_steps)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
