"""The hot-row cache: LFU eviction with an LRU tie-break against a hand-worked trace, capacity errors, and
device rows that always equal the host table's rows for the planned slots."""
import jax
import numpy as np
import pytest

from stem_jax import hotrows


def test_lfu_evicts_least_frequent_then_least_recent():
    c = hotrows.LFUCache(3)
    c.plan([1, 2])        # 1:f1 2:f1
    c.plan([1, 3])        # 1:f2 3:f1 (full)
    slots, miss, at = c.plan([4])  # 2 and 3 have f1; 2 was used longer ago -> evicted
    assert miss.tolist() == [4] and 2 not in c.slot and set(c.slot) == {1, 3, 4}
    assert at.tolist() == slots.tolist()
    c.plan([4])           # 4:f2, 3:f1 -> 3 is next
    _, miss, _ = c.plan([5, 5])   # the repeat in the same step hits
    assert miss.tolist() == [5] and 3 not in c.slot
    assert (c.lookups, c.hits) == (8, 3)  # hits: 1 (step 2), 4 (step 4), the second 5
    assert c.hit_rate == pytest.approx(3 / 8)


def test_tokens_of_the_current_step_are_never_evicted():
    c = hotrows.LFUCache(2)
    c.plan([7, 7, 7, 8])
    slots, miss, _ = c.plan([9, 8])  # 7 is the LFU victim, 8 is needed now
    assert miss.tolist() == [9] and set(c.slot) == {8, 9} and len(set(slots.tolist())) == 2


def test_capacity_errors():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        hotrows.LFUCache(0)
    with pytest.raises(ValueError, match="smaller than the 3 distinct tokens"):
        hotrows.LFUCache(2).plan([1, 2, 3])


def test_row_cache_serves_the_host_rows():
    host_sh = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    tables = [np.random.default_rng(i).normal(size=(40, 6)).astype(np.float32) for i in range(2)]
    cache = hotrows.RowCache([jax.device_put(t, host_sh) for t in tables], capacity=4, max_batch=2,
                             stored_rows=lambda ids: ids)  # these tables store row t at t
    rng = np.random.default_rng(0)
    for _ in range(12):
        toks = rng.choice([0, 1, 2, 3, 5, 8, 13, 21, 34], size=2, replace=False)
        slots = np.asarray(cache.lookup(toks))[:, 0]
        for rows, t in zip(cache.rows, tables):
            assert rows.sharding.memory_kind == "device"
            np.testing.assert_array_equal(np.asarray(rows)[slots], t[toks])
    assert 0 < cache.lfu.hit_rate < 1
