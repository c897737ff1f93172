"""Reading a token store: pread slices equal numpy's, a store damaged between runs is refused naming the repair,
checksums catch a flipped byte, a shard changed under a reader raises StoreChangedError (never SIGBUS), open
descriptors stay bounded, and the content fingerprint follows the tokens, not the folder.

The stores here are written by hand (numpy + hashlib, the format of store.py's docstring), not by corpus.py."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from conftest import REPO
from stem_jax import store

QUIET = dict(log=lambda *_: None)


def _tokenizer() -> Tokenizer:
    return Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 300)}}, unk_token="w1"))


def write_store(root, units, dtype="uint16", seed=0):
    """A format-3 store at ``root`` of ``units`` [(train tokens, val tokens)], random ids < 300; returns
    {"train": [arrays], "val": [arrays]} of the non-empty shards, in order."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    tok = _tokenizer()
    (root / "tokenizer.json").write_text(tok.to_str())
    shards, arrays = [], {"train": [], "val": []}
    for i, counts in enumerate(units):
        key = hashlib.sha256(f"unit {i} {seed}".encode()).hexdigest()[:16]
        entry = {"key": key, "input": f"file{i}.jsonl", "start": 0, "stop": 1, "min_hash": None, "skipped": 0}
        for split, n in zip(("train", "val"), counts):
            ids = rng.integers(0, 300, n).astype(dtype)
            (root / "shards" / f"{key}.{split}.bin").write_bytes(ids.tobytes())
            entry.update({split: n, f"{split}_documents": 1, f"{split}_sha256": hashlib.sha256(ids.tobytes()).hexdigest()})
            if n:
                arrays[split].append(ids)
        (root / "shards" / f"{key}.json").write_text(json.dumps(entry))
        shards.append(entry)
    meta = {"version": "3", "fingerprint": "f" * 16, "source": "hand", "vocab_size": 300, "eos_id": 0,
            "eos_token": "<|endoftext|>", "dtype": dtype, "val_every": 3, "skipped_records": 0, "shards": shards,
            "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest()[:16], "data": {}}
    for split in ("train", "val"):
        meta[split] = {"tokens": sum(s[split] for s in shards), "documents": len(shards)}
    meta["content_fingerprint"] = store.content_fingerprint(meta)
    (root / "store.json").write_text(json.dumps(meta, indent=1))
    (root / "plan.json").write_text(json.dumps({"fingerprint": "f" * 16}))
    return arrays


@pytest.fixture
def small(tmp_path):
    root = tmp_path / "store"
    return root, write_store(root, [(1000, 100), (0, 37), (517, 0), (3, 2), (2000, 300)])


def test_reads_equal_numpy_slices_across_shards(small):
    root, arrays = small
    c = store.open_store(root)
    for split in ("train", "val"):
        want = np.concatenate(arrays[split])
        s = getattr(c, split)
        assert s.sizes == [len(a) for a in arrays[split]] and len(s) == len(want)
        rng = np.random.default_rng(1)
        bounds = [(0, len(want)), (995, 1005), (1517, 1521), (len(want) - 5, len(want) + 50), (7, 7), (3, 1)]
        for lo, hi in bounds + [tuple(sorted(rng.integers(0, len(want) + 10, 2))) for _ in range(50)]:
            np.testing.assert_array_equal(s.read(lo, hi), want[lo:hi])
        for k, shard in enumerate(s.shards()):
            a = arrays[split][k]
            assert shard.dtype == np.uint16 and len(shard) == len(a)
            for sl in (slice(None), slice(2, 9), slice(-4, None), slice(5, 10**9), slice(-10**9, 3), slice(9, 2),
                       slice(1, 20, 3)):
                np.testing.assert_array_equal(shard[sl], a[sl])
            assert shard[-1] == a[-1]
            np.testing.assert_array_equal(np.asarray(shard, np.int64), a.astype(np.int64))
    assert c.eos_id == 0 and c.vocab_size == 300 and c.fingerprint == c.meta["content_fingerprint"]
    assert c.tokenizer_sha256 == store.tokenizer_sha256(c.tokenizer)
