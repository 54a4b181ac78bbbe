"""`data.image_resize` (issue #30): "square" (the default) keeps the official IVT-LR fixed square; "processor"
sizes each image by the family's processor's own rules (transformers' smart_resize: aspect kept, sides
multiples of patch x merge, area within the processor's min/max pixels), so rows have their own image token
counts. Checked against a tiny Qwen3VLProcessor built in-process (16-pixel patches merged 2x2: 32 pixels a
token), and carried from the run config to training, evaluation and a model folder's settings file."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from tests import hf_tiny
from tests.test_data import img, png, write_m3cot

# (width, height): one inside the processor's bounds, one over max_pixels (320 * 320), one under min_pixels
# (64 * 64), one a tall strip
SIZES = ((200, 120), (600, 400), (30, 30), (48, 300))


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return hf_tiny.build_qwen3vl_processor(tmp_path_factory.mktemp("q3proc"), ["a b c", "the answer is 1"],
                                           vocab_size=300)


def picture(size: tuple[int, int], seed: int = 0):
    """A random RGB image of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def smart_resize_grid(processor, size: tuple[int, int]) -> list[int]:
    """[1, h, w]: the patch grid transformers' smart_resize gives an image of `size` (width, height) with the
    processor's min/max pixels and the patch x merge factor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = processor.image_processor
    h, w = smart_resize(size[1], size[0], factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"])
    return [1, h // ip.patch_size, w // ip.patch_size]


def hf_prompt(processor, text: str, image) -> dict[str, np.ndarray]:
    """transformers' own processor on the chat prompt and the image as it is."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[chat], images=[image], return_tensors="np"))


@pytest.mark.parametrize("size", SIZES)
def test_processor_resize_is_the_processors_own(processor, size):
    """ids, pixel values and grid equal transformers' Qwen3VLProcessor given the image unresized; the grid is
    smart_resize's and the prompt holds its h * w / 4 image tokens (the square would give 100 for every size)."""
    from ivtlr_jax.data import make_encoder

    encoder = make_encoder("qwen3vl", processor, image_resize="processor")
    ids, image = encoder.prompt("what colour?", picture(size))
    expected = hf_prompt(processor, "what colour?", picture(size))
    grid = smart_resize_grid(processor, size)
    assert image["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist() == [grid]
    assert ids == expected["input_ids"][0].tolist()
    assert sum(t == processor.image_token_id for t in ids) == grid[1] * grid[2] // 4
    np.testing.assert_array_equal(image["pixel_values"], expected["pixel_values"])  # [h * w, 1536]
    again = encoder.process_picture(picture(size))  # the lazy images' path: the same arrays
    np.testing.assert_array_equal(again["pixel_values"], image["pixel_values"])
    assert again["image_grid_thw"].tolist() == [grid]


def test_square_stays_the_default(processor):
    """Without the option every image is the official fixed square: 320x320, 10x10 = 100 tokens."""
    from ivtlr_jax.data import make_encoder

    encoder = make_encoder("qwen3vl", processor)
    for size in SIZES:
        ids, image = encoder.prompt("q", picture(size))
        square = hf_prompt(processor, "q", picture(size).resize((320, 320), Image.Resampling.BICUBIC))
        assert image["image_grid_thw"].tolist() == [[1, 20, 20]] and ids == square["input_ids"][0].tolist()
        np.testing.assert_array_equal(image["pixel_values"], square["pixel_values"])


def test_a_square_size_with_processor_resize_is_refused(processor):
    from ivtlr_jax.data import make_encoder

    with pytest.raises(ValueError, match="num_image_tokens=64 sizes the square image"):
        make_encoder("qwen3vl", processor, 64, "processor")
    with pytest.raises(ValueError, match="image_resize: 'round' is not allowed; choose one of"):
        make_encoder("qwen3vl", processor, image_resize="round")


def test_examples_have_their_images_token_counts_and_collate(processor, tmp_path):
    """load_examples with image_resize "processor": each row's prompt holds its image's own token count (as
    transformers' processor makes it), its lazy image re-processes to the same arrays, and rows of different
    counts collate into one batch (patches concatenated [sum Np, 1536], grids [B, 3])."""
    from ivtlr_jax.data import collate, load_examples, materialize

    rows = [dict(id=f"r{i}", image=img(png(size=size))) for i, size in enumerate(SIZES)]
    src = write_m3cot(tmp_path / "train.parquet", rows)
    examples, report = load_examples("m3cot", str(src), "train", processor, "qwen3vl", image_resize="processor")
    assert report.kept == len(SIZES)
    for example, size in zip(examples, SIZES):
        grid = smart_resize_grid(processor, size)
        assert sum(t == processor.image_token_id for t in example.question_ids) == grid[1] * grid[2] // 4
        assert materialize(example.image)["image_grid_thw"].tolist() == [grid]
    features = [(ex.question_ids, [-100] * len(ex.question_ids), ex.image) for ex in examples]
    batch, _ = collate(features, latent_id=-1, pad_id=0)
    grids = [smart_resize_grid(processor, size) for size in SIZES]
    assert batch["image_grid_thw"].tolist() == grids
    assert batch["pixel_values"].shape == (sum(g[1] * g[2] for g in grids), 1536)


def test_the_choice_reaches_evaluation_and_the_settings_file(tmp_path):
    """data.image_resize parses to its choice; evaluation of the run and its exports' settings file follow it;
    a settings file written before the option existed reads as the square."""
    from ivtlr_jax.config import InferenceSettings, load_config
    from ivtlr_jax.eval.run import eval_config_from_run
    from ivtlr_jax.io.settings_file import SETTINGS_FILE, read_settings, write_settings
    from ivtlr_jax.models.common.images import ImageResize

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "data": {"image_resize": "processor"}}))
    cfg = load_config(path)
    assert cfg.data.image_resize is ImageResize.PROCESSOR
    assert eval_config_from_run(cfg, data=dict(source="s")).data.image_resize is ImageResize.PROCESSOR
    write_settings(tmp_path, InferenceSettings.from_run(cfg))
    assert read_settings(tmp_path).image_resize is ImageResize.PROCESSOR
    (tmp_path / SETTINGS_FILE).write_text('{"num_latents": 2}')
    assert read_settings(tmp_path).image_resize is ImageResize.SQUARE
