"""Batched and continuous IVT-LR generation on Qwen3-VL (DeepStack features at the image tokens, and at
the inserted patch copies with `patch_deepstack`): every row generates what it generates as a batch of one."""

import numpy as np
import pytest

from ivtlr_jax.continuous import generate_continuous
from ivtlr_jax.data.collate import left_padded_positions
from ivtlr_jax.generate import SamplingConfig, ivtlr_generate
from ivtlr_jax.io import from_pretrained
from ivtlr_jax.latent import LatentConfig
from tests import hf_tiny
from tests.test_continuous import started_as
from tests.test_generate import amplified
from tests.test_latent import QWEN_LATENT

N_NEW = 8
K = 2  # patches per latent step: the smallest image below has 4 image tokens
IMAGE_SIZES = ((64, 64), (128, 160), (96, 128))  # 4x4, 8x10 and 6x8 patches: 4, 20 and 12 image tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny Qwen3-VL (DeepStack into decoder layers 0 and 1 of 3), amplified so that a wrong position,
    cache slot or DeepStack addend changes the greedy tokens (tests/test_generate.amplified)."""
    folder = tmp_path_factory.mktemp("tiny_qwen3vl_generate")
    hf_tiny.build_qwen3vl(folder)
    return amplified(from_pretrained(folder))


def single_prompts(latents, left_pads, seed=0):
    """One left-padded batch-of-one prompt per entry of `latents` (its latent count): text, an image of
    IMAGE_SIZES (in turn), text, the latents; `left_pads` padding tokens in front."""
    rng = np.random.default_rng(seed)
    text = lambda k: list(rng.integers(3, hf_tiny.TEXT_VOCAB, k))
    prompts = []
    for i, (c, pad) in enumerate(zip(latents, left_pads)):
        pv, grid = hf_tiny.qwen3vl_image_inputs([IMAGE_SIZES[i % len(IMAGE_SIZES)]], seed=seed + i)
        span = [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * int(grid.prod() // 4) + [hf_tiny.VISION_END]
        row = text(1 + i % 3) + span + text(2 + i % 4) + [QWEN_LATENT] * c
        ids = np.asarray([[0] * pad + row])
        mask = np.asarray([[0] * pad + [1] * len(row)])
        prompts.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_grid_thw": grid})
    return prompts


def left_padded_batch(prompts):
    """The prompts (unpadded) together in one left-padded batch, and each row's padding."""
    rows = [p["input_ids"][0][p["attention_mask"][0] == 1].tolist() for p in prompts]
    ids, mask = hf_tiny.pad_rows(rows, left_pad=True)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": left_padded_positions(mask),
             "pixel_values": np.concatenate([p["pixel_values"] for p in prompts]),
             "image_grid_thw": np.concatenate([p["image_grid_thw"] for p in prompts])}
    return batch, [ids.shape[1] - len(r) for r in rows]


@pytest.mark.parametrize("patch_deepstack,rope", [(True, "1d"), (False, "1d"), (True, "mrope")])
def test_batched_generation_equals_batch_of_one(model, patch_deepstack, rope):
    """Three prompts of different lengths and image sizes (3 latents each), batched: each row's tokens and
    selected patches equal the row's alone, with and without the copies' DeepStack features."""
    prompts = single_prompts(latents=(3, 3, 3), left_pads=(0, 0, 0))
    latent = LatentConfig(QWEN_LATENT, K, rope=rope, patch_deepstack=patch_deepstack)
    sampling = SamplingConfig(max_new_tokens=N_NEW)
    batch, pads = left_padded_batch(prompts)
    batched = ivtlr_generate(model, batch, latent, sampling)
    for i, prompt in enumerate(prompts):
        alone = ivtlr_generate(model, prompt, latent, sampling)
        np.testing.assert_array_equal(np.asarray(batched.tokens[i]), np.asarray(alone.tokens[0]), err_msg=f"row {i}")
        np.testing.assert_array_equal(np.asarray(batched.selected[:, i]) - pads[i], np.asarray(alone.selected[:, 0]))


def test_the_deepstack_option_reaches_generation(model):
    """The option changes what is generated (the tests above compare two different programs): the tokens
    or the patches of the later latent steps, chosen from states that saw the first step's copies."""
    prompt = single_prompts(latents=(3,), left_pads=(0,))[0]
    sampling = SamplingConfig(max_new_tokens=N_NEW)
    runs = [ivtlr_generate(model, prompt, LatentConfig(QWEN_LATENT, K, patch_deepstack=on), sampling)
            for on in (True, False)]
    outputs = [np.concatenate([np.asarray(r.tokens).ravel(), np.asarray(r.selected).ravel()]) for r in runs]
    assert not np.array_equal(*outputs), outputs


@pytest.mark.parametrize("patch_deepstack", [True, False])
def test_continuous_batching_generates_what_each_prompt_generates_alone(model, patch_deepstack):
    """Four prompts of different lengths, left pads and latent counts (one without latents) through two
    slots, with an EOS that ends some answers early: tokens, length and selected patches as alone."""
    prompts = single_prompts(latents=(2, 1, 0, 3), left_pads=(0, 3, 1, 2))
    latent = LatentConfig(QWEN_LATENT, K, patch_deepstack=patch_deepstack)
    free = SamplingConfig(max_new_tokens=N_NEW)
    first = np.asarray(ivtlr_generate(model, prompts[0], latent, free).tokens[0])
    sampling = SamplingConfig(max_new_tokens=N_NEW, eos_token_id=int(first[3]), pad_token_id=-1)
    reference = started_as(model, prompts, latent, sampling, admit=1)
    out = list(generate_continuous(model, prompts, latent, sampling, slots=2, admit=1))
    assert sorted(i for i, _ in out) == list(range(len(prompts)))
    for i, row in out:
        tokens, length, selected = reference[i]
        np.testing.assert_array_equal(row.tokens, tokens, err_msg=f"prompt {i}")
        assert row.length == length
        np.testing.assert_array_equal(row.selected, selected, err_msg=f"prompt {i}")
