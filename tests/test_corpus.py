"""The token store: built in parallel, resumable, the same split for any cut of the source, the user's tokenizer."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from conftest import REPO, run_script
from stem_jax import checkpoint, corpus, prep_pool, sources, store
from stem_jax.config import DataConfig

QUIET = dict(log=lambda *_: None)


def _write_jsonl(path, n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["stem", "table", "row", "token", "gate", "down", "the", "of", "a", "shard", "layer", "vocab"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(5, 60)))}) + "\n"
                            for _ in range(n)))
    return str(path)


def _write_text(path, n_lines=900):
    rng = np.random.default_rng(0)
    words = ["stem", "table", "row", "token", "gate", "down", "the", "of", "a", "shard"]
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(n_lines)) + "\n")
    return str(path)


def _tokens(split: corpus.Split) -> np.ndarray:
    return split.read(0, len(split))


def test_text_files_build_a_store_in_the_cache(tmp_path):
    f = _write_text(tmp_path / "mine.txt", 2000)
    cfg = DataConfig(source="text", files=f, cache_dir=str(tmp_path / "cache"), val_every=3)
    logs = []
    c = corpus.load_corpus(cfg, vocab_size=300, log=logs.append)
    assert "training the tokenizer" in logs[0] and logs[-1].startswith("token store done: 10 documents")
    docs = sources.documents(sources.plan(cfg)[1][0], sources.Spec("text"))
    val_docs = [d for d in docs if sources.held_out(d, 3)]
    assert c.meta["val"]["documents"] == len(val_docs) > 0 and c.meta["train"]["documents"] == 10 - len(val_docs)
    eos = c.tokenizer.token_to_id(corpus.EOS)
    assert c.eos_id == eos == 0 and c.vocab_size <= 300
    want = np.concatenate([c.tokenizer.encode(d).ids + [eos] for d in val_docs])  # every held-out document, in order
    np.testing.assert_array_equal(_tokens(c.val), want)
    assert c.train.open_shard(0).dtype == np.uint16 and int((_tokens(c.train) == eos).sum()) == 10 - len(val_docs)
    logs.clear()
    again = corpus.load_corpus(cfg, vocab_size=300, log=logs.append)
    assert not logs and again.path == c.path  # opened from the cache
    assert sorted(p.name for p in c.path.iterdir()) == [".build.lock", "plan.json", "shards", "store.json",
                                                        "tokenizer.json"]
    assert (c.path / ".build.lock").read_text() == ""  # no holder left behind
    assert not [p for p in (c.path / "shards").iterdir() if p.name.startswith(".")]  # no temporary files left
    # what store.json records, against the files and the tokenizer computed here
    for u in c.meta["shards"]:
        for split in ("train", "val"):
            raw = store.shard_path(c.path, u["key"], split).read_bytes()
            assert u[f"{split}_sha256"] == hashlib.sha256(raw).hexdigest() and len(raw) == 2 * u[split]
    assert c.meta["tokenizer_sha256"] == checkpoint.fingerprint(c.tokenizer.to_str())
    assert c.meta["data"]["files"] == os.path.abspath(f) and c.meta["content_fingerprint"] == c.fingerprint


def test_the_split_does_not_depend_on_units_or_workers(tmp_path, monkeypatch):
    f = _write_jsonl(tmp_path / "a.jsonl", 400)
    cfg = DataConfig(source="jsonl", files=f, val_every=5)
    whole = corpus.open_store(corpus.build_store(cfg, 300, tmp_path / "one", workers=1, **QUIET))
    monkeypatch.setattr(sources, "UNIT_BYTES", 2000)
    cut = corpus.open_store(corpus.build_store(cfg, 300, tmp_path / "many", workers=2, **QUIET))
    assert len(whole.meta["shards"]) == 1 and len(cut.meta["shards"]) > 8
    for split in ("train", "val"):
        np.testing.assert_array_equal(_tokens(getattr(cut, split)), _tokens(getattr(whole, split)))
    assert whole.meta["val"]["documents"] == sum(sources.held_out(json.loads(x)["text"], 5)
                                                 for x in (tmp_path / "a.jsonl").read_text().splitlines())


def test_a_corpus_of_few_documents_holds_out_the_smallest_hash(tmp_path):
    docs = [f"the stem table row {i} " * 20 for i in range(3)]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(source="jsonl", files=str(tmp_path / "few.jsonl"), val_every=1000)
    assert not any(sources.held_out(d, 1000) for d in docs)
    logs = []
    c = corpus.open_store(corpus.build_store(cfg, 300, tmp_path / "s", workers=1, log=logs.append))
    assert any("holding out the one with the smallest hash" in m for m in logs)
    held = min(docs, key=sources.doc_hash)
    assert c.tokenizer.decode(_tokens(c.val)[:-1].tolist()) == held and c.meta["train"]["documents"] == 2


_KILLABLE_BUILD = """
import sys
from stem_jax import checkpoint, corpus, sources, store
from stem_jax.config import DataConfig
sources.UNIT_BYTES = 3000
corpus.build_store(DataConfig(source="jsonl", files=sys.argv[1], val_every=5), 300, sys.argv[2], workers=1)
"""


def test_an_interrupted_build_resumes_and_never_reads_a_partial_store(tmp_path, monkeypatch):
    f = _write_jsonl(tmp_path / "a.jsonl", 3000)
    out = tmp_path / "store"
    p = subprocess.Popen([sys.executable, "-c", _KILLABLE_BUILD, f, str(out)], cwd=REPO, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list((out / "shards").glob("*.json"))) < 3 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the builder and its worker, as a Ctrl-C'd terminal or a lost VM would
    p.wait()
    done = len(list((out / "shards").glob("*.json")))
    assert done >= 3 and not (out / "store.json").exists(), p.stderr.read().decode()[-2000:]
    with pytest.raises(corpus.StoreError, match="is not a finished token store"):
        corpus.open_store(out)
    dead = p.pid  # a pid that has exited: on another host that proves nothing, its files stay
    others = {out / "shards" / f".00000.train.bin.other-host.{dead}.tmp",  # another host's live writer
              out / "shards" / f".00009.val.bin.{prep_pool.host()}.{os.getpid()}.tmp"}  # a live writer here
    for o in others:
        o.write_bytes(b"live")
    logs = []
    monkeypatch.setattr(sources, "UNIT_BYTES", 3000)
    cfg = DataConfig(source="jsonl", files=f, val_every=5)
    resumed = corpus.open_store(corpus.build_store(cfg, 300, out, workers=2, log=logs.append))
    n_units = len(resumed.meta["shards"])
    assert f"resuming the token store at {out}: {done} of {n_units} units already done" in logs
    # the killed build's temporary files are removed; those of live writers and of other hosts are kept
    assert {p for p in (out / "shards").iterdir() if p.name.startswith(".")} == others
    clean = corpus.open_store(corpus.build_store(cfg, 300, tmp_path / "clean", workers=2, **QUIET))
    for split in ("train", "val"):
        np.testing.assert_array_equal(_tokens(getattr(resumed, split)), _tokens(getattr(clean, split)))
    with pytest.raises(corpus.StoreError, match="holds \\(part of\\) a store of another source"):
        corpus.build_store(DataConfig(source="jsonl", files=f, val_every=7), 300, out, **QUIET)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(corpus.StoreError, match="is not empty and is not a token store"):
        corpus.build_store(cfg, 300, tmp_path / "mine", **QUIET)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


_SHARED_BUILD = """
import hashlib, sys
from stem_jax import corpus
from stem_jax.config import DataConfig
cfg = DataConfig(source="jsonl", files=sys.argv[1], val_every=5, cache_dir=sys.argv[2], workers=1)
print("ready", flush=True)
sys.stdin.readline()  # the go: all processes ask for the store at once
c = corpus.load_corpus(cfg, 300)
h = hashlib.sha256(c.tokenizer.to_str().encode())
for split in (c.train, c.val):
    h.update(split.read(0, len(split)).tobytes())
print("opened", c.path, h.hexdigest(), flush=True)
"""


def test_processes_sharing_a_cache_build_the_store_once_and_open_the_same_one(tmp_path):
    """Four processes of a run (what open_corpus does in each: jax.distributed plays no part in it) ask for the
    store in one cache folder at the same moment: one builds, the others wait for it and open it."""
    f = _write_jsonl(tmp_path / "a.jsonl", 600)
    procs = [subprocess.Popen([sys.executable, "-c", _SHARED_BUILD, f, str(tmp_path / "cache")], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.stderr.read()[-2000:]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    logs = "".join(out for out, _ in outs)
    assert logs.count("tokenizing 1 unit(s)") == 1, logs  # one build ...
    opened = [out.splitlines()[-1].split()[1:] for out, _ in outs]  # [path, hash of tokenizer and tokens]
    ref = corpus.open_store(corpus.build_store(DataConfig(source="jsonl", files=f, val_every=5), 300,
                                               tmp_path / "alone", workers=1, **QUIET))
    h = hashlib.sha256(ref.tokenizer.to_str().encode())
    for split in (ref.train, ref.val):
        h.update(_tokens(split).tobytes())
    assert all(o == opened[0] for o in opened) and opened[0][1] == h.hexdigest()  # ... the same store for all
    assert not [p for p in Path(opened[0][0]).rglob(".*.tmp")]


def test_a_folder_being_built_never_looks_foreign_to_a_process_that_arrives(tmp_path, monkeypatch):
    """What a process arriving at the folder checks before it takes the lock must pass at every file the builder
    writes (the race the test above hits by chance): plan.json comes first, and temporary files do not count."""
    f = _write_jsonl(tmp_path / "a.jsonl", 200)
    cfg, out = DataConfig(source="jsonl", files=f, val_every=5), tmp_path / "store"
    fp = corpus.folder_identity(cfg, 300, sources.plan(cfg, lambda *_: None)[1])
    seen, replace = [], os.replace

    def checked_replace(src, dst):
        if Path(dst).parent == out:
            seen.append(Path(dst).name)
            corpus._check_folder(out, fp, start_over=False)  # the temporary file exists, the target may not
        replace(src, dst)
    monkeypatch.setattr(corpus.os, "replace", checked_replace)
    corpus.build_store(cfg, 300, out, workers=1, **QUIET)
    assert seen == ["plan.json", "tokenizer.json", "store.json"]


def _user_tokenizer(path, texts, vocab=320, eos="</s>"):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", eos],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.save(str(path))
    return tok


def test_a_users_tokenizer_file_and_its_errors(tmp_path):
    f = _write_jsonl(tmp_path / "a.jsonl", 200)
    texts = [json.loads(x)["text"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    tok = _user_tokenizer(tmp_path / "tokenizer.json", texts)
    cfg = DataConfig(source="jsonl", files=f, tokenizer=str(tmp_path / "tokenizer.json"), val_every=4)
    c = corpus.open_store(corpus.build_store(cfg, 512, tmp_path / "s", **QUIET))
    eos = tok.token_to_id("</s>")
    assert c.eos_id == eos == 1 and c.tokenizer.to_str() == tok.to_str()
    train_texts = [t for t in texts if not sources.held_out(t, 4)]
    np.testing.assert_array_equal(_tokens(c.train), np.concatenate([tok.encode(t).ids + [eos] for t in train_texts]))
    n = corpus.tokenizer_size(tok)
    with pytest.raises(corpus.StoreError, match=rf"has {n} tokens but model.vocab_size={n - 1}; .*raise model.vocab_size"):
        corpus.check_vocab(cfg, n - 1)
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    with pytest.raises(corpus.StoreError, match=r"data.tokenizer='.*broken.json' is not a tokenizer.json the "
                                                r"tokenizers library can read: "):
        corpus.check_vocab(DataConfig(tokenizer=str(tmp_path / "broken.json")), 512)
    _user_tokenizer(tmp_path / "no_eos.json", texts, eos="<pad>")
    with pytest.raises(corpus.StoreError, match=r"has no end-of-document token <\|endoftext\|> or <\|end_of_text\|>"
                                                r" or </s> or <eos>.*set data.eos_token"):
        corpus.check_vocab(DataConfig(tokenizer=str(tmp_path / "no_eos.json")), 512)
    corpus.check_vocab(DataConfig(tokenizer=str(tmp_path / "no_eos.json"), eos_token="<pad>"), 512)
    with pytest.raises(corpus.StoreError, match="data.tokenizer_vocab applies to data.tokenizer=train only"):
        corpus.fingerprint(DataConfig(tokenizer=str(tmp_path / "tokenizer.json"), tokenizer_vocab=300), 512, "x")
    with pytest.raises(corpus.StoreError, match="too small for the byte-level BPE tokenizer"):
        corpus.check_vocab(DataConfig(), 100)


def test_data_prep_then_train_from_the_store_with_a_users_tokenizer(tmp_path, cache_dir):
    """The issue's end-to-end path: a tokenizer.json of the user's, a JSONL corpus, data_prep, train.py."""
    f = _write_jsonl(tmp_path / "c.jsonl", 3000)
    texts = [json.loads(x)["text"] for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    _user_tokenizer(tmp_path / "tok.json", texts, vocab=400)
    data = ["--config.data.source=jsonl", f"--config.data.files={f}", f"--config.data.tokenizer={tmp_path / 'tok.json'}",
            "--config.model.vocab_size=512"]
    r = run_script("stem_jax/data_prep.py", *data, f"--out={tmp_path / 'store'}", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"train with: --config.data.store={tmp_path / 'store'}" in r.stdout
    assert "token store done" in r.stdout + r.stderr
    small = ["--config.model.n_layers=2", "--config.model.stem_layers=1", "--config.model.seq_len=64"]
    r = run_script("train.py", "--config.model.vocab_size=512", *small, f"--config.data.store={tmp_path / 'store'}",
                   f"--workdir={tmp_path / 'w'}", "--config.train.steps=2", "--config.train.eval_batches=1",
                   "--config.data.packing=true",
                   "--config.train.warmup_steps=1", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val_loss" in r.stdout + r.stderr
    assert "data.packing: attention stays within documents, which end at token 1 ('</s>')" in r.stdout + r.stderr
    assert Tokenizer.from_file(str(tmp_path / "w" / "tokenizer.json")).token_to_id("</s>") == 1
    r = run_script("stem_jax/data_prep.py", *data[:3], "--config.model.vocab_size=260", f"--out={tmp_path / 'x'}",
                   cache_dir=cache_dir)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: StoreError: the tokenizer")
    assert not (tmp_path / "x").exists()


def test_tfds_source_keeps_its_validation_split(tmp_path):
    import tensorflow_datasets as tfds

    class TinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 40), "validation": self._generate_examples(40, 48)}

        def _generate_examples(self, lo, hi):
            for i in range(lo, hi):
                yield i, {"text": f"document {i} says the stem table row {i % 7} gates the down projection."}

    data_dir = str(tmp_path / "tfds")
    TinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
    cfg = DataConfig(source="tfds", tfds_name="tiny_text", tfds_data_dir=data_dir, cache_dir=str(tmp_path / "c"))
    c = corpus.load_corpus(cfg, vocab_size=300, **QUIET)
    assert c.meta["train"]["documents"] == 40 and c.meta["val"]["documents"] == 8
    held = c.tokenizer.decode(_tokens(c.val).tolist())  # TFDS shuffles records within a split
    assert sorted(int(n) for n in re.findall(r"document (\d+) says", held)) == list(range(40, 48)), held
    assert c.meta["source"].startswith("tfds:tiny_text")
    with pytest.raises(KeyError, match="data.text_key='body'"):
        corpus.load_corpus(DataConfig(source="tfds", tfds_name="tiny_text", tfds_data_dir=data_dir,
                                      text_key="body", cache_dir=str(tmp_path / "d")), vocab_size=300, **QUIET)


def test_a_build_that_failed_before_any_unit_starts_over_when_the_source_is_fixed(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one two"}\n{"body": "three"}\n')
    cfg = DataConfig(source="jsonl", files=str(path), val_every=2)
    with pytest.raises(sources.BadRecordError, match="a.jsonl:2: the record has no field 'text'"):
        corpus.build_store(cfg, 300, tmp_path / "s", **QUIET)
    assert not (tmp_path / "s" / "store.json").exists()
    path.write_text('{"text": "one two"}\n{"text": "three four"}\n')  # a new fingerprint (size, mtime)
    c = corpus.open_store(corpus.build_store(cfg, 300, tmp_path / "s", **QUIET))
    assert c.meta["train"]["documents"] + c.meta["val"]["documents"] == 2
