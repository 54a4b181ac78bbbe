"""Chameleon's prompts and images as the official scripts make them (docs/method.md section 14)."""

from __future__ import annotations

import numpy as np

from ..common.choices import parse
from ..common.images import ImageResize, blend_rgba, decode_image, tokenizer_of

MAX_LENGTH = 1400  # docs/method.md section 14: the official training script's total length cap
# the planner's official training batch: 1024 image tokens of a 512x512 image, p bound, collated length
# the official setup: its batch shapes (the planner) and K, the patches selected per latent step
OFFICIAL_SHAPES = dict(patches=64, image_tokens=1024, prefix=1152, seq_len=1408, image_side=512)


class ChameleonEncoder:
    """Chameleon: no chat format; `<image>` x N (N = processor.image_seq_length, 1024 for 7B) sits at
    the start of the question inside its braces; the image goes through the processor's image
    processor (512x512 for 7B) after `blend_rgba` (transformers 4.51.3's alpha blend, whatever
    transformers is installed) and the prompt through the tokenizer without special tokens."""

    image_keys = ("pixel_values",)

    def __init__(self, processor, num_image_tokens: int | None = None, resize: ImageResize = ImageResize.SQUARE):
        parse(ImageResize, resize, "image_resize")  # either: the processor's own rules make a fixed square
        self.processor = processor
        n = getattr(processor, "image_seq_length", 1024) if num_image_tokens is None else int(num_image_tokens)
        self.num_image_tokens = int(n)
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_placeholder = self.image_token * self.num_image_tokens
        self.image_token_id = tokenizer_of(processor).convert_tokens_to_ids(self.image_token)

    def process_image(self, data: bytes) -> dict[str, np.ndarray]:
        """Encoded bytes -> the processed arrays (one decode)."""
        return self.process_picture(decode_image(data))

    def process_picture(self, picture) -> dict[str, np.ndarray]:
        """A decoded PIL image (`decode_image`) -> the processed arrays."""
        out = self.processor.image_processor(images=[blend_rgba(picture)], return_tensors="np")
        return {"pixel_values": np.asarray(out["pixel_values"], np.float32)[0]}

    def prompt(self, text: str, picture) -> tuple[list[int], dict[str, np.ndarray]]:
        """The prompt's ids and processed image arrays; `picture`: the decoded PIL image (`decode_image`)."""
        image = self.process_picture(picture)
        ids = tokenizer_of(self.processor).encode(text, add_special_tokens=False)
        count = sum(t == self.image_token_id for t in ids)
        if count != self.num_image_tokens:
            raise ValueError(f"chameleon: the prompt has {count} image tokens, expected {self.num_image_tokens} "
                             "(is the image token a special token of the tokenizer?)")
        return list(ids), image

    def official_prompt(self, text: str, picture) -> tuple[list[int], dict[str, np.ndarray], list[int]]:
        """The official evaluation framing (what `ChameleonProcessor` makes of `"<image>" + text + latents`):
        BOS, image start `<racm3:break>`, `<image>` x N, image end `<eoss>`, the text; the processor's
        separator (`<reserved08706>`) follows the latents. -> (ids before the latents, image, [separator])."""
        tok = tokenizer_of(self.processor)
        start = getattr(self.processor, "image_start_token", "<racm3:break>")
        end = getattr(self.processor, "image_end_token", "<eoss>")
        unknown = lambda t: t is None or tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)  # noqa: E731
        missing = [t for t in (start, end, tok.sep_token) if unknown(t)]
        if missing or tok.bos_token_id is None:
            raise ValueError(f"chameleon official prompt format: the tokenizer lacks {missing or ['a BOS token']} "
                             "(image start/end markers, separator)")
        ids = list(tok.encode(start + self.image_placeholder + end + text, add_special_tokens=False))
        ids = [tok.bos_token_id] + ids
        count = sum(t == self.image_token_id for t in ids)
        if count != self.num_image_tokens:
            raise ValueError(f"chameleon: the prompt has {count} image tokens, expected {self.num_image_tokens}")
        return ids, self.process_picture(picture), [tok.convert_tokens_to_ids(tok.sep_token)]


ENCODER = ChameleonEncoder  # the family's encoder (see models.Family)


def picture_geometry(image: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, columns) of image tokens and (width, height) in pixels of a processed image [3, H, W]
    (one token per 16x16 pixels of the VQ grid)."""
    side = image["pixel_values"].shape[-1]
    return (side // 16, side // 16), (side, side)


def image_shapes(rows: int, image_tokens: int, image_side: int) -> dict:
    """Shapes and dtypes of a batch's image arrays: one [3, H, W] image per row."""
    return {"pixel_values": ((rows, 3, image_side, image_side), np.float32)}
