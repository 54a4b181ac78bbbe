"""Qwen2.5-VL Flax port vs transformers' Qwen2_5_VLForConditionalGeneration (fp32, tiny random model).

The tiny model (tests/hf_tiny.py) has 3 vision blocks (0 and 2 windowed, 1 full), windows of 4x4
patches and images of 6x6 and 8x10 patches, so that windows are partial at the image edges and cross
the 16-row chunks of the windowed attention."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models import FAMILIES
from ivtlr_jax.io.safetensors import SafetensorsFolder, save_file
from ivtlr_jax.models.qwen25vl.config import HUB_CONFIGS, Qwen25VLConfig
from ivtlr_jax.models.qwen25vl.vision import window_layout
from tests import hf_tiny

TOL = 1e-4
SIZES = hf_tiny.QWEN25VL_IMAGE_SIZES


@pytest.fixture(scope="module")
def tiny(tiny_qwen25vl):
    """(folder, transformers model, our model) of the session's tiny random Qwen2.5-VL (tests/conftest.py)."""
    folder, hf = tiny_qwen25vl
    return folder, hf, from_pretrained(folder)


@pytest.fixture(scope="module")
def jitted(tiny):
    """Our model's pieces under jit (grids traced): one compile per input shape, shared by the tests."""
    model = tiny[2]
    return dict(
        features=jax.jit(lambda pv, grid: model.image_features(pv, grid)),
        forward=jax.jit(lambda ids, mask, pv, grid: model(ids, mask, pv, grid, output_hidden_states=True)),
        rope_index=jax.jit(lambda ids, mask, grid: model.rope_index(ids, mask, grid)),
    )


@pytest.fixture(scope="module")
def images():
    return hf_tiny.image_inputs(SIZES)


def max_diff(a, b, mask=None):
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float((d if mask is None else d[mask.astype(bool)]).max())


def test_tiny_model_exercises_windows_and_both_block_kinds(tiny, images):
    cfg = tiny[2].config.vision
    _, grid = images
    assert tiny[2].config.model_type == "qwen2_5_vl" and type(tiny[2]).__name__ == "Qwen25VL"
    assert 0 < len(cfg.fullatt_block_indexes) < cfg.depth, "windowed and full blocks"
    merged = grid[:, 1:] // cfg.spatial_merge_size
    assert len(set(map(tuple, grid.tolist()))) == 2, "two images of different sizes"
    assert (merged % cfg.window_merged != 0).any(), "a partial window"
    assert cfg.window_patches < grid.prod(-1).sum() / 2, "several chunks of windowed attention"


def test_window_order_matches_transformers_window_index(tiny, images):
    """Our window ids, stably sorted, give transformers' `get_vision_window_index` order and windows."""
    from transformers.vision_utils import get_vision_window_index

    cfg = tiny[2].config.vision
    _, grid = images
    n = int(grid.prod(-1).sum())
    ref_index, ref_cu = get_vision_window_index(torch.tensor(grid), cfg.spatial_merge_size, cfg.window_size,
                                                cfg.patch_size)
    _, _, window = jax.jit(window_layout, static_argnums=(1, 2))(jnp.asarray(grid), n, cfg)
    order = np.argsort(np.asarray(window), kind="stable")
    unit = cfg.spatial_merge_size**2
    np.testing.assert_array_equal(order.reshape(-1, unit)[:, 0] // unit, ref_index.numpy())
    np.testing.assert_array_equal(order.reshape(-1, unit) % unit, np.tile(np.arange(unit), (n // unit, 1)))
    _, counts = np.unique(np.asarray(window)[order], return_counts=True)
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(counts)]), ref_cu.numpy())
    assert counts.max() <= cfg.window_patches


def test_vision_tower_matches(tiny, jitted, images):
    """Features vs transformers' visual(...), image_grid_thw traced."""
    pv, grid = images
    with torch.no_grad():
        ref = tiny[1].model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    ours = jitted["features"](jnp.asarray(pv), jnp.asarray(grid))
    assert ours.shape == ref.shape == (grid.prod(-1).sum() // 4, tiny[2].config.text.hidden_size)
    print(f"\nvision tower max abs diff: {max_diff(ours, ref):.2e}")
    assert max_diff(ours, ref) <= TOL


SMALL_TILE = 16


@pytest.mark.parametrize("tile", [None, SMALL_TILE])
def test_mixed_sizes_with_a_traced_grid_match_transformers(tiny, monkeypatch, tile):
    """Four images of mixed sizes in one jitted call (grid traced): the full block runs `frame_attention`,
    with its default tile and with tiles small enough that frames span and straddle several, and the
    features equal transformers'."""
    from ivtlr_jax.models.common import frame_attention as fa
    from ivtlr_jax.models.qwen25vl import vision

    pv, grid = hf_tiny.image_inputs([(112, 140), (84, 84), (140, 112), (56, 56)], seed=4)
    frames = grid.prod(-1)
    assert len(set(frames.tolist())) == 3 and frames.max() > 4 * SMALL_TILE  # frames span and straddle tiles
    with torch.no_grad():
        ref = tiny[1].model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    if tile is not None:
        monkeypatch.setattr(fa, "TILE", tile)  # read when traced
    calls = []
    monkeypatch.setattr(vision, "frame_attention", lambda *a, **k: calls.append(1) or fa.frame_attention(*a, **k))
    ours = jax.jit(lambda p, g: tiny[2].image_features(p, g))(jnp.asarray(pv), jnp.asarray(grid))
    assert calls, "the traced grid goes through frame_attention"
    assert max_diff(ours, ref) <= TOL


def test_stacked_same_size_images_match_transformers(tiny, monkeypatch):
    """[images, patches, dim] pixel values (one size, static frame length under jit: the collator's layout)
    give transformers' features, the full blocks attending through `frame_attention` (the faster path with
    the default attention_impl, docs/benchmarks.md section 12)."""
    from ivtlr_jax.models.common import frame_attention as fa
    from ivtlr_jax.models.qwen25vl import vision

    pv, grid = hf_tiny.image_inputs([SIZES[1]] * 2, seed=5)
    with torch.no_grad():
        ref = tiny[1].model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    calls = []
    monkeypatch.setattr(vision, "frame_attention", lambda *a, **k: calls.append(1) or fa.frame_attention(*a, **k))
    f = jax.jit(lambda p, g: tiny[2].image_features(p, g))
    stacked = f(jnp.asarray(pv).reshape(2, -1, pv.shape[-1]), jnp.asarray(grid))
    assert calls, "the full blocks of same-size stacked images go through frame_attention"
    assert max_diff(stacked, ref) <= TOL
    with pytest.raises(ValueError, match="holds 1 images but"):
        tiny[2].image_features(jnp.asarray(pv)[None], jnp.asarray(grid))


@pytest.mark.parametrize("left_pad", [False, True])
def test_image_text_logits_match(tiny, jitted, left_pad):
    hf = tiny[1]
    ids, mask, pv, grid = hf_tiny.qwen2vl_image_batch(seed=0, left_pad=left_pad, sizes=SIZES)
    ref = hf_tiny.hf_forward(hf, ids, mask, pv, grid, output_hidden_states=True)
    out = jitted["forward"](jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), jnp.asarray(grid))
    diff = max_diff(out.logits, ref.logits.numpy(), mask)
    print(f"\nlogits max abs diff ({'left' if left_pad else 'right'} padding): {diff:.2e}")
    assert diff <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert max_diff(ours, theirs.numpy(), mask) <= TOL, f"hidden state {i}"


@pytest.mark.parametrize("left_pad", [False, True])
def test_rope_index_matches_transformers(tiny, jitted, left_pad):
    """Row 0 holds two images, row 1 one: images are consumed in batch order."""
    hf = tiny[1]
    rng = np.random.default_rng(3)
    _, grid = hf_tiny.image_inputs([SIZES[0], SIZES[1], (56, 112)], seed=3)
    n = (grid.prod(-1) // 4).tolist()
    span = lambda k: [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * k + [hf_tiny.VISION_END]
    text = lambda k: list(rng.integers(0, hf_tiny.TEXT_VOCAB, k))
    rows = [text(3) + span(n[0]) + text(2) + span(n[1]) + text(4), text(1) + span(n[2]) + text(2)]
    ids, mask = hf_tiny.pad_rows(rows, left_pad)
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.tensor(ids), torch.tensor((ids == hf_tiny.IMAGE_TOKEN).astype(np.int64)), torch.tensor(grid), None,
        None, torch.tensor(mask))
    pos, delta = jitted["rope_index"](jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(grid))
    np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy())


def test_both_weight_layouts_load(tiny, tmp_path):
    """save_pretrained's hub names (transformers 4.5x: model.layers.*, visual.*, lm_head.*) and
    transformers 5's in-memory names (model.language_model.*, model.visual.*), the latter next to a
    flat 4.5x-style config.json written by our `to_hf`."""
    folder, hf, model = tiny
    hub_names = SafetensorsFolder(folder).keys()
    assert any(k.startswith("visual.blocks.") for k in hub_names)
    assert not any(k.startswith("model.language_model.") for k in hub_names)

    dst = tmp_path / "in_memory"
    dst.mkdir()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state) and any(k.startswith("model.visual.")
                                                                            for k in state)
    save_file(state, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(model.config.to_hf()))
    assert "text_config" not in json.loads((dst / "config.json").read_text())
    other = from_pretrained(dst)
    assert other.config == model.config
    ours, theirs = (jax.tree.leaves(jax.tree.map(np.asarray, nnx.state(m))) for m in (model, other))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    # the reference: a shared tensor of each kind equals transformers' own
    np.testing.assert_array_equal(np.asarray(other.visual.blocks.gate_weight_ef[...])[1],
                                  state["model.visual.blocks.1.mlp.gate_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(other.visual.merger_norm_scale_e[...]),
                                  state["model.visual.merger.ln_q.weight"])


def test_released_config_layout_is_read():
    """The flat config.json of Qwen2.5-VL-7B-Instruct (text fields at the top, `rope_scaling` mrope)."""
    raw = HUB_CONFIGS["Qwen/Qwen2.5-VL-7B-Instruct"]
    cfg = Qwen25VLConfig.from_hf(raw)
    v = cfg.vision
    assert (v.embed_dim, v.head_dim, v.mlp_dim, v.out_hidden_size) == (1280, 80, 3420, 3584)
    assert (v.window_merged, v.window_patches, v.fullatt_block_indexes) == (4, 64, (7, 15, 23, 31))
    assert (cfg.text.num_layers, cfg.text.head_dim, cfg.mrope_section, cfg.rope_theta) == (28, 128, (16, 24, 24), 1e6)
    assert Qwen25VLConfig.from_hf(cfg.to_hf()) == cfg
    from transformers import Qwen2_5_VLConfig  # transformers 5's nested layout of the same config

    assert Qwen25VLConfig.from_hf(Qwen2_5_VLConfig(**raw).to_dict()) == cfg
    family = FAMILIES["qwen2_5_vl"]
    assert (family.name, family.config_cls, family.hub_configs) == ("qwen25vl", Qwen25VLConfig, HUB_CONFIGS)
    with pytest.raises(ValueError, match="out_hidden_size"):
        Qwen25VLConfig.from_hf({**raw, "vision_config": {**raw["vision_config"], "out_hidden_size": 64}})


def test_video_inputs_are_refused(tiny, images):
    model = tiny[2]
    pv, grid = images
    ids, mask = hf_tiny.text_batch(lengths=(5, 3))
    for kw in ({"pixel_values_videos": pv}, {"video_grid_thw": grid}):
        with pytest.raises(ValueError, match="video inputs are not supported"):
            model(jnp.asarray(ids), jnp.asarray(mask), **kw)
        with pytest.raises(ValueError, match="video inputs are not supported"):
            model.embed_inputs(jnp.asarray(ids), **kw)
    with pytest.raises(ValueError, match="video inputs are not supported.*<\\|video_pad\\|>"):
        model(jnp.asarray(np.where(ids == ids[0, 0], hf_tiny.VIDEO_TOKEN, ids)), jnp.asarray(mask))
    with pytest.raises(ValueError, match="video inputs are not supported"):
        model.rope_index(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(grid), video_grid_thw=jnp.asarray(grid))


def test_save_hf_folder_loads_in_transformers(tiny, tmp_path):
    """`save_hf` (our weight table backwards, our `to_hf` config) gives transformers the same model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ivtlr_jax.io import save_hf

    hf = tiny[1]
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(save_hf(tiny[2], tmp_path / "hf")).eval()
    v, w = hf.config.vision_config, back.config.vision_config
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "window_size",
                "fullatt_block_indexes", "patch_size", "spatial_merge_size"):
        assert getattr(w, key) == getattr(v, key), key
    theirs, ours = hf.state_dict(), back.state_dict()
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)
