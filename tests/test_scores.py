"""Quality figures (issue 14, item 4): planted judges with known answers, the same-model judge flagged, the
atlas-based figures on a tiny atlas, the contrast figure's analytic values and faint flag, and ``deepvis
score`` on good and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepvis.atlas import AtlasOptions, build_atlas, open_atlas
from deepvis.cli import main
from deepvis.errors import InputError
from deepvis.models import Model, Preprocessing, model_identity
from deepvis.optimize import FAINT_RMS, contrast, contrast_text
from deepvis.optimize.images import levels_text
from deepvis.scores import Judge, beats_top_k, penultimate_layer, plausibility, score_folder, score_image, summary_line, transfer

COLORS = ["red", "green", "blue"]


class ColorNet(nn.Module):
    """``feat`` (N, 4): the mean of each channel (0-1 pixels) and a constant 1; ``head``: ``gain`` x the means."""

    def __init__(self, gain: float = 10.0) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([torch.eye(3) * gain, torch.zeros(3, 1)], 1))
        self.feat = Feat()

    def forward(self, x):
        return self.head(self.feat(x))


class Feat(nn.Module):
    def forward(self, x):
        m = x.mean((2, 3))
        return torch.cat([m, torch.ones_like(m[:, :1])], 1)


def color_model(gain: float = 10.0, name: str = "color") -> Model:
    prep = Preprocessing((8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "nearest", 1.0, 3)
    return Model(ColorNet(gain), prep, name=name, class_names=list(COLORS))


def judge(model: Model) -> Judge:
    return Judge(model.name, model, model_identity(model))


def solid(rgb, size=8) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), rgb, np.uint8))


def test_transfer_of_a_planted_judge_has_the_known_rank_and_probability():
    j = judge(color_model())
    red = solid((255, 0, 0))
    r = transfer(j, red, 0, "red")
    assert r["rank"] == 1 and r["probability"] == pytest.approx(np.exp(10) / (np.exp(10) + 2), rel=1e-5)
    b = transfer(j, red, 2, "blue")
    assert b["rank"] == 2 and b["probability"] == pytest.approx(1 / (np.exp(10) + 2), rel=1e-4)  # ties with green: rank 2
    assert "note" in transfer(j, red, 2, "a class it does not have") and "rank" not in transfer(j, red, 2, "zebra")
    # the optimized model's classes unknown (a model without class names, or without a head): index 0 is
    # not "red" for another model, so no rank is given; the optimized model judging itself is still scored
    unnamed = transfer(j, red, 0, None)
    assert "rank" not in unnamed and unnamed["note"].startswith("the optimized model's classes are unknown")
    assert transfer(j, red, 0, None, same_model=True)["rank"] == 1


def test_plausibility_and_beats_top_k_known_answers():
    j = judge(color_model())
    assert penultimate_layer(j.model) == "feat"
    refs = [solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))]
    p = plausibility(j, solid((255, 0, 0)), refs)
    # features (1,0,0,1) against (1,0,0,1), (0,1,0,1), (0,0,1,1): cosines 1, 0.5, 0.5
    assert p["mean"] == pytest.approx(2 / 3, abs=1e-6) and p["min"] == pytest.approx(0.5) and p["max"] == pytest.approx(1.0) and p["n"] == 3
    b = beats_top_k(3.0, [4.0, 2.0, 1.0])
    assert b == {"judge": "optimized model", "value": 3.0, "beats": 2, "k": 3, "ratio": 0.75, "ratio_mean": pytest.approx(3 / (7 / 3))}
    assert beats_top_k(1.0, [0.5] * 12)["k"] == 9
    with pytest.raises(InputError):
        beats_top_k(1.0, [])
    with pytest.raises(InputError):
        plausibility(j, refs[0], [])


def test_a_judge_that_is_the_optimized_model_is_flagged():
    optimized = color_model()
    other = judge(color_model(gain=5.0, name="other"))  # other weights: another identity
    record = {"unit": "logits:0", "model_identity": model_identity(optimized), "classes": {"count": 3, "name": "red"}}
    s = score_image(solid((255, 0, 0)), record, [judge(optimized), other])
    same = {r["judge"]: r["same_model"] for r in s["transfer"]}
    assert same == {"color": True, "other": False}
    assert any("judge color is the optimized model" in f for f in s["flags"])
    assert not any("no independent judge" in f for f in s["flags"])
    alone = score_image(solid((255, 0, 0)), record, [judge(optimized)])
    assert any("no independent judge" in f for f in alone["flags"])
    assert "color* #1" in summary_line(alone) and "other #1" in summary_line(s)
    unknown = score_image(solid((255, 0, 0)), {"unit": "logits:0"}, [other])
    assert any("no model identity" in f for f in unknown["flags"])


def test_atlas_figures_on_a_tiny_atlas(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, rgb in [("a_red", (250, 0, 0)), ("b_green", (0, 250, 0)), ("c_blue", (0, 0, 250)), ("d_pink", (200, 100, 100))]:
        solid(rgb).save(data / f"{name}.png")
    optimized = color_model()
    build_atlas(
        tmp_path / "atlas",
        optimized,
        str(data),
        AtlasOptions(layers=("feat",), top=3, batch_size=2, synthesis=None, decode_threads=0),
        progress=False,
    )
    record = {"unit": "feat:0", "model_identity": model_identity(optimized)}
    other = judge(color_model(gain=3.0, name="other"))
    with open_atlas(tmp_path / "atlas") as atlas:
        s = score_image(solid((255, 0, 0)), record, [other], atlas=atlas, optimized=optimized)
        b = s["beats_top_k"]
        assert b["k"] == 3 and b["beats"] == 3 and b["ratio"] == pytest.approx(255 / 250, rel=1e-4)
        (p,) = s["plausibility"]
        assert p["judge"] == "other" and p["same_model"] is False and p["n"] == 3 and 0.5 < p["mean"] < 1
        wrong = score_image(solid((255, 0, 0)), record, [other], atlas=atlas, optimized=color_model(gain=2.0))
        assert wrong["beats_top_k"] is None and any("beats-top-k skipped" in f for f in wrong["flags"])
        # a unit of a layer the atlas does not hold keeps its other figures, with a flag that says why
        classes = {"count": 3, "name": "red"}
        logit = score_image(
            solid((255, 0, 0)), {**record, "unit": "logits:0", "classes": classes}, [other], atlas=atlas, optimized=optimized
        )
        assert logit["beats_top_k"] is None and logit["plausibility"] == []
        assert logit["transfer"][0]["rank"] == 1
        assert any("skipped" in f and "'logits' is not in atlas" in f for f in logit["flags"])


def checkerboard(mean, amplitude, size=16) -> Image.Image:
    """``mean`` ± ``amplitude`` levels in a checkerboard, every channel: RMS and every |x − mean| = ``amplitude``."""
    sign = np.indices((size, size)).sum(0) % 2 * 2 - 1
    return Image.fromarray(np.stack([m + amplitude * sign for m in mean], 2).astype(np.uint8))


def test_contrast_has_the_analytic_values_and_flags_a_faint_image():
    mean = (120.0, 128.0, 100.0)
    strong = contrast(checkerboard(mean, 6), mean)
    assert strong["rms"] == pytest.approx(6) and strong["peak"] == pytest.approx(6) and strong["stretch"] == pytest.approx(127 / 6)
    assert not strong["faint"] and contrast_text(strong) == "6.0 levels RMS"
    faint = contrast(checkerboard(mean, 1), mean)
    assert (
        faint["rms"] == pytest.approx(1)
        and FAINT_RMS > 1
        and faint["faint"]
        and contrast_text(faint) == "1.0 levels RMS (faint: shown 127x)"
    )
    flat = contrast(checkerboard(mean, 0), mean)
    assert flat["rms"] == 0 and flat["stretch"] is None and flat["faint"]
    # a tensor (C, H, W) of 0-255 pixels gives the same figure as its picture
    x = torch.from_numpy(np.asarray(checkerboard(mean, 6), dtype=np.float64).transpose(2, 0, 1).copy())
    assert contrast(x, mean) == strong
    # the display version maps exactly the figure's peak to full contrast: 128 ± 127
    from deepvis.optimize import display_image

    assert set(np.unique(np.asarray(display_image(x, mean)))) == {1, 255}


def test_the_help_texts_state_the_faint_threshold(capsys):
    for command in ("optimize", "score"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"{FAINT_RMS:g} levels" in " ".join(capsys.readouterr().out.split())


def test_score_image_gives_the_contrast_figure_and_flags_a_faint_image():
    mean = [128.0, 128.0, 128.0]
    j = judge(color_model(gain=4.0, name="j"))
    rec = {"unit": "logits:0", "model_identity": model_identity(color_model()), "classes": {"name": "red"}, "mean_pixel": mean}
    faint = score_image(checkerboard(mean, 1, size=8), rec, [j])
    assert faint["contrast"]["faint"] and faint["contrast"]["rms"] == pytest.approx(1)
    assert faint["flags"] == [
        "faint: the raw image is 1.0 levels RMS from the mean image (it looks flat grey); its display version magnifies it 127x"
    ]
    assert summary_line(faint).endswith("| RMS 1.0 faint")
    strong = score_image(checkerboard(mean, 40, size=8), rec, [j])
    assert not strong["contrast"]["faint"] and strong["flags"] == [] and summary_line(strong).endswith("| RMS 40")
    no_mean = score_image(checkerboard(mean, 1, size=8), {k: v for k, v in rec.items() if k != "mean_pixel"}, [j])
    assert no_mean["contrast"] is None and no_mean["flags"] == [] and "RMS" not in summary_line(no_mean)
    bad = score_image(checkerboard(mean, 1, size=8), {**rec, "mean_pixel": [128.0, "grey"]}, [j])
    assert bad["contrast"] is None and bad["flags"] == [
        "contrast skipped: the record's mean_pixel is not one number per channel of the image"
    ]


def test_score_folder_reads_the_records_next_to_the_images(tmp_path):
    optimized = color_model()
    solid((255, 0, 0)).save(tmp_path / "logits-0_raw.png")
    rec = {"unit": "logits:0", "objective": "logit(0)", "model_identity": model_identity(optimized)}
    rec["classes"] = {"count": 3, "name": "red"}
    rec["files"] = {"raw": "logits-0_raw.png"}
    (tmp_path / "logits-0.json").write_text(json.dumps(rec))
    (tmp_path / "other.json").write_text("[1, 2]")  # not a record: ignored
    (rows,) = score_folder(tmp_path, [judge(color_model(gain=4.0, name="j"))])
    assert rows["record"] == "logits-0.json" and rows["scores"]["transfer"][0]["rank"] == 1
    rec["files"] = {"raw": "missing.png"}
    (tmp_path / "logits-0.json").write_text(json.dumps(rec))
    with pytest.raises(InputError, match="missing.png"):
        score_folder(tmp_path, [])


def test_deepvis_score_keeps_the_good_results_of_a_folder_with_broken_ones(tmp_path, capsys):
    optimized = color_model()
    solid((255, 0, 0)).save(tmp_path / "logits-0_raw.png")
    rec = {"unit": "logits:0", "objective": "logit(0)", "model_identity": model_identity(optimized), "files": {"raw": "logits-0_raw.png"}}
    (tmp_path / "logits-0.json").write_text(json.dumps(rec))
    (tmp_path / "logits-1_raw.png").write_bytes(b"not a png")
    (tmp_path / "logits-1.json").write_text(json.dumps({**rec, "unit": "logits:1", "files": {"raw": "logits-1_raw.png"}}))
    (tmp_path / "logits-2.json").write_text("{bad")
    skipped: list[tuple[str, str]] = []
    (row,) = score_folder(tmp_path, [], skipped=skipped)
    assert row["record"] == "logits-0.json" and [name for name, _ in skipped] == ["logits-1.json", "logits-2.json"]
    code = main(["score", str(tmp_path), "--judge", "default"])
    out, err = capsys.readouterr()
    assert code == 2 and out.startswith("logits:0: ")
    assert [json.loads((tmp_path / "scores.json").read_text())[0]["record"]] == ["logits-0.json"]  # written all the same
    lines = err.strip().splitlines()
    assert lines[-3].startswith("skipped logits-1.json: ") and lines[-2].startswith("skipped logits-2.json: not a readable JSON")
    assert lines[-1] == "deepvis: error: 2 of 3 records could not be scored (listed above)"


@pytest.mark.parametrize("setup,message", [("nothing", "not a folder"), ("empty", "no optimize results"), ("no_raw", "not in")])
def test_deepvis_score_bad_input_is_one_line_exit_2(tmp_path, capsys, setup, message):
    folder = tmp_path / "results"
    if setup != "nothing":
        folder.mkdir()
    if setup == "no_raw":
        (folder / "u.json").write_text(json.dumps({"unit": "logits:1", "files": {"raw": "u_raw.png"}}))
    code = main(["score", str(folder), "--judge", "default"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and message in err and err.startswith("deepvis: error:")


def test_deepvis_score_on_optimize_output(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["optimize", "--class", "1", "--steps", "2", "--size", "32", "-o", str(out), "--judge", "default"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads((out / "logits-1.json").read_text())
    (t,) = rec["scores"]["transfer"]
    assert t["judge"] == "default" and t["same_model"] is True and 1 <= t["rank"] <= 1000 and 0 <= t["probability"] <= 1
    assert rec["model_identity"]["model"] == "default" and rec["classes"]["name"]
    assert any("is the optimized model" in f for f in rec["scores"]["flags"])
    assert rec["scores"]["contrast"] == contrast(Image.open(out / "logits-1_raw.png"), rec["mean_pixel"])
    assert "default* #" in stdout and f"RMS {levels_text(rec['scores']['contrast']['rms'])}" in stdout
    code = main(["score", str(out), "--judge", "default", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["scores"]["transfer"][0]["rank"] == t["rank"]
    assert json.loads((out / "scores.json").read_text()) == [row]
