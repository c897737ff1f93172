"""Backbone building blocks: parameter init, RMSNorm, rotary embeddings, the dense SwiGLU FFN."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stem_jax import sharding


def param(rngs: nnx.Rngs, shape: Sequence[int], logical_axes: Sequence[str | None], std: float) -> nnx.Param:
    """fp32 parameter, truncated normal at +-3 sigma (Lingua's init), tagged with logical axes."""
    init = jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), logical_axes=tuple(logical_axes))


def matrix_std(init_std: float, fan_in: int) -> float:
    """``init_std`` for every matrix when set (the paper's configs use 0.02); else Lingua's fan_in**-0.5."""
    return init_std if init_std > 0 else fan_in ** -0.5


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BxLxD.dtype)


def rope(x_BxLxHxK: jax.Array, theta: float, positions_BxL: jax.Array | None = None) -> jax.Array:
    """Rotary embedding, half-split layout (Hugging Face Llama's ``rotate_half``) so exports stay exact.
    Positions default to 0..L-1; decoding passes each row's own positions (prompts are left-padded)."""
    L, K = x_BxLxHxK.shape[1], x_BxLxHxK.shape[-1]
    inv_freq_K2 = theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    pos_BxL = jnp.arange(L)[None, :] if positions_BxL is None else positions_BxL
    angle_BxLxK2 = pos_BxL[..., None].astype(jnp.float32) * inv_freq_K2
    cos_LxK = jnp.cos(jnp.concatenate([angle_BxLxK2, angle_BxLxK2], axis=-1))[:, :, None, :]
    sin_LxK = jnp.sin(jnp.concatenate([angle_BxLxK2, angle_BxLxK2], axis=-1))[:, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    # Cast back: fp32 q/k would make attention reject bf16 values.
    return (x * cos_LxK + rotated * sin_LxK).astype(x_BxLxHxK.dtype)


# Platforms where ``project`` runs as one 2-D matmul over the flattened tokens. On XLA:CPU that saves the
# weight gradient a transposed copy of the activation gradient (d512 train step 0.86x, docs/performance.md);
# on XLA:TPU the einsum form compiles to the smaller program (stem_350m on v5p-64: the flattened form kept
# every layer's 128-lane splash logsumexp residual until the backward, +15 GiB per chip; docs/performance.md).
FLATTEN_ON = ("cpu",)


def platform() -> str:
    """The platform being traced for: the current mesh's devices (a TPU topology compiled on a CPU host is
    'tpu'), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def project(x: jax.Array, w: nnx.Param, eq: str, dtype, out_axes: Sequence[str | None]) -> jax.Array:
    """``einsum(eq, x, w)`` with the fp32 parameter cast to the compute dtype, output constrained by logical
    axes. ``eq`` contracts x's trailing dims with w's leading dims, in order (``bld,dhk->blhk``). On the
    platforms of ``FLATTEN_ON`` it is computed as one 2-D matmul over the flattened tokens: the weight
    gradient is then a plain [tokens, in] x [tokens, out] contraction, where the einsum's two contracted dims
    (b, l) made XLA:CPU transpose the whole activation gradient first."""
    w_ = w[...].astype(dtype)
    ins, out_dims = eq.split("->")
    x_dims, w_dims = ins.split(",")
    k = len(x_dims) - len(set(x_dims) - set(w_dims))  # contracted dims: x's last k, w's first k
    if x_dims[-k:] != w_dims[:k] or out_dims != x_dims[:-k] + w_dims[k:]:
        raise ValueError(f"project: {eq!r} must contract x's trailing dims with w's leading dims, in order")
    if platform() not in FLATTEN_ON:
        return sharding.constrain(jnp.einsum(eq, x, w_), out_axes)
    lead, rest = x.shape[:-k], w_.shape[k:]
    y = jnp.dot(x.reshape(-1, math.prod(x.shape[-k:])), w_.reshape(math.prod(w_.shape[:k]), -1))
    return sharding.constrain(y.reshape(*lead, *rest), out_axes)


class DenseFFN(nnx.Module):
    """SwiGLU: ``y = W_down(SiLU(W_gate x) * (W_up x))``."""

    def __init__(self, d_model: int, d_ff: int, init_std: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), matrix_std(init_std, d_model))
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), matrix_std(init_std, d_model))
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), matrix_std(init_std, d_ff))
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array, ids_BxL: jax.Array | None = None, rows=None, edit=None) -> jax.Array:
        """``rows`` and ``edit`` (``stem.StemRows``, ``stem.RowEdit``) concern table layers only."""
        act = ("batch", "length", "act_mlp")
        gate_BxLxF = project(x_BxLxD, self.w_gate, "bld,df->blf", self.dtype, act)
        up_BxLxF = project(x_BxLxD, self.w_up, "bld,df->blf", self.dtype, act)
        return project(jax.nn.silu(gate_BxLxF) * up_BxLxF, self.w_down, "blf,fd->bld", self.dtype,
                       ("batch", "length", "act_embed"))
