"""grain pipelines over a tokenized corpus: windows of seq_len + 1 tokens, batched per process and
assembled into global arrays with the batch sharding. Token ids are checked where they enter: a JAX
gather would silently clamp an out-of-range id."""
from __future__ import annotations

import json
from typing import Callable, Iterator

import grain
import jax
import numpy as np

from stem_jax import corpus as corpus_lib
from stem_jax.config import Config, ConfigError


class TokenIdError(ValueError):
    """A token id outside [0, vocab_size)."""


def check_ids(ids: np.ndarray, vocab_size: int, source: str) -> np.ndarray:
    """Return ``ids`` unchanged, or raise TokenIdError naming the first bad id, where it is, and the source."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        flat = ids.reshape(-1)
        pos = int(np.flatnonzero((flat < 0) | (flat >= vocab_size))[0])
        raise TokenIdError(f"token id {int(flat[pos])} at flat position {pos} of {source} is outside "
                           f"[0, {vocab_size}) (model.vocab_size={vocab_size})")
    return ids


def open_corpus(cfg: Config, log: Callable[[str], None] = print) -> corpus_lib.Corpus:
    """The tokenizer and tokenized splits of ``cfg.data`` (built on first use), checked against the model's
    vocabulary (the tokenizer's size before any work)."""
    tok_vocab = cfg.data.tokenizer_vocab or cfg.model.vocab_size
    if tok_vocab < corpus_lib.MIN_BPE_VOCAB:
        field = "data.tokenizer_vocab" if cfg.data.tokenizer_vocab else "model.vocab_size"
        raise ConfigError(f"{field}={tok_vocab} is too small for the byte-level BPE tokenizer, which needs "
                          f"{corpus_lib.MIN_BPE_VOCAB} tokens (256 bytes and <|endoftext|>)")
    if tok_vocab > cfg.model.vocab_size:
        raise TokenIdError(f"data.tokenizer_vocab={tok_vocab} is larger than model.vocab_size="
                           f"{cfg.model.vocab_size}: token ids >= {cfg.model.vocab_size} would be out of range")
    c = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, log=log)
    if c.vocab_size > cfg.model.vocab_size:
        raise TokenIdError(f"the tokenizer at {c.path} has {c.vocab_size} tokens but model.vocab_size="
                           f"{cfg.model.vocab_size}; ids >= {cfg.model.vocab_size} would be out of range")
    return c


def check_splits(cfg: Config, corpus: corpus_lib.Corpus) -> None:
    """Before any step: the train split holds a window and the held-out split a full batch of windows at the
    configured shape (validation runs after the last step, so a short split would fail only then)."""
    m, t = cfg.model, cfg.train
    for name, tokens, need, what in (("train", corpus.train, 1, "training needs one"),
                                     ("val", corpus.val, t.batch_size, f"validation needs a batch of {t.batch_size}")):
        windows = Windows.count(len(tokens), m.seq_len)
        if windows < need:
            raise ValueError(
                f"the {name} split of {corpus.path} has {len(tokens)} tokens, {windows} window(s) of model.seq_len"
                f" + 1 = {m.seq_len + 1} tokens; {what}: add text, or lower model.seq_len or train.batch_size"
                + (", or lower data.val_every to hold out more documents" if name == "val" else ""))


class Windows(grain.sources.RandomAccessDataSource):
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{name} has {len(tokens)} tokens, fewer than one window of "
                             f"model.seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len = tokens, seq_len
        self.n = self.count(len(tokens), seq_len)

    @staticmethod
    def count(n_tokens: int, seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens in ``n_tokens`` (consecutive windows share one token)."""
        return max(n_tokens - 1, 0) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        lo = int(i) * self.seq_len
        return np.asarray(self.tokens[lo:lo + self.seq_len + 1], dtype=np.int32)


def _local_batch(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {n} processes")
    return global_batch // n


def train_dataset(tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, vocab_size: int,
                  name: str = "train split") -> grain.IterDataset:
    """Seeded shuffle (a new order every epoch), endless. Process p takes the p-th contiguous block of
    rows of every global batch, so the global batch is the same, row for row, for any process count.
    Every batch is id-checked (a full scan up front would read the whole corpus).

    Iterate with ``iter(...)``: the iterator's state (a few integers per process) goes into checkpoints."""
    local = _local_batch(global_batch)
    lo = jax.process_index() * local
    ds = grain.MapDataset.source(Windows(tokens, seq_len, name)).shuffle(seed=seed).repeat()
    ds = ds.batch(global_batch, drop_remainder=True)  # reading B windows is trivial next to a step
    ds = ds.map(lambda b: check_ids(b[lo:lo + local], vocab_size, name))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def eval_batches(tokens: np.ndarray, seq_len: int, global_batch: int, vocab_size: int,
                 max_batches: int = 0, name: str = "val split") -> Iterator[np.ndarray]:
    """Windows in order (no shuffle); at most ``max_batches`` (0 = all) full batches, this process's block
    of rows of each (as in ``train_dataset``)."""
    ds = grain.MapDataset.source(Windows(tokens, seq_len, name))
    n_batches = len(ds) // global_batch
    if n_batches == 0:
        raise ValueError(f"{name}: {len(ds)} windows of {seq_len + 1} tokens do not fill one batch of "
                         f"{global_batch}; lower train.batch_size or model.seq_len")
    if max_batches:
        n_batches = min(n_batches, max_batches)
    local = _local_batch(global_batch)
    lo = jax.process_index() * local
    for batch in ds[: n_batches * global_batch].batch(global_batch):
        yield check_ids(batch[lo:lo + local], vocab_size, name)


def to_global(local_BxL1: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """Assemble the processes' rows into one global array with the batch sharding."""
    return jax.make_array_from_process_local_data(sharding, local_BxL1)


class Lookahead:
    """An iterator that can show its next batch early (offload prefetches that batch's rows). Its
    checkpointable state is the position *before* a peeked batch, so a resume yields that batch again."""

    def __init__(self, it):
        self._it, self._next, self._state = it, None, None

    def __iter__(self):
        return self

    def peek(self) -> np.ndarray:
        if self._next is None:
            self._state = self._it.get_state()
            self._next = next(self._it)
        return self._next

    def __next__(self) -> np.ndarray:
        batch = self.peek()
        self._next = None
        return batch

    # grain's checkpoint handler stores a non-grain iterator's state as bytes.
    def get_state(self) -> bytes:
        return json.dumps(self._state if self._next is not None else self._it.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._it.set_state(json.loads(state))
        self._next = None

    def start_prefetch(self) -> None:
        getattr(self._it, "start_prefetch", lambda: None)()
