"""Batched IVT-LR generation (docs/method.md section 17), static batches: a batch of prompts starts together
(`decoding.start_decoding`: prefill the question, run the latent passes under `lax.scan`, the same
`latent_passes` as training) and decodes from the same KV cache (`decoding.decode_loop`, the one decoding step
continuous batching and the server also run) until every row has produced EOS or `max_new_tokens`.

The official code generates one example at a time and runs a final full forward before decoding; the
last latent pass already leaves the cache and the last hidden state that forward would produce, so
decoding starts right after it. Greedy by default; temperature and top-p sampling as options, each row with its
own key (`fold_in(key, r)` for row r, or the keys given), so a row draws what it draws alone with that key.
Prompts without latents skip the chain (plain decoding, which the parity tests compare with transformers'
`generate`).

Prompts may have different latent counts c_r (mixed prompts in one batch; docs/method.md section 10, where the
official forward, batch-1 at evaluation, would insert every pass's patches into every row): every row
generates what it generates alone. The prompts are re-laid out so that their first latents align
(`align_first_latents`); the chain masks out the passes a row does not have (`latent_passes`), so the
cache holds (n - c_r)*(K+1) masked slots after that row's chain, and every later token of the row (its
suffix, its generated tokens) gets the position it has alone, skipping them (`chain_gap`). Each row
continues from the state at its own last latent.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .data.collate import left_padded_positions
from .decoding import RowSampling, SamplingConfig, decode_loop, decoding_state, row_keys, start_decoding
from .latent import LatentConfig, LatentShapes, latent_layout


class Generation(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens]: a row's tokens up to and including its EOS, then pad_token_id
    lengths: jax.Array  # [B] generated tokens before EOS (EOS not counted)
    selected: jax.Array  # [n, B, K] patches inserted before each latent, as prompt indices (-1: no such latent)


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
        row, q, count = ids[r, s - lengths[r]:], questions[r], counts[r]  # q question tokens, count latents
        if not (row[q:q + count] == latent_token_id).all():
            raise ValueError(f"row {r}: its <|latent|> tokens are not one block followed by the suffix")
        for cols, part in ((slice(p - q, p + count), row[:q + count]),
                           (slice(width - suffix_len, width), row[q + count:])):
            out["input_ids"][r, cols] = part
            out["attention_mask"][r, cols] = 1
        out["position_ids"][r, p - q:p + count] = np.arange(q + count)
        out["position_ids"][r, width - suffix_len:] = q + count + np.arange(suffix_len)
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
    prompts as given. A prompt without latents is decoded as it is: plain greedy (or sampled) decoding.
    `key`: one key (row r samples with fold_in(key, r)) or a key per row [B]."""
    prompts = prepare_prompts(batch, latent, prefix_len)
    b = prompts.batch["input_ids"].shape[0]
    keys = row_keys(jax.random.key(0) if key is None else key, b)
    graphdef, params = nnx.split(model)
    out = _generate(graphdef, params, prompts.batch, latent, sampling, RowSampling.of(keys, sampling), prompts.shapes,
                    prompts.suffix_len)
    if prompts.shift is not None:  # back to the prompts' indices
        shift = jnp.asarray(prompts.shift)[None, :, None]
        out = out._replace(selected=jnp.where(out.selected >= 0, out.selected - shift, -1))
    return out


# The model goes in split (graphdef static, parameters a pytree), as in every decoding driver: a plain jax.jit
# dispatch (nnx.jit re-splits the module on every call).
@functools.partial(jax.jit, static_argnames=("graphdef", "latent", "sampling", "shapes", "suffix_len"))
def _generate(graphdef, params, batch, latent, sampling, rows: RowSampling, shapes: LatentShapes, suffix_len=0):
    model = nnx.merge(graphdef, params)
    start = start_decoding(model, batch, latent, sampling, rows, shapes, suffix_len)
    state = decode_loop(model, decoding_state(start, rows, sampling), sampling, max_steps=sampling.max_new_tokens)
    return Generation(state.tokens, state.lengths, start.selected)
