"""Rotary position embeddings: 1-D RoPE, Qwen2-VL's multimodal M-RoPE, and the vision tower's 2-D RoPE."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(rotary_dim: int, theta: float) -> jax.Array:
    """[rotary_dim // 2] inverse frequencies, computed in fp32 as transformers does."""
    return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def rope_cos_sin(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int] | None = None,
    interleaved: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] in fp32.

    positions: [B, T] (1-D RoPE) or [3, B, T] (M-RoPE: temporal, height, width position ids). With
    `mrope_section` (e.g. [16, 24, 24], summing to head_dim // 2) frequency band j takes its angle from
    position row `section_of(j) % 3`, as in transformers' Qwen2-VL; 1-D positions are broadcast to all
    three rows, which is plain RoPE. `interleaved` (Qwen3-VL): band j takes row 1 (height) when j % 3 == 1
    and j < 3 * mrope_section[1], row 2 (width) when j % 3 == 2 and j < 3 * mrope_section[2], else row 0.
    """
    inv_freq = inverse_frequencies(head_dim, theta)  # [H/2]
    positions = positions.astype(jnp.float32)
    if mrope_section is None:
        if positions.ndim == 3:
            positions = positions[0]
        freqs = positions[..., None] * inv_freq  # [B, T, H/2]
    else:
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim // 2 = {head_dim // 2}")
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
        freqs3 = positions[..., None] * inv_freq  # [3, B, T, H/2]
        band_row = mrope_band_rows(mrope_section, interleaved)  # [H/2]
        freqs = jnp.take_along_axis(freqs3, jnp.asarray(band_row)[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def mrope_band_rows(mrope_section: Sequence[int], interleaved: bool) -> np.ndarray:
    """[sum(mrope_section)]: the position row (0 temporal, 1 height, 2 width) of each frequency band."""
    if not interleaved:  # contiguous sections (Qwen2-VL)
        return np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])
    j = np.arange(sum(mrope_section))
    rows = np.zeros_like(j)
    for row in (1, 2):
        rows[(j % 3 == row) & (j < 3 * mrope_section[row])] = row
    return rows


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, N, H]; cos, sin: [B, T, H]. Computed in x's dtype, as transformers does for the LM."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def vision_rope_cos_sin(hw_positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D RoPE of the Qwen2-VL vision tower. hw_positions: [N, 2] (row, column) -> cos, sin [N, head_dim]."""
    inv_freq = inverse_frequencies(head_dim // 2, theta)  # [H/4]
    freqs = hw_positions.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, H/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [N, H/2]: rows' bands then columns' bands
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_vision_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [N, heads, H]; rotation in fp32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * cos[:, None, :] + rotate_half(xf) * sin[:, None, :]
    return y.astype(x.dtype)
