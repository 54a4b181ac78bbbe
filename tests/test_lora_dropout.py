"""LoRA dropout's keep mask (a counter hash seeded from the key): Bernoulli(1 - rate) per element, with no
structure along the axes or between neighbours, independent between keys, deterministic for one key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivtlr_jax.models.common.lora import dropout_keep_mask

SHAPE = (512, 768)  # 393,216 draws


def binomial_bound(p: float, count: int, sigmas: float = 6.0) -> float:
    return sigmas * np.sqrt(p * (1 - p) / count)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_drop_rate_is_the_rate_overall_and_in_every_slice(rate):
    drop = ~np.asarray(dropout_keep_mask(jax.random.key(1), SHAPE, rate))
    assert abs(drop.mean() - rate) < binomial_bound(rate, drop.size)
    # no structure along either axis or in the index's low bits (rows, columns, even/odd elements)
    for part in (drop[:, ::2], drop[:, 1::2], drop[:256], drop[256:], drop[:, :7], drop.reshape(-1)[::1024]):
        assert abs(part.mean() - rate) < binomial_bound(rate, part.size)


def test_masks_of_different_keys_and_neighbouring_elements_are_independent():
    rate = 0.3
    a = ~np.asarray(dropout_keep_mask(jax.random.key(0), SHAPE, rate))
    b = ~np.asarray(dropout_keep_mask(jax.random.fold_in(jax.random.key(0), 1), SHAPE, rate))
    assert (a != b).any()
    # joint drop rate of two keys, and of horizontally / vertically adjacent elements of one mask: rate^2
    for x, y in ((a, b), (a[:, :-1], a[:, 1:]), (a[:-1], a[1:])):
        both = (x & y).mean()
        assert abs(both - rate**2) < binomial_bound(rate**2, x.size)
    np.testing.assert_array_equal(a, ~np.asarray(dropout_keep_mask(jax.random.key(0), SHAPE, rate)))  # same key


def test_mask_under_jit_and_small_shapes():
    mask = jax.jit(dropout_keep_mask, static_argnums=(1, 2))(jax.random.key(2), (3, 5), 0.5)
    assert mask.shape == (3, 5) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(dropout_keep_mask(jax.random.key(2), (3, 5), 0.5)))
    assert bool(dropout_keep_mask(jax.random.key(0), (1000,), 0.0).all())  # rate 0 keeps everything


def test_lora_rejects_a_dropout_outside_0_1(tiny_qwen2vl):
    from ivtlr_jax.io import from_pretrained
    from ivtlr_jax.models.common.lora import LoRAConfig, add_lora
    model = from_pretrained(tiny_qwen2vl[0])
    with pytest.raises(ValueError, match=r"dropout: 1\.0 must be a finite number >= 0\.0 and < 1\.0"):
        add_lora(model, LoRAConfig(rank=2, alpha=4.0, dropout=1.0))
