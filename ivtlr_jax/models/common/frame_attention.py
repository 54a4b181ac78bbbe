"""Attention within contiguous segments of one flat sequence (the vision towers' image frames), at a
cost proportional to the segments' own blocks, with the segment layout traced (static length only).

q, k, v [Np, N, H] and segment ids [Np]: a query attends to the keys of its own run of equal ids (image
frames are contiguous in the processor's patch order and in Qwen2.5-VL's window order). The dense
alternative, one softmax over all Np keys under a [Np, Np] block-diagonal mask, costs Np^2 whatever
the frame sizes; this costs about sum over frames of n_f^2, rounded out to tiles.

How: the sequence is cut into `TILE`-row tiles (padded up with a run of its own). Query tile i needs
the contiguous range of key tiles [lo_i, hi_i] covering the runs its rows belong to; the (query tile,
key tile) pairs, ordered by query tile, number P (traced, at most nt^2). They are processed `GROUP` at a
time in a `lax.fori_loop` of ceil(P / GROUP) steps: per group, the query/key/value tiles are gathered,
[G, N, c, c] logits masked by run equality (fp32), and folded into per-query-tile accumulators with an
online softmax (running max, sum and output; fp32). A group's pairs cover at most GROUP consecutive
query tiles, so each step reads and writes one window of GROUP accumulator tiles, never all of them.

Differentiation goes through a custom VJP (the flash-attention backward: the same pair loop recomputes
the probabilities from the saved log-sum-exp and accumulates dq, dk, dv), so the loops with traced trip
counts are never differentiated and the backward keeps only q, k, v, the output and the log-sum-exp:
O(Np) memory, where autodiff through a scan over nt^2 / G groups would keep per-group accumulators.
Forward-mode (jvp) is not defined. Every real row sees at least itself, so no row's softmax is empty;
masked logits are NEG_INF (finite) and masked probabilities are zeroed explicitly, so rows of a pair
without matching keys contribute nothing and never NaN.

Tile and group sizes: TILE 128, GROUP 4, from `bench/vision.py --tiles 64,128,256 --groups 1,2,4,8`
(2-core CPU, Qwen2-VL "mid" vision widths, frames of 256-1024 patches; docs/benchmarks.md section 12).
Every setting was within the machine's noise of the best (about 10-20%): tiles of 64 did best on
mixed sizes (less work wasted on tiles that two frames share or that a frame only partly fills), of
256 on frames a multiple of the tile; 128 is the middle and needs a quarter of the pairs, so of the
loop's steps, that 64 does (each step has a fixed cost, larger on a GPU: not measured there).

Sequences of at most DENSE_TILES tiles (small images) take one softmax under the [Np, Np] mask instead:
as cheap there, and without the loops to compile.

`attention_impl` "fused" does not apply here: a fused kernel takes one block size, so frames of mixed
(or traced) sizes go through this path with either setting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .attention import NEG_INF, dot_product_attention
from .layers import acc_dtype

TILE = 128
GROUP = 4
DENSE_TILES = 2  # sequences of up to this many tiles run one masked softmax (cheap, and no loop to compile)


def frame_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array, scale: float,
                    tile: int | None = None, group: int | None = None) -> jax.Array:
    """q, k, v [Np, N, H], segment [Np] int (each id's positions contiguous) -> [Np, N, H]: softmax(q k^T
    * scale) v with each query seeing only the keys of its own run of equal ids. Softmax in fp32.
    tile, group: static; None reads the module's TILE and GROUP when traced (bench/vision.py sweeps them)."""
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape or segment.shape != q.shape[:1]:
        raise ValueError(f"q, k, v must be [Np, N, H] alike and segment [Np]: {q.shape}, {k.shape}, "
                         f"{v.shape}, {segment.shape}")
    tile = tile or TILE
    if q.shape[0] <= DENSE_TILES * tile:  # a few tiles: the dense block costs about as much, without the loops
        mask = (segment[:, None] == segment[None, :])[None]  # [1, Np, Np]
        return dot_product_attention(q[None], k[None], v[None], mask, scale)[0]
    return _frame_attention(q, k, v, segment.astype(jnp.int32), float(scale), tile, group or GROUP)


def _layout(segment: jax.Array, tile: int, group: int):
    """Tiling of the runs: run id per padded position [nt, c], and per query tile [nt] the index one past
    its last pair, of its first pair and its first key tile; the number of groups, the group size."""
    n = segment.shape[0]
    nt = -(-n // tile)
    change = jnp.concatenate([jnp.zeros((1,), jnp.int32), (segment[1:] != segment[:-1]).astype(jnp.int32)])
    runs = jnp.cumsum(change)  # nondecreasing run ids 0, 1, ...
    runs = jnp.pad(runs, (0, nt * tile - n), constant_values=runs[-1] + 1)  # padding: a run of its own
    start = jnp.searchsorted(runs, runs[::tile], side="left")  # first position of each tile's first run
    end = jnp.searchsorted(runs, runs[tile - 1::tile], side="right") - 1  # last position of its last run
    lo, hi = start // tile, end // tile
    counts = hi - lo + 1  # key tiles per query tile
    ends = jnp.cumsum(counts)
    g = min(group, nt)
    num_groups = (ends[-1] + g - 1) // g
    return runs.reshape(nt, tile), (ends, ends - counts, lo), num_groups, g


def _group_pairs(i, pairs, g: int, nt: int):
    """Group i's pairs: query tiles [g], key tiles [g], valid [g], the window's first tile, local ids."""
    ends, firsts, lo = pairs
    p = i * g + jnp.arange(g)
    valid = p < ends[-1]
    qi = jnp.minimum(jnp.searchsorted(ends, p, side="right"), nt - 1)
    kj = lo[qi] + p - firsts[qi]
    base = jnp.minimum(qi[0], nt - g)
    qi = jnp.where(valid, qi, base)
    kj = jnp.where(valid, kj, lo[base])
    return qi, kj, valid, base, qi - base


def _window_sum(loc, values, g: int):
    """Sum of the pairs' values [g, ...] into the window's g query tiles (loc: each pair's tile in it)."""
    onehot = (loc[:, None] == jnp.arange(g)[None]).astype(values.dtype)  # [pairs, window tiles]
    return jnp.einsum("gt,g...->t...", onehot, values)


def _tiles(t, nt: int, tile: int):
    pad = nt * tile - t.shape[0]
    return jnp.pad(t, [(0, pad)] + [(0, 0)] * (t.ndim - 1)).reshape(nt, tile, *t.shape[1:])


def _logits(qt, kt, rq, rk, valid, scale):
    """[g, N, c, c] fp32 logits (NEG_INF where masked) and the mask [g, 1, c, c]."""
    s = jnp.einsum("gqnh,gknh->gnqk", qt, kt, preferred_element_type=acc_dtype(qt)) * scale
    mask = ((rq[:, :, None] == rk[:, None, :]) & valid[:, None, None])[:, None]
    return jnp.where(mask, s, NEG_INF), mask


def _forward(q, k, v, segment, scale, tile, group):
    """(output [Np, N, H], log-sum-exp [nt, N, c] fp32)."""
    n, heads, h = q.shape
    runs, pairs, num_groups, g = _layout(segment, tile, group)
    nt = runs.shape[0]
    qt, kt, vt = (_tiles(t, nt, tile) for t in (q, k, v))
    f32 = acc_dtype(q)

    def body(i, carry):
        m_acc, l_acc, o_acc = carry  # [nt, N, c], [nt, N, c], [nt, c, N, H]
        qi, kj, valid, base, loc = _group_pairs(i, pairs, g, nt)
        s, mask = _logits(qt[qi], kt[kj], runs[qi], runs[kj], valid, scale)
        m_pair = s.max(-1)  # [g, N, c]
        m_old = jax.lax.dynamic_slice_in_dim(m_acc, base, g)
        m_new = jnp.maximum(m_old, jax.ops.segment_max(m_pair, loc, num_segments=g))
        alpha = jnp.exp(m_old - m_new)  # [g, N, c]
        p = jnp.where(mask, jnp.exp(s - m_new[loc][..., None]), 0.0)
        pv = jnp.einsum("gnqk,gknh->gqnh", p.astype(v.dtype), vt[kj], preferred_element_type=f32)
        l_new = jax.lax.dynamic_slice_in_dim(l_acc, base, g) * alpha + _window_sum(loc, p.sum(-1), g)
        o_new = (jax.lax.dynamic_slice_in_dim(o_acc, base, g) * alpha.transpose(0, 2, 1)[..., None]
                 + _window_sum(loc, pv, g))
        update = lambda acc, new: jax.lax.dynamic_update_slice_in_dim(acc, new, base, 0)
        return update(m_acc, m_new), update(l_acc, l_new), update(o_acc, o_new)

    init = (jnp.full((nt, heads, tile), NEG_INF, f32), jnp.zeros((nt, heads, tile), f32),
            jnp.zeros((nt, tile, heads, h), f32))
    m_acc, l_acc, o_acc = jax.lax.fori_loop(0, num_groups, body, init)
    l_acc = jnp.where(l_acc > 0, l_acc, 1.0)  # every real row has a key; guards the division anyway
    out = o_acc / l_acc.transpose(0, 2, 1)[..., None]
    return out.reshape(nt * tile, heads, h)[:n].astype(q.dtype), m_acc + jnp.log(l_acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _frame_attention(q, k, v, segment, scale, tile, group):
    return _forward(q, k, v, segment, scale, tile, group)[0]


def _fwd(q, k, v, segment, scale, tile, group):
    out, lse = _forward(q, k, v, segment, scale, tile, group)
    return out, (q, k, v, segment, out, lse)


def _bwd(scale, tile, group, residuals, d_out):
    q, k, v, segment, out, lse = residuals
    n, heads, h = q.shape
    runs, pairs, num_groups, g = _layout(segment, tile, group)
    nt = runs.shape[0]
    f32 = acc_dtype(q)
    qt, kt, vt = (_tiles(t, nt, tile) for t in (q, k, v))
    dot = _tiles(d_out, nt, tile)  # [nt, c, N, H]
    delta = jnp.einsum("tqnh,tqnh->tnq", dot.astype(f32), _tiles(out, nt, tile).astype(f32))  # rowsum(dO * O)

    def body(i, carry):
        dq, dk, dv = carry  # [nt, c, N, H] fp32 each
        qi, kj, valid, base, loc = _group_pairs(i, pairs, g, nt)
        q_g, k_g, v_g, do_g = qt[qi], kt[kj], vt[kj], dot[qi]
        s, mask = _logits(q_g, k_g, runs[qi], runs[kj], valid, scale)
        p = jnp.where(mask, jnp.exp(s - lse[qi][..., None]), 0.0)  # [g, N, c, c] normalized probabilities
        dv_pair = jnp.einsum("gnqk,gqnh->gknh", p.astype(do_g.dtype), do_g, preferred_element_type=f32)
        dp = jnp.einsum("gqnh,gknh->gnqk", do_g, v_g, preferred_element_type=f32)
        ds = (p * (dp - delta[qi][..., None]) * scale).astype(q.dtype)
        dq_pair = jnp.einsum("gnqk,gknh->gqnh", ds, k_g, preferred_element_type=f32)
        dk_pair = jnp.einsum("gnqk,gqnh->gknh", ds, q_g, preferred_element_type=f32)
        dq_win = jax.lax.dynamic_slice_in_dim(dq, base, g) + _window_sum(loc, dq_pair, g)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_win, base, 0)
        return dq, dk.at[kj].add(dk_pair), dv.at[kj].add(dv_pair)

    zeros = jnp.zeros((nt, tile, heads, h), f32)
    dq, dk, dv = jax.lax.fori_loop(0, num_groups, body, (zeros, zeros, zeros))
    cut = lambda t, like: t.reshape(nt * tile, heads, h)[:n].astype(like.dtype)
    return cut(dq, q), cut(dk, k), cut(dv, v), None


_frame_attention.defvjp(_fwd, _bwd)
