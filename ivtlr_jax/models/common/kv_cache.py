"""A fixed-size KV cache for all layers, written chunk by chunk (prefill, latent passes, decoding).

Layouts are the ones the attention dots read without a transpose (on XLA CPU a per-layer, per-step
copy of the whole cache otherwise: ~60% of a batch-32 decoding step): keys [L, B, K, S, H] (kv-head
major), values [L, B, K, H, S] (slots minor)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, H, S]
    valid: jax.Array  # [B, S] bool: slot written and not padding
    end: jax.Array  # [] int32: next slot to write; all rows share it

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        return cls(
            k=jnp.zeros((num_layers, batch, kv_heads, max_len, head_dim), dtype),
            v=jnp.zeros((num_layers, batch, kv_heads, head_dim, max_len), dtype),
            valid=jnp.zeros((batch, max_len), bool),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def resized(self, max_len: int) -> "KVCache":
        """The same cache with `max_len` slots: new slots are empty (zeros, not valid); `end` is kept."""
        grow = max_len - self.max_len
        if grow < 0:
            raise ValueError(f"cannot shrink a KV cache of {self.max_len} slots to {max_len}")
        k_pad = ((0, 0), (0, 0), (0, 0), (0, grow), (0, 0))
        v_pad = ((0, 0), (0, 0), (0, 0), (0, 0), (0, grow))
        return KVCache(jnp.pad(self.k, k_pad), jnp.pad(self.v, v_pad), jnp.pad(self.valid, ((0, 0), (0, grow))),
                       self.end)
