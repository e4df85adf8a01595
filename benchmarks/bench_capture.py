"""Capture overhead: capturing every layer and rendering one layer's grid vs a bare forward pass.

Default model, batch 1, 224 px, CPU (or --device cuda). Target: ratio <= 1.3.
Runs with the allocator settings the deepvis command uses (set DEEPVIS_NO_ALLOCATOR_TUNING=1 to see
glibc's defaults). Run: python benchmarks/bench_capture.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved
from deepvis.allocator import allocator_tuned, ensure_allocator_tuning

ensure_allocator_tuning()

from deepvis.capture import capture, layer_table  # noqa: E402
from deepvis.io import load_image, sample_path  # noqa: E402
from deepvis.models import load_model  # noqa: E402
from deepvis.render import tile_grid  # noqa: E402
from deepvis.runtime import synchronize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-tokens", action="store_true", help="skip the token-layer rows (they build a random ViT-Tiny)")
    args = ap.parse_args()
    model = load_model("default", device=args.device)
    x = model.preprocess(load_image(sample_path("coffee")))
    names = [r.name for r in layer_table(model)]
    capture(model, x, names)  # learn which outputs are modified in place

    def bare():
        with torch.no_grad():
            model.module(x)

    def all_layers_and_grid():
        acts = capture(model, x, names, stop_early=False)
        tile_grid(acts["blocks.3"][0])

    def one_layer_and_grid():
        acts = capture(model, x, ["blocks.3", "logits"], stop_early=False)
        tile_grid(acts["blocks.3"][0])

    t = interleaved(
        {"bare": bare, "all": all_layers_and_grid, "one": one_layer_and_grid}, repeats=40, sync=lambda: synchronize(model.device)
    )
    print(
        f"device: {model.device}, torch threads: {torch.get_num_threads()}, allocator tuned: {allocator_tuned()}, layers captured: {len(names)}"
    )
    print(f"bare forward:                          {t['bare'] * 1e3:7.2f} ms")
    print(f"capture all layers + render grid:      {t['all'] * 1e3:7.2f} ms   ratio {t['all'] / t['bare']:.2f} (target <= 1.3)")
    print(f"capture one layer + logits + grid:     {t['one'] * 1e3:7.2f} ms   ratio {t['one'] / t['bare']:.2f}")
    if not args.skip_tokens:
        tokens(args.device, t, model, x)


def tokens(device: str, t_map: dict[str, float], model, x) -> None:
    """A token layer against a map layer: capture's cost per captured element, beyond the bare forward.

    ViT-Tiny (timm, random weights: the cost does not depend on the weights) ``blocks.5``, (197, 192)
    tokens read as 192 maps of 14x14 plus the class token, against the default model's ``blocks.3``
    (80 maps of 14x14). Target: the token layer costs no more per element than the map layer."""
    vit = load_model("timm:vit_tiny_patch16_224", weights="random", device=device)
    xv = vit.preprocess(load_image(sample_path("coffee")))
    capture(vit, xv, ["blocks.5", "logits"], prefix=True)

    def bare():
        with torch.no_grad():
            vit.module(xv)

    def one_token_layer():
        acts = capture(vit, xv, ["blocks.5", "logits"], stop_early=False, prefix=True)
        tile_grid(acts["blocks.5"][0])

    t = interleaved({"bare": bare, "one": one_token_layer}, repeats=40, sync=lambda: synchronize(vit.device))
    map_elems = capture(model, x, ["blocks.3"])["blocks.3"][0].numel()
    tok_elems = capture(vit, xv, ["blocks.5"])["blocks.5"][0].numel() + 192  # the patch maps and the class token
    per_map = (t_map["one"] - t_map["bare"]) / map_elems * 1e9
    per_tok = (t["one"] - t["bare"]) / tok_elems * 1e9
    print(f"ViT-Tiny bare forward:                 {t['bare'] * 1e3:7.2f} ms")
    print(f"capture token layer + logits + grid:   {t['one'] * 1e3:7.2f} ms   ratio {t['one'] / t['bare']:.2f}")
    print(
        f"capture cost per element: map layer {per_map:.1f} ns ({map_elems} elements), token layer {per_tok:.1f} ns "
        f"({tok_elems} elements): ratio {per_tok / per_map:.2f} (target <= 1)"
    )


if __name__ == "__main__":
    main()
