"""Continuous batching (ivtlr_jax/continuous.py): every prompt generates what it generates alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivtlr_jax.continuous import generate_continuous, stackable
from ivtlr_jax.decoding import RowSampling
from ivtlr_jax.generate import SamplingConfig, ivtlr_generate
from ivtlr_jax.latent import LatentConfig
from tests import hf_tiny
from tests.test_generate import FIXTURES, amplified
from tests.test_latent import CHAMELEON_LATENT, QWEN_LATENT

N_NEW = 10
QWEN_SIZES = [(84, 84), (56, 112), (84, 56), (56, 56), (112, 56)]


def single_prompts(family, latents, left_pads, seed=0, width=None):
    """One left-padded batch-of-one prompt per entry of `latents` (its latent count), with questions and
    images of different sizes and `left_pads` padding tokens in front (with `width`: padded to that)."""
    rng = np.random.default_rng(seed)
    text = lambda k: list(rng.integers(3, hf_tiny.TEXT_VOCAB, k))
    latent = QWEN_LATENT if family == "qwen2vl" else CHAMELEON_LATENT
    prompts = []
    for i, (c, pad) in enumerate(zip(latents, left_pads)):
        if family == "qwen2vl":
            pv, grid = hf_tiny.image_inputs([QWEN_SIZES[i % len(QWEN_SIZES)]], seed=seed + i)
            span = [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * int(grid.prod() // 4) + [hf_tiny.VISION_END]
            image = {"pixel_values": pv, "image_grid_thw": grid}
        else:
            span = [hf_tiny.CHAMELEON_IMAGE] * hf_tiny.CHAMELEON_TOKENS_PER_IMAGE
            image = {"pixel_values": rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)}
        row = text(1 + i % 3) + span + text(2 + (2 * i) % 5) + [latent] * c
        pad = pad if width is None else width - len(row)
        ids = np.asarray([[0] * pad + row])
        mask = np.asarray([[0] * pad + [1] * len(row)])
        prompts.append({"input_ids": ids, "attention_mask": mask, **image})
    return prompts, latent


def started_as(model, prompts, latent, sampling, admit):
    """Per prompt (tokens [N], length, selected [c, K]) of `ivtlr_generate` on the batch it starts in:
    alone (admit 1), or its group of `admit` consecutive prompts padded with copies of the last."""
    out = []
    for g in range(0, len(prompts), admit):
        group = prompts[g:g + admit]
        rows = group + [group[-1]] * (admit - len(group))
        batch = {key: np.concatenate([p[key] for p in rows]) for key in rows[0]}
        gen = ivtlr_generate(model, batch, latent, sampling)
        for r, p in enumerate(group):
            c = int((p["input_ids"] == latent.latent_token_id).sum())
            out.append((np.asarray(gen.tokens[r]), int(gen.lengths[r]), np.asarray(gen.selected[:c, r])))
    return out


@pytest.mark.parametrize("family,rope,k,admit,width", [
    ("qwen2vl", "1d", 2, 1, 24),  # each prompt starts alone
    ("qwen2vl", "mrope", 2, 3, 24),  # three at a time, the last group padded
    ("chameleon", "1d", 6, 2, 76),  # two at a time (admit = slots, the default)
])
def test_continuous_batching_generates_what_each_prompt_starts_as(request, family, rope, k, admit, width):
    """Five prompts of different lengths, left pads and latent counts (one without latents) through two
    slots, with an EOS that ends some answers early: each prompt's tokens, length and selected patches
    equal `ivtlr_generate` on the batch it starts in (alone with admit=1, else its group), and prompts
    enter slots as others finish. (Rows of a batch equal the rows alone up to rounding, which can flip a
    near-tie: in the Chameleon case, patches 3 and 4 of a row's ranking swap between its group and alone.
    The model is amplified so that a wrong position, cache slot or state changes the tokens; see
    test_generate.amplified.)"""
    model = amplified(request.getfixturevalue(FIXTURES[family])[2])
    prompts, latent_id = single_prompts(family, latents=(2, 1, 0, 2, 1), left_pads=(0, 3, 1, 0, 2), width=width)
    latent = LatentConfig(latent_id, k, rope=rope)
    free = SamplingConfig(max_new_tokens=N_NEW)
    first = np.asarray(ivtlr_generate(model, prompts[0], latent, free).tokens[0])
    sampling = SamplingConfig(max_new_tokens=N_NEW, eos_token_id=int(first[3]), pad_token_id=-1)
    reference = started_as(model, prompts, latent, sampling, admit)
    lengths = [length for _, length, _ in reference]
    assert min(lengths) <= 3 and max(lengths) == N_NEW, lengths  # answers of different lengths

    out = list(generate_continuous(model, prompts, latent, sampling, slots=2,
                                   admit=None if family == "chameleon" else admit))
    assert sorted(i for i, _ in out) == list(range(len(prompts)))
    assert [i for i, _ in out][:1] == [0] or lengths[0] > min(lengths)  # rows come out as they finish
    for i, row in out:
        tokens, length, selected = reference[i]
        np.testing.assert_array_equal(row.tokens, tokens, err_msg=f"prompt {i}")
        assert row.length == length
        np.testing.assert_array_equal(row.selected, selected, err_msg=f"prompt {i}")


def test_continuous_sampling_draws_as_alone(qwen):
    """Sampled (temperature, top-p): prompt i draws with fold_in(key, i), the tokens it draws alone with
    that key, whichever slot, group and neighbours it gets; a share of the prompts given with their indices
    (as each process of an evaluation runs its share) draws what they draw among all."""
    model = qwen[2]
    prompts, latent_id = single_prompts("qwen2vl", latents=(2, 2, 1), left_pads=(0, 1, 0), seed=3, width=24)
    latent = LatentConfig(latent_id, 2)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.3, top_p=0.9)
    key = jax.random.key(7)
    out = dict(generate_continuous(model, prompts, latent, sampling, slots=2, key=key))
    draws = []
    for i, p in enumerate(prompts):
        alone = ivtlr_generate(model, p, latent, sampling, key=jax.random.fold_in(key, i)[None])  # its own key
        np.testing.assert_array_equal(out[i].tokens, np.asarray(alone.tokens[0]), err_msg=f"prompt {i}")
        draws.append(tuple(out[i].tokens))
    assert len(set(draws)) == len(draws)
    share = dict(generate_continuous(model, prompts[1:], latent, sampling, slots=2, key=key, indices=range(1, 3)))
    assert sorted(share) == [1, 2]
    for i, row in share.items():
        np.testing.assert_array_equal(row.tokens, out[i].tokens, err_msg=f"prompt {i} of the share")


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_static_and_continuous_decode_the_same_tokens(qwen, temperature):
    """One decoding step serves both drivers: a static batch and continuous batching started as that batch
    give identical tokens, greedy and sampled with the same key (row i and prompt i both draw with
    fold_in(key, i)), though the continuous slots (2) take the third prompt only when one frees."""
    model = qwen[2]
    prompts, latent_id = single_prompts("qwen2vl", latents=(2, 1, 2), left_pads=(0, 2, 1), seed=5, width=24)
    latent = LatentConfig(latent_id, 2)
    sampling = SamplingConfig(max_new_tokens=6, temperature=temperature, top_p=0.9)
    key = jax.random.key(11)
    batch = {k: np.concatenate([p[k] for p in prompts]) for k in prompts[0]}
    static = ivtlr_generate(model, batch, latent, sampling, key=key)
    out = dict(generate_continuous(model, prompts, latent, sampling, slots=2, admit=3, key=key))
    for i in range(len(prompts)):
        np.testing.assert_array_equal(out[i].tokens, np.asarray(static.tokens[i]), err_msg=f"prompt {i}")
        assert out[i].length == int(static.lengths[i])


def test_per_row_cache_writes_each_row_at_its_own_slot(qwen):
    """A decoding step over a cache whose rows end at different slots equals each row's step alone."""
    model = qwen[2]
    rng = np.random.default_rng(0)
    b, s, d = 3, 12, model.config.text.hidden_size
    ends = [4, 9, 6]
    cache = model.init_cache(b, s)
    rows = []
    for r, end in enumerate(ends):  # fill row r's first `end` slots alone
        embeds = jnp.asarray(rng.normal(size=(1, end, d)), jnp.float32)
        out = model.decode(embeds, jnp.arange(end)[None], cache=model.init_cache(1, s))
        rows.append(out.cache)
    cache = cache.per_row()
    join = lambda field, axis: jnp.concatenate([getattr(c, field) for c in rows], axis=axis)
    cache = cache.replace(k=join("k", 1), v=join("v", 1), valid=join("valid", 0), end=jnp.asarray(ends, jnp.int32))
    step = jnp.asarray(rng.normal(size=(b, 1, d)), jnp.float32)
    together = model.decode(step, cache.end[:, None], cache=cache)
    for r, end in enumerate(ends):
        alone = model.decode(step[r:r + 1], jnp.asarray([[end]]), cache=rows[r])
        np.testing.assert_allclose(np.asarray(together.hidden[r]), np.asarray(alone.hidden[0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(together.cache.valid[r]), np.asarray(alone.cache.valid[0]))
        np.testing.assert_allclose(np.asarray(together.cache.k[:, r]), np.asarray(alone.cache.k[:, 0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(together.cache.end), np.asarray(ends) + 1)


def test_only_prompts_alike_but_for_their_rows_start_together():
    """Prompts start as one batch only when their arrays concatenate: the same keys, the same width, the
    same image shapes (Qwen2-VL's flat patches may differ in number)."""
    ids = lambda width: {"input_ids": np.zeros((1, width), np.int32), "attention_mask": np.ones((1, width), np.int32)}
    stacked = lambda patches: {"pixel_values": np.zeros((1, patches, 1176)), "image_grid_thw": np.ones((1, 3))}
    flat = lambda patches: {"pixel_values": np.zeros((patches, 1176)), "image_grid_thw": np.ones((1, 3))}
    assert stackable([ids(20) | stacked(16), ids(20) | stacked(16)])
    assert stackable([ids(20) | flat(16), ids(20) | flat(36)])
    assert not stackable([ids(20) | stacked(16), ids(20) | stacked(36)])
    assert not stackable([ids(20) | flat(16), ids(24) | flat(16)])
    assert not stackable([ids(20) | flat(16), ids(20)])


@pytest.mark.parametrize("temperature,admit", [(0.0, None), (1.3, 1)])
def test_slots_split_over_four_devices_generate_what_one_device_does(qwen, temperature, admit):
    """The slots' batch axis split over a 4-device data mesh (the model's parameters replicated on it): each
    device holds a share of the slots, and every prompt's tokens, length and selected patches equal the
    one-device run's, greedy and sampled (prompt i draws with fold_in(key, i) on whichever device)."""
    from ivtlr_jax.continuous import SlotEngine
    from ivtlr_jax.io import from_pretrained
    from ivtlr_jax.models import ShardingRules, make_mesh

    rules = ShardingRules(make_mesh(data=4))
    spread_model = from_pretrained(qwen[0], rules=rules)
    prompts, latent_id = single_prompts("qwen2vl", latents=(2, 1, 0, 2, 1, 2), left_pads=(0, 3, 1, 0, 2, 1),
                                        seed=2, width=24)
    latent = LatentConfig(latent_id, 2)
    sampling = SamplingConfig(max_new_tokens=N_NEW, temperature=temperature, top_p=0.9)
    key = jax.random.key(5)
    one = dict(generate_continuous(qwen[2], prompts, latent, sampling, slots=4, admit=admit, key=key))
    four = dict(generate_continuous(spread_model, prompts, latent, sampling, slots=4, admit=admit, key=key,
                                    rules=rules))
    assert sorted(four) == list(range(len(prompts)))
    for i, row in one.items():
        np.testing.assert_array_equal(four[i].tokens, row.tokens, err_msg=f"prompt {i}")
        assert four[i].length == row.length
        np.testing.assert_array_equal(four[i].selected, row.selected, err_msg=f"prompt {i}")
    assert len({tuple(row.tokens) for row in one.values()}) > 1  # the prompts' answers differ

    engine = SlotEngine(spread_model, latent, sampling, slots=4, rules=rules)
    engine.insert(engine.start([0], prompts[:1], RowSampling.of(key[None], sampling))[0])
    shards = engine.state.cache.k.addressable_shards
    assert len(shards) == 4 and {s.data.shape[1] for s in shards} == {1}  # one slot per device
