"""Chameleon's VQ-VAE image tokenizer (encoder side only): conv encoder with down blocks, optional
attention, mid attention, quant conv, nearest-codebook quantizer. A 512x512 image becomes 32x32 =
1024 discrete codes. Activations are NHWC; transformers' pixel_values are NCHW and are transposed in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..common.layers import param
from .config import VQConfig

GROUPS, EPS = 32, 1e-6


class Conv2d(nnx.Module):
    def __init__(self, cin: int, cout: int, size: int, *, param_dtype, rngs: nnx.Rngs):
        self.kernel_hwio = param(rngs, (size, size, cin, cout), (None, None, None, None), param_dtype)
        self.bias_o = param(rngs, (cout,), (None,), param_dtype, "zeros")

    def __call__(self, x: jax.Array, stride: int = 1, padding="SAME") -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel_hwio[...].astype(x.dtype), (stride, stride), padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
        )
        return y + self.bias_o[...].astype(x.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, *, param_dtype, rngs: nnx.Rngs):
        self.scale_c = param(rngs, (channels,), (None,), param_dtype, "ones")
        self.bias_c = param(rngs, (channels,), (None,), param_dtype, "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, GROUPS, c // GROUPS)
        mean = xf.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + EPS)).reshape(b, h, w, c)
        return (y * self.scale_c[...] + self.bias_c[...]).astype(x.dtype)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(cin, **kw)
        self.conv1 = Conv2d(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(cout, **kw)
        self.conv2 = Conv2d(cout, cout, 3, **kw)
        self.nin_shortcut = Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the h*w positions (1x1 convs as the projections)."""

    def __init__(self, channels: int, *, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(channels, **kw)
        self.q, self.k, self.v, self.proj_out = (Conv2d(channels, channels, 1, **kw) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
        probs = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5, -1)
        out = jnp.einsum("bqk,bkc->bqc", probs.astype(v.dtype), v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class DownLevel(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VQConfig, with_attn: bool, downsample: bool, *, param_dtype, rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, **kw) for i in range(cfg.num_res_blocks)])
        self.attn = nnx.List([AttnBlock(cout, **kw) for _ in range(cfg.num_res_blocks)] if with_attn else [])
        self.downsample = Conv2d(cout, cout, 3, **kw) if downsample else None


class VQEncoder(nnx.Module):
    """pixel_values [B, 3, H, W] -> codes [B, (H/f) * (W/f)] (f = 2^(levels-1)), row-major."""

    def __init__(self, cfg: VQConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.attn_type != "vanilla":
            raise ValueError(f"vq_config.attn_type {cfg.attn_type!r} is not supported (only 'vanilla')")
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        ch = cfg.base_channels
        self.conv_in = Conv2d(cfg.in_channels, ch, 3, **kw)
        levels, res, cin = [], cfg.resolution, ch
        mults = cfg.channel_multiplier
        for i, m in enumerate(mults):
            cout = ch * m
            last = i == len(mults) - 1
            levels.append(DownLevel(cin, cout, cfg, res in cfg.attn_resolutions, not last, **kw))
            cin, res = cout, res if last else res // 2
        self.down = nnx.List(levels)
        self.mid_block_1 = ResnetBlock(cin, cin, **kw)
        self.mid_attn_1 = AttnBlock(cin, **kw)
        self.mid_block_2 = ResnetBlock(cin, cin, **kw)
        self.norm_out = GroupNorm(cin, **kw)
        self.conv_out = Conv2d(cin, 2 * cfg.latent_channels if cfg.double_latent else cfg.latent_channels, 3, **kw)
        self.quant_conv = Conv2d(cfg.latent_channels, cfg.embed_dim, 1, **kw)
        self.codebook_ke = param(rngs, (cfg.num_embeddings, cfg.embed_dim), (None, None), param_dtype)

    def __call__(self, pixel_values: jax.Array, dtype=jnp.float32) -> jax.Array:
        x = jnp.transpose(pixel_values.astype(dtype), (0, 2, 3, 1))  # NCHW -> NHWC
        x = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                x = block(x)
                if len(level.attn):
                    x = level.attn[i](x)
            if level.downsample is not None:
                x = level.downsample(x, stride=2, padding=((0, 1), (0, 1)))  # transformers pads right/bottom
        x = self.mid_block_2(self.mid_attn_1(self.mid_block_1(x)))
        x = self.conv_out(jax.nn.silu(self.norm_out(x)))
        z = self.quant_conv(x).astype(jnp.float32)
        b, h, w, e = z.shape
        z = z.reshape(-1, e)
        codebook = self.codebook_ke[...].astype(jnp.float32)
        distances = (
            jnp.sum(z**2, axis=1, keepdims=True)
            + jnp.sum(codebook**2, axis=1)
            - 2 * jnp.einsum("nd,kd->nk", z, codebook, precision=jax.lax.Precision.HIGHEST)
        )
        return jnp.argmin(distances, axis=1).reshape(b, h * w).astype(jnp.int32)
