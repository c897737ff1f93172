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
