"""Weight loading: both key layouts, sharded checkpoints, orbax conversion, and clear errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ivtlr_jax.io.hf_to_flax import convert
from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models import WeightLoadError
from ivtlr_jax.io.safetensors import CorruptCheckpointError, save_file
from tests import hf_tiny
from tests.convert_helpers import tensors_of


def copy_without_weights(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)


def logits(model, batch):
    ids, mask, pv, grid = batch
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), jnp.asarray(grid)).logits)


@pytest.fixture(scope="module")
def reference_logits(tiny_qwen2vl, qwen2vl_batch):
    return logits(from_pretrained(tiny_qwen2vl[0]), qwen2vl_batch)


def test_missing_tensor_is_named(tiny_qwen2vl, tmp_path):
    dst = tmp_path / "m"
    copy_without_weights(tiny_qwen2vl[0], dst)
    t = tensors_of(tiny_qwen2vl[0])
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, dst / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(dst)


def test_wrong_shape_is_named(tiny_qwen2vl, tmp_path):
    dst = tmp_path / "m"
    copy_without_weights(tiny_qwen2vl[0], dst)
    t = tensors_of(tiny_qwen2vl[0])
    t["visual.blocks.0.attn.qkv.weight"] = t["visual.blocks.0.attn.qkv.weight"][:, :16].copy()
    save_file(t, dst / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"visual\.blocks\.0\.attn\.qkv\.weight.*\[96, 16\], expected \[96, 32\]"):
        from_pretrained(dst)


def test_unexpected_tensor_is_named(tiny_qwen2vl, tmp_path):
    dst = tmp_path / "m"
    copy_without_weights(tiny_qwen2vl[0], dst)
    t = tensors_of(tiny_qwen2vl[0])
    t["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    save_file(t, dst / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"unexpected tensor.*model\.layers\.9\.extra\.weight"):
        from_pretrained(dst)


def test_truncated_file_names_the_file(tiny_qwen2vl, tmp_path):
    dst = tmp_path / "m"
    copy_without_weights(tiny_qwen2vl[0], dst)
    data = (tiny_qwen2vl[0] / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*truncated or corrupt"):
        from_pretrained(dst)


def test_transformers5_in_memory_layout_and_sharded_index(tiny_qwen2vl, tmp_path, qwen2vl_batch, reference_logits):
    """The in-memory names of transformers 5 (model.language_model.*, model.visual.*), split in two shards."""
    dst = tmp_path / "m"
    copy_without_weights(tiny_qwen2vl[0], dst)
    state = {k: v.detach().numpy() for k, v in tiny_qwen2vl[1].state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    assert any(k.startswith("model.visual.") for k in state)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, dst / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    np.testing.assert_allclose(logits(from_pretrained(dst), qwen2vl_batch), reference_logits, atol=1e-6)


def test_bf16_checkpoint_tensors_are_read(tiny_qwen2vl, tmp_path, qwen2vl_batch):
    """A bf16 safetensors file (how the 7B checkpoints ship) loads without torch into fp32 exactly."""
    dst = tmp_path / "m"
    copy_without_weights(tiny_qwen2vl[0], dst)
    from safetensors.torch import save_file as torch_save

    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in tiny_qwen2vl[1].state_dict().items()}
    torch_save(sd, str(dst / "model.safetensors"))
    model = from_pretrained(dst)
    ref = sd["model.language_model.embed_tokens.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed_vd[...]), ref)


def test_orbax_conversion_round_trip(tiny_qwen2vl, tmp_path, qwen2vl_batch, reference_logits):
    out = convert(str(tiny_qwen2vl[0]), tmp_path / "flax")
    assert (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    np.testing.assert_array_equal(logits(from_pretrained(out), qwen2vl_batch), reference_logits)
    with pytest.raises(FileExistsError, match="not empty"):
        convert(str(tiny_qwen2vl[0]), out)


def test_orbax_checkpoint_with_wrong_shape_is_rejected(tiny_qwen2vl, tmp_path):
    out = convert(str(tiny_qwen2vl[0]), tmp_path / "flax")
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match=r"gate_weight_df: stored \[3, 64, 128\], expected \[3, 64, 96\]"):
        from_pretrained(out)


def test_hf_flax_hf_round_trip_is_bit_identical(tiny_qwen2vl, tmp_path):
    from ivtlr_jax.io import save_hf

    save_hf(from_pretrained(tiny_qwen2vl[0]), tmp_path / "back")
    original, back = tensors_of(tiny_qwen2vl[0]), tensors_of(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)


def test_random_flax_model_exported_runs_in_transformers(tmp_path, qwen2vl_batch):
    from flax import nnx
    from transformers import Qwen2VLForConditionalGeneration

    from ivtlr_jax.models import Qwen2VL, Qwen2VLConfig
    from ivtlr_jax.io import save_hf

    model = Qwen2VL(Qwen2VLConfig.from_hf(hf_tiny.qwen2vl_config().to_dict()), rngs=nnx.Rngs(3))
    save_hf(model, tmp_path / "hf")
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, mask, pv, grid = qwen2vl_batch
    ref = hf_tiny.hf_forward(hf, ids, mask, pv, grid).logits.numpy()
    assert np.abs(logits(model, qwen2vl_batch) - ref)[mask.astype(bool)].max() <= 1e-4


def test_chameleon_export_round_trip(tiny_chameleon, tmp_path):
    """Flax -> HF for Chameleon (what a training run exports per stage): bit-identical tensors, and
    transformers loads it with the same logits."""
    from transformers import ChameleonForConditionalGeneration

    from ivtlr_jax.io import save_hf

    folder, hf = tiny_chameleon
    save_hf(from_pretrained(folder), tmp_path / "back")
    original, back = tensors_of(folder), tensors_of(tmp_path / "back")
    kept = {k for k in original if not k.startswith(("model.vqmodel.decoder.", "model.vqmodel.post_quant_conv."))}
    assert kept == set(back)
    for name in kept:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    reloaded = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids, mask, pv = hf_tiny.chameleon_image_batch(seed=8)
    a = hf_tiny.chameleon_forward(reloaded, ids, mask, pv).logits.numpy()
    b = hf_tiny.chameleon_forward(hf, ids, mask, pv).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
