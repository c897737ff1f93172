"""Dense vs STEM-full train-step time at the tiny or the d512 shape, measured in one run as paired single steps.

    python benchmarks/step_time.py                   # tiny preset shape, fp32, all local devices
    python benchmarks/step_time.py --dtype bfloat16 --out benchmarks/step_time.md
    python benchmarks/step_time.py --against shard_map   # STEM-full, default lookup vs the masked gather
    python benchmarks/step_time.py --against scanned     # STEM-full, per-layer vs scanned layers
    python benchmarks/step_time.py --shape d512          # d 512, 4 layers, d_ff 2048, batch 8 x 256

Each pair times one dense step and one STEM-full step back to back (the order alternates from pair to pair),
so a neighbour's load that comes and goes hits both sides of a pair alike. The ratio is taken per pair and
reported as the median with its 10th-90th percentile range, for the full train step and for forward +
backward alone, next to the model-FLOP ratio from ``accounting.flops_per_token``; per-model medians give the
tokens/s. Prints the markdown; writes it only to ``--out``.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

from configs import tiny
from stem_jax import accounting, cli, data, sharding, steps
from stem_jax.config import validate
from stem_jax.trainer import Trainer


def shape_config(shape: str, dtype: str = "float32", vocab: int = 8192):
    """The tiny preset's config at ``shape``: ``tiny`` (d 128, 6 layers, batch 16 x 128), ``d256`` (d 256,
    4 layers, d_ff 1024, 4/4 heads, batch 8 x 256; the torch comparison's) or ``d512`` (d 512, 4 layers,
    d_ff 2048, 8 query / 4 KV heads, batch 8 x 256), with ``dtype`` and ``vocab``."""
    cfg = tiny.get_config()
    cfg.model = dataclasses.replace(cfg.model, dtype=dtype, vocab_size=vocab)
    if shape == "d256":
        cfg.model = dataclasses.replace(cfg.model, d_model=256, d_ff=1024, n_layers=4, n_heads=4, n_kv_heads=4,
                                        seq_len=256)
        cfg.train = dataclasses.replace(cfg.train, batch_size=8)
    if shape == "d512":
        cfg.model = dataclasses.replace(cfg.model, d_model=512, d_ff=2048, n_layers=4, n_heads=8, n_kv_heads=4,
                                        seq_len=256)
        cfg.train = dataclasses.replace(cfg.train, batch_size=8)
    return cfg


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_enum("shape", "tiny", ["tiny", "d512"], "Model shape: the tiny preset's, or d 512 with 4 layers, "
                      "d_ff 2048, 8/4 heads, batch 8 x 256.", flag_values=fv)
    flags.DEFINE_integer("pairs", 20, "Timed pairs (one step of each model) for the train step and again for "
                         "forward + backward.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model dtype.", flag_values=fv)
    flags.DEFINE_integer("vocab", 8192, "Vocabulary size.", flag_values=fv)
    flags.DEFINE_enum("against", "dense", ["dense", "shard_map", "xla", "scanned"], "The other side of each pair: "
                      "the dense twin, STEM-full with that lookup mode instead of the default, or STEM-full with "
                      "its layers scanned (model.scan_layers).", flag_values=fv)
    flags.DEFINE_enum("optimizer", "dense", ["dense", "sparse"], "STEM-full's table optimizer (train.stem_optimizer; "
                      "the dense twin has no tables).", flag_values=fv)
    flags.DEFINE_string("out", "", "Also write the markdown table to this file (default: print it only).",
                        flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    _, args = cli.parse_command(argv, "python benchmarks/step_time.py", __doc__.splitlines()[0], _define)

    base = shape_config(args.shape, args.dtype, args.vocab)
    stem_full = dataclasses.replace(base.model, ffn="stem", stem_layers="full")
    if args.against == "dense":
        other, other_name = dataclasses.replace(base.model, ffn="dense"), "dense"
    elif args.against == "scanned":
        other, other_name = dataclasses.replace(stem_full, scan_layers=True), "stem-full, scanned"
    else:
        other, other_name = dataclasses.replace(stem_full, stem_lookup=args.against), f"stem-full, lookup={args.against}"
    variants = {other_name: other, "stem-full": stem_full}
    mesh = sharding.make_mesh(base.mesh.shape)
    rng = np.random.default_rng(0)
    B, L = base.train.batch_size, base.model.seq_len
    runs = {}
    for name, model_cfg in variants.items():
        optimizer = args.optimizer if model_cfg.ffn == "stem" else "dense"  # the dense twin has no tables
        train_cfg = dataclasses.replace(base.train, stem_optimizer=optimizer)
        cfg = validate(dataclasses.replace(base, model=model_cfg, train=train_cfg))
        s = Trainer.create(cfg, mesh)
        state = s.init_state()
        batch = data.to_global(rng.integers(0, args.vocab, (B, L + 1)).astype(np.int32), s.ctx.batch_sharding)
        for _ in range(2):  # compile + one warm step
            with jax.set_mesh(mesh):
                state, m = s.train_step(state, batch)
        jax.block_until_ready(m)
        # Forward + backward alone (no optimizer update), to separate model cost from the dense AdamW
        # that touches every table row each step.
        grad_fn = jax.jit(jax.grad(functools.partial(steps.loss, s.ctx.graphdef)),
                          in_shardings=(s.ctx.state_shardings["params"], s.ctx.batch_sharding),
                          out_shardings=s.ctx.state_shardings["params"])
        with jax.set_mesh(mesh):
            jax.block_until_ready(grad_fn(state["params"], batch))
        runs[name] = {"setup": s, "state": state, "batch": batch, "times": [], "grad_times": [], "cfg": cfg,
                      "grad_fn": grad_fn}
    def train(r):
        with jax.set_mesh(mesh):
            r["state"], m = r["setup"].train_step(r["state"], r["batch"])
        jax.block_until_ready(m)

    def fwd_bwd_only(r):
        with jax.set_mesh(mesh):
            jax.block_until_ready(r["grad_fn"](r["state"]["params"], r["batch"]))

    for kind, fn in (("times", train), ("grad_times", fwd_bwd_only)):
        for i in range(args.pairs):
            for name in ((other_name, "stem-full") if i % 2 == 0 else ("stem-full", other_name)):
                t0 = time.perf_counter()
                fn(runs[name])
                runs[name][kind].append(time.perf_counter() - t0)
    ratio = {kind: [s_ / d_ for s_, d_ in zip(runs["stem-full"][kind], runs[other_name][kind])]
             for kind in ("times", "grad_times")}

    step = {k: statistics.median(r["times"]) for k, r in runs.items()}
    fwd_bwd = {k: statistics.median(r["grad_times"]) for k, r in runs.items()}
    flops = {k: accounting.flops_per_token(r["cfg"].model) for k, r in runs.items()}
    params = {k: r["setup"].ctx.counts for k, r in runs.items()}
    dev = jax.devices()[0]
    lines = [
        f"Train step at the {args.shape} shape (d {base.model.d_model}, {base.model.n_layers} layers, "
        f"d_ff {base.model.d_ff}, STEM table optimizer {args.optimizer}, "
        f"vocab {args.vocab}, batch {B} x {L}, {args.dtype}) on {jax.device_count()} x {dev.device_kind} "
        f"({dev.platform}), mesh {sharding.describe(mesh)}; {args.pairs} paired steps, medians.",
        "",
        "| model | total params | active params / token | train step (ms) | tokens/s | fwd+bwd only (ms) "
        "| train MFLOPs / token |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in runs:
        lines.append(f"| {k} | {params[k].total / 1e6:.2f}M | {params[k].active / 1e6:.2f}M | "
                     f"{step[k] * 1e3:.1f} | {B * L / step[k]:,.0f} | {fwd_bwd[k] * 1e3:.1f} | {flops[k] / 1e6:.2f} |")
    lines += ["", f"| STEM-full / {other_name}, per pair | median | 10th-90th percentile |", "|---|---|---|"]
    for kind, label in (("times", "train-step time"), ("grad_times", "fwd+bwd time")):
        p10, p50, p90 = np.percentile(ratio[kind], [10, 50, 90])
        lines.append(f"| {label} | {p50:.3f} | {p10:.3f}-{p90:.3f} |")
    lines.append(f"| model FLOPs | {flops['stem-full'] / flops[other_name]:.3f} | |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
