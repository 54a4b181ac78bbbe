"""Continuous batching of IVT-LR generation: a fixed number of slots decode together, and when a row
finishes (EOS or `max_new_tokens`) the next prompt takes its slot, so no slot idles while the longest
answer of a static batch is still being written.

Prompts start in groups of `admit` (default: as many as there are slots) when a slot frees and no
started prompt waits: `start_decoding` (the function a static batch runs: image features, prefill, the
latent passes, the prompt's suffix, the first token) on the group as one batch. Each started row waits
for a free slot, into which its cache row is copied (`insert`); decoding goes on with each row at its
own next cache slot (`KVCache.end` per row) and its own positions (`DecodeStart.offset`). Rows never
see each other (attention stays within a row, a row's cache slots after its end are masked), so every
prompt generates the tokens `ivtlr_generate` gives it in the batch it starts in, and so, up to rounding
as in any batch, the tokens it generates alone (with the same sampling key: prompt i samples with
`fold_in(key, i)`).

Compiles: `start_decoding` once per prompt shape (prompts left-padded to length buckets; a group is
padded to `admit` rows), `insert` once per pair of group cache size and slots' cache size, the decoding
loop once per slots' cache size (which grows to the largest prompt's, never shrinks).

    for index, row in generate_continuous(model, prompts, latent, sampling, slots=8):
        row.tokens, row.length, row.selected  # in the order rows finish
"""

from __future__ import annotations

import collections
import functools
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .generate import (DecodeStart, SamplingConfig, decode_positions, next_token_per_row, prepare_prompts,
                       start_decoding)
from .latent import LatentConfig
from .models.common.kv_cache import KVCache


class Finished(NamedTuple):
    """One prompt's generation, as `Generation` holds a row of it."""
    tokens: np.ndarray  # [max_new_tokens]: up to and including EOS, then pad_token_id
    length: int  # generated tokens before EOS
    selected: np.ndarray  # [c, K] patches inserted before each of the prompt's c latents, as indices into it


class Slots(NamedTuple):
    """The running batch: B slots, each holding one prompt's generation (or nothing)."""
    cache: KVCache  # end [B]: each row's next slot
    token: jax.Array  # [B] the next token to record and feed
    keys: jax.Array  # [B] each row's sampling key
    offset: jax.Array  # [B] or [3, B]: positions of a row's slots (`DecodeStart.offset`)
    tokens: jax.Array  # [B, max_new_tokens] recorded so far, pad_token_id after
    count: jax.Array  # [B] tokens recorded
    lengths: jax.Array  # [B] recorded tokens before EOS
    live: jax.Array  # [B] bool: the slot holds a prompt still generating


# The model goes in split (`nnx.split` once per run: graphdef static, parameters a pytree), so that each of
# the many calls of a run is a plain jax.jit dispatch (nnx.jit re-splits the module on every call: ~7 ms).
@functools.partial(jax.jit, static_argnames=("graphdef", "latent", "sampling", "shapes", "suffix_len"))
def _start(graphdef, params, batch, latent, sampling, key, shapes, suffix_len):
    return start_decoding(nnx.merge(graphdef, params), batch, latent, sampling, key, shapes, suffix_len)


def empty_slots(model, start: DecodeStart, slots: int, cache_len: int, sampling: SamplingConfig) -> Slots:
    """B idle slots shaped after a prompt's `DecodeStart` (its offset's rank, the cache's dtype)."""
    cache = model.init_cache(slots, cache_len, start.cache.k.dtype).per_row()
    return Slots(cache, jnp.zeros((slots,), jnp.int32), jax.random.split(jax.random.key(0), slots),
                 jnp.zeros((*start.offset.shape[:-1], slots), start.offset.dtype),
                 jnp.full((slots, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32),
                 jnp.zeros((slots,), jnp.int32), jnp.zeros((slots,), jnp.int32), jnp.zeros((slots,), bool))


@functools.partial(jax.jit, static_argnames=("pad_token_id",), donate_argnums=(0,))
def insert(state: Slots, start: DecodeStart, row: jax.Array, key: jax.Array, slot: jax.Array,
           pad_token_id: int) -> Slots:
    """Put row `row` of a `DecodeStart` into `slot`: its cache row (grown to the slots' length; slots
    after its end empty), its first token, key and positions; the slot's count and tokens reset."""
    take = lambda x, axis: jax.lax.dynamic_index_in_dim(x, row, axis, keepdims=True)  # only this row grows
    one = KVCache(take(start.cache.k, 1), take(start.cache.v, 1), take(start.cache.valid, 0), start.cache.end)
    cache = one.resized(state.cache.max_len)
    k = state.cache.k.at[:, slot].set(cache.k[:, 0])
    v = state.cache.v.at[:, slot].set(cache.v[:, 0])
    valid = state.cache.valid.at[slot].set(cache.valid[0])
    end = state.cache.end.at[slot].set(cache.end)
    return Slots(KVCache(k, v, valid, end), state.token.at[slot].set(start.first[row]), state.keys.at[slot].set(key),
                 state.offset.at[..., slot].set(start.offset[..., row]),
                 state.tokens.at[slot].set(pad_token_id), state.count.at[slot].set(0),
                 state.lengths.at[slot].set(0), state.live.at[slot].set(True))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("state",))
def decode(graphdef, params, state: Slots, sampling: SamplingConfig, stop_when_freed: jax.Array) -> Slots:
    """Decode every live slot, one token per step, until no slot is live or, with `stop_when_freed`, until
    a slot finishes (so that the next prompt can take it). A step records each live row's token (EOS
    included, as `_generate`), then feeds it at the row's own next slot and position."""
    model = nnx.merge(graphdef, params)
    b = state.token.shape[0]
    rows = jnp.arange(b)

    def cond(carry):
        state, freed = carry
        return jnp.any(state.live) & ~(stop_when_freed & freed)

    def body(carry):
        state, freed = carry
        live, token, count = state.live, state.token, state.count
        column = jnp.minimum(count, sampling.max_new_tokens - 1)
        tokens = state.tokens.at[rows, column].set(jnp.where(live, token, state.tokens[rows, column]))
        eos = jnp.zeros_like(live) if sampling.eos_token_id is None else token == sampling.eos_token_id
        lengths = state.lengths + (live & ~eos).astype(jnp.int32)
        count = count + live.astype(jnp.int32)
        finished = live & (eos | (count >= sampling.max_new_tokens))
        cache = state.cache
        o = model.decode(model.embed_tokens(token[:, None]), decode_positions(state.offset, cache.end),
                         jnp.ones((b, 1), bool), cache=cache)
        step_keys = jax.vmap(jax.random.fold_in)(state.keys, count)  # as `_generate`: fold_in(key, step + 1)
        nxt = next_token_per_row(model.logits(o.hidden[:, -1]), step_keys, sampling)
        still = live & ~finished
        new_cache = o.cache.replace(end=jnp.where(still, o.cache.end, cache.end))  # idle rows stay put
        state = Slots(new_cache, nxt, state.keys, state.offset, tokens, count, lengths, still)
        return state, freed | jnp.any(finished)

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.zeros((), bool)))
    return state


class Ready(NamedTuple):
    """A started prompt waiting for a slot: row `row` of a group's `DecodeStart`."""
    index: int
    start: DecodeStart
    row: int
    key: jax.Array
    selected: np.ndarray  # [c, K] in the prompt's indices (`Finished.selected`)


def generate_continuous(model: nnx.Module, prompts: Iterable[dict], latent: LatentConfig, sampling: SamplingConfig,
                        *, slots: int = 8, admit: int | None = None,
                        key: jax.Array | None = None) -> Iterator[tuple[int, Finished]]:
    """Generate for each prompt (a left-padded batch of one, as `ivtlr_generate` takes), `slots` at a time
    -> (the prompt's index, its `Finished`) in the order prompts finish. Prompt i samples with
    `fold_in(key, i)` (greedy decoding needs no key).

    admit (default: slots): when a slot frees and no started prompt waits, the next `admit` prompts
    start together, as one batch (padded with copies of the last to `admit` rows, so it compiles once),
    and wait for the next free slots. Prompts whose arrays do not stack (other widths or image shapes)
    start alone. A batch of one (`admit=1`) is the cheapest start per prompt on a device a small batch
    fills, more amortise the start where it does not (a CPU); either way a prompt's tokens are those it
    generates in that batch, and so alone up to rounding, as in any batch."""
    if slots < 1:
        raise ValueError(f"continuous batching: slots={slots}; must be >= 1")
    admit = slots if admit is None else admit
    if admit < 1:
        raise ValueError(f"continuous batching: admit={admit}; must be >= 1")
    key = jax.random.key(0) if key is None else key
    graphdef, params = nnx.split(model)
    pending = enumerate(prompts)
    ready: collections.deque[Ready] = collections.deque()
    state: Slots | None = None
    owner: dict[int, tuple[int, np.ndarray]] = {}  # slot -> (prompt index, its selected patches [n, K])
    exhausted = False

    def start_next() -> None:  # start the next `admit` prompts (or fewer, at the end), appending to `ready`
        nonlocal exhausted
        group = []
        for index, prompt in pending:
            rows = np.asarray(prompt["input_ids"]).shape[0]
            if rows != 1:
                raise ValueError(f"continuous batching: prompt {index} holds {rows} rows; give one prompt (a batch "
                                 "of one) at a time")
            group.append((index, prompt))
            if len(group) == admit:
                break
        else:
            exhausted = True
        batches = [group] if len(group) > 1 and stackable([p for _, p in group]) else [[item] for item in group]
        for batch in batches:
            keys = [jax.random.fold_in(key, index) for index, _ in batch]
            rows = [p for _, p in batch]
            if len(batch) > 1:  # padded to `admit` rows with copies of the last (their outputs unused)
                rows += [rows[-1]] * (admit - len(batch))
                keys += [keys[-1]] * (admit - len(batch))
                laid = prepare_prompts({k: np.concatenate([np.asarray(r[k]) for r in rows]) for k in rows[0]}, latent)
            else:
                laid = prepare_prompts(rows[0], latent)
            start = _start(graphdef, params, laid.batch, latent, sampling, jnp.stack(keys), laid.shapes,
                           laid.suffix_len)
            selected = np.asarray(start.selected)  # [n, G, K] in the laid-out prompts' indices
            if laid.shift is not None:
                selected = np.where(selected >= 0, selected - laid.shift[None, :, None], -1)
            counts = [int((np.asarray(p["input_ids"]) == latent.latent_token_id).sum()) for _, p in batch]
            ready.extend(Ready(index, start, row, keys[row], selected[:counts[row], row])  # its own latents
                         for row, (index, _) in enumerate(batch))

    while True:
        free = [s for s in range(slots) if s not in owner]
        while free:
            if not ready and not exhausted:
                start_next()
            if not ready:
                break
            item = ready.popleft()
            if state is None or state.cache.max_len < item.start.cache.max_len:  # (re)shape the slots to fit
                state = grown(model, state, item.start, slots, sampling)
            slot = free.pop(0)
            state = insert(state, item.start, jnp.int32(item.row), item.key, jnp.int32(slot), sampling.pad_token_id)
            owner[slot] = (item.index, item.selected)
        if not owner:
            return
        more = bool(ready) or not exhausted
        state = decode(graphdef, params, state, sampling, jnp.asarray(more))
        live = np.asarray(state.live)
        for slot in sorted(s for s in owner if not live[s]):
            index, selected = owner.pop(slot)
            yield index, Finished(np.asarray(state.tokens[slot]), int(state.lengths[slot]), selected)


def stackable(prompts: list[dict]) -> bool:
    """Whether batches of one concatenate into one batch: the same keys, arrays alike but for the rows."""
    keys = {frozenset(k for k, v in p.items() if v is not None) for p in prompts}
    if len(keys) != 1:
        return False
    return all(len({np.shape(p[k])[1:] for p in prompts}) == 1 for k in keys.pop())


def grown(model, state: Slots | None, start: DecodeStart, slots: int, sampling: SamplingConfig) -> Slots:
    """New slots whose cache fits `start`'s (the first prompt), or `state` with its cache grown to it."""
    if state is None:
        return empty_slots(model, start, slots, start.cache.max_len, sampling)
    return state._replace(cache=state.cache.resized(start.cache.max_len))
