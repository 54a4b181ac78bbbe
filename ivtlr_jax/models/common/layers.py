"""Parameter creation and the small stateless layers both models share (norms, activations, MLPs)."""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


class DType(enum.StrEnum):
    """A compute or storage dtype (the model options `dtype` and `param_dtype`)."""
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


DTYPES = {DType.FLOAT32: jnp.float32, DType.BFLOAT16: jnp.bfloat16, DType.FLOAT16: jnp.float16}  # DType -> jnp


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: Axes,
    dtype: jnp.dtype,
    init: str = "normal",
    std: float = 0.02,
) -> nnx.Param:
    """A parameter with logical axis names in its metadata (`axes`, one name per dimension).

    The names are mapped to mesh axes by `sharding.ShardingRules`; `layers` marks a stacked-layer axis.
    """
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and axes {axes} differ in rank")
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, axes=axes)


def acc_dtype(x: jax.Array):
    """The dtype reductions, softmax and norms run in: fp32, or fp64 for fp64 inputs (gradient checks)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled (as transformers' Qwen2/Llama)."""
    dtype = x.dtype
    xf = x.astype(acc_dtype(x))
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * xf.astype(dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in fp32."""
    dtype = x.dtype
    xf = x.astype(acc_dtype(x))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale.astype(xf.dtype)
    if bias is not None:
        y = y + bias.astype(xf.dtype)
    return y.astype(dtype)


def activation(name: str):
    """Activations by their transformers names."""
    if name == "silu":
        return jax.nn.silu
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_pytorch_exact"):
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")
