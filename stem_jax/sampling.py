"""Generation from a checkpoint with a KV cache: one jitted program per (prompt bucket, settings) runs the
prefill and then the whole decode loop on device (``lax.while_loop``), stopping when every row has emitted
the run's end-of-document token (``data.eos_token``) or ``max_new_tokens``. Prompts are encoded as training
encoded documents (``corpus.encode_text``: no BOS). Greedy, temperature, top-k and top-p (nucleus) sampling; batched
prompts of any lengths (left-padded; padding is masked out of attention and RoPE positions start at each
row's first real token). With ``cache_rows`` the STEM tables stay in host memory and decoding reads a hot-row
cache (``hotrows.py``); that loop runs from Python, one host round trip per token to plan the cache."""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import Mesh

from stem_jax import cli, corpus, hotrows, offload, sharding, sparse, steps, workdir as workdir_lib
from stem_jax.config import DTYPES
from stem_jax.stem import RowEdit, StemRows

PROMPT_BUCKET = 16  # prompts are padded to a multiple of this, so nearby lengths share one compiled program


class SamplingError(ValueError):
    """Settings or prompts that cannot be sampled."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0   # 0 = greedy (argmax)
    top_k: int = 0             # keep the k most likely tokens; 0 = all
    top_p: float = 1.0         # keep the smallest set of tokens whose probability reaches top_p, in (0, 1]
    seed: int = 0

    def check(self) -> "SamplingConfig":
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan would sample nothing, inf noise
            raise SamplingError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filter)")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p={self.top_p} must be in (0, 1]")
        return self


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Logits with every token outside the top-k / nucleus set to -inf (the most likely token always stays)."""
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
    if top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # A token stays if the mass of the tokens before it is still below top_p.
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_B1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_B1, -jnp.inf, logits_BxV)
    return logits_BxV


def next_tokens(logits_BxV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    if cfg.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(logits_BxV.astype(jnp.float32) / cfg.temperature, cfg.top_k, cfg.top_p)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def _prefill(model, ids_BxP, valid_BxP, new_tokens: int, cache_dtype, edit: RowEdit | None = None,
             rows: StemRows | None = None):
    """KV cache after the (left-padded) prompts, the last position's logits, and each row's padding."""
    B, P = ids_BxP.shape
    pad_B = P - jnp.sum(valid_BxP, axis=1)
    cache = model.init_cache(B, P + new_tokens, cache_dtype)
    cache = cache.replace(valid_BxS=cache.valid_BxS.at[:, :P].set(valid_BxP),
                          positions_BxT=jnp.maximum(jnp.arange(P)[None, :] - pad_B[:, None], 0))
    logits_Bx1xV, cache = model.decode(ids_BxP, cache, rows, edit, last_only=True)  # an edit touches the prompt only
    return cache.replace(positions_BxT=jnp.zeros((B, 1), jnp.int32)), logits_Bx1xV[:, -1], pad_B


def _decode_one(model, cache, tok_B, i, P: int, pad_B, rows: StemRows | None = None):
    """Feed the i-th new token of every row; returns the cache and the next logits [B, V]."""
    slot = P + i
    cache = cache.replace(valid_BxS=cache.valid_BxS.at[:, slot].set(True), start=slot,
                          positions_BxT=(P - pad_B + i)[:, None])
    logits_Bx1xV, cache = model.decode(tok_B[:, None], cache, rows=rows)
    return cache, logits_Bx1xV[:, -1]


def _generate(graphdef, params, ids_BxP, valid_BxP, key, edit, *, cfg: SamplingConfig, eos: int, cache_dtype):
    model = nnx.merge(graphdef, params)
    B, P = ids_BxP.shape
    N = cfg.max_new_tokens
    cache, last_BxV, pad_B = _prefill(model, ids_BxP, valid_BxP, N, cache_dtype, edit)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < N) & ~jnp.all(done_B)

    def body(carry):
        i, cache, last_BxV, out_BxN, done_B, key = carry
        key, sub = jax.random.split(key)
        tok_B = jnp.where(done_B, eos, next_tokens(last_BxV, sub, cfg))
        out_BxN = out_BxN.at[:, i].set(tok_B)
        done_B = done_B | (tok_B == eos)
        cache, last_BxV = _decode_one(model, cache, tok_B, i, P, pad_B)
        return i + 1, cache, last_BxV, out_BxN, done_B, key

    carry = (jnp.zeros((), jnp.int32), cache, last_BxV, jnp.full((B, N), eos, jnp.int32),
             jnp.zeros((B,), bool), key)
    return jax.lax.while_loop(cond, body, carry)[3]


@dataclasses.dataclass
class Generation:
    prompt: str
    text: str
    ids: list[int]
    stop: str  # "eos" or "max_tokens"


def top_tokens(tokenizer: Any, logits_V: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` most likely tokens of ``logits_V`` as (string, probability)."""
    probs = np.exp(logits_V - logits_V.max())
    probs /= probs.sum()
    return [(tokenizer.decode([int(t)]), float(probs[t])) for t in np.argsort(-probs)[:k]]


class Sampler:
    """Generation and next-token views from a model's graphdef + params and its tokenizer."""

    def __init__(self, graphdef: Any, params: Any, tokenizer: Any, mesh: Mesh, seq_len: int, dtype: str = "float32",
                 cache_rows: int = 0, eos_id: int | None = None):
        """``eos_id``: the end-of-document id the model was trained with (``from_run`` passes the run's);
        None resolves it as training does with the default ``data.eos_token`` (``corpus.eos_id``: the first of
        ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>`` that the tokenizer has).
        ``cache_rows`` > 0: the STEM tables of ``params`` live in host memory (``model.stem_offload``);
        the prompt's unique rows are fetched for the prefill, and decoding reads a device cache of that many
        hot rows per STEM layer (``hotrows.py``; its hit rate is ``self.row_cache.lfu.hit_rate``)."""
        self.graphdef, self.params, self.tokenizer, self.mesh, self.seq_len = graphdef, params, tokenizer, mesh, seq_len
        self.row_cache = None
        if cache_rows:
            tables, self.backbone = sparse.split_tables(params)
            self.abstract_tables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tables)
            self.host_tables = sparse.table_list(tables)
            if not self.host_tables or any(t.sharding.memory_kind != sharding.HOST for t in self.host_tables):
                raise SamplingError("cache_rows needs STEM tables in host memory (pinned_host); load with "
                                    "Sampler.from_workdir(workdir, cache_rows=N)")
            self.stored_rows = self._rows_model(self.backbone).stored_rows
            self.row_cache = hotrows.RowCache(self.host_tables, cache_rows, max_batch=8, stored_rows=self.stored_rows)
            self._gather = jax.jit(offload.gather)
            self._sample = jax.jit(next_tokens, static_argnums=2)
            self._prefill_rows = jax.jit(self._prefill_rows_fn, static_argnums=5)
            self._decode_rows = jax.jit(self._decode_rows_fn)
            self._forward_rows = jax.jit(
                lambda b, rows, inv, ids_1xL, n: self._rows_model(b)(ids_1xL, StemRows(tuple(rows), inv))[0, n - 1])
        self.eos = corpus.eos_id(tokenizer) if eos_id is None else eos_id
        self.cache_dtype = DTYPES[dtype]
        self._programs: dict[SamplingConfig, Any] = {}  # jitted generate per settings
        self._forward = jax.jit(lambda p, ids_1xL, n, edit: nnx.merge(graphdef, p)(ids_1xL, edit=edit)[0, n - 1])

    @classmethod
    def from_workdir(cls, workdir: str | Path, step: int | None = None, mesh_shape: Sequence[int] | str = "auto",
                     cache_rows: int = 0) -> "Sampler":
        """``cache_rows`` > 0 restores the STEM tables into host memory and decodes through a hot-row cache."""
        if cache_rows:
            ffn = workdir_lib.load_run_config(workdir).model.ffn
            if ffn != "stem":
                raise SamplingError(f"a hot-row cache needs a STEM model, not model.ffn={ffn!r}")
            hotrows.LFUCache(cache_rows)  # a bad capacity fails before the restore
        run = workdir_lib.restore(workdir, mesh_shape, step, tables_on_host=cache_rows > 0)
        return cls.from_run(run, cache_rows)

    @classmethod
    def from_run(cls, run: workdir_lib.Run, cache_rows: int = 0) -> "Sampler":
        m = run.cfg.model
        return cls(run.graphdef, run.params, run.require_tokenizer(), run.mesh, m.seq_len, m.dtype, cache_rows,
                   run.eos_id())

    def encode(self, prompt: str) -> list[int]:
        ids = corpus.encode_text(self.tokenizer, prompt).ids
        return ids or [self.eos]  # an empty prompt starts a new document

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], cfg: SamplingConfig = SamplingConfig(),
                     edit: RowEdit | None = None) -> np.ndarray:
        """[B, max_new_tokens] new ids per prompt (``self.eos`` after a row stops). ``edit``: a STEM row
        override for the prompts, [B, L, M] with L the longest prompt's length and each row's prompt at its
        start (see ``editing.py``)."""
        cfg.check()
        if not prompt_ids:
            raise SamplingError("no prompts given")
        longest = max(len(p) for p in prompt_ids)
        if min(len(p) for p in prompt_ids) == 0:
            raise SamplingError("a prompt has no tokens")
        if longest + cfg.max_new_tokens > self.seq_len:
            raise SamplingError(f"the longest prompt has {longest} tokens; with max_new_tokens="
                                f"{cfg.max_new_tokens} that exceeds the model's context, model.seq_len={self.seq_len}")
        P = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
        ids_BxP = np.full((len(prompt_ids), P), self.eos, np.int32)
        valid_BxP = np.zeros((len(prompt_ids), P), bool)
        for b, p in enumerate(prompt_ids):
            ids_BxP[b, P - len(p):], valid_BxP[b, P - len(p):] = p, True
        if self.row_cache is not None:
            if edit is not None:
                raise SamplingError("row edits need the tables on device; load the sampler without a row cache")
            return self._generate_offloaded(ids_BxP, valid_BxP, cfg)
        if edit is not None:
            edit = _left_pad_edit(edit, [len(p) for p in prompt_ids], P)
        key = dataclasses.replace(cfg, seed=0)  # the seed is an argument, not part of the program
        if key not in self._programs:
            self._programs[key] = jax.jit(functools.partial(_generate, self.graphdef, cfg=key, eos=self.eos,
                                                            cache_dtype=self.cache_dtype))
        fn = self._programs[key]
        with jax.set_mesh(self.mesh):
            out = fn(self.params, jnp.asarray(ids_BxP), jnp.asarray(valid_BxP), jax.random.key(cfg.seed), edit)
        return np.asarray(jax.device_get(out))

    def _rows_model(self, backbone):
        return steps.rows_model(self.graphdef, backbone, self.abstract_tables)

    def _prefill_rows_fn(self, backbone, rows, inv_BxP, ids_BxP, valid_BxP, new_tokens: int):
        return _prefill(self._rows_model(backbone), ids_BxP, valid_BxP, new_tokens, self.cache_dtype,
                        rows=StemRows(tuple(rows), inv_BxP))

    def _decode_rows_fn(self, backbone, cache_rows, slots_Bx1, kv, tok_B, i, P, pad_B):
        return _decode_one(self._rows_model(backbone), kv, tok_B, i, P, pad_B, StemRows(tuple(cache_rows), slots_Bx1))

    def _generate_offloaded(self, ids_BxP: np.ndarray, valid_BxP: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
        """``_generate`` with host tables: the prompts' unique rows are fetched for the prefill, then each
        new token's row comes from the hot-row cache (a host round trip per token plans its misses)."""
        (B, P), N = ids_BxP.shape, cfg.max_new_tokens
        uniq, inv = offload.dedup_host(self.stored_rows(ids_BxP), self.host_tables[0].shape[0], ids_BxP.size)
        out_BxN, done_B = np.full((B, N), self.eos, np.int32), np.zeros(B, bool)
        key, sample_cfg = jax.random.key(cfg.seed), dataclasses.replace(cfg, seed=0)
        with jax.set_mesh(self.mesh):
            rows = self._gather(self.host_tables, jnp.asarray(uniq))
            kv, last_BxV, pad_B = self._prefill_rows(self.backbone, rows, jnp.asarray(inv), jnp.asarray(ids_BxP),
                                                     jnp.asarray(valid_BxP), N)
            for i in range(N):
                key, sub = jax.random.split(key)
                tok_B = np.where(done_B, self.eos, np.asarray(self._sample(last_BxV, sub, sample_cfg)))
                out_BxN[:, i] = tok_B
                done_B |= tok_B == self.eos
                if done_B.all():
                    break
                slots_Bx1 = self.row_cache.lookup(tok_B)
                kv, last_BxV = self._decode_rows(self.backbone, self.row_cache.rows, slots_Bx1, kv,
                                                 jnp.asarray(tok_B), i, P, pad_B)
        return out_BxN

    def generate(self, prompts: Sequence[str], cfg: SamplingConfig = SamplingConfig()) -> list[Generation]:
        out_BxN = self.generate_ids([self.encode(p) for p in prompts], cfg)
        gens = []
        for prompt, row in zip(prompts, out_BxN):
            ids = row.tolist()
            stop = "eos" if self.eos in ids else "max_tokens"
            ids = ids[:ids.index(self.eos)] if stop == "eos" else ids
            gens.append(Generation(prompt, self.tokenizer.decode(ids), ids, stop))
        return gens

    def next_token_topk(self, prompt: str | Sequence[int], k: int = 5, edit: RowEdit | None = None
                        ) -> list[tuple[str, float]]:
        """The ``k`` most likely next tokens after ``prompt`` (text or ids) with their probabilities."""
        logits_V = self.next_token_logits(self.encode(prompt) if isinstance(prompt, str) else prompt, edit)
        return top_tokens(self.tokenizer, logits_V, k)

    def next_token_logits(self, prompt_ids: Sequence[int], edit: RowEdit | None = None) -> np.ndarray:
        """[V] logits of the token after ``prompt_ids`` (with an optional STEM row edit)."""
        ids = list(prompt_ids)
        if len(ids) > self.seq_len:
            raise SamplingError(f"the prompt has {len(ids)} tokens, more than model.seq_len={self.seq_len}")
        # Right-padded to a bucket (causal attention: padding after the prompt cannot change its logits).
        L = min(-(-len(ids) // PROMPT_BUCKET) * PROMPT_BUCKET, self.seq_len)
        ids_1xL = np.full((1, L), self.eos, np.int32)
        ids_1xL[0, :len(ids)] = ids
        if edit is not None:
            pad = ((0, 0), (0, L - edit.ids_BxLxM.shape[1]), (0, 0))
            edit = RowEdit(np.pad(np.asarray(edit.ids_BxLxM), pad, constant_values=self.eos),
                           np.pad(np.asarray(edit.weights_BxLxM), pad), np.asarray(edit.on_S))
        with jax.set_mesh(self.mesh):
            if self.row_cache is not None:
                if edit is not None:
                    raise SamplingError("row edits need the tables on device; load the sampler without a row cache")
                uniq, inv = offload.dedup_host(self.stored_rows(ids_1xL), self.host_tables[0].shape[0], ids_1xL.size)
                rows = self._gather(self.host_tables, jnp.asarray(uniq))
                return np.asarray(self._forward_rows(self.backbone, rows, jnp.asarray(inv), jnp.asarray(ids_1xL),
                                                     len(ids)))
            return np.asarray(jax.device_get(self._forward(self.params, jnp.asarray(ids_1xL), len(ids), edit)))



def _left_pad_edit(edit: RowEdit, lengths: list[int], P: int) -> RowEdit:
    """Move each row's edit arrays to where its prompt sits after left-padding to ``P``."""
    e_ids, e_w = np.asarray(edit.ids_BxLxM), np.asarray(edit.weights_BxLxM)
    B, _, M = e_ids.shape
    ids_BxPxM, w_BxPxM = np.zeros((B, P, M), np.int32), np.zeros((B, P, M), np.float32)
    for b, n in enumerate(lengths):
        ids_BxPxM[b, P - n:], w_BxPxM[b, P - n:] = e_ids[b, :n], e_w[b, :n]
    return RowEdit(jnp.asarray(ids_BxPxM), jnp.asarray(w_BxPxM), jnp.asarray(edit.on_S))


def _define(fv: flags.FlagValues, _command) -> None:
    flags.DEFINE_string("workdir", None, "A workdir written by train.py.", required=True, flag_values=fv)
    flags.DEFINE_multi_string("prompt", None, "A prompt; repeat for a batch of prompts.", required=True, flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable).", flag_values=fv)
    cli.define_mesh_flag(fv)
    flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold in (0, 1].", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_integer("show_topk", 0, "Also print the k most likely next tokens.", flag_values=fv)
    flags.DEFINE_integer("cache_rows", 0, "Keep the STEM tables in host memory and decode through a device cache "
                         "of this many hot rows per STEM layer (0 = tables on device).", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    """``python -m stem_jax.sampling --workdir runs/tiny --prompt "And God said" [--prompt ...]``"""
    _, f = cli.parse_command(argv, "python -m stem_jax.sampling", "Generate from a checkpoint.", _define)
    cfg = SamplingConfig(f.max_new_tokens, f.temperature, f.top_k, f.top_p, f.seed)

    def run():
        cfg.check()  # before the restore, so a bad setting fails fast
        if f.cache_rows < 0:
            raise SamplingError(f"--cache_rows={f.cache_rows} must be >= 1 (or 0 for tables on device)")
        sampler = Sampler.from_workdir(f.workdir, f.step, sharding.parse_mesh(f.mesh), cache_rows=f.cache_rows)
        for g in sampler.generate(f.prompt, cfg):
            print(f"{g.prompt}\u2502{g.text}   [{len(g.ids)} tokens, {g.stop}]")
            if f.show_topk:
                print("  next: " + ", ".join(f"{t!r} {p:.3f}" for t, p in sampler.next_token_topk(g.prompt, f.show_topk)))
        if sampler.row_cache is not None:
            lfu = sampler.row_cache.lfu
            print(f"hot-row cache: {lfu.hits}/{lfu.lookups} lookups hit ({lfu.hit_rate:.1%}), "
                  f"{lfu.capacity} rows per STEM layer")
    cli.run_user_errors(run)


if __name__ == "__main__":
    main()
