"""Our dense train step against transformers' LlamaForCausalLM in PyTorch eager, same shape, in alternating
processes.

    python benchmarks/torch_compare.py                           # d 256 shape, fp32
    python benchmarks/torch_compare.py --dtype bfloat16 --out benchmarks/torch_compare.md

Needs the ``hf`` extra (torch 2.13.0, the CPU wheel, and transformers). Two worker processes stay alive, one
per framework, each holding its model, optimizer state and one random batch. The parent asks them in turn
(A, B, B, A, ...) to time ``--steps`` train steps while the other waits on its pipe, so only one computes at a
time and a neighbour's load that comes and goes hits both alike. Each round gives a ratio of tokens/s
(ours / torch, from the two workers' median step times); the report gives its median and 10th-90th
percentile.

The same on both sides: the shape and the parameter count (checked), fp32 parameters, AdamW (b1, b2, eps,
decoupled weight decay on matrices only), global-norm gradient clipping at ``train.clip_norm``, mean
next-token cross-entropy in fp32. ``--dtype bfloat16`` is our ``model.dtype=bfloat16`` (bf16 matmuls on fp32
parameters) against ``torch.autocast("cpu", torch.bfloat16)``. Our step also computes its logged metrics
(gradient and parameter norms) and the learning-rate schedule; torch's uses a constant rate. Both use every
CPU core (``torch.set_num_threads``; XLA's CPU runtime does by default). Prints the markdown; writes it only
to ``--out``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import flags

from benchmarks.step_time import shape_config
from stem_jax import cli

_TAG = "@@"  # marks the workers' protocol lines on stdout (libraries may print too)


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both models.", flag_values=fv)
    flags.DEFINE_enum("shape", "d256", ["d256", "tiny", "d512"], "Model shape (benchmarks/step_time.py).",
                      flag_values=fv)
    flags.DEFINE_integer("rounds", 12, "Rounds: each times --steps steps of each framework.", flag_values=fv)
    flags.DEFINE_integer("steps", 3, "Train steps per framework per round.", flag_values=fv)
    flags.DEFINE_enum("worker", "", ["", "jax", "torch"], "Internal: run as that framework's worker.",
                      flag_values=fv)
    flags.DEFINE_string("out", "", "Also write the markdown to this file (default: print it only).", flag_values=fv)


def _reply(obj) -> None:
    print(_TAG + json.dumps(obj), flush=True)


def _serve(step, info: dict) -> None:
    """Answer the parent: ``info`` once, then for each line ``n`` the times of ``n`` steps, until EOF."""
    _reply(info)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        _reply(times)


def jax_worker(cfg) -> None:
    import jax

    from stem_jax import data, sharding
    from stem_jax.trainer import Trainer

    mesh = sharding.make_mesh(cfg.mesh.shape)
    s = Trainer.create(cfg, mesh)
    box = {"state": s.init_state()}
    B, L, V = cfg.train.batch_size, cfg.model.seq_len, cfg.model.vocab_size
    batch = data.to_global(np.random.default_rng(0).integers(0, V, (B, L + 1)).astype(np.int32),
                           s.ctx.batch_sharding)

    def step():
        with jax.set_mesh(mesh):
            box["state"], m = s.train_step(box["state"], batch)
        return float(jax.block_until_ready(m["loss"]))

    loss = [step() for _ in range(2)]  # compile + one warm step
    _serve(step, {"params": s.ctx.counts.total, "loss": loss[0],
                  "runtime": f"jax {jax.__version__}, {jax.devices()[0].platform}"})


def torch_worker(cfg) -> None:
    import torch
    import transformers

    from stem_jax.hf import hf_config

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    t, bf16 = cfg.train, cfg.model.dtype == "bfloat16"
    hf = {k: v for k, v in hf_config(cfg).items() if k not in ("stem_jax", "architectures")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).train()
    params = list(model.named_parameters())
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
    B, L, V = t.batch_size, cfg.model.seq_len, cfg.model.vocab_size
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, V, (B, L + 1)))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
        return loss.item()

    loss = [step() for _ in range(2)]
    _serve(step, {"params": sum(p.numel() for _, p in params), "loss": loss[0],
                  "runtime": f"torch {torch.__version__} eager, {torch.get_num_threads()} threads, "
                             f"attention {model.config._attn_implementation}, transformers {transformers.__version__}"})


class _Worker:
    def __init__(self, kind: str, dtype: str, shape: str):
        cmd = [sys.executable, "-m", "benchmarks.torch_compare", f"--worker={kind}", f"--dtype={dtype}",
               f"--shape={shape}"]
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
        self.info = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        cli.die(f"the {self.kind} worker exited ({self.proc.wait()}) before answering; its stderr is above")

    def time(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    _, args = cli.parse_command(argv, "python benchmarks/torch_compare.py", __doc__.splitlines()[0], _define)
    cfg = shape_config(args.shape, args.dtype)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ffn="dense"))
    if args.worker:
        return (jax_worker if args.worker == "jax" else torch_worker)(cfg)

    workers = {"jax": _Worker("jax", args.dtype, args.shape), "torch": _Worker("torch", args.dtype, args.shape)}
    counts = {k: w.info["params"] for k, w in workers.items()}
    if counts["jax"] != counts["torch"]:
        cli.die(f"parameter counts differ: {counts}; the two models are not the same shape")
    times = {k: [] for k in workers}
    ratios = []
    for i in range(args.rounds):
        order = ("jax", "torch") if i % 2 == 0 else ("torch", "jax")
        got = {k: statistics.median(workers[k].time(args.steps)) for k in order}
        for k, v in got.items():
            times[k].append(v)
        ratios.append(got["torch"] / got["jax"])
    for w in workers.values():
        w.close()

    m = cfg.model
    B, L = cfg.train.batch_size, m.seq_len
    lines = [
        f"Dense train step, d {m.d_model}, {m.n_layers} layers, d_ff {m.d_ff}, {m.n_heads}/{m.n_kv_heads} heads, "
        f"vocab {m.vocab_size}, batch {B} x {L}, {args.dtype} compute, {counts['jax']:,} parameters; "
        f"{args.rounds} alternating rounds of {args.steps} steps (`python benchmarks/torch_compare.py"
        f"{' --dtype bfloat16' if args.dtype == 'bfloat16' else ''}`).",
        "",
        "| side | runtime | step (ms, median of rounds) | tokens/s | loss at step 1 |",
        "|---|---|---|---|---|",
    ]
    for k, w in workers.items():
        step = statistics.median(times[k])
        lines.append(f"| {'stem-jax' if k == 'jax' else 'transformers Llama'} | {w.info['runtime']} | "
                     f"{step * 1e3:.1f} | {B * L / step:,.0f} | {w.info['loss']:.3f} |")
    p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
    lines += ["", f"Tokens/s, stem-jax / torch, per round: median {p50:.3f} (10th-90th percentile "
              f"{p10:.3f}-{p90:.3f})."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
