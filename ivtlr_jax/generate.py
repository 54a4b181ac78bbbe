"""Batched IVT-LR generation (docs/method.md section 17): prefill the question, run the latent passes under
`lax.scan` (the same `latent_passes` as training), then decode from the same KV cache under
`lax.while_loop` until every row has produced EOS or `max_new_tokens`.

The official code generates one example at a time and runs a final full forward before decoding; the
last latent pass already leaves the cache and the last hidden state that forward would produce, so
decoding starts right after it. Greedy by default; temperature and top-p sampling as options. Prompts
without latents skip the chain (plain decoding, which the parity tests compare with transformers'
`generate`). Everything before the first decoding step (`start_decoding`) is shared with continuous
batching (continuous.py), whose decode loop differs in keeping a row's cache end, count and sampling
key per row.

Prompts may have different latent counts c_r (mixed prompts in one batch; docs/method.md section 10, where the
official forward, batch-1 at evaluation, would insert every pass's patches into every row): every row
generates what it generates alone. The prompts are re-laid out so that their first latents align
(`align_first_latents`); the chain masks out the passes a row does not have (`latent_passes`), so the
cache holds (n - c_r)*(K+1) masked slots after that row's chain, and every later token of the row (its
suffix, its generated tokens) gets the position it has alone, skipping them (`chain_gap`). Each row
continues from the state at its own last latent.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .data.collate import left_padded_positions
from .latent import (LatentConfig, LatentShapes, chain_gap, first_latent_index, image_inputs_of, latent_layout,
                     latent_passes, sequence_positions)
from .models.common.kv_cache import KVCache


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
    selected: jax.Array  # [n, B, K] patches inserted before each latent, as prompt indices (-1: no such latent)


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


def next_token_per_row(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """`next_token` with a key per row [B]: row b draws what it draws alone (a batch of one) with keys[b]."""
    if cfg.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)  # greedy: no randomness
    return jax.vmap(lambda row, k: next_token(row[None], k, cfg)[0])(logits, keys)


def align_first_latents(ids: np.ndarray, mask: np.ndarray, latent_token_id: int) -> tuple[dict, np.ndarray]:
    """Left-padded prompts `question + <|latent|> x c_r + suffix` with different counts c_r (n the largest)
    -> the layout the latent loop reads, each row `pad, question, <|latent|> x c_r, pad x (n - c_r),
    suffix`: first latents at a common index p, suffixes (the same length in every row) in the last
    columns. The width stays the prompts' when that fits. A row without latents is `question + suffix`.

    Returns ({input_ids, attention_mask, position_ids}, shift [B]: how far each row's question moved
    right)."""
    b, s = ids.shape
    is_latent = ids == latent_token_id
    counts = is_latent.sum(axis=1)
    n = int(counts.max())
    after_last = np.argmax(is_latent[:, ::-1], axis=1)  # tokens after a row's last latent
    suffixes = sorted({int(after_last[r]) for r in np.flatnonzero(counts)})
    if len(suffixes) > 1:
        raise ValueError(f"rows end with {suffixes} tokens after their last <|latent|>; the suffix after the latents "
                         "must have the same length in every row")
    suffix_len = suffixes[0]
    lengths = mask.sum(axis=1)
    questions = lengths - counts - suffix_len
    if (questions < 0).any():
        raise ValueError(f"rows {np.flatnonzero(questions < 0).tolist()} are shorter than the suffix ({suffix_len})")
    width = max(s, int(questions.max()) + n + suffix_len)
    p = width - n - suffix_len
    pad_id = ids[mask == 0][0] if (mask == 0).any() else 0
    out = {"input_ids": np.full((b, width), pad_id, ids.dtype), "attention_mask": np.zeros((b, width), mask.dtype),
           "position_ids": np.zeros((b, width), np.int32)}
    for r in range(b):
        row, q, c = ids[r, s - lengths[r]:], questions[r], counts[r]
        if not (row[q:q + c] == latent_token_id).all():
            raise ValueError(f"row {r}: its <|latent|> tokens are not one block followed by the suffix")
        for cols, part in ((slice(p - q, p + c), row[:q + c]), (slice(width - suffix_len, width), row[q + c:])):
            out["input_ids"][r, cols] = part
            out["attention_mask"][r, cols] = 1
        out["position_ids"][r, p - q:p + c] = np.arange(q + c)
        out["position_ids"][r, width - suffix_len:] = q + c + np.arange(suffix_len)
    return out, (p - questions) - (s - lengths)


class Prompts(NamedTuple):
    """Prompts laid out for `start_decoding` (`prepare_prompts`)."""
    batch: dict  # device arrays: input_ids, attention_mask, position_ids, image inputs
    shapes: LatentShapes  # n and the prefix length (static)
    suffix_len: int  # tokens after the latents (static)
    shift: np.ndarray | None  # [B] how far each row moved right to align first latents (None: not moved)


def prepare_prompts(batch: dict, latent: LatentConfig, prefix_len: int | None = None) -> Prompts:
    """Check and lay out left-padded prompts on the host: position ids filled in, first latents aligned
    (rows with different latent counts), the static shapes read off."""
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"])
    if not mask[:, -1].all():
        rows = np.flatnonzero(mask[:, -1] == 0).tolist()
        raise ValueError(f"prompts must be left-padded: rows {rows} end in padding")
    if batch.get("position_ids") is None:
        batch = batch | {"position_ids": left_padded_positions(mask)}
    counts = (ids == latent.latent_token_id).sum(axis=1)
    shift = None
    if counts.max(initial=0) and (counts != counts.max()).any():  # align the first latents (equal counts are)
        aligned, shift = align_first_latents(ids, mask, latent.latent_token_id)
        batch = batch | aligned
        ids = aligned["input_ids"]
    n, p = latent_layout(ids, latent.latent_token_id)
    suffix_len = ids.shape[1] - p - n if n else 0
    if n == 0:
        p = ids.shape[1]
    if prefix_len is not None and prefix_len < p:
        raise ValueError(f"prefix_len={prefix_len} is below the first latent's index {p}")
    jbatch = {k: jnp.asarray(v) for k, v in batch.items() if v is not None and k != "labels"}
    return Prompts(jbatch, LatentShapes(n, prefix_len or p), suffix_len, shift)


def ivtlr_generate(model: nnx.Module, batch: dict, latent: LatentConfig, sampling: SamplingConfig,
                   *, key: jax.Array | None = None, prefix_len: int | None = None) -> Generation:
    """Generate for prompts `question + <|latent|> x c_r [+ suffix]`, left-padded to a common length (the
    suffix, e.g. the official Chameleon evaluation's separator token, has the same length in every row).
    Rows may have different latent counts: each row generates what it generates alone (module
    docstring). `batch` holds input_ids, attention_mask, the model's image inputs and optionally
    position_ids (by default the collator's: 0 on left pads, then 0, 1, 2, ...). `selected` indexes the
    prompts as given. A prompt without latents is decoded as it is: plain greedy (or sampled) decoding."""
    prompts = prepare_prompts(batch, latent, prefix_len)
    key = jax.random.key(0) if key is None else key
    out = _generate(model, prompts.batch, latent, sampling, key, prompts.shapes, prompts.suffix_len)
    if prompts.shift is not None:  # back to the prompts' indices
        shift = jnp.asarray(prompts.shift)[None, :, None]
        out = out._replace(selected=jnp.where(out.selected >= 0, out.selected - shift, -1))
    return out


class DecodeStart(NamedTuple):
    """What a prompt (prefill, latent passes, suffix) leaves for decoding."""
    cache: KVCache  # the prompt's keys and values, `end` after its last slot, room for max_new_tokens more
    first: jax.Array  # [B] the first generated token
    offset: jax.Array  # [B] (1-D RoPE) or [3, B] (M-RoPE): cache slot s of row b is at position s + offset[..., b]
    selected: jax.Array  # [n, B, K] (`Generation.selected`)


def decode_positions(offset: jax.Array, slots: jax.Array) -> jax.Array:
    """The positions of decoding slots [] (every row) or [B] (per row) -> [B, 1] (or [3, B, 1])."""
    return (offset + slots)[..., None]


def start_decoding(model, batch: dict, latent: LatentConfig, sampling: SamplingConfig, key: jax.Array,
                   shapes: LatentShapes, suffix_len: int = 0) -> DecodeStart:
    """Everything before the first decoding step (traced inside `_generate` and `continuous`): the image
    features and embeddings, the prefill and n latent passes (or a plain prefill without latents), the
    prompt's suffix after the latents, and the first token, sampled with `fold_in(key, 0)` (`key` [B]:
    each row with its own, as alone)."""
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
    if key.ndim:  # a key per row
        first = next_token_per_row(model.logits(h_last), jax.vmap(jax.random.fold_in, (0, None))(key, 0), sampling)
    else:
        first = next_token(model.logits(h_last), jax.random.fold_in(key, 0), sampling)
    return DecodeStart(cache, first, offset, selected)


@functools.partial(nnx.jit, static_argnames=("latent", "sampling", "shapes", "suffix_len"))
def _generate(model, batch, latent, sampling, key, shapes: LatentShapes, suffix_len=0):
    b = batch["input_ids"].shape[0]
    cache, first, offset, selected = start_decoding(model, batch, latent, sampling, key, shapes, suffix_len)
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
        o = model.decode(emb, decode_positions(offset, cache.end), jnp.ones((b, 1), bool), cache=cache)
        nxt = next_token(model.logits(o.hidden[:, -1]), jax.random.fold_in(key, step + 1), sampling)
        return step + 1, nxt, o.cache, done, tokens, lengths

    state = (jnp.zeros((), jnp.int32), first, cache, done, tokens, lengths)
    _, _, _, _, tokens, lengths = jax.lax.while_loop(cond, body, state)
    return Generation(tokens, lengths, selected)
