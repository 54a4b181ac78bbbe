"""Qwen2-VL in Flax NNX: vision tower + Qwen2 decoder with M-RoPE.

The forward pass is split into the pieces the IVT-LR loop and decoding compose:
`embed_inputs` (token embeddings with image features scattered in) -> `positions` (3-D M-RoPE ids)
-> `decode` (the decoder stack on a chunk, with or without KV cache, optionally returning one
attention-probability row per layer) -> `logits`. `__call__` chains them like transformers' forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..common.lm import DecoderLM, ModelOutput, is_concrete, scatter_image_features
from ..common.rope import rope_cos_sin
from .config import Qwen2VLConfig
from .rope_index import get_rope_index
from .vision import VisionTower


class Qwen2VL(DecoderLM):
    tower_cls = VisionTower  # the vision tower (Qwen2.5-VL swaps in its own)

    def __init__(self, config: Qwen2VLConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs, **options):
        """options: dtype (compute), remat, rules, scan_layers, attention_impl (see DecoderLM)."""
        super().__init__(config, param_dtype=param_dtype, rngs=rngs, **options)
        self.visual = self.tower_cls(config.vision, self.options, param_dtype=param_dtype, rngs=rngs)

    # ---- inputs -------------------------------------------------------------------------------
    def image_features(self, pixel_values: jax.Array, image_grid_thw: jax.Array) -> jax.Array:
        """Vision tower + merger -> [Np / 4, D]. pixel_values: [Np, patch_dim] (transformers' layout) or
        [images, patches, patch_dim] (one image per leading index, all of one size: `stack_images`).
        Attention stays within each image frame through `common.frame_attention` (pairs of tiles that share a
        frame, flash-style backward), whatever the layout. With attention_impl "fused" and frames of one size
        (read off the shape of 3-D pixel_values, static under jit, or off a concrete image_grid_thw) it runs
        per frame instead ([frames, L, L] blocks: one block size, which a fused kernel needs). With "xla" the
        tiled path is the faster (CPU, docs/benchmarks.md section 12: forward as fast, backward ~30% less)."""
        frame_len = None
        if pixel_values.ndim == 3:
            if pixel_values.shape[0] != image_grid_thw.shape[0]:
                raise ValueError(f"pixel_values {pixel_values.shape} holds {pixel_values.shape[0]} images but "
                                 f"image_grid_thw {image_grid_thw.shape} describes {image_grid_thw.shape[0]}")
            frame_len = pixel_values.shape[1]  # one frame (t = 1) per image
            pixel_values = pixel_values.reshape(-1, pixel_values.shape[-1])
        if is_concrete(image_grid_thw):
            frame_len = uniform_frame_len(np.asarray(image_grid_thw))
        return self.visual(pixel_values, image_grid_thw, attended_frame_len(frame_len, self.options.attention_impl))

    def embed_inputs(
        self, input_ids: jax.Array, pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None,
        pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
    ) -> jax.Array:
        """Token embeddings [B, T, D] with the image placeholder positions overwritten, in order, by the
        image features (transformers' `masked_scatter`). Video inputs are refused."""
        refuse_video(input_ids, self.config, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                     second_per_grid_ts=second_per_grid_ts)
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values, image_grid_thw)
        return self.with_image_features(embeds, input_ids == self.config.image_token_id, features)

    def with_image_features(self, embeds: jax.Array, image_mask: jax.Array, features) -> jax.Array:
        """embeds [B, T, D] with the True positions of image_mask [B, T] overwritten, in order, by the
        `image_features` (Qwen3-VL also carries its DeepStack features)."""
        return scatter_image_features(embeds, image_mask, features)

    def positions(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                  image_grid_thw: jax.Array | None = None, position_ids: jax.Array | None = None) -> jax.Array:
        """[3, B, T] position ids as transformers' forward: explicit ids ([B, T] broadcast to the three
        rows, [3, B, T], or [4, B, T] whose first row is text positions) are used as given; otherwise
        M-RoPE from `get_rope_index` when images are present, else 0..T-1."""
        b, t = input_ids.shape
        if position_ids is not None:
            position_ids = jnp.asarray(position_ids)
            if position_ids.ndim == 2:
                return jnp.broadcast_to(position_ids[None], (3, b, t))
            if position_ids.ndim == 3 and position_ids.shape[0] == 4:
                return position_ids[1:]
            if position_ids.ndim == 3 and position_ids.shape[0] == 3:
                return position_ids
            raise ValueError(f"position_ids must be [B, T], [3, B, T] or [4, B, T]; got {position_ids.shape}")
        if image_grid_thw is None:
            return jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t))
        return self.rope_index(input_ids, attention_mask, image_grid_thw)[0]

    def rope_index(self, input_ids, attention_mask, image_grid_thw, video_grid_thw=None):
        """(positions [3, B, T], deltas [B, 1]) as transformers' `get_rope_index` (and Qwen2.5-VL's, which is
        the same for images); video grids are refused."""
        refuse_video(input_ids, self.config, video_grid_thw=video_grid_thw)
        return get_rope_index(
            input_ids,
            image_grid_thw,
            attention_mask,
            image_token_id=self.config.image_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B, T, head_dim] of M-RoPE positions [3, B, T] (or [B, T]: 1-D on all rows)."""
        return rope_cos_sin(positions, self.config.text.head_dim, self.config.rope_theta, self.config.mrope_section)

    # ---- transformers-like forward ------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *, output_hidden_states: bool = False,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> ModelOutput:
        """transformers' forward, images only (video inputs are refused)."""
        refuse_video(input_ids, self.config, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                     second_per_grid_ts=second_per_grid_ts)
        if pixel_values is not None and is_concrete(input_ids) and is_concrete(image_grid_thw):
            check_image_tokens(np.asarray(input_ids), np.asarray(image_grid_thw), self.config)
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        pos = self.positions(input_ids, attention_mask, image_grid_thw, position_ids)
        return self.forward_embeds(embeds, pos, attention_mask, output_hidden_states)


def refuse_video(input_ids=None, config: Qwen2VLConfig | None = None, **video) -> None:
    """Raise ValueError when video inputs are given (or, for concrete ids, video placeholder tokens)."""
    given = sorted(k for k, v in video.items() if v is not None)
    family = getattr(config, "model_type", "qwen2_vl")
    if given:
        raise ValueError(f"{family}: video inputs are not supported (got {', '.join(given)}); images only")
    if input_ids is not None and config is not None and is_concrete(input_ids):
        if np.any(np.asarray(input_ids) == config.video_token_id):
            raise ValueError(f"{family}: video inputs are not supported (input_ids hold <|video_pad|> tokens, "
                             f"id {config.video_token_id}); images only")


def check_image_tokens(input_ids: np.ndarray, image_grid_thw: np.ndarray, config: Qwen2VLConfig) -> None:
    """Raise when the number of image placeholder tokens differs from the number of image features."""
    n_tokens = int((input_ids == config.image_token_id).sum())
    n_features = int(np.prod(image_grid_thw, axis=-1).sum()) // config.vision.spatial_merge_size**2
    if n_tokens != n_features:
        raise ValueError(
            f"image tokens and image features do not match: input_ids hold {n_tokens} <|image_pad|> tokens "
            f"(id {config.image_token_id}) but image_grid_thw {image_grid_thw.tolist()} gives {n_features} features"
        )


def uniform_frame_len(image_grid_thw: np.ndarray) -> int | None:
    """Patches per frame when every image frame of the batch has the same grid, else None."""
    sizes = {int(h) * int(w) for _, h, w in np.asarray(image_grid_thw).reshape(-1, 3)}
    return sizes.pop() if len(sizes) == 1 else None


def attended_frame_len(frame_len: int | None, attention_impl: str) -> int | None:
    """The static frame length the vision tower attends per frame with (attention_impl "fused": one block
    size for the kernel), or None: `frame_attention`, the faster with "xla" (see `Qwen2VL.image_features`)."""
    return frame_len if attention_impl == "fused" else None
