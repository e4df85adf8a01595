"""MACO (issue 14, item 2): the fixed natural amplitude spectrum, the phase-only parameterization, the alpha
mask where a planted feature is, the preset and the files the CLI writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepvis.cli import main
from deepvis.errors import DeepvisError
from deepvis.models import Model, Preprocessing
from deepvis.optimize import Settings, get_preset, optimize_batch, resolve_targets, visualize
from deepvis.optimize.maco import (
    SPECTRUM_FILE,
    AttributionMask,
    MacoParam,
    _odd_edge_columns,
    amplitude_spectrum,
    masked_image,
    natural_spectrum,
)
from deepvis.optimize.param import ImageParam, make_param
from deepvis.optimize.regularizers import ClipRange
from helpers import assert_unchanged, snapshot


class Planted(nn.Module):
    """``feat``: a fixed 3x3 filter, seen only in the top-left 8x8 corner of a 24x24 image (zero elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(1, 3, 3, 3, generator=torch.Generator().manual_seed(0)))
        mask = torch.zeros(1, 1, 24, 24)
        mask[..., :8, :8] = 1
        self.register_buffer("mask", mask)
        self.feat = nn.Identity()
        self.head = nn.Linear(1, 2)

    def forward(self, x):
        f = self.feat(self.conv(x) * self.mask)
        return self.head(f.mean((2, 3)))


def planted_model() -> Model:
    return Model(Planted(), Preprocessing((24, 24), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0, 3), name="planted")


def test_stored_spectrum_is_small_documented_and_resamples_to_itself():
    stored = np.load(SPECTRUM_FILE)
    assert stored.shape == (3, 128, 65) and stored.dtype == np.float32 and SPECTRUM_FILE.stat().st_size < 200_000
    assert stored[:, 0, 0].tolist() == [0, 0, 0] and (stored >= 0).all()
    np.testing.assert_allclose(natural_spectrum(128, 128).numpy(), stored, atol=1e-3)
    # natural images: low frequencies carry more energy than high ones
    assert stored[:, 1, 1].min() > 10 * stored[:, 64, 32].max()
    gray = natural_spectrum(40, 30, channels=1)
    assert gray.shape == (1, 40, 16) and float(gray[0, 0, 0]) == 0


@pytest.mark.parametrize("hw", [(17, 17), (16, 24), (33, 20), (128, 128)])
def test_any_phase_gives_exactly_the_fixed_amplitude_spectrum(hw):
    h, w = hw
    p = MacoParam()
    phase = torch.rand(2, 3, h, w // 2 + 1, generator=torch.Generator().manual_seed(1)) * 6.3 - 3.15
    x = p.to_image(phase, hw)
    a = p.spectrum(3, h, w, x.device)
    assert x.shape == (2, 3, h, w)
    np.testing.assert_allclose(
        amplitude_spectrum(x).numpy(), a.double().expand(2, -1, -1, -1).numpy(), rtol=1e-4, atol=1e-3 * float(a.max())
    )
    # the inverse keeps the phase: to_image(from_image(x)) is x
    torch.testing.assert_close(p.to_image(p.from_image(x), hw), x, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("hw", [(17, 17), (16, 24), (33, 20), (9, 8)])
def test_closed_form_gradient_equals_autograd_through_polar_and_irfft2(hw):
    """MACO's image and its phase gradient (closed form, :class:`_PhaseToImage`) equal autograd through
    ``torch.polar`` and ``irfft2`` in float64, edge columns included, odd and even sides."""
    h, w = hw
    p = MacoParam()
    a = p.spectrum(3, h, w, torch.device("cpu")).double()
    gen = torch.Generator().manual_seed(2)
    phase = (torch.rand(2, 3, h, w // 2 + 1, generator=gen, dtype=torch.float64) * 6.3 - 3.15).requires_grad_(True)
    weight = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
    odd = _odd_edge_columns(phase, w)
    ref = torch.fft.irfft2(torch.polar(a.expand_as(odd).contiguous(), odd), s=(h, w), norm="ortho")
    (g_ref,) = torch.autograd.grad((ref * weight).sum(), [phase])
    x = p.to_image(phase, hw)
    (g,) = torch.autograd.grad((x * weight).sum(), [phase])
    assert x.dtype == torch.float64
    torch.testing.assert_close(x, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)
    assert float(g.abs().max()) > 1.0  # a real gradient, not zeros


def test_clip_in_the_graph_passes_the_gradient_only_inside_the_valid_range():
    clip = ClipRange(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]))
    x = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [-2.5, -1.0, 1.0, 3.0]]).view(1, 2, 2, 2).requires_grad_(True)
    y = clip(x)
    (g,) = torch.autograd.grad((y * torch.arange(1.0, 9.0).view(1, 2, 2, 2)).sum(), [x])
    assert y.flatten().tolist() == [-1.0, -0.5, 0.5, 1.0, -2.0, -1.0, 1.0, 2.0]
    assert g.flatten().tolist() == [0.0, 2.0, 3.0, 0.0, 0.0, 6.0, 7.0, 0.0]
    with torch.no_grad():
        assert clip(x).flatten().tolist() == y.flatten().tolist()


def test_optimized_image_has_the_fixed_amplitude_spectrum():
    model = planted_model()
    before = snapshot(model.module)
    small = natural_spectrum(24, 24) * 0.2  # small enough that no pixel leaves 0-255: nothing is clipped
    s = Settings(maco=True, optimizer="adam", lr=0.3, steps=25)
    obj = resolve_targets(model, ["feat:0"], kind="channel", size=24)
    (res,) = optimize_batch(model, obj, s, size=(24, 24), param=MacoParam(magnitude=small))
    assert_unchanged(model.module, before)
    assert res.value > res.start_value
    x = res.image.double() - torch.tensor(res.mean, dtype=torch.float64).view(3, 1, 1)
    np.testing.assert_allclose(amplitude_spectrum(x).numpy(), small.double().numpy(), atol=0.05, rtol=1e-3)
    assert res.mapping["param"] == "maco"


def test_alpha_mask_is_in_unit_range_and_highest_where_the_planted_feature_is():
    model = planted_model()
    (res,) = visualize(model, ["feat:0"], preset=Settings(maco=True, optimizer="adam", lr=0.3, steps=20), kind="channel", size=24)
    a = res.alpha
    assert a is not None and a.shape == (24, 24)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and float(a.max()) == 1
    inside, outside = a[:8, :8].mean(), a[12:, 12:].mean()
    assert inside > 0.3 and outside < 0.02 * inside
    y, x = divmod(int(a.argmax()), 24)
    assert y < 9 and x < 9
    rgba = res.masked_image()
    assert rgba is not None and rgba.mode == "RGBA" and rgba.size == (24, 24)
    assert np.asarray(rgba)[..., 3][:8, :8].mean() > np.asarray(rgba)[..., 3][12:, 12:].mean()
    assert res.to_dict()["alpha_mean"] == pytest.approx(float(a.mean()))


def test_pixel_results_have_no_alpha():
    model = planted_model()
    (res,) = visualize(model, ["feat:0"], preset=Settings(steps=2), kind="channel", size=24)
    assert res.alpha is None and res.alpha_image() is None and res.masked_image() is None and "alpha_mean" not in res.to_dict()


def test_attribution_mask_accumulates_only_active_elements():
    m = AttributionMask(2, (4, 4), torch.device("cpu"))
    x = torch.ones(2, 3, 4, 4)
    g = torch.zeros(2, 3, 4, 4)
    g[:, :, 0, 0] = 1
    m.record(x, g, torch.tensor([True, False]))
    alpha = m.mask()
    assert alpha[1].abs().max() == 0 and float(alpha[0].max()) == 1
    pic = masked_image(Image.new("RGB", (8, 8), (200, 10, 10)), alpha[0])
    assert pic.size == (8, 8) and pic.mode == "RGBA"


def test_maco_preset_and_settings():
    s = get_preset("maco")
    assert s.maco and s.optimizer == "adam" and s.beyond_paper and not s.fourier
    assert isinstance(make_param(s), MacoParam) and isinstance(make_param(get_preset("3")), ImageParam)
    with pytest.raises(DeepvisError, match="maco replaces"):
        Settings(maco=True, fourier=True)
    assert s.to_dict()["maco"] is True


def test_cli_param_maco_writes_alpha_and_masked_images(tmp_path, capsys):
    out = tmp_path / "m"
    code = main(
        ["optimize", "--layer", "blocks.2", "--units", "3", "--param", "maco", "--optimizer", "adam", "--lr", "0.5"]
        + ["--steps", "3", "--size", "32", "-o", str(out), "--judge", "none"]
    )
    _, err = capsys.readouterr()
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert {"blocks.2-3_alpha.png", "blocks.2-3_masked.png", "blocks.2-3.png", "blocks.2-3_raw.png"} <= set(names)
    rec = json.loads((out / "blocks.2-3.json").read_text())
    assert rec["settings"]["maco"] is True and rec["model_units"]["param"] == "maco"
    assert rec["files"]["alpha"] == "blocks.2-3_alpha.png" and rec["files"]["masked"] == "blocks.2-3_masked.png"
    assert Image.open(out / "blocks.2-3_masked.png").mode == "RGBA" and Image.open(out / "blocks.2-3_alpha.png").mode == "L"


def test_a_start_image_with_maco_is_refused():
    model = planted_model()
    with pytest.raises(DeepvisError, match="not MACO"):
        visualize(model, ["feat:0"], preset=get_preset("maco").replace(steps=2), size=24, start=torch.full((3, 24, 24), 100.0))
