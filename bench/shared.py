"""What the benches share: the random mid-size Qwen2-VL (transformers and Flax, same weights) and the batches
built for it (the official collator's layout; the same rows at the assembled length; images stacked per image).

Used by bench/latent_step.py, train_step.py, generate.py, continuous.py and gpu_check.py.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ivtlr_jax.io import from_pretrained  # noqa: E402
from ivtlr_jax.latent import IGNORE, latent_layout  # noqa: E402
from ivtlr_jax.models.qwen2vl import modeling as qwen2vl_modeling  # noqa: E402
from tests import hf_tiny  # noqa: E402
from tests.oracle_ivtlr import latent_batch  # noqa: E402

LATENT_ID, EOS = 295, 2  # vocabulary >= 300 keeps hf_tiny's special ids 290-295
# head_dim 256 / 4 = 64, so sum(mrope_section) must be 32
TEXT = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12]))
VISION = dict(depth=2, embed_dim=128, num_heads=2)
IMAGE_SIZE = (224, 224)  # a 16x16 patch grid merged 2x2 -> 64 image tokens
QUESTION_TEXT = (2, 24)  # [low, high) text tokens before and after the image
ANSWER = (40, 81)  # [low, high) answer tokens


# ---- models ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def mid_qwen2vl_folder():
    """The benches' random mid-size transformers Qwen2-VL (TEXT, VISION; seed 0) saved to a temporary
    folder -> (folder, the transformers model loaded back with eager attention)."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = hf_tiny.qwen2vl_config(**TEXT)
    for key, value in VISION.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
        yield folder, Qwen2VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def build_models(remat: str = "none", scan_layers: bool = True):
    """(transformers model with eager attention, Flax model) of the same random weights."""
    with mid_qwen2vl_folder() as (folder, hf):
        return hf, from_pretrained(folder, remat=remat, scan_layers=scan_layers)


# ---- batches --------------------------------------------------------------------------------------
def latent_training_batch(batch_size: int, latents: int, seed: int = 0) -> dict:
    """The collator's layout, one image per row, question and answer lengths varying by row."""
    rng = np.random.default_rng(seed)
    pixel_values, grid = hf_tiny.image_inputs([IMAGE_SIZE] * batch_size, seed=seed)
    image_tokens = (grid.prod(-1) // 4).tolist()
    text = lambda count: list(rng.integers(3, hf_tiny.TEXT_VOCAB, count))
    questions = [text(rng.integers(*QUESTION_TEXT)) + [hf_tiny.VISION_START] + [hf_tiny.IMAGE_TOKEN] * m
                 + [hf_tiny.VISION_END] + text(rng.integers(*QUESTION_TEXT)) for m in image_tokens]
    answers = rng.integers(*ANSWER, batch_size).tolist()
    batch = latent_batch(rng, questions, [latents] * batch_size, answers, LATENT_ID, EOS, hf_tiny.TEXT_VOCAB)
    return batch | {"pixel_values": pixel_values, "image_grid_thw": grid}


def assembled_length_batch(batch: dict, n: int, k: int, seed: int = 1, latent_id: int = LATENT_ID,
                           text=lambda rng, shape: rng.integers(3, hf_tiny.TEXT_VOCAB, shape)) -> dict:
    """The same rows with their n latents (at [p, p + n)) replaced by n*(K+1) ordinary text tokens
    (`text(rng, shape)`) labelled -100: no latents, and the length S + n*K of the assembled sequence."""
    rng = np.random.default_rng(seed)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b = ids.shape[0]
    _, p = latent_layout(ids, latent_id)
    filler = text(rng, (b, n * (k + 1)))
    insert = lambda a, middle: np.concatenate([a[:, :p], middle.astype(a.dtype), a[:, p + n:]], axis=1)
    new_mask = insert(mask, np.ones((b, n * (k + 1))))
    return batch | {
        "input_ids": insert(ids, filler),
        "attention_mask": new_mask,
        "labels": insert(labels, np.full((b, n * (k + 1)), IGNORE)),
        # 0 on pads, 0, 1, 2... on the row
        "position_ids": ((np.cumsum(new_mask, axis=1) - 1) * new_mask).astype(batch["position_ids"].dtype),
    }


def stacked_images(batch: dict) -> dict:
    """pixel_values [B * Np, 1176] of B one-frame images of one size -> [B, Np, 1176]: the layout the
    collator (`ivtlr_jax.data.collate.stack_images`) gives such images (the trainer's layout; the tower
    attends through `frame_attention`, or per frame under `per_frame_vision`). The torch side keeps [B * Np, 1176]."""
    grid = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
    if not ((grid[:, 0] == 1).all() and len({tuple(g) for g in grid.tolist()}) == 1):
        raise ValueError(f"images of different sizes (or several frames) cannot be stacked per image: {grid}")
    pixels = np.asarray(batch["pixel_values"])
    return batch | {"pixel_values": pixels.reshape(len(grid), -1, pixels.shape[-1])}


def to_jax(batch: dict) -> dict:
    """The JAX side's batch: device arrays, same-size images stacked per image (`stacked_images`)."""
    return {key: jnp.asarray(value) for key, value in stacked_images(batch).items() if key != "latent_token_id"}


@contextlib.contextmanager
def per_frame_vision():
    """While a model call is traced inside, the Qwen vision towers attend per frame ([frames, L, L] blocks,
    no mask) on frames of one static size, whatever attention_impl: the path the trainer took for stacked
    same-size images before `frame_attention` became the default (issue #29). A baseline for the benches."""
    saved = qwen2vl_modeling.attended_frame_len
    qwen2vl_modeling.attended_frame_len = lambda frame_len, attention_impl: frame_len
    try:
        yield
    finally:
        qwen2vl_modeling.attended_frame_len = saved
