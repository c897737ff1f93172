"""Data at pretraining scale: tokenization throughput, peak memory of the prep, and loader throughput.

    python benchmarks/data_loader.py --out docs/data_loader.md              # 50M tokens, about 15 minutes on 2 cores
    python benchmarks/data_loader.py --tokens 5000000 --out /tmp/small.md   # a quick look

The corpus is generated from the embedded one: its books cut into documents of about 4,000 characters, drawn
in a seeded random order (with repeats) until it holds ``--tokens`` tokens, written as 10 JSONL.gz files and
10 Parquet files (row groups of 1,024 documents). The tokenizer is the default run's (byte-level BPE, 8,192).

Measured (every build is a ``python -m stem_jax.data_prep`` process; memory is the peak of the summed resident
memory of that process and its workers, sampled every 0.1 s):
- tokenization of the whole JSONL.gz corpus with 1 and 2 workers, alternating (1, 2, 2, 1);
- the machine's ceiling: two independent one-worker builds of the two halves, at the same time;
- peak memory of a 2-worker build of the first 2 files (a fifth) against the whole; the whole as Parquet;
- the loader: ``data.train_dataset`` (shuffled windows of 4,097 tokens, the 350M preset's) in 1 process, and
  in 2 processes reading their halves of each global batch at once; windows/s of random reads from the
  ``.bin`` shards against the same windows as array_record records (why the store is ``.bin``).
The loader's need is the 350M STEM preset's tokens/s on one v5p host (4 chips) at an *assumed* 50 % MFU:
``4 x 0.5 x 459e12 / accounting.flops_per_token``.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags

from configs import stem_350m
from stem_jax import accounting, corpus, sources
from stem_jax.config import DataConfig

REPO = Path(__file__).resolve().parent.parent
FILES = 10
V5P_PEAK, MFU, CHIPS_PER_HOST = 459e12, 0.5, 4
SEQ = 4096

flags.DEFINE_integer("tokens", 50_000_000, "Tokens in the generated corpus (about).")
flags.DEFINE_string("workdir", "", "Where the corpus and stores go (default: a temporary folder).")
flags.DEFINE_string("out", "", "Markdown report to write (nothing is written without it).")
flags.DEFINE_integer("loader_batches", 300, "Batches timed per loader measurement.")


def make_corpus(root: Path, tokens: int, tok) -> dict:
    """10 JSONL.gz and 10 Parquet files of documents drawn from the embedded corpus; returns counts."""
    pieces = []
    for book in sources.default_documents():
        paras, cur = book.split("\n\n"), ""
        for p in paras:
            cur += p + "\n\n"
            if len(cur) >= 4000:
                pieces.append(cur)
                cur = ""
        if cur.strip():
            pieces.append(cur)
    sample = pieces[::50]
    chars_per_token = sum(map(len, sample)) / sum(len(e.ids) for e in tok.encode_batch(sample))
    rng = np.random.default_rng(0)
    target_chars = tokens * chars_per_token
    docs, chars = [], 0
    while chars < target_chars:
        for i in rng.permutation(len(pieces)):
            docs.append(pieces[i])
            chars += len(pieces[i])
            if chars >= target_chars:
                break
    per = -(-len(docs) // FILES)
    for k in range(FILES):
        part = docs[k * per:(k + 1) * per]
        with gzip.open(root / f"part-{k:02d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=6) as f:
            f.writelines(json.dumps({"id": k * per + i, "text": d}) + "\n" for i, d in enumerate(part))
        pq.write_table(pa.table({"text": part}), root / f"part-{k:02d}.parquet", row_group_size=1024)
    return {"documents": len(docs), "chars": chars, "chars_per_token": chars_per_token, "pieces": len(pieces)}


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(next(line for line in Path(f"/proc/{p}/status").read_text().splitlines()
                              if line.startswith("VmRSS")).split()[1]) * 1024
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            pass
    return total


def prep(files: str, source: str, tokenizer: str, out: Path, workers: int) -> dict:
    """One data_prep process: wall seconds, peak tree memory, tokens, and the tokens/s it logged."""
    cmd = [sys.executable, "-m", "stem_jax.data_prep", f"--config.data.source={source}",
           f"--config.data.files={files}", f"--config.data.tokenizer={tokenizer}", "--config.model.vocab_size=8192",
           f"--out={out}", f"--workers={workers}"]
    t0, peak = time.perf_counter(), 0
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while p.poll() is None:
        peak = max(peak, _tree_rss(p.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    text = p.stdout.read()
    if p.returncode:
        raise RuntimeError(text[-3000:])
    meta = json.loads((out / "store.json").read_text())
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    logged = next(line for line in text.splitlines() if line.startswith("token store done"))
    rate = float(logged.split("(")[-1].split(" tokens/s")[0].replace(",", ""))
    return {"seconds": seconds, "peak_rss": peak, "tokens": tokens, "tokens_per_s": rate, "workers": workers,
            "documents": meta["train"]["documents"] + meta["val"]["documents"]}


_LOADER = """
import json, sys, time
import numpy as np
from stem_jax import corpus, data
store, procs, index, batches, seq, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:7])
# The loader asks jax which process it is; a pod host would know from jax.distributed.
data.jax.process_count, data.jax.process_index = (lambda: procs), (lambda: index)
c = corpus.open_store(store)
it = iter(data.train_dataset(c.train, seq, batch, seed=0, vocab_size=c.vocab_size))
for _ in range(20):
    next(it)
t0 = time.perf_counter()
rows = sum(next(it).shape[0] for _ in range(batches))
print(json.dumps({"tokens_per_s": rows * (seq + 1) / (time.perf_counter() - t0)}))
"""


def loader(store: Path, procs: int, batches: int, global_batch: int) -> list[float]:
    """tokens/s of each of ``procs`` concurrent loader processes."""
    ps = [subprocess.Popen([sys.executable, "-c", _LOADER, str(store), str(procs), str(i), str(batches), str(SEQ),
                            str(global_batch)], cwd=REPO, stdout=subprocess.PIPE, text=True) for i in range(procs)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1])["tokens_per_s"] for p in ps]


def record_formats(store: Path, reads: int = 4000) -> dict:
    """Random windows/s: memmap slices of the .bin shards against array_record records of the same windows."""
    from array_record.python.array_record_module import ArrayRecordWriter
    import grain
    from stem_jax import data
    c = corpus.open_store(store)
    windows = data.Windows(c.train, SEQ, "train")
    n = min(len(windows), 6000)
    path = store.parent / "windows.array_record"
    w = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(n):
        w.write(windows[i].astype(np.uint16).tobytes())
    w.close()
    src = grain.sources.ArrayRecordDataSource([str(path)])
    order = np.random.default_rng(0).integers(0, n, reads)
    out = {}
    for name, read in (("bin", lambda i: windows[i]), ("array_record", lambda i: np.frombuffer(src[i], np.uint16))):
        best = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in order:
                read(int(i))
            best.append(reads / (time.perf_counter() - t0))
        out[name] = statistics.median(best)
    path.unlink()
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    root = Path(f.workdir or tempfile.mkdtemp(prefix="stem_data_bench_"))
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    default = corpus.load_corpus(DataConfig(), 8192, log=lambda *_: None)
    tok_path = root / "tokenizer.json"
    default.tokenizer.save(str(tok_path))
    t0 = time.perf_counter()
    made = make_corpus(root / "corpus", f.tokens, default.tokenizer)
    print(f"corpus: {made} in {time.perf_counter() - t0:.0f} s", flush=True)
    fifth = ",".join(str(root / "corpus" / f"part-{k:02d}.jsonl.gz") for k in range(2))
    every = {"jsonl": str(root / "corpus" / "*.jsonl.gz"), "parquet": str(root / "corpus" / "*.parquet")}

    # Scaling on the whole corpus: 10 units keep both workers busy to the end, and alternating rounds
    # (1, 2, 2, 1) cancel this shared machine's drift.
    scaling = {1: [], 2: []}
    for r in range(2):
        for w in ((1, 2) if r % 2 == 0 else (2, 1)):
            scaling[w].append(prep(every["jsonl"], "jsonl", str(tok_path), root / f"all-jsonl-w{w}-r{r}", w))
            print(f"all, jsonl, {w} worker(s): {scaling[w][-1]}", flush=True)
    # The machine's own ceiling: two independent one-worker builds of the two halves at once.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda h: prep(",".join(str(root / "corpus" / f"part-{k:02d}.jsonl.gz")
                                                       for k in range(5 * h, 5 * h + 5)),
                                              "jsonl", str(tok_path), root / f"half-{h}", 1), (0, 1)))
    print(f"halves at once, 1 worker each: {halves}", flush=True)
    small = prep(fifth, "jsonl", str(tok_path), root / "fifth-jsonl", 2)
    print(f"fifth, jsonl, 2 workers: {small}", flush=True)
    parquet = prep(every["parquet"], "parquet", str(tok_path), root / "all-parquet", 2)
    print(f"all, parquet, 2 workers: {parquet}", flush=True)

    cfg = stem_350m.get_config()
    need_host = CHIPS_PER_HOST * MFU * V5P_PEAK / accounting.flops_per_token(cfg.model)
    store = root / "all-jsonl-w2-r0"
    one = loader(store, 1, f.loader_batches, 32)
    two = loader(store, 2, f.loader_batches, 64)
    print(f"loader: 1 process {one}, 2 processes {two}", flush=True)
    formats = record_formats(store)
    print(f"formats: {formats}", flush=True)
    rep = report(made, scaling, halves, small, parquet, need_host, one, two, formats, cfg)
    print(rep)
    if f.out:
        Path(f.out).write_text(rep)


def report(made, scaling, halves, small, parquet, need_host, one, two, formats, cfg) -> str:
    w1 = statistics.median(r["tokens_per_s"] for r in scaling[1])
    w2 = statistics.median(r["tokens_per_s"] for r in scaling[2])
    pairs = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(scaling[1], scaling[2])]
    big = max(r["peak_rss"] for r in scaling[2])
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    lines = [
        "# Data pipeline benchmark", "",
        f"Generated by `python benchmarks/data_loader.py --out docs/data_loader.md` on {os.cpu_count()} cores "
        f"(one run). Corpus: {made['documents']:,} documents drawn from {made['pieces']:,} pieces of the embedded "
        f"corpus, {made['chars'] / 1e6:.0f} M characters, {scaling[1][0]['tokens'] / 1e6:.1f} M tokens "
        f"({made['chars_per_token']:.2f} characters per token), 10 JSONL.gz + 10 Parquet files.", "",
        "## Tokenization (`python -m stem_jax.data_prep`)", "",
        "Rows in the order they ran. *tokens/s* is what data_prep logs: tokens over the time from starting the "
        "workers to the last unit's shard written.", "",
        "| input | workers | tokens | seconds (process) | tokens/s | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    runs = [("all 10 JSONL.gz files", r) for pair in zip(scaling[1], scaling[2]) for r in pair]
    runs[2:4] = runs[3:1:-1]  # the second round ran 2 workers first
    runs += [("2 JSONL.gz files (a fifth)", small), ("all 10 Parquet files", parquet)]
    for name, r in runs:
        lines.append(f"| {name} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{mib(r['peak_rss'])} |")
    lines += [
        "", f"- 2 workers / 1 worker: **{w2 / w1:.2f}x** (medians; per round: "
        f"{', '.join(f'{p:.2f}' for p in pairs)}). One worker: {w1:,.0f} tokens/s.",
        f"- The machine's ceiling: two independent one-worker builds of the halves of the corpus at the same time "
        f"made {sum(h['tokens_per_s'] for h in halves):,.0f} tokens/s together "
        f"({' + '.join(format(h['tokens_per_s'], ',.0f') for h in halves)}), "
        f"**{sum(h['tokens_per_s'] for h in halves) / w1:.2f}x** one worker alone.",
        f"- Peak memory of the 2-worker build, all of the corpus / a fifth of it: **{big / small['peak_rss']:.2f}** "
        f"({mib(big)} / {mib(small['peak_rss'])}).", "",
        "## Loader (`data.train_dataset`, shuffled windows of 4,097 tokens)", "",
        f"Need: the `stem_350m` preset at {accounting.flops_per_token(cfg.model) / 1e9:.2f} GFLOP per token "
        f"(training, `accounting.flops_per_token`) on one v5p host of {CHIPS_PER_HOST} chips at an **assumed** "
        f"{MFU:.0%} MFU of {V5P_PEAK / 1e12:.0f} TFLOP/s each: **{need_host:,.0f} tokens/s per host**.", "",
        "| processes | tokens/s per process | total | per process / need |", "|---|---|---|---|",
        f"| 1 (batch 32) | {one[0]:,.0f} | {one[0]:,.0f} | {one[0] / need_host:,.0f}x |",
        f"| 2 (batch 64, 32 rows each) | {', '.join(f'{t:,.0f}' for t in two)} | {sum(two):,.0f} | "
        f"{min(two) / need_host:,.0f}x |", "",
        "## Store format: random window reads", "",
        f"`.bin` memmap slices: {formats['bin']:,.0f} windows/s; the same windows as array_record records "
        f"(`group_size:1`, read through grain's `ArrayRecordDataSource`): {formats['array_record']:,.0f} windows/s.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    app.run(main)
