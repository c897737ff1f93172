"""Host offload: tables and their optimizer state in pinned_host memory, training equal to on-device sparse
training, the dedup/bucket/patch pieces against numpy, and a clear error where host memory is missing."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import mesh_of, tiny_config
from stem_jax import offload
from stem_jax.trainer import Trainer


def test_dedup_host_buckets_and_inverts():
    ids = np.array([[7, 3, 7, 900], [3, 3, 1, 7]], np.int32)
    uniq, inv = offload.dedup_host(ids, fill=1024, cap=8)
    assert uniq.shape == (8,)  # MIN_BUCKET capped at the batch's token count
    np.testing.assert_array_equal(uniq, [1, 3, 7, 900, 1024, 1024, 1024, 1024])
    np.testing.assert_array_equal(uniq[inv], ids)
    assert [offload.bucket(n, 4096) for n in (1, 64, 65, 300, 5000)] == [64, 64, 128, 512, 4096]


def test_patch_replaces_exactly_the_shared_ids():
    uniq = jnp.asarray([2, 5, 9, 50])
    rows = [jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32)]
    new_uniq = jnp.asarray([1, 5, 50, 50])  # 50 doubles as a fill id here
    new = [jnp.arange(12.0).reshape(4, 3), jnp.asarray([10, 11, 12, 13], jnp.int32)]
    out = offload.patch(uniq, rows, new_uniq, new)
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [3, 4, 5], [0, 0, 0], [6, 7, 8]])
    np.testing.assert_array_equal(out[1], [0, 11, 0, 12])


def test_owner_blocks_group_each_row_with_its_owner_and_patch_within_blocks():
    rows = np.array([[900, 3, 7, 3], [130, 7, 1023, 256]], np.int32)  # 4 owners of 256 rows in a 1024-row table
    uniq, at = offload.owner_blocks(rows, 1024, 4, cap=256)
    blocks = uniq.reshape(4, -1)
    assert blocks.shape == (4, 64)  # the largest owner holds 3 rows: MIN_BUCKET slots each
    np.testing.assert_array_equal(uniq[at], rows)
    for d, block in enumerate(blocks):
        real = block[block < 1024]
        np.testing.assert_array_equal(real, np.unique(rows[rows // 256 == d]))  # sorted, owner d's rows only
        assert np.all(block[len(real):] == 1024)
    # Patching blockwise equals patching the whole list where the other list holds the same rows per owner.
    new_uniq, _ = offload.owner_blocks(np.array([[3, 1023, 512]], np.int32), 1024, 4, cap=256)
    vals = np.arange(len(uniq), dtype=np.float32)
    new_vals = 1000 + np.arange(len(new_uniq), dtype=np.float32)
    (got,) = offload.patch_blocks(4, jnp.asarray(uniq), [jnp.asarray(vals)], jnp.asarray(new_uniq),
                                  [jnp.asarray(new_vals)])
    want = vals.copy()
    for row in (3, 1023):  # shared by both lists; 512 is only in the new one
        want[np.flatnonzero(uniq == row)] = new_vals[np.flatnonzero(new_uniq == row)]
    real = uniq < 1024  # fill slots match each other and are never read
    np.testing.assert_array_equal(np.asarray(got)[real], want[real])


def test_offload_needs_host_memory_and_one_process():
    class NoHost:
        platform = "fakeaccel"

        def addressable_memories(self):
            return [type("M", (), {"kind": "device"})()]
    mesh = type("Mesh", (), {"devices": np.array([NoHost()])})()
    with pytest.raises(offload.OffloadError, match="needs the 'pinned_host' memory kind.*offer \\['device'\\]"):
        offload.check_supported(mesh)


def test_offloaded_training_equals_on_device_sparse_training():
    base = tiny_config(n_layers=2, stem_layers="1")
    on_device = dataclasses.replace(base, train=dataclasses.replace(base.train, stem_optimizer="sparse"))
    # The offloaded run also accumulates over 2 microbatches: the update and the loss must not change.
    off = dataclasses.replace(on_device, model=dataclasses.replace(base.model, stem_offload=True),
                              train=dataclasses.replace(on_device.train, microbatches=2))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 1000, (8, 17)).astype(np.int32) for _ in range(20)]

    mesh = mesh_of((2, 2, 2))  # vocab-sharded tables in both runs
    s = Trainer.create(on_device, mesh)
    state, losses = s.init_state(), []
    for b in batches:
        state, m = s.step(state, b)
        losses.append(float(m["loss"]))

    s_off = Trainer.create(off, mesh)
    st, losses_off = s_off.init_state(), []
    host = offload.host_arrays(st)
    assert {a.sharding.memory_kind for a in host} == {"pinned_host"} and len(host) == 4  # table, mu, nu, count
    for i, b in enumerate(batches):
        st, m_off = s_off.step(st, b, batches[i + 1] if i + 1 < len(batches) else None)
        losses_off.append(float(m_off["loss"]))
    np.testing.assert_allclose(losses_off, losses, rtol=1e-6, atol=1e-6)
    for k in ("stem_grad_norm", "param_norm"):
        np.testing.assert_allclose(m_off[k], m[k], rtol=1e-5, err_msg=k)
    for a, b in zip(offload.host_arrays(st), offload.host_arrays(state)):
        assert a.sharding.memory_kind == "pinned_host"
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)  # counts: exactly
    # The device holds no table: every device-memory leaf of the state is a backbone array.
    on_dev = [a for a in jax.tree.leaves(st) if a.sharding.memory_kind == "device"]
    assert all(a.shape[0] != s_off.ctx.tables.rows for a in on_dev if a.ndim)
