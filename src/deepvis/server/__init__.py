"""The live toolbox in the browser (``deepvis serve``): a FastAPI app over the library.

>>> from deepvis.server import ServerConfig, create_app
>>> app = create_app(ServerConfig(model="default"))          # doctest: +SKIP
>>> app.state.toolbox.token                                   # doctest: +SKIP

The library never imports this package.
"""

from .app import Toolbox, create_app
from .config import ServerConfig
from .engine import LiveEngine
from .protocol import ViewSettings

__all__ = ["create_app", "ServerConfig", "Toolbox", "LiveEngine", "ViewSettings"]
