"""Qwen3-VL's prompts and images: Qwen2-VL's encoder (chat template, image first; by default a square image
resized to its token count, with `data.image_resize: processor` the processor's own smart_resize) with this
family's patch geometry: patches of 16 pixels, merged 2x2 (32 pixels a token), so 100 image tokens are a
320x320 image."""

from __future__ import annotations

import numpy as np

from ..qwen2vl.processing import MAX_LENGTH, QwenEncoder  # noqa: F401 (the family's MAX_LENGTH)

PATCH_SIDE = 16
IMAGE_TOKENS = 100
PATCH_DIM = 3 * 2 * PATCH_SIDE * PATCH_SIDE  # 3 channels x 2 frames x 16 x 16 pixels per patch
# K and the planner's batch as Qwen2-VL's official setup, with this family's image side (10 tokens of 32 pixels)
OFFICIAL_SHAPES = dict(patches=32, image_tokens=IMAGE_TOKENS, prefix=512, seq_len=1216, image_side=320)

ENCODER = QwenEncoder  # reads the patch and merge sizes from the processor; fixed square or the processor's rules


def picture_geometry(image: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, columns) of merged image tokens and (width, height) in pixels of a processed image
    (patches of 16 pixels, merged 2x2)."""
    _, gh, gw = (int(v) for v in np.asarray(image["image_grid_thw"]).reshape(-1, 3)[0])
    return (gh // 2, gw // 2), (gw * PATCH_SIDE, gh * PATCH_SIDE)


def image_shapes(rows: int, image_tokens: int, image_side: int) -> dict:
    """Shapes and dtypes of a batch's image arrays: one image per row, its patches stacked per image
    ([rows, patches, PATCH_DIM], see `data.collate.stack_images`), and its grid."""
    return {"pixel_values": ((rows, image_tokens * 4, PATCH_DIM), np.float32),
            "image_grid_thw": ((rows, 3), np.int32)}
