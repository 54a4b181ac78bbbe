"""Qwen2-VL in Flax NNX: vision tower + Qwen2 decoder with M-RoPE.

The forward pass is split into the pieces the IVT-LR loop and the sampler compose:
`embed_inputs` (token embeddings with image features scattered in) -> `positions` (3-D M-RoPE ids)
-> `decode` (the decoder stack on a chunk, with or without KV cache, optionally returning one
attention-probability row per layer) -> `logits`. `__call__` chains them like transformers' forward.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..common.attention import causal_mask
from ..common.decoder import DecoderLayers, DecoderOutput, run_decoder
from ..common.kv_cache import KVCache
from ..common.layers import param, rms_norm
from ..common.rope import rope_cos_sin
from ..common.sharding import ShardingRules, constrain
from .config import Qwen2VLConfig
from .rope_index import get_rope_index
from .vision import VisionTower


class DecodeOutput(NamedTuple):
    hidden: jax.Array  # [B, T, D] after the final norm
    cache: KVCache | None
    row_probs: jax.Array | None  # [L, B, S]
    layer_hidden: jax.Array | None  # [L, B, T, D] every layer's output (the last one before the final norm)


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V]
    # as transformers: embeddings, the outputs of layers 1..L-1, then the final-norm output of layer L
    hidden_states: tuple[jax.Array, ...] | None


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class Qwen2VL(nnx.Module):
    def __init__(
        self,
        config: Qwen2VLConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rules: ShardingRules | None = None,
        rngs: nnx.Rngs,
    ):
        D, V = config.text.hidden_size, config.vocab_size
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.rules = rules
        self.visual = VisionTower(config.vision, param_dtype=param_dtype, rngs=rngs)
        self.embed_vd = param(rngs, (V, D), ("vocab", "embed"), param_dtype)
        self.layers = DecoderLayers(config.text, param_dtype=param_dtype, rngs=rngs)
        self.final_norm_d = param(rngs, (D,), ("norm",), param_dtype, "ones")
        self.lm_head_dv = None if config.tie_word_embeddings else param(rngs, (D, V), ("embed", "vocab"), param_dtype)

    # ---- inputs -------------------------------------------------------------------------------
    def image_features(self, pixel_values: jax.Array, image_grid_thw: jax.Array) -> jax.Array:
        """Vision tower + merger: [Np, patch_dim] -> [Np / 4, D]."""
        return self.visual(
            self.config.vision, pixel_values, image_grid_thw, dtype=self.dtype, remat=self.remat, rules=self.rules
        )

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return constrain(self.embed_vd[...].astype(self.dtype)[input_ids], ("batch", "length", "embed"), self.rules)

    def embed_inputs(
        self, input_ids: jax.Array, pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None
    ) -> jax.Array:
        """Token embeddings [B, T, D] with the image placeholder positions overwritten, in order, by the
        image features (transformers' `masked_scatter`)."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values, image_grid_thw)
        return scatter_image_features(embeds, input_ids == self.config.image_token_id, features)

    def positions(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
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

    def rope_index(self, input_ids, attention_mask, image_grid_thw):
        """(positions [3, B, T], deltas [B, 1]) as transformers' `get_rope_index`."""
        return get_rope_index(
            input_ids,
            image_grid_thw,
            attention_mask,
            image_token_id=self.config.image_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
        )

    def prompt_positions(self, input_ids, attention_mask=None, image_grid_thw=None) -> tuple[jax.Array, jax.Array]:
        """Positions of a (left-padded) prompt as transformers' `generate` computes them, and the
        position [B] of the first generated token (max prompt position + 1, i.e. rope delta + length)."""
        pos, _ = self.rope_index(input_ids, attention_mask, image_grid_thw)
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        next_pos = jnp.max(jnp.where(valid[None], pos, -1), axis=(0, 2)) + 1
        return pos, next_pos

    def step_positions(self, next_pos: jax.Array, length: int = 1) -> jax.Array:
        """[3, B, length] positions of `length` new text tokens starting at next_pos [B]."""
        pos = next_pos[:, None] + jnp.arange(length)[None]
        return jnp.broadcast_to(pos[None], (3, *pos.shape))

    # ---- decoder ------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config.text
        return KVCache.init(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, dtype or self.dtype)

    def decode(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        prob_rows: jax.Array | None = None,
        collect_hidden: bool = False,
    ) -> DecodeOutput:
        """Run the decoder on embeds [B, T, D] at positions [3, B, T] (or [B, T] for 1-D RoPE).

        With `cache`, the chunk is written at `cache.end` and attends to everything cached before it.
        """
        b, t, _ = embeds.shape
        c = self.config
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        cos, sin = rope_cos_sin(positions, c.text.head_dim, c.rope_theta, c.mrope_section)
        if cache is None:
            mask = causal_mask(jnp.arange(t), valid)
            cache_kv, write_index = None, None
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.end))
            mask = causal_mask(cache.end + jnp.arange(t), key_valid)
            cache_kv, write_index = (cache.k, cache.v), cache.end
        out: DecoderOutput = run_decoder(
            self.layers,
            c.text,
            embeds.astype(self.dtype),
            cos,
            sin,
            mask,
            cache_kv=cache_kv,
            write_index=write_index,
            prob_rows=prob_rows,
            collect_hidden=collect_hidden,
            remat=self.remat,
            dtype=self.dtype,
            rules=self.rules,
        )
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=out.cache_kv[0], v=out.cache_kv[1], valid=key_valid, end=cache.end + t)
        hidden = rms_norm(out.hidden, self.final_norm_d[...], c.text.rms_norm_eps)
        return DecodeOutput(hidden, new_cache, out.row_probs, out.all_hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] (fp32 accumulation)."""
        head = self.embed_vd[...].T if self.lm_head_dv is None else self.lm_head_dv[...]
        return jnp.einsum("...d,dv->...v", hidden, head.astype(self.dtype), preferred_element_type=jnp.float32)

    # ---- transformers-like forward ------------------------------------------------------------
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        if pixel_values is not None and _is_concrete(input_ids) and _is_concrete(image_grid_thw):
            check_image_tokens(np.asarray(input_ids), np.asarray(image_grid_thw), self.config)
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        pos = self.positions(input_ids, attention_mask, image_grid_thw, position_ids)
        out = self.decode(embeds, pos, attention_mask, collect_hidden=output_hidden_states)
        hidden_states = None
        if output_hidden_states:
            n = out.layer_hidden.shape[0]
            hidden_states = (embeds, *[out.layer_hidden[i] for i in range(n - 1)], out.hidden)
        return ModelOutput(self.logits(out.hidden), hidden_states)


def scatter_image_features(embeds: jax.Array, image_mask: jax.Array, features: jax.Array) -> jax.Array:
    """Overwrite the True positions of image_mask [B, T] (row-major order) with features [N, D]."""
    flat_mask = image_mask.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, features.shape[0] - 1)
    gathered = features.astype(embeds.dtype)[index].reshape(embeds.shape)
    return jnp.where(image_mask[..., None], gathered, embeds)


def check_image_tokens(input_ids: np.ndarray, image_grid_thw: np.ndarray, config: Qwen2VLConfig) -> None:
    """Raise when the number of image placeholder tokens differs from the number of image features."""
    n_tokens = int((input_ids == config.image_token_id).sum())
    n_features = int(np.prod(image_grid_thw, axis=-1).sum()) // config.vision.spatial_merge_size**2
    if n_tokens != n_features:
        raise ValueError(
            f"image tokens and image features do not match: input_ids hold {n_tokens} <|image_pad|> tokens "
            f"(id {config.image_token_id}) but image_grid_thw {image_grid_thw.tolist()} gives {n_features} features"
        )
