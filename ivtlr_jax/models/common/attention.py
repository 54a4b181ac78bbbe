"""Grouped-query attention with a padding/causal mask, plus the one-row attention probabilities that
the IVT-LR latent loop ranks image patches with (docs/method.md section 6, step 1).

Two implementations of the full attention, chosen by the model option `attention_impl`:
- "xla" (default): explicit einsums over the keys/values in the layout they come in (the KV cache's is
  read without a transpose), fp32 softmax;
- "fused": `jax.nn.dot_product_attention`, with `implementation="cudnn"` (cuDNN's fused flash kernel)
  where `cudnn_fits` says so (GPU, bf16/fp16, a head dim cuDNN takes, even T and S), else JAX's own XLA
  implementation (CPU, fp32). It takes keys/values [B, S, K, H], so a cache layer is read through a
  transpose (the cache keeps one layout whichever implementation reads it; kv_cache.py); on a GPU, cache
  reads cuDNN does not take (one decoding token) stay on the einsums instead.
The one-row probabilities (`row_attention_probs`) are always the exact einsum path.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from .choices import names
from .kv_cache import K_SPEC, V_SPEC
from .layers import acc_dtype

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


def causal_mask(query_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
    """[B, T, S] bool: query at slot t sees key slot s when s <= t and the key is not padding.

    query_slots: [T] or [B, T] absolute slot index of each query in the key sequence.
    key_valid: [B, S] bool, False on padding and on cache slots not written yet.
    """
    key_slots = jnp.arange(key_valid.shape[1])
    if query_slots.ndim == 1:
        query_slots = query_slots[None]
    return (key_slots[None, None, :] <= query_slots[:, :, None]) & key_valid[:, None, :]


# key/value layouts -> (key spec, value spec): "bskh" as projected ([B, S, K, H] both); "cache" one layer
# of the KV cache, which owns that layout (kv_cache.py)
KV_EINSUMS = {"bskh": ("bskh", "bskh"), "cache": (K_SPEC, V_SPEC)}




class AttentionImpl(enum.StrEnum):
    """The model option `attention_impl` (module docstring)."""
    XLA = "xla"
    FUSED = "fused"


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # 256 from Hopper on; 128 holds on every GPU cuDNN's flash kernel runs on


def cudnn_fits(q: jax.Array, s: int) -> bool:
    """Whether cuDNN's fused kernel takes q [B, T, N, H] over S keys: on a GPU backend, bf16/fp16, H a
    multiple of 8 up to CUDNN_MAX_HEAD_DIM, and T and S even (cuDNN refuses odd lengths with a mask when
    differentiated, which is not known when the forward is traced)."""
    _, t, _, h = q.shape
    return (jax.default_backend() == "gpu" and q.dtype in CUDNN_DTYPES and h % 8 == 0
            and h <= CUDNN_MAX_HEAD_DIM and t % 2 == 0 and s % 2 == 0)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float, layout: str = "bskh",
    impl: AttentionImpl = AttentionImpl.XLA,
) -> jax.Array:
    """q [B, T, N, H], k/v in `layout` with S slots, mask [B, T, S] (or [1, T, S]; None: every query sees
    every key) -> [B, T, N, H]. Softmax in fp32. impl: an AttentionImpl (module docstring)."""
    if impl == "fused":
        return fused_attention(q, k, v, mask, scale, layout)
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {names(AttentionImpl)}")
    b, t, n, h = q.shape
    k_spec, v_spec = KV_EINSUMS[layout]
    kv_heads = k.shape[k_spec.index("k")]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum(f"btkgh,{k_spec}->bkgts", qg, k, preferred_element_type=acc_dtype(q)) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{v_spec}->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float, layout: str = "bskh"
) -> jax.Array:
    """`dot_product_attention` through `jax.nn.dot_product_attention` (cuDNN where `cudnn_fits`, else
    XLA). Keys/values in the cache layout are transposed to [B, S, K, H] first. On a GPU, a cache read
    cuDNN does not take (one decoding token: odd T) stays on the einsums, which read the cache layout
    as it is: JAX's XLA attention would compute the same after a copy of the layer's cache per step.
    (On CPU it goes through JAX's XLA attention, so that the call is what the tests exercise.)"""
    k_spec, v_spec = KV_EINSUMS[layout]
    fits = cudnn_fits(q, k.shape[k_spec.index("s")])
    if not fits and layout != "bskh" and jax.default_backend() == "gpu":
        return dot_product_attention(q, k, v, mask, scale, layout, impl="xla")
    k = jnp.einsum(f"{k_spec}->bskh", k).astype(q.dtype)  # [B, S, K, H]
    v = jnp.einsum(f"{v_spec}->bskh", v).astype(q.dtype)
    implementation = "cudnn" if fits else "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],  # [B, 1, T, S]
                                        scale=scale, implementation=implementation)


def row_attention_probs(
    q: jax.Array, k: jax.Array, mask: jax.Array, rows: jax.Array, scale: float, layout: str = "bskh"
) -> jax.Array:
    """Attention probabilities of one query row per example, averaged over heads: [B, S] fp32.

    rows: [B] index into the T queries. Costs one [B, N, S] logit block, never the [T, S] matrix.
    """
    b, t, n, h = q.shape
    k_spec = KV_EINSUMS[layout][0]
    kv_heads = k.shape[k_spec.index("k")]
    q_row = jnp.take_along_axis(q, rows[:, None, None, None], axis=1)[:, 0]  # [B, N, H]
    mask_row = jnp.take_along_axis(mask, rows[:, None, None], axis=1)[:, 0]  # [B, S]
    q_row = q_row.reshape(b, kv_heads, n // kv_heads, h)
    logits = jnp.einsum(f"bkgh,{k_spec}->bkgs", q_row, k, preferred_element_type=acc_dtype(q)) * scale
    logits = jnp.where(mask_row[:, None, None, :], logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1).mean(axis=(1, 2))
