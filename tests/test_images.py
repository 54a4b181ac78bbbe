"""Chameleon's conversion of transparent images (docs/method.md section 14): transformers 4.51.3's
`ChameleonImageProcessor.blend_rgba`, done before the processor so that image codes do not depend on
the installed transformers. Expected pixels come from a numpy transcription of the 4.51.3 formula
applied to hand-built arrays, not from the code under test."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ivtlr_jax.models.chameleon.processing import ChameleonEncoder
from ivtlr_jax.models.common.images import blend_rgba, decode_image
from ivtlr_jax.data.tokenizer import build_tiny_chameleon_processor


# ---- REFERENCE: transformers 4.51.3, ChameleonImageProcessor.blend_rgba, on an [H, W, 4] uint8 array ----------
def reference_blend(img_rgba: np.ndarray) -> np.ndarray:
    if not (img_rgba[:, :, 3] < 255).any():
        return img_rgba[:, :, :3]
    alpha = img_rgba[:, :, 3] / 255.0
    img_rgb = (1 - alpha[:, :, np.newaxis]) * 255 + alpha[:, :, np.newaxis] * img_rgba[:, :, :3]
    return img_rgb.astype("uint8")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def random_rgba(h=32, w=40, seed=0) -> np.ndarray:
    """[h, w, 4] uint8 with every alpha value 0..255 present and random colours."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3].flat[:256] = np.arange(256, dtype=np.uint8)
    return rgba


def test_rgba_blend_equals_the_4_51_3_formula():
    rgba = random_rgba()
    out = blend_rgba(decode_image(png_bytes(Image.fromarray(rgba, "RGBA"))))
    assert out.mode == "RGB" and "transparency" not in out.info
    np.testing.assert_array_equal(np.asarray(out), reference_blend(rgba))
    # a few values by hand: alpha 0 -> white, 255 -> the colour, 128 on black -> int(127/255 * 255)
    probe = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
    blended = np.asarray(blend_rgba(Image.fromarray(probe, "RGBA")))
    assert blended[0, 0].tolist() == [255, 255, 255] and blended[0, 1].tolist() == [10, 20, 30]
    assert blended[0, 2].tolist() == [int((1 - 128 / 255) * 255)] * 3
    # fully opaque RGBA: the colours unchanged
    opaque = rgba.copy()
    opaque[..., 3] = 255
    np.testing.assert_array_equal(np.asarray(blend_rgba(Image.fromarray(opaque, "RGBA"))), opaque[..., :3])


def test_la_and_palette_transparency_are_blended_alike():
    """4.51.3 sends every mode but RGB through RGBA: LA (grey + alpha) and a palette image with a
    per-index alpha table (PNG tRNS) are blended by the same formula."""
    rng = np.random.default_rng(1)
    la = rng.integers(0, 256, (16, 16, 2), dtype=np.uint8)
    la[..., 1].flat[:256] = np.arange(256, dtype=np.uint8)
    as_rgba = np.concatenate([la[..., :1].repeat(3, axis=-1), la[..., 1:]], axis=-1)  # grey replicated
    out = blend_rgba(decode_image(png_bytes(Image.fromarray(la, "LA"))))
    np.testing.assert_array_equal(np.asarray(out), reference_blend(as_rgba))

    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    trns = rng.integers(0, 256, 256, dtype=np.uint8)
    index = rng.integers(0, 256, (16, 24), dtype=np.uint8)
    p = Image.fromarray(index, "L").convert("P")  # keeps the indices
    p.putpalette(palette.tobytes())
    p.info["transparency"] = trns.tobytes()
    decoded = decode_image(png_bytes(p))
    assert decoded.mode == "P" and "transparency" in decoded.info
    as_rgba = np.concatenate([palette[index], trns[index][..., None]], axis=-1)
    np.testing.assert_array_equal(np.asarray(blend_rgba(decoded)), reference_blend(as_rgba))


@pytest.fixture(scope="module")
def cham_encoder(tmp_path_factory):
    processor = build_tiny_chameleon_processor(tmp_path_factory.mktemp("cham"), ["a b c", "the answer is 1"],
                                               vocab_size=300, image_size=32, image_seq_length=4)
    return ChameleonEncoder(processor)


def test_chameleon_pixels_never_reach_the_processors_alpha_handling(cham_encoder):
    """Pixel values of transparent images equal those of the processor given the already-blended RGB:
    the installed processor's own compositing (transformers 5.x rounds where 4.51.3 truncates) is never
    used. Also an RGB PNG with a colour key (tRNS): 4.51.3 ignores the key, so its pixels stay as they are."""
    ip = cham_encoder.processor.image_processor
    pixels = lambda rgb: ip(images=[Image.fromarray(rgb, "RGB")], return_tensors="np")["pixel_values"][0]  # [3, H, W]

    rgba = random_rgba(40, 48, seed=2)
    got = cham_encoder.process_image(png_bytes(Image.fromarray(rgba, "RGBA")))["pixel_values"]
    np.testing.assert_array_equal(got, pixels(reference_blend(rgba)))

    rgb = random_rgba(32, 32, seed=3)[..., :3].copy()
    rgb[:8] = (7, 8, 9)  # the key colour
    keyed = Image.fromarray(rgb, "RGB")
    keyed.info["transparency"] = (7, 8, 9)
    data = png_bytes(keyed)
    assert decode_image(data).info.get("transparency") == (7, 8, 9)
    np.testing.assert_array_equal(cham_encoder.process_image(data)["pixel_values"], pixels(rgb))


# ---- REFERENCE: the Qwen family's official path, transcribed from the sources of `datasets.Image` decoding,
# qwen_vl_utils 0.0.14 (`fetch_image` with resized_height/width, `to_rgb`) and transformers 4.51.3's image
# processor (`convert_to_rgb`, then `to_numpy_array`) ------------------------------------------------------
def official_qwen_rgb(data: bytes, side: int) -> np.ndarray:
    from PIL import ImageOps

    image = Image.open(io.BytesIO(data))  # datasets.Image: open, load, EXIF orientation applied
    image.load()
    if image.getexif().get(0x0112) is not None:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGBA":  # qwen_vl_utils.to_rgb
        white_background = Image.new("RGB", image.size, (255, 255, 255))
        white_background.paste(image, mask=image.split()[3])
        image = white_background
    else:
        image = image.convert("RGB")
    image = image.resize((side, side))  # fetch_image: PIL's default resampling
    if image.mode != "RGB":  # 4.51.3 convert_to_rgb: an RGB image is returned as it is
        image = image.convert("RGB")
    return np.array(image)  # 4.51.3 to_numpy_array


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def transparent_and_other_images() -> dict[str, bytes]:
    """Every PIL mode a dataset image arrives in, with and without a transparency entry; each transparent
    colour is used by many pixels and is far from white."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)
    rgb[:6] = (200, 10, 30)  # the key colour of the keyed images below
    grey = rgb[..., 0].copy()
    index = rng.integers(0, 16, (18, 22), dtype=np.uint8)
    index[:6] = 3  # the transparent index
    palette = rng.integers(0, 200, (16, 3), dtype=np.uint8)

    def paletted(transparency=None):
        p = Image.fromarray(index, "L").convert("P")
        p.putpalette(palette.tobytes())
        if transparency is not None:
            p.info["transparency"] = transparency
        return p

    keyed_rgb, keyed_l = Image.fromarray(rgb, "RGB"), Image.fromarray(grey, "L")
    keyed_rgb.info["transparency"], keyed_l.info["transparency"] = (200, 10, 30), 200
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    return {
        "RGB": encoded(Image.fromarray(rgb, "RGB")),
        "RGBA": encoded(Image.fromarray(random_rgba(18, 22, seed=8), "RGBA")),
        "LA": encoded(Image.fromarray(random_rgba(18, 22, seed=9)[..., 2:], "LA")),
        "L": encoded(Image.fromarray(grey, "L")),
        "1": encoded(Image.fromarray(grey > 128)),
        "P": encoded(paletted()),
        "P, transparent index": encoded(paletted(3)),
        "P, alpha table": encoded(paletted(rng.integers(0, 256, 16, dtype=np.uint8).tobytes())),
        "RGB, transparent colour": encoded(keyed_rgb),
        "L, transparent colour": encoded(keyed_l),
        "CMYK": encoded(Image.fromarray(rgb, "RGB").convert("CMYK"), "JPEG"),
        "I;16": encoded(Image.fromarray(grey.astype(np.uint16) * 257)),
        "WEBP": encoded(Image.fromarray(random_rgba(18, 22, seed=10), "RGBA"), "WEBP", lossless=True),
        "GIF, transparent index": encoded(paletted(3), "GIF", transparency=3),
        "JPEG, EXIF-rotated": encoded(Image.fromarray(rgb, "RGB"), "JPEG", exif=exif),
    }


@pytest.fixture(scope="module")
def qwen_encoder(tmp_path_factory):
    from ivtlr_jax.data.tokenizer import build_tiny_qwen2vl_processor
    from ivtlr_jax.models.qwen2vl.processing import QwenEncoder

    processor = build_tiny_qwen2vl_processor(tmp_path_factory.mktemp("qwen"), ["a b c", "the answer is 1"],
                                             vocab_size=300)
    return QwenEncoder(processor, num_image_tokens=4)


@pytest.mark.filterwarnings("ignore:Palette images with Transparency expressed in bytes")
@pytest.mark.parametrize("kind", list(transparent_and_other_images()))
def test_qwen_images_are_converted_as_the_official_path_does(qwen_encoder, kind):
    """The pixel values of training and evaluation prompts equal those of the installed processor given
    the official path's RGB array (which carries no transparency entry for it to handle): a transparent
    palette index or colour keeps its colour (transformers 5's own conversion paints it white)."""
    data = transparent_and_other_images()[kind]
    ip = qwen_encoder.processor.image_processor
    expected = ip(images=[official_qwen_rgb(data, qwen_encoder.side)], return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(qwen_encoder.process_image(data)["pixel_values"], expected)
    _, prompt_image = qwen_encoder.prompt("what is it?", decode_image(data))
    np.testing.assert_array_equal(prompt_image["pixel_values"], expected)
