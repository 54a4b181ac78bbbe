"""attention_impl="fused" (jax.nn.dot_product_attention; its XLA implementation on CPU) against the
default einsum path at fp32: the attention itself (both key/value layouts, GQA, padding + causal masks),
the decoder (left-padded prefill, chunks through the KV cache, a one-token decoding step), the Qwen2-VL
and Qwen2.5-VL vision towers, and an IVT-LR loss with its gradients and selected patches."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivtlr_jax.build import abstract_run_model
from ivtlr_jax.config import ConfigError, RunConfig, load_config
from ivtlr_jax.latent import LatentConfig
from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models import read_config
from ivtlr_jax.models.common.attention import causal_mask, dot_product_attention
from ivtlr_jax.models.common.kv_cache import to_cache_layout
from ivtlr_jax.models.common.lm import DecoderLM
from tests import hf_tiny
from tests.test_generate import prompts
from tests.test_latent import QWEN_LATENT, qwen_batch, run_jax

TOL = 1e-5  # fp32


def max_diff(a, b, where=None) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[where].max() if where is not None else d.max())


@pytest.mark.parametrize("layout", ["bskh", "cache"])
def test_fused_equals_xla_and_a_wrong_mask_does_not(layout):
    """GQA (4 query heads on 2 kv heads), left padding and a causal mask over a longer key sequence
    (a chunk at slot 3 of 9), one query row fully masked; with one mask entry flipped the outputs differ."""
    b, t, s, n, kv, h = 2, 5, 9, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, n, h))
    k, v = jax.random.normal(ks[1], (b, s, kv, h)), jax.random.normal(ks[2], (b, s, kv, h))
    if layout == "cache":
        k, v = to_cache_layout(k, v, k.dtype)
    key_valid = jnp.arange(s)[None] >= jnp.asarray([[0], [4]])  # row 1 left-padded by 4 slots
    mask = causal_mask(3 + jnp.arange(t), key_valid)  # [B, T, S]; row 1's first query sees nothing
    assert not bool(mask[1, 0].any())
    scale = h**-0.5
    xla = dot_product_attention(q, k, v, mask, scale, layout, "xla")
    fused = dot_product_attention(q, k, v, mask, scale, layout, "fused")
    assert xla.shape == fused.shape == (b, t, n, h)
    assert max_diff(xla, fused) <= TOL
    wrong = mask.at[0, 2, 1].set(False)
    assert max_diff(xla, dot_product_attention(q, k, v, wrong, scale, layout, "fused")) > 1e-3


def test_gpu_cache_reads_cudnn_does_not_take_stay_on_the_einsums(monkeypatch):
    """On a GPU backend, a one-token decoding step over the cache layout (odd T: not cuDNN's) is the einsum
    path bit for bit and never reaches jax.nn (whose XLA attention would first copy the layer's cache into
    [B, S, K, H]); an even chunk in bf16 goes to cuDNN; the [B, S, K, H] layout still uses jax.nn."""
    from ivtlr_jax.models.common import attention

    b, s, n, kv, h = 2, 8, 4, 2, 8
    ks = jax.random.split(jax.random.key(1), 3)
    q1 = jax.random.normal(ks[0], (b, 1, n, h))
    k, v = jax.random.normal(ks[1], (b, s, kv, h)), jax.random.normal(ks[2], (b, s, kv, h))
    kc, vc = to_cache_layout(k, v, k.dtype)
    mask = causal_mask(jnp.asarray([5]), jnp.ones((b, s), bool))
    xla = dot_product_attention(q1, kc, vc, mask, h**-0.5, "cache", "xla")
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw["implementation"]) or a[0])
    fused = dot_product_attention(q1, kc, vc, mask, h**-0.5, "cache", "fused")
    assert calls == [] and np.array_equal(np.asarray(xla), np.asarray(fused))
    q2 = jax.random.normal(ks[0], (b, 2, n, h), jnp.bfloat16)
    dot_product_attention(q2, kc.astype(jnp.bfloat16), vc.astype(jnp.bfloat16), mask[:, :1].repeat(2, 1), 1.0,
                          "cache", "fused")
    dot_product_attention(q1, k, v, mask, h**-0.5, "bskh", "fused")
    assert calls == ["cudnn", "xla"]
    assert attention.cudnn_fits(q2, s) and not attention.cudnn_fits(q1, s)


def test_unknown_attention_impl_is_refused(tiny_qwen2vl):
    with pytest.raises(ValueError, match="attention_impl"):
        from_pretrained(tiny_qwen2vl[0], attention_impl="flash")
    with pytest.raises(ConfigError, match="attention_impl: 'flash'"):
        load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml", ["model.attention_impl=flash"])


def test_run_config_sets_the_models_attention_impl(tiny_qwen2vl):
    cfg = load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml", ["model.attention_impl=fused"])
    family, config, _ = read_config(tiny_qwen2vl[0])
    assert RunConfig().model.attention_impl == "xla"
    assert abstract_run_model(cfg, family, config).attention_impl == "fused"


@pytest.fixture(scope="module")
def qwen_pair(tiny_qwen2vl) -> tuple[DecoderLM, DecoderLM]:
    return from_pretrained(tiny_qwen2vl[0]), from_pretrained(tiny_qwen2vl[0], attention_impl="fused")


def test_qwen2vl_decoder_and_vision_fused_equal_xla(qwen_pair):
    """Left-padded prompts: the full forward (vision tower on mixed sizes: `frame_attention`), then the prompt
    through the KV cache in two chunks and one decoding step; and the tower on same-size images (per frame)."""
    xla, fused = qwen_pair
    _, both = prompts("qwen2vl")
    ids, mask, pv, grid = (jnp.asarray(both[k]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                          "image_grid_thw"))
    valid = np.asarray(mask).astype(bool)
    assert not valid.all()  # rows are left-padded
    assert max_diff(xla(ids, mask, pv, grid).logits, fused(ids, mask, pv, grid).logits, valid) <= TOL

    def cached(model):
        embeds, pos = model.embed_inputs(ids, pv, grid), model.positions(ids, mask, grid)
        cache = model.init_cache(ids.shape[0], ids.shape[1] + 1)
        hidden = []
        for start, stop in [(0, 6), (6, ids.shape[1])]:
            out = model.decode(embeds[:, start:stop], pos[:, :, start:stop], mask[:, start:stop], cache=cache)
            cache = out.cache
            hidden.append(out.hidden)
        step = model.decode(embeds[:, -1:], pos[:, :, -1:] + 1, jnp.ones_like(mask[:, -1:]), cache=cache)
        return jnp.concatenate([*hidden, step.hidden], axis=1), step.cache

    (h_xla, c_xla), (h_fused, c_fused) = cached(xla), cached(fused)
    assert max_diff(h_xla, h_fused, np.concatenate([valid, valid[:, -1:]], axis=1)) <= TOL
    assert max_diff(c_xla.k, c_fused.k) <= TOL and max_diff(c_xla.v, c_fused.v) <= TOL

    pv2, grid2 = hf_tiny.image_inputs([(56, 56), (56, 56)], seed=1)
    stacked = jnp.asarray(pv2).reshape(2, -1, pv2.shape[-1])  # per-frame attention without a mask
    grid2 = jnp.asarray(grid2)
    assert max_diff(xla.image_features(stacked, grid2), fused.image_features(stacked, grid2)) <= TOL


def test_qwen25vl_vision_fused_equals_xla(tiny_qwen25vl):
    """Windowed (chunks under a window mask, partial windows) and full blocks."""
    xla = from_pretrained(tiny_qwen25vl[0])
    fused = from_pretrained(tiny_qwen25vl[0], attention_impl="fused")
    pv, grid = (jnp.asarray(x) for x in hf_tiny.image_inputs(list(hf_tiny.QWEN25VL_IMAGE_SIZES), seed=0))
    a, b = xla.image_features(pv, grid), fused.image_features(pv, grid)
    assert max_diff(a, b) <= TOL * max(1.0, float(jnp.abs(a).max()))


def test_ivtlr_loss_and_gradients_fused_equal_xla(qwen_pair):
    """The latent loop ranks patches on the exact one-row probabilities either way: same patches, same
    loss and gradients up to fp32 rounding."""
    xla, fused = qwen_pair
    cfg = LatentConfig(QWEN_LATENT, 3)
    batch = qwen_batch((2, 2))
    loss_x, aux_x, grads_x = run_jax(xla, batch, cfg)
    loss_f, aux_f, grads_f = run_jax(fused, batch, cfg)
    np.testing.assert_array_equal(np.asarray(aux_x.selected), np.asarray(aux_f.selected))
    assert abs(float(loss_x) - float(loss_f)) <= TOL * abs(float(loss_x))
    for gx, gf in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_f)):
        assert max_diff(gx, gf) <= TOL * max(float(jnp.abs(gx).max()), 1e-2)
