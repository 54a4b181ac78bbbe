"""A fixed-size KV cache for all layers, written chunk by chunk (prefill, latent passes, decoding).

The cache owns its layout: `K_SPEC` / `V_SPEC` are the einsum specs of one layer's keys and values (the
stacked arrays put the layer axis L in front), and every write goes through `to_cache_layout` +
`write_chunk`. The layouts are the ones the attention dots read without a transpose (on XLA CPU a
per-layer, per-step copy of the whole cache otherwise: ~60% of a batch-32 decoding step): keys
[L, B, K, S, H] (kv-head major), values [L, B, K, H, S] (slots minor). The layout is the same whichever
attention implementation the model runs: attention_impl="fused" reads a layer through a transpose to
[B, S, K, H] (attention.py), so a cache passes between the latent loop and generation without their
knowing the model's option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

K_SPEC = "bksh"  # one layer's keys [B, K, S, H]
V_SPEC = "bkhs"  # one layer's values [B, K, H, S]


def _slot_axis(x: jax.Array, spec: str) -> int:
    """The S axis of x, which holds `spec`'s axes last (after any leading ones, such as L)."""
    return x.ndim - len(spec) + spec.index("s")


def to_cache_layout(k: jax.Array, v: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """A chunk's keys and values [B, T, K, H] (as projected) -> the cache layout and dtype: keys
    [B, K, T, H], values [B, K, H, T]."""
    return jnp.einsum(f"bskh->{K_SPEC}", k).astype(dtype), jnp.einsum(f"bskh->{V_SPEC}", v).astype(dtype)


def write_chunk(k_cache: jax.Array, v_cache: jax.Array, k_chunk: jax.Array, v_chunk: jax.Array,
                index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write a chunk of T slots, already in the cache layout (`to_cache_layout`), at slot `index`: [] int32
    (every row at the same slot), or [B] (each row at its own: continuous batching, `KVCache.end`).

    Works on one layer's arrays (k_cache [B, K, S, H], chunk [B, K, T, H]; values likewise) and on the
    stacked ones (a leading L on both)."""
    def write(cache, chunk, spec):
        slot_axis = _slot_axis(cache, spec)
        if index.ndim == 0:
            return write_at(cache, chunk, {slot_axis: index})
        # per row: one in-place dynamic_update_slice per row (a vmapped one is a scatter that copies the cache)
        batch_axis = cache.ndim - len(spec) + spec.index("b")

        def row(b, cache):
            piece = jax.lax.dynamic_slice_in_dim(chunk, b, 1, axis=batch_axis)
            return write_at(cache, piece, {batch_axis: b, slot_axis: index[b]})

        return jax.lax.fori_loop(0, index.shape[0], row, cache)

    def write_at(cache, chunk, starts_at):
        starts = [jnp.zeros((), jnp.int32)] * cache.ndim
        for axis, start in starts_at.items():
            starts[axis] = jnp.asarray(start, jnp.int32)
        return jax.lax.dynamic_update_slice(cache, chunk, starts)

    return write(k_cache, k_chunk, K_SPEC), write(v_cache, v_chunk, V_SPEC)


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H] (K_SPEC)
    v: jax.Array  # [L, B, K, H, S] (V_SPEC)
    valid: jax.Array  # [B, S] bool: slot written and not padding
    end: jax.Array  # [] int32: next slot to write, the same in every row; or [B]: each row's own (`per_row`)

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        size = {"b": batch, "k": kv_heads, "s": max_len, "h": head_dim}
        shape = lambda spec: (num_layers, *(size[axis] for axis in spec))
        return cls(
            k=jnp.zeros(shape(K_SPEC), dtype),
            v=jnp.zeros(shape(V_SPEC), dtype),
            valid=jnp.zeros((batch, max_len), bool),
            end=jnp.zeros((), jnp.int32),
        )

    def per_row(self) -> "KVCache":
        """The same cache with `end` per row [B] (continuous batching: rows that started at different
        times, each written at its own next slot)."""
        return self.replace(end=jnp.broadcast_to(self.end, self.valid.shape[:1]).astype(jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[_slot_axis(self.k, K_SPEC)]

    def resized(self, max_len: int) -> "KVCache":
        """The same cache with `max_len` slots: new slots are empty (zeros, not valid); `end` is kept."""
        grow = max_len - self.max_len
        if grow < 0:
            raise ValueError(f"cannot shrink a KV cache of {self.max_len} slots to {max_len}")

        def pad(x, spec):
            widths = [(0, 0)] * x.ndim
            widths[_slot_axis(x, spec)] = (0, grow)
            return jnp.pad(x, widths)

        return KVCache(pad(self.k, K_SPEC), pad(self.v, V_SPEC), jnp.pad(self.valid, ((0, 0), (0, grow))), self.end)
