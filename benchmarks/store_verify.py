"""What checking a token store's checksums costs: ``store.verify`` on a store of --mb megabytes (random uint16
tokens in --shards shards, written here the way corpus.py writes them), page cache warm (just written).

    python benchmarks/store_verify.py --mb 1024 --shards 16 [--threads 1]
"""
import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stem_jax import store


def write(root: Path, mb: int, shards: int) -> None:
    (root / "shards").mkdir(parents=True)
    n = mb * (1 << 20) // 2 // shards
    units = []
    for i in range(shards):
        ids = np.random.default_rng(i).integers(0, 50_000, n, dtype=np.uint16)
        key = f"{i:016x}"
        (root / "shards" / f"{key}.train.bin").write_bytes(ids.tobytes())
        units.append({"key": key, "input": f"f{i}", "train": n, "val": 0,
                      "train_sha256": hashlib.sha256(ids.tobytes()).hexdigest(), "val_sha256": None})
    meta = {"version": store.STORE_VERSION, "dtype": "uint16", "eos_id": 0, "tokenizer_sha256": "0" * 16,
            "shards": units}
    (root / "store.json").write_text(json.dumps(meta))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=store.VERIFY_THREADS)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="store_verify_"))
    try:
        write(root, args.mb, args.shards)
        gb = args.mb * (1 << 20) / 1e9
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            assert store.verify(root, log=lambda _: None, threads=args.threads) == []
            s = time.perf_counter() - t0
            print(f"verify, {args.threads} thread(s): {gb:.3f} GB in {s:.2f} s = {gb / s:.2f} GB/s ({s / gb:.2f} s per GB)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
