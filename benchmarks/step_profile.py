"""Where a train step's time goes: a ``jax.profiler`` trace of the jitted step, per-op time grouped by role.

    python benchmarks/step_profile.py                          # d 512 shape, dense and STEM-full, fp32
    python benchmarks/step_profile.py --optimizer sparse --out /tmp/profile.md

Each model's train step is compiled and warmed up; then ``--steps`` steps of each are traced one at a time,
alternating between the models (A, B, B, A, ...) so that the machine's drift hits both alike. Every XLA op the trace
records (``hlo_op`` of the step's module) is matched to its instruction in the compiled HLO, whose
``op_name`` carries the model's named scopes (``attention``, ``ffn``, ``stem_lookup``, ``lm_head``,
``loss``, ``optimizer``) and ``transpose(`` for the backward pass. Groups:

- attention: the attention block (norm, projections, scores), forward and backward;
- FFN matmuls: the FFN block outside the STEM lookup (gate/up/down projections, SiLU, the product);
- STEM lookup forward / backward: the row gather and, backward, the scatter-add of the row gradients into a
  table-shaped gradient (and its zero fill);
- optimizer: the optax update, parameter norms;
- LM head + loss: the final norm, the logits matmul, softmax cross-entropy;
- other: the embedding and whatever carries no scope.

The XLA CPU runtime may run independent ops at once, so the op times can add up to more than the step's wall
time; both are reported. Prints the markdown; writes it only to ``--out``.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags
from jax.profiler import ProfileData

from benchmarks.step_time import shape_config
from stem_jax import cli, data, sharding
from stem_jax.config import validate
from stem_jax.trainer import Trainer

GROUPS = ("attention", "FFN matmuls", "STEM lookup forward", "STEM lookup backward", "optimizer",
          "LM head + loss", "other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_enum("shape", "d512", ["tiny", "d256", "d512"], "Model shape (benchmarks/step_time.py).",
                      flag_values=fv)
    flags.DEFINE_integer("steps", 5, "Traced steps per model.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model dtype.", flag_values=fv)
    flags.DEFINE_enum("optimizer", "dense", ["dense", "sparse"], "STEM-full's table optimizer.", flag_values=fv)
    flags.DEFINE_integer("top", 8, "Most expensive single ops listed per model.", flag_values=fv)
    flags.DEFINE_string("out", "", "Also write the markdown to this file (default: print it only).", flag_values=fv)


def group_of(op_name: str) -> str:
    """The group of an HLO instruction from its ``op_name``: its named scopes, as they appear in any
    transformation (``jvp(ffn)``, ``transpose(jvp(ffn))``, ``/ffn/``); ``transpose(`` marks the backward."""
    scopes = set(re.split(r"[/()]", op_name))
    if "optimizer" in scopes:
        return "optimizer"
    if "stem_lookup" in scopes:
        return "STEM lookup backward" if "transpose(" in op_name else "STEM lookup forward"
    for scope, group in (("attention", "attention"), ("ffn", "FFN matmuls"), ("lm_head", "LM head + loss"),
                         ("loss", "LM head + loss")):
        if scope in scopes:
            return group
    return "other"


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> ``op_name`` metadata, from the compiled module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def module_name(hlo_text: str) -> str:
    """The name a trace gives the ops of a compiled module (its ``HloModule`` line)."""
    return hlo_text.split("HloModule ", 1)[1].split(",", 1)[0].split(" ", 1)[0]


def op_times(trace_dir: str, module: str) -> dict[str, float]:
    """Summed nanoseconds per ``hlo_op`` of ``module`` in the trace written to ``trace_dir``."""
    path = next(Path(trace_dir).rglob("*.xplane.pb"))
    times: dict[str, float] = collections.defaultdict(float)
    for plane in ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                if stats.get("hlo_module") == module and "hlo_op" in stats:
                    times[stats["hlo_op"]] += ev.duration_ns
    return times


class Model:
    """One model's compiled train step, its state and a batch, and what the traces recorded of it."""

    def __init__(self, name: str, cfg, rng: np.random.Generator):
        self.name, self.mesh = name, sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        self.setup = Trainer.create(validate(cfg), self.mesh)
        self.state = self.setup.init_state()
        B, L = cfg.train.batch_size, cfg.model.seq_len
        self.batch = data.to_global(rng.integers(0, cfg.model.vocab_size, (B, L + 1)).astype(np.int32),
                                    self.setup.ctx.batch_sharding)
        with jax.set_mesh(self.mesh):
            hlo = self.setup.train_step.lower(self.state, self.batch).compile().as_text()
        self.names, self.module = op_names(hlo), module_name(hlo)
        for _ in range(3):  # compile, warm up
            self.step()
        self.ns: dict[str, float] = collections.defaultdict(float)
        self.walls: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            self.state, m = self.setup.train_step(self.state, self.batch)
        jax.block_until_ready(m)
        return time.perf_counter() - t0

    def traced_step(self) -> None:
        """One step under its own trace, its op times added to this model's."""
        trace_dir = tempfile.mkdtemp(prefix="stem_profile_")
        jax.profiler.start_trace(trace_dir)
        self.walls.append(self.step())
        jax.profiler.stop_trace()
        for op, ns in op_times(trace_dir, self.module).items():
            self.ns[op] += ns
        shutil.rmtree(trace_dir, ignore_errors=True)

    def result(self) -> dict:
        n = len(self.walls)
        per_op = {op: ns / n / 1e6 for op, ns in self.ns.items()}
        groups = collections.Counter()
        for op, ms in per_op.items():
            groups[group_of(self.names.get(op, ""))] += ms
        return {"name": self.name, "wall_ms": statistics.median(self.walls) * 1e3, "groups": groups,
                "per_op": per_op, "names": self.names}


def profile(models: list[Model], steps: int) -> list[dict]:
    """``steps`` traced steps of each model, alternating (A, B, B, A, ...) so that the machine's drift hits
    all models alike."""
    for i in range(steps):
        for m in (models if i % 2 == 0 else models[::-1]):
            m.traced_step()
    return [m.result() for m in models]


def report(runs: list[dict], cfg, args) -> str:
    m = cfg.model
    lines = [f"Train step, d {m.d_model}, {m.n_layers} layers, d_ff {m.d_ff}, {m.n_heads}/{m.n_kv_heads} heads, "
             f"vocab {m.vocab_size}, batch {cfg.train.batch_size} x {m.seq_len}, {args.dtype}, 1 "
             f"{jax.devices()[0].platform} device; {args.steps} traced steps per model, alternating "
             f"(`python benchmarks/step_profile.py{' --optimizer sparse' if args.optimizer == 'sparse' else ''}`).",
             "", "| group (ms per step) | " + " | ".join(r["name"] for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for g in GROUPS:
        lines.append(f"| {g} | " + " | ".join(f"{r['groups'][g]:.1f} ({r['groups'][g] / sum(r['groups'].values()):.0%})"
                                              for r in runs) + " |")
    lines.append("| **sum of op times** | " + " | ".join(f"{sum(r['groups'].values()):.1f}" for r in runs) + " |")
    lines.append("| wall time per step (median) | " + " | ".join(f"{r['wall_ms']:.1f}" for r in runs) + " |")
    for r in runs:
        lines += ["", f"Most expensive ops, {r['name']}:", "", "| op | ms per step | group | op_name |",
                  "|---|---|---|---|"]
        for op, ms in sorted(r["per_op"].items(), key=lambda kv: -kv[1])[:args.top]:
            name = r["names"].get(op, "")
            lines.append(f"| `{op}` | {ms:.2f} | {group_of(name)} | `{name[-90:]}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    _, args = cli.parse_command(argv, "python benchmarks/step_profile.py", __doc__.splitlines()[0], _define)
    cfg = shape_config(args.shape, args.dtype)
    stem = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ffn="stem", stem_layers="full"),
                               train=dataclasses.replace(cfg.train, stem_optimizer=args.optimizer))
    rng = np.random.default_rng(0)
    dense = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ffn="dense"))
    runs = profile([Model("dense", dense, rng), Model("STEM-full", stem, rng)], args.steps)
    text = report(runs, cfg, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
