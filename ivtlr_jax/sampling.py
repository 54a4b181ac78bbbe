"""Greedy decoding with the KV cache: prefill the (left-padded) prompt in one chunk, then one token
per step under `lax.while_loop` until every row has produced EOS or `max_new_tokens`.

The model supplies `embed_inputs`, `prompt_positions`, `step_positions`, `init_cache`, `decode` and
`logits` (both families do). The IVT-LR generation (latent passes before decoding) builds on this.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    **image_inputs: jax.Array,
) -> jax.Array:
    """-> generated tokens [B, max_new_tokens]; after a row's EOS its remaining slots hold pad_token_id.

    image_inputs: the model's image arguments (Qwen2-VL: pixel_values, image_grid_thw; Chameleon:
    pixel_values)."""
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    mask = np.asarray(attention_mask)
    if not mask[:, -1].all():
        bad = np.flatnonzero(~mask[:, -1].astype(bool)).tolist()
        raise ValueError(f"prompts must be left-padded: rows {bad} end in padding")
    image_inputs = {k: jnp.asarray(v) for k, v in image_inputs.items() if v is not None}
    return _greedy(model, input_ids, jnp.asarray(attention_mask), image_inputs,
                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "eos_token_id", "pad_token_id"))
def _greedy(model, input_ids, attention_mask, image_inputs, *, max_new_tokens, eos_token_id, pad_token_id):
    b, t = input_ids.shape
    cache = model.init_cache(b, t + max_new_tokens)
    embeds = model.embed_inputs(input_ids, **image_inputs)
    positions, next_pos = model.prompt_positions(input_ids, attention_mask, **image_inputs)
    out = model.decode(embeds, positions, attention_mask, cache=cache)
    first = jnp.argmax(model.logits(out.hidden[:, -1]), axis=-1).astype(jnp.int32)
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(state):
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, cache, done, tokens = state
        token = jnp.where(done, pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        emb = model.embed_tokens(token[:, None])
        o = model.decode(emb, model.step_positions(next_pos + step), jnp.ones((b, 1), bool), cache=cache)
        nxt = jnp.argmax(model.logits(o.hidden[:, -1]), axis=-1).astype(jnp.int32)
        return step + 1, nxt, o.cache, done, tokens

    state = (jnp.zeros((), jnp.int32), first, out.cache, done, tokens)
    return jax.lax.while_loop(cond, body, state)[-1]
