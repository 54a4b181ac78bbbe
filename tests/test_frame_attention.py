"""`frame_attention` (attention within contiguous segments, tiled, segment layout traced) against a plain
dense softmax under the block-diagonal mask: values and gradients, fp32, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivtlr_jax.models.common import frame_attention as fa
from ivtlr_jax.models.common.frame_attention import frame_attention

TILE = 16  # small tiles, so that a few dozen rows cover every case below


@pytest.fixture(autouse=True)
def tiled_at_any_length(monkeypatch):
    """Every length through the tiles (short sequences otherwise take one masked softmax)."""
    monkeypatch.setattr(fa, "DENSE_TILES", 0)  # read when traced

# frame sizes; all with tiles of 16 rows
LAYOUTS = {
    "mixed sizes": [20, 7, 33, 12],
    "frame longer than two tiles": [5, 45, 10],
    "frames straddling tile boundaries": [10, 10, 10, 10, 10, 10],
    "one frame": [50],
    "one frame, exactly a tile": [16],
    "many tiny frames": [1, 2, 3, 1, 1, 4, 2, 5, 1, 3, 2, 1, 6, 1],
    "tile-aligned frames": [16, 32, 16],
    "shorter than a tile": [3, 4],
}


def reference(q, k, v, segment, scale):
    """Dense softmax over all Np keys under the [Np, Np] block-diagonal mask."""
    logits = jnp.einsum("qnh,knh->nqk", q, k) * scale
    mask = segment[:, None] == segment[None, :]
    probs = jax.nn.softmax(jnp.where(mask[None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("nqk,knh->qnh", probs, v)


def inputs(sizes, seed=0, heads=3, head_dim=8):
    n = sum(sizes)
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, d_out = (jax.random.normal(key, (n, heads, head_dim), jnp.float32) for key in keys)
    segment = jnp.asarray(np.repeat(np.arange(len(sizes)) * 3 + 5, sizes), jnp.int32)  # ids need not start at 0
    return q, k, v, d_out, segment


# every layout with groups of 3 pairs; groups of one pair (each its own accumulator window) on three
@pytest.mark.parametrize("name,group", [(name, 3) for name in LAYOUTS] + [
    ("mixed sizes", 1), ("frames straddling tile boundaries", 1), ("many tiny frames", 1)])
def test_values_and_gradients_match_the_dense_masked_softmax(name, group):
    q, k, v, d_out, segment = inputs(LAYOUTS[name])
    scale = q.shape[-1] ** -0.5
    ours = jax.jit(lambda q, k, v, s: frame_attention(q, k, v, s, scale, tile=TILE, group=group))
    loss = lambda f: lambda q, k, v, s: jnp.sum(f(q, k, v, s) * d_out)
    grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))
    np.testing.assert_allclose(ours(q, k, v, segment), reference(q, k, v, segment, scale), atol=1e-5, rtol=1e-5)
    tiled = grad(lambda q, k, v, s: frame_attention(q, k, v, s, scale, tile=TILE, group=group))(q, k, v, segment)
    dense = grad(lambda q, k, v, s: reference(q, k, v, s, scale))(q, k, v, segment)
    for name_, a, b in zip("qkv", tiled, dense):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name_}")


def test_one_compile_serves_every_layout_of_a_length():
    """The segments are traced: layouts of one length share a compile and each gets its own answer."""
    f = jax.jit(lambda q, k, v, s: frame_attention(q, k, v, s, 0.5, tile=TILE))
    for sizes in ([48], [10, 38], [16, 16, 16], [1] * 48):
        q, k, v, _, segment = inputs(sizes, seed=len(sizes))
        np.testing.assert_allclose(f(q, k, v, segment), reference(q, k, v, segment, 0.5), atol=1e-5, rtol=1e-5)
    assert f._cache_size() == 1


def test_the_cost_follows_the_frames():
    """Many small frames run fewer pair groups than one frame of the same length: the loop's trip count
    depends on the layout (it is not the dense nt^2). Checked through the number of key tiles read."""
    from ivtlr_jax.models.common.frame_attention import _layout

    _, (ends, _, _), groups, _ = _layout(jnp.asarray(np.repeat(np.arange(8), 16)), TILE, 1)
    assert int(ends[-1]) == int(groups) == 8  # 8 tile-aligned frames: one pair per tile
    _, (ends, _, _), groups, _ = _layout(jnp.zeros(128, jnp.int32), TILE, 1)
    assert int(ends[-1]) == int(groups) == 64  # one frame: every pair


def test_bfloat16_runs_close_to_fp32():
    q, k, v, _, segment = inputs(LAYOUTS["mixed sizes"])
    as_bf16 = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    out = frame_attention(*as_bf16, segment, 0.35, tile=TILE)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), reference(q, k, v, segment, 0.35), atol=3e-2)


def test_shapes_are_checked():
    q, k, v, _, segment = inputs([4, 4])
    with pytest.raises(ValueError, match="alike"):
        frame_attention(q, k[:, :1], v, segment, 1.0)


def test_short_sequences_take_one_masked_softmax(monkeypatch):
    """Up to DENSE_TILES tiles: no loop (one softmax under the block-diagonal mask), the same values."""
    monkeypatch.setattr(fa, "DENSE_TILES", 2)
    q, k, v, _, segment = inputs([10, 7, 15])  # 32 rows: two tiles of 16
    f = jax.jit(lambda q, k, v, s: frame_attention(q, k, v, s, 0.5, tile=TILE))
    assert "while" not in f.lower(q, k, v, segment).as_text()
    np.testing.assert_allclose(f(q, k, v, segment), reference(q, k, v, segment, 0.5), atol=1e-5, rtol=1e-5)
    longer = inputs([10, 7, 16])[0]
    assert "while" in jax.jit(lambda q: frame_attention(q, q, q, jnp.zeros(33, jnp.int32), 0.5, tile=TILE)).lower(
        longer).as_text()
