"""Adapter variants. Importing this package registers every variant: each module in it is
imported, so a new variant is one new file here (its class registers itself with ``@register``)."""

import importlib
import pkgutil

from .base import Adapter
from .lora import LowRankAdapter
from .ranks import RankWarning
from .registry import OptionError, make, register, variant_class, variants

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "Adapter",
    "LowRankAdapter",
    "OptionError",
    "RankWarning",
    "make",
    "register",
    "variant_class",
    "variants",
]
