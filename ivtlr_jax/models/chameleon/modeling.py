"""Chameleon in Flax NNX: the VQ tokenizer turns images into BPE tokens that the LM embeds with its
own token table; the decoder is Llama-style with per-head q/k LayerNorm and plain 1-D RoPE.

Same composable pieces as Qwen2-VL (`embed_inputs` -> `positions` -> `decode` -> `logits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..common.lm import DecoderLM, ModelOutput, is_concrete, scatter_image_features
from ..common.rope import rope_cos_sin
from .config import ChameleonConfig
from .vq import VQEncoder


class Chameleon(DecoderLM):
    def __init__(self, config: ChameleonConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs, **options):
        """options: dtype (compute), remat, rules (see DecoderLM)."""
        super().__init__(config, param_dtype=param_dtype, rngs=rngs, **options)
        self.vqmodel = VQEncoder(config.vq, param_dtype=param_dtype, rngs=rngs)

    def get_image_tokens(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [n_images, 3, H, W] -> BPE token ids [n_images, (H/16) * (W/16)]."""
        codes = self.vqmodel(pixel_values, dtype=self.dtype)
        return jnp.asarray(self.config.code_to_token, jnp.int32)[codes]

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D]; the `<image>` placeholders are replaced, in order, by the
        embeddings of the images' BPE tokens (transformers' masked_scatter)."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        image_embeds = self.embed_tokens(self.get_image_tokens(pixel_values)).reshape(-1, embeds.shape[-1])
        return scatter_image_features(embeds, input_ids == self.config.image_token_id, image_embeds)

    def positions(self, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        """[B, T]: explicit ids as given, else 0..T-1 (transformers' forward ignores the mask here)."""
        if position_ids is not None:
            return jnp.asarray(position_ids)
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None], input_ids.shape)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """As transformers' ChameleonForConditionalGeneration: image-code tokens get the lowest logit, so
        text generation and the loss's softmax never put mass on them."""
        logits = super().logits(hidden)
        suppressed = np.zeros(self.config.vocab_size, bool)
        suppressed[list(self.config.image_vocab_ids)] = True
        return jnp.where(jnp.asarray(suppressed), jnp.finfo(logits.dtype).min, logits)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rope_cos_sin(positions, self.config.text.head_dim, self.config.rope_theta)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, position_ids: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> ModelOutput:
        if pixel_values is not None and is_concrete(input_ids):
            check_image_tokens(np.asarray(input_ids), tuple(pixel_values.shape), self.config)
        embeds = self.embed_inputs(input_ids, pixel_values)
        return self.forward_embeds(embeds, self.positions(input_ids, attention_mask, position_ids), attention_mask,
                                   output_hidden_states)


def check_image_tokens(input_ids: np.ndarray, pixel_shape: tuple[int, ...], config: ChameleonConfig) -> None:
    n_tokens = int((input_ids == config.image_token_id).sum())
    factor = 2 ** (len(config.vq.channel_multiplier) - 1)
    n_features = pixel_shape[0] * (pixel_shape[2] // factor) * (pixel_shape[3] // factor)
    if n_tokens != n_features:
        raise ValueError(
            f"image tokens and image features do not match: input_ids hold {n_tokens} <image> tokens "
            f"(id {config.image_token_id}) but {pixel_shape[0]} image(s) of {pixel_shape[2]}x{pixel_shape[3]} "
            f"give {n_features} tokens"
        )
