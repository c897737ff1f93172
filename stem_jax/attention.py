"""Causal self-attention kernels behind ``model.attention``, all on the [B, L, H, K] layout.

- ``xla``: ``grouped``, plain batched matmuls and a softmax; it materialises [B, H, L, L] scores.
- ``cudnn``: ``jax.nn.dot_product_attention`` with cuDNN's fused flash attention (GPU, bf16).
- ``splash``: the Pallas TPU splash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``), one
  causal mask per local head, vmapped over each device's batch inside a ``shard_map``. Scores never leave
  VMEM. On CPU it runs only in Pallas' interpret mode (the tests' reference check).

Packed documents (``segments_BxL``, one id per token; ``data.packing``): a query attends only to earlier keys
of its own segment. splash takes the ids as the kernel's ``SegmentIds``; xla ANDs a [B, 1, 1, L, L] same-segment
mask with the causal one; cudnn falls back to xla then (see ``causal``).

``auto`` picks by the platform of the mesh's devices (``resolve``), so an ahead-of-time compile for a TPU
topology on a CPU host gets the TPU kernel. Decoding with a KV cache always uses ``xla`` (its mask is
per-row padding, not a plain causal one).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from stem_jax import sharding
from stem_jax.config import ATTENTION, ConfigError

AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
NEEDS = {"splash": ("tpu",), "cudnn": ("gpu", "cuda")}
SPLASH_BLOCK = 512  # q and kv tile length at most


def resolve(name: str, platform: str, seq_len: int | None = None, dtype: str = "bfloat16") -> str:
    """The kernel ``model.attention=name`` means on ``platform`` ('cpu', 'gpu', 'tpu'). ``auto`` takes the
    platform's fused kernel when it applies (splash: ``seq_len`` a multiple of 128; cudnn: bf16), else xla."""
    if name not in ATTENTION:
        raise ConfigError(f"model.attention={name!r} is not one of {ATTENTION}")
    if name == "auto":
        best = AUTO.get(platform, "xla")
        if best == "splash" and seq_len is not None and seq_len % 128:
            return "xla"
        return "xla" if best == "cudnn" and dtype != "bfloat16" else best
    if name in NEEDS and platform not in NEEDS[name]:
        raise ConfigError(f"model.attention={name!r} needs {NEEDS[name][0].upper()} devices, but the devices are "
                          f"{platform!r}; use 'auto' (picks by platform) or 'xla'")
    return name


def causal(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, impl: str = "xla",
           segments_BxL: jax.Array | None = None) -> jax.Array:
    """Causal grouped-query attention (H query heads share G kv heads), softmax scale K**-0.5. With
    ``segments_BxL``, a query sees only the keys of its own segment too.

    cudnn with segments runs the xla implementation: ``jax.nn.dot_product_attention`` hands cuDNN a mask as an
    additive bias and always asks for its gradient, which cuDNN gives only for a bias of batch 1
    (jax-ml/jax#30593); the per-row [B, 1, L, L] one would fail in the backward pass."""
    L = q_BxLxHxK.shape[1]
    if impl == "splash" and L % 128 == 0:
        return splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segments_BxL=segments_BxL)
    if impl == "cudnn" and segments_BxL is None:
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=True, implementation="cudnn")
    return grouped(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segments_BxL)


def grouped(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
            segments_BxL: jax.Array | None = None) -> jax.Array:
    """The ``xla`` kernel: scores as one batched matmul per (batch, kv head) over the R = H / G query heads
    that share it, [B*G, R*L, K] x [B*G, K, L], so that XLA sees leading batch dims; softmax in fp32.
    (``jax.nn.dot_product_attention``'s XLA path vmaps einsums with the heads inside and paid for the layout
    copies: docs/performance.md.)"""
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    R = H // G
    q_NxRLxK = (q_BxLxHxK * K ** -0.5).reshape(B, L, G, R, K).transpose(0, 2, 3, 1, 4).reshape(B * G, R * L, K)
    k_NxLxK = k_BxLxGxK.transpose(0, 2, 1, 3).reshape(B * G, L, K)
    v_NxLxK = v_BxLxGxK.transpose(0, 2, 1, 3).reshape(B * G, L, K)
    s_BxGxRxLxL = jnp.matmul(q_NxRLxK, k_NxLxK.transpose(0, 2, 1)).reshape(B, G, R, L, L).astype(jnp.float32)
    ok_LxL = jnp.tril(jnp.ones((L, L), bool))
    if segments_BxL is not None:
        ok_LxL = ok_LxL & (segments_BxL[:, :, None] == segments_BxL[:, None, :])[:, None, None]
    p = jax.nn.softmax(jnp.where(ok_LxL, s_BxGxRxLxL, -1e30), axis=-1).astype(q_BxLxHxK.dtype)
    o_NxRLxK = jnp.matmul(p.reshape(B * G, R * L, L), v_NxLxK)
    return o_NxRLxK.reshape(B, G, R, L, K).transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


def _splash_kernel(heads: int, length: int, interpret: bool):
    """Built inside each trace: the kernel holds its mask tables as arrays, which must not outlive a trace."""
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length)) for _ in range(heads)])
    b = math.gcd(SPLASH_BLOCK, length)  # a tile divides the length; lengths are multiples of 128
    blocks = splash_kernel.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                      block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return splash_kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                         interpret=interpret)


def splash(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, interpret: bool = False,
           segments_BxL: jax.Array | None = None) -> jax.Array:
    """Causal attention through the splash kernel, per device (batch and heads split as the activations);
    with ``segments_BxL``, within each segment (the kernel's ``SegmentIds``, split like the batch)."""
    H, G, K = q_BxLxHxK.shape[2], k_BxLxGxK.shape[2], q_BxLxHxK.shape[3]
    mesh = jax.sharding.get_abstract_mesh()
    q_spec = k_spec = None
    if not mesh.empty:
        q_spec = sharding.fitted_spec(("batch", "length", "act_heads", None), q_BxLxHxK.shape, mesh)
        k_spec = sharding.fitted_spec(("batch", "length", "act_heads", None), k_BxLxGxK.shape, mesh)
        if q_spec[2] != k_spec[2]:  # kv heads not split like the query heads: give every query head its own
            k_BxLxGxK, v_BxLxGxK = (jnp.repeat(a, H // G, axis=2) for a in (k_BxLxGxK, v_BxLxGxK))
            k_spec = q_spec

    def local(q, k, v, segments):
        kernel = _splash_kernel(q.shape[2], q.shape[1], interpret)
        heads_first = lambda a: a.transpose(0, 2, 1, 3)
        ids = None if segments is None else splash_kernel.SegmentIds(q=segments, kv=segments)
        out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(
            heads_first(q * jnp.asarray(K ** -0.5, q.dtype)), heads_first(k), heads_first(v), ids)
        return heads_first(out).astype(q.dtype)

    segments = None if segments_BxL is None else segments_BxL.astype(jnp.int32)
    if mesh.empty:
        return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segments)
    segment_spec = None if segments is None else P(*q_spec[:2])  # each device's rows, whole length
    return jax.shard_map(local, in_specs=(q_spec, k_spec, k_spec, segment_spec), out_specs=q_spec,
                         check_vma=False)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segments)
