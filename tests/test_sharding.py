"""The same forward on a 4-device mesh (host CPU devices) equals the single-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivtlr_jax.io import from_pretrained
from ivtlr_jax.models import ShardingRules, make_mesh
from tests import hf_tiny


@pytest.fixture(scope="module")
def single(tiny_qwen2vl):
    return from_pretrained(tiny_qwen2vl[0])


@nnx.jit
def forward(model, ids, mask, pv, grid):
    return model(ids, mask, pv, grid).logits


@pytest.mark.parametrize("shape", [dict(data=2, fsdp=2, tensor=1), dict(data=1, fsdp=2, tensor=2)])
def test_mesh_forward_equals_single_device(tiny_qwen2vl, single, shape):
    assert len(jax.devices()) == 4
    rules = ShardingRules(make_mesh(**shape))
    sharded = from_pretrained(tiny_qwen2vl[0], rules=rules)
    q = sharded.layers.q_weight_dnh[...]
    assert q.sharding.spec == rules.spec(("layers", "embed", "heads", "head_dim"), q.shape)
    if shape["tensor"] > 1:
        assert "tensor" in str(q.sharding.spec) and len(q.addressable_shards) == 4
        assert q.addressable_shards[0].data.shape[2] == q.shape[2] // 2  # heads split across `tensor`
    ids, mask, pv, grid = hf_tiny.qwen2vl_image_batch(seed=5, text_lens=((5, 7), (3, 2)))
    ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])  # batch 4
    pv, grid = np.concatenate([pv, pv]), np.concatenate([grid, grid])
    batch_sharding = rules.sharding(("batch", "length"), ids.shape)
    ids_s, mask_s = jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding)
    out = forward(sharded, ids_s, mask_s, jnp.asarray(pv), jnp.asarray(grid))
    ref = forward(single, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pv), jnp.asarray(grid))
    valid = mask.astype(bool)
    assert np.abs(np.asarray(out) - np.asarray(ref))[valid].max() <= 1e-5
