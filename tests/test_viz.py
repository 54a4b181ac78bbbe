"""The patch-selection picture: one panel per latent step with the expected size, selected patches outlined
with a line that stands out on any image colour, ranks on dark boxes, a text band and a legend."""

import numpy as np
import pytest

from ivtlr_jax.eval.viz import GOOD, BAD, OUTLINE, draw_selection

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def picture_on(colour, selections=([44, 45, 0], [9, 44]), **kw):
    image = np.full((280, 280, 3), colour, np.uint8)
    kw = {"question": "What colour is the large circle?", "choices": ["red", "green", "blue", "yellow"],
          "prediction": "C", "gold": "B", "correct": False, "correct_official": False, **kw}
    return draw_selection(image, (10, 10), [list(s) for s in selections], **kw)


def test_one_panel_per_step_with_the_image_text_band_and_legend():
    picture = picture_on((128, 128, 128))
    px = np.asarray(picture.image).astype(int)
    assert len(picture.panels) == 2
    for x0, y0, x1, y1 in picture.panels:
        assert (x1 - x0, y1 - y0) == (280, 280)  # 28-pixel patches: no enlargement
    (ax0, _, ax1, _), (bx0, _, _, _) = picture.panels
    assert bx0 > ax1 and picture.size[0] >= 2 * 280
    # unselected patches are the image as is; panels sit below the text band, the legend below them
    for step, chosen in enumerate(([44, 45, 0], [9, 44])):
        for index in set(range(100)) - set(chosen):
            x0, y0, x1, y1 = picture.cell_box(step, index)
            assert (px[y0:y1, x0:x1] == 128).all(), (step, index)
    tx0, ty0, tx1, ty1 = picture.text_box
    assert ty1 - ty0 > 60 and ty1 <= picture.panels[0][1]
    band = px[ty0:ty1, tx0:tx1]
    assert (band.max(-1) < 100).sum() > 500  # dark text on white
    assert (np.abs(band - np.asarray(BAD)).max(-1) < 10).sum() > 50  # "INCORRECT" in red
    lx0, ly0, lx1, ly1 = picture.legend_box
    assert ly0 >= picture.panels[0][3] and (px[ly0:ly1, lx0:lx1].max(-1) < 100).sum() > 300
    right = np.asarray(picture_on((128, 128, 128), prediction="B", correct=True).image).astype(int)
    assert (np.abs(right - np.asarray(GOOD)).max(-1) < 10).sum() > 50  # "CORRECT" in green


@pytest.mark.parametrize("colour", [(220, 30, 30), (30, 70, 220), WHITE, BLACK, (128, 128, 128)])
def test_outline_stands_out_on_any_image_colour(colour):
    picture = picture_on(colour)
    px = np.asarray(picture.image).astype(int)
    for step, chosen in enumerate(([44, 45, 0], [9, 44])):
        for index in chosen:
            x0, y0, x1, y1 = picture.cell_box(step, index)
            interior = px[y1 - 8, x1 - 8]  # inside the outline, away from the rank label
            assert (interior == colour).all()
            sides = {"top": px[y0:y0 + OUTLINE, x0:x1], "bottom": px[y1 - OUTLINE:y1, x0:x1],
                     "left": px[y0:y1, x0:x0 + OUTLINE], "right": px[y0:y1, x1 - OUTLINE:x1]}
            for side, ring in sides.items():
                # every side has a line as far from the image colour as a colour can be (black on light,
                # white on dark; >= 200 of 255 on red, blue, white and black)
                farthest = np.maximum(interior, 255 - interior).max()
                assert np.abs(ring - interior).max(-1).max() >= max(0.95 * farthest, 120), (colour, index, side)
                assert (ring == BLACK).all(-1).any() and (ring == WHITE).all(-1).any(), (colour, side)


def test_rank_labels_white_on_a_dark_box_and_none_for_raster_order():
    picture = picture_on(WHITE)
    px = np.asarray(picture.image).astype(int)
    x0, y0, _, _ = picture.cell_box(0, 44)
    label = px[y0 + OUTLINE:y0 + OUTLINE + 12, x0 + OUTLINE:x0 + OUTLINE + 10]
    assert (label == BLACK).all(-1).mean() > 0.4 and (label.min(-1) > 200).any()  # "1": light text on black
    raster = np.asarray(picture_on(WHITE, ranked=False).image).astype(int)
    inside = raster[y0 + OUTLINE:y0 + 24, x0 + OUTLINE:x0 + 24]
    assert (inside == WHITE).all()  # no numbers when the insertion order is not the score order
    # a patch chosen again at a later step (the filler) gets a grey box, not a black one
    again = np.asarray(picture_on(WHITE, selections=([44], [45, 44])).image).astype(int)
    gx0, gy0, _, _ = picture_on(WHITE, selections=([44], [45, 44])).cell_box(1, 44)
    box = again[gy0 + OUTLINE:gy0 + OUTLINE + 4, gx0 + OUTLINE:gx0 + OUTLINE + 3]
    assert (np.abs(box - 100) < 5).all()


def test_small_patches_are_enlarged_to_stay_readable():
    image = np.zeros((512, 512, 3), np.uint8)  # Chameleon: 32 x 32 patches of 16 pixels
    picture = draw_selection(image, (32, 32), [[0, 1023], [5]])
    x0, y0, x1, y1 = picture.panels[0]
    assert x1 - x0 == y1 - y0 >= 32 * 24
    cx0, cy0, cx1, cy1 = picture.cell_box(0, 1023)
    assert (cx1, cy1) == (x1, y1) and cx1 - cx0 >= 24
