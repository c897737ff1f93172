"""A device-resident cache of hot STEM rows for decoding with offloaded tables.

Decoding learns each step's token only after the previous step, so there is nothing to prefetch far ahead;
but tokens are Zipf-distributed, so a few thousand rows serve most lookups. ``LFUCache`` is the host-side
planner (token -> slot; least-frequently-used eviction, least-recently-used among equals, as in the
reference engine's ``lfu_cache.h``); ``RowCache`` holds the [capacity, d_ff] row blocks of every STEM
layer on the device and fetches misses from the host tables (``offload.gather``). The sampler reads
``rows[slot]`` through the model's ``rows=`` path (``sampling.py``)."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stem_jax import offload


class LFUCache:
    """Token -> slot map for ``capacity`` slots with LFU eviction and an LRU tie-break.

    Every occurrence of a token is a lookup; a token's first occurrence in a step may miss, repeats in the
    same step hit (they share the fetched row). Frequencies are forgotten on eviction."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"hot-row cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.slot: dict[int, int] = {}
        self.freq: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.free = list(range(capacity - 1, -1, -1))
        self.clock = self.lookups = self.hits = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def plan(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(slot per id, ids to fetch, their slots)`` for one step's tokens."""
        ids = [int(i) for i in ids]
        needed = set(ids)
        if len(needed) > self.capacity:
            raise ValueError(f"hot-row cache capacity {self.capacity} is smaller than the {len(needed)} distinct "
                             "tokens of one decoding step (the batch size); raise the capacity")
        self.clock += 1
        slots, miss_ids, miss_slots = [], [], []
        for t in ids:
            self.lookups += 1
            if t in self.slot:
                self.hits += 1
            else:
                s = self.free.pop() if self.free else self._evict(needed)
                self.slot[t], self.freq[t] = s, 0
                miss_ids.append(t)
                miss_slots.append(s)
            self.freq[t] += 1
            self.last[t] = self.clock
            slots.append(self.slot[t])
        return (np.asarray(slots, np.int32), np.asarray(miss_ids, np.int32), np.asarray(miss_slots, np.int32))

    def _evict(self, keep: set[int]) -> int:
        victim = min((t for t in self.slot if t not in keep), key=lambda t: (self.freq[t], self.last[t]))
        del self.freq[victim], self.last[victim]
        return self.slot.pop(victim)


def _fill(cache: list[jax.Array], host: list[jax.Array], ids_M: jax.Array, slots_M: jax.Array) -> list[jax.Array]:
    rows = offload.gather(host, ids_M)
    return [c.at[slots_M].set(r.astype(c.dtype), mode="drop") for c, r in zip(cache, rows)]


class RowCache:
    """``capacity`` rows of each STEM table on the device, filled from the host tables on a miss."""

    def __init__(self, host_tables: list[jax.Array], capacity: int, max_batch: int,
                 stored_rows: Callable[[np.ndarray], np.ndarray]):
        """``stored_rows`` maps token ids to rows of the host tables (``Transformer.stored_rows``)."""
        self.lfu, self.stored_rows = LFUCache(capacity), stored_rows
        self.host, self.max_batch, self.fill_id = host_tables, max_batch, host_tables[0].shape[0]
        self.rows = [jnp.zeros((capacity, t.shape[1]), t.dtype) for t in host_tables]
        self._fill = jax.jit(_fill, donate_argnums=0)

    def lookup(self, tokens_B: np.ndarray) -> jax.Array:
        """Slots of this step's tokens ([B, 1], for the model's ``rows=(cache.rows, slots)``); misses are
        fetched first. Misses are padded to the batch size so one program serves every step."""
        slots, miss_ids, miss_slots = self.lfu.plan(tokens_B)
        if len(miss_ids):
            B = max(self.max_batch, len(miss_ids))
            ids = np.full(B, self.fill_id, np.int32)
            at = np.full(B, self.lfu.capacity, np.int32)  # out of range: dropped
            ids[:len(miss_ids)], at[:len(miss_ids)] = self.stored_rows(miss_ids), miss_slots
            self.rows = self._fill(self.rows, self.host, jnp.asarray(ids), jnp.asarray(at))
        return jnp.asarray(slots[:, None])
