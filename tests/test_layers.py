"""layers.project against numpy, forward and weight gradient, the HLO of its backward on a CPU, and its form
per platform."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stem_jax import layers
from stem_jax.layers import project


@pytest.mark.parametrize("eq, x_shape, w_shape", [
    ("bld,df->blf", (2, 3, 4), (4, 5)),
    ("bld,dhk->blhk", (2, 3, 4), (4, 2, 3)),
    ("blhk,hkd->bld", (2, 3, 2, 3), (2, 3, 4)),
])
def test_project_is_the_einsum_forward_and_backward(eq, x_shape, w_shape):
    r = np.random.default_rng(0)
    x, w = r.normal(size=x_shape).astype(np.float32), r.normal(size=w_shape).astype(np.float32)
    out_shape = np.einsum(eq, x, w).shape
    g = r.normal(size=out_shape).astype(np.float32)  # d loss / d out for loss = sum(out * g)
    loss = lambda x, w: jnp.sum(project(x, nnx.Param(w), eq, jnp.float32, (None,) * len(out_shape)) * g)
    dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    np.testing.assert_allclose(project(jnp.asarray(x), nnx.Param(jnp.asarray(w)), eq, jnp.float32,
                                       (None,) * len(out_shape)), np.einsum(eq, x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum(f"{xs},{out}->{ws}", x, g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.einsum(f"{out},{ws}->{xs}", g, w), rtol=1e-5, atol=1e-5)


def test_project_refuses_an_equation_it_cannot_flatten():
    with pytest.raises(ValueError, match="trailing dims"):
        project(jnp.ones((2, 3, 2, 3)), nnx.Param(jnp.ones((2, 3, 4))), "bhlk,hkd->bld", jnp.float32, (None,) * 3)


def test_weight_gradient_needs_no_transposed_copy_of_the_activation_gradient():
    """The reason for flattening: with the einsum's two contracted token dims, XLA:CPU transposed the
    [B, L, F] gradient into [F, B, L] before the weight-gradient matmul (docs/performance.md)."""
    x, w = jnp.ones((4, 8, 16)), jnp.ones((16, 32))
    loss = lambda w: jnp.sum(jax.nn.silu(project(x, nnx.Param(w), "bld,df->blf", jnp.float32, (None,) * 3)) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
    assert not re.findall(r"= f32\[\d+,\d+,\d+\]\{[\d,]+\} (?:transpose|copy)\(", hlo)


def abstract_mesh(platform: str) -> jax.sharding.AbstractMesh:
    """A mesh of one device of ``platform``, abstract: tracing for a TPU needs no TPU (nor libtpu)."""
    from jax._src.mesh import AbstractDevice  # public AbstractMesh takes it; the class itself is not exported
    return jax.sharding.AbstractMesh((1, 1, 1), ("data", "fsdp", "tensor"),
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3,
                                     abstract_device=AbstractDevice(platform.upper(), None, platform))


@pytest.mark.parametrize("platform, flat", [("cpu", True), ("tpu", False), (None, True)])
def test_project_flattens_only_where_it_pays(platform, flat):
    """One 2-D matmul over the flattened tokens on the CPU (the mesh's platform, or the default backend
    without a mesh); the einsum's dot_general on TPU, whose compiled step the flattening made larger."""
    x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 2, 3))
    f = lambda x, w: project(x, nnx.Param(w), "bld,dhk->blhk", jnp.float32, (None,) * 4)
    if platform is None:
        jaxpr = jax.make_jaxpr(f)(x, w)
    else:
        with jax.sharding.use_abstract_mesh(abstract_mesh(platform)):
            assert layers.platform() == platform
            jaxpr = jax.make_jaxpr(f)(x, w)
    prims = [e.primitive.name for e in jaxpr.eqns]
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1
    assert dots[0].invars[0].aval.shape == ((6, 4) if flat else (2, 3, 4))
    assert ("reshape" in prims) == flat
