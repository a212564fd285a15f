"""The package version, in a module of its own so that submodules can import it without
importing the package (``from . import __version__`` would run ``lowrank/__init__`` first)."""

__version__ = "0.1.0"
