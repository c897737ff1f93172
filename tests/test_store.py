"""Reading a token store: pread slices equal numpy's, a store damaged between runs is refused naming the repair,
checksums catch a flipped byte, a shard changed under a reader raises StoreChangedError (never SIGBUS), open
descriptors stay bounded, and the content fingerprint follows the tokens, not the folder.

The stores here are written by hand (numpy + hashlib, the format of store.py's docstring), not by corpus.py."""
import concurrent.futures
import hashlib
import json
import os
import pickle
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
            sha = hashlib.sha256(ids.tobytes()).hexdigest()
            entry.update({split: n, f"{split}_documents": 1, f"{split}_sha256": sha})
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
            with pytest.raises(TypeError, match="a shard is read in slices"):
                shard[-1]
            np.testing.assert_array_equal(np.asarray(shard, np.int64), a.astype(np.int64))
            assert np.asarray(shard, np.dtype("int32")).dtype == np.int32 and np.asarray(shard).dtype == np.uint16
    assert c.eos_id == 0 and c.vocab_size == 300 and c.fingerprint == c.meta["content_fingerprint"]
    assert c.tokenizer_sha256 == store.tokenizer_sha256(c.tokenizer)


def _shard_file(root, k=0, split="train"):
    meta = json.loads((root / "store.json").read_text())
    return store.shard_path(root, [u for u in meta["shards"] if u[split]][k]["key"], split)


READER = textwrap.dedent("""
    import sys
    from stem_jax import store
    c = store.open_store(sys.argv[1])
    shard = c.train.open_shard(0)
    print(int(shard[0:1000].sum()), flush=True)      # the first read
    sys.stdin.readline()                              # the writer truncates the file meanwhile
    try:
        shard[9000:10000]
    except store.StoreChangedError as e:
        print(e, flush=True)
        sys.exit(3)
""")


def test_a_shard_truncated_under_a_reader_raises_not_sigbus(tmp_path):
    """A reader next to a writer: the shard is truncated between two reads of another process. Under an mmap,
    the second read (pages past the new end) would kill the reader with SIGBUS."""
    root = tmp_path / "store"
    arrays = write_store(root, [(20_000, 10)])
    p = subprocess.Popen([sys.executable, "-c", READER, str(root)], cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert int(p.stdout.readline()) == int(arrays["train"][0][:1000].sum())
    os.truncate(_shard_file(root), 4096)  # one page of 40,000 bytes left
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 3, (p.returncode, err[-2000:])  # a Python exit, not -7 (SIGBUS) or 135
    assert out.splitlines()[-1] == (f"the token store {root} changed while it was being read: {_shard_file(root)} "
                                    f"(4096 bytes, store.json records 40000 bytes): rebuilt, truncated or deleted "
                                    f"under the run")


@pytest.mark.parametrize("change", ["truncate_inside", "delete", "replace", "grow"])
def test_a_shard_changed_after_open_raises(small, change):
    root, arrays = small
    c = store.open_store(root)
    shard, path = c.train.open_shard(0), _shard_file(root)
    np.testing.assert_array_equal(shard[0:10], arrays["train"][0][:10])  # its descriptor is open now
    if change == "truncate_inside":
        os.truncate(path, 1800)  # the next read lies before the cut: the size tells
    elif change == "delete":
        path.unlink()
    elif change == "replace":  # a rebuild renames a new file over the old one; the open descriptor reads the old
        tmp = path.with_name("new.bin")
        tmp.write_bytes(arrays["train"][0][::-1].tobytes())
        os.replace(tmp, path)
    else:
        with open(path, "ab") as f:
            f.write(b"\0\0")
    now = {"truncate_inside": "1800 bytes", "delete": "gone", "replace": "2000 bytes, another file",
           "grow": "2002 bytes"}[change]
    for read in (lambda: shard[0:10], lambda: c.train.read(0, 5000), lambda: np.asarray(shard)):
        with pytest.raises(store.StoreChangedError, match=f"^the token store .*{path} \\({now}, store.json records "
                                                          f"2000 bytes\\): rebuilt, truncated or deleted"):
            read()
    if change == "replace":  # this store never reads the new file; one opened anew (after a repair) reads it
        np.testing.assert_array_equal(store.open_store(root).train.open_shard(0)[0:10], arrays["train"][0][::-1][:10])
        with pytest.raises(store.StoreChangedError, match="another file"):
            shard[0:10]


def test_a_shard_deleted_before_its_first_read_raises(small):
    root, _ = small
    c = store.open_store(root)
    _shard_file(root, 1, "val").unlink()
    with pytest.raises(store.StoreChangedError, match=r"\(gone, store.json records 74 bytes\)"):
        c.val.read(0, 200)


@pytest.mark.parametrize("damage", ["truncate", "delete", "grow"])
def test_open_refuses_a_damaged_store_naming_the_repair(small, damage):
    root, _ = small
    path, other = _shard_file(root, 1), _shard_file(root, 3, "val")  # in store.json order
    if damage == "truncate":
        os.truncate(path, 1000)
        os.truncate(other, 0)
        what = f"{path} has 1000 bytes, store.json records 1034 \\(and 1 more damaged shard\\(s\\)\\)"
    elif damage == "delete":
        path.unlink()
        what = f"{path} is missing \\(store.json records 1034 bytes\\)"
    else:
        with open(path, "ab") as f:
            f.write(b"xx")
        what = f"{path} has 1036 bytes, store.json records 1034"
    with pytest.raises(store.StoreDamagedError, match=f"^the token store {root} is damaged: {what}; repair it with "
                                                      f"`python -m stem_jax.data_prep --repair --out {root}` "
                                                      f"\\(rebuilds only the damaged units\\)$"):
        store.open_store(root)
    assert sorted(store.verify(root, **QUIET)) == sorted(map(str, [path] + ([other] if damage == "truncate" else [])))


def test_verify_catches_a_flipped_byte_of_the_same_size(small):
    root, arrays = small
    logs = []
    assert store.verify(root, log=logs.append) == []
    assert logs[-1].endswith("all shards intact") and "8 shard(s)" in logs[0]
    path = _shard_file(root, 3)  # 2000 tokens
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x01
    path.write_bytes(data)
    store.open_store(root)  # sizes only: it opens
    logs.clear()
    assert store.verify(root, log=logs.append) == [str(path)]
    assert f"damaged: {path} has the wrong sha256" in logs and logs[-1].endswith("1 damaged shard(s)")
    with pytest.raises(store.StoreDamagedError, match=f"damaged: {path} has the wrong sha256; repair it with"):
        store.open_store(root, verify=True, **QUIET)


def test_content_fingerprint_follows_the_tokens_not_the_folder(small, tmp_path):
    root, _ = small
    fp = store.open_store(root).fingerprint
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(root, copy)
    recorded = json.loads((root / "store.json").read_text())["content_fingerprint"]
    assert store.open_store(copy).fingerprint == fp == recorded
    meta = json.loads((root / "store.json").read_text())
    for u in meta["shards"]:  # other unit keys and input paths, the same tokens
        u["key"], u["input"] = hashlib.sha256(u["key"].encode()).hexdigest()[:16], "/moved/" + u["input"]
    assert store.content_fingerprint(meta) == fp
    other = tmp_path / "other"  # the same store with one token changed
    write_store(other, [(1000, 100), (0, 37), (517, 0), (3, 2), (2000, 300)])
    path = _shard_file(other, 1)
    ids = np.fromfile(path, np.uint16)
    ids[5] = (ids[5] + 1) % 300
    path.write_bytes(ids.tobytes())
    meta = json.loads((other / "store.json").read_text())
    meta["shards"][2]["train_sha256"] = hashlib.sha256(ids.tobytes()).hexdigest()
    assert store.content_fingerprint(meta) != fp
    for field, value in (("tokenizer_sha256", "0" * 16), ("dtype", "uint32"), ("eos_id", 1)):
        assert store.content_fingerprint({**json.loads((root / "store.json").read_text()), field: value}) != fp


def test_other_formats_and_missing_parts_are_refused(small, tmp_path):
    root, _ = small
    with pytest.raises(store.StoreError, match="is not a finished token store \\(no store.json\\)"):
        store.open_store(tmp_path / "nothing")
    meta = json.loads((root / "store.json").read_text())
    (root / "store.json").write_text(json.dumps({**meta, "version": "2"}))
    with pytest.raises(store.StoreError, match=f"^the token store {root} has format '2' \\(an older stem-jax built "
                                               f"it\\); this version reads format '3': build it again into a new "
                                               f"folder .* \\(nothing is deleted\\)$"):
        store.open_store(root)
    assert sorted(p.name for p in (root / "shards").iterdir()) and (root / "tokenizer.json").is_file()  # untouched
    (root / "store.json").write_text(json.dumps(meta))
    other = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "x": 1}, unk_token="x"))
    (root / "tokenizer.json").write_text(other.to_str())
    with pytest.raises(store.StoreError, match="is not the tokenizer the store was tokenized with"):
        store.open_store(root)
    (root / "tokenizer.json").unlink()
    with pytest.raises(store.StoreError, match=f"^{root}/tokenizer.json is missing: build the store again"):
        store.open_store(root)


def _open_fds(root) -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)) for fd in os.listdir("/proc/self/fd")
               if os.path.islink(f"/proc/self/fd/{fd}"))


def test_open_descriptors_stay_bounded(tmp_path):
    root = tmp_path / "many"
    arrays = write_store(root, [(5, 0)] * (store.MAX_OPEN_SHARDS + 60) + [(5, 3)])
    c = store.open_store(root)
    for k, (shard, a) in enumerate(zip(c.train.shards(), arrays["train"])):
        np.testing.assert_array_equal(shard[1:4], a[1:4])
        assert _open_fds(root) == min(k + 1, store.MAX_OPEN_SHARDS)
    np.testing.assert_array_equal(c.train.read(0, len(c.train)), np.concatenate(arrays["train"]))
    assert _open_fds(root) == store.MAX_OPEN_SHARDS


def test_a_descriptor_in_use_is_closed_only_after_its_read(tmp_path, monkeypatch):
    """Another thread's read keeps its descriptor open through an eviction (closing it early could hand its
    number to another file mid-read); it is closed when that read ends."""
    root = tmp_path / "s"
    arrays = write_store(root, [(50, 1)] * 6)
    monkeypatch.setattr(store._FDS, "cap", 2)
    c = store.open_store(root)
    first = c.train.open_shard(0)
    entry = store._FDS.acquire(first)  # a read of another thread, in progress
    for k in range(1, 6):
        c.train.open_shard(k)[0:3]
    assert entry[2] and os.fstat(entry[0]) and _open_fds(root) == 3  # evicted, still open
    store._FDS.release(entry)
    assert _open_fds(root) == 2
    for k in range(6):
        np.testing.assert_array_equal(c.train.open_shard(k)[10:20], arrays["train"][k][10:20])


def test_threads_read_right_through_evictions_and_a_split_pickles(tmp_path, monkeypatch):
    root = tmp_path / "s"
    arrays = write_store(root, [(200, 0)] * 40)
    monkeypatch.setattr(store._FDS, "cap", 3)
    split = pickle.loads(pickle.dumps(store.open_store(root).train))  # as a grain worker process receives it
    want = np.concatenate(arrays["train"])

    def reads(seed):
        rng = np.random.default_rng(seed)
        for lo in rng.integers(0, len(want) - 300, 300):
            np.testing.assert_array_equal(split.read(lo, lo + 300), want[lo:lo + 300])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(reads, range(8)))
    assert _open_fds(root) <= 3
