"""The Qwen2-VL vision tower: patch embedding (the 3-D conv over 2 x 14 x 14 patches as one matmul),
2-D RoPE, pre-norm ViT blocks run under `lax.scan`, and the 2x2 patch merger.

Input is the processor's layout: `pixel_values` [Np, C * 2 * 14 * 14] with all images' patches
concatenated (each image's patches ordered by 2x2 merge blocks), `image_grid_thw` [n_images, 3].
Images of different sizes share one call; attention is block-diagonal per image frame: per frame when
given the frames' one static length (`frame_len`; the model gives it only for attention_impl "fused"),
else through `common.frame_attention` (tiled, the grid may be traced; the faster on einsums).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..common.attention import dot_product_attention
from ..common.frame_attention import frame_attention
from ..common.layers import activation, layer_norm, param
from ..common.rope import apply_vision_rope, vision_rope_cos_sin
from ..common.run_options import RunOptions, scan_stacked
from ..common.sharding import constrain
from .config import VisionConfig

LN_EPS = 1e-6


class VisionBlocks(nnx.Module):
    """`depth` ViT blocks, stacked on a leading `layers` axis. e: width, n: heads, h: head dim, f: MLP."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        # LayerNorms; MLP: fc1_weight_ef, fc1_bias_f, fc2_weight_fe, fc2_bias_e
        add_block_params(self, cfg, param_dtype, rngs, norm_bias=True, mlp=(("fc1", "e", "f"), ("fc2", "f", "e")))


BLOCK_AXES = {"e": "vision_embed", "f": "mlp"}  # an MLP weight's axes by dimension letter
BIAS_AXES = {"e": "norm", "f": "mlp"}  # an MLP bias's axis by dimension letter


def add_block_params(block: nnx.Module, cfg, param_dtype, rngs: nnx.Rngs, *, norm_bias: bool, mlp) -> None:
    """The parameters of a Qwen tower's `cfg.depth` blocks, stacked on a leading `layers` axis, in the order
    random initialisation draws them: the pre-attention norm, the attention, the pre-MLP norm, the MLP. A norm
    has a bias with `norm_bias` (Qwen2-VL's LayerNorm), else a scale only (Qwen2.5-VL's RMSNorm). `mlp`:
    (name, in, out) of each MLP linear, dimensions as letters ("e" width, "f" MLP): `<name>_weight_<in><out>`
    and `<name>_bias_<out>`."""
    E = cfg.embed_dim
    dims = {"e": E, "f": cfg.mlp_dim}
    p = lambda shape, axes, init="normal": param(rngs, (cfg.depth, *shape), ("layers", *axes), param_dtype, init)
    block.norm1_scale_e = p((E,), ("norm",), "ones")
    if norm_bias:
        block.norm1_bias_e = p((E,), ("norm",), "zeros")
    add_attention_params(block, p, E, cfg.num_heads, cfg.head_dim)
    block.norm2_scale_e = p((E,), ("norm",), "ones")
    if norm_bias:
        block.norm2_bias_e = p((E,), ("norm",), "zeros")
    for name, d_in, d_out in mlp:
        weight = p((dims[d_in], dims[d_out]), (BLOCK_AXES[d_in], BLOCK_AXES[d_out]))
        setattr(block, f"{name}_weight_{d_in}{d_out}", weight)
        setattr(block, f"{name}_bias_{d_out}", p((dims[d_out],), (BIAS_AXES[d_out],), "zeros"))


def add_attention_params(block: nnx.Module, p, E: int, N: int, H: int) -> None:
    """The attention parameters of both Qwen towers' blocks (fused q/k/v with bias, the output projection),
    made with `p(shape, axes, init)` in this order (the order random initialisation draws them)."""
    block.qkv_weight_e3nh = p((E, 3, N, H), ("vision_embed", None, "heads", "head_dim"))
    block.qkv_bias_3nh = p((3, N, H), (None, "heads", "head_dim"), "zeros")
    block.proj_weight_nhe = p((N, H, E), ("heads", "head_dim", "vision_embed"))
    block.proj_bias_e = p((E,), ("norm",), "zeros")


def add_merger_mlp(tower: nnx.Module, cfg, param_dtype, rngs: nnx.Rngs) -> None:
    """The patch merger's MLP of both Qwen towers (after its norm): [4E] -> [4E] -> [D]."""
    M = cfg.embed_dim * cfg.spatial_merge_size**2
    tower.merger_fc1_weight_mm = param(rngs, (M, M), (None, "mlp"), param_dtype)
    tower.merger_fc1_bias_m = param(rngs, (M,), ("mlp",), param_dtype, "zeros")
    tower.merger_fc2_weight_md = param(rngs, (M, cfg.out_hidden_size), ("mlp", "embed"), param_dtype)
    tower.merger_fc2_bias_d = param(rngs, (cfg.out_hidden_size,), ("norm",), param_dtype, "zeros")


def add_patch_embedding(tower: nnx.Module, cfg, options: RunOptions, param_dtype, rngs: nnx.Rngs) -> None:
    """A Qwen tower's config, run options and patch embedding [patch_dim, E]: its first parameter (the
    parameters are drawn in the order they are made)."""
    tower.cfg, tower.options = cfg, options
    tower.patch_weight_pe = param(rngs, (cfg.patch_dim, cfg.embed_dim), (None, "vision_embed"), param_dtype)


def add_blocks_and_merger(tower: nnx.Module, blocks: nnx.Module, cfg, param_dtype, rngs: nnx.Rngs, *,
                          norm_bias: bool) -> None:
    """A Qwen tower's stacked `blocks`, then its patch merger: the norm over E (a LayerNorm with a bias:
    `norm_bias`, else an RMSNorm's scale) and `add_merger_mlp`."""
    tower.blocks = blocks
    tower.merger_norm_scale_e = param(rngs, (cfg.embed_dim,), ("norm",), param_dtype, "ones")
    if norm_bias:
        tower.merger_norm_bias_e = param(rngs, (cfg.embed_dim,), ("norm",), param_dtype, "zeros")
    add_merger_mlp(tower, cfg, param_dtype, rngs)


def patch_layout(image_grid_thw: jax.Array, num_patches: int, merge: int) -> tuple[jax.Array, jax.Array]:
    """Per patch: its (row, column) in its image [Np, 2] and its frame's segment id [Np].

    Matches the processor's patch order (merge x merge blocks, block-major) and transformers'
    `get_vision_position_ids` / per-frame `cu_seqlens`. Works on traced grids (static Np).
    """
    grid = image_grid_thw.astype(jnp.int32)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    sizes = t * h * w
    ends = jnp.cumsum(sizes)
    n = jnp.arange(num_patches)
    img = jnp.searchsorted(ends, n, side="right")
    local = n - (ends - sizes)[img]
    frame_size = (h * w)[img]
    frame, within = local // frame_size, local % frame_size
    blocks_per_row = w[img] // merge
    block, in_block = within // (merge * merge), within % (merge * merge)
    row = (block // blocks_per_row) * merge + in_block // merge
    col = (block % blocks_per_row) * merge + in_block % merge
    segment = (jnp.cumsum(t) - t)[img] + frame
    return jnp.stack([row, col], axis=-1), segment


class VisionTower(nnx.Module):
    """The tower, holding its config and run options (dtype, remat, rules, unrolling, attention_impl)."""

    def __init__(self, cfg: VisionConfig, options: RunOptions = RunOptions(), *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        add_patch_embedding(self, cfg, options, param_dtype, rngs)
        blocks = VisionBlocks(cfg, param_dtype=param_dtype, rngs=rngs)
        add_blocks_and_merger(self, blocks, cfg, param_dtype, rngs, norm_bias=True)

    def __call__(self, pixel_values: jax.Array, image_grid_thw: jax.Array, frame_len: int | None = None) -> jax.Array:
        """pixel_values [Np, patch_dim], image_grid_thw [n_images, 3] -> merged features [Np / merge^2, D].

        frame_len: a static promise that every image frame has this many patches (e.g. all images
        resized to 280x280). Attention then runs per frame ([Np / frame_len] blocks of frame_len^2);
        without it (mixed sizes, or a traced grid) through `frame_attention`, tiles of the frames' own
        blocks; the result is the same. The options' attention_impl applies to the per-frame path
        (`frame_attention` is one implementation for both)."""
        cfg, dtype = self.cfg, self.options.dtype
        num_patches = pixel_values.shape[0]
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {cfg.patch_dim}], got {pixel_values.shape}")
        w = lambda v: v[...].astype(dtype)
        hw, segment = patch_layout(image_grid_thw, num_patches, cfg.spatial_merge_size)
        cos, sin = vision_rope_cos_sin(hw, cfg.head_dim, cfg.rope_theta)
        if frame_len is not None and num_patches % frame_len:
            raise ValueError(f"frame_len {frame_len} does not divide the {num_patches} patches")

        def block(b, x, _):
            return vit_block(b, x, cos, sin, segment, frame_len, cfg, self.options), None

        x = pixel_values.astype(dtype) @ w(self.patch_weight_pe)  # [Np, E]
        x, _ = scan_stacked(self.blocks, block, x, None, self.options)
        x = layer_norm(x, self.merger_norm_scale_e[...], self.merger_norm_bias_e[...], LN_EPS)
        return merger_mlp(self, x.reshape(num_patches // cfg.spatial_merge_size**2, -1), dtype)  # [Np / 4, D]


def merger_mlp(m: nnx.Module, x: jax.Array, dtype) -> jax.Array:
    """The patch merger's MLP (`add_merger_mlp`'s parameters on `m`): x [Np / 4, 4E] -> [Np / 4, D]."""
    w = lambda v: v[...].astype(dtype)
    x = jax.nn.gelu(x @ w(m.merger_fc1_weight_mm) + w(m.merger_fc1_bias_m), approximate=False)
    return x @ w(m.merger_fc2_weight_md) + w(m.merger_fc2_bias_d)


def vit_block(b: nnx.Module, x: jax.Array, cos: jax.Array, sin: jax.Array, segment: jax.Array,
              frame_len: int | None, cfg, options: RunOptions) -> jax.Array:
    """One pre-LayerNorm ViT block (Qwen2-VL's and Qwen3-VL's; `b`: one layer of `VisionBlocks`) on x [Np, E],
    each frame attending to itself: per frame without a mask when every frame has `frame_len` patches,
    else through `frame_attention`. cos, sin [Np, H]: the 2-D RoPE; segment [Np]: the frame ids."""
    dtype = options.dtype
    w = lambda v: v[...].astype(dtype)
    act = activation(cfg.hidden_act)
    num_patches = x.shape[0]
    y = layer_norm(x, b.norm1_scale_e[...], b.norm1_bias_e[...], LN_EPS)
    qkv = jnp.einsum("pe,eknh->pknh", y, w(b.qkv_weight_e3nh)) + w(b.qkv_bias_3nh)  # [Np, 3, N, H]
    q = apply_vision_rope(qkv[:, 0], cos, sin)
    k = apply_vision_rope(qkv[:, 1], cos, sin)
    if frame_len is None:
        attn = frame_attention(q, k, qkv[:, 2], segment, cfg.head_dim**-0.5)
    else:  # each frame attends to itself only: no mask (so no bias for a fused kernel)
        frames = lambda t: t.reshape(-1, frame_len, *t.shape[1:])  # [frames, frame_len, heads, H]
        attn = dot_product_attention(frames(q), frames(k), frames(qkv[:, 2]), None, cfg.head_dim**-0.5,
                                     impl=options.attention_impl)
        attn = attn.reshape(num_patches, *attn.shape[2:])
    x = x + jnp.einsum("pnh,nhe->pe", attn, w(b.proj_weight_nhe)) + w(b.proj_bias_e)
    y = layer_norm(x, b.norm2_scale_e[...], b.norm2_bias_e[...], LN_EPS)
    y = act(y @ w(b.fc1_weight_ef) + w(b.fc1_bias_f))
    x = x + y @ w(b.fc2_weight_fe) + w(b.fc2_bias_e)
    return constrain(x, ("length", "vision_embed"), options.rules)
