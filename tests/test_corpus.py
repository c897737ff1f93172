"""Sources, the held-out split, the tokenizer and its cache."""
import json
import os

import numpy as np
import pytest

from stem_jax import corpus
from stem_jax.config import DataConfig


def test_default_corpus_documents_and_split():
    docs = corpus.default_documents()
    assert len(docs) == 66 + 42
    assert docs[0][0] == "kjv/Genesis" and docs[0][1].startswith("Genesis\n\nIn the beginning God created")
    assert "[" not in docs[0][1]
    train, val = corpus.split_documents(docs, 20)
    assert [n for n, _ in val] == [docs[i][0] for i in (19, 39, 59, 79, 99)]
    assert len(train) + len(val) == len(docs)
    assert sum(len(t) for _, t in docs) > 9_000_000


def test_split_of_a_short_corpus_holds_out_the_last_document():
    train, val = corpus.split_documents([("a", "x"), ("b", "y"), ("c", "z")], 20)
    assert [n for n, _ in val] == ["c"]
    with pytest.raises(ValueError, match="at least 2 documents"):
        corpus.split_documents([("a", "x")], 20)


def _write_text(path, n_lines=900):
    rng = np.random.default_rng(0)
    words = ["stem", "table", "row", "token", "gate", "down", "the", "of", "a", "shard"]
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(n_lines)) + "\n")
    return str(path)


def test_text_files_build_a_cached_corpus(tmp_path):
    f = _write_text(tmp_path / "mine.txt")
    cfg = DataConfig(source="text", text_files=f, cache_dir=str(tmp_path / "cache"), val_every=3)
    logs = []
    c = corpus.load_corpus(cfg, vocab_size=300, log=logs.append)
    assert logs and "building tokenizer" in logs[0]
    assert c.meta["train"]["documents"] == 4 and c.meta["val"]["documents"] == 1  # 900 lines -> 5 docs
    assert c.vocab_size <= 300 and c.train.dtype == np.uint16
    assert c.train.max() < c.vocab_size
    eos = c.tokenizer.token_to_id(corpus.EOS)
    assert eos == 0 and int((np.asarray(c.train) == eos).sum()) == 4
    text = c.tokenizer.decode(list(c.train[:30]))
    assert text.split()[0] in {"stem", "table", "row", "token", "gate", "down", "the", "of", "a", "shard"}
    logs.clear()
    again = corpus.load_corpus(cfg, vocab_size=300, log=logs.append)
    assert not logs and again.path == c.path  # opened from the cache
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".")]  # no temp folders left


def test_missing_text_file_is_named(tmp_path):
    cfg = DataConfig(source="text", text_files=str(tmp_path / "nope.txt"), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        corpus.load_corpus(cfg, vocab_size=300)


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
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
    c = corpus.load_corpus(cfg, vocab_size=300)
    assert c.meta["train"]["documents"] == 40 and c.meta["val"]["documents"] == 8
    assert "document" in c.tokenizer.decode(list(c.val[:20]))
    with pytest.raises(KeyError, match="tfds_text_key='body'"):
        corpus.load_corpus(DataConfig(source="tfds", tfds_name="tiny_text", tfds_data_dir=data_dir,
                                      tfds_text_key="body", cache_dir=str(tmp_path / "d")), vocab_size=300)
    assert json.loads((c.path / "meta.json").read_text())["source"].startswith("tfds:tiny_text")


def test_text_files_that_are_not_text_are_named():
    said = []
    corpus.check_text("plain text\n".encode() * 100, "a.txt", said.append)
    assert said == []
    corpus.check_text(b"caf\xe9 " + "fine text\n".encode() * 200, "latin1.txt", said.append)
    assert said == ["warning: data.text_files: 'latin1.txt' has 1 undecodable byte sequence(s), read as U+FFFD"]
    with pytest.raises(ValueError, match=r"'model.bin' is not a text file \(it has a NUL byte at offset 3\)"):
        corpus.check_text(b"abc\x00def", "model.bin")
    with pytest.raises(ValueError, match=r"'img.jpg' is not UTF-8 text \(20 undecodable byte sequences in 20 bytes\)"):
        corpus.check_text(b"\xff\xd8" * 10, "img.jpg")
