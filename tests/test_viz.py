"""The patch-selection picture: its size, and selected cells differ from unselected ones."""

import numpy as np

from ivtlr_jax.eval.viz import GAP, draw_selection


def test_selected_cells_are_coloured_and_panels_tile(tmp_path):
    image = np.full((280, 280, 3), 128, np.uint8)
    selections = [[0, 11, 99], [5, 6]]
    picture = draw_selection(image, (10, 10), selections)
    picture.save(tmp_path / "x.png")
    assert picture.size == (2 * 280 + GAP, 280)
    px = np.asarray(picture).astype(int)
    cell = lambda panel, idx: px[(idx // 10) * 28 + 14, panel * (280 + GAP) + (idx % 10) * 28 + 14]
    for panel, chosen in enumerate(selections):
        for idx in chosen:
            assert np.abs(cell(panel, idx) - 128).max() > 30, (panel, idx)
        for idx in set(range(100)) - set(chosen):
            assert (cell(panel, idx) == 128).all(), (panel, idx)
    assert not (cell(0, 0) == cell(0, 99)).all()  # ranked colours differ
