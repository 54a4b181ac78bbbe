"""The IVT-LR latent reasoning loop, exact and jitted with static shapes.

Read next to docs/method.md sections 4-12; "section N" in this module is docs/method.md's section N.
The official code runs n+1 full forwards over a growing sequence with eager attention (section 7).
Because the model is causal and everything before `end` never changes between passes, the same result
comes from the five steps of section 8, which `ivtlr_loss` runs in order ("step N" in this module is
step N of that list):

1. **embeddings**: `embed_inputs` writes the image features into the placeholder slots [B, S, D];
2. **shared question prefix**: slots [0, m) (m = `LatentShapes.shared_prefix` < p) run once, with
   gradients, into a KV cache that steps 3-5 continue from;
3. **prefill** [m, prefix_len) into a KV cache sized for the whole latent chain, keeping the final-norm
   hidden state at p-1 and the head- and layer-averaged attention row of query p-1
   (`row_attention_probs`: one [B, S] row per layer, never the full matrices);
4. **latent passes** under `lax.scan`, one per latent i = 0..n-1: pick the top-K image patches by the
   carried score row (section 6), gather their input embeddings, write the carried hidden state as
   latent i (section 5), and run only the K+1 new positions [V_i, L_i] through the LM against the
   cache, carrying L_i's hidden state and attention row onward;
5. **final pass**: assemble the final sequence `question, V_0, L_0, ..., V_{n-1}, L_{n-1}, rest` (length
   S + n*K, section 9) from the recorded indices, gathering the patches again from the differentiable
   embeddings, and run one ordinary forward over it from the shared cache; the loss is the token-mean
   cross-entropy of the right-aligned labels (sections 9 and 11), computed in sequence chunks so the
   [B, T, V] logits never exist at once.

With `latent_grad="stop"` (the official behaviour) steps 3-4 see stop-gradient parameters, embeddings
and shared cache, so gradients reach the parameters only through the final pass (step 5, with the
shared prefix of step 2; section 12). With `latent_grad="full"` the latent chain is differentiated too
(Coconut-style).

Batch layout (the official collator's): rows left-padded so that every row's first `<|latent|>` is
at the same index p, then right-padded to S; `position_ids` 0 on left pads then 0, 1, 2, ...;
`labels` -100 on pads, question and latents.

**Rows with different latent counts** (sections 10 and 21; `pad_latent_to_max: false`, or mixed
prompts at evaluation): n is the largest count c_r in the batch. The official forward inserts K patches
before index p+i in every row for every pass i < n, also in rows without an i-th latent (their text
gets patches in the middle), and right-aligns every row's labels by n*K, so those rows learn from
labels K slots away from their tokens: a row's loss depends on what it is batched with. The official
settings never reach this (every row of a batch has s latents at stage s). Here each row is what it
would be alone (a batch of one):
- in the chain, pass i of a row without an i-th latent is masked out (attention mask 0 on its K+1
  slots), so nothing attends to it (in generation the row's later tokens attend this cache); rows
  with latent i are untouched by it, since latents are contiguous from p (a row with latent i has
  latents 0..i-1 as well);
- its final sequence is `question, V_0, L_0, ..., V_{c_r-1}, L_{c_r-1}, rest-of-row`, then right
  padding (zero embeddings, mask 0, labels -100) up to the common length S + n*K, and its labels are
  right-aligned by c_r*K (`assemble`); its positions are its own (`final_positions`; with M-RoPE a
  row without latents keeps the M-RoPE of its whole row);
- `LatentAux.selected` is -1 for the passes a row does not have.
So a row's loss terms (`row_nll`, `row_tokens`), its selected patches and its gradient contribution
equal those of the row alone. With equal counts nothing changes (all rows have every pass).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .data.collate import IGNORE, LatentShapes
from .models.common.choices import names
from .models.common.kv_cache import KVCache
from .models.common.layers import acc_dtype



class PatchOrder(enum.StrEnum):
    """The order of the K patches inserted before a latent."""
    SCORE = "score"  # descending score (ties: lower index)
    POSITION = "position"  # raster order


class LatentGrad(enum.StrEnum):
    """Whether the gradient flows through the latent chain."""
    STOP = "stop"  # official: latent states cut from the graph
    FULL = "full"  # through the chain


class Rope(enum.StrEnum):
    """Qwen2-VL's positions of the latent loop."""
    ONE_D = "1d"  # the official explicit 1-D positions
    MROPE = "mrope"  # the 3-D M-RoPE prefix



class StepScopes(NamedTuple):
    """The loss's parts as named in the compiled program (`jax.named_scope`, kept in XLA's op metadata, in
    the backward pass too); the planner's memory breakdown (plan_memory.py) groups buffers by them."""

    embed: str = "embed_inputs"  # step 1: the vision tower and the token embeddings
    shared_prefix: str = "shared_prefix"  # step 2: the question slots both passes share
    latent_chain: str = "latent_chain"  # steps 3-4: prefill and the latent passes
    final_pass: str = "final_pass"  # step 5: the final sequence (or the plain forward, n = 0)
    loss: str = "loss"  # the chunked cross-entropy (logits included)


SCOPES = StepScopes()


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    latent_token_id: int
    num_selected_patches: int  # K: Qwen2-VL 32, Chameleon 64
    patch_order: PatchOrder = PatchOrder.SCORE
    latent_grad: LatentGrad = LatentGrad.STOP
    rope: Rope = Rope.ONE_D  # Qwen2-VL only
    ce_chunk: int = 256  # sequence positions per chunk of the cross-entropy
    # models with DeepStack (Qwen3-VL): an inserted patch copy also gets its patch's DeepStack features in the
    # first decoder layers (True), or only its merged embedding (False); docs/method.md section 20
    patch_deepstack: bool = True

    def __post_init__(self):
        for name, choices in (("patch_order", PatchOrder), ("latent_grad", LatentGrad), ("rope", Rope)):
            if getattr(self, name) not in set(choices):
                raise ValueError(f"latent config: {name}={getattr(self, name)!r}; choose from {names(choices)}")
            object.__setattr__(self, name, choices(getattr(self, name)))
        if self.num_selected_patches < 1:
            raise ValueError("latent config: num_selected_patches must be >= 1")


class LatentAux(NamedTuple):
    selected: jax.Array  # [n, B, K] original positions of the patches inserted before latent i (-1: no latent i)
    row_nll: jax.Array  # [B] summed token cross-entropy per row
    row_tokens: jax.Array  # [B] supervised tokens per row
    embeds: jax.Array  # [B, S + n*K, D] the assembled final input embeddings
    attention_mask: jax.Array  # [B, S + n*K]
    labels: jax.Array  # [B, S + n*K] labels, right-aligned per row by c_r*K
    positions: jax.Array  # positions of the final sequence ([B, L] or [3, B, L])
    num_tokens: jax.Array  # [] supervised tokens in the batch


class LatentChain(NamedTuple):
    """What `latent_passes` leaves: the chain's patches and latents, and the cache to continue from."""
    selected: jax.Array  # [n, B, K] patches inserted before latent i, as prompt slots (-1: the row has no latent i)
    latents: jax.Array  # [n, B, D] latent i's input: the hidden state before it (meaningless where selected is -1)
    cache: KVCache  # [0, p + n*(K+1)) filled, room for `extra_cache` slots after
    h_last: jax.Array  # [B, D] each row's state at its own last latent (at p-1 without latents)


class Positions(NamedTuple):
    """Positions of a batch in the latent loop's layout (`sequence_positions`); [B, T] with 1-D RoPE,
    [3, B, T] with M-RoPE."""
    own: jax.Array  # [B, S] (or [3, B, S]) of the batch's own slots (a row's question; all of a row without latents)
    tail: Callable[[jax.Array], jax.Array]  # slots [T] or [B, T] >= p of a row laid out alone -> [B, T] (or [3, B, T])


# ---- the entry: the training loss (steps 1-5) --------------------------------------------------------
def ivtlr_loss(model, batch: dict, cfg: LatentConfig, shapes: LatentShapes | None = None, *,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, LatentAux]:
    """IVT-LR training loss of a batch in the official collator layout -> (loss, aux).

    `shapes` (static: jit this function, or the train step around it, with it static) fixes n, the
    bound on p (the first latent's index) and the shared question slots [0, shared_prefix) before p: those slots are
    identical in the latent chain and in the final sequence, so they run once, differentiably, and both
    continue from that KV cache (exact: the model is causal). For a concrete batch, `shapes` defaults
    to the batch's own (shared_prefix = p - 1) and is validated. `dropout_key` turns on LoRA dropout (training
    mode) in every pass; the shared slots then have one dropout mask for the chain and the final pass
    (the official code draws a fresh one per full forward).
    """
    ids = batch["input_ids"]
    if isinstance(ids, jax.core.Tracer):
        if shapes is None:
            raise ValueError("ivtlr_loss under jit needs static shapes (a LatentShapes)")
    else:
        shapes = concrete_shapes(model, np.asarray(ids), cfg, shapes)
    num_latents, prefix_len = shapes.num_latents, shapes.prefix_len
    n, k = num_latents, cfg.num_selected_patches
    shared_len = shapes.shared_prefix if num_latents else 0  # question slots run once, shared by chain and final pass
    mask = batch["attention_mask"]
    with jax.named_scope(SCOPES.embed):  # step 1: [B, S, D]
        embeds = model.embed_inputs(ids, **image_inputs_of(batch))
    final_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 0)

    if n == 0:  # section 7 (n = 0): a plain forward
        s = ids.shape[1]
        final, final_mask, final_labels = embeds, mask.astype(bool), batch["labels"]
        selected = jnp.zeros((0, ids.shape[0], k), jnp.int32)
        positions = sequence_positions(model, cfg, batch, jnp.int32(s)).own
        with jax.named_scope(SCOPES.final_pass):
            hidden = model.decode(final, positions, final_mask, dropout_key=final_key).hidden
    else:
        p = first_latent_index(ids, cfg.latent_token_id)
        sequence_pos = sequence_positions(model, cfg, batch, p)  # M-RoPE: the index once
        positions = final_positions(model, cfg, batch, sequence_pos, p, ids.shape[1] + n * k)
        shared = None
        if shared_len:  # step 2: the question slots [0, shared_len), run once with gradients, cached for both
            with jax.named_scope(SCOPES.shared_prefix):
                pre = model.decode(embeds[:, :shared_len], positions[..., :shared_len], mask[:, :shared_len],
                                   cache=model.init_cache(ids.shape[0], shared_len), dropout_key=final_key)
            shared = pre.cache
        # steps 3-4: prefill and the latent passes (latent_grad="stop": on stop-gradient copies)
        if cfg.latent_grad == "stop":
            graphdef, state = nnx.split(model)
            chain_model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
            chain_embeds = jax.lax.stop_gradient(embeds)
            chain_shared = jax.lax.stop_gradient(shared)
        else:
            chain_model, chain_embeds, chain_shared = model, embeds, shared
        chain_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
        with jax.named_scope(SCOPES.latent_chain):
            chain = latent_passes(chain_model, cfg, chain_embeds, batch, p, sequence_pos, n=n, prefix_len=prefix_len,
                                  dropout_key=chain_key, shared=chain_shared)
        selected, latents = chain.selected, chain.latents
        if cfg.latent_grad == "stop":
            latents = jax.lax.stop_gradient(latents)
        # step 5: the final sequence, run from the shared cache where there is one
        counts = jnp.sum(ids == cfg.latent_token_id, axis=1)  # [B] c_r
        final, final_mask, final_labels = assemble(embeds, mask, batch["labels"], selected, latents, counts, p, k,
                                                   patch_extras=cfg.patch_deepstack)
        with jax.named_scope(SCOPES.final_pass):
            if shared_len:  # the rest of the final sequence continues from the shared cache
                rest = model.decode(final[:, shared_len:], positions[..., shared_len:], final_mask[:, shared_len:],
                                    cache=shared.resized(final.shape[1]),
                                    dropout_key=jax.random.fold_in(final_key, 1) if final_key is not None else None)
                hidden = jnp.concatenate([pre.hidden, rest.hidden], axis=1)
            else:
                hidden = model.decode(final, positions, final_mask, dropout_key=final_key).hidden

    with jax.named_scope(SCOPES.loss):
        row_nll, row_tokens = chunked_cross_entropy(model, hidden, final_labels, cfg.ce_chunk)
    count = jnp.sum(row_tokens)
    loss = jnp.sum(row_nll) / jnp.maximum(count, 1)
    return loss, LatentAux(selected, row_nll, row_tokens, final, final_mask, final_labels, positions, count)


# ---- the batch: its image inputs, its shapes, host-side checks ---------------------------------------
def image_inputs_of(batch: dict) -> dict:
    """The model's image arguments found in a batch."""
    return {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch and batch[k] is not None}


def concrete_shapes(model, ids: np.ndarray, cfg: LatentConfig, shapes: LatentShapes | None) -> LatentShapes:
    """The batch's own shapes (n, p and shared_prefix = p - 1 read off concrete input_ids) where `shapes` is None, or
    `shapes` validated against the batch."""
    n, p = latent_layout(ids, cfg.latent_token_id)
    if shapes is None:
        shapes = LatentShapes(n, ids.shape[1], max(p - 1, 0) if n else 0)
    if n > shapes.num_latents or p > shapes.prefix_len:
        raise ValueError(f"batch has {n} latents from index {p}; static {shapes} is too small")
    if n and shapes.shared_prefix >= p:
        raise ValueError(f"shared_prefix={shapes.shared_prefix} must be below the first latent's index {p}")
    if n:
        check_eligible_patches(ids, p, model.config.image_token_id, cfg)
    return shapes


def latent_layout(input_ids: np.ndarray, latent_token_id: int) -> tuple[int, int]:
    """(n, p) of a concrete batch: the largest number of latents in a row and the common index of the
    first latent. Raises with the offending row when the layout is not the collator's."""
    is_latent = input_ids == latent_token_id
    counts = is_latent.sum(axis=1)
    n = int(counts.max(initial=0))
    if n == 0:
        return 0, 0
    firsts = {}
    for row in np.flatnonzero(counts):
        idx = np.flatnonzero(is_latent[row])
        if (np.diff(idx) != 1).any():
            raise ValueError(f"row {row}: its <|latent|> tokens are not contiguous (at {idx.tolist()})")
        firsts[row] = int(idx[0])
    if len(set(firsts.values())) > 1:
        raise ValueError(
            f"rows are not aligned on their first <|latent|> (first latent index per row: {firsts}); "
            "the collator must left-pad every row so that its first latent sits at the same index"
        )
    return n, next(iter(firsts.values()))


def check_eligible_patches(input_ids: np.ndarray, p: int, image_token_id: int, cfg: LatentConfig) -> None:
    """Every row with latents needs at least K image positions before its first latent (the official
    top-K fails otherwise); later passes may run short and are filled (select_patches)."""
    has = (input_ids == cfg.latent_token_id).any(axis=1)
    eligible = (input_ids[:, :p] == image_token_id).sum(axis=1)
    short = [int(r) for r in np.flatnonzero(has & (eligible < cfg.num_selected_patches))]
    if short:
        raise ValueError(f"rows {short} have {eligible[short].tolist()} image tokens before their first latent, "
                         f"fewer than num_selected_patches={cfg.num_selected_patches}")


# ---- patch selection (section 6) ---------------------------------------------------------------------
def select_patches(score: jax.Array, image_mask: jax.Array, picked: jax.Array, k: int, order: str) -> jax.Array:
    """Top-k eligible image positions per row: [B, k] indices.

    score [B, P] (attention probabilities), image_mask [B, P] eligible image positions, picked [B, P]
    positions selected in earlier passes. Ties go to the lower index (lax.top_k is stable). When fewer
    than k unpicked positions remain, the rest is filled with the lowest-index picked positions.
    """
    idx = jnp.arange(score.shape[1], dtype=jnp.float32)
    available = image_mask & ~picked
    key = jnp.where(
        available,
        score.astype(jnp.float32),  # probabilities in [0, 1]
        jnp.where(image_mask & picked, -1.0 - idx / score.shape[1], -3.0),  # lowest picked index first
    )
    _, sel = jax.lax.top_k(key, k)
    return jnp.sort(sel, axis=1) if order == "position" else sel


# ---- positions (section 8, "Positions") --------------------------------------------------------------
def sequence_positions(model, cfg: LatentConfig, batch: dict, p: jax.Array) -> Positions:
    """The batch's `Positions`: `own`, the positions of its own slots [B, S] (M-RoPE: [3, B, S]), and
    `tail`, a function slots -> positions for slots >= p.

    `own` is meant where the latent loop leaves a row as it is: below p (the question) in a row with
    latents, everywhere in a row without. `tail` takes slots [T] (the same in every row)
    or [B, T] (per row) of a row laid out as it is alone: a caller whose cache holds masked slots (the
    chain of a row with fewer latents) subtracts them first (`chain_gap`). 1d: the collator's positions
    (slot - left pad); per row a constant away from the official `arange` positions, which RoPE does
    not see. mrope: M-RoPE as transformers computes it of each row's question (of the whole row in a
    row without latents), then text positions continuing from the question's largest index."""
    mask = batch["attention_mask"].astype(bool)
    b, s = mask.shape
    if cfg.rope == "1d":
        left_pad = jnp.argmax(mask, axis=1)  # first real token

        def tail(slots):  # slots [T] or [B, T] -> [B, T]
            return jnp.maximum(jnp.atleast_2d(slots) - left_pad[:, None], 0)

        return Positions(batch["position_ids"], tail)

    if not hasattr(model, "rope_index"):
        raise ValueError("latent config: rope='mrope' needs a model with M-RoPE (Qwen2-VL)")
    ids = batch["input_ids"]
    has_latent = jnp.any(ids == cfg.latent_token_id, axis=1)  # [B]
    in_question = mask & (jnp.arange(s)[None] < p)  # [B, S]
    # a row without latents is kept whole, so that an image of it reaching past p keeps its index
    pos3, _ = model.rope_index(ids, in_question | (mask & ~has_latent[:, None]), batch.get("image_grid_thw"))
    base = jnp.max(jnp.where(in_question[None], pos3, -1), axis=(0, 2)) + 1  # [B]

    def tail(slots):  # slots [T] or [B, T] -> [3, B, T]
        t = base[:, None] + jnp.atleast_2d(slots) - p
        return jnp.broadcast_to(t[None], (3, b, t.shape[1]))

    return Positions(pos3, tail)


def final_positions(model, cfg: LatentConfig, batch: dict, positions: Positions, p: jax.Array, length: int):
    """Positions of the final sequence (length S + n*K), from the batch's `Positions`. Every row of it
    is compact (its left pad, its own sequence, then right padding: `assemble`), so the positions the
    row has alone are its slots minus its left pad. 1d: exactly that (the official code resets them to
    `arange` over the whole row after the first insertion, a constant per row away). mrope: the
    question's M-RoPE, then text positions; a row without latents is its original row, with its own
    M-RoPE throughout (which differs from continuing text positions where its image reaches past p)."""
    if cfg.rope == "1d":
        return positions.tail(jnp.arange(length))
    has_latent = jnp.any(batch["input_ids"] == cfg.latent_token_id, axis=1)  # [B]
    kept = jnp.where(has_latent, p, length)  # [B] slots below it keep the row's own positions
    return join_positions(positions, kept[:, None], length)


def join_positions(positions: Positions, kept, length: int):
    """Positions of a sequence of `length` slots: `positions.own` below `kept` ([] or [B, 1]), `positions.tail`
    from it on."""
    slots = jnp.arange(length)
    tail = positions.tail(slots)
    own = positions.own
    pad = length - own.shape[-1]
    head = jnp.pad(own, [(0, 0)] * (own.ndim - 1) + [(0, max(pad, 0))])[..., :length]
    return jnp.where(slots < kept, head, tail)


# ---- steps 3-4: prefill and the latent passes --------------------------------------------------------
def first_latent_index(ids: jax.Array, latent_token_id: int) -> jax.Array:
    """p: the common index of the first <|latent|> of the rows that have one (the collator aligns them)."""
    is_latent = ids == latent_token_id
    has_latent = jnp.any(is_latent, axis=1)
    return jnp.max(jnp.where(has_latent, jnp.argmax(is_latent, axis=1), 0)).astype(jnp.int32)


def latent_passes(model, cfg: LatentConfig, embeds: jax.Array, batch: dict, p: jax.Array, positions: Positions, *,
                  n: int, prefix_len: int, extra_cache: int = 0, dropout_key: jax.Array | None = None,
                  shared: KVCache | None = None) -> LatentChain:
    """Run prefill + n latent passes over embeds [B, S, D] -> `LatentChain`.

    p [] is the first latent's index (`first_latent_index`), `positions` the batch's
    (`sequence_positions(model, cfg, batch, p)`); the caller computes both once.

    Pass i writes [V_i, L_i] at slots p + i*(K+1) .. p + (i+1)*(K+1) - 1 of every row; in a row without an
    i-th latent (c_r <= i) that chunk is masked out (attention mask 0), so nothing attends to it, its
    `selected` is -1 and its latent state is meaningless. `h_last`: each row's state at its own last
    latent (at p-1 for a row without latents), where its continuation starts. The cache then holds
    (n - c_r)*(K+1) masked slots after a row's chain (`chain_gap`).

    `extra_cache` reserves cache slots after the chain (for generation). `dropout_key`: training-mode
    LoRA dropout, a fresh mask per pass (as every forward of the official code in train mode).
    `shared`: a cache already holding slots [0, m) for some m < p (`shared_prefix`); the prefill then
    runs only [m, prefix_len)."""
    pass_key = (lambda i: None) if dropout_key is None else (lambda i: jax.random.fold_in(dropout_key, i))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, s, w = embeds.shape  # w: the model's width D, or more with per-position extras (`patch_copies`)
    k = cfg.num_selected_patches
    is_latent = ids == cfg.latent_token_id
    image_mask = (ids == model.config.image_token_id)[:, :prefix_len] & (jnp.arange(prefix_len)[None] < p)
    latent_count = is_latent.sum(axis=1)  # [B] c_r, contiguous from p

    size = prefix_len + n * (k + 1) + extra_cache
    cached = 0 if shared is None else shared.max_len  # slots [0, cached) are already in the cache
    cache = model.init_cache(b, size) if shared is None else shared.resized(size)
    rows = jnp.full((b,), p - 1 - cached, jnp.int32)  # query p-1, counted from the chunk's start
    out = model.decode(embeds[:, cached:prefix_len], positions.own[..., cached:prefix_len], mask[:, cached:prefix_len],
                       cache=cache, prob_rows=rows, dropout_key=pass_key(0))
    h0 = jnp.take_along_axis(out.hidden, rows[:, None, None], axis=1)[:, 0]  # [B, D] state before latent 0
    d_model = h0.shape[-1]
    score0 = out.row_probs.mean(axis=0)[:, :prefix_len]  # [B, P] mean over layers (heads already)
    # the cache holds [0, prefix_len); slots >= p are overwritten by the chain, and never attended
    # before they are (keys are causal in slot order)
    cache = KVCache(out.cache.k, out.cache.v, out.cache.valid, p)

    def one_pass(carry, i):
        cache, h_prev, score, picked = carry
        has_i = latent_count > i  # [B] rows with an i-th latent; the others' chunk is masked out
        sel = select_patches(score, image_mask, picked, k, cfg.patch_order)  # section 6: [B, K]
        picked = picked | jnp.any(jax.nn.one_hot(sel, prefix_len, dtype=bool), axis=1)
        patches = jnp.take_along_axis(embeds, sel[:, :, None], axis=1)  # section 6: [B, K, W] input embeddings
        patches = patch_copies(patches, d_model, cfg.patch_deepstack)
        chunk = jnp.concatenate([patches, as_input(h_prev, w)[:, None]], axis=1)  # sections 5, 8: [V_i, L_i]
        chunk_mask = jnp.broadcast_to(has_i[:, None], (b, k + 1))  # [B, K+1]
        slots = cache.end + jnp.arange(k + 1)
        o = model.decode(chunk, positions.tail(slots), chunk_mask, cache=cache, prob_rows=jnp.full((b,), k, jnp.int32),
                         dropout_key=pass_key(i + 1))
        h_next = jnp.where(has_i[:, None], o.hidden[:, k], h_prev)  # [B, D] state at L_i: the next latent
        score_next = o.row_probs.mean(axis=0)[:, :prefix_len]
        return (o.cache, h_next, score_next, picked), (jnp.where(has_i[:, None], sel, -1), h_prev)

    picked0 = jnp.zeros((b, prefix_len), bool)
    (cache, h_last, _, _), (selected, latents) = jax.lax.scan(
        one_pass, (cache, h0, score0, picked0), jnp.arange(n), unroll=getattr(model, "unroll_scans", False)
    )
    return LatentChain(selected, latents, cache, h_last)


def chain_gap(counts: jax.Array, n: int, k: int) -> jax.Array:
    """[B] masked slots that `latent_passes` leaves in a row's cache after its own chain: (n - c_r)*(K+1).
    Cache slot t after the chain is slot t - gap of the row alone (give that to the positions' tail)."""
    return (n - counts) * (k + 1)


# ---- step 5: the final sequence ----------------------------------------------------------------------
def assemble(embeds, mask, labels, selected, latents, counts, p, k: int, patch_extras: bool = True):
    """The final sequence [B, S + n*K]: each row gets its own patches before its own latents.

    Row r with c_r latents becomes `question, V_0, L_0, ..., V_{c_r-1}, L_{c_r-1}, rest-of-row` (what it
    is alone, after its left pad), then right padding up to S + n*K (zero embeddings, mask 0, labels
    -100). Its labels are right-aligned by c_r*K: original token j is predicted at final index
    j + c_r*K - 1. embeds [B, S, D] (patches are gathered from them, differentiably), selected [n, B, K]
    (-1 past a row's own passes), latents [n, B, D], counts [B] (c_r). Returns (embeds [B, L, D], mask
    [B, L], labels [B, L]). Embeddings wider than the latents carry per-position extras (`patch_copies`;
    `patch_extras`: whether the patch copies keep theirs); D is then their width."""
    n = selected.shape[0]
    b, s, d = embeds.shape
    length = s + n * k
    f = jnp.arange(length)[None]  # [1, L] final slots
    shift = counts[:, None] * k  # [B, 1] patch slots inserted in the row
    rel = f - p
    in_chain = (rel >= 0) & (rel < counts[:, None] * (k + 1))  # [B, L] the row's own chunks [V_i, L_i]
    step, r = rel // (k + 1), rel % (k + 1)
    is_patch = in_chain & (r < k)
    is_latent_slot = in_chain & (r == k)
    orig = jnp.where(f < p, f, f - shift)  # [B, L] original slot of a question or rest-of-row slot
    is_pad = orig >= s  # [B, L] right padding after the row's end
    # source index into concat([embeds, patches]) [B, S + n*K, D]: the patches of step i at s + i*K + r
    src = jnp.where(is_patch, s + step * k + r, jnp.where(is_latent_slot, p + step, jnp.minimum(orig, s - 1)))
    chosen = jnp.maximum(selected, 0)  # -1 (a pass the row does not have) gathers a patch that goes unused
    patches = jnp.take_along_axis(embeds[None], chosen[..., None], axis=2)  # [n, B, K, D]
    patches = jnp.transpose(patches, (1, 0, 2, 3)).reshape(b, n * k, d)
    patches = patch_copies(patches, latents.shape[-1], patch_extras)
    table = jnp.concatenate([embeds, patches], axis=1)
    final = jnp.take_along_axis(table, src[..., None], axis=1)  # [B, L, D]
    mask_table = jnp.concatenate([mask.astype(bool), jnp.ones((b, n * k), bool)], axis=1)
    final_mask = jnp.take_along_axis(mask_table, src, axis=1) & ~is_pad  # [B, L]
    if n:
        step_c = jnp.clip(step, 0, n - 1)
        slot_latent = jnp.take_along_axis(jnp.transpose(latents, (1, 0, 2)), step_c[..., None], axis=1)  # [B, L, D]
        final = jnp.where(is_latent_slot[..., None], as_input(slot_latent, d).astype(final.dtype), final)
        final_mask = final_mask | is_latent_slot
    final = jnp.where(is_pad[..., None], jnp.zeros((), final.dtype), final)
    j = f - shift  # [B, L] the original token whose label sits at final slot f
    final_labels = jnp.where((j >= 0) & (j < s), jnp.take_along_axis(labels, jnp.clip(j, 0, s - 1), axis=1), IGNORE)
    return final, final_mask, final_labels.astype(labels.dtype)


def as_input(h: jax.Array, width: int) -> jax.Array:
    """A hidden state [..., D] as an input embedding of `width` >= D columns: a latent state carries none of
    the per-position extras some models' embeddings have after their first D columns (Qwen3-VL's DeepStack
    addends, see models/qwen3vl/modeling.py): zeros."""
    return jnp.pad(h, [(0, 0)] * (h.ndim - 1) + [(0, width - h.shape[-1])])


def patch_copies(patches: jax.Array, d_model: int, keep_extras: bool) -> jax.Array:
    """Gathered image-token embeddings [..., W] as inserted copies: with `keep_extras` as they are (a copy
    gets its patch's per-position extras, e.g. DeepStack features), else with the columns past d_model zeroed."""
    if keep_extras or patches.shape[-1] == d_model:
        return patches
    return patches.at[..., d_model:].set(0)


def chunked_cross_entropy(model, hidden, labels, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Per row [B]: (sum of token cross-entropies, number of tokens) of next-token prediction: logits at
    t predict labels[t + 1]. Chunks over the sequence under remat; chunks without labels are skipped."""
    b, t, d = hidden.shape
    targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE, labels.dtype)], axis=1)
    chunk = min(chunk, t)  # a sequence shorter than a chunk is one chunk, unpadded
    pad = -t % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
    hs = hidden.reshape(b, -1, chunk, d).transpose(1, 0, 2, 3)
    ts = targets.reshape(b, -1, chunk).transpose(1, 0, 2)

    def piece(h, y):
        logits = model.logits(h)  # [B, chunk, V] fp32
        valid = y != IGNORE
        gold = jnp.take_along_axis(logits, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - gold
        return jnp.sum(jnp.where(valid, nll, 0.0), axis=1)

    # the skip inside the remat: its residuals are then h, y and the LM head as it is (loop-invariant, kept
    # once); a remat inside the cond would return the head from the cond, stacked per chunk ([chunks, D, V])
    @jax.checkpoint
    def chunk_nll(h, y):
        return jax.lax.cond(jnp.any(y != IGNORE), piece, lambda h, y: jnp.zeros((b,), acc), h, y)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    acc = acc_dtype(hidden)
    total, _ = jax.lax.scan(body, jnp.zeros((b,), acc), (hs, ts), unroll=getattr(model, "unroll_scans", False))
    return total, jnp.sum(targets != IGNORE, axis=1)
