"""The model-coverage contract (timm's habit): every architecture of ``contract_models.ROWS``, built once with
random weights, through the same checks: layers listed with the right layout, units and map size; capture
equal to a manual forward; a grid drawn; one unit optimized; one backprop view; one receptive field; one
atlas mining batch; and the model left as found. A cell that fails because of a known deepvis bug is
``xfail(strict=True)`` with the reason (``Row.xfail``)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from contract_models import README_BEGIN, README_END, ROWS, WHOLE, Row, readme_table
from deepvis.atlas.mining import MiningPlan
from deepvis.backprop import backprop_view, layer_field
from deepvis.capture import capture, get_layer, layer_table, resolve_module
from deepvis.models import Model, load_model
from deepvis.optimize import visualize
from deepvis.render import grid_shape, tile_grid
from deepvis.stats.engines import update_states
from helpers import hooks_left, snapshot


@dataclasses.dataclass
class Built:
    row: Row
    model: Model
    before: dict[str, object]
    state: dict[str, torch.Tensor]
    x: torch.Tensor  # (3, C, size, size): the sample photos, preprocessed


@pytest.fixture(scope="module", params=[pytest.param(r, id=r.id, marks=[pytest.mark.slow] if r.slow else []) for r in ROWS])
def built(request, sample_images) -> Built:
    row: Row = request.param
    model = load_model(row.spec, weights="random", device="cpu", input_size=row.size)
    model.layouts.update(row.declare)
    x = model.preprocess([sample_images[n] for n in ("coffee", "chelsea", "rocket")])
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    return Built(row, model, snapshot(model.module), state, x)


def _xfail(request, row: Row, check: str) -> None:
    if check in row.xfail:
        request.applymarker(pytest.mark.xfail(strict=True, reason=row.xfail[check]))


def _unit(row: Row) -> str:
    """A patch unit in the middle of the grid on token layers, the whole channel elsewhere."""
    return f"{row.layer}:1@{row.grid[0] // 2},{row.grid[1] // 2}" if row.layout == "tokens" else f"{row.layer}:1"


def test_layers_listed_with_layout_units_and_map(built, request):
    row = built.row
    _xfail(request, row, "layers")
    # detected, not declared (a row that declares a layout for the other checks is read afresh here)
    detected = Model(built.model.module, built.model.preprocessing, name=row.spec) if row.declare else built.model
    table = {i.name: i for i in layer_table(detected)}
    assert row.layer in table, f"{row.layer} is not listed"
    info = table[row.layer]
    assert (info.layout.kind, info.shape, info.prefix) == (row.layout, (row.units, *row.grid), row.prefix)
    assert "logits" in table


def _manual_output(module: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The raw output of ``layer`` in a plain forward pass of a copy of ``module`` (same weights, so the
    same numbers; the copy keeps the user's model, and the structure that its cached layer facts hang on,
    free of test hooks)."""
    twin = copy.deepcopy(module)
    raw: list[torch.Tensor] = []
    handle = resolve_module(twin, layer).register_forward_hook(lambda m, i, o: raw.append(o.detach().clone()))
    try:
        with torch.no_grad():
            twin(x)
    finally:
        handle.remove()
    return raw[-1]


def test_capture_equals_a_manual_forward(built):
    row, model = built.row, built.model
    t = _manual_output(model.module, row.layer, built.x)
    if row.layout == "maps-last":
        want = t.permute(0, 3, 1, 2)
    elif row.layout == "tokens":
        p, (h, w) = len(row.prefix), row.grid
        want = t[:, p:].reshape(len(t), h, w, -1).permute(0, 3, 1, 2)
    else:
        want = t
    out = capture(model, built.x, [row.layer], prefix=row.layout == "tokens")
    got = out[row.layer]
    assert got.shape == (3, row.units, *row.grid)
    assert torch.equal(got, want)
    if row.layout == "tokens":
        assert torch.equal(out[f"{row.layer}@prefix"], t[:, : len(row.prefix)].transpose(1, 2))


def test_grid_drawn(built):
    row = built.row
    acts = capture(built.model, built.x[:1], [row.layer])[row.layer][0]
    image = tile_grid(acts, scale=1)
    rows, cols = grid_shape(row.units)
    h, w = row.grid
    assert image.dtype.name == "uint8" and image.shape == (rows * (h + 1) + 1, cols * (w + 1) + 1, 3)
    assert image.std() > 0


def test_one_unit_optimized(built):
    row = built.row
    res = visualize(built.model, [_unit(row)], preset="none", steps=2, lr=10.0, kind="channel")[0]
    assert not res.dead and res.steps_run == 2
    assert res.value > res.start_value  # the activation rises
    assert res.image.shape == (3, row.size, row.size) and res.to_dict()["weights"] == "random (seed 0)"


def test_one_backprop_view(built):
    row = built.row
    view = backprop_view(built.model, built.x[:1], _unit(row), "gradient")
    assert view.grad.shape == (3, row.size, row.size)
    assert torch.isfinite(view.grad).all() and view.grad.abs().sum() > 0


def test_one_receptive_field(built):
    row = built.row
    f = layer_field(built.model, row.field_layer)
    if row.rf == WHOLE:
        assert f.whole_image is not None and row.rf_reason in f.whole_image
        assert f.at((0, 0)).box == (0, 0, row.size, row.size)
    else:
        size, stride = row.rf
        assert (f.whole_image, f.size, f.stride) == (None, (size, size), (stride, stride))


def test_one_atlas_mining_batch(built):
    row, model = built.row, built.model
    plan = MiningPlan({row.layer: (row.units, row.grid)}, k=2, batch_size=3)
    states = plan.empty_states()
    update_states(model, built.x, torch.arange(3), states.values())
    top = states[row.layer].topk
    acts = capture(model, built.x, [row.layer])[row.layer]
    peaks = acts.flatten(2).amax(2)  # (3, units)
    assert torch.equal(top.values[:, 0], peaks.amax(0)) and torch.equal(top.samples[:, 0], peaks.argmax(0))


def test_model_left_as_found(built):
    # runs after the other checks of the row (the module-scoped fixture keeps the row's tests together)
    module = built.model.module
    assert hooks_left(module) == []
    after = snapshot(module)
    assert after["training"] == built.before["training"] and after["requires_grad"] == built.before["requires_grad"]
    state = module.state_dict()
    assert state.keys() == built.state.keys() and all(torch.equal(state[k], v) for k, v in built.state.items())


# -- Swin's last stage: one 7x7 window, no shift ----------------------------------------------------------------
@pytest.mark.slow
def test_swin_last_stage_window_layers(sample_images):
    model = load_model("timm:swin_tiny_patch4_window7_224", weights="random", device="cpu")
    net = model.module
    assert net.layers[3].blocks[0].attn.window_size == (7, 7) and net.layers[3].blocks[0].shift_size == (0, 0)
    info = get_layer(model, "layers.3.blocks.0.mlp")
    assert (info.layout.kind, info.shape, info.prefix) == ("tokens", (768, 7, 7), ())
    x = model.preprocess(sample_images["coffee"])
    raw = _manual_output(net, "layers.3.blocks.0.mlp", x)
    want = raw.reshape(1, 7, 7, 768).permute(0, 3, 1, 2)  # one window: tokens in raster order
    assert torch.equal(capture(model, x, ["layers.3.blocks.0.mlp"])["layers.3.blocks.0.mlp"], want)
    table = {i.name: i for i in layer_table(model, everything=True)}
    for stage in range(3):  # several windows per image: window-batched tensors are not maps
        attn = table[f"layers.{stage}.blocks.0.attn"]
        assert not attn.viewable and "not the batch" in attn.layout.reason
    assert hooks_left(net) == []


# -- the README's table is made from the same rows ------------------------------------------------------------
def test_readme_table_matches_the_contract():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert README_BEGIN in text and README_END in text, "README lacks the models-known-to-work table"
    start = text.index(README_BEGIN)
    got = text[start : text.index(README_END) + len(README_END)]
    assert got == readme_table(), "README's models table is stale: paste `python tests/contract_models.py`"
