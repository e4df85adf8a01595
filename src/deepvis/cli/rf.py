"""``deepvis rf``: the receptive field of a unit (and optionally its crop of an image)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DeepvisError, UnitError
from .common import (
    SAMPLE_HELP,
    add_json_option,
    add_model_options,
    add_output_option,
    existing_input,
    image_format,
    model_from_args,
    print_json,
)

if TYPE_CHECKING:
    from ..capture import Unit
    from ..models import Model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rf",
        help="print the receptive field of a unit (any architecture)",
        description="Print the input region that can influence a unit: LAYER (the whole map), LAYER@Y,X or "
        "LAYER:C@Y,X (the channel does not change the field). Composed exactly from the kernels, strides, padding "
        "and dilation of the executed graph (also when the field is larger than the input), or measured from "
        "gradient supports where the graph does not compose; after attention, global pooling or a fully "
        "connected layer the field is the whole image. The box is clipped to the image (marked clipped). "
        "A prefix token (LAYER@cls, LAYER:C@cls) is measured: the whole image after attention, or said to be "
        "input-independent when no input pixel reaches it (e.g. the class token before the first block). "
        "With --image and -o, also write "
        "the field's crop of that image (as the model sees it), padded at the borders to the full field size.",
    )
    p.add_argument(
        "--unit", required=True, metavar="LAYER[:C][@Y,X|@TOKEN]", help="e.g. blocks.3@5,5, blocks.3:17@5,5, blocks.3, blocks.5@cls"
    )
    p.add_argument("--image", metavar="IMAGE", help=f"an image to crop, or {SAMPLE_HELP}")
    add_output_option(p, metavar="OUT", help="where to write the crop (.png, .jpg or .webp); needs --image", required=False)
    add_json_option(p, "print the field as JSON")
    add_model_options(p)
    p.set_defaults(func=run)


def _parse(text: str) -> tuple[str, int, tuple[int, int] | None, str | None]:
    """(layer, channel, position, prefix token) of ``LAYER``, ``LAYER@Y,X``, ``LAYER@TOKEN`` or a unit
    address (the channel 0 where none is given: it does not change the field, but a given one is checked)."""
    from ..capture import parse_unit, split_token_layer

    text = text.strip()
    if ":" in text:
        u = parse_unit(text)
        return u.layer, u.channel, u.position, u.token
    split = split_token_layer(text)
    if split is not None:
        return split[0], 0, None, split[1]
    if "@" in text:
        layer, _, pos = text.partition("@")
        try:
            y, x = (int(v) for v in pos.split(","))
        except ValueError:
            raise UnitError(f"bad unit {text!r}: write LAYER, LAYER@Y,X, LAYER@TOKEN or LAYER:C@Y,X") from None
        if min(y, x) < 0:
            raise UnitError(f"bad unit {text!r}: the position must be >= 0")
        return layer, 0, (y, x), None
    return text, 0, None, None


def run(args: argparse.Namespace) -> int:
    from .._fs import atomic_path
    from ..backprop import crop_image, layer_field
    from ..capture import Unit, check_unit
    from ..io import load_image

    layer, channel, pos, token = _parse(args.unit)
    out = Path(args.output) if args.output else None
    if (out is None) != (args.image is None):
        raise DeepvisError("--image and -o go together: give both to write a crop, or neither")
    fmt = image_format(out) if out is not None else None
    src = existing_input(args.image) if args.image else None
    model = model_from_args(args)
    check_unit(model, Unit(layer, channel, pos, token))  # the layer, channel, position or token, in one line
    if token is not None:
        return _token(args, model, Unit(layer, 0, None, token), out, fmt, src)
    geo = layer_field(model, layer)
    rf = geo.at(pos)
    if out is not None and src is not None:
        image = model.preprocessing.fit(load_image(src, model.preprocessing.pil_mode))
        with atomic_path(out) as tmp:
            crop_image(image, rf).save(tmp, format=fmt)
    if args.json:
        print_json({**rf.to_dict(), "whole_image": geo.whole_image, "layer_field": geo.to_dict(), "output": str(out) if out else None})
        return 0
    top, left, bottom, right = rf.box
    where = f"{layer}@{pos[0]},{pos[1]}" if pos else f"{layer} (whole map)"
    print(f"{where}: input rows {top} to {bottom - 1}, columns {left} to {right - 1} ({bottom - top}x{right - left} px)")
    if rf.clipped:
        ft, fl, fb, fr = rf.field
        print(f"  clipped by the border; full field rows {ft} to {fb - 1}, columns {fl} to {fr - 1}")
    h, w = geo.input_size
    grid = f"{geo.output_size[0]}x{geo.output_size[1]} map, " if geo.output_size else ""
    if geo.whole_image is not None:
        print(f"  layer {layer}: {grid}field: the whole image, because of {geo.whole_image}; input {h}x{w}")
    else:
        sy, sx = geo.stride
        oy, ox = geo.offset
        notes = [f"field of (0,0) starts at {oy},{ox}"]
        if geo.size[0] > h or geo.size[1] > w:
            notes.append("the field is larger than the input")
        if geo.source != "graph":
            notes.append("measured from gradients, at most the input's size")
        print(f"  layer {layer}: {grid}field {geo.size[0]}x{geo.size[1]} px, stride {sy:g}x{sx:g} px, input {h}x{w}; {'; '.join(notes)}")
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _token(args: argparse.Namespace, model: Model, unit: Unit, out: Path | None, fmt: str | None, src: Path | None) -> int:
    """``deepvis rf`` for a prefix token: the whole image (with the reason), a box, or input-independent."""
    # the library is imported here, not at the top, so that --help never imports torch
    from .._fs import atomic_path
    from ..backprop import crop_image, receptive_field
    from ..io import load_image

    rf = receptive_field(model, unit)
    where = f"{unit.layer}@{unit.token}"
    if rf.input_independent and out is not None:
        raise DeepvisError(f"{where} does not depend on the input: there is no field to crop")
    if out is not None and src is not None:
        image = model.preprocessing.fit(load_image(src, model.preprocessing.pil_mode))
        with atomic_path(out) as tmp:
            crop_image(image, rf).save(tmp, format=fmt)
    if args.json:
        print_json({**rf.to_dict(), "output": str(out) if out else None})
        return 0
    h, w = rf.input_size
    if rf.input_independent:
        print(
            f"{where} (prefix token): input-independent; no input pixel reaches it (before any attention the token is "
            f"the model's own constant, e.g. a learned class token plus its position embedding), so it has no receptive field"
        )
    elif rf.whole_image is not None:
        print(f"{where} (prefix token): the whole image ({h}x{w} px), because of {rf.whole_image}")
    else:
        top, left, bottom, right = rf.box
        print(
            f"{where} (prefix token): input rows {top} to {bottom - 1}, columns {left} to {right - 1} ({bottom - top}x{right - left} px; measured)"
        )
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0
