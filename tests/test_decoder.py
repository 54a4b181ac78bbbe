"""Decoder machinery: chunked prefill through the KV cache, one-row attention probabilities, remat."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models.common.run_options import Remat
from tests import hf_tiny


@pytest.fixture(scope="module")
def model(tiny_qwen2vl):
    return from_pretrained(tiny_qwen2vl[0])


def test_chunked_prefill_through_cache_equals_one_forward(model, qwen2vl_batch):
    ids, mask, pv, grid = (jnp.asarray(x) for x in qwen2vl_batch)
    full = model(ids, mask, pv, grid).logits
    embeds = model.embed_inputs(ids, pv, grid)
    pos = model.positions(ids, mask, grid)
    cache = model.init_cache(ids.shape[0], ids.shape[1] + 5)
    pieces = []
    for start, stop in [(0, 7), (7, 8), (8, ids.shape[1])]:  # uneven chunks, one of a single token
        out = model.decode(embeds[:, start:stop], pos[:, :, start:stop], mask[:, start:stop], cache=cache)
        cache = out.cache
        pieces.append(model.logits(out.hidden))
    assert int(cache.end) == ids.shape[1]
    chunked = jnp.concatenate(pieces, axis=1)
    valid = np.asarray(mask).astype(bool)
    assert np.abs(np.asarray(chunked) - np.asarray(full))[valid].max() <= 1e-5


def test_row_attention_probs_equal_transformers_eager_attentions(tiny_qwen2vl, qwen2vl_batch):
    """The per-layer head-averaged probabilities of one query row per example, computed without the
    full matrices, equal the rows of transformers' eager attention weights."""
    folder, _ = tiny_qwen2vl
    from transformers import Qwen2VLForConditionalGeneration

    hf = Qwen2VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask, pv, grid = qwen2vl_batch
    ref = hf_tiny.hf_forward(hf, ids, mask, pv, grid, output_attentions=True).attentions  # L x [B, N, T, T]
    model = from_pretrained(folder)
    rows = mask.sum(1) - 1  # each row's last real token (rows differ in length)
    a = [jnp.asarray(x) for x in (ids, mask, pv, grid)]
    out = model.decode(model.embed_inputs(a[0], a[2], a[3]), model.positions(a[0], a[1], a[3]), a[1],
                       prob_rows=jnp.asarray(rows))
    probs = np.asarray(out.row_probs)  # [L, B, T]
    assert probs.shape == (len(ref), *ids.shape)
    for layer, att in enumerate(ref):
        expected = att.numpy().mean(1)[np.arange(len(rows)), rows]  # [B, T]
        np.testing.assert_allclose(probs[layer], expected, atol=1e-6, err_msg=f"layer {layer}")
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_remat_policies_give_the_same_gradients(tiny_qwen2vl, qwen2vl_batch):
    ids, mask, pv, grid = (jnp.asarray(x) for x in qwen2vl_batch)

    def grads(remat):
        m = from_pretrained(tiny_qwen2vl[0], remat=remat)

        def loss(m):
            logits = m(ids, mask, pv, grid).logits
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

        return nnx.grad(loss)(m)

    plain = jax.tree.leaves(grads("none"))
    for policy in sorted(set(Remat) - {Remat.NONE}):
        for a, b in zip(plain, jax.tree.leaves(grads(policy))):
            # recomputation re-associates float sums: equal up to fp32 rounding, relative to the leaf's scale
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), policy


def test_loading_does_not_import_torch(tiny_qwen2vl):
    code = (
        "import sys; from ivtlr_jax.io import from_pretrained; "
        f"from_pretrained({str(tiny_qwen2vl[0])!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
