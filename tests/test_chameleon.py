"""Chameleon Flax port vs transformers' ChameleonForConditionalGeneration (fp32, tiny random model); what every
family does alike (text-only logits, greedy generation) is in tests/test_families.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models import ShardingRules, WeightLoadError, make_mesh
from ivtlr_jax.io.safetensors import SafetensorsFolder, save_file
from tests import hf_tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_chameleon):
    return from_pretrained(tiny_chameleon[0])


def max_diff(a, b, mask):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask.astype(bool)].max())


def test_image_tokens_equal_transformers(tiny_chameleon, model):
    _, _, pv = hf_tiny.chameleon_image_batch(seed=1)
    assert pv.shape[0] == 2
    with torch.no_grad():
        ref = tiny_chameleon[1].model.get_image_tokens(torch.tensor(pv)).numpy()
    ours = np.asarray(model.get_image_tokens(jnp.asarray(pv)))
    assert ours.shape == (2, hf_tiny.CHAMELEON_TOKENS_PER_IMAGE)
    assert len(np.unique(ours)) > 4, "a degenerate tokenizer would pass trivially"
    np.testing.assert_array_equal(ours, ref)


def test_image_text_logits_and_every_hidden_state_match(tiny_chameleon, model):
    ids, mask, pv = hf_tiny.chameleon_image_batch(seed=2)
    ref = hf_tiny.chameleon_forward(tiny_chameleon[1], ids, mask, pv, output_hidden_states=True)
    out = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), output_hidden_states=True)
    assert max_diff(out.logits, ref.logits.numpy(), mask) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert max_diff(ours, theirs.numpy(), mask) <= TOL, f"hidden state {i}"


def test_swin_norm_variant_matches(tmp_path):
    hf = hf_tiny.build_chameleon(tmp_path, seed=3, swin_norm=True)
    ids, mask, pv = hf_tiny.chameleon_image_batch(seed=3)
    ref = hf_tiny.chameleon_forward(hf, ids, mask, pv).logits.numpy()
    out = from_pretrained(tmp_path)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv))
    assert max_diff(out.logits, ref, mask) <= TOL


def test_image_token_count_mismatch_is_rejected(model):
    ids, mask, pv = hf_tiny.chameleon_image_batch(seed=5)
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        model(jnp.asarray(ids[:, :-3]), jnp.asarray(mask[:, :-3]), jnp.asarray(pv[:1]))


def test_mesh_forward_equals_single_device(tiny_chameleon, model):
    rules = ShardingRules(make_mesh(data=1, fsdp=2, tensor=2))
    sharded = from_pretrained(tiny_chameleon[0], rules=rules)
    assert "tensor" in str(sharded.layers.q_norm_scale_nh[...].sharding.spec)
    ids, mask, pv = hf_tiny.chameleon_image_batch(seed=6, text_lens=((5, 7), (3, 2), (4, 4), (6, 1)))
    fwd = nnx.jit(lambda m, i, a, p: m(i, a, p).logits)
    sh = rules.sharding(("batch", "length"), ids.shape)
    out = fwd(sharded, jax.device_put(ids, sh), jax.device_put(mask, sh), jnp.asarray(pv))
    ref = fwd(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv))
    assert max_diff(out, ref, mask) <= 1e-5


@pytest.mark.parametrize("problem", ["missing", "shape"])
def test_bad_checkpoint_is_named(tiny_chameleon, tmp_path, problem):
    import shutil

    dst = tmp_path / "m"
    dst.mkdir()
    for f in tiny_chameleon[0].iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)
    src = SafetensorsFolder(tiny_chameleon[0])
    t = {k: np.array(src.get(k)) for k in src.keys()}
    name = "model.vqmodel.encoder.down.1.attn.0.q.weight"
    if problem == "missing":
        del t[name]
        match = rf"missing tensor.*{name}"
    else:
        t[name] = t[name][:, :, :1, :1].repeat(3, 2).repeat(3, 3)
        match = rf"{name}.*\[32, 32, 3, 3\], expected \[32, 32, 1, 1\]"
    save_file(t, dst / "model.safetensors")
    with pytest.raises(WeightLoadError, match=match.replace(".", r"\.").replace(r"\.*", ".*")):
        from_pretrained(dst)
