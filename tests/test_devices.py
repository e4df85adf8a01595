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


def _net():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def _model():
    from deepvis.models.model import Model
    from deepvis.models.preprocessing import Preprocessing

    return Model(_net(), Preprocessing(input_size=(32, 32)), name="tiny", class_names=list("abcde"), layouts={"3": "nchw"})


def _storage(module):
    return [t.data_ptr() for t in (*module.parameters(), *module.buffers())]


def test_server_replicas_share_the_weights_but_not_the_modules():
    from deepvis.backprop import backprop_view
    from deepvis.server.engine import replica

    model = _model()
    copy = replica(model)
    assert _storage(copy.module) == _storage(model.module)  # no memory for the weights
    assert copy.module is not model.module and all(a is not b for a, b in zip(copy.module.modules(), model.module.modules()))
    assert (copy.name, copy.class_names, copy.layouts, copy.weights) == (model.name, model.class_names, model.layouts, model.weights)
    assert copy.cache is not model.cache
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = backprop_view(model, x, "3:2", "guided"), backprop_view(copy, x, "3:2", "guided")
    assert torch.equal(a.grad, b.grad) and a.activation == b.activation
    # its own flags and conversions: freezing or converting the copy leaves the model as it was
    for p in copy.module.parameters():
        p.requires_grad_(False)
    assert all(p.requires_grad for p in model.module.parameters())
    copy.module.to(memory_format=torch.channels_last)
    assert model.module[0].weight.is_contiguous() and not copy.module[0].weight.is_contiguous()


def test_the_live_engine_keeps_one_copy_of_the_weights():
    from deepvis.server.engine import LiveEngine
    from deepvis.server.unitviews import layer_geometry, unit_view

    model = _model()
    engine = LiveEngine(model, unit_view=unit_view, geometry=layer_geometry, tune_memory_format=False)
    copies = [engine.frame_model, engine._worker_model, engine._geometry_model]
    assert all(c is not None and c.module is not model.module for c in copies)
    assert all(_storage(c.module) == _storage(model.module) for c in copies if c is not None)


def test_the_frame_grid_made_on_the_device_has_the_same_pixels():
    import numpy as np

    from deepvis.render import normalize_activations, strip_values
    from deepvis.server.frames import FrameProcessor, _boost, device_uint8, normalize_on_device, quantize, scale_on_device
    from deepvis.server.protocol import ViewSettings

    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(6, 7, 9, generator=g), torch.rand(6, 7, 9, generator=g) * 3, torch.zeros(2, 3, 3), torch.randn(10, generator=g)]
    maps[1][2] = 0.5  # a constant channel
    for a in maps:
        for mode in ("layer", "channel", "none"):
            for gain, gamma in ((1.0, 1.0), (2.0, 0.5), (0.5, 2.0)):
                s = ViewSettings(layer="x", normalize=mode, gain=gain, gamma=gamma)
                v = normalize_activations(a, mode)
                if gain != 1.0:
                    v = np.clip(v * gain, 0.0, 1.0)
                if gamma != 1.0:
                    v = np.power(v, gamma)
                ours = device_uint8(_boost(normalize_on_device(a, mode), s)).numpy()
                assert np.array_equal(ours, quantize(v)), (tuple(a.shape), mode, gain, gamma)
        if a.ndim == 3:
            pre = torch.randn(a.shape[0], 3, generator=g) * 2
            for mode in ("layer", "channel"):
                s = ViewSettings(layer="x", normalize=mode, gain=2.0)
                ours = FrameProcessor._prefix_values(pre, a, s).numpy()
                assert np.array_equal(ours, quantize(np.clip(strip_values(pre, a, mode) * 2.0, 0, 1))), mode
                assert scale_on_device(a, mode)[0].shape == ((a.shape[0], 1, 1) if mode == "channel" else ())
    # the helpers stay on the input's device (meta stands in for CUDA)
    m = torch.zeros(4, 5, 5, device="meta")
    assert device_uint8(normalize_on_device(m, "channel")).device.type == "meta"


def test_the_frame_made_the_device_way_equals_the_cpu_way():
    import numpy as np

    from deepvis.server.frames import DiffState, FrameProcessor
    from deepvis.server.protocol import ViewSettings

    model = _model()
    host, device = FrameProcessor(model), FrameProcessor(model)
    device.numpy_on_cpu = False  # the path taken on CUDA: one copy of bytes for the whole frame
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for s in (
        ViewSettings(layer="3", unit=2),
        ViewSettings(layer="3", unit=5, gain=2.0, gamma=0.5, normalize="channel", position=(3, 9)),
        ViewSettings(layer="7", unit=1),
        ViewSettings(layer="3", unit=1, diff=True),
    ):
        a = host.process(x, s, DiffState())
        b = device.process(x, s, DiffState())
        assert a.header == b.header, s
        assert a.blobs.keys() == b.blobs.keys() and all(np.array_equal(a.blobs[k], b.blobs[k]) for k in a.blobs), s
