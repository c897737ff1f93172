"""grain pipelines over a tokenized corpus: windows of seq_len + 1 tokens, batched per process and
assembled into global arrays with the batch sharding. Token ids are checked where they enter: a JAX
gather would silently clamp an out-of-range id."""
from __future__ import annotations

import json
from typing import Callable, Iterator, Union

import grain
import jax
import numpy as np

from stem_jax import corpus as corpus_lib
from stem_jax.config import Config


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
    """The token store of ``cfg.data`` (built on first use), checked against the model's vocabulary (the
    tokenizer's size before any work, the store's after)."""
    c = corpus_lib.load_corpus(cfg.data, cfg.model.vocab_size, log=log)
    if cfg.data.store:
        check_store_tokenizer(cfg.data, c)
    if c.vocab_size > cfg.model.vocab_size:
        raise TokenIdError(f"the tokenizer at {c.path} has {c.vocab_size} tokens but model.vocab_size="
                           f"{cfg.model.vocab_size}; ids >= {cfg.model.vocab_size} would be out of range")
    return c


def check_store_tokenizer(data_cfg, c: corpus_lib.Corpus) -> None:
    """A store brings its own tokenizer and end-of-document token: ``data.tokenizer`` / ``data.eos_token``
    may name them ("train" / "" leave them to the store) but not others, which the run would record while
    training on the store's."""
    if data_cfg.tokenizer != "train":
        mine = corpus_lib.read_tokenizer(data_cfg.tokenizer)
        if mine.to_str() != c.tokenizer.to_str():
            raise corpus_lib.StoreError(
                f"data.tokenizer={data_cfg.tokenizer!r} is not the tokenizer of the store {str(c.path)!r} "
                f"(data.store), whose tokens were made with {c.path / 'tokenizer.json'}: leave data.tokenizer "
                f"at 'train' with a store, or name that file")
    eos = c.meta.get("eos_token")
    if data_cfg.eos_token and data_cfg.eos_token != eos:
        raise corpus_lib.StoreError(f"data.eos_token={data_cfg.eos_token!r} is not the store's end-of-document "
                                    f"token {eos!r} ({c.path}); leave data.eos_token empty with a store")


def check_splits(cfg: Config, corpus: corpus_lib.Corpus) -> None:
    """Before any step: the train split holds a window and the held-out split a full batch of windows at the
    configured shape (validation runs after the last step, so a short split would fail only then)."""
    m, t = cfg.model, cfg.train
    for name, split, need, what in (("train", corpus.train, 1, "training needs one"),
                                    ("val", corpus.val, t.batch_size, f"validation needs a batch of {t.batch_size}")):
        windows = Windows.count(split, m.seq_len)
        if windows < need:
            raise ValueError(
                f"the {name} split of {corpus.path} has {len(split)} tokens, {windows} window(s) of model.seq_len"
                f" + 1 = {m.seq_len + 1} tokens; {what}: add text, or lower model.seq_len or train.batch_size"
                + (", or lower data.val_every to hold out more documents" if name == "val" else ""))


Tokens = Union[np.ndarray, corpus_lib.Split]


class Windows(grain.sources.RandomAccessDataSource):
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets) of each shard of a
    split; windows do not cross shards."""

    def __init__(self, tokens: Tokens, seq_len: int, name: str):
        split = tokens if isinstance(tokens, corpus_lib.Split) else corpus_lib.Split.of(tokens, name)
        per_shard = [self.count(n, seq_len) for n in split.sizes]
        if not sum(per_shard):
            raise ValueError(f"{name} has {len(split)} tokens, fewer than one window of "
                             f"model.seq_len + 1 = {seq_len + 1}" + (" in any shard" if len(split.sizes) > 1 else ""))
        self.split, self.seq_len = split, seq_len
        self.starts = np.concatenate([[0], np.cumsum(per_shard, dtype=np.int64)])
        self.n = int(self.starts[-1])

    @staticmethod
    def count(tokens: "int | corpus_lib.Split", seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens in ``tokens`` tokens, or in a split's shards (consecutive windows
        share one token)."""
        if isinstance(tokens, corpus_lib.Split):
            return sum(Windows.count(n, seq_len) for n in tokens.sizes)
        return max(tokens - 1, 0) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        lo = (int(i) - int(self.starts[s])) * self.seq_len
        return np.asarray(self.split.open_shard(s)[lo:lo + self.seq_len + 1], dtype=np.int32)


def _local_batch(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {n} processes")
    return global_batch // n


def train_dataset(tokens: Tokens, seq_len: int, global_batch: int, seed: int, vocab_size: int,
                  name: str = "train split") -> grain.IterDataset:
    """Seeded shuffle (a new order every epoch), endless. Process p takes the p-th contiguous block of
    rows of every global batch, so the global batch is the same, row for row, for any process count.
    Every batch is id-checked (a full scan up front would read the whole corpus).

    Iterate with ``iter(...)``: the iterator's state (a few integers per process) goes into checkpoints."""
    local = _local_batch(global_batch)
    ds = grain.MapDataset.source(Windows(tokens, seq_len, name)).shuffle(seed=seed).repeat()
    ds = ProcessRows(ds, global_batch, local, jax.process_index() * local).batch(local, drop_remainder=True)
    ds = ds.map(lambda b: check_ids(b, vocab_size, name))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch: element ``b * local + r`` is element ``b * global + lo + r``
    of the parent, so a process reads only its own windows."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, local: int, lo: int):
        super().__init__(parent)
        self.global_batch, self.local, self.lo = global_batch, local, lo

    def __len__(self) -> int:
        return len(self._parent) // self.global_batch * self.local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        b, r = divmod(int(index), self.local)
        return self._parent[b * self.global_batch + self.lo + r]


def eval_batches(tokens: Tokens, seq_len: int, global_batch: int, vocab_size: int,
                 max_batches: int = 0, name: str = "val split") -> Iterator[np.ndarray]:
    """Windows in order (no shuffle); at most ``max_batches`` (0 = all) full batches, this process's block
    of rows of each (as in ``train_dataset``): a process reads only its own windows."""
    ds = grain.MapDataset.source(Windows(tokens, seq_len, name))
    n_batches = len(ds) // global_batch
    if n_batches == 0:
        raise ValueError(f"{name}: {len(ds)} windows of {seq_len + 1} tokens do not fill one batch of "
                         f"{global_batch}; lower train.batch_size or model.seq_len")
    if max_batches:
        n_batches = min(n_batches, max_batches)
    local = _local_batch(global_batch)
    rows = ProcessRows(ds[: n_batches * global_batch], global_batch, local, jax.process_index() * local)
    for batch in rows.batch(local):
        yield check_ids(batch, vocab_size, name)


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
