"""Pictures of what the model looked at: one PNG per example that reads without the code.

Layout, top to bottom:
- a text band: the example id, the question, the choices, the generated text (shortened), the
  prediction against the gold answer (correct / incorrect, strict scoring; the official scoring too);
- one panel per latent step i, titled "latent step i: K patches attended from the position before
  latent i": the image as the model saw it, each selected patch outlined with a black-white-black
  line (visible on any image colour) and its rank within the step (1 = highest attention score)
  written in white on a black box in the patch's top-left corner. A patch that an earlier step had
  already selected (the filler used when fewer than K unselected patches are left, docs/method.md section 6, step 4) has
  a grey box instead. With `patch_order=position` the insertion order is not the score order, so no
  ranks are written;
- a legend explaining the outline and the numbers.

PIL only (its default font at a given size where the installed Pillow has one, >= 10.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 16  # pixels between panels
MARGIN = 12  # pixels around everything
OUTLINE = 3  # outline width in pixels: black, white, black
MIN_CELL = 24  # panels are enlarged so that a patch is at least this many pixels wide
MIN_PANEL = 280  # ... and a panel at least this wide
MIN_WIDTH = 760  # the picture is at least this wide (room for the text)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)
GOOD = (0, 120, 40)
BAD = (190, 20, 20)
LABEL_BOX = (0, 0, 0)
FILLER_BOX = (100, 100, 100)
LABEL_TEXT = (255, 255, 255)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def text_width(text: str, fnt) -> float:
    return fnt.getlength(text) if hasattr(fnt, "getlength") else 6 * len(text)


def line_height(fnt) -> int:
    box = fnt.getbbox("Ag(|")
    return int(box[3] - min(box[1], 0)) + 4


def wrap(text: str, fnt, width: float, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are cut; at most `max_lines` lines
    (the last one ending in '...')."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if text_width(candidate, fnt) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while text_width(word, fnt) > width:  # a word wider than the line
                cut = max(1, int(len(word) * width / text_width(word, fnt)) - 1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and text_width(last + " ...", fnt) > width:
            last = last[:-1]
        lines[-1] = last + " ..."
    return lines


def answer_label(value, choices: Sequence[str] | None = None) -> str:
    """A prediction or gold answer as a letter (with its choice text when known); None / -1: none."""
    if value is None or value == -1:
        return "none (no answer found)"
    letter = chr(65 + value) if isinstance(value, (int, np.integer)) else str(value)
    index = ord(letter) - 65 if len(letter) == 1 and letter.isalpha() else -1
    if choices and 0 <= index < len(choices):
        return f"{letter} ({choices[index]})"
    return letter


@dataclasses.dataclass
class SelectionPicture:
    """The rendered picture and where things are in it (for tests and callers that crop)."""

    image: Image.Image
    panels: list[tuple[int, int, int, int]]  # (x0, y0, x1, y1) of each step's image, x1/y1 exclusive
    grid_hw: tuple[int, int]
    text_box: tuple[int, int, int, int]  # the question / answer band
    legend_box: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def save(self, path) -> None:
        self.image.save(path)

    def cell_box(self, step: int, index: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of image token `index` (row-major) in panel `step`, x1/y1 exclusive."""
        x0, y0, x1, y1 = self.panels[step]
        gh, gw = self.grid_hw
        r, c = divmod(int(index), gw)
        return (x0 + round(c * (x1 - x0) / gw), y0 + round(r * (y1 - y0) / gh),
                x0 + round((c + 1) * (x1 - x0) / gw), y0 + round((r + 1) * (y1 - y0) / gh))


def outline_cell(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    """A black-white-black outline drawn just inside the cell: the white line shows on dark content,
    the black lines on light content."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 0, 0), width=OUTLINE)
    draw.rectangle((x0 + 1, y0 + 1, x1 - 2, y1 - 2), outline=(255, 255, 255), width=1)


def rank_label(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, fnt, fill) -> None:
    """`text` in white on a dark box in the cell's top-left corner, inside the outline."""
    x0, y0, _, _ = box
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    bx, by = x0 + OUTLINE, y0 + OUTLINE
    draw.rectangle((bx, by, bx + (right - left) + 3, by + (bottom - top) + 3), fill=fill)
    draw.text((bx + 2 - left, by + 2 - top), text, font=fnt, fill=LABEL_TEXT)


def picture_as_seen(data: bytes | None, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8: the encoded image in RGB, resized to the model's view `size` (width, height); a grey
    picture when there is no image."""
    if data is None:
        return np.full((size[1], size[0], 3), 127, np.uint8)
    from ..data import decode_image

    return np.asarray(decode_image(data).convert("RGB").resize(size))


def draw_selection(image: np.ndarray, grid_hw: tuple[int, int], selections: list[list[int]], *,
                   question: str | None = None, choices: Sequence[str] | None = None, prediction=None, gold=None,
                   correct: bool | None = None, correct_official: bool | None = None, generated: str | None = None,
                   title: str | None = None, ranked: bool = True) -> SelectionPicture:
    """image [H, W, 3] uint8 as the model saw it (e.g. resized to 280x280); grid_hw: image tokens per
    column and row (Qwen2-VL: the merged grid, e.g. 10x10; Chameleon: 32x32); selections: per latent
    step, the selected token indices within the image (row-major), in insertion order (descending
    score when `ranked`, i.e. `patch_order=score`). The text arguments fill the band above the panels."""
    h, w = image.shape[:2]
    gh, gw = grid_hw
    scale = max(1.0, MIN_CELL / min(h / gh, w / gw), MIN_PANEL / w)
    pw, ph = round(w * scale), round(h * scale)
    tile = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    if (pw, ph) != (w, h):
        tile = tile.resize((pw, ph), Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC)
    steps = selections or []
    n = max(len(steps), 1)
    width = max(2 * MARGIN + n * pw + (n - 1) * GAP, MIN_WIDTH)
    inner = width - 2 * MARGIN
    small = font(13)
    band = text_band(inner, title=title, question=question, choices=choices, generated=generated,
                     prediction=prediction, gold=gold, correct=correct, correct_official=correct_official)
    text_h = sum(line_height(f) for _, f, _ in band)
    titles = [wrap(f"latent step {i + 1}: {len(chosen)} patches attended from the position before latent {i + 1}",
                   small, pw) for i, chosen in enumerate(steps)]
    title_h = max((len(t) for t in titles), default=0) * line_height(small)
    legend_text = [line for item in legend_lines(steps, ranked) for line in wrap(item, small, inner - 40)]
    legend_h = max(len(legend_text) * line_height(small), 32)

    height = MARGIN + text_h + (MARGIN if band else 0) + title_h + ph + MARGIN + legend_h + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for line, fnt, colour in band:
        draw.text((MARGIN, y), line, font=fnt, fill=colour)
        y += line_height(fnt)
    text_box = (0, 0, width, y)
    y += MARGIN if band else 0
    if band:
        draw.line((MARGIN, y - MARGIN // 2, width - MARGIN, y - MARGIN // 2), fill=(200, 200, 200), width=1)

    panels = []
    for i in range(n):
        x = MARGIN + i * (pw + GAP)
        for j, line in enumerate(titles[i] if i < len(titles) else []):
            draw.text((x, y + j * line_height(small)), line, font=small, fill=TEXT)
        top = y + title_h
        canvas.paste(tile, (x, top))
        panels.append((x, top, x + pw, top + ph))
    picture = SelectionPicture(canvas, panels, (gh, gw), text_box, (0, 0, 0, 0))
    mark_selections(draw, picture, steps, ranked, font(max(9, min(16, int(min(ph / gh, pw / gw) * 0.5)))))
    picture.legend_box = draw_legend(draw, panels[0][3] + MARGIN, width, legend_text, legend_h, ranked)
    return picture


def text_band(inner: int, *, title, question, choices, generated, prediction, gold, correct,
              correct_official) -> list[tuple[str, object, tuple[int, int, int]]]:
    """The lines (text, font, colour) above the panels: title, question, choices, generated text, verdict."""
    big, body, small = font(18), font(14), font(13)
    band: list[tuple[str, object, tuple[int, int, int]]] = []
    if title:
        band.append((title, big, TEXT))
    if question is not None:
        band += [(line, body, TEXT) for line in wrap(f"Question: {question}", body, inner, 6)]
    if choices:
        options = "   ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
        band += [(line, body, TEXT) for line in wrap(f"Choices: {options}", body, inner, 4)]
    if generated is not None:
        band += [(line, small, MUTED) for line in wrap(f"Generated: {generated}", small, inner, 3)]
    if gold is not None or prediction is not None:
        verdict = "" if correct is None else ("CORRECT" if correct else "INCORRECT")
        line = f"Prediction: {answer_label(prediction, choices)}    Gold: {answer_label(gold, choices)}"
        band.append((f"{line}    {verdict}".rstrip(), big, TEXT if correct is None else (GOOD if correct else BAD)))
        if correct_official is not None:
            band.append((f"(verdict of the strict scoring; the official scoring says "
                         f"{'correct' if correct_official else 'incorrect'})", small, MUTED))
    return band


def legend_lines(steps: list[list[int]], ranked: bool) -> list[str]:
    """What the marks mean: outlines, rank numbers (or raster order), filler boxes where there are any."""
    any_filler = any(set(chosen) & {p for earlier in steps[:i] for p in earlier} for i, chosen in enumerate(steps))
    lines = ["outlined square (black-white-black): an image patch selected at that step and inserted before the latent"]
    if ranked:
        lines.append("number on a black box: the patch's rank within the step (1 = highest attention score)")
    else:
        lines.append("patch_order=position: patches were inserted in raster order; score ranks not shown")
    if any_filler:
        lines.append("grey box: a patch already selected at an earlier step (filler: fewer than K "
                     "unselected patches were left)")
    return lines


def mark_selections(draw: ImageDraw.ImageDraw, picture: SelectionPicture, steps: list[list[int]], ranked: bool,
                    label_font) -> None:
    """Outline each step's patches in its panel, then label them: rank numbers, and fillers (patches chosen at
    an earlier step) in grey."""
    for i, chosen in enumerate(steps):
        earlier = {int(p) for s in steps[:i] for p in s}
        boxes = [picture.cell_box(i, index) for index in chosen]
        for box in boxes:  # all outlines first, then the labels on top
            outline_cell(draw, box)
        if ranked or earlier:
            for rank, (index, box) in enumerate(zip(chosen, boxes)):
                filler = int(index) in earlier
                if ranked or filler:
                    rank_label(draw, box, str(rank + 1) if ranked else "f", label_font,
                               FILLER_BOX if filler else LABEL_BOX)


def draw_legend(draw: ImageDraw.ImageDraw, top: int, width: int, lines: list[str], height: int,
                ranked: bool) -> tuple[int, int, int, int]:
    """A sample outlined cell with a label, then the explanations -> the legend's box."""
    side, small = 30, font(13)
    sample = (MARGIN, top, MARGIN + side, top + side)
    draw.rectangle(sample, fill=(170, 190, 210))
    outline_cell(draw, sample)
    if ranked:
        rank_label(draw, sample, "1", font(13), LABEL_BOX)
    for j, line in enumerate(lines):
        draw.text((MARGIN + side + 10, top + j * line_height(small)), line, font=small, fill=TEXT)
    return (0, top, width, top + height)
