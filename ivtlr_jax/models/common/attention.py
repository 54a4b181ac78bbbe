"""Grouped-query attention with a padding/causal mask, plus the one-row attention probabilities that
the IVT-LR latent loop ranks image patches with (docs/method.md section 6, step 1).

Shapes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, layout: str = "bskh"
) -> jax.Array:
    """q [B, T, N, H], k/v in `layout` with S slots, mask [B, T, S] -> [B, T, N, H]. Softmax in fp32."""
    b, t, n, h = q.shape
    k_spec, v_spec = KV_EINSUMS[layout]
    kv_heads = k.shape[k_spec.index("k")]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum(f"btkgh,{k_spec}->bkgts", qg, k, preferred_element_type=acc_dtype(q)) * scale
    logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{v_spec}->btkgh", probs, v)
    return out.reshape(b, t, n, h)


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
