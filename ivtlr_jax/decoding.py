"""Decoding, in parts that every driver shares (docs/method.md section 17): what a prompt leaves for decoding
(`start_decoding`: image features, prefill, the latent passes, the prompt's suffix, the first token), the
running batch (`DecodeState`), one decoding step (`decode_step`) and the loop over it (`decode_loop`), and the
choice of a token (`next_tokens`).

Three drivers run these parts: static batches (`generate.ivtlr_generate`: a batch starts together and decodes
until its rows end), continuous batching (`continuous.py`: a finished row's slot takes the next prompt) and the
server (`serve/`: continuous batching that returns to the host every few steps to stream tokens). Each row
samples with its own key, temperature and top-p (`RowSampling`), so a prompt draws the same tokens whichever
driver, batch and slot it gets (greedy decoding draws nothing).

Every row of a `DecodeState` records its tokens at its own count, so rows that started at different times
decode together; the cache's `end` is [] when all rows write the same slot (a static batch) or [B] when each
row writes its own (`KVCache.per_row`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .latent import (LatentConfig, LatentShapes, chain_gap, first_latent_index, image_inputs_of, latent_passes,
                     sequence_positions)
from .models.common.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen (static under jit). temperature 0 compiles greedy decoding only; above 0 it
    compiles sampling, and is every row's temperature unless the row carries its own (`RowSampling`: a
    row at temperature 0 then decodes greedily)."""
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int = 0

    @property
    def samples(self) -> bool:
        return self.temperature > 0


class RowSampling(NamedTuple):
    """Each row's sampling: its key (the token after c recorded ones draws with `fold_in(key, c)`), its
    temperature (0: greedy) and top-p."""
    keys: jax.Array  # [B] keys
    temperature: jax.Array  # [B] float32
    top_p: jax.Array  # [B] float32

    @classmethod
    def of(cls, keys: jax.Array, sampling: SamplingConfig) -> "RowSampling":
        """Rows with keys [B] and the config's temperature and top-p."""
        b = keys.shape[0]
        return cls(keys, jnp.full((b,), sampling.temperature, jnp.float32), jnp.full((b,), sampling.top_p, jnp.float32))


def row_keys(key: jax.Array, rows: int) -> jax.Array:
    """A key per row: `key` itself when it already holds one per row [B], else row r's is fold_in(key, r)."""
    if key.ndim:
        if key.shape[0] != rows:
            raise ValueError(f"{key.shape[0]} sampling keys for {rows} rows")
        return key
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))


def next_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] -> token [B] with one key for the batch: argmax, or a temperature / nucleus (top-p)
    sample at the config's settings."""
    if not cfg.samples:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    b = logits.shape[0]
    return _sample(logits, key, jnp.full((b, 1), cfg.temperature, jnp.float32), jnp.full((b, 1), cfg.top_p))


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V], temperature and top_p [B, 1] (> 0) -> a sample [B] of the nucleus: the smallest prefix of
    the sorted distribution whose mass reaches top_p (always at least the top token; all of it at top_p 1)."""
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    cutoff_index = jnp.sum(cumulative - probs < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where((top_p < 1.0) & (logits < cutoff), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def next_tokens(logits: jax.Array, rows: RowSampling, counts: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] -> the token [B] each row draws after `counts` [B] recorded tokens: alone, with its own key,
    as it would in a batch of one (greedy rows take the argmax)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not cfg.samples:
        return greedy
    keys = jax.vmap(jax.random.fold_in)(rows.keys, counts)
    one = lambda row, key, t, p: _sample(row[None], key, jnp.maximum(t, 1e-6)[None, None], p[None, None])[0]
    sampled = jax.vmap(one)(logits, keys, rows.temperature, rows.top_p)
    return jnp.where(rows.temperature > 0, sampled, greedy)


class DecodeStart(NamedTuple):
    """What a prompt (prefill, latent passes, suffix) leaves for decoding."""
    cache: KVCache  # the prompt's keys and values, `end` after its last slot, room for max_new_tokens more
    first: jax.Array  # [B] the first generated token
    offset: jax.Array  # [B] (1-D RoPE) or [3, B] (M-RoPE): cache slot s of row b is at position s + offset[..., b]
    selected: jax.Array  # [n, B, K] patches inserted before each latent, as prompt indices (-1: no such latent)


def decode_positions(offset: jax.Array, slots: jax.Array) -> jax.Array:
    """The positions of decoding slots [] (every row) or [B] (per row) -> [B, 1] (or [3, B, 1])."""
    return (offset + slots)[..., None]


def start_decoding(model, batch: dict, latent: LatentConfig, sampling: SamplingConfig, rows: RowSampling,
                   shapes: LatentShapes, suffix_len: int = 0) -> DecodeStart:
    """Everything before the first decoding step: the image features and embeddings, the prefill and n latent
    passes (or a plain prefill without latents), the prompt's suffix after the latents, and each row's first
    token (drawn after 0 recorded tokens)."""
    b = batch["input_ids"].shape[0]
    n, prefix_len = shapes.num_latents, shapes.prefix_len
    embeds = model.embed_inputs(batch["input_ids"], **image_inputs_of(batch))
    if n:
        p = first_latent_index(batch["input_ids"], latent.latent_token_id)
        positions = sequence_positions(model, latent, batch, p)
        counts = jnp.sum(batch["input_ids"] == latent.latent_token_id, axis=1)  # [B] c_r
        gap = chain_gap(counts, n, latent.num_selected_patches)  # [B] masked chain slots of rows with fewer latents

        def row_pos(slots):  # cache slots [T] after the chain -> [B, T] (or [3, B, T]) positions the rows have alone
            return positions.tail(slots[None] - gap[:, None])

        chain = latent_passes(model, latent, embeds, batch, p, positions, n=n, prefix_len=prefix_len,
                              extra_cache=suffix_len + sampling.max_new_tokens)
        selected, cache, h_last = chain.selected, chain.cache, chain.h_last
        if suffix_len:  # the prompt's tokens after the latents continue the sequence
            o = model.decode(embeds[:, embeds.shape[1] - suffix_len:], row_pos(cache.end + jnp.arange(suffix_len)),
                             jnp.ones((b, suffix_len), bool), cache=cache)
            cache, h_last = o.cache, o.hidden[:, -1]
    else:  # no latents: an ordinary prompt
        positions = sequence_positions(model, latent, batch, jnp.int32(prefix_len))
        row_pos = positions.tail
        cache = model.init_cache(b, prefix_len + sampling.max_new_tokens)
        out = model.decode(embeds, positions.own, batch["attention_mask"], cache=cache)
        cache, h_last = out.cache, out.hidden[:, -1]
        selected = jnp.zeros((0, b, latent.num_selected_patches), jnp.int32)
    # every later slot s of a row is at position s + offset (RoPE's tail is linear in the slot)
    offset = row_pos(cache.end[None])[..., 0] - cache.end
    first = next_tokens(model.logits(h_last), rows, jnp.zeros((b,), jnp.int32), sampling)
    return DecodeStart(cache, first, offset, selected)


class DecodeState(NamedTuple):
    """The running batch: B rows (slots), each decoding one prompt's answer, or idle."""
    cache: KVCache  # end [] (every row at the same slot) or [B] (each row's next slot)
    token: jax.Array  # [B] the next token to record and feed
    rows: RowSampling  # each row's key, temperature, top-p
    offset: jax.Array  # [B] or [3, B]: positions of a row's slots (`DecodeStart.offset`)
    tokens: jax.Array  # [B, max_new_tokens] recorded so far, pad_token_id after
    count: jax.Array  # [B] tokens recorded
    lengths: jax.Array  # [B] recorded tokens before EOS
    live: jax.Array  # [B] bool: the row holds a prompt still generating


def decoding_state(start: DecodeStart, rows: RowSampling, sampling: SamplingConfig) -> DecodeState:
    """A batch that starts decoding together: every row live, nothing recorded."""
    b = start.first.shape[0]
    return DecodeState(start.cache, start.first, rows, start.offset,
                       jnp.full((b, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32),
                       jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool))


def decode_step(model, state: DecodeState, sampling: SamplingConfig) -> tuple[DecodeState, jax.Array]:
    """One step of every row: record each live row's token (EOS included), then feed it at the row's next slot
    and position and draw the next. -> (the state, [B] rows that finished at this step: EOS or max_new_tokens)."""
    b = state.token.shape[0]
    live, token, count = state.live, state.token, state.count
    column = jnp.minimum(count, sampling.max_new_tokens - 1)
    rows = jnp.arange(b)
    tokens = state.tokens.at[rows, column].set(jnp.where(live, token, state.tokens[rows, column]))
    eos = jnp.zeros_like(live) if sampling.eos_token_id is None else token == sampling.eos_token_id
    lengths = state.lengths + (live & ~eos).astype(jnp.int32)
    count = count + live.astype(jnp.int32)
    finished = live & (eos | (count >= sampling.max_new_tokens))
    cache = state.cache
    o = model.decode(model.embed_tokens(token[:, None]), decode_positions(state.offset, cache.end),
                     jnp.ones((b, 1), bool), cache=cache)
    nxt = next_tokens(model.logits(o.hidden[:, -1]), state.rows, count, sampling)
    still = live & ~finished
    if cache.end.ndim:  # rows with their own slots: finished and idle rows stay put
        o = o._replace(cache=o.cache.replace(end=jnp.where(still, o.cache.end, cache.end)))
    return DecodeState(o.cache, nxt, state.rows, state.offset, tokens, count, lengths, still), finished


def decode_loop(model, state: DecodeState, sampling: SamplingConfig, *, max_steps: jax.Array | int,
                stop_when_freed: jax.Array | bool = False) -> DecodeState:
    """`decode_step` until no row is live, `max_steps` steps are done, or (`stop_when_freed`) a row finishes,
    so that a driver can give its slot to the next prompt or read the tokens so far."""
    def cond(carry):
        state, steps, freed = carry
        return jnp.any(state.live) & (steps < max_steps) & ~(stop_when_freed & freed)

    def body(carry):
        state, steps, freed = carry
        state, finished = decode_step(model, state, sampling)
        return state, steps + 1, freed | jnp.any(finished)

    carry = (state, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    return jax.lax.while_loop(cond, body, carry)[0]
