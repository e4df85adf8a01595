"""Public helpers take tensors on any device and make their own tensors there (meta stands in for CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from deepvis.backprop.filters import gaussian_blur_reflect
from deepvis.optimize.regularizers import gaussian_blur_symmetric


class _Devices(TorchFunctionMode):
    """Records the devices of the tensors given to convolutions and pads."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, torch.conv2d, F.pad):
            self.seen |= {a.device.type for a in args if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def test_blurs_build_their_kernels_on_the_input_device():
    for blur, x in (
        (gaussian_blur_reflect, torch.zeros(9, 11, device="meta")),
        (gaussian_blur_symmetric, torch.zeros(1, 3, 9, 11, device="meta")),
    ):
        with _Devices() as mode:
            out = blur(x, 1.5)
        assert out.device.type == "meta" and out.shape == x.shape, blur.__name__
        assert mode.seen <= {"meta"}, (blur.__name__, mode.seen)


def test_blur_reflect_values_on_the_cpu_are_unchanged():
    x = torch.zeros(15, 15)
    x[7, 7] = 1.0  # far enough from the edges that nothing is reflected: the blur keeps the sum
    out = gaussian_blur_reflect(x, 1.0)
    assert torch.isclose(out.sum(), torch.tensor(1.0), atol=1e-5) and out[7, 7] == out.max()
    assert torch.allclose(out, out.T) and torch.allclose(out, out.flip(0))
