"""Batched IVT-LR generation (REFERENCE.md section 4): prefill the question, run the latent passes under
`lax.scan` (the same `latent_passes` as training), then decode from the same KV cache under
`lax.while_loop` until every row has produced EOS or `max_new_tokens`.

The official code generates one example at a time and runs a final full forward before decoding; the
last latent pass already leaves the cache and the last hidden state that forward would produce, so
decoding starts right after it. Greedy by default; temperature and top-p sampling as options.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .latent import LatentConfig, first_latent_index, image_inputs_of, latent_layout, latent_passes, sequence_positions
from .models.qwen2vl.modeling import uniform_frame_len


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int = 0


class Generation(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens]: a row's tokens up to and including its EOS, then pad_token_id
    lengths: jax.Array  # [B] generated tokens before EOS (EOS not counted)
    selected: jax.Array  # [n, B, K] patches inserted before each latent


def next_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] -> token [B]: argmax, or a temperature / nucleus (top-p) sample."""
    if cfg.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cumulative = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_index = jnp.sum(cumulative - probs < cfg.top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def ivtlr_generate(model: nnx.Module, batch: dict, latent: LatentConfig, sampling: SamplingConfig,
                   *, key: jax.Array | None = None, prefix_len: int | None = None) -> Generation:
    """Generate for prompts `question + <|latent|> x n [+ suffix]`, left-padded to a common length (so their
    latents align; the suffix, e.g. the official Chameleon evaluation's separator token, has the same
    length in every row). `batch` holds input_ids, attention_mask, position_ids and the model's image
    inputs."""
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"])
    if not mask[:, -1].all():
        rows = np.flatnonzero(mask[:, -1] == 0).tolist()
        raise ValueError(f"prompts must be left-padded: rows {rows} end in padding")
    n, p = latent_layout(ids, latent.latent_token_id)
    counts = (ids == latent.latent_token_id).sum(axis=1)
    if n and (counts != n).any():
        raise ValueError(f"every prompt needs the same number of <|latent|> tokens; rows have {counts.tolist()}")
    suffix_len = ids.shape[1] - p - n if n else 0
    if n == 0:
        p = ids.shape[1]
    key = jax.random.key(0) if key is None else key
    frame_len = uniform_frame_len(batch["image_grid_thw"]) if batch.get("image_grid_thw") is not None else None
    jbatch = {k: jnp.asarray(v) for k, v in batch.items() if v is not None and k != "labels"}
    return _generate(model, jbatch, latent, sampling, key, n, prefix_len or p, frame_len, suffix_len)


@functools.partial(nnx.jit, static_argnames=("latent", "sampling", "n", "prefix_len", "frame_len", "suffix_len"))
def _generate(model, batch, latent, sampling, key, n, prefix_len, frame_len, suffix_len=0):
    b = batch["input_ids"].shape[0]
    embeds = model.embed_inputs(batch["input_ids"], **image_inputs_of(batch, frame_len))
    if n:
        p = first_latent_index(batch["input_ids"], latent.latent_token_id)
        positions = sequence_positions(model, latent, batch, prefix_len, p)
        _, tail_pos = positions
        selected, _, cache, h_last, p = latent_passes(model, latent, embeds, batch, n=n, prefix_len=prefix_len,
                                                      extra_cache=suffix_len + sampling.max_new_tokens,
                                                      positions=positions)
        if suffix_len:  # the prompt's tokens after the latents continue the sequence
            o = model.decode(embeds[:, embeds.shape[1] - suffix_len:], tail_pos(cache.end + jnp.arange(suffix_len)),
                             jnp.ones((b, suffix_len), bool), cache=cache)
            cache, h_last = o.cache, o.hidden[:, -1]
    else:  # no latents: an ordinary prompt
        p = jnp.int32(prefix_len)
        prefix_pos, tail_pos = sequence_positions(model, latent, batch, prefix_len, p)
        cache = model.init_cache(b, prefix_len + sampling.max_new_tokens)
        out = model.decode(embeds, prefix_pos, batch["attention_mask"], cache=cache)
        cache, h_last = out.cache, out.hidden[:, -1]
        selected = jnp.zeros((0, b, latent.num_selected_patches), jnp.int32)

    first = next_token(model.logits(h_last), jax.random.fold_in(key, 0), sampling)
    tokens = jnp.full((b, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32)
    lengths = jnp.zeros((b,), jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < sampling.max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, cache, done, tokens, lengths = state
        tokens = tokens.at[:, step].set(jnp.where(done, sampling.pad_token_id, token))  # EOS itself is kept
        if sampling.eos_token_id is not None:
            done = done | (token == sampling.eos_token_id)  # EOS is checked from the first token
        lengths = lengths + (~done).astype(jnp.int32)
        emb = model.embed_tokens(token[:, None])
        slot = cache.end[None]
        o = model.decode(emb, tail_pos(slot), jnp.ones((b, 1), bool), cache=cache)
        nxt = next_token(model.logits(o.hidden[:, -1]), jax.random.fold_in(key, step + 1), sampling)
        return step + 1, nxt, o.cache, done, tokens, lengths

    state = (jnp.zeros((), jnp.int32), first, cache, done, tokens, lengths)
    _, _, _, _, tokens, lengths = jax.lax.while_loop(cond, body, state)
    return Generation(tokens, lengths, selected)
