"""Qwen2-VL Flax port vs transformers' Qwen2VLForConditionalGeneration (fp32, tiny random model); what every family
does alike (text-only logits, greedy generation) is in tests/test_families.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ivtlr_jax.io import from_pretrained
from tests import hf_tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def flax_model(tiny_qwen2vl):
    return from_pretrained(tiny_qwen2vl[0])


def max_diff(a, b, mask):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask.astype(bool)].max())


def test_image_text_logits_and_every_hidden_state_match(tiny_qwen2vl, flax_model, qwen2vl_batch):
    hf = tiny_qwen2vl[1]
    ids, mask, pv, grid = qwen2vl_batch
    assert len(set(map(tuple, grid.tolist()))) == 2, "two images of different sizes"
    ref = hf_tiny.hf_forward(hf, ids, mask, pv, grid, output_hidden_states=True)
    out = flax_model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), jnp.asarray(grid),
                     output_hidden_states=True)
    assert max_diff(out.logits, ref.logits.numpy(), mask) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.text_config.num_hidden_layers + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert max_diff(ours, theirs.numpy(), mask) <= TOL, f"hidden state {i}"


def test_vision_tower_matches(tiny_qwen2vl, flax_model, qwen2vl_batch):
    hf = tiny_qwen2vl[1]
    _, _, pv, grid = qwen2vl_batch
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    ours = np.asarray(flax_model.image_features(jnp.asarray(pv), jnp.asarray(grid)))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("left_pad", [False, True])
def test_rope_index_matches_transformers(tiny_qwen2vl, flax_model, left_pad):
    hf = tiny_qwen2vl[1]
    # row 0 holds two images, row 1 one: images are consumed in batch order
    rng = np.random.default_rng(3)
    pv, grid = hf_tiny.image_inputs([(56, 84), (56, 56), (112, 56)], seed=3)
    n = (grid.prod(-1) // 4).tolist()
    span = lambda k: [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * k + [hf_tiny.VISION_END]
    text = lambda k: list(rng.integers(0, hf_tiny.TEXT_VOCAB, k))
    rows = [text(3) + span(n[0]) + text(2) + span(n[1]) + text(4), text(1) + span(n[2]) + text(2)]
    ids, mask = hf_tiny.pad_rows(rows, left_pad)
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.tensor(ids), torch.tensor((ids == hf_tiny.IMAGE_TOKEN).astype(np.int64)), torch.tensor(grid), None,
        torch.tensor(mask))
    pos, delta = flax_model.rope_index(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(grid))
    np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy())
    # and the whole forward with these inputs
    ref = hf_tiny.hf_forward(hf, ids, mask, pv, grid).logits.numpy()
    out = flax_model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), jnp.asarray(grid))
    assert max_diff(out.logits, ref, mask) <= TOL


@pytest.mark.parametrize("rank", [2, 3])
def test_explicit_position_ids(tiny_qwen2vl, flax_model, qwen2vl_batch, rank):
    """IVT-LR passes explicit 1-D positions (the same index on all three M-RoPE rows)."""
    hf = tiny_qwen2vl[1]
    ids, mask, pv, grid = qwen2vl_batch
    pos = np.broadcast_to(np.arange(ids.shape[1])[None] + np.array([[0], [5]]), ids.shape).copy()
    if rank == 3:
        pos = np.stack([pos, pos + 1, 2 * pos])
    ref = hf_tiny.hf_forward(hf, ids, mask, pv, grid, position_ids=torch.tensor(pos)).logits.numpy()
    out = flax_model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), jnp.asarray(grid), jnp.asarray(pos))
    assert max_diff(out.logits, ref, mask) <= TOL


def test_greedy_generation_rejects_right_padding(flax_model):
    ids, mask = hf_tiny.text_batch(lengths=(5, 3))
    with pytest.raises(ValueError, match="left-padded"):
        hf_tiny.greedy_generate(flax_model, ids, mask, max_new_tokens=2)


def test_image_token_count_mismatch_is_rejected(flax_model, qwen2vl_batch):
    ids, mask, pv, grid = qwen2vl_batch
    ids = ids.copy()
    ids[0, np.flatnonzero(ids[0] == hf_tiny.IMAGE_TOKEN)[0]] = 5
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        flax_model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), jnp.asarray(grid))


def test_layers_are_scanned_so_compiled_size_does_not_grow_with_depth(tmp_path):
    """The HLO of a 2-layer and an 8-layer model have the same size: the layer stack is one scan."""
    from flax import nnx

    from ivtlr_jax.models import FAMILIES
    from ivtlr_jax.models.qwen2vl.config import Qwen2VLConfig

    sizes = []
    for layers in (2, 8):
        cfg = Qwen2VLConfig.from_hf(hf_tiny.qwen2vl_config(num_hidden_layers=layers).to_dict())
        model = nnx.eval_shape(lambda: FAMILIES["qwen2_vl"].model_cls(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).logits)
        hlo = f.lower(state, jax.ShapeDtypeStruct((2, 16), jnp.int32)).as_text()
        sizes.append(len(hlo.splitlines()))
    assert abs(sizes[0] - sizes[1]) <= 0.02 * sizes[0], sizes


MIXED_SIZES = [(112, 140), (84, 84), (140, 112), (56, 56)]  # 8x10, 6x6, 10x8, 4x4 patches
SMALL_TILE = 16


@pytest.mark.parametrize("tile", [None, SMALL_TILE])
def test_mixed_sizes_with_a_traced_grid_match_transformers(tiny_qwen2vl, flax_model, monkeypatch, tile):
    """Four images of mixed sizes in one jitted call, image_grid_thw an argument (traced): the tower runs
    `frame_attention`, with its default tile and with tiles small enough that frames span and straddle
    several, and its features equal transformers'."""
    from ivtlr_jax.models.common import frame_attention as fa
    from ivtlr_jax.models.qwen2vl import vision

    pv, grid = hf_tiny.image_inputs(MIXED_SIZES, seed=4)
    frames = grid.prod(-1)
    assert len(set(frames.tolist())) == 3 and frames.max() > 4 * SMALL_TILE  # frames span and straddle tiles
    with torch.no_grad():
        ref = tiny_qwen2vl[1].model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    if tile is not None:
        monkeypatch.setattr(fa, "TILE", tile)  # read when traced
    calls = []
    monkeypatch.setattr(vision, "frame_attention", lambda *a, **k: calls.append(1) or fa.frame_attention(*a, **k))
    ours = jax.jit(lambda p, g: flax_model.image_features(p, g))(jnp.asarray(pv), jnp.asarray(grid))
    assert calls, "the traced grid goes through frame_attention"
    assert ours.shape == ref.shape
    assert np.abs(np.asarray(ours) - ref).max() <= TOL


def test_per_frame_vision_attention_equals_the_masked_one(flax_model):
    """Same-size frames attended per frame (the tower given their static length: the path of
    attention_impl "fused", here on einsums) equal the flat layout's with a traced grid (`frame_attention`)."""
    pv, grid = hf_tiny.image_inputs([(56, 84), (56, 84), (56, 84)], seed=9)
    args = (jnp.asarray(pv), jnp.asarray(grid))
    masked = jax.jit(lambda p, g: flax_model.image_features(p, g))(*args)  # traced grid, flat: frame_attention
    per_frame = jax.jit(lambda p, g: flax_model.visual(p, g, frame_len=pv.shape[0] // 3))(*args)
    np.testing.assert_allclose(np.asarray(per_frame), np.asarray(masked), atol=1e-5)
    with pytest.raises(ValueError, match="holds 1 images but"):
        flax_model.image_features(args[0][None], args[1])


@pytest.mark.parametrize("attention_impl", ["xla", "fused"])
def test_collated_same_size_images_take_the_tiled_frame_attention(tiny_qwen2vl, monkeypatch, attention_impl):
    """The trainer's collator stacks same-size images [B, Np, 1176]; under jit (as the train and eval steps run)
    the tower attends through `frame_attention` with the default attention_impl "xla" (the faster path:
    docs/benchmarks.md section 12), per frame with "fused" (one block size for the kernel); both give
    transformers' features."""
    from ivtlr_jax.data.collate import collate
    from ivtlr_jax.models.common import frame_attention as fa
    from ivtlr_jax.models.qwen2vl import vision

    pv, grid = hf_tiny.image_inputs([(56, 84)] * 3, seed=3)
    per_image = pv.shape[0] // 3
    rows = [([5, 6], [5, 6], {"pixel_values": pv[i * per_image:(i + 1) * per_image], "image_grid_thw": grid[i:i + 1]})
            for i in range(3)]
    batch, _ = collate(rows, latent_id=7, pad_id=0, length_buckets=(8,))
    assert batch["pixel_values"].shape == (3, per_image, pv.shape[-1])  # stacked per image
    with torch.no_grad():
        ref = tiny_qwen2vl[1].model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    calls = []
    monkeypatch.setattr(vision, "frame_attention", lambda *a, **k: calls.append(1) or fa.frame_attention(*a, **k))
    model = from_pretrained(tiny_qwen2vl[0], attention_impl=attention_impl)
    ours = jax.jit(lambda p, g: model.image_features(p, g))(*(jnp.asarray(batch[k]) for k in ("pixel_values",
                                                                                             "image_grid_thw")))
    assert bool(calls) == (attention_impl == "xla"), f"{attention_impl}: frame_attention traced {len(calls)} times"
    assert np.abs(np.asarray(ours) - ref).max() <= TOL
