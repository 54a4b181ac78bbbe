"""Qwen3-VL in Flax NNX: Qwen2-VL's model (rope index, prompt/step positions, images only: video inputs
refused) with Qwen3's decoder (q/k RMSNorm, `DecoderConfig.qk_rmsnorm`), interleaved M-RoPE, this
family's vision tower, and DeepStack.

DeepStack: the features of the DeepStack mergers (one per `deepstack_visual_indexes` vision block) are
added to the outputs of the first decoder layers at the image-token positions (transformers'
`_deepstack_process`: merger a after layer a). They travel with the input embeddings: `embed_inputs`
returns, for a batch with images, [B, T, (1 + A) * D], the token embeddings (image features scattered
in) followed by the A DeepStack addends (zeros at text positions); every slice and gather along the
token axis (prefix, chunks, the latent loop's patches) keeps each position's addends with it, and
`decode` splits them off and adds them after layers 0..A-1. Embeddings of width D (text, generated
tokens, latent states) have no addends."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common.lm import DecodeOutput, ModelOutput, scatter_image_features
from ..common.rope import rope_cos_sin
from ..qwen2vl.modeling import Qwen2VL
from .vision import VisionFeatures, VisionTower


class Qwen3VL(Qwen2VL):
    tower_cls = VisionTower

    @property
    def num_deepstack(self) -> int:
        """A: the decoder layers that receive DeepStack addends."""
        return len(self.config.vision.deepstack_visual_indexes)

    def with_image_features(self, embeds: jax.Array, image_mask: jax.Array, features: VisionFeatures) -> jax.Array:
        """Token embeddings [B, T, D] with the merged image features scattered into the placeholders
        (image_mask [B, T]), followed on the feature axis by the A DeepStack addends: [B, T, (1 + A) * D]
        (see the module's doc). `embed_inputs` (Qwen2-VL's, video inputs refused) calls it when there are
        images; without, the embeddings are [B, T, D]."""
        addends = [scatter_image_features(jnp.zeros_like(embeds), image_mask, f) for f in features.deepstack]
        return jnp.concatenate([scatter_image_features(embeds, image_mask, features.merged), *addends], axis=-1)

    def split_deepstack(self, embeds: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """[B, T, D] or [B, T, (1 + A) * D] -> (input embeddings [B, T, D], addends [A, B, T, D] or None)."""
        d, width = self.config.text.hidden_size, embeds.shape[-1]
        if width == d:
            return embeds, None
        if width != (1 + self.num_deepstack) * d:
            raise ValueError(f"embeddings of width {width}: expected {d} (no images) or {(1 + self.num_deepstack) * d}"
                             f" (with {self.num_deepstack} DeepStack addends)")
        parts = embeds.reshape(*embeds.shape[:-1], 1 + self.num_deepstack, d)  # [B, T, 1 + A, D]
        return parts[..., 0, :], jnp.moveaxis(parts[..., 1:, :], -2, 0)

    def decode(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None,
               **kwargs) -> DecodeOutput:
        """`DecoderLM.decode` on embeddings with or without DeepStack addends (`embed_inputs`)."""
        inputs, addends = self.split_deepstack(embeds)
        return super().decode(inputs, positions, attention_mask, layer_addends=addends, **kwargs)

    def forward_embeds(self, embeds, positions, attention_mask, output_hidden_states: bool) -> ModelOutput:
        out = super().forward_embeds(embeds, positions, attention_mask, output_hidden_states)
        if not output_hidden_states:
            return out
        return out._replace(hidden_states=(self.split_deepstack(embeds)[0], *out.hidden_states[1:]))

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B, T, head_dim] of M-RoPE positions [3, B, T] with Qwen3-VL's interleaved bands."""
        return rope_cos_sin(positions, self.config.text.head_dim, self.config.rope_theta, self.config.mrope_section,
                            interleaved=True)
