"""The KV-cache sampler: greedy equals re-running the full forward each step, batched equals one by one,
sharded equals unsharded, and the top-k / top-p filters against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import mesh_of, tiny_config
from stem_jax import corpus as corpus_lib
from stem_jax.sampling import Sampler, SamplingConfig, SamplingError, filter_logits
from stem_jax.trainer import Trainer

PROMPTS = [[5, 17, 250, 3], [9], [44, 2, 7, 7, 130, 61, 99, 12, 400, 8, 1, 73, 27, 301, 5, 6, 77]]


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(f"word{i % 97} and {i % 13}." for i in range(3000))
    return corpus_lib.train_tokenizer([text], 300)


def _sampler(tokenizer, shape=(1, 1, 1), **model):
    cfg = tiny_config(seq_len=32, stem_layers="1", **model)
    s = Trainer.create(cfg, mesh_of(shape))
    params = s.init_state()["params"]
    return Sampler(s.ctx.graphdef, params, tokenizer, s.ctx.mesh, cfg.model.seq_len), s, params


@pytest.fixture(scope="module")
def stem_sampler(tokenizer):
    return _sampler(tokenizer)


def _greedy_by_full_forward(s, params, prompt, n, eos):
    """Greedy decoding without a cache: the full forward over the whole sequence for every new token (one
    compiled program: right-padded to seq_len, where causal attention keeps the real positions exact)."""
    L = s.ctx.cfg.model.seq_len
    fwd = jax.jit(lambda p, ids, i: nnx.merge(s.ctx.graphdef, p)(ids)[0, i])
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, L), np.int32)
        padded[0, :len(ids)] = ids
        nxt = int(np.argmax(np.asarray(fwd(params, jnp.asarray(padded), len(ids) - 1))))
        if nxt == eos:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def _strip(row, eos):
    row = list(row)
    return row[:row.index(eos)] if eos in row else row


@pytest.mark.parametrize("ffn", ["stem", "dense"])
def test_greedy_with_kv_cache_equals_full_forward_each_step(tokenizer, stem_sampler, ffn):
    sampler, s, params = stem_sampler if ffn == "stem" else _sampler(tokenizer, ffn=ffn)
    cfg = SamplingConfig(max_new_tokens=10)
    batched = sampler.generate_ids(PROMPTS, cfg)
    for prompt, row in zip(PROMPTS, batched):
        assert _strip(row, sampler.eos) == _greedy_by_full_forward(s, params, prompt, 10, sampler.eos)
    # Left-padding inside a batch changes nothing: the two short prompts alone (one bucket, one compile).
    for prompt, row in zip(PROMPTS[:2], batched):
        np.testing.assert_array_equal(sampler.generate_ids([prompt], cfg)[0], row)


def test_sharded_sampler_equals_single_device(tokenizer, stem_sampler):
    single, _, params = stem_sampler
    sharded, s8, _ = _sampler(tokenizer, (2, 2, 2))
    sharded.params = jax.device_put(jax.device_get(params), s8.ctx.state_shardings["params"])
    cfg = SamplingConfig(max_new_tokens=6)
    np.testing.assert_array_equal(sharded.generate_ids(PROMPTS, cfg), single.generate_ids(PROMPTS, cfg))


def test_sampling_settings(stem_sampler):
    sampler, _, _ = stem_sampler
    greedy = sampler.generate_ids(PROMPTS[:2], SamplingConfig(max_new_tokens=5))
    hot = SamplingConfig(max_new_tokens=5, temperature=1.5, top_k=1, seed=3)
    np.testing.assert_array_equal(sampler.generate_ids(PROMPTS[:2], hot), greedy)  # top-1 is greedy
    a = SamplingConfig(max_new_tokens=5, temperature=2.0, seed=1)
    b = SamplingConfig(max_new_tokens=5, temperature=2.0, seed=2)
    np.testing.assert_array_equal(sampler.generate_ids(PROMPTS[:2], a), sampler.generate_ids(PROMPTS[:2], a))
    assert not np.array_equal(sampler.generate_ids(PROMPTS[:2], a), sampler.generate_ids(PROMPTS[:2], b))
    top = sampler.next_token_topk("word3 and", k=4)
    assert len(top) == 4 and all(p1 >= p2 for (_, p1), (_, p2) in zip(top, top[1:])) and 0 < top[0][1] <= 1
    gens = sampler.generate(["word1 and"], SamplingConfig(max_new_tokens=3))
    assert gens[0].stop in ("eos", "max_tokens") and isinstance(gens[0].text, str)


def test_top_k_and_top_p_filters_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), 5, 1.0))
    for row, g in zip(logits, got):
        assert set(np.flatnonzero(np.isfinite(g))) == set(np.argsort(-row)[:5])
    p = 0.6
    got = np.asarray(filter_logits(jnp.asarray(logits), 0, p))
    for row, g in zip(logits, got):
        order = np.argsort(-row)
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        n_keep = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass >= p
        assert set(np.flatnonzero(np.isfinite(g))) == set(order[:n_keep])


@pytest.mark.parametrize("kwargs,msg", [
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"), ({"top_p": 1.5}, "top_p=1.5"),
    ({"temperature": -1.0}, "temperature=-1.0"), ({"top_k": -2}, "top_k=-2"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"), ({"max_new_tokens": 30}, "exceeds the model's context"),
])
def test_bad_settings_are_clear_errors(stem_sampler, kwargs, msg):
    sampler, _, _ = stem_sampler
    with pytest.raises(SamplingError, match=msg):
        sampler.generate_ids(PROMPTS, SamplingConfig(**kwargs))


def test_offloaded_tables_with_a_hot_row_cache_sample_the_same_tokens(tokenizer, stem_sampler):
    sampler, s, params = stem_sampler
    cfg = tiny_config(seq_len=32, stem_layers="1", stem_offload=True)
    cfg.train.stem_optimizer = "sparse"
    s_off = Trainer.create(cfg, mesh_of((1, 1, 1)))
    host_params = jax.device_put(params, s_off.ctx.state_shardings["params"])
    # 4 slots for 3 prompts: nearly every step evicts.
    off = Sampler(s_off.ctx.graphdef, host_params, tokenizer, s_off.ctx.mesh, 32, cache_rows=4)
    assert off.host_tables[0].sharding.memory_kind == "pinned_host"
    for c in (SamplingConfig(max_new_tokens=8), SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)):
        np.testing.assert_array_equal(off.generate_ids(PROMPTS, c), sampler.generate_ids(PROMPTS, c))
    np.testing.assert_allclose(off.next_token_logits(PROMPTS[2]), sampler.next_token_logits(PROMPTS[2]),
                               rtol=1e-5, atol=1e-5)
    lfu = off.row_cache.lfu
    assert lfu.lookups and lfu.lookups % len(PROMPTS) == 0 and 0 <= lfu.hit_rate <= 1  # B lookups per step
