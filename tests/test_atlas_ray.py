"""The Ray engine (2 local workers) builds the same atlas as the local engine. Ray starts once here."""

from __future__ import annotations

import pytest

from deepvis.atlas import AtlasOptions, SynthesisOptions, build_atlas, open_atlas

ray = pytest.importorskip("ray")


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.mark.slow
def test_ray_engine_equals_local_engine_on_the_demo_dataset(tmp_path):
    from deepvis.models import load_model

    model = load_model("default", device="cpu", input_size=96)  # small inputs keep the test quick
    options = AtlasOptions(
        layers=("blocks.0", "blocks.1"),
        top=3,
        batch_size=32,
        units="0-1",
        synthesis=SynthesisOptions(steps=2, size=64, units_per_batch=2),
        checkpoint_seconds=0.0,
        decode_threads=1,
    )
    local = build_atlas(tmp_path / "local", model, "demo", options)
    try:
        remote = build_atlas(tmp_path / "ray", model, "demo", options, engine="ray", workers=2)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert local.images_mined == remote.images_mined == 368
    assert remote.units_viewed == local.units_viewed == 4 and remote.units_synthesized == 4
    with open_atlas(tmp_path / "local") as a, open_atlas(tmp_path / "ray") as b:
        da, db = a.dump(), b.dump()
        for table in da:
            assert da[table] == db[table], table
        assert b.integrity_check() == "ok"
    fa, fb = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert len(fa) == 2 * 2 * (3 * 2 + 2) and fa == fb
