"""attention.py: which kernel each platform gets, and the splash kernel (run in Pallas' interpret mode on
CPU) against XLA's attention, forward and gradients, sharded over batch and heads, with packed documents."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import mesh_of
from stem_jax import attention
from stem_jax.config import ConfigError


@pytest.mark.parametrize("name,platform,seq_len,dtype,want", [
    ("auto", "tpu", 4096, "bfloat16", "splash"),
    ("auto", "tpu", 100, "bfloat16", "xla"),     # splash tiles are multiples of 128
    ("auto", "gpu", 4096, "bfloat16", "cudnn"),
    ("auto", "gpu", 4096, "float32", "xla"),     # cuDNN's flash attention takes half precision only
    ("auto", "cpu", 4096, "bfloat16", "xla"),
    ("xla", "tpu", 4096, "bfloat16", "xla"),
    ("splash", "tpu", 4096, "float32", "splash"),
])
def test_resolve_picks_by_platform(name, platform, seq_len, dtype, want):
    assert attention.resolve(name, platform, seq_len, dtype) == want


@pytest.mark.parametrize("name,platform,msg", [
    ("splash", "cpu", "model.attention='splash' needs TPU devices, but the devices are 'cpu'; use 'auto'"),
    ("cudnn", "tpu", "model.attention='cudnn' needs GPU devices, but the devices are 'tpu'; use 'auto'"),
    ("flash", "gpu", "model.attention='flash' is not one of"),
])
def test_kernels_off_their_platform_are_named_errors(name, platform, msg):
    with pytest.raises(ConfigError, match=msg):
        attention.resolve(name, platform)


@pytest.mark.parametrize("length", [128, 640, 4096])
def test_splash_tiles_divide_every_length_that_is_a_multiple_of_128(length):
    attention._splash_kernel(2, length, interpret=True)  # raises if a tile does not divide the length


@pytest.mark.parametrize("kv_heads,mesh_shape,packed", [(2, (2, 1, 2), True), (1, (2, 1, 2), False),
                                                         (2, (1, 1, 1), False)])
def test_splash_equals_xla_forward_and_gradients(kv_heads, mesh_shape, packed):
    """Heads split 2 ways with 2 kv heads (each device keeps its group) and packed documents (segment ids
    split like the batch), 1 kv head (repeated per query head before the split), and no mesh (the kernel
    called directly)."""
    B, L, H, K = 4, 128, 4, 32
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(B, L, h, K)), jnp.float32) for h in (H, kv_heads, kv_heads))
    w = jnp.asarray(r.normal(size=(B, L, H, K)), jnp.float32)  # a loss that weighs every output
    segments = None
    if packed:  # documents of every row end at different places; row 3 is one document
        starts_BxL = (r.random((B, L)) < 0.05) & (np.arange(B) < 3)[:, None]
        starts_BxL[0, 0] = True
        segments = jnp.asarray(np.cumsum(starts_BxL, axis=1), jnp.int32)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
    splash = lambda q, k, v: attention.splash(q, k, v, interpret=True, segments_BxL=segments)
    xla = lambda q, k, v: attention.causal(q, k, v, segments_BxL=segments)
    with jax.set_mesh(mesh_of(mesh_shape)):
        got = jax.jit(jax.value_and_grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
        want = jax.jit(jax.value_and_grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for name, a, b in zip("qkv", got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
