"""Qwen2.5-VL in Flax NNX: Qwen2-VL (same decoder, M-RoPE, rope index, prompt/step positions) with
the Qwen2.5-VL vision tower (window attention, RMSNorm, gated MLP). Images only: video inputs are
refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..common.lm import DecoderLM, ModelOutput, is_concrete
from ..qwen2vl.modeling import Qwen2VL
from .config import Qwen25VLConfig
from .vision import VisionTower


def refuse_video(input_ids=None, config: Qwen25VLConfig | None = None, **video) -> None:
    """Raise ValueError when video inputs are given (or, for concrete ids, video placeholder tokens)."""
    given = sorted(k for k, v in video.items() if v is not None)
    if given:
        raise ValueError(f"qwen2_5_vl: video inputs are not supported (got {', '.join(given)}); images only")
    if input_ids is not None and config is not None and is_concrete(input_ids):
        if np.any(np.asarray(input_ids) == config.video_token_id):
            raise ValueError(f"qwen2_5_vl: video inputs are not supported (input_ids hold <|video_pad|> tokens, "
                             f"id {config.video_token_id}); images only")


class Qwen25VL(Qwen2VL):
    def __init__(self, config: Qwen25VLConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs, **options):
        """options: dtype (compute), remat, rules, scan_layers, attention_impl (see DecoderLM)."""
        DecoderLM.__init__(self, config, param_dtype=param_dtype, rngs=rngs, **options)  # not Qwen2-VL's tower
        self.visual = VisionTower(config.vision, param_dtype=param_dtype, rngs=rngs)

    # image_features: Qwen2-VL's (3-D stacked pixel_values or a concrete grid give the per-frame layout),
    # calling this family's tower

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                     image_grid_thw: jax.Array | None = None, pixel_values_videos=None, video_grid_thw=None,
                     second_per_grid_ts=None) -> jax.Array:
        """As Qwen2-VL's; video inputs are refused."""
        refuse_video(input_ids, self.config, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                     second_per_grid_ts=second_per_grid_ts)
        return super().embed_inputs(input_ids, pixel_values, image_grid_thw)

    def rope_index(self, input_ids, attention_mask, image_grid_thw, video_grid_thw=None):
        """(positions [3, B, T], deltas [B, 1]) as transformers' `Qwen2_5_VLModel.get_rope_index` for
        images (identical to Qwen2-VL's)."""
        refuse_video(input_ids, self.config, video_grid_thw=video_grid_thw)
        return super().rope_index(input_ids, attention_mask, image_grid_thw)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
    ) -> ModelOutput:
        refuse_video(input_ids, self.config, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                     second_per_grid_ts=second_per_grid_ts)
        return super().__call__(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids,
                                output_hidden_states=output_hidden_states)
