"""The layers pane: grid layout, tile placement, normalization and highlight with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepvis.errors import DeepvisError
from deepvis.render import apply_colormap, grid_shape, montage, normalize_activations, tile_grid, tile_origin
from deepvis.render.grid import HIGHLIGHT_COLOR, PAD_COLOR


@pytest.mark.parametrize(
    "n, shape", [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (5, (2, 3)), (10, (3, 4)), (80, (9, 9)), (96, (10, 10)), (1000, (32, 32))]
)
def test_grid_shape(n, shape):
    assert grid_shape(n) == shape


def test_tiles_are_placed_in_channel_order():
    acts = torch.zeros(5, 2, 3)
    for c in range(5):
        acts[c] = c + 1  # constant tiles 1..5, layer max 5
    g = tile_grid(acts, normalize="layer", pad=1)
    rows, cols = grid_shape(5)
    assert g.shape == (1 + rows * 3, 1 + cols * 4, 3)
    for c in range(5):
        y, x = tile_origin(c, (2, 3), cols, 1)
        expect = round((c + 1) / 5 * 255)
        assert (g[y : y + 2, x : x + 3] == expect).all()
    # the empty sixth slot and the padding keep the pad color
    y, x = tile_origin(5, (2, 3), cols, 1)
    assert (g[y : y + 2, x : x + 3] == PAD_COLOR).all()
    assert (g[0, :] == PAD_COLOR).all()


def test_layer_versus_channel_normalization():
    a = np.array([[[0.0, 1.0]], [[0.0, 4.0]]])  # two 1x2 channels, max 1 and 4
    layer = normalize_activations(a, "layer")
    chan = normalize_activations(a, "channel")
    assert np.allclose(layer, [[[0, 0.25]], [[0, 1]]])
    assert np.allclose(chan, [[[0, 1]], [[0, 1]]])
    signed = normalize_activations(np.array([[[-2.0, 0.0, 2.0]]]), "layer")
    assert np.allclose(signed, [[[0, 0.5, 1]]])
    assert np.allclose(normalize_activations(np.full((2, 2, 2), 3.0), "channel"), 1)
    assert np.allclose(normalize_activations(np.zeros((2, 2, 2)), "layer"), 0)
    with pytest.raises(DeepvisError):
        normalize_activations(a, "bogus")  # type: ignore[arg-type]


def test_fully_connected_layer_is_a_grid_of_cells():
    acts = torch.tensor([0.0, 2.0, 1.0])
    g = tile_grid(acts, cell=4, pad=1)
    assert g.shape == (1 + 2 * 5, 1 + 2 * 5, 3)
    y, x = tile_origin(1, (4, 4), 2, 1)
    assert (g[y : y + 4, x : x + 4] == 255).all()
    y, x = tile_origin(2, (4, 4), 2, 1)
    assert (g[y : y + 4, x : x + 4] == 128).all()


def test_highlight_frames_one_tile_and_scale_enlarges():
    acts = torch.rand(4, 3, 3)
    g = tile_grid(acts, highlight=3, pad=2, scale=2)
    th = tw = 6
    y, x = tile_origin(3, (th, tw), 2, 2)
    assert (g[y - 2 : y, x : x + tw] == HIGHLIGHT_COLOR).all()
    assert (g[y + th : y + th + 2, x : x + tw] == HIGHLIGHT_COLOR).all()
    y0, x0 = tile_origin(0, (th, tw), 2, 2)
    assert not (g[y0 - 2 : y0, x0 : x0 + tw] == HIGHLIGHT_COLOR).all()
    with pytest.raises(DeepvisError, match="out of range"):
        tile_grid(acts, highlight=4)


def test_colormaps():
    assert (apply_colormap(np.array([0.0, 1.0]), "gray") == [[0, 0, 0], [255, 255, 255]]).all()
    v = apply_colormap(np.array([0.0, 1.0]), "viridis")
    assert v[0].tolist() == [68, 1, 84] and v[1].tolist() == [253, 231, 37]
    with pytest.raises(DeepvisError, match="unknown colormap"):
        apply_colormap(np.zeros(2), "nope")


def test_montage_layout():
    ims = [np.full((4, 4, 3), i * 50, dtype=np.uint8) for i in range(5)]
    m = montage(ims, pad=1)
    assert m.size == (1 + 3 * 5, 1 + 2 * 5)
    assert m.getpixel((1 + 5 * 1, 1)) == (50, 50, 50)


def test_prefix_strip_is_on_the_grids_scale_in_channel_order():
    from deepvis.render import prefix_strip, stack_below, strip_geometry, strip_values
    from deepvis.render.strip import STRIP_ROW

    acts = torch.zeros(4, 2, 2)
    acts[:, 0, 0] = 2.0  # layer scale: 0..2
    prefix = torch.tensor([[1.0, 4.0], [0.5, -1.0], [2.0, 0.0], [0.0, 1.5]])  # (C=4, P=2)
    v = strip_values(prefix, acts, "layer")
    assert v.shape == (2, 4) and np.allclose(v, [[0.5, 0.25, 1.0, 0.0], [1.0, 0.0, 0.0, 0.75]])  # clipped to the grid's range
    per_channel = strip_values(prefix, acts * torch.arange(1, 5)[:, None, None], "channel")  # channel c's scale 0..2(c+1)
    assert np.allclose(per_channel[0], [0.5, 0.5 / 4, 2.0 / 6, 0.0])
    img = prefix_strip(v, ["cls", "dist"], width=80, highlight=None)
    x0, cw = strip_geometry(["cls", "dist"], 4, 80)
    assert img.shape == (1 + 2 * (STRIP_ROW + 1), 80, 3)
    for k in range(2):
        y = 1 + k * (STRIP_ROW + 1) + STRIP_ROW // 2
        assert [int(img[y, x0 + c * cw + cw // 2, 0]) for c in range(4)] == [int(round(float(a) * 255 + 1e-9)) for a in v[k]]
    both = stack_below(np.zeros((5, 70, 3), np.uint8), img)
    assert both.shape == (5 + 2 + img.shape[0], 80, 3) and tuple(both[0, 75]) == PAD_COLOR
    with pytest.raises(DeepvisError, match="2 prefix rows but 1 names"):
        prefix_strip(v, ["cls"], width=80)
