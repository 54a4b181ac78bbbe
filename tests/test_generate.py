"""Batched IVT-LR generation: equals batch-of-one and the PyTorch oracle of docs/method.md section 17."""

import numpy as np
import pytest
from flax import nnx

from ivtlr_jax.data.collate import left_padded_positions
from ivtlr_jax.decoding import next_token
from ivtlr_jax.generate import SamplingConfig, ivtlr_generate
from ivtlr_jax.latent import LatentConfig
from tests import hf_tiny
from tests.oracle_ivtlr import oracle_generate
from tests.test_latent import CHAMELEON_LATENT, QWEN_LATENT

N_NEW = 8
FIXTURES = {"qwen2vl": "qwen", "qwen25vl": "qwen25", "chameleon": "chameleon"}  # family -> its model fixture
# the Qwen families' prompt images: Qwen2.5-VL's have partial vision windows (tests/hf_tiny.py)
QWEN_IMAGE_SIZES = {"qwen2vl": [(84, 84), (56, 112)], "qwen25vl": list(hf_tiny.QWEN25VL_IMAGE_SIZES)}


def prompts(family, seed=0, latents=3, suffix=()):
    """Two prompts (question + latents + suffix) of different lengths, each as an unpadded batch of one
    and together left-padded."""
    rng = np.random.default_rng(seed)
    text = lambda k: list(rng.integers(3, hf_tiny.TEXT_VOCAB, k))
    if family in QWEN_IMAGE_SIZES:
        pv, grid = hf_tiny.image_inputs(QWEN_IMAGE_SIZES[family], seed=seed)
        n_img = (grid.prod(-1) // 4).tolist()
        span = lambda n: [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * n + [hf_tiny.VISION_END]
        rows = [text(3) + span(n_img[0]) + text(5), text(1) + span(n_img[1]) + text(2)]
        images = [{"pixel_values": pv[: grid[0].prod()], "image_grid_thw": grid[:1]},
                  {"pixel_values": pv[grid[0].prod():], "image_grid_thw": grid[1:]}]
        latent = QWEN_LATENT
    else:
        pv = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
        img = [hf_tiny.CHAMELEON_IMAGE] * hf_tiny.CHAMELEON_TOKENS_PER_IMAGE
        rows = [text(4) + img + text(3), text(2) + img + text(1)]
        images = [{"pixel_values": pv[:1]}, {"pixel_values": pv[1:]}]
        latent = CHAMELEON_LATENT
    rows = [r + [latent] * latents + list(suffix) for r in rows]
    singles = []
    for r, im in zip(rows, images):
        ids = np.asarray([r])
        singles.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(r))[None],
                        **im, "latent_token_id": latent})
    ids, mask = hf_tiny.pad_rows(rows, left_pad=True)
    both = {"input_ids": ids, "attention_mask": mask, "position_ids": left_padded_positions(mask),
            "latent_token_id": latent}
    both["pixel_values"] = np.concatenate([im["pixel_values"] for im in images])
    if family in QWEN_IMAGE_SIZES:
        both["image_grid_thw"] = np.concatenate([im["image_grid_thw"] for im in images])
    return singles, both


def run(model, batch, latent_id, k):
    batch = {key: v for key, v in batch.items() if key != "latent_token_id"}
    return ivtlr_generate(model, batch, LatentConfig(latent_id, k), SamplingConfig(max_new_tokens=N_NEW))


@pytest.mark.parametrize("family,k", [("qwen2vl", 3), ("qwen25vl", 3), ("chameleon", 8)])
def test_generation_matches_oracle_and_batch_of_one(request, family, k):
    folder, hf, model = request.getfixturevalue(FIXTURES[family])
    singles, both = prompts(family)
    latent = singles[0]["latent_token_id"]
    batched = run(model, both, latent, k)
    for i, single in enumerate(singles):
        alone = run(model, single, latent, k)
        np.testing.assert_array_equal(np.asarray(batched.tokens[i]), np.asarray(alone.tokens[0]))
        shift = both["input_ids"].shape[1] - single["input_ids"].shape[1]
        np.testing.assert_array_equal(np.asarray(batched.selected[:, i]) - shift, np.asarray(alone.selected[:, 0]))
        assert np.asarray(alone.tokens[0]).tolist() == oracle_generate(hf, family, single, k, N_NEW)


@pytest.mark.parametrize("family,k", [("qwen2vl", 2), ("chameleon", 6)])
def test_prompt_continuing_after_its_latents(request, family, k):
    """The official Chameleon evaluation prompt ends with a separator after the latents: the section-3
    sequence is then question, V0, L0, ..., separator, and decoding starts after the separator."""
    _, hf, model = request.getfixturevalue(FIXTURES[family])
    singles, both = prompts(family, seed=1, latents=2, suffix=(7, 11))
    latent = singles[0]["latent_token_id"]
    batched = run(model, both, latent, k)
    without = run(model, prompts(family, seed=1, latents=2)[1], latent, k)
    assert not np.array_equal(np.asarray(batched.tokens), np.asarray(without.tokens))
    for i, single in enumerate(singles):
        assert np.asarray(batched.tokens[i]).tolist() == oracle_generate(hf, family, single, k, N_NEW)


def mixed_prompts(family, latents, suffix=(), seed=2):
    """Prompts `question + <|latent|> x c + suffix`, one per entry of `latents`, with questions and images of
    different sizes: each as an unpadded batch of one, and together left-padded (as evaluation pads them)."""
    rng = np.random.default_rng(seed)
    text = lambda k: list(rng.integers(3, hf_tiny.TEXT_VOCAB, k))
    lens = [(3, 5), (1, 2), (2, 1)][: len(latents)]
    if family == "qwen2vl":
        pv, grid = hf_tiny.image_inputs([(84, 84), (56, 112), (84, 56)][: len(latents)], seed=seed)
        starts = np.concatenate([[0], np.cumsum(grid.prod(-1))])
        span = lambda n: [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * int(n) + [hf_tiny.VISION_END]
        rows = [text(a) + span(n) + text(b) for n, (a, b) in zip(grid.prod(-1) // 4, lens)]
        images = [{"pixel_values": pv[starts[i]:starts[i + 1]], "image_grid_thw": grid[i:i + 1]}
                  for i in range(len(latents))]
        latent = QWEN_LATENT
    else:
        pv = rng.uniform(-1, 1, (len(latents), 3, 32, 32)).astype(np.float32)
        img = [hf_tiny.CHAMELEON_IMAGE] * hf_tiny.CHAMELEON_TOKENS_PER_IMAGE
        rows = [text(a) + img + text(b) for a, b in lens]
        images = [{"pixel_values": pv[i:i + 1]} for i in range(len(latents))]
        latent = CHAMELEON_LATENT
    rows = [r + [latent] * c + list(suffix) for r, c in zip(rows, latents)]
    singles = [{"input_ids": np.asarray([r]), "attention_mask": np.ones((1, len(r)), np.int64),
                "position_ids": np.arange(len(r))[None], **im} for r, im in zip(rows, images)]
    ids, mask = hf_tiny.pad_rows(rows, left_pad=True)
    both = {"input_ids": ids, "attention_mask": mask, "position_ids": left_padded_positions(mask),
            **{key: np.concatenate([im[key] for im in images]) for key in images[0]}}
    return singles, both, latent


def amplified(model, qk=8.0, out=10.0):
    """A copy of `model` with queries and keys scaled by `qk` (Chameleon: their LayerNorm scales) and the
    attention and MLP outputs by `out`. The tiny random models attend almost uniformly and their layers
    barely move the residual stream, so greedy tokens hardly depend on positions or on which state a
    row continues from; amplified, a wrong position or state changes them."""
    model = nnx.clone(model)
    layers = model.layers
    qk_names = ("q_norm_scale_nh", "k_norm_scale_kh") if hasattr(layers, "q_norm_scale_nh") else ("q_weight_dnh",
                                                                                                 "k_weight_dkh")
    for names, factor in ((qk_names, qk), (("o_weight_nhd", "down_weight_fd"), out)):
        for name in names:
            getattr(layers, name)[...] = getattr(layers, name)[...] * factor
    return model


@pytest.mark.parametrize("family,latents,k,suffix", [
    ("qwen2vl", (3, 1, 2), 2, (7, 11)),  # a suffix after the latents, as the official Chameleon separator
    ("chameleon", (2, 0, 1), 6, ()),  # each row continues from its own last latent (none: its question)
])
def test_prompts_with_different_latent_counts_generate_as_alone(request, family, latents, k, suffix):
    """Mixed latent counts in one batch: each row generates the tokens it generates alone and selects the
    same patches. Rows with fewer latents hold masked chain slots in the cache, which every later position
    skips, and continue from the state at their own last latent. (Without the skip every row with fewer
    latents here generates other tokens; continuing from the last pass's state instead changes the
    Chameleon row without latents.)"""
    model = amplified(request.getfixturevalue(FIXTURES[family])[2])
    singles, both, latent = mixed_prompts(family, latents, suffix)
    batched = run(model, both, latent, k)
    assert batched.selected.shape[0] == max(latents)
    for i, (single, c) in enumerate(zip(singles, latents)):
        alone = run(model, single, latent, k)
        np.testing.assert_array_equal(np.asarray(batched.tokens[i]), np.asarray(alone.tokens[0]))
        shift = both["input_ids"].shape[1] - single["input_ids"].shape[1]  # the row's left pad
        np.testing.assert_array_equal(np.asarray(batched.selected[:c, i]) - shift, np.asarray(alone.selected[:, 0]))
        assert (np.asarray(batched.selected[c:, i]) == -1).all()


def test_prompts_with_different_suffixes_are_rejected(qwen):
    _, _, model = qwen
    _, both, latent = mixed_prompts("qwen2vl", (2, 1), suffix=(7,))
    ids = both["input_ids"].copy()
    ids[0, -1] = latent  # row 0: 3 latents and no suffix, row 1: 1 latent and its suffix
    with pytest.raises(ValueError, match=r"rows end with \[0, 1\] tokens after their last <\|latent\|>"):
        run(model, both | {"input_ids": ids}, latent, 2)


def test_eos_stops_rows_and_lengths_exclude_it(qwen):
    _, _, model = qwen
    singles, both = prompts("qwen2vl", seed=1)
    batch = {k: v for k, v in both.items() if k != "latent_token_id"}
    free = ivtlr_generate(model, batch, LatentConfig(QWEN_LATENT, 3), SamplingConfig(max_new_tokens=N_NEW))
    eos = int(free.tokens[0, 2])  # make row 0's third token the EOS
    out = ivtlr_generate(model, batch, LatentConfig(QWEN_LATENT, 3),
                         SamplingConfig(max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=-1))
    row = np.asarray(out.tokens[0]).tolist()
    first = row.index(eos) if eos in row else None
    assert first is not None and first <= 2
    assert all(t == -1 for t in row[first + 1:]) and int(out.lengths[0]) == first


def test_top_p_sampling_keeps_the_nucleus():
    import jax

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    cfg = SamplingConfig(temperature=1.0, top_p=0.8)
    draws = {int(next_token(logits, jax.random.key(i), cfg)[0]) for i in range(200)}
    assert draws == {0, 1}
