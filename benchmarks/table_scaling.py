"""Capacity without cost: how STEM's step time, device memory and row traffic scale with the vocabulary.

    python benchmarks/table_scaling.py --out benchmarks/table_scaling.md   # all parts, also written there
    python benchmarks/table_scaling.py --parts steps --vocabs 8192,32768   # printed only

Parts (each a markdown table; every ratio comes from one run of this script):
- ``steps``: train-step time of STEM-full vs the dense twin at the tiny shape for each vocabulary, with the
  dense (optax AdamW over whole tables) and the sparse (row-wise) table optimizer, as paired single steps
  (dense, STEM, sparse back to back, the order rotating) with the per-pair ratios' median and 10th-90th
  percentile;
- ``memory``: bytes of the tables and their optimizer state in device vs host memory, with and without
  ``model.stem_offload``; unique rows per step vs tokens per step on the embedded corpus;
- ``offload``: step time with and without offload, and the share of the host->device row transfer hidden
  behind compute by the prefetch.
Batches are real text from the embedded corpus (ids < 8192 whatever the model's vocabulary), so larger
vocabularies add table rows that exist but are rarely read, as in a real large-vocabulary model.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

from configs import tiny
from stem_jax import cli, corpus as corpus_lib, data, offload, sharding, sparse
from stem_jax.config import Config, stem_indices, validate
from stem_jax.trainer import Trainer


def config(vocab: int, ffn: str, optimizer: str = "dense", offloaded: bool = False) -> Config:
    cfg = tiny.get_config()
    cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab, ffn=ffn, stem_layers="full", stem_offload=offloaded)
    cfg.train = dataclasses.replace(cfg.train, stem_optimizer=optimizer)
    return validate(cfg)


def corpus_batches(n: int, batch: int, seq_len: int) -> list[np.ndarray]:
    c = corpus_lib.load_corpus(tiny.get_config().data, 8192, log=lambda _: None)
    it = iter(data.train_dataset(c.train, seq_len, batch, seed=0, vocab_size=8192))
    return [next(it).astype(np.int32) for _ in range(n)]


def _runner(cfg: Config):
    """A function that runs one train step of a fresh ``cfg`` model on one device and waits for it."""
    s = Trainer.create(cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    box = {"state": s.init_state()}

    def step(b: np.ndarray, nxt: np.ndarray | None) -> None:
        box["state"], m = s.step(box["state"], b, nxt)
        jax.block_until_ready(m)
    return step


def time_models(cfgs: dict[str, Config], batches: list[np.ndarray], rounds: int) -> dict[str, list[float]]:
    """Seconds of every timed train step of each config, as paired single steps: step j of every model runs
    back to back (the order rotates from step to step), so load that comes and goes hits all of them alike.
    One untimed step each first (compiles), then ``rounds`` passes over ``batches``."""
    runners = {k: _runner(c) for k, c in cfgs.items()}
    names = list(runners)
    for step in runners.values():
        step(batches[0], None)
    times: dict[str, list[float]] = {k: [] for k in names}
    for j in range(rounds * len(batches)):
        b = batches[j % len(batches)]
        for k in names[j % len(names):] + names[:j % len(names)]:
            t0 = time.perf_counter()
            runners[k](b, None)
            times[k].append(time.perf_counter() - t0)
    return times


def ratio_cell(a: list[float], b: list[float]) -> str:
    """The per-pair ratio a/b as ``median (10th-90th percentile)``."""
    p10, p50, p90 = np.percentile(np.array(a) / np.array(b), [10, 50, 90])
    return f"{p50:.3f} ({p10:.3f}-{p90:.3f})"


def part_steps(vocabs: list[int], batches: list[np.ndarray], rounds: int) -> str:
    rows = ["| vocab | dense twin (s/step) | STEM-full, dense AdamW (s/step) | STEM / dense per pair, median (p10-p90) "
            "| STEM-full, sparse (s/step) | sparse / dense per pair |", "|---|---|---|---|---|---|"]
    for v in vocabs:
        t = time_models({"dense": config(v, "dense"), "stem": config(v, "stem"),
                         "sparse": config(v, "stem", "sparse")}, batches, rounds)
        med = {k: statistics.median(x) for k, x in t.items()}
        rows.append(f"| {v:,} | {med['dense']:.3f} | {med['stem']:.3f} | {ratio_cell(t['stem'], t['dense'])} | "
                    f"{med['sparse']:.3f} | {ratio_cell(t['sparse'], t['dense'])} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def _bytes_by_kind(state: dict) -> dict[str, int]:
    """Bytes of the table-related arrays (tables, moments, counts) per memory kind."""
    out: dict[str, int] = {}
    for a in offload.host_arrays(state):
        out[a.sharding.memory_kind] = out.get(a.sharding.memory_kind, 0) + a.size * a.dtype.itemsize
    return out


def part_memory(vocab: int, batches: list[np.ndarray]) -> str:
    rows = ["| placement | table + optimizer bytes on device | in host memory | backbone bytes on device |",
            "|---|---|---|---|"]
    for offloaded in (False, True):
        s = Trainer.create(config(vocab, "stem", "sparse", offloaded), sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
        state = s.init_state()
        kinds = _bytes_by_kind(state)
        backbone = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(sparse.split_tables(state["params"])[1]))
        rows.append(f"| {'offload (pinned_host)' if offloaded else 'on device'} | "
                    f"{kinds.get('device', 0) / 2**20:,.1f} MiB | {kinds.get('pinned_host', 0) / 2**20:,.1f} MiB | "
                    f"{backbone / 2**20:,.1f} MiB |")
        del state
    cfg = config(vocab, "stem")
    n_tables = len(stem_indices(cfg.model))
    uniq = [len(np.unique(b[:, :-1])) for b in batches]
    tokens = batches[0][:, :-1].size
    per_step = max(uniq) * cfg.model.d_ff * 4 * 4 * n_tables  # rows, mu, nu (+count) in, the same out
    rows += ["", "| tokens per step | unique rows per step (median, min-max) | unique / tokens | "
                 "staged row bytes per step (max, all STEM layers, param + 2 moments + count) |",
             "|---|---|---|---|",
             f"| {tokens:,} | {statistics.median(uniq):,.0f} ({min(uniq)}-{max(uniq)}) | "
             f"{statistics.median(uniq) / tokens:.2f} | {per_step / 2**20:,.1f} MiB each way |"]
    return "\n".join(rows)


def part_offload(vocab: int, batches: list[np.ndarray], rounds: int = 2) -> str:
    """The same offloaded trainer run with and without prefetch, rounds alternating. Without prefetch each
    step gathers its own rows first; with it the gather for step k+1 is dispatched behind step k. The hidden
    share of the transfer is (serial - pipelined) / (gather alone), clipped to [0, 1]."""
    t_on = statistics.median(time_models({"on": config(vocab, "stem", "sparse")}, batches, 1)["on"])
    s = Trainer.create(config(vocab, "stem", "sparse", offloaded=True), sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    state, tr = s.init_state(), s.offloader
    times: dict[str, list[float]] = {"serial": [], "pipelined": [], "gather": []}
    for _ in range(rounds):
        for mode in ("serial", "pipelined"):
            for i, b in enumerate(batches):
                nxt = batches[i + 1] if mode == "pipelined" and i + 1 < len(batches) else None
                t0 = time.perf_counter()
                state, m = tr.step(state, b, nxt)
                jax.block_until_ready((m, offload.host_arrays(state)))  # the write-back is part of a step
                if i >= 2:
                    times[mode].append(time.perf_counter() - t0)
        for b in batches[2:]:
            t0 = time.perf_counter()
            jax.block_until_ready(tr.stage(offload.host_arrays(state), b))
            times["gather"].append(time.perf_counter() - t0)
    serial, pipe, gather = (statistics.median(times[k]) for k in ("serial", "pipelined", "gather"))
    hidden = min(max((serial - pipe) / gather, 0.0), 1.0)
    return "\n".join([
        "| sparse, tables on device (s/step) | offload, no prefetch | offload, prefetch | offload (prefetch) / "
        "on device | host gather + transfer alone | transfer hidden |",
        "|---|---|---|---|---|---|",
        f"| {t_on:.4f} | {serial:.4f} | {pipe:.4f} | {pipe / t_on:.2f} | {gather:.4f} | {hidden:.0%} |"])


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_string("parts", "steps,memory,offload", "Comma-separated parts to run: steps, memory, offload.",
                        flag_values=fv)
    flags.DEFINE_string("vocabs", "8192,32768,65536", "Comma-separated vocabularies of the steps part.",
                        flag_values=fv)
    flags.DEFINE_integer("steps", 4, "Distinct batches per pass.", flag_values=fv)
    flags.DEFINE_integer("rounds", 3, "Timed passes over the batches (paired single steps).", flag_values=fv)
    flags.DEFINE_integer("memory_vocab", 131072, "Vocabulary of the memory part.", flag_values=fv)
    flags.DEFINE_integer("offload_vocab", 32768, "Vocabulary of the offload part.", flag_values=fv)
    flags.DEFINE_string("out", "", "Also write the markdown tables to this file (default: print them only).",
                        flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    _, a = cli.parse_command(argv, "python benchmarks/table_scaling.py", __doc__.splitlines()[0], _define)
    base = tiny.get_config()
    batches = corpus_batches(max(a.steps, 50), base.train.batch_size, base.model.seq_len)
    head = (f"# STEM table scaling ({jax.devices()[0].device_kind}, {jax.device_count()} device(s) visible, "
            f"1 used; tiny shape: d_model 128, 6 layers, STEM-full = 5 tables, d_ff 512, batch 16 x 128, fp32)")
    out = [head]
    parts = a.parts.split(",")
    if "steps" in parts:
        out += ["", "## Step time vs vocabulary", "",
                part_steps([int(v) for v in a.vocabs.split(",")], batches[:a.steps], a.rounds)]
    if "memory" in parts:
        out += ["", f"## Memory held by the tables (vocab {a.memory_vocab:,})", "", part_memory(a.memory_vocab, batches)]
    if "offload" in parts:
        out += ["", f"## Offload (vocab {a.offload_vocab:,})", "", part_offload(a.offload_vocab, batches[:a.steps])]
    text = "\n".join(out) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
