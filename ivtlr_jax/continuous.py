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

Devices: with `rules` (the mesh the model's parameters are replicated on) every slot array's batch axis is
split over the mesh's data axis (`spread`) and the same jitted step runs on all of them, each device
decoding slots / devices rows; rows never see each other, so the tokens are one device's (the per-prompt
sampling keys travel with their rows). One process's driver decides its slots: with several processes
each runs its own engine on its local devices, on its share of the prompts (`indices`: their places in
the whole set, which their keys fold in; eval/run.py).

The slots and their operations are a `SlotEngine` (start prompts, insert a started row into a free slot,
decode until a slot frees or for a number of steps, release a slot), which two drivers run:
`generate_continuous` here (evaluation) and the server (`serve/`), which also streams the tokens so far.

    for index, row in generate_continuous(model, prompts, latent, sampling, slots=8):
        row.tokens, row.length, row.selected  # in the order rows finish
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .decoding import DecodeStart, DecodeState, RowSampling, SamplingConfig, decode_loop, start_decoding
from .generate import prepare_prompts
from .latent import LatentConfig
from .models.common.kv_cache import KVCache
from .models.common.sharding import ShardingRules


class Finished(NamedTuple):
    """One prompt's generation, as `Generation` holds a row of it."""
    tokens: np.ndarray  # [max_new_tokens]: up to and including EOS, then pad_token_id
    length: int  # generated tokens before EOS
    selected: np.ndarray  # [c, K] patches inserted before each of the prompt's c latents, as indices into it


class Ready(NamedTuple):
    """A started prompt waiting for a slot: row `row` of a group's `DecodeStart`."""
    tag: Any  # the driver's name for the prompt (an index, a request)
    start: DecodeStart
    row: int
    sampling: RowSampling  # the group's rows' sampling
    selected: np.ndarray  # [c, K] in the prompt's indices (`Finished.selected`)


# The model goes in split (`nnx.split` once per engine: graphdef static, parameters a pytree), so that each of
# the many calls of a run is a plain jax.jit dispatch (nnx.jit re-splits the module on every call: ~7 ms).
@functools.partial(jax.jit, static_argnames=("graphdef", "latent", "sampling", "shapes", "suffix_len"))
def _start(graphdef, params, batch, latent, sampling, rows, shapes, suffix_len):
    return start_decoding(nnx.merge(graphdef, params), batch, latent, sampling, rows, shapes, suffix_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("state",))
def _decode(graphdef, params, state: DecodeState, sampling: SamplingConfig, max_steps, stop_when_freed) -> DecodeState:
    return decode_loop(nnx.merge(graphdef, params), state, sampling, max_steps=max_steps,
                       stop_when_freed=stop_when_freed)


def empty_slots(model, start: DecodeStart, slots: int, cache_len: int, sampling: SamplingConfig) -> DecodeState:
    """B idle slots shaped after a prompt's `DecodeStart` (its offset's rank, the cache's dtype)."""
    cache = model.init_cache(slots, cache_len, start.cache.k.dtype).per_row()
    rows = RowSampling.of(jax.random.split(jax.random.key(0), slots), sampling)
    return DecodeState(cache, jnp.zeros((slots,), jnp.int32), rows,
                       jnp.zeros((*start.offset.shape[:-1], slots), start.offset.dtype),
                       jnp.full((slots, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32),
                       jnp.zeros((slots,), jnp.int32), jnp.zeros((slots,), jnp.int32), jnp.zeros((slots,), bool))


def spread(state: DecodeState, rules: ShardingRules | None) -> DecodeState:
    """The slots split over the mesh's data axes (each device decodes its share of the slots; every array's
    slot axis is the rule's `batch`), or `state` as it is without rules."""
    if rules is None:
        return state

    def along(x: jax.Array, axis: int):  # the sharding of x with its slot axis `axis` split
        axes = [None] * x.ndim
        axes[axis % x.ndim] = "batch"
        return rules.sharding(axes, x.shape)

    cache = state.cache
    return jax.device_put(state, DecodeState(
        KVCache(along(cache.k, 1), along(cache.v, 1), along(cache.valid, 0), along(cache.end, 0)),
        along(state.token, 0), jax.tree.map(lambda x: along(x, 0), state.rows), along(state.offset, -1),
        along(state.tokens, 0), along(state.count, 0), along(state.lengths, 0), along(state.live, 0)))


@functools.partial(jax.jit, static_argnames=("pad_token_id",), donate_argnums=(0,))
def insert(state: DecodeState, start: DecodeStart, row: jax.Array, rows: RowSampling, slot: jax.Array,
           pad_token_id: int) -> DecodeState:
    """Put row `row` of a `DecodeStart` (and of its group's `rows`) into `slot`: its cache row (grown to the
    slots' length; slots after its end empty), its first token, sampling and positions; the slot's count and
    tokens reset."""
    take = lambda x, axis: jax.lax.dynamic_index_in_dim(x, row, axis, keepdims=True)  # only this row grows
    one = KVCache(take(start.cache.k, 1), take(start.cache.v, 1), take(start.cache.valid, 0), start.cache.end)
    cache = one.resized(state.cache.max_len)
    k = state.cache.k.at[:, slot].set(cache.k[:, 0])
    v = state.cache.v.at[:, slot].set(cache.v[:, 0])
    valid = state.cache.valid.at[slot].set(cache.valid[0])
    end = state.cache.end.at[slot].set(cache.end)
    sampling = jax.tree.map(lambda mine, theirs: mine.at[slot].set(theirs[row]), state.rows, rows)
    return DecodeState(KVCache(k, v, valid, end), state.token.at[slot].set(start.first[row]), sampling,
                       state.offset.at[..., slot].set(start.offset[..., row]),
                       state.tokens.at[slot].set(pad_token_id), state.count.at[slot].set(0),
                       state.lengths.at[slot].set(0), state.live.at[slot].set(True))


@functools.partial(jax.jit, donate_argnums=(0,))
def release(state: DecodeState, slot: jax.Array) -> DecodeState:
    """Stop the prompt in `slot` (a cancelled request): the slot idles until the next insert."""
    return state._replace(live=state.live.at[slot].set(False))


class SlotEngine:
    """`slots` rows decoding together; prompts started (`start`) and put into free slots (`insert`) between
    decoding runs (`run`). Each slot belongs to a tag (the driver's name of its prompt) until it finishes or
    is released.

    rules: the mesh the model's parameters live on; the slots are split over its data axes (`spread`), so each
    device decodes slots / devices rows of the same jitted step (None: one device)."""

    def __init__(self, model: nnx.Module, latent: LatentConfig, sampling: SamplingConfig, slots: int,
                 rules: ShardingRules | None = None):
        if slots < 1:
            raise ValueError(f"continuous batching: slots={slots}; must be >= 1")
        self.model, self.latent, self.sampling, self.slots, self.rules = model, latent, sampling, slots, rules
        self.graphdef, self.params = nnx.split(model)
        self.state: DecodeState | None = None
        self.owner: dict[int, Any] = {}  # slot -> tag

    def start(self, tags: list, prompts: list[dict], rows: RowSampling,
              sampling: SamplingConfig | None = None) -> list[Ready]:
        """Start prompts (batches of one that stack, or a group of rows) as one batch: prefill, latent passes,
        suffix, first token. -> one `Ready` per tag (the first len(tags) rows; later rows are padding).
        `sampling`: another config of the same max_new_tokens, EOS and pad (e.g. with sampling compiled in)."""
        counts = [int((np.asarray(p["input_ids"]) == self.latent.latent_token_id).sum()) for p in prompts[:len(tags)]]
        batch = prompts[0] if len(prompts) == 1 else \
            {k: np.concatenate([np.asarray(p[k]) for p in prompts]) for k in prompts[0]}
        laid = prepare_prompts(batch, self.latent)
        start = _start(self.graphdef, self.params, laid.batch, self.latent, sampling or self.sampling, rows,
                       laid.shapes, laid.suffix_len)
        selected = np.asarray(start.selected)  # [n, G, K] in the laid-out prompts' indices
        if laid.shift is not None:
            selected = np.where(selected >= 0, selected - laid.shift[None, :, None], -1)
        return [Ready(tag, start, row, rows, selected[:counts[row], row]) for row, tag in enumerate(tags)]

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if s not in self.owner]

    def insert(self, ready: Ready) -> int:
        """Put a started prompt into the first free slot (the slots' cache grown to fit it) -> the slot."""
        if self.state is None or self.state.cache.max_len < ready.start.cache.max_len:
            self.state = spread(grown(self.model, self.state, ready.start, self.slots, self.sampling), self.rules)
        slot = self.free_slots()[0]
        self.state = insert(self.state, ready.start, jnp.int32(ready.row), ready.sampling, jnp.int32(slot),
                            self.sampling.pad_token_id)
        self.owner[slot] = ready.tag
        return slot

    def run(self, *, max_steps: int | None = None, stop_when_freed: bool = True,
            sampling: SamplingConfig | None = None) -> list[tuple[int, Any]]:
        """Decode the live slots for up to `max_steps` steps (None: until none is live), stopping early when
        one finishes (`stop_when_freed`) -> the (slot, tag) of every prompt that finished; their slots are free.
        `sampling`: as for `start`."""
        steps = self.sampling.max_new_tokens if max_steps is None else max_steps
        self.state = _decode(self.graphdef, self.params, self.state, sampling or self.sampling, jnp.int32(steps),
                             jnp.asarray(stop_when_freed))
        live = np.asarray(self.state.live)
        return [(slot, self.owner.pop(slot)) for slot in sorted(self.owner) if not live[slot]]

    def release(self, slot: int) -> None:
        """Stop a slot's prompt now (its tag is forgotten)."""
        self.state = release(self.state, jnp.int32(slot))
        self.owner.pop(slot, None)

    def finished(self, slot: int, selected: np.ndarray) -> Finished:
        """The generation of a slot's prompt (read before the slot is given to another)."""
        return Finished(np.asarray(self.state.tokens[slot]), int(self.state.lengths[slot]), selected)


def generate_continuous(model: nnx.Module, prompts: Iterable[dict], latent: LatentConfig, sampling: SamplingConfig,
                        *, slots: int = 8, admit: int | None = None, key: jax.Array | None = None,
                        rules: ShardingRules | None = None,
                        indices: Iterable[int] | None = None) -> Iterator[tuple[int, Finished]]:
    """Generate for each prompt (a left-padded batch of one, as `ivtlr_generate` takes), `slots` at a time
    -> (the prompt's index, its `Finished`) in the order prompts finish. Prompt i samples with
    `fold_in(key, i)`, as row i of `ivtlr_generate` on all the prompts with `key` (greedy decoding needs no key).

    indices (default 0, 1, ...): each prompt's index, the one it is yielded with and folds into `key`: a
    share of a set of prompts given with their indices in the set samples as in a run of the whole set
    (each process of an evaluation runs its share so).

    admit (default: slots): when a slot frees and no started prompt waits, the next `admit` prompts
    start together, as one batch (padded with copies of the last to `admit` rows, so it compiles once),
    and wait for the next free slots. Prompts whose arrays do not stack (other widths or image shapes)
    start alone. A batch of one (`admit=1`) is the cheapest start per prompt on a device a small batch
    fills, more amortise the start where it does not (a CPU); either way a prompt's tokens are those it
    generates in that batch, and so alone up to rounding, as in any batch."""
    admit = slots if admit is None else admit
    if admit < 1:
        raise ValueError(f"continuous batching: admit={admit}; must be >= 1")
    key = jax.random.key(0) if key is None else key
    engine = SlotEngine(model, latent, sampling, slots, rules)
    pending = enumerate(prompts) if indices is None else zip(indices, prompts)
    ready: collections.deque[Ready] = collections.deque()
    selected: dict[int, np.ndarray] = {}  # prompt index -> its selected patches [c, K]
    exhausted = False

    def start_next() -> None:  # start the next `admit` prompts (or fewer, at the end), appending to `ready`
        nonlocal exhausted
        group = next_group(pending, admit)
        exhausted = len(group) < admit
        batches = [group] if len(group) > 1 and stackable([p for _, p in group]) else [[item] for item in group]
        for batch in batches:
            tags, rows = [index for index, _ in batch], [p for _, p in batch]
            keys = [jax.random.fold_in(key, index) for index in tags]
            if len(batch) > 1:  # padded to `admit` rows with copies of the last (their outputs unused)
                rows += [rows[-1]] * (admit - len(batch))
                keys += [keys[-1]] * (admit - len(batch))
            ready.extend(engine.start(tags, rows, RowSampling.of(jnp.stack(keys), sampling)))

    while True:
        while engine.free_slots():
            if not ready and not exhausted:
                start_next()
            if not ready:
                break
            item = ready.popleft()
            selected[item.tag] = item.selected
            engine.insert(item)
        if not engine.owner:
            return
        for slot, index in engine.run(stop_when_freed=bool(ready) or not exhausted):
            yield index, engine.finished(slot, selected.pop(index))


def next_group(pending: Iterator[tuple[int, dict]], admit: int) -> list[tuple[int, dict]]:
    """Up to `admit` (index, prompt) pairs, each prompt a batch of one."""
    group = []
    for index, prompt in pending:
        rows = np.asarray(prompt["input_ids"]).shape[0]
        if rows != 1:
            raise ValueError(f"continuous batching: prompt {index} holds {rows} rows; give one prompt (a batch "
                             "of one) at a time")
        group.append((index, prompt))
        if len(group) == admit:
            break
    return group


def stackable(prompts: list[dict]) -> bool:
    """Whether batches of one concatenate into one batch: the same keys, arrays alike but for the rows."""
    keys = {frozenset(k for k, v in p.items() if v is not None) for p in prompts}
    if len(keys) != 1:
        return False
    return all(len({np.shape(p[k])[1:] for p in prompts}) == 1 for k in keys.pop())


def grown(model, state: DecodeState | None, start: DecodeStart, slots: int, sampling: SamplingConfig) -> DecodeState:
    """New slots whose cache fits `start`'s (the first prompt), or `state` with its cache grown to it."""
    if state is None:
        return empty_slots(model, start, slots, start.cache.max_len, sampling)
    return state._replace(cache=state.cache.resized(start.cache.max_len))
