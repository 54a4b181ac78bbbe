"""Qwen2-VL's prompts and images as the official scripts make them (docs/method.md section 14)."""

from __future__ import annotations

import math

import numpy as np

from ..common.choices import parse
from ..common.images import ImageResize, decode_image, to_rgb

# docs/method.md section 2: images are resized to 280x280 = 20x20 patches of 14 = 100 merged image tokens
IMAGE_TOKENS = 100
MAX_LENGTH = 3400  # docs/method.md section 14: the official training script's total length cap
# the planner's official training batch: image tokens, p bound, collated length, image side in pixels
# the official setup: its batch shapes (the planner) and K, the patches selected per latent step
OFFICIAL_SHAPES = dict(patches=32, image_tokens=IMAGE_TOKENS, prefix=512, seq_len=1216, image_side=280)
PATCH_DIM = 1176  # 3 channels x 2 frames x 14 x 14 pixels per patch


class QwenEncoder:
    """Qwen2-VL: the prompt text is the user turn of the chat template (after its default system
    turn), image first; the image is converted to RGB and, with `resize` "square" (the official IVT-LR
    setting), resized to side x side (280 = 100 tokens) as qwen_vl_utils does; then the processor
    patchifies it and expands `<|image_pad|>`. With `resize` "processor" the RGB image goes to the processor
    as it is, which sizes it by its own rules (smart_resize: aspect kept, sides multiples of patch x merge,
    area within its min/max pixels), so each image has its own token count."""

    image_keys = ("pixel_values", "image_grid_thw")
    image_placeholder = ""  # the image is its own content item, before the text

    def __init__(self, processor, num_image_tokens: int | None = None, resize: ImageResize = ImageResize.SQUARE):
        self.processor = processor
        ip = processor.image_processor
        self.factor = int(ip.patch_size) * int(ip.merge_size)
        self.merge = int(ip.merge_size)
        self.resize = parse(ImageResize, resize, "image_resize")
        if self.resize == ImageResize.PROCESSOR:  # no square: each image's own size and token count
            if num_image_tokens is not None:
                raise ValueError(f"qwen2vl: num_image_tokens={num_image_tokens} sizes the square image; with "
                                 "image_resize 'processor' the processor's rules size each image")
            self.num_image_tokens = self.side = None
        else:
            self.num_image_tokens, self.side = self.square(IMAGE_TOKENS if num_image_tokens is None
                                                           else int(num_image_tokens))
        self.image_token = processor.image_token
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def square(self, n: int) -> tuple[int, int]:
        """(n, the square's side in pixels) for n image tokens: sqrt(n) merged patches a side (100 -> 280)."""
        m = math.isqrt(max(n, 0))
        if n < 1 or m * m != n:
            raise ValueError(f"qwen2vl: num_image_tokens={n} must be a perfect square (a square image of "
                             f"sqrt(n) x sqrt(n) merged patches)")
        return n, m * self.factor

    def _resized(self, picture):
        from PIL import Image

        rgb = to_rgb(picture)
        if self.resize == ImageResize.PROCESSOR:  # the processor's own do_resize sizes it
            return rgb
        return rgb.resize((self.side, self.side), Image.Resampling.BICUBIC)

    def process_image(self, data: bytes) -> dict[str, np.ndarray]:
        """Encoded bytes -> the processed arrays (one decode)."""
        return self.process_picture(decode_image(data))

    def process_picture(self, picture) -> dict[str, np.ndarray]:
        """A decoded PIL image (`decode_image`) -> the processed arrays."""
        out = self.processor.image_processor(images=[self._resized(picture)], return_tensors="np")
        return {"pixel_values": np.asarray(out["pixel_values"], np.float32),
                "image_grid_thw": np.asarray(out["image_grid_thw"], np.int64)}

    def prompt(self, text: str, picture) -> tuple[list[int], dict[str, np.ndarray]]:
        """The prompt's ids and processed image arrays; `picture`: the decoded PIL image (`decode_image`)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = self.processor(text=[chat], images=[self._resized(picture)], return_tensors="np")
        ids = [int(t) for t in np.asarray(out["input_ids"])[0]]
        image = {"pixel_values": np.asarray(out["pixel_values"], np.float32),
                 "image_grid_thw": np.asarray(out["image_grid_thw"], np.int64)}
        self._check_count(sum(t == self.image_token_id for t in ids), image)
        return ids, image

    def _check_count(self, count: int, image: dict[str, np.ndarray]) -> None:
        """The prompt's `count` image tokens are the image's: the square's n, or what its grid gives."""
        if self.resize == ImageResize.PROCESSOR:  # image_grid_thw [1, 3]: (t, h, w) patches, merge x merge a token
            expected = int(np.prod(image["image_grid_thw"])) // self.merge**2
            if count != expected:
                raise ValueError(f"qwen2vl: the prompt has {count} image tokens, its image grid "
                                 f"{image['image_grid_thw'].tolist()} gives {expected}")
        elif count != self.num_image_tokens:
            raise ValueError(f"qwen2vl: the prompt has {count} image tokens, expected {self.num_image_tokens} "
                             f"(image processor: min/max pixels or patch size do not give a {self.side}x{self.side} "
                             "image its full resolution)")

    def official_prompt(self, text: str, picture) -> tuple[list[int], dict[str, np.ndarray], list[int]]:
        """The official evaluation prompt has the training format's framing (chat template, image first)."""
        return *self.prompt(text, picture), []


ENCODER = QwenEncoder  # the family's encoder (see models.Family)


def picture_geometry(image: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, columns) of merged image tokens and (width, height) in pixels of a processed image
    (patches of 14 pixels, merged 2x2)."""
    _, gh, gw = (int(v) for v in np.asarray(image["image_grid_thw"]).reshape(-1, 3)[0])
    return (gh // 2, gw // 2), (gw * 14, gh * 14)


def image_shapes(rows: int, image_tokens: int, image_side: int) -> dict:
    """Shapes and dtypes of a batch's image arrays: one image per row, its patches stacked per image
    ([rows, patches, PATCH_DIM], see `data.collate.stack_images`), and its grid."""
    return {"pixel_values": ((rows, image_tokens * 4, PATCH_DIM), np.float32),
            "image_grid_thw": ((rows, 3), np.int32)}
