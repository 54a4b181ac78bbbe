"""What every decoder-only VLM here shares once its inputs are embeddings: the token table, the
decoder stack (with or without KV cache, optionally returning one attention row per layer), the
final norm and the LM head. A family subclasses `DecoderLM`, creates its own input side (vision
tower or VQ tokenizer) and says how positions become RoPE angles (`rope`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import causal_mask
from .decoder import Attend, DecoderConfig, DecoderLayers, run_decoder
from .kv_cache import KVCache
from .layers import acc_dtype, param, rms_norm
from .run_options import RunOptions
from .sharding import ShardingRules, constrain


class DecodeOutput(NamedTuple):
    hidden: jax.Array  # [B, T, D] after the final norm
    cache: KVCache | None
    row_probs: jax.Array | None  # [L, B, S] head-averaged attention probabilities of the chosen rows
    layer_hidden: jax.Array | None  # [L, B, T, D] every layer's output (the last one before the final norm)


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V]
    # as transformers: embeddings, the outputs of layers 1..L-1, then the final-norm output of layer L
    hidden_states: tuple[jax.Array, ...] | None


class DecoderLM(nnx.Module):
    """A family's model class calls this `__init__` (its config has `text`, `vocab_size` and
    `tie_word_embeddings`), adds its input side, and defines `rope(positions) -> (cos, sin)`."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 rules: ShardingRules | None = None, scan_layers: bool = True, unroll_scans: bool = False,
                 attention_impl: str = "xla", rngs: nnx.Rngs):
        """scan_layers: run the stacked layers (decoder and vision tower) under `lax.scan`, so compile time
        does not grow with depth (the default, for 7B models); False unrolls them, which runs faster for
        shallow models (no per-iteration slicing of weights and residuals: ~10% of a 4-layer training step
        on CPU) at the price of a compile time proportional to depth. unroll_scans: also unroll the loops
        over latent passes and loss chunks, so that XLA's cost analysis counts each iteration (the
        planner's FLOP count). attention_impl: "xla" (explicit einsums) or "fused"
        (`jax.nn.dot_product_attention`, cuDNN on GPU where it fits) for the decoder's and the vision
        tower's attentions; see common/attention.py. All but scan_layers and unroll_scans are the modules'
        `RunOptions`, held by the decoder stack and the input side (`options`)."""
        text: DecoderConfig = config.text
        D, V = text.hidden_size, config.vocab_size
        self.config = config
        self.text_config = text
        self.scan_layers = scan_layers
        self.unroll_scans = unroll_scans
        self.options = RunOptions(dtype, remat, rules, unroll_scans or not scan_layers, attention_impl)
        self.embed_vd = param(rngs, (V, D), ("vocab", "embed"), param_dtype)
        self.layers = DecoderLayers(text, self.options, param_dtype=param_dtype, rngs=rngs)
        self.final_norm_d = param(rngs, (D,), ("norm",), param_dtype, "ones")
        self.lm_head_dv = None if config.tie_word_embeddings else param(rngs, (D, V), ("embed", "vocab"), param_dtype)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    # the run options, read where the LM computes itself (embeddings, logits) and by its callers
    dtype = property(lambda self: self.options.dtype)
    remat = property(lambda self: self.options.remat)
    rules = property(lambda self: self.options.rules)
    attention_impl = property(lambda self: self.options.attention_impl)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return constrain(self.embed_vd[...].astype(self.dtype)[input_ids], ("batch", "length", "embed"), self.rules)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.text_config
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
        dropout_key: jax.Array | None = None,
        layer_addends: jax.Array | None = None,
    ) -> DecodeOutput:
        """Run the decoder on embeds [B, T, D] at the family's positions for them.

        With `cache`, the chunk is written at `cache.end` (per row when it is [B]) and attends to everything
        cached before it.
        `prob_rows` [B]: return, per layer, the head-averaged attention probabilities of that query row.
        `dropout_key`: training-mode LoRA dropout (None: deterministic).
        `layer_addends` [A, B, T, D]: added to the outputs of the first A layers (see `run_decoder`).
        """
        b, t, _ = embeds.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        cos, sin = self.rope(positions)
        if cache is None:
            mask = causal_mask(jnp.arange(t), valid)
            cache_kv, write_index = None, None
        else:
            if cache.end.ndim:  # per row [B]: each row's chunk at its own slots
                write_row = lambda row, chunk, end: jax.lax.dynamic_update_slice(row, chunk, (end,))
                key_valid = jax.vmap(write_row)(cache.valid, valid, cache.end)
                query_slots = cache.end[:, None] + jnp.arange(t)  # [B, T]
            else:
                zero = jnp.zeros((), cache.end.dtype)
                key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (zero, cache.end))
                query_slots = cache.end + jnp.arange(t)  # [T]
            mask = causal_mask(query_slots, key_valid)
            cache_kv, write_index = (cache.k, cache.v), cache.end
        out = run_decoder(self.layers, embeds.astype(self.dtype), Attend(cos, sin, mask, write_index, prob_rows),
                          cache_kv=cache_kv, collect_hidden=collect_hidden, dropout_key=dropout_key,
                          layer_addends=layer_addends)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=out.cache_kv[0], v=out.cache_kv[1], valid=key_valid, end=cache.end + t)
        hidden = rms_norm(out.hidden, self.final_norm_d[...], self.text_config.rms_norm_eps)
        return DecodeOutput(hidden, new_cache, out.row_probs, out.all_hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] (fp32 accumulation)."""
        head = self.embed_vd[...].T if self.lm_head_dv is None else self.lm_head_dv[...]
        flat = hidden.reshape(-1, hidden.shape[-1])  # one token axis: see lora.token_einsum
        logits = jnp.einsum("md,dv->mv", flat, head.astype(self.dtype), preferred_element_type=acc_dtype(hidden))
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])

    def forward_embeds(self, embeds, positions, attention_mask, output_hidden_states: bool) -> ModelOutput:
        """Logits (and transformers-style hidden states) of a full forward from input embeddings."""
        out = self.decode(embeds, positions, attention_mask, collect_hidden=output_hidden_states)
        hidden_states = None
        if output_hidden_states:
            n = out.layer_hidden.shape[0]
            hidden_states = (embeds, *[out.layer_hidden[i] for i in range(n - 1)], out.hidden)
        return ModelOutput(self.logits(out.hidden), hidden_states)


def is_concrete(x) -> bool:
    """False for tracers: host-side input checks run only on concrete (eager) inputs."""
    return not isinstance(x, jax.core.Tracer)


def scatter_image_features(embeds: jax.Array, image_mask: jax.Array, features: jax.Array) -> jax.Array:
    """Overwrite the True positions of image_mask [B, T] (row-major order) with features [N, D]."""
    flat_mask = image_mask.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, features.shape[0] - 1)
    gathered = features.astype(embeds.dtype)[index].reshape(embeds.shape)
    return jnp.where(image_mask[..., None], gathered, embeds)
