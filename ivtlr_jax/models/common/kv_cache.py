"""A fixed-size KV cache for all layers, written chunk by chunk (prefill, latent passes, decoding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    valid: jax.Array  # [B, S] bool: slot written and not padding
    end: jax.Array  # [] int32: next slot to write; all rows share it

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def resized(self, max_len: int) -> "KVCache":
        """The same cache with `max_len` slots: new slots are empty (zeros, not valid); `end` is kept."""
        grow = max_len - self.max_len
        if grow < 0:
            raise ValueError(f"cannot shrink a KV cache of {self.max_len} slots to {max_len}")
        pad = ((0, 0), (0, 0), (0, grow), (0, 0), (0, 0))
        return KVCache(jnp.pad(self.k, pad), jnp.pad(self.v, pad), jnp.pad(self.valid, ((0, 0), (0, grow))), self.end)
