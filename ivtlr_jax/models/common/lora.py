"""LoRA adapters on the decoder's projections (PEFT's formulation: y = x W + dropout(x) A B * alpha / r,
A initialised like PEFT's kaiming-uniform, B zeros, so a fresh adapter leaves the model unchanged).

Adapters live in `DecoderLayers.lora` with the same leading layer axis as the base weights, so they
are scanned with them; `decoder._layer` adds their contribution where present.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

# projection name (PEFT target) -> (base weight attribute, einsum of the tokens with the weight); `m` is
# the flattened token axis (batch x length), see `token_einsum`
PROJECTIONS = {
    "q_proj": ("q_weight_dnh", "md,dnh->mnh"),
    "k_proj": ("k_weight_dkh", "md,dkh->mkh"),
    "v_proj": ("v_weight_dkh", "md,dkh->mkh"),
    "o_proj": ("o_weight_nhd", "mnh,nhd->md"),
    "gate_proj": ("gate_weight_df", "md,df->mf"),
    "up_proj": ("up_weight_df", "md,df->mf"),
    "down_proj": ("down_weight_fd", "mf,fd->md"),
}


def token_einsum(eq: str, x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
    """einsum `eq` (tokens on the single axis `m`) of x [B, T, *in] with a weight: x's batch and length
    axes are flattened into one token axis first, so the backward pass's weight gradient contracts one
    axis instead of two (XLA CPU otherwise transposes the activations for it: ~30% of a layer's
    forward + backward), then unflattened."""
    lead = x.shape[:2]
    y = jnp.einsum(eq, x.reshape(-1, *x.shape[2:]), w, **kwargs)
    return y.reshape(*lead, *y.shape[1:])


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective, well-mixing 32-bit integer hash (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Bernoulli(1 - rate) keep mask of `shape`, one independent draw per element.

    Counter-based: 64 seed bits are drawn from `key` (threefry), and each element's flat index is
    hashed with them, `mix(mix(index ^ s0) ^ s1)`; an element is dropped when its hash is below
    round(rate * 2^32), so the drop probability is `rate` within 2^-32. On XLA CPU this is about 10x
    cheaper than `jax.random.bernoulli` (threefry bits for every element cost more than the LoRA
    matmuls themselves: ~30% of a LoRA training step), and the index is an iota, so the mask shards
    like any elementwise op. The hash is a bijection of the index for fixed seeds, so within one mask
    the draws are a sample without replacement from 2^32 values: indistinguishable from independent
    draws at these sizes."""
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(f"dropout mask of {size} elements is over the 2^32 counter range")
    s0, s1 = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    threshold = jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
    return _mix32(_mix32(index ^ s0) ^ s1) >= threshold


def _split(eq: str) -> tuple[str, str]:
    """(input feature letters, output feature letters) of an einsum like 'md,dnh->mnh'."""
    lhs, out = eq.split("->")
    x_spec = lhs.split(",")[0]
    return x_spec[1:], out[1:]


class LoRA(nnx.Module):
    def __init__(self, layers: nnx.Module, targets: tuple[str, ...], rank: int, alpha: float, dropout: float, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"lora target modules {unknown} are not decoder projections {sorted(PROJECTIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout {dropout} is not in [0, 1)")
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
            keep = dropout_keep_mask(key, x.shape, self.dropout)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a = getattr(self, f"{name}_a")[...].astype(dtype)
        b = getattr(self, f"{name}_b")[...].astype(dtype)
        xa = token_einsum(f"m{ins},{ins}r->mr", x, a)
        return token_einsum(f"mr,r{outs}->m{outs}", xa, b) * self.scale

    def merged(self, name: str, base: jax.Array) -> jax.Array:
        """base + A B * alpha / r for all layers (for export)."""
        _, eq = PROJECTIONS[name]
        ins, outs = _split(eq)
        a = getattr(self, f"{name}_a")[...].astype(jnp.float32)
        b = getattr(self, f"{name}_b")[...].astype(jnp.float32)
        delta = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b) * self.scale
        return (base.astype(jnp.float32) + delta).astype(base.dtype)


# ---- attaching, selecting and merging adapters on a model ---------------------------------------------
OFFICIAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = True  # False: full fine-tuning of every parameter
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = OFFICIAL_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank: {self.rank!r} must be >= 1")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: {self.alpha!r} must be a finite number > 0")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout: {self.dropout!r} must be a finite number >= 0.0 and < 1.0")
        unknown = sorted(set(self.target_modules) - set(PROJECTIONS))
        if unknown or (self.enabled and not self.target_modules):
            raise ValueError(f"target_modules: {list(self.target_modules)} must name projections among "
                             f"{sorted(PROJECTIONS)}")


def add_lora(model: nnx.Module, cfg: LoRAConfig, *, seed: int = 0, param_dtype=jnp.float32) -> nnx.Module:
    """Attach adapters to the language model's decoder layers (the vision tower is never targeted, as in
    the official setup where no tower module matches the target names)."""
    model.layers.lora = LoRA(model.layers, tuple(cfg.target_modules), cfg.rank, cfg.alpha, cfg.dropout,
                             rngs=nnx.Rngs(seed), param_dtype=param_dtype)
    return model


def trainable_filter(cfg: LoRAConfig):
    """nnx filter of the trained parameters: the adapters with LoRA, every parameter without."""
    return nnx.All(nnx.Param, nnx.PathContains("lora")) if cfg.enabled else nnx.Param


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold the adapters into the base weights (in place) and remove them."""
    lora = getattr(model.layers, "lora", None)
    if lora is None:
        return model
    for name in lora.targets:
        attr, _ = PROJECTIONS[name]
        var = getattr(model.layers, attr)
        var[...] = lora.merged(name, var[...])
    del model.layers.lora
    return model
