"""LoRA adapters on the decoder's projections (PEFT's formulation: y = x W + dropout(x) A B * alpha / r,
A initialised like PEFT's kaiming-uniform, B zeros, so a fresh adapter leaves the model unchanged).

Adapters live in `DecoderLayers.lora` with the same leading layer axis as the base weights, so they
are scanned with them; `decoder._layer` adds their contribution where present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# projection name (PEFT target) -> (base weight attribute, einsum of the input with the weight)
PROJECTIONS = {
    "q_proj": ("q_weight_dnh", "btd,dnh->btnh"),
    "k_proj": ("k_weight_dkh", "btd,dkh->btkh"),
    "v_proj": ("v_weight_dkh", "btd,dkh->btkh"),
    "o_proj": ("o_weight_nhd", "btnh,nhd->btd"),
    "gate_proj": ("gate_weight_df", "btd,df->btf"),
    "up_proj": ("up_weight_df", "btd,df->btf"),
    "down_proj": ("down_weight_fd", "btf,fd->btd"),
}


def _split(eq: str) -> tuple[str, str]:
    """(input feature letters, output feature letters) of an einsum like 'btd,dnh->btnh'."""
    lhs, out = eq.split("->")
    x_spec = lhs.split(",")[0]
    return x_spec[2:], out[2:]


class LoRA(nnx.Module):
    def __init__(self, layers: nnx.Module, targets: tuple[str, ...], rank: int, alpha: float, dropout: float, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"lora target modules {unknown} are not decoder projections {sorted(PROJECTIONS)}")
        self.targets = tuple(targets)
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        for name in self.targets:
            attr, eq = PROJECTIONS[name]
            base = getattr(layers, attr)
            axes = base.get_metadata()["axes"]
            n_in = len(_split(eq)[0])
            num_layers, in_shape, out_shape = base.shape[0], base.shape[1 : 1 + n_in], base.shape[1 + n_in :]
            fan_in = 1
            for s in in_shape:
                fan_in *= s
            bound = fan_in**-0.5
            a = jax.random.uniform(rngs.params(), (num_layers, *in_shape, rank), param_dtype, -bound, bound)
            setattr(self, f"{name}_a", nnx.Param(a, axes=("layers", *axes[1 : 1 + n_in], None)))
            setattr(self, f"{name}_b", nnx.Param(jnp.zeros((num_layers, rank, *out_shape), param_dtype),
                                                 axes=("layers", None, *axes[1 + n_in :])))

    def delta(self, name: str, x: jax.Array, dtype, dropout_key: jax.Array | None) -> jax.Array:
        """dropout(x) A B * alpha / r for one layer's slice of the adapters."""
        _, eq = PROJECTIONS[name]
        ins, outs = _split(eq)
        if dropout_key is not None and self.dropout > 0:
            key = jax.random.fold_in(dropout_key, list(PROJECTIONS).index(name))
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a = getattr(self, f"{name}_a")[...].astype(dtype)
        b = getattr(self, f"{name}_b")[...].astype(dtype)
        xa = jnp.einsum(f"bt{ins},{ins}r->btr", x, a)
        return jnp.einsum(f"btr,r{outs}->bt{outs}", xa, b) * self.scale

    def merged(self, name: str, base: jax.Array) -> jax.Array:
        """base + A B * alpha / r for all layers (for export)."""
        _, eq = PROJECTIONS[name]
        ins, outs = _split(eq)
        a = getattr(self, f"{name}_a")[...].astype(jnp.float32)
        b = getattr(self, f"{name}_b")[...].astype(jnp.float32)
        delta = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b) * self.scale
        return (base.astype(jnp.float32) + delta).astype(base.dtype)
