"""Inputs: every Pillow mode by one policy, EXIF, damaged files, decompression bombs, videos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deepvis.errors import InputError
from deepvis.io import VideoWriter, load_image, read_frames, resolve_input, sample_photos, to_mode, video_info


def _save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode, value, rgb",
    [
        ("1", 1, 255),
        ("L", 100, 100),
        ("I;16", 65535, 255),
        ("I;16", 257 * 10, 10),
        ("I", 200, 200),  # values inside 0-255 are taken as 8-bit
        ("I", 65535, 255),  # otherwise as 16-bit
        ("F", 0.5, 128),  # 0-1 floats
        ("F", 77.0, 77),  # otherwise 0-255
    ],
)
def test_gray_and_high_depth_modes(mode, value, rgb):
    im = Image.new(mode, (3, 2), value)
    out = to_mode(im, "RGB")
    assert out.mode == "RGB" and out.size == (3, 2)
    assert np.asarray(out)[0, 0].tolist() == [rgb] * 3


def test_color_modes_and_alpha_policy():
    assert to_mode(Image.new("RGB", (2, 2), (10, 20, 30))).getpixel((0, 0)) == (10, 20, 30)
    assert to_mode(Image.new("RGBA", (2, 2), (10, 20, 30, 0))).getpixel((0, 0)) == (255, 255, 255)  # over white
    assert to_mode(Image.new("RGBA", (2, 2), (0, 0, 0, 255))).getpixel((0, 0)) == (0, 0, 0)
    assert to_mode(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_mode(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert to_mode(p).getpixel((0, 0)) == (0, 255, 0)
    assert to_mode(Image.new("RGB", (2, 2), (255, 0, 0)), "L").getpixel((0, 0)) == 76  # ITU-R 601-2 luma


def test_file_formats_and_exif_orientation(tmp_path):
    base = Image.new("RGB", (4, 2), (200, 10, 10))
    for ext in ("jpg", "png", "webp", "bmp", "tiff", "gif"):
        im = load_image(_save(base, tmp_path / f"a.{ext}"))
        assert im.size == (4, 2) and im.mode == "RGB"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = load_image(_save(base, tmp_path / "rot.jpg", exif=exif))
    assert rotated.size == (2, 4)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, g, b = load_image(tmp_path / "anim.gif").getpixel((0, 0))
    assert r > 200 and b < 50


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = {
        tmp_path / "missing.png": "not found",
        tmp_path / "empty.png": "empty",
        tmp_path / "text.png": "not an image",
        tmp_path / "cut.png": "damaged or truncated",
        tmp_path: "not a file",
    }
    for path, msg in cases.items():
        with pytest.raises(InputError, match=msg) as err:
            load_image(path)
        assert "\n" not in str(err.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # tiny file, 144 megapixels
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")
    Image.new("1", (3000, 3000)).save(tmp_path / "big.png")  # under Pillow's limit, over ours
    with pytest.raises(InputError, match="9 megapixels, over the 1 MP limit"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)


def test_sample_photos_are_offline():
    photos = sample_photos()
    assert {"coffee", "chelsea", "astronaut", "rocket", "china", "grace_hopper"} <= set(photos)
    assert resolve_input("sample:coffee") == photos["coffee"]
    with pytest.raises(InputError, match="no sample photo named"):
        resolve_input("sample:nothing")


def test_video_round_trip(tmp_path):
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, fps=10) as w:
        for i in range(6):
            w.write(np.full((32, 48, 3), i * 40, dtype=np.uint8))
    frames = list(read_frames(path))
    assert len(frames) == 6 and frames[0][1].size == (48, 32)
    assert [i for i, _ in read_frames(path, step=2)] == [0, 2, 4]
    assert len(list(read_frames(path, max_frames=2))) == 2
    brightness = [np.asarray(f).mean() for _, f in frames]
    assert brightness == sorted(brightness)
    n, fps = video_info(path)
    assert fps == pytest.approx(10)


def test_bad_videos(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01junk" * 100)
    with pytest.raises(InputError, match="empty"):
        list(read_frames(tmp_path / "empty.mp4"))
    with pytest.raises(InputError, match="cannot open video|no video stream|no decodable") as exc:
        list(read_frames(tmp_path / "junk.mp4"))
    assert "Errno" not in str(exc.value) and str(exc.value).count("junk.mp4") == 1  # FFmpeg's reason, said once
