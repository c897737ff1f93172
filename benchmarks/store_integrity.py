"""What the token store's integrity checks cost: checksum verification per GB, and data_prep throughput against
a baseline revision (the checksums are computed while shards are written).

    python benchmarks/store_integrity.py --baseline 0543728 --out /tmp/store_integrity.md     # 1 GB, 10M tokens
    python benchmarks/store_integrity.py --baseline HEAD --tokens 200000 --verify_mb 64       # a quick look

(a) A store of ``--verify_mb`` MB (random uint16 tokens in ``--shards`` shards, with a store.json and tokenizer
as ``corpus.py`` writes them) is opened (``open_store``: a size check per shard), verified (``store.verify``:
every shard's sha256) with the page cache warm (just written) and cold (each file evicted with
``posix_fadvise(DONTNEED)`` first), and opened with ``verify=True``. Seconds per GB are reported.
(b) A corpus of ``--tokens`` tokens (``benchmarks/data_loader.make_corpus``: 10 JSONL.gz files) is tokenized by
``python -m stem_jax.data_prep`` with 2 workers, from this tree and from ``--baseline`` (a ``git worktree`` of
that revision in a temporary folder, imported through PYTHONPATH), alternating baseline/new/new/baseline; the
tokens/s each logs ("token store done ... (R tokens/s)") are compared by their medians.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.data_loader import make_corpus  # noqa: E402
from stem_jax import corpus, sources, store  # noqa: E402

# data_loader defines --tokens (the corpus size), --workdir and --out too: this benchmark uses them
flags.FLAGS.set_default("tokens", 10_000_000)
flags.DEFINE_integer("verify_mb", 1024, "Size of the store whose checksums are verified, in MB.")
flags.DEFINE_integer("shards", 16, "Shards of that store.")
flags.DEFINE_string("baseline", "", "Git revision to compare data_prep throughput against (none: skip part b).")
flags.DEFINE_integer("rounds", 2, "Rounds of baseline/new (alternating: b n, n b, ...).")


def synth_store(root: Path, mb: int, shards: int, tok) -> float:
    """A complete store of ``mb`` MB of random tokens in ``shards`` units; returns its size in GB."""
    (root / "shards").mkdir(parents=True)
    n = mb * (1 << 20) // 2 // shards
    units = []
    for i in range(shards):
        raw = np.random.default_rng(i).integers(0, corpus.tokenizer_size(tok), n, dtype=np.uint16).tobytes()
        key = hashlib.sha256(f"unit {i}".encode()).hexdigest()[:16]
        store.shard_path(root, key, "train").write_bytes(raw)
        store.shard_path(root, key, "val").write_bytes(b"")
        units.append({"key": key, "input": f"synthetic-{i}", "start": 0, "stop": -1, "train": n, "val": 0,
                      "train_documents": 1, "val_documents": 0, "min_hash": None, "skipped": 0,
                      "train_sha256": hashlib.sha256(raw).hexdigest(), "val_sha256": hashlib.sha256(b"").hexdigest()})
    (root / "tokenizer.json").write_text(tok.to_str())
    meta = {"version": store.STORE_VERSION, "dtype": "uint16", "eos_id": 0, "eos_token": corpus.EOS,
            "vocab_size": corpus.tokenizer_size(tok), "shards": units, "tokenizer_sha256": store.tokenizer_sha256(tok),
            "train": {"tokens": n * shards, "documents": shards}, "val": {"tokens": 0, "documents": 0}}
    meta["content_fingerprint"] = store.content_fingerprint(meta)
    (root / "store.json").write_text(json.dumps(meta))
    return shards * n * 2 / 1e9


def evict(root: Path) -> None:
    """Drop the store's files from the page cache (clean pages; no root needed)."""
    for p in (root / "shards").iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def verify_cost(root: Path, mb: int, shards: int, tok) -> dict:
    gb = synth_store(root, mb, shards, tok)
    quiet = lambda *_: None  # noqa: E731
    out = {"gb": gb, "shards": shards, "open": min(timed(lambda: store.open_store(root)) for _ in range(3))}
    out["warm"] = [timed(lambda: store.verify(root, log=quiet)) for _ in range(3)]
    out["cold"] = []
    for _ in range(2):
        evict(root)
        out["cold"].append(timed(lambda: store.verify(root, log=quiet)))
    out["open_verify"] = timed(lambda: store.open_store(root, verify=True, log=quiet))
    for k in ("warm", "cold"):
        print(f"verify ({k} page cache): {[f'{s:.2f}' for s in out[k]]} s for {gb:.2f} GB", flush=True)
    return out


def worktree(rev: str, where: Path) -> Path:
    path = where / f"baseline-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True, text=True)
    return path


def prep(tree: Path, files: str, tokenizer: str, out: Path) -> dict:
    """One ``python -m stem_jax.data_prep`` of ``tree`` (its own package first on the path): the tokens/s it logs."""
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    which = subprocess.run([sys.executable, "-c", "import stem_jax; print(stem_jax.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert which.startswith(str(tree)), f"{tree}: imported {which}"
    cmd = [sys.executable, "-m", "stem_jax.data_prep", "--config.data.source=jsonl", f"--config.data.files={files}",
           f"--config.data.tokenizer={tokenizer}", "--config.model.vocab_size=8192", f"--out={out}", "--workers=2"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{tree}: {r.stderr[-3000:]}")
    line = next(x for x in (r.stdout + r.stderr).splitlines() if x.startswith("token store done"))
    rate = float(re.search(r"\(([\d,]+) tokens/s\)", line).group(1).replace(",", ""))
    tokens = int(re.search(r"documents, ([\d,]+) tokens", line).group(1).replace(",", ""))
    return {"tokens_per_s": rate, "tokens": tokens, "seconds": seconds}


def throughput(root: Path, rev: str, tokens: int, rounds: int) -> dict:
    texts = sources.default_documents()[:40]
    tok = corpus.train_tokenizer(texts, 8192)
    tok_path = root / "tokenizer.json"
    tok_path.write_text(tok.to_str())
    (root / "corpus").mkdir()
    made = make_corpus(root / "corpus", tokens, tok)
    for p in (root / "corpus").glob("*.parquet"):
        p.unlink()
    files = str(root / "corpus" / "*.jsonl.gz")
    base = worktree(rev, root)
    runs: dict[str, list[dict]] = {"baseline": [], "new": []}
    try:
        for r in range(rounds):
            for name in (("baseline", "new") if r % 2 == 0 else ("new", "baseline")):
                tree = base if name == "baseline" else REPO
                runs[name].append(prep(tree, files, str(tok_path), root / f"store-{name}-{r}"))
                print(f"round {r}, {name}: {runs[name][-1]}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)
    return {"rev": rev, "made": made, "runs": runs}


def report(v: dict, t: dict | None) -> str:
    warm, cold = statistics.median(v["warm"]), statistics.median(v["cold"])
    lines = ["# Token store integrity: cost", "",
             f"Generated by `python benchmarks/store_integrity.py` on {os.cpu_count()} cores.", "",
             f"## Checksums (`store.verify`, {v['gb']:.2f} GB in {v['shards']} shards)", "",
             "| check | seconds | s per GB |", "|---|---|---|",
             f"| `open_store` (sizes only) | {v['open']:.4f} | {v['open'] / v['gb']:.4f} |",
             f"| `verify`, page cache warm (median of {len(v['warm'])}) | {warm:.2f} | {warm / v['gb']:.2f} |",
             f"| `verify`, page cache cold (median of {len(v['cold'])}) | {cold:.2f} | {cold / v['gb']:.2f} |",
             f"| `open_store(verify=True)`, warm | {v['open_verify']:.2f} | {v['open_verify'] / v['gb']:.2f} |", ""]
    if t:
        med = {k: statistics.median(r["tokens_per_s"] for r in rs) for k, rs in t["runs"].items()}
        lines += [f"## data_prep throughput against `{t['rev']}`", "",
                  f"{t['runs']['new'][0]['tokens']:,} tokens ({t['made']['documents']:,} documents, 10 JSONL.gz "
                  f"files), 2 workers, rounds alternating baseline/new, new/baseline. tokens/s as data_prep logs it.", "",
                  "| tree | tokens/s per run | median |", "|---|---|---|"]
        for k in ("baseline", "new"):
            rates = ", ".join(format(r["tokens_per_s"], ",.0f") for r in t["runs"][k])
            lines.append(f"| {k} | {rates} | {med[k]:,.0f} |")
        lines += ["", f"new / baseline: **{med['new'] / med['baseline']:.3f}**", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    root = Path(f.workdir or tempfile.mkdtemp(prefix="stem_store_integrity_"))
    try:
        tok = corpus.train_tokenizer(sources.default_documents()[:10], 1024)
        v = verify_cost(root / "verify", f.verify_mb, f.shards, tok)
        shutil.rmtree(root / "verify")
        t = throughput(root, f.baseline, f.tokens, f.rounds) if f.baseline else None
        rep = report(v, t)
        print(rep)
        if f.out:
            Path(f.out).write_text(rep)
    finally:
        if not f.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
