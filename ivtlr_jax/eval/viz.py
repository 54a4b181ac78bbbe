"""Pictures of what the model looked at: the image once per latent step, with the patches selected at
that step drawn over it in ranked colours (rank 0 red ... last rank blue)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GAP = 4  # pixels between panels


def rank_colour(rank: int, count: int) -> tuple[int, int, int]:
    t = 0.0 if count <= 1 else rank / (count - 1)
    return int(255 * (1 - t)), int(64 * (1 - abs(2 * t - 1))), int(255 * t)


def draw_selection(image: np.ndarray, grid_hw: tuple[int, int], selections: list[list[int]],
                   alpha: float = 0.55) -> Image.Image:
    """image [H, W, 3] uint8 (as the model saw it, e.g. resized to 280x280); grid_hw: image tokens per
    column and row (Qwen2-VL: merged grid, e.g. 10x10; Chameleon: 32x32); selections: per latent step,
    the selected token indices within the image (row-major), in rank order. -> one panel per step."""
    h, w = image.shape[:2]
    gh, gw = grid_hw
    steps = max(len(selections), 1)
    canvas = Image.new("RGB", (steps * w + (steps - 1) * GAP, h), "white")
    for step, chosen in enumerate(selections or [[]]):
        panel = image.astype(np.float32).copy()
        for rank, index in enumerate(chosen):
            r, c = divmod(int(index), gw)
            y0, y1 = round(r * h / gh), round((r + 1) * h / gh)
            x0, x1 = round(c * w / gw), round((c + 1) * w / gw)
            panel[y0:y1, x0:x1] = (1 - alpha) * panel[y0:y1, x0:x1] + alpha * np.asarray(rank_colour(rank, len(chosen)))
        tile = Image.fromarray(panel.clip(0, 255).astype(np.uint8))
        ImageDraw.Draw(tile).text((3, 2), f"latent {step + 1}", fill=(255, 255, 255))
        canvas.paste(tile, (step * (w + GAP), 0))
    return canvas
