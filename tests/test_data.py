"""grain pipelines and token-id validation."""
import numpy as np
import pytest

from stem_jax import data


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


def test_eval_batches_are_ordered_and_capped():
    tokens = np.arange(16 * 10 + 1, dtype=np.uint16)
    batches = list(data.eval_batches(tokens, 16, 4, vocab_size=1000))
    assert len(batches) == 2 and batches[0][0, 0] == 0 and batches[1][0, 0] == 64
    assert len(list(data.eval_batches(tokens, 16, 4, vocab_size=1000, max_batches=1))) == 1
    with pytest.raises(ValueError, match="do not fill one batch"):
        list(data.eval_batches(tokens, 16, 20, vocab_size=1000))
    with pytest.raises(ValueError, match="fewer than one window"):
        data.train_dataset(np.arange(10, dtype=np.uint16), 16, 4, seed=0, vocab_size=1000)
