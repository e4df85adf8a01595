"""The server's settings, one typed object (what ``deepvis serve`` fills from its options)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..models.model import Model
from ..scores import DEFAULT_JUDGES

__all__ = ["ServerConfig", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_UPLOAD_PIXELS", "DEFAULT_MAX_VIDEO_BYTES"]

#: uploads larger than this are refused with 413 before they are decoded
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: uploaded images with more pixels than this are refused (decompression bombs)
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
#: video files the browser cannot play are decoded by the server up to this size
DEFAULT_MAX_VIDEO_BYTES = 256 * 1024 * 1024


@dataclass
class ServerConfig:
    """How to build the app.

    ``model`` is a model spec (see ``deepvis models``) or a loaded :class:`~deepvis.models.Model`;
    ``weights``/``labels``/``input_size``/``device`` apply to a spec. ``atlas`` is an atlas folder
    (optional); ``report`` a report's JSON (optional). ``dataset`` (a folder, a ``.txt`` list or
    ``demo``) is mined in the background for the layers the pages select, into ``atlas`` (created or
    continued) or, without one, into a temporary atlas removed when the app closes. ``host``/``port`` are where the server listens (used in the printed URL and to accept
    that name in the ``Host`` header). ``token`` is the launch token (None: a random one per app).
    ``allowed_hosts`` adds host names the browser may use (e.g. this machine's name when listening on
    0.0.0.0). ``frame_origins`` are the origins allowed to frame the page (``deepvis.toolbox``: the notebook's;
    none: no page may). ``max_sessions`` caps the pages served at once.
    """

    model: str | Model = "default"
    weights: str | None = None
    labels: str | None = None
    input_size: int | None = None
    device: str = "auto"
    atlas: str | os.PathLike[str] | None = None
    #: a report's JSON (``deepvis report``): the summary pane shows its numbers for the layers it covers
    report: str | os.PathLike[str] | None = None
    #: a dataset to mine in the background (``deepvis serve --dataset DIR|demo``)
    dataset: str | os.PathLike[str] | None = None
    #: inputs kept per unit and inputs per forward pass when mining ``dataset`` (a layer the atlas
    #: holds already keeps its recorded parameters)
    mining_top: int = 9
    mining_batch_size: int = 32
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    frame_origins: tuple[str, ...] = field(default_factory=tuple)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    max_sessions: int = 16
    #: compute the backprop view of the selected unit and its receptive fields (``deepvis serve --no-backprop``: off)
    backprop: bool = True
    #: allow on-demand synthesis (activation maximization) of the selected unit
    synthesis: bool = True
    #: synthesis settings for layers the atlas has no parameters for (preset of the paper's Table 1,
    #: optimization steps, canvas size in pixels: None for the model's input size)
    synthesis_preset: str = "3"
    synthesis_steps: int | None = 200
    synthesis_size: int | None = None
    #: the models that judge synthesized and accentuated images (transfer, plausibility: deepvis.scores),
    #: loaded by the synthesis worker the first time a figure needs them; () for none
    judges: tuple[str, ...] = DEFAULT_JUDGES
    #: the live frames' and the background miner's forward passes run under autocast (``"bf16"``,
    #: ``"fp16"``; None: off; see :func:`deepvis.runtime.autocast`); the backprop view, receptive
    #: fields, synthesis and the miner's crops and views run in the model's own dtype
    autocast: str | None = None
