"""Hot-row cache hit rate while decoding with host-resident STEM tables, per cache capacity.

    python benchmarks/decode_cache.py --workdir runs/tiny            # writes benchmarks/decode_cache.md

Prompts are the openings of held-out documents; every capacity decodes the same prompts with the same
sampling settings, and the tokens are checked against the sampler with the tables on device (the cache may
change where rows live, never what is computed). Throughput on a CPU says little: the cached loop makes a
host round trip per token, where the on-device loop is one ``lax.while_loop``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stem_jax import corpus as corpus_lib  # noqa: E402
from stem_jax.evaluate import load_run_config  # noqa: E402
from stem_jax.sampling import Sampler, SamplingConfig  # noqa: E402


def prompts(workdir: str, n: int, length: int) -> list[list[int]]:
    cfg = load_run_config(workdir)
    val = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, log=lambda _: None).val
    starts = np.linspace(0, len(val) - length - 1, n).astype(int)
    return [val[s:s + length].astype(int).tolist() for s in starts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--capacities", default="64,256,1024,4096")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    a = ap.parse_args()
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
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
