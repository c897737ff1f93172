"""The row-owner exchange lookup: exact against numpy (rows and table gradient) on every mesh and on
adversarial batches, whatever the capacity; and its compiled collectives stay at the local batch's size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import lookup_comm
from conftest import mesh_of, run_script
from stem_jax import exchange, sharding
from stem_jax.stem import lookup

V, F, B, L = 1000, 16, 8, 12  # V pads to 1024 rows: 128 per device on 8 devices


def _batches(rng):
    """name -> [B, L] ids: random, all one id, all owned by one device, all distinct, edges of the table."""
    edges = np.array([0, V - 1, 127, 128, 511, 512, 895, 896], np.int32)  # shard boundaries on 8 and 4 shards
    return {
        "random": rng.integers(0, V, size=(B, L)),
        "one id": np.full((B, L), 7),
        "one owner": rng.integers(896, V, size=(B, L)),  # the last of 8 shards (rows 896..1023)
        "distinct": rng.permutation(V)[:B * L].reshape(B, L),
        "edges": np.resize(edges, (B, L)),
    }


@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 1, 1), (2, 4, 1), (4, 2, 1), (2, 2, 2)])
def test_exchange_matches_numpy_forward_and_grad(shape):
    mesh = mesh_of(shape)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(sharding.padded_rows(V, mesh=mesh), F)).astype(np.float32)
    table[V:] = 0
    with jax.set_mesh(mesh):
        t = jax.device_put(table, sharding.named(mesh, ("stem_vocab", "stem_dff")))
        for capacity in (0.5, 0.01):  # 0.01: one slot per owner, so most batches need several rounds
            fwd_bwd = jax.jit(lambda t, i, w: jax.value_and_grad(
                lambda t: jnp.sum(lookup(t, i, "exchange", capacity=capacity) * w))(t)[1])
            rows_fn = jax.jit(lambda t, i: lookup(t, i, "exchange", capacity=capacity))
            for name, ids in _batches(rng).items():
                ids = ids.astype(np.int32)
                w = rng.normal(size=(B, L, F)).astype(np.float32)
                want_grad = np.zeros_like(table)
                np.add.at(want_grad, ids.reshape(-1), w.reshape(-1, F))
                i = jax.device_put(ids, sharding.named(mesh, ("batch", "length")))
                np.testing.assert_array_equal(np.asarray(rows_fn(t, i)), table[ids], err_msg=name)
                grad = fwd_bwd(t, i, w)
                np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-5, err_msg=name)
                assert grad.sharding.is_equivalent_to(t.sharding, 2)  # the gradient stays on the owners


def test_bfloat16_rows_and_unsharded_ids_fall_back():
    mesh = mesh_of((8, 1, 1))
    table = np.random.default_rng(1).normal(size=(1024, F)).astype(np.float32)
    ids = np.array([[3, 900, 3]], np.int32)  # one row: not split over the 8 shards -> masked gather
    with jax.set_mesh(mesh):
        t = jax.device_put(table, sharding.named(mesh, ("stem_vocab", "stem_dff")))
        got = jax.jit(lambda t, i: lookup(t, i, "exchange", jnp.bfloat16))(t, jnp.asarray(ids))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), table[ids].astype(jnp.bfloat16))


def test_slots():
    assert exchange.slots(256, 8, 0.5) == 16
    assert exchange.slots(256, 64, 0.5) == 2
    assert exchange.slots(6, 8, 0.01) == 1  # never zero


# The pod-scale claim, from the compiled program: no collective of the lookup's forward + backward holds
# more than twice the local batch's rows, at 8 devices here and 16 in a subprocess; the masked gather
# of the whole batch (the control) does.
def largest_sparse_collective(n: int, path: str) -> tuple[int, int]:
    """(largest collective result, local unique rows bound = local tokens x d_ff x 4) of the sparse step's
    table half on n devices."""
    mesh = sharding.make_mesh((n, 1, 1), jax.devices()[:n])
    hlo = lookup_comm.sparse_table_program(mesh, path, 2 * n, 128, 8192, 64).as_text()
    return max(c.result_bytes for c in lookup_comm.collectives(hlo)), 2 * 128 * 64 * 4


def test_exchange_collectives_stay_at_local_batch_size():
    largest, bound = lookup_comm.largest_collective(8, "exchange")
    assert largest <= bound, (largest, bound)
    largest, bound = lookup_comm.largest_collective(8, "shard_map")
    assert largest > bound, "control: the masked gather moves the whole batch's rows"
    # The sparse optimizer's table half: no collective beyond the local unique rows; the replicated path
    # it replaced (global dedup, [U, d_ff] on every device) is the control.
    largest, bound = largest_sparse_collective(8, "exchange")
    assert largest <= bound, (largest, bound)
    largest, bound = largest_sparse_collective(8, "replicated")
    assert largest > bound, (largest, bound)


def test_exchange_collectives_at_16_devices(tmp_path, cache_dir):
    code = ("from benchmarks.lookup_comm import largest_collective as c, sparse_table_program, collectives\n"
            "from stem_jax import sharding\n"
            "import jax\n"
            "m = sharding.make_mesh((16, 1, 1))\n"
            "big = lambda p: max(x.result_bytes for x in collectives(sparse_table_program(m, p, 32, 128, 8192, 64).as_text()))\n"
            "print(*c(16, 'exchange'), c(16, 'shard_map')[0], big('exchange'), big('replicated'))\n")
    script = tmp_path / "hlo16.py"
    script.write_text(code)
    out = run_script(script, cache_dir=cache_dir, devices=16, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ex, bound, masked, sparse_ex, sparse_rep = map(int, out.stdout.split()[-5:])
    assert ex <= bound < masked, (ex, bound, masked)
    assert sparse_ex <= bound // 2 < sparse_rep, (sparse_ex, bound, sparse_rep)  # bound // 2: local rows once


# ---- bfloat16 compute: table gradients are summed in float32 ----
# Each cotangent below is a bfloat16 number (as it arrives under bf16 compute), so the exact gradient of row r
# is the float64 sum S_r of its n_r cotangents g_i. Any order of the n_r - 1 float32 additions that a segment
# sum, a scatter-add and the owners' sums make stays within (n_r - 1) * 2^-24 * sum|g_i| of S_r (the standard
# bound for recursive summation, whatever the tree). That is the tolerance. A bfloat16 accumulator (unit
# roundoff 2^-8, 2^16 times larger) misses it by far: with same-sign cotangents it stops registering an
# addend once its total is ~256 times larger, so the hottest row of a skewed batch loses most of its sum.
U32 = 2.0 ** -24
TOKENS = 64 * 8  # per device, on 8 devices


def _skewed(rng, case: str) -> np.ndarray:
    """[8, 512] ids: one token at 75 % of every device's tokens, or Zipf(1.2) ids."""
    if case == "hot":
        ids = rng.integers(0, V, (8, TOKENS))
        ids[rng.random(ids.shape) < 0.75] = 7
        return ids.astype(np.int32)
    return ((rng.zipf(1.2, (8, TOKENS)) - 1) % V).astype(np.int32)


def _cotangent(rng, shape, sign: str) -> np.ndarray:
    g = rng.normal(size=shape) if sign == "random" else rng.uniform(0.5, 1.5, shape)
    return np.asarray(jnp.asarray(g, jnp.bfloat16).astype(jnp.float32))  # bf16 values, held in float32


def _check_row_sums(got, keys, g, n_rows, what):
    """``got[r]`` against the float64 sums of the cotangent rows ``g`` whose key is r, within the bound."""
    want = np.zeros((n_rows, g.shape[-1]))
    absum = np.zeros_like(want)
    count = np.zeros(n_rows)
    np.add.at(want, keys, g.astype(np.float64))
    np.add.at(absum, keys, np.abs(g))
    np.add.at(count, keys, 1)
    bound = np.maximum(count - 1, 0)[:, None] * U32 * absum + 1e-30
    err = np.abs(np.asarray(got, np.float64) - want)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (f"{what}: row {worst[0]} ({int(count[worst[0]])} tokens) off by "
                                  f"{err[worst]:.3g}, bound {bound[worst]:.3g}, sum {want[worst]:.4g}")


@pytest.mark.parametrize("mode", ["exchange", "shard_map", "xla"])
def test_bfloat16_lookup_gradients_sum_in_float32(mode):
    """Every lookup mode in bf16 on 8 devices: rows are the table's rows rounded to bf16, and the table
    gradient is the float32 sum of the bf16 cotangents within the derived bound, on a batch with one token at
    75 % and on a Zipf batch, with random-sign and same-sign cotangents."""
    mesh = mesh_of((8, 1, 1))
    rng = np.random.default_rng(3)
    table = rng.normal(size=(1024, F)).astype(np.float32)
    table[V:] = 0
    with jax.set_mesh(mesh):
        t = jax.device_put(table, sharding.named(mesh, ("stem_vocab", "stem_dff")))
        fwd_bwd = jax.jit(lambda t, i, g: jax.value_and_grad(
            lambda t: jnp.sum(lookup(t, i, mode, jnp.bfloat16).astype(jnp.float32) * g))(t))
        rows_fn = jax.jit(lambda t, i: lookup(t, i, mode, jnp.bfloat16))
        for case in ("hot", "zipf"):
            ids = _skewed(rng, case)
            i = jax.device_put(ids, sharding.named(mesh, ("batch", "length")))
            np.testing.assert_array_equal(np.asarray(rows_fn(t, i)), np.asarray(jnp.asarray(table[ids], jnp.bfloat16)))
            for sign in ("random", "same"):
                g = _cotangent(rng, (*ids.shape, F), sign)
                _, grad = fwd_bwd(t, i, g)
                _check_row_sums(grad, ids.reshape(-1), g.reshape(-1, F), 1024, f"{mode} {case} {sign}")


def test_bfloat16_layer_lookup_and_per_device_rows_sum_in_float32():
    """The dense step's one exchange for all table layers (``lookup_layers``) and the sparse and offloaded
    steps' read of pre-gathered rows (``StemRows(per_device=True)``, through ``token_rows`` as
    ``steps._row_loss_grads`` reads them): bf16 outputs, float32 gradient sums within the bound."""
    from flax import nnx
    from stem_jax.stem import StemFFN, StemRows, lookup_layers
    mesh = mesh_of((8, 1, 1))
    rng = np.random.default_rng(4)
    with jax.set_mesh(mesh):
        ffns = [StemFFN(8, F, V, 0.02, rngs=nnx.Rngs(k), table_index=k, dtype=jnp.bfloat16) for k in range(2)]
        tables = [np.asarray(f.table[...]) for f in ffns]
        graphdef, state = nnx.split(ffns)
        layers = jax.jit(lambda st, i, gs: jax.grad(lambda st: sum(
            jnp.sum(u.astype(jnp.float32) * g) for u, g in zip(
                lookup_layers(nnx.merge(graphdef, st), i).per_layer, gs)))(st))

        def per_device(rows, inv, i, g):  # gradient w.r.t. each device's block of unique rows
            read = lambda r: jnp.sum(ffns[0].token_rows(i, StemRows((r,), inv, per_device=True)).astype(
                jnp.float32) * g)
            return jax.grad(read)(rows)
        per_device = jax.jit(per_device)
        for case in ("hot", "zipf"):
            ids = _skewed(rng, case)
            stored = np.asarray(sharding.stored_rows(ids, V))
            i = jax.device_put(ids, sharding.named(mesh, ("batch", "length")))
            # each device's unique stored rows (padded to its token count) and its inverse into them
            blocks = [np.unique(stored[d], return_inverse=True) for d in range(8)]
            rows = np.concatenate([np.pad(tables[0][u], ((0, TOKENS - len(u)), (0, 0))) for u, _ in blocks])
            inv = np.stack([k.reshape(-1) for _, k in blocks]).astype(np.int32)
            for sign in ("random", "same"):
                gs = [_cotangent(rng, (*ids.shape, F), sign) for _ in ffns]
                grads = layers(state, i, gs)
                for k, g in enumerate(gs):
                    got = np.asarray(nnx.merge(graphdef, grads)[k].table[...])
                    _check_row_sums(got, stored.reshape(-1), g.reshape(-1, F), 1024, f"layers {k} {case} {sign}")
                got = np.asarray(per_device(jax.device_put(rows, sharding.named(mesh, ("batch", "stem_dff"))),
                                            jax.device_put(inv, sharding.named(mesh, ("batch", "length"))), i, gs[0]))
                keys = (np.arange(8)[:, None] * TOKENS + inv).reshape(-1)  # device d's slot u -> d * T + u
                _check_row_sums(got, keys, gs[0].reshape(-1, F), 8 * TOKENS, f"per-device rows {case} {sign}")
