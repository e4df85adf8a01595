"""The one float -> uint8 pixel conversion."""

import numpy as np
import torch

from deepvis.pixels import to_uint8


def test_known_values_round_half_up_and_clip():
    x = np.array([-0.1, 0.0, 0.5 / 255, 1.49 / 255, 0.5, 1.0, 1.7], dtype=np.float32)
    assert to_uint8(x).tolist() == [0, 0, 1, 1, 128, 255, 255]


def test_scale_one_for_values_on_the_255_scale():
    x = np.array([[-3.0, 12.5, 254.4, 300.0]])
    out = to_uint8(x, scale=1.0)
    assert out.dtype == np.uint8 and out.shape == (1, 4)
    assert out.tolist() == [[0, 13, 254, 255]]


def test_tensor_input_matches_array_input():
    t = torch.linspace(-0.2, 1.2, 57).reshape(3, 19)
    assert np.array_equal(to_uint8(t), to_uint8(t.numpy()))
    assert to_uint8(t.requires_grad_()).shape == (3, 19)


def test_input_is_not_modified():
    x = np.array([0.25, 0.75], dtype=np.float32)
    to_uint8(x, scale=1.0)
    to_uint8(x)
    assert x.tolist() == [0.25, 0.75]


def test_float64_values_keep_their_precision():
    assert to_uint8(np.array([189.49999]), scale=1.0).tolist() == [189]
    assert to_uint8(np.array([189.49999 / 255])).tolist() == [189]
