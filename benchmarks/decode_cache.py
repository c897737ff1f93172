"""Hot-row cache hit rate while decoding with host-resident STEM tables, per cache capacity.

    python benchmarks/decode_cache.py --workdir runs/tiny                                 # prints the table
    python benchmarks/decode_cache.py --workdir runs/tiny --out benchmarks/decode_cache.md  # also writes it

Prompts are the openings of held-out documents; every capacity decodes the same prompts with the same
sampling settings, and the tokens are checked against the sampler with the tables on device (the cache may
change where rows live, never what is computed). Throughput on a CPU says little: the cached loop makes a
host round trip per token, where the on-device loop is one ``lax.while_loop``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from absl import flags

from stem_jax import cli, corpus as corpus_lib
from stem_jax.sampling import Sampler, SamplingConfig
from stem_jax.workdir import load_run_config


def prompts(workdir: str, n: int, length: int) -> list[list[int]]:
    cfg = load_run_config(workdir)
    val = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, log=lambda _: None).val
    starts = np.linspace(0, len(val) - length - 1, n).astype(int)
    return [val.read(s, s + length).astype(int).tolist() for s in starts]


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_string("workdir", None, "A workdir written by train.py.", required=True, flag_values=fv)
    flags.DEFINE_string("capacities", "64,256,1024,4096", "Comma-separated cache rows per STEM layer to try.",
                        flag_values=fv)
    flags.DEFINE_integer("batch", 8, "Prompts decoded together.", flag_values=fv)
    flags.DEFINE_integer("prompt_len", 16, "Tokens per prompt (held-out text).", flag_values=fv)
    flags.DEFINE_integer("new_tokens", 96, "Tokens generated per prompt.", flag_values=fv)
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature.", flag_values=fv)
    flags.DEFINE_string("out", "", "Also write the markdown table to this file (default: print it only).",
                        flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    _, a = cli.parse_command(argv, "python benchmarks/decode_cache.py", __doc__.splitlines()[0], _define)
    both = prompts(a.workdir, 4 * a.batch, a.prompt_len)
    ids, warm = both[::4], [p for i, p in enumerate(both) if i % 4]
    cfg = SamplingConfig(max_new_tokens=a.new_tokens, temperature=a.temperature, top_p=0.95, seed=0)
    on_device = Sampler.from_workdir(a.workdir)
    on_device.generate_ids(ids, cfg)  # compile
    t0 = time.perf_counter()
    want = on_device.generate_ids(ids, cfg)
    t_dev = time.perf_counter() - t0
    rows = [f"# Hot-row cache while decoding ({a.batch} prompts of {a.prompt_len} held-out tokens, "
            f"{a.new_tokens} new tokens, temperature {a.temperature}, top-p 0.95; {a.workdir})", "",
            "| cache rows per STEM layer | lookups | hit rate, cold cache | hit rate after 3 other batches | same tokens as tables on device | tokens/s (warm) |",
            "|---|---|---|---|---|---|",
            f"| (tables on device) | - | - | - | - | {want.size / t_dev:,.0f} |"]
    for cap in [int(c) for c in a.capacities.split(",")]:
        s = Sampler.from_workdir(a.workdir, cache_rows=cap)
        got = s.generate_ids(ids, cfg)  # from a cold cache
        lfu = s.row_cache.lfu
        lookups, cold = lfu.lookups, lfu.hit_rate
        # A server's cache has seen earlier requests: decode other prompts first, then count these again.
        for w in range(0, len(warm), a.batch):
            s.generate_ids(warm[w:w + a.batch], cfg)
        before = (lfu.lookups, lfu.hits)
        t0 = time.perf_counter()
        s.generate_ids(ids, cfg)
        dt = time.perf_counter() - t0
        warm_rate = (lfu.hits - before[1]) / (lfu.lookups - before[0])
        rows.append(f"| {cap:,} | {lookups:,} | {cold:.1%} | {warm_rate:.1%} | {bool(np.array_equal(got, want))} | "
                    f"{got.size / dt:,.0f} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
