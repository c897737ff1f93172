"""How far the bfloat16 table gradient is from the float32 one, per lookup path, on skewed batches.

    python benchmarks/bf16_grads.py [--out benchmarks/bf16_grads.md]      # 8 fake CPU devices, ~1 minute

For each path, the table gradient of ``sum(rows * g)`` where ``rows`` are looked up in bf16 compute
(``dtype=bfloat16``; the cotangent arriving at the rows is ``g`` rounded to bf16, as in a bf16 model) against
the same gradient in float32 compute, on the hottest row (the most frequent token's): relative L2 error.
Paths: the three lookup modes (``stem.lookup``: ``exchange``, ``shard_map`` = masked gather, ``xla``), the
dense step's one exchange for all table layers (``stem.lookup_layers``), and the sparse step's read of
pre-gathered per-device rows (``token_rows`` on ``StemRows(per_device=True)``, as ``steps._row_loss_grads``
reads them; the offloaded step runs the same function on staged rows), whose per-device row gradients the
owners then add in float32 (``exchange.send_back``; added here in float64). Batches: 8 devices x 8,192 tokens,
one token at 75 % of the tokens or Zipf(1.2) ids; cotangents random-sign N(0, 1) or same-sign U(0.5, 1.5).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from stem_jax import sharding  # noqa: E402
from stem_jax.stem import StemFFN, StemRows, lookup, lookup_layers  # noqa: E402

V, F, TOKENS = 8192, 64, 8192  # tokens per device, 8 devices
CASES = [("one token 75 %", "random"), ("Zipf", "random"), ("one token 75 %", "same"), ("Zipf", "same")]


def batch(rng, case: str) -> np.ndarray:
    if case == "Zipf":
        return ((rng.zipf(1.2, (8, TOKENS)) - 1) % V).astype(np.int32)
    ids = rng.integers(0, V, (8, TOKENS))
    ids[rng.random(ids.shape) < 0.75] = 7
    return ids.astype(np.int32)


def rel_err(got_F: np.ndarray, want_F: np.ndarray) -> float:
    return float(np.linalg.norm(got_F - want_F) / np.linalg.norm(want_F))


def main(out: str = "") -> None:
    mesh = sharding.make_mesh((8, 1, 1))
    rng = np.random.default_rng(0)
    results: dict[str, list[float]] = {}
    with jax.set_mesh(mesh):
        ffn = StemFFN(8, F, V, 0.02, rngs=nnx.Rngs(0))
        table = np.asarray(ffn.table[...])
        t = jax.device_put(table, sharding.named(mesh, ("stem_vocab", "stem_dff")))
        grads = {}
        for mode in ("exchange", "shard_map", "xla"):
            grads[mode] = jax.jit(lambda t, i, g, dt, mode=mode: jax.grad(
                lambda t: jnp.sum(lookup(t, i, mode, dt).astype(jnp.float32) * g))(t), static_argnums=3)
        ffn_bf16 = StemFFN(8, F, V, 0.02, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
        graphdef16, state16 = nnx.split([ffn_bf16])
        per_device = jax.jit(lambda rows, inv, i, g: jax.grad(lambda r: jnp.sum(ffn_bf16.token_rows(
            i, StemRows((r,), inv, per_device=True)).astype(jnp.float32) * g))(rows))
        layer_grad = jax.jit(lambda st, i, g: jax.grad(lambda st: jnp.sum(lookup_layers(
            list(nnx.merge(graphdef16, st)), i).per_layer[0].astype(jnp.float32) * g))(st))

        for case, sign in CASES:
            ids = batch(rng, case)
            stored = np.asarray(sharding.stored_rows(ids, V))
            hot = np.bincount(stored.reshape(-1)).argmax()
            g = rng.normal(size=(*ids.shape, F)) if sign == "random" else rng.uniform(0.5, 1.5, (*ids.shape, F))
            g = jnp.asarray(g, jnp.float32)
            i = jax.device_put(ids, sharding.named(mesh, ("batch", "length")))
            at = jax.device_put(stored, sharding.named(mesh, ("batch", "length")))  # lookup reads stored rows
            key = f"{case}, {sign}-sign"
            want = np.asarray(grads["xla"](t, at, g, jnp.float32))[hot]
            for mode in ("exchange", "shard_map", "xla"):
                results.setdefault(mode, []).append(rel_err(np.asarray(grads[mode](t, at, g, jnp.bfloat16))[hot], want))
            got = nnx.merge(graphdef16, layer_grad(state16, i, g))[0].table[...]
            results.setdefault("lookup_layers (dense step)", []).append(rel_err(np.asarray(got)[hot], want))
            blocks = [np.unique(stored[d], return_inverse=True) for d in range(8)]
            rows = np.concatenate([np.pad(table[u], ((0, TOKENS - len(u)), (0, 0))) for u, _ in blocks])
            inv = np.stack([k.reshape(-1) for _, k in blocks]).astype(np.int32)
            row_sh, inv_sh = sharding.named(mesh, ("batch", "stem_dff")), sharding.named(mesh, ("batch", "length"))
            rows_j, inv_j = jax.device_put(rows, row_sh), jax.device_put(inv, inv_sh)
            per_dev = np.asarray(per_device(rows_j, inv_j, i, g), np.float64)
            owner = sum(per_dev[d * TOKENS + np.searchsorted(u, hot)] for d, (u, _) in enumerate(blocks) if hot in u)
            results.setdefault("pre-gathered rows (sparse, offload)", []).append(rel_err(owner, want))
            print(key, {k: f"{v[-1]:.3%}" for k, v in results.items()}, flush=True)

    head = "| path | " + " | ".join(f"{c}, {s}-sign" for c, s in CASES) + " |"
    lines = ["Hottest row's table gradient, bf16 compute against float32, relative L2 error "
             "(`python benchmarks/bf16_grads.py`, 8 fake CPU devices x 8,192 tokens, d_ff 64, vocab 8,192).", "",
             head, "|---|" + "---|" * len(CASES)]
    lines += [f"| {k} | " + " | ".join(f"{x:.3%}" for x in v) + " |" for k, v in results.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "")
