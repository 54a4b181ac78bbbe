"""Qwen3-VL Flax port vs transformers' Qwen3VLForConditionalGeneration (fp32, tiny random model).

The tiny model (tests/hf_tiny.py): 3 vision blocks, DeepStack after blocks 0 and 1 into decoder layers
0 and 1 of 3, a 6x6 table of learned position embeddings resampled to images of 4x4, 6x8 and 8x10
patches (down, equal height, up), interleaved M-RoPE over 2+3+3 bands, random norm weights."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ivtlr_jax.io import from_pretrained
from ivtlr_jax.io.safetensors import SafetensorsFolder
from ivtlr_jax.models import FAMILIES
from ivtlr_jax.models.qwen3vl.config import HUB_CONFIGS, Qwen3VLConfig
from tests import hf_tiny

TOL = 1e-4
SIZES = hf_tiny.QWEN3VL_IMAGE_SIZES
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_qwen3vl):
    """(folder, transformers model, our model) of the session's tiny random Qwen3-VL (tests/conftest.py)."""
    folder, hf = tiny_qwen3vl
    return folder, hf, from_pretrained(folder)


@pytest.fixture(scope="module")
def jitted(tiny):
    return hf_tiny.jitted_qwen_pieces(tiny[2])


max_diff = hf_tiny.max_abs_diff


def image_batch(seed=0, left_pad=False):
    return hf_tiny.qwen2vl_image_batch(seed=seed, left_pad=left_pad, sizes=SIZES,
                                       processed=hf_tiny.qwen3vl_image_inputs)


def hf_vision(hf, pv, grid):
    with torch.no_grad():
        out = hf.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid))
    return out.pooler_output.numpy(), [f.numpy() for f in out.deepstack_features]


@pytest.mark.parametrize("sizes", [SIZES, ((96, 128), (64, 64), (128, 160))], ids=["two", "three"])
def test_vision_features_and_deepstack_match(tiny, jitted, sizes):
    """The merger's and every DeepStack merger's features vs transformers' visual(...), grid traced, images of
    several sizes (the position table resampled down, across and up)."""
    pv, grid = hf_tiny.qwen3vl_image_inputs(sizes, seed=len(sizes))
    ref, ref_deepstack = hf_vision(tiny[1], pv, grid)
    ours = jitted["features"](jnp.asarray(pv), jnp.asarray(grid))
    assert ours.merged.shape == ref.shape == (grid.prod(-1).sum() // 4, tiny[2].config.text.hidden_size)
    assert ours.deepstack.shape == (2, *ref.shape) and len(ref_deepstack) == 2
    diffs = [max_diff(ours.merged, ref)] + [max_diff(a, b) for a, b in zip(ours.deepstack, ref_deepstack)]
    print(f"\nvision max abs diff (merger, deepstack 0, deepstack 1): {', '.join(f'{d:.2e}' for d in diffs)}")
    assert max(diffs) <= TOL


def test_stacked_same_size_images_match_transformers(tiny, monkeypatch):
    """[images, patches, dim] pixel values (static frame length under jit: the collator's layout) give
    transformers' features, attending through `frame_attention` (the faster path with the default
    attention_impl, docs/benchmarks.md section 12)."""
    from ivtlr_jax.models.common import frame_attention as fa
    from ivtlr_jax.models.qwen2vl import vision  # the blocks Qwen3-VL's tower shares

    pv, grid = hf_tiny.qwen3vl_image_inputs([SIZES[1]] * 2, seed=5)
    ref, ref_deepstack = hf_vision(tiny[1], pv, grid)
    calls = []
    monkeypatch.setattr(vision, "frame_attention", lambda *a, **k: calls.append(1) or fa.frame_attention(*a, **k))
    ours = jax.jit(lambda p, g: tiny[2].image_features(p, g))(jnp.asarray(pv).reshape(2, -1, pv.shape[-1]),
                                                            jnp.asarray(grid))
    assert calls, "same-size stacked images go through frame_attention"
    assert max_diff(ours.merged, ref) <= TOL
    assert max(max_diff(a, b) for a, b in zip(ours.deepstack, ref_deepstack)) <= TOL


@pytest.mark.parametrize("left_pad", [False, True])
def test_image_text_logits_match(tiny, jitted, left_pad):
    hf = tiny[1]
    ids, mask, pv, grid = image_batch(seed=0, left_pad=left_pad)
    ref = hf_tiny.hf_forward(hf, ids, mask, pv, grid, output_hidden_states=True)
    out = jitted["forward"](jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), jnp.asarray(grid))
    diff = max_diff(out.logits, ref.logits.numpy(), mask)
    print(f"\nlogits max abs diff ({'left' if left_pad else 'right'} padding): {diff:.2e}")
    assert diff <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert max_diff(ours, theirs.numpy(), mask) <= TOL, f"hidden state {i}"


def test_deepstack_is_what_makes_the_logits_match(tiny):
    """Without the DeepStack addends (the embeddings' first D columns only) the logits at and after the
    image tokens differ from transformers' by far more than the tolerance: the parity above tests them."""
    model, hf = tiny[2], tiny[1]
    ids, mask, pv, grid = image_batch(seed=1)
    ref = hf_tiny.hf_forward(hf, ids, mask, pv, grid).logits.numpy()
    embeds = model.embed_inputs(jnp.asarray(ids), jnp.asarray(pv), jnp.asarray(grid))
    d = model.config.text.hidden_size
    assert embeds.shape == (*ids.shape, 3 * d)
    image = ids == hf_tiny.IMAGE_TOKEN
    addends = np.asarray(embeds[..., d:])
    assert np.abs(addends[~image]).max() == 0 and np.abs(addends[image]).max() > 0  # image positions only
    pos = model.positions(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(grid))
    full = model.logits(model.decode(embeds, pos, jnp.asarray(mask)).hidden)
    plain = model.logits(model.decode(embeds[..., :d], pos, jnp.asarray(mask)).hidden)
    assert max_diff(full, ref, mask) <= TOL
    assert max_diff(plain, ref, mask) > 100 * TOL
    with pytest.raises(ValueError, match="embeddings of width 128: expected 64 .* or 192"):
        model.decode(embeds[..., :2 * d], pos, jnp.asarray(mask))


def test_text_only_logits_match(tiny):
    ids, mask = hf_tiny.text_batch(lengths=(9, 6), left_pad=True)
    ref = hf_tiny.hf_forward(tiny[1], ids, mask).logits.numpy()
    assert max_diff(tiny[2](jnp.asarray(ids), jnp.asarray(mask)).logits, ref, mask) <= TOL


@pytest.mark.parametrize("left_pad", [False, True])
def test_rope_index_matches_transformers(tiny, jitted, left_pad):
    """Row 0 holds two images, row 1 one: images are consumed in batch order."""
    hf = tiny[1]
    _, grid = hf_tiny.qwen3vl_image_inputs([SIZES[0], SIZES[1], (64, 128)], seed=3)
    ids, mask = hf_tiny.two_row_image_prompts(grid, left_pad)
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.tensor(ids), torch.tensor((ids == hf_tiny.IMAGE_TOKEN).astype(np.int64)), torch.tensor(grid), None,
        torch.tensor(mask))
    pos, delta = jitted["rope_index"](jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(grid))
    np.testing.assert_array_equal(np.asarray(pos)[:, mask.astype(bool)], ref_pos.numpy()[:, mask.astype(bool)])
    np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy())


def test_interleaved_mrope_matches_transformers(tiny):
    """cos/sin of distinct t, h, w positions: Qwen3-VL's interleaved bands (not Qwen2-VL's sections)."""
    pos = np.stack([np.arange(6), 10 + 2 * np.arange(6), 30 + 3 * np.arange(6)])[:, None].repeat(2, 1)  # [3, 2, 6]
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = tiny[1].model.language_model.rotary_emb(x, torch.tensor(pos))
    cos, sin = tiny[2].rope(jnp.asarray(pos))
    assert max_diff(cos, cos_ref.numpy()) <= 1e-6 and max_diff(sin, sin_ref.numpy()) <= 1e-6


def test_greedy_generation_matches_transformers_generate(tiny):
    hf, model = tiny[1], tiny[2]
    ids, mask, pv, grid = image_batch(seed=4, left_pad=True)
    ref = hf_tiny.hf_greedy_generate(hf, ids, mask, pv, grid, max_new_tokens=12)
    ours = hf_tiny.greedy_generate(model, ids, mask, pixel_values=pv, image_grid_thw=grid, max_new_tokens=12)
    assert ref.shape == (2, 12)
    np.testing.assert_array_equal(ours, ref)


def run_command(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_hf_flax_hf_round_trip_through_the_cli_is_bit_identical(tiny, tmp_path):
    """convert/hf_to_flax.py then convert/flax_to_hf.py: every tensor of save_pretrained's folder comes back
    with its name, dtype and bits, and transformers loads the folder as the same model."""
    from transformers import Qwen3VLForConditionalGeneration

    folder, hf = tiny[0], tiny[1]
    run_command(ROOT / "convert" / "hf_to_flax.py", "--hf", folder, "--out", tmp_path / "flax")
    run_command(ROOT / "convert" / "flax_to_hf.py", "--checkpoint", tmp_path / "flax", "--out", tmp_path / "back")
    original, back = SafetensorsFolder(folder), SafetensorsFolder(tmp_path / "back")
    assert sorted(back.keys()) == sorted(original.keys())
    for name in original.keys():
        a, b = original.get(name), back.get(name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(b, a, err_msg=name)
    loaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    assert loaded.config.vision_config.deepstack_visual_indexes == hf.config.vision_config.deepstack_visual_indexes
    assert loaded.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    theirs, ours = hf.state_dict(), loaded.state_dict()
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)


def test_tied_embeddings_load_without_lm_head(tmp_path):
    """The 2B/4B layout: tie_word_embeddings, the logits from the embedding table."""
    hf = hf_tiny.build_qwen3vl(tmp_path, seed=1, tie_word_embeddings=True)
    model = from_pretrained(tmp_path)
    assert model.lm_head_dv is None
    ids, mask = hf_tiny.text_batch(lengths=(7, 4))
    ref = hf_tiny.hf_forward(hf, ids, mask).logits.numpy()
    assert max_diff(model(jnp.asarray(ids), jnp.asarray(mask)).logits, ref, mask) <= TOL


def test_released_config_layout_is_read():
    """The config.json of Qwen3-VL-8B-Instruct (nested text and vision configs, `rope_scaling` mrope)."""
    raw = HUB_CONFIGS["Qwen/Qwen3-VL-8B-Instruct"]
    cfg = Qwen3VLConfig.from_hf(raw)
    v, t = cfg.vision, cfg.text
    assert (v.embed_dim, v.head_dim, v.mlp_dim, v.out_hidden_size, v.patch_dim) == (1152, 72, 4304, 4096, 1536)
    assert (v.position_grid_side, v.deepstack_visual_indexes) == (48, (8, 16, 24))
    assert (t.num_layers, t.head_dim, t.qk_rmsnorm, t.qkv_bias) == (36, 128, True, False)
    assert (cfg.mrope_section, cfg.rope_theta) == ((24, 20, 20), 5e6)
    assert Qwen3VLConfig.from_hf(cfg.to_hf()) == cfg
    from transformers import Qwen3VLConfig as HFConfig

    assert Qwen3VLConfig.from_hf(HFConfig(**raw).to_dict()) == cfg
    family = FAMILIES["qwen3_vl"]
    assert (family.name, family.config_cls, family.hub_configs) == ("qwen3vl", Qwen3VLConfig, HUB_CONFIGS)
    bad = lambda **v: {**raw, "vision_config": {**raw["vision_config"], **v}}
    for vision, message in ((dict(out_hidden_size=64), "out_hidden_size 64 != the language model's hidden_size"),
                            (dict(num_position_embeddings=2300), "num_position_embeddings 2300 is not a square"),
                            (dict(deepstack_visual_indexes=[8, 27]), r"deepstack_visual_indexes \[8, 27\] must be")):
        with pytest.raises(ValueError, match=message):
            Qwen3VLConfig.from_hf(bad(**vision))


def test_video_inputs_are_refused(tiny):
    model = tiny[2]
    pv, grid = hf_tiny.qwen3vl_image_inputs(SIZES)
    ids, mask = hf_tiny.text_batch(lengths=(5, 3))
    for kw in ({"pixel_values_videos": pv}, {"video_grid_thw": grid}):
        with pytest.raises(ValueError, match="qwen3_vl: video inputs are not supported"):
            model(jnp.asarray(ids), jnp.asarray(mask), **kw)
        with pytest.raises(ValueError, match="qwen3_vl: video inputs are not supported"):
            model.embed_inputs(jnp.asarray(ids), **kw)
    with pytest.raises(ValueError, match="video inputs are not supported.*<\\|video_pad\\|>"):
        model(jnp.asarray(np.where(ids == ids[0, 0], hf_tiny.VIDEO_TOKEN, ids)), jnp.asarray(mask))


def test_weight_table_names_every_tensor_of_the_checkpoint(tiny):
    """Every checkpoint tensor has a row in our weight table (the loader checks that they correspond one to
    one); the DeepStack mergers, the position table and the q/k norms land where transformers keeps them."""
    folder, hf, model = tiny
    state = hf.state_dict()
    np.testing.assert_array_equal(np.asarray(model.visual.position_table_ge[...]),
                                  state["model.visual.pos_embed.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(model.visual.deepstack.merger_fc1_weight_mm[...])[1],
                                  state["model.visual.deepstack_merger_list.1.linear_fc1.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(model.layers.q_norm_h[...])[2],
                                  state["model.language_model.layers.2.self_attn.q_norm.weight"].numpy())
    expanded = {spec.hf_name.format(i=i) for path, spec in FAMILIES["qwen3_vl"].weight_specs(model.config).items()
                for i in range(model.config.text.num_layers)}  # names without {i} stay one
    assert expanded >= set(SafetensorsFolder(folder).keys())
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_vl"


@pytest.mark.parametrize("size", ["2b", "4b", "8b"])
@pytest.mark.parametrize("dataset", ["m3cot", "scienceqa"])
def test_configs_are_the_official_recipe_on_a_released_model(size, dataset):
    """configs/qwen3vl_<size>_<dataset>.yaml: the official Qwen2-VL IVT-LR run on that dataset
    (configs/qwen2vl_<dataset>.yaml) but for its name, its model (a released one the planner knows) and
    the DeepStack option stated (the default)."""
    from ivtlr_jax.config import load_config

    ours = load_config(ROOT / "configs" / f"qwen3vl_{size}_{dataset}.yaml")
    official = load_config(ROOT / "configs" / f"qwen2vl_{dataset}.yaml")
    assert ours.model.model_id == f"Qwen/Qwen3-VL-{size.upper()}-Instruct" and ours.model.model_id in HUB_CONFIGS
    assert ours.name == f"qwen3vl_{size}_{dataset}" and ours.latent.patch_deepstack
    same = lambda cfg: dataclasses.replace(cfg, name="x", model=dataclasses.replace(cfg.model, model_id="x"))
    assert same(ours) == same(official)


def test_hub_configs_agree_with_transformers_defaults():
    """What the installed transformers states of the releases: its Qwen3VLVisionConfig defaults are the
    8B / 32B vision tower, its text and top-level defaults the fields every release shares (the rest of
    HUB_CONFIGS, the sizes, is from the published config.json files)."""
    from transformers import Qwen3VLConfig as HFConfig, Qwen3VLTextConfig, Qwen3VLVisionConfig

    vision, text, top = Qwen3VLVisionConfig(), Qwen3VLTextConfig(), HFConfig()
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in vision.to_dict().items()}
    for hub in ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-32B-Instruct"):
        raw = {k: v for k, v in HUB_CONFIGS[hub]["vision_config"].items() if k != "out_hidden_size"}
        assert raw == {k: defaults[k] for k in raw}, hub
    for hub, raw in HUB_CONFIGS.items():
        shared = ("vocab_size", "head_dim", "rms_norm_eps", "hidden_act", "attention_bias")
        assert {k: raw["text_config"][k] for k in shared} == {k: getattr(text, k) for k in shared}, hub
        ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        assert {k: raw[k] for k in ids} == {k: getattr(top, k) for k in ids}, hub
        assert raw["text_config"]["rope_scaling"]["mrope_section"] == [24, 20, 20]  # modeling's default bands
