"""The Qwen2.5-VL vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`): Qwen2-VL's
patch embedding and 2-D RoPE, pre-RMSNorm blocks with a gated SiLU MLP, window attention in all but
the `fullatt_block_indexes` blocks, and an RMSNorm 2x2 patch merger.

Input is the processor's layout (as Qwen2-VL): `pixel_values` [Np, C * 2 * 14 * 14], all images'
patches concatenated (each image's patches ordered by 2x2 merge blocks), `image_grid_thw` [n, 3].

Window attention (`get_vision_window_index`): each frame is cut into windows of `window_size` pixels
(112 = 4x4 merged tokens = 8x8 patches), partial at the bottom/right edges. The patches are sorted
into window order (stable, so each window is contiguous and each 2x2 merge block stays whole, as
transformers' `window_index`), the blocks run on that order and the merged tokens are put back.
Everything is computed with jnp from image_grid_thw, so a traced grid works under `jit` (static Np):

- windowed blocks: the sorted sequence is cut into chunks of `window_patches` (64) rows; a window is
  at most one chunk long, so chunk i only needs keys from chunks i-1, i, i+1, masked to its window
  ([Np / 64, 64, 192] logits instead of [Np, Np]);
- full blocks: attention within each frame (never across images): per frame ([frames, L, L]) when all
  frames are known to have L patches (see `Qwen25VL.image_features`), else `common.frame_attention`
  (tiles of the frames' own blocks, frame sizes traced; frames stay contiguous in window order).

Blocks are stacked and run under `lax.scan`; a per-block flag picks window or full attention
(`lax.cond`, so each block runs only its own kind).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..common.attention import dot_product_attention
from ..common.frame_attention import frame_attention
from ..common.layers import activation, rms_norm
from ..common.rope import apply_vision_rope, vision_rope_cos_sin
from ..common.run_options import RunOptions, scan_stacked
from ..common.sharding import constrain
from ..qwen2vl.vision import add_block_params, add_blocks_and_merger, add_patch_embedding, patch_layout
from .config import Qwen25VisionConfig

RMS_EPS = 1e-6


class VisionBlocks(nnx.Module):
    """`depth` blocks, stacked on a leading `layers` axis. e: width, n: heads, h: head dim, f: MLP."""

    def __init__(self, cfg: Qwen25VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        # RMSNorms; gated MLP: gate_weight_ef, gate_bias_f, up_weight_ef, up_bias_f, down_weight_fe, down_bias_e
        add_block_params(self, cfg, param_dtype, rngs, norm_bias=False,
                         mlp=(("gate", "e", "f"), ("up", "e", "f"), ("down", "f", "e")))


def window_layout(image_grid_thw: jax.Array, num_patches: int, cfg: Qwen25VisionConfig
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per patch, in the processor's order: (row, column) in its image [Np, 2], its frame's segment id
    [Np], and its window id [Np] (increasing in transformers' window order: image, frame, window row,
    window column). Works on traced grids (static Np)."""
    merge, wm = cfg.spatial_merge_size, cfg.window_merged
    hw, segment = patch_layout(image_grid_thw, num_patches, merge)
    grid = image_grid_thw.astype(jnp.int32)
    sizes = grid[:, 0] * grid[:, 1] * grid[:, 2]
    img = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(num_patches), side="right")
    windows_per_row = -(-(grid[:, 2] // merge) // wm)  # ceil(merged width / window side), per image
    win_row, win_col = hw[:, 0] // (merge * wm), hw[:, 1] // (merge * wm)
    # a frame holds at most Np / merge^2 windows (each has a merge block at least): a static stride
    stride = num_patches // merge**2 + 1
    window = segment * stride + win_row * windows_per_row[img] + win_col
    return hw, segment, window


def chunked_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: jax.Array, width: int,
                             scale: float, impl: str = "xla") -> jax.Array:
    """Attention within windows: q, k, v [Np, N, H] with window ids [Np], each window contiguous and at
    most `width` long -> [Np, N, H]. Query chunk i (`width` rows) sees key chunks i-1, i, i+1."""
    n = q.shape[0]
    nc = -(-n // width)
    pad = nc * width - n

    def chunks(t, fill):  # [Np, ...] -> [nc, width, ...]
        t = jnp.pad(t, [(0, pad)] + [(0, 0)] * (t.ndim - 1), constant_values=fill)
        return t.reshape(nc, width, *t.shape[1:])

    def neighbours(t, fill):  # [nc, width, ...] -> [nc, 3 * width, ...]: chunks i-1, i, i+1
        t = jnp.pad(t, [(1, 1)] + [(0, 0)] * (t.ndim - 1), constant_values=fill)
        return jnp.concatenate([t[:-2], t[1:-1], t[2:]], axis=1)

    wq = chunks(window, -1)  # padding rows: window -1 (they see only padding; dropped below)
    wk = neighbours(wq, -2)
    kn, vn = neighbours(chunks(k, 0), 0), neighbours(chunks(v, 0), 0)
    mask = wq[:, :, None] == wk[:, None, :]  # [nc, width, 3 * width]
    out = dot_product_attention(chunks(q, 0), kn, vn, mask, scale, impl=impl)  # [nc, width, N, H]
    return out.reshape(nc * width, *q.shape[1:])[:n]


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array, frame_len: int | None,
                   scale: float, impl: str = "xla") -> jax.Array:
    """Attention within each frame: q, k, v [Np, N, H] (frames contiguous) -> [Np, N, H]. With
    `frame_len` (every frame that long) per frame with `impl`, else `frame_attention` (either impl)."""
    n = q.shape[0]
    if frame_len is None:
        return frame_attention(q, k, v, segment, scale)
    frames = lambda t: t.reshape(n // frame_len, frame_len, *t.shape[1:])  # [frames, frame_len, N, H]
    return dot_product_attention(frames(q), frames(k), frames(v), None, scale, impl=impl).reshape(q.shape)


class VisionTower(nnx.Module):
    """The tower, holding its config and run options (dtype, remat, rules, unrolling, attention_impl)."""

    def __init__(self, cfg: Qwen25VisionConfig, options: RunOptions = RunOptions(), *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        add_patch_embedding(self, cfg, options, param_dtype, rngs)
        blocks = VisionBlocks(cfg, param_dtype=param_dtype, rngs=rngs)
        add_blocks_and_merger(self, blocks, cfg, param_dtype, rngs, norm_bias=False)  # RMSNorm: no bias

    def __call__(self, pixel_values: jax.Array, image_grid_thw: jax.Array, frame_len: int | None = None) -> jax.Array:
        """pixel_values [Np, patch_dim], image_grid_thw [n_images, 3] -> merged features [Np / merge^2, D],
        in the processor's order. frame_len: static, every frame has this many patches (the full blocks
        then attend per frame instead of under a [Np, Np] mask); the model finds it, not its callers."""
        cfg, dtype, impl = self.cfg, self.options.dtype, self.options.attention_impl
        num_patches = pixel_values.shape[0]
        unit = cfg.spatial_merge_size**2
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {cfg.patch_dim}], got {pixel_values.shape}")
        if num_patches % unit:
            raise ValueError(f"{num_patches} patches is not a whole number of {unit}-patch merge blocks")
        w = lambda v: v[...].astype(dtype)
        scale = cfg.head_dim**-0.5
        hw, segment, window = window_layout(image_grid_thw, num_patches, cfg)
        if frame_len is not None and num_patches % frame_len:
            raise ValueError(f"frame_len {frame_len} does not divide the {num_patches} patches")

        # window order: transformers' `window_index` on patches (a stable sort keeps merge blocks whole)
        order = jnp.argsort(window, stable=True)  # [Np]
        segment, window = segment[order], window[order]
        cos, sin = vision_rope_cos_sin(hw[order], cfg.head_dim, cfg.rope_theta)
        act = activation(cfg.hidden_act)

        full_flags = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)  # static, per block
        attend_window = lambda q, k, v: chunked_window_attention(q, k, v, window, cfg.window_patches, scale, impl)
        attend_full = lambda q, k, v: full_attention(q, k, v, segment, frame_len, scale, impl)

        def block(b, x, is_full):
            y = rms_norm(x, b.norm1_scale_e[...], RMS_EPS)
            qkv = jnp.einsum("pe,eknh->pknh", y, w(b.qkv_weight_e3nh)) + w(b.qkv_bias_3nh)  # [Np, 3, N, H]
            q, k = apply_vision_rope(qkv[:, 0], cos, sin), apply_vision_rope(qkv[:, 1], cos, sin)
            if full_flags.all():
                attn = attend_full(q, k, qkv[:, 2])
            elif not full_flags.any():
                attn = attend_window(q, k, qkv[:, 2])
            else:
                attn = jax.lax.cond(is_full, attend_full, attend_window, q, k, qkv[:, 2])
            x = x + jnp.einsum("pnh,nhe->pe", attn, w(b.proj_weight_nhe)) + w(b.proj_bias_e)
            y = rms_norm(x, b.norm2_scale_e[...], RMS_EPS)
            gated = act(y @ w(b.gate_weight_ef) + w(b.gate_bias_f)) * (y @ w(b.up_weight_ef) + w(b.up_bias_f))
            x = x + gated @ w(b.down_weight_fe) + w(b.down_bias_e)
            return constrain(x, ("length", "vision_embed"), self.options.rules), None

        x = pixel_values.astype(dtype)[order] @ w(self.patch_weight_pe)  # [Np, E]
        x, _ = scan_stacked(self.blocks, block, x, jnp.asarray(full_flags), self.options)
        # merger (`Qwen2_5_VLPatchMerger`), then back to the processor's order (`reverse_indices`)
        x = rms_norm(x, self.merger_norm_scale_e[...], RMS_EPS)
        x = x.reshape(num_patches // unit, -1)  # [Np / 4, 4E]
        x = jax.nn.gelu(x @ w(self.merger_fc1_weight_mm) + w(self.merger_fc1_bias_m), approximate=False)
        x = x @ w(self.merger_fc2_weight_md) + w(self.merger_fc2_bias_d)  # [Np / 4, D], window order
        merged_order = order[::unit] // unit  # the merge block each row holds
        restore = jnp.zeros_like(merged_order).at[merged_order].set(jnp.arange(merged_order.shape[0]))
        return x[restore]
