"""Switching the shown unit or layer while the frame loop is in a forward pass (live toolbox, issue 11).

A unit switch is shown at once from the current frame's forward pass (the engine's redraw worker),
even while the frame loop is busy; a layer switch abandons the forward pass begun for the old layer
(``capture(cancel=)``) and computes the frame again for the new one, stopping at that layer (its
predictions come with the next frame). No result with the old settings is posted after one with the
new settings.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from deepvis.capture import CaptureCancelled, capture
from deepvis.models import Model, Preprocessing
from deepvis.server.engine import LiveEngine
from deepvis.server.frames import FrameProcessor, frame_image
from deepvis.server.protocol import ViewSettings, unpack
from deepvis.server.session import RawFrame
from helpers import hooks_left, wait_for


class GateControl:
    """Holds a forward pass inside :class:`Gate` while armed (shared by the network's replicas)."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __deepcopy__(self, memo: dict) -> GateControl:
        return self  # the engine's replicas share the one control


class Gate(nn.Module):
    """The identity, except that an armed control makes the pass wait here until released."""

    def __init__(self, control: GateControl) -> None:
        super().__init__()
        self.control = control

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.control
        c.calls += 1
        if c.armed:
            c.entered.set()
            assert c.release.wait(30), "the test never released the gate"
        return x


def gated_model(control: GateControl) -> Model:
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            gate=Gate(control),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(16, 10),
        )
    ).eval()
    pre = Preprocessing(input_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Model(net, pre, name="gated", class_names=[f"class {i}" for i in range(10)])


class _Loop:
    def call_soon_threadsafe(self, fn, *args):
        pass


def _raw(seq: int, seed: int = 0) -> RawFrame:
    px = np.random.default_rng(seed).integers(0, 255, (32, 32, 4), dtype=np.uint8).tobytes()
    return RawFrame(seq, 32, 32, "rgba", memoryview(px), "camera")


def _frames(engine, s) -> list[tuple[dict, bytes]]:
    return [(h, bytes(p)) for h, p in (unpack(m) for m in engine.take(s) if isinstance(m, bytes)) if h["type"] == "frame"]


def _expected(model: Model, seq_seed: int, settings: ViewSettings) -> tuple[dict, bytes]:
    proc = FrameProcessor(model)
    out = proc.process(proc.to_input(frame_image(_raw(0, seq_seed).pixels, 32, 32, "rgba", model)), settings)
    return out.header, b"".join(out.blobs.values())


# -- capture(cancel=) --------------------------------------------------------------------------------------------
def test_capture_cancel_abandons_the_pass_between_modules_and_leaves_no_hook():
    control = GateControl()
    model = gated_model(control)
    x = torch.randn(1, 3, 32, 32)
    asked = []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) >= 3  # the root, conv1, then the gate: abandoned before the gate runs

    capture(model, x, ["conv2"])  # the layer table is probed once first (passes of its own)
    control.calls = 0
    with pytest.raises(CaptureCancelled):
        capture(model, x, ["conv2"], cancel=cancel)
    assert control.calls == 0 and len(asked) == 3
    assert hooks_left(model.module) == []
    # never cancelled: the same outputs as without the callback
    plain = capture(model, x, ["conv2", "logits"])
    kept = capture(model, x, ["conv2", "logits"], cancel=lambda: False)
    assert all(torch.equal(plain[k], kept[k]) for k in plain)
    assert hooks_left(model.module) == []


# -- the engine --------------------------------------------------------------------------------------------------
@pytest.fixture
def gated():
    control = GateControl()
    model = gated_model(control)
    engine = LiveEngine(model, tune_memory_format=False)
    s = engine.open_session(_Loop())  # type: ignore[arg-type]
    engine.update_settings(s, {"layer": "conv2", "unit": 0}, ("raw",))
    engine.start()
    try:
        yield control, model, engine, s
    finally:
        control.release.set()
        engine.close()


def test_a_unit_switch_is_shown_while_the_frame_loop_is_in_a_forward_pass(gated):
    control, model, engine, s = gated
    engine.submit_frame(s, _raw(1, seed=1))
    assert wait_for(lambda: "frame" in s.latest)
    assert [h["unit"] for h, _ in _frames(engine, s)] == [0]
    want1 = _expected(model, 1, ViewSettings(layer="conv2", unit=3))  # (reference passes before the gate is armed)
    want2 = _expected(model, 2, ViewSettings(layer="conv2", unit=3))
    control.armed = True
    engine.submit_frame(s, _raw(2, seed=2))
    assert control.entered.wait(30)  # the loop is now inside frame 2's forward pass
    engine.update_settings(s, {"unit": 3}, ("raw",))
    # shown at once, from frame 1's pass, while frame 2's pass still waits in the gate
    assert wait_for(lambda: "frame" in s.latest)
    assert not control.release.is_set()
    [(header, payload)] = _frames(engine, s)
    want_header, want = want1
    assert (header["seq"], header["unit"]) == (1, 3)
    assert payload == want and header["unit_stats"] == want_header["unit_stats"]
    control.armed = False
    control.release.set()
    # frame 2, begun for unit 0, is shown with unit 3: never the old unit after the new one
    assert wait_for(lambda: "frame" in s.latest)
    [(header, payload)] = _frames(engine, s)
    assert (header["seq"], header["unit"]) == (2, 3) and payload == want2[1]


def test_a_layer_switch_abandons_the_forward_pass_begun_for_the_old_layer(gated):
    control, model, engine, s = gated
    engine.submit_frame(s, _raw(1, seed=1))
    assert wait_for(lambda: "frame" in s.latest)
    _frames(engine, s)
    _, want = _expected(model, 2, ViewSettings(layer="conv1", unit=5))
    control.armed = True
    control.calls = 0
    engine.submit_frame(s, _raw(2, seed=2))
    assert control.entered.wait(30)
    engine.update_settings(s, {"layer": "conv1", "unit": 5}, ("raw",))
    time.sleep(0.1)  # the redraw worker can show nothing of conv1 from frame 1's conv2 pass (not a neighbour of conv2)
    assert "frame" not in s.latest
    control.armed = False
    control.release.set()  # the conv2 pass goes on to the next module, where it is abandoned
    assert wait_for(lambda: "frame" in s.latest)
    frames = _frames(engine, s)
    assert [(h["seq"], h["layer"], h["unit"]) for h, _ in frames] == [(2, "conv1", 5)]
    assert frames[0][1] == want
    # the gate ran twice: in the abandoned pass, and in frame 2's pass for conv1, which captures its next
    # layer of other data, relu1, beyond the gate (the gate outputs conv1's very tensor: passed over)
    assert engine.processor.neighbours("conv1") == ("relu1",)
    assert control.calls == 2
    assert s.stats.dropped == 0 and hooks_left(engine.frame_model.module) == []
    # that first frame of the new layer stopped at it: no predictions (the page keeps its list); the next has them
    assert "predictions" not in frames[0][0]
    engine.submit_frame(s, _raw(3, seed=3))
    assert wait_for(lambda: "frame" in s.latest)
    [(header, _)] = _frames(engine, s)
    assert header["seq"] == 3 and header["layer"] == "conv1" and len(header["predictions"]) == 5


def test_a_switch_to_a_neighbouring_layer_is_drawn_at_once_from_the_last_pass(gated):
    """The previous and next layer of the page's list are captured with the layer shown: a switch to
    one is drawn from the current frame's pass while the frame loop is busy, and the pass in progress
    (which captures it too) goes on instead of being abandoned."""
    control, model, engine, s = gated
    assert engine.processor.neighbours("conv2") == ("relu1", "relu2")
    engine.submit_frame(s, _raw(1, seed=1))
    assert wait_for(lambda: "frame" in s.latest)
    _frames(engine, s)
    want1 = _expected(model, 1, ViewSettings(layer="relu2", unit=5))
    want2 = _expected(model, 2, ViewSettings(layer="relu2", unit=5))
    control.armed = True
    control.calls = 0
    engine.submit_frame(s, _raw(2, seed=2))
    assert control.entered.wait(30)
    engine.update_settings(s, {"layer": "relu2", "unit": 5}, ("raw",))
    assert wait_for(lambda: "frame" in s.latest)  # shown while frame 2's pass still waits in the gate
    assert not control.release.is_set()
    [(header, payload)] = _frames(engine, s)
    assert (header["seq"], header["layer"], header["unit"]) == (1, "relu2", 5)
    assert payload == want1[1] and header["unit_stats"] == want1[0]["unit_stats"]
    assert header["predictions"] == want1[0]["predictions"]
    control.armed = False
    control.release.set()
    assert wait_for(lambda: "frame" in s.latest)
    [(header, payload)] = _frames(engine, s)
    assert (header["seq"], header["layer"]) == (2, "relu2") and payload == want2[1]
    assert control.calls == 1 and len(header["predictions"]) == 5  # one pass for frame 2: not abandoned, with its predictions
    assert hooks_left(engine.frame_model.module) == []


def test_the_neighbours_are_the_page_lists_previous_and_next_layer():
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3), skip=nn.Identity(), relu1=nn.ReLU(), conv2=nn.Conv2d(4, 4, 3), flat=nn.Flatten(), fc=nn.LazyLinear(3)
        )
    )
    net(torch.zeros(1, 3, 16, 16))
    model = Model(net.eval(), Preprocessing(input_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), name="chain")
    proc = FrameProcessor(model)
    names = [i.name for i in proc.table]
    assert names[:5] == ["conv1", "skip", "relu1", "conv2", "flat"]
    assert [i.name for i in proc.table if not i.listed] == ["skip"]  # what the page's hello marks unlisted
    assert proc.neighbours("relu1") == ("conv1", "conv2")  # the identity between is not in the page's list: skipped
    assert proc.neighbours("conv1") == ("relu1",)
    assert proc.neighbours("skip") == ("relu1",)  # the identity outputs conv1's very tensor: the keys pass over conv1
    x = torch.randn(1, 3, 16, 16)
    out = proc.process(x, ViewSettings(layer="relu1", unit=1))
    for layer in ("conv1", "conv2"):
        fresh = proc.process(x, ViewSettings(layer=layer, unit=2))
        again = proc.process(x, ViewSettings(layer=layer, unit=2), cached=out.activations)
        assert again.activations is out.activations  # drawn from relu1's pass, no new forward pass
        assert again.blobs == fresh.blobs and again.header == fresh.header
    assert proc.process(x, ViewSettings(layer="fc", unit=0), cached=out.activations).activations is not out.activations


def test_the_neighbours_pass_over_layers_that_output_the_same_tensor():
    """A block's output is its last module's very tensor (``same_as``): the page's layer keys pass over
    it, so the pass for the last module captures the layer after the block instead."""
    torch.manual_seed(0)
    block = nn.Sequential(OrderedDict(c=nn.Conv2d(4, 4, 3), a=nn.ReLU()))
    net = nn.Sequential(
        OrderedDict(conv1=nn.Conv2d(3, 4, 3), block=block, conv2=nn.Conv2d(4, 4, 3), flat=nn.Flatten(), fc=nn.LazyLinear(3))
    )
    net(torch.zeros(1, 3, 16, 16))
    model = Model(net.eval(), Preprocessing(input_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), name="chain")
    proc = FrameProcessor(model)
    table = {i.name: i for i in proc.table}
    assert table["block"].same_as == "block.a" and table["block"].listed
    assert proc.neighbours("block.a") == ("block.c", "conv2")
    assert proc.neighbours("conv2") == ("block", "flat")  # from the other side, the block's name comes first
