"""Qwen2-VL's 3-D M-RoPE position ids, computed as transformers' `Qwen2VLModel.get_rope_index`,
vectorised (no Python loop over rows or images) so it runs under `jit` with static shapes.

Text tokens advance all three indices by one. An image of merged grid (t, h, w) starting at index
`s` gets (s + frame, s + row, s + column) and advances the index by max(h, w). Padding gets 0.
Images are consumed in batch order (row 0's images first), as the processor concatenates them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def get_rope_index(
    input_ids: jax.Array,
    image_grid_thw: jax.Array | None,
    attention_mask: jax.Array | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[jax.Array, jax.Array]:
    """-> position ids [3, B, T] (int32) and rope deltas [B, 1] (max position + 1 - valid length)."""
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    is_img = (input_ids == image_token_id) & valid
    text = valid & ~is_img

    if image_grid_thw is None or image_grid_thw.shape[0] == 0:
        base = jnp.cumsum(text, axis=1) - 1
        pos = jnp.where(valid, base, 0)
        pos3 = jnp.broadcast_to(pos[None], (3, b, t))
    else:
        grid = image_grid_thw.astype(jnp.int32)
        gh, gw = grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
        prev_img = jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))
        starts = is_img & ~prev_img  # first token of each image span
        img_before_row = jnp.cumsum(starts.sum(axis=1)) - starts.sum(axis=1)  # [B]
        image_idx = jnp.cumsum(starts, axis=1) - 1 + img_before_row[:, None]  # [B, T]
        image_idx = jnp.clip(image_idx, 0, grid.shape[0] - 1)
        h_img, w_img = gh[image_idx], gw[image_idx]
        advance = jnp.where(text, 1, 0) + jnp.where(starts, jnp.maximum(h_img, w_img), 0)
        base = jnp.cumsum(advance, axis=1) - advance  # index before this token's contribution
        slot = jnp.arange(t)[None, :]
        span_start = jax.lax.cummax(jnp.where(starts, slot, -1), axis=1)  # [B, T]
        span_start_c = jnp.maximum(span_start, 0)
        offset = slot - span_start_c
        start_pos = jnp.take_along_axis(base, span_start_c, axis=1)
        frame = offset // (h_img * w_img)
        row = (offset // w_img) % h_img
        col = offset % w_img
        img3 = start_pos[None] + jnp.stack([frame, row, col])
        text3 = jnp.broadcast_to(base[None], (3, b, t))
        pos3 = jnp.where(is_img[None], img3, jnp.where(valid[None], text3, 0))
    n_valid = valid.sum(axis=1)
    deltas = jnp.max(jnp.where(valid[None], pos3, -1), axis=(0, 2)) + 1 - n_valid
    return pos3.astype(jnp.int32), deltas[:, None].astype(jnp.int32)
