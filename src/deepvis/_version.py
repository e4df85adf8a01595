"""The package version, in one place (``deepvis.__version__`` and the atlas's metadata read it)."""

__version__ = "0.1.0"
