"""Score text with a restored model: log-likelihoods of continuations, rolling log-likelihoods of whole texts,
and greedy generation (through ``sampling.Sampler``), with lm-evaluation-harness conventions.

Every forward runs on ONE fixed shape, ``[eval_batch, seq_len]`` (rows right-padded, partial batches padded
with empty rows), so a whole evaluation compiles a single program. Right padding is harmless: attention is
causal, so a pad never influences an earlier position. The jitted function returns per-row log-likelihood sums
and greedy flags, never the ``[B, L, V]`` logits, so only a few bytes per row leave the devices.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from stem_jax import corpus, sharding, workdir as workdir_lib
from stem_jax.sampling import Sampler, SamplingConfig

TokenPair = tuple[list[int], list[int]]   # (context ids, continuation ids)


class ScoringError(ValueError):
    """A request that cannot be scored (empty continuation, nothing to condition on, ...)."""


@dataclasses.dataclass(frozen=True)
class Forward:
    """The compiled scoring forward and what it needs: ``fn(params, ids, targets, mask)``."""
    fn: Callable
    graphdef: Any
    params: Any
    mesh: Mesh
    batch_sharding: NamedSharding
    eval_batch: int
    seq_len: int


def _make_forward(graphdef: Any, params: Any, mesh: Mesh, seq_len: int, eval_batch: int) -> Forward:
    def score(params, ids_BxL, targets_BxL, mask_BxL):
        logits_BxLxV = nnx.merge(graphdef, params)(ids_BxL)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
        tok_logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        argmax_BxL = jnp.argmax(logits_BxLxV, axis=-1).astype(jnp.int32)
        logp_B = jnp.sum(jnp.where(mask_BxL, tok_logp_BxL, 0.0), axis=-1)
        greedy_B = jnp.all(jnp.where(mask_BxL, argmax_BxL == targets_BxL, True), axis=-1)
        return logp_B, greedy_B

    # Batch rows go over the mesh's batch axes when they divide eval_batch; otherwise every device gets
    # every row (correct, just not data-parallel).
    batch_sh = NamedSharding(mesh, sharding.fitted_spec(("batch", "length"), (eval_batch, seq_len), mesh))
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    fn = jax.jit(score, in_shardings=(param_sh, batch_sh, batch_sh, batch_sh),
                 out_shardings=sharding.replicated(mesh))  # every process can read the results
    return Forward(fn, graphdef, params, mesh, batch_sh, eval_batch, seq_len)


def default_eval_batch(mesh: Mesh, rows: int = 8) -> int:
    """``rows`` rounded up to a multiple of the mesh's batch shards."""
    n = sharding.axis_size("batch", mesh)
    return -(-rows // n) * n


class Scorer:
    """Log-likelihoods and greedy generation from a model and its tokenizer (HF ``tokenizers``)."""

    def __init__(self, graphdef: Any, params: Any, tokenizer: Any, mesh: Mesh, seq_len: int,
                 eval_batch: int | None = None, vocab_size: int | None = None, eos_id: int | None = None):
        """``eos_id``: the end-of-document id the model was trained with (``from_run`` passes the run's);
        None resolves it as training does with the default ``data.eos_token`` (``corpus.eos_id``)."""
        if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
            raise ScoringError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab is "
                               f"{vocab_size}")
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.eot_id = corpus.eos_id(tokenizer) if eos_id is None else eos_id
        self.eval_batch = eval_batch or default_eval_batch(mesh)
        self.forward = _make_forward(graphdef, params, mesh, seq_len, self.eval_batch)
        self.forward_calls = 0  # each is one [eval_batch, seq_len] forward
        self.step: int | None = None  # the checkpoint step, when restored from a workdir
        self.dtype = "float32"        # compute dtype of the generation cache (the run's model.dtype)
        self.sampler: Sampler | None = None  # built on the first generate_until

    @classmethod
    def from_run(cls, run: workdir_lib.Run, eval_batch: int | None = None) -> "Scorer":
        """From a restored checkpoint (``workdir.restore``)."""
        m = run.cfg.model
        scorer = cls(run.graphdef, run.params, run.require_tokenizer(), run.mesh, m.seq_len, eval_batch,
                     m.vocab_size, run.eos_id())
        scorer.step, scorer.dtype = run.step, m.dtype
        return scorer

    @classmethod
    def from_workdir(cls, workdir: str | Path, step: int | None = None, mesh_shape: Sequence[int] | str = "auto",
                     eval_batch: int | None = None) -> "Scorer":
        """Restore the latest (or ``step``) checkpoint of a training workdir onto the devices present now."""
        return cls.from_run(workdir_lib.restore(workdir, mesh_shape, step), eval_batch)

    # -- tokenization (lm-eval's causal-LM conventions) -------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """As training encoded documents (``corpus.encode_text``: no BOS)."""
        return corpus.encode_text(self.tokenizer, text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's ids
        are those of ``context + continuation`` past the context's, so a word keeps its usual token. An
        empty context conditions on the end-of-document token (``eot_id``), the separator the model was trained with."""
        if not continuation:
            raise ScoringError(f"empty continuation for context {context[-60:]!r}: nothing to score")
        if not context:
            return [self.eot_id], self.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:  # the context was only spaces
            return [self.eot_id], self.encode(continuation)
        context_ids = self.encode(context)
        continuation_ids = self.encode(context + continuation)[len(context_ids):]
        if not continuation_ids:  # a merge across the boundary swallowed it; score it on its own
            continuation_ids = self.encode(continuation)
        return context_ids, continuation_ids

    # -- scoring ----------------------------------------------------------------------------------------

    def _run(self, ids_BxL: np.ndarray, targets_BxL: np.ndarray, mask_BxL: np.ndarray):
        f = self.forward
        put = lambda a: jax.make_array_from_callback(a.shape, f.batch_sharding, lambda idx: a[idx])
        with jax.set_mesh(f.mesh):
            out = f.fn(f.params, put(ids_BxL), put(targets_BxL), put(mask_BxL))
        self.forward_calls += 1
        return jax.device_get(out)

    def loglikelihood_tokens(self, requests: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding reproduces it) per request.

        When context + continuation exceed ``seq_len + 1`` tokens, the rightmost ``seq_len + 1`` are kept:
        the context is cut from the left, as lm-eval does."""
        L, B = self.seq_len, self.eval_batch
        rows = []
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise ScoringError(f"request {i}: empty continuation")
            if not ctx:
                raise ScoringError(f"request {i}: empty context (use [eot_id] to condition on nothing)")
            if len(cont) > L:
                raise ScoringError(f"request {i}: the continuation has {len(cont)} tokens, more than "
                                   f"model.seq_len={L}")
            rows.append(((list(ctx) + list(cont))[-(L + 1):], len(cont)))
        results: list[tuple[float, bool]] = []
        for lo in range(0, len(rows), B):
            ids_BxL = np.zeros((B, L), np.int32)
            targets_BxL = np.zeros((B, L), np.int32)
            mask_BxL = np.zeros((B, L), bool)
            chunk = rows[lo:lo + B]
            for r, (tokens, n_cont) in enumerate(chunk):
                n = len(tokens) - 1  # inputs are tokens[:-1], targets tokens[1:]
                ids_BxL[r, :n] = tokens[:-1]
                targets_BxL[r, :n] = tokens[1:]
                mask_BxL[r, n - n_cont:n] = True
            logp_B, greedy_B = self._run(ids_BxL, targets_BxL, mask_BxL)
            results += [(float(logp_B[r]), bool(greedy_B[r])) for r in range(len(chunk))]
        return results

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """lm-eval's ``loglikelihood``: ``pairs`` of (context, continuation) strings."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

    def rolling_windows(self, ids: list[int]) -> list[TokenPair]:
        """lm-eval's disjoint rolling windows (context_len 1): every token is predicted exactly once, the first
        given the end-of-document token, each later window with the fullest context that fits in ``seq_len``."""
        L, windows, done = self.seq_len, [], 0
        while done < len(ids):
            n = min(L, len(ids) - done)
            end = done + n
            context = [self.eot_id] + ids[:done] if done < L else ids[end - L - 1:done]
            windows.append((context[-(L + 1 - n):], ids[done:end]))
            done = end
        return windows

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Sum of every token's log-probability per text (for perplexity), over windows of ``seq_len``."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            if not text:
                raise ScoringError(f"text {i} is empty: nothing to score")
            w = self.rolling_windows(self.encode(text))
            windows += w
            owner += [i] * len(w)
        totals = [0.0] * len(texts)
        for i, (logp, _) in zip(owner, self.loglikelihood_tokens(windows)):
            totals[i] += logp
        return totals

    def generate_until(self, prompts: Sequence[str], until: Sequence[str] = (), max_tokens: int = 32) -> list[str]:
        """Greedy continuation of each prompt by the KV-cache sampler (``sampling.py``), stopped at
        the end-of-document token, at ``max_tokens`` or just before the first of the ``until`` strings. Prompt and
        continuation must fit the context: ``max_tokens`` is capped at ``seq_len - 1`` and a prompt keeps its
        rightmost ``seq_len - max_tokens`` tokens."""
        if self.sampler is None:
            f = self.forward
            self.sampler = Sampler(f.graphdef, f.params, self.tokenizer, f.mesh, self.seq_len, self.dtype,
                                   eos_id=self.eot_id)
        max_tokens = max(1, min(max_tokens, self.seq_len - 1))
        prompt_ids = [(self.encode(p) or [self.eot_id])[-(self.seq_len - max_tokens):] for p in prompts]
        out_BxN = self.sampler.generate_ids(prompt_ids, SamplingConfig(max_new_tokens=max_tokens))
        until = [u for u in until if u]
        texts = []
        for row in out_BxN.tolist():
            ids = row[:row.index(self.eot_id)] if self.eot_id in row else row
            texts.append(_cut(self.decode(ids), until))
        return texts


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cuts = [text.find(u) for u in until if u in text]
    return text[:min(cuts)] if cuts else text
