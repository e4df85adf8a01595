"""The one conversion of float pixel values to ``uint8``.

Every picture deepvis writes or sends ends here: values are scaled, rounded half up (``floor(v + 0.5)``)
and clipped to 0–255. This module sits at the bottom of the package (it imports only numpy and torch),
so that models, io, render, backprop, optimize, the atlas and the server can all use it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8"]


def to_uint8(x: np.ndarray | torch.Tensor, *, scale: float = 255.0) -> np.ndarray:
    """Float pixel values → ``uint8`` of the same shape: ``clip(floor(x · scale + 0.5), 0, 255)``.

    Args:
        x: an array or tensor (any device: a tensor is detached and copied to the CPU), in [0, 1]
            with the default ``scale``; values outside are clipped. NaN is not allowed (its result
            is undefined); callers that may hold NaN replace it first.
        scale: multiplier applied before rounding: 255 for values in [0, 1], 1 for values already
            on the 0–255 scale.

    Returns:
        A numpy ``uint8`` array of ``x``'s shape.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(x)
    if arr.dtype == np.uint8 and scale == 1.0:
        return arr
    # float64 stays float64 (a value like 189.49999 must not round up through a float32 cast)
    out = arr * scale if scale != 1.0 else arr.astype(np.result_type(arr.dtype, np.float32), copy=True)
    out += 0.5
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)
