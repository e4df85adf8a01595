"""``deepvis serve``: the live toolbox in the browser."""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
from pathlib import Path

from ..errors import DeepvisError
from .common import add_autocast_option, add_model_options, model_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start the live toolbox in the browser",
        description="Start a local web app showing every layer of the model responding to your camera, a video, "
        "an image or the sample photos, live. Prints the URL to open; it carries a random token that every "
        "request needs, so other pages and users cannot drive the server.",
    )
    p.add_argument(
        "--atlas",
        metavar="ATLAS",
        help="an atlas folder (see `deepvis atlas`): top images and synthesized images per unit; with --dataset, "
        "the folder the mining is kept in (created, or continued where it stopped)",
    )
    p.add_argument(
        "--dataset",
        metavar="DIR",
        help="mine this dataset (a folder of images, a .txt list, or demo) in the background for the layer you "
        "select: each unit's top-9 inputs, their receptive-field crops and deconv views fill the unit pane as they "
        "come (kept in --atlas, else in a temporary atlas removed at exit)",
    )
    p.add_argument(
        "--report",
        metavar="JSON",
        help="a report's JSON (see `deepvis report`): the summary pane shows its activity, locality and sensitivity "
        "for the layers it covers (other layers: live statistics of the frames seen)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept this host name in the browser's address (with --host 0.0.0.0 this machine's own names "
        "and addresses are accepted already); repeatable",
    )
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for the network (default: PyTorch's choice)")
    p.add_argument("--no-backprop", action="store_true", help="do not offer the backprop view")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="server log level; info logs each request, with the launch token hidden (default: %(default)s)",
    )
    add_autocast_option(p, "the live frames' and the dataset miner's forward passes")
    add_model_options(p)
    p.set_defaults(func=run)


def machine_names() -> list[str]:
    """This machine's host names and addresses (accepted in the Host header when listening on all addresses)."""
    names = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(socket.gaierror):  # no resolvable name: the names above and --allow-host still apply
        names |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    return sorted(n for n in names if n)


def url_for(host: str, port: int, token: str) -> str:
    """The URL to open: loopback for wildcard addresses, brackets around IPv6 addresses."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/?token={token}"


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; a model that cannot be loaded or an atlas or report of another model is a one-line error."""
    # imported here, not at the top: they import torch and the web stack, and `deepvis --help` must not
    import torch

    from ..server import ServerConfig, create_app
    from ..server.listen import listen, uvicorn_server

    if args.threads is not None:
        if args.threads < 1:
            raise DeepvisError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.atlas is not None and not Path(args.atlas).is_dir() and args.dataset is None:
        raise DeepvisError(
            f"atlas {args.atlas} is a file, not an atlas folder" if Path(args.atlas).exists() else f"atlas folder not found: {args.atlas}"
        )
    if args.dataset is not None and args.dataset != "demo" and not Path(args.dataset).exists():
        raise DeepvisError(f"dataset not found: {args.dataset} (give a folder of images, a .txt list of image paths, or demo)")
    if args.report is not None and not Path(args.report).is_file():
        raise DeepvisError(f"report not found: {args.report}")
    sock = listen(args.host, args.port, option="--port")
    try:
        port = sock.getsockname()[1]
        allowed = list(args.allow_host)
        if args.host in ("0.0.0.0", "::", ""):
            allowed += machine_names()
        config = ServerConfig(
            model=model_from_args(args),  # the model options of every command, --layout included
            atlas=args.atlas,
            dataset=args.dataset,
            report=args.report,
            host=args.host,
            port=port,
            allowed_hosts=tuple(allowed),
            backprop=not args.no_backprop,
            autocast=args.autocast,
        )
        app = create_app(config)
        token = app.state.toolbox.token
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"deepvis serve: listening on {args.host}: anyone who can reach this machine and has the token can use it", file=sys.stderr
            )
        print(f"deepvis serve: open {url_for(args.host, port, token)}", flush=True)
        print("(Ctrl-C to stop)", file=sys.stderr, flush=True)
        server = uvicorn_server(app, log_level=args.log_level)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
