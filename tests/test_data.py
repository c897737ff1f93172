"""grain pipelines and token-id validation."""
import numpy as np
import pytest

from stem_jax import corpus, data


def test_check_ids_names_the_id_and_source():
    ok = np.array([[0, 5, 9]])
    assert data.check_ids(ok, 10, "x") is not None
    with pytest.raises(data.TokenIdError, match=r"token id 10 at flat position 2 of my.txt is outside \[0, 10\)"):
        data.check_ids(np.array([1, 2, 10]), 10, "my.txt")
    with pytest.raises(data.TokenIdError, match="token id -3"):
        data.check_ids(np.array([-3, 2]), 10, "ids")


def test_train_dataset_rejects_out_of_range_tokens():
    tokens = np.arange(200, dtype=np.uint16)
    with pytest.raises(data.TokenIdError, match=r"token id 1\d\d at .* of corpus/train.bin is outside \[0, 100\)"):
        for _ in data.train_dataset(tokens, 16, 4, seed=0, vocab_size=100, name="corpus/train.bin"):
            pass
    with pytest.raises(data.TokenIdError, match="of val.bin"):
        list(data.eval_batches(tokens, 16, 4, vocab_size=100, name="val.bin"))


def test_windows_shuffle_is_seeded_and_reshuffles_every_epoch():
    tokens = np.arange(16 * 8 + 1, dtype=np.uint16)  # 8 windows of 17
    first = [b.copy() for _, b in zip(range(4), data.train_dataset(tokens, 16, 4, seed=1, vocab_size=1000))]
    again = [b.copy() for _, b in zip(range(4), data.train_dataset(tokens, 16, 4, seed=1, vocab_size=1000))]
    other = [b.copy() for _, b in zip(range(4), data.train_dataset(tokens, 16, 4, seed=2, vocab_size=1000))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert first[0].shape == (4, 17) and first[0].dtype == np.int32
    starts = [row[0] for b in first for row in b]
    epoch1, epoch2 = sorted(starts[:8]), sorted(starts[8:])
    assert epoch1 == epoch2 == list(range(0, 128, 16))  # every window once per epoch
    assert starts[:8] != starts[8:]                     # in a new order
    for b in first:                                      # targets are the inputs shifted by one
        np.testing.assert_array_equal(b[:, 1:], b[:, :-1] + 1)


def test_windows_of_a_sharded_split_never_cross_a_shard():
    shards = [np.arange(0, 50, dtype=np.uint16), np.arange(1000, 1010, dtype=np.uint16),
              np.arange(2000, 2040, dtype=np.uint16)]
    w = data.Windows(corpus.Split.of(shards, "store/train"), 16, "store/train")
    assert len(w) == 3 + 0 + 2 == data.Windows.count(corpus.Split.of(shards), 16)
    starts = [int(w[i][0]) for i in range(len(w))]
    assert starts == [0, 16, 32, 2000, 2016]
    for i in range(len(w)):
        np.testing.assert_array_equal(w[i], np.arange(starts[i], starts[i] + 17))
    epoch = [row[0] for _, b in zip(range(5), data.train_dataset(corpus.Split.of(shards), 16, 1, 0, 3000))
             for row in b]
    assert sorted(epoch) == starts  # shuffled over the windows of every shard
    np.testing.assert_array_equal(corpus.Split.of(shards).read(45, 53), np.r_[45:50, 1000:1003])


def test_eval_batches_are_ordered_and_capped():
    tokens = np.arange(16 * 10 + 1, dtype=np.uint16)
    batches = list(data.eval_batches(tokens, 16, 4, vocab_size=1000))
    assert len(batches) == 2 and batches[0][0, 0] == 0 and batches[1][0, 0] == 64
    assert len(list(data.eval_batches(tokens, 16, 4, vocab_size=1000, max_batches=1))) == 1
    with pytest.raises(ValueError, match="do not fill one batch"):
        list(data.eval_batches(tokens, 16, 20, vocab_size=1000))
    with pytest.raises(ValueError, match="fewer than one window"):
        data.train_dataset(np.arange(10, dtype=np.uint16), 16, 4, seed=0, vocab_size=1000)


@pytest.mark.parametrize("make", [
    lambda tokens: data.train_dataset(tokens, 16, 4, seed=3, vocab_size=1000),
    lambda tokens: data.eval_batches(tokens, 16, 4, vocab_size=1000),
])
def test_processes_read_contiguous_blocks_of_the_same_global_batch(monkeypatch, make):
    tokens = np.arange(16 * 12 + 1, dtype=np.uint16)
    whole = [b.copy() for _, b in zip(range(3), make(tokens))]
    monkeypatch.setattr(data.jax, "process_count", lambda: 2)
    parts = []
    for p in (0, 1):
        monkeypatch.setattr(data.jax, "process_index", lambda p=p: p)
        parts.append([b.copy() for _, b in zip(range(3), make(tokens))])
    for w, b0, b1 in zip(whole, *parts):
        np.testing.assert_array_equal(np.concatenate([b0, b1]), w)


def test_iterator_state_resumes_at_the_same_batch():
    tokens = np.arange(16 * 8 + 1, dtype=np.uint16)
    it = iter(data.train_dataset(tokens, 16, 4, seed=1, vocab_size=1000))
    for _ in range(5):  # past the first epoch of 2 batches
        next(it)
    state = it.get_state()
    want = [next(it).copy() for _ in range(4)]
    fresh = iter(data.train_dataset(tokens, 16, 4, seed=1, vocab_size=1000))
    fresh.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(fresh), w)


def test_lookahead_state_is_the_position_before_the_peeked_batch():
    tokens = np.arange(16 * 8 + 1, dtype=np.uint16)
    make = lambda: data.Lookahead(iter(data.train_dataset(tokens, 16, 4, seed=1, vocab_size=1000)))
    it = make()
    for _ in range(3):
        next(it)
    peeked = it.peek().copy()
    state = it.get_state()  # saved while a batch is peeked: a resume must yield that batch again
    np.testing.assert_array_equal(next(it), peeked)
    want = [next(it).copy() for _ in range(2)]
    fresh = make()
    fresh.set_state(state)
    for w in [peeked] + want:
        np.testing.assert_array_equal(next(fresh), w)


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_reads_only_its_rows_of_the_validation_batches(monkeypatch, processes):
    seq, global_batch, n_batches = 16, 8, 2
    tokens = np.arange(seq * 20 + 1, dtype=np.uint16)  # 20 windows: 2 full batches of 8, capped to 2
    windows = np.stack([tokens[i * seq:i * seq + seq + 1] for i in range(n_batches * global_batch)])
    reads = []

    def open_shard(k):
        reads.append(k)  # Windows reads one window per open_shard call
        return tokens
    split = corpus.Split("val", [len(tokens)], open_shard)
    local = global_batch // processes
    monkeypatch.setattr(data.jax, "process_count", lambda: processes)
    for p in range(processes):
        monkeypatch.setattr(data.jax, "process_index", lambda p=p: p)
        reads.clear()
        got = list(data.eval_batches(split, seq, global_batch, vocab_size=1000, max_batches=n_batches))
        assert len(reads) == n_batches * global_batch // processes  # its own windows, nothing more
        want = [windows[b * global_batch:(b + 1) * global_batch][p * local:(p + 1) * local] for b in range(n_batches)]
        assert len(got) == n_batches
        for g, w in zip(got, want):  # the rows the old whole-batch slicing gave this process
            np.testing.assert_array_equal(g, w)
