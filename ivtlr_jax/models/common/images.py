"""Image and tokenizer helpers every family's processing shares: decoding as `datasets.Image` does and
the two official conversions to RGB (qwen_vl_utils' for the Qwen family, transformers 4.51.3's alpha blend
for Chameleon), each giving a plain RGB image that no installed processor converts again."""

from __future__ import annotations

import enum
import io

import numpy as np


class ImageResize(enum.StrEnum):
    """How a Qwen-family encoder sizes an image before its processor patchifies it (`data.image_resize`).
    Chameleon's processor makes its own fixed square either way (shortest edge, then a centre crop)."""
    SQUARE = "square"  # official IVT-LR: a fixed side x side square, the same token count for every image
    PROCESSOR = "processor"  # the processor's own rules: smart_resize (aspect kept, sides multiples of
    # patch x merge, area within the processor's min/max pixels), so the token count follows the image


def decode_image(data: bytes):
    """bytes -> PIL image, exactly as `datasets.Image` decodes (load, EXIF orientation applied)."""
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(data))
    image.load()
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image


def to_rgb(image):
    """The Qwen family's conversion to RGB, as the official path makes it: qwen_vl_utils' `to_rgb` (RGBA
    composited onto white through its alpha, every other mode converted with PIL, so a transparent
    palette index or colour keeps its colour), then transformers 4.51.3's `convert_to_rgb`, which leaves
    an RGB image as it is. The result is a plain RGB image without a "transparency" entry: PIL's
    conversion carries a transparent colour over as that entry, and transformers 5's `convert_to_rgb`
    would paint those pixels white."""
    from PIL import Image

    if image.mode == "RGBA":
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(image, mask=image.split()[3])
    else:
        rgb = image.convert("RGB")
    return Image.fromarray(np.asarray(rgb))


def blend_rgba(image):
    """Chameleon's conversion to RGB: transformers 4.51.3's `ChameleonImageProcessor.blend_rgba`, which the
    official code ran (docs/method.md section 14). Any mode but RGB goes through RGBA; when some alpha is below 255 it
    is blended onto white in float64, (1 - a) * 255 + a * rgb with a = alpha / 255, truncated to uint8
    (this covers RGBA, LA and palette images with transparency alike). The result is a plain RGB image
    without a "transparency" entry, so no processor applies its own alpha handling afterwards."""
    from PIL import Image

    if image.mode == "RGB":
        rgb = np.asarray(image)  # [H, W, 3]; a tRNS colour key is ignored, as 4.51.3 does
    else:
        rgba = np.array(image.convert("RGBA"))  # [H, W, 4] uint8
        if not (rgba[:, :, 3] < 255).any():
            rgb = np.asarray(image.convert("RGB"))
        else:
            alpha = rgba[:, :, 3:] / 255.0  # [H, W, 1] float64
            rgb = ((1 - alpha) * 255 + alpha * rgba[:, :, :3]).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb))


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)
