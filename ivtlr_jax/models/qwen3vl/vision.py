"""The Qwen3-VL vision tower (transformers' `Qwen3VLVisionModel`): a patch embedding with a bias, learned
position embeddings bilinearly interpolated to each image's patch grid, Qwen2-VL's pre-LayerNorm ViT
blocks (2-D RoPE, attention within each frame; gelu-tanh MLP), the 2x2 patch merger, and one DeepStack
merger per `deepstack_visual_indexes` block, fed that block's output.

Input is the processor's layout (as Qwen2-VL, patches of 16 pixels): `pixel_values` [Np, C * 2 * 16 * 16],
all images' patches concatenated (each image's patches ordered by 2x2 merge blocks), `image_grid_thw`
[n, 3]. Everything is computed with jnp from image_grid_thw, so a traced grid works under `jit`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..common.layers import layer_norm, param
from ..common.rope import vision_rope_cos_sin
from ..common.run_options import RunOptions, scan_stacked
from ..qwen2vl.vision import (LN_EPS, VisionBlocks, add_blocks_and_merger, add_patch_embedding, merger_mlp,
                              patch_layout, vit_block)
from .config import Qwen3VisionConfig


class VisionFeatures(NamedTuple):
    merged: jax.Array  # [Np / 4, D] the merger's output, one row per image token (processor order)
    deepstack: jax.Array  # [A, Np / 4, D] the DeepStack mergers' outputs, one per deepstack_visual_indexes


class DeepstackMergers(nnx.Module):
    """A = len(deepstack_visual_indexes) patch mergers stacked on a leading axis, each normalising the
    2x2-merged block ([4E], LayerNorm after the shuffle) before the merger MLP. m: 4E, d: the LM's width."""

    def __init__(self, cfg: Qwen3VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        A, M, D = len(cfg.deepstack_visual_indexes), cfg.embed_dim * cfg.spatial_merge_size**2, cfg.out_hidden_size
        p = lambda shape, axes, init="normal": param(rngs, (A, *shape), ("layers", *axes), param_dtype, init)
        self.norm_scale_m = p((M,), ("norm",), "ones")
        self.norm_bias_m = p((M,), ("norm",), "zeros")
        self.merger_fc1_weight_mm = p((M, M), (None, "mlp"))
        self.merger_fc1_bias_m = p((M,), ("mlp",), "zeros")
        self.merger_fc2_weight_md = p((M, D), ("mlp", "embed"))
        self.merger_fc2_bias_d = p((D,), ("norm",), "zeros")


def interpolation_taps(coord: jax.Array, size: jax.Array, side: int) -> tuple[jax.Array, jax.Array]:
    """Bilinear taps (align_corners) into a `side`-long table for positions coord [Np] on axes of length
    size [Np] -> (indices [Np, 2], weights [Np, 2]), as transformers' `_interpolation_axis_taps_weights`."""
    src = coord.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
    floor = jnp.floor(src)
    offsets = jnp.arange(2)
    taps = jnp.clip(floor.astype(jnp.int32)[:, None] + offsets, 0, side - 1)
    weights = jnp.maximum(1 - jnp.abs(src[:, None] - floor[:, None] - offsets), 0)
    return taps, weights


def interpolated_positions(table: jax.Array, hw: jax.Array, image_grid_thw: jax.Array, num_patches: int) -> jax.Array:
    """The learned table [side * side, E] resampled to each patch: hw [Np, 2] its (row, column), the grid
    gives its image's size -> [Np, E] (the 4 bilinear taps of `interpolation_taps` per patch)."""
    side = round(table.shape[0] ** 0.5)
    grid = image_grid_thw.astype(jnp.int32)
    sizes = grid[:, 0] * grid[:, 1] * grid[:, 2]
    img = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(num_patches), side="right")
    rows, row_w = interpolation_taps(hw[:, 0], grid[img, 1], side)
    cols, col_w = interpolation_taps(hw[:, 1], grid[img, 2], side)
    index = (rows[:, :, None] * side + cols[:, None, :]).reshape(num_patches, 4)
    weight = (row_w[:, :, None] * col_w[:, None, :]).reshape(num_patches, 4)
    return (table[index] * weight[:, :, None].astype(table.dtype)).sum(axis=1)


class VisionTower(nnx.Module):
    """The tower, holding its config and run options (dtype, remat, rules, unrolling, attention_impl)."""

    def __init__(self, cfg: Qwen3VisionConfig, options: RunOptions = RunOptions(), *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        add_patch_embedding(self, cfg, options, param_dtype, rngs)
        E = cfg.embed_dim
        self.patch_bias_e = param(rngs, (E,), ("norm",), param_dtype, "zeros")
        self.position_table_ge = param(rngs, (cfg.num_position_embeddings, E), (None, "vision_embed"), param_dtype)
        blocks = VisionBlocks(cfg, param_dtype=param_dtype, rngs=rngs)
        add_blocks_and_merger(self, blocks, cfg, param_dtype, rngs, norm_bias=True)
        self.deepstack = DeepstackMergers(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, image_grid_thw: jax.Array, frame_len: int | None = None
                 ) -> VisionFeatures:
        """pixel_values [Np, patch_dim], image_grid_thw [n_images, 3] -> `VisionFeatures`, rows in the
        processor's order. frame_len: static, every frame has this many patches (attention then runs per
        frame without a mask; see the Qwen2-VL tower)."""
        cfg, dtype = self.cfg, self.options.dtype
        num_patches, unit = pixel_values.shape[0], cfg.spatial_merge_size**2
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {cfg.patch_dim}], got {pixel_values.shape}")
        if frame_len is not None and num_patches % frame_len:
            raise ValueError(f"frame_len {frame_len} does not divide the {num_patches} patches")
        w = lambda v: v[...].astype(dtype)
        hw, segment = patch_layout(image_grid_thw, num_patches, cfg.spatial_merge_size)
        cos, sin = vision_rope_cos_sin(hw, cfg.head_dim, cfg.rope_theta)

        def block(b, x, _):  # every block's output is kept: the DeepStack mergers read some of them
            x = vit_block(b, x, cos, sin, segment, frame_len, cfg, self.options)
            return x, x

        x = pixel_values.astype(dtype) @ w(self.patch_weight_pe) + w(self.patch_bias_e)  # [Np, E]
        x = x + interpolated_positions(w(self.position_table_ge), hw, image_grid_thw, num_patches)
        x, outputs = scan_stacked(self.blocks, block, x, None, self.options)  # outputs [depth, Np, E]
        x = layer_norm(x, self.merger_norm_scale_e[...], self.merger_norm_bias_e[...], LN_EPS)
        merged = merger_mlp(self, x.reshape(num_patches // unit, -1), dtype)  # [Np / 4, D]
        return VisionFeatures(merged, self.deepstack_features(outputs))

    def deepstack_features(self, outputs: jax.Array) -> jax.Array:
        """Block outputs [depth, Np, E] -> [A, Np / 4, D]: merger a on block deepstack_visual_indexes[a]."""
        cfg, dtype = self.cfg, self.options.dtype
        picked = outputs[jnp.asarray(cfg.deepstack_visual_indexes, jnp.int32)]  # [A, Np, E]
        blocks = picked.reshape(picked.shape[0], picked.shape[1] // cfg.spatial_merge_size**2, -1)  # [A, Np / 4, 4E]

        def one(merger, x):
            x = layer_norm(x, merger.norm_scale_m[...], merger.norm_bias_m[...], LN_EPS)
            return merger_mlp(merger, x, dtype)

        graphdef, state = nnx.split(self.deepstack)
        return jax.vmap(lambda s, x: one(nnx.merge(graphdef, s), x))(state, blocks)
