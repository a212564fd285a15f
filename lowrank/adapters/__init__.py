"""Adapter variants. Importing this package registers every variant."""

from . import frobenius, full, lora, random_alignment, svd_init  # noqa: F401  (registration)
from .base import Adapter, make, register, variant_class, variants
from .lora import LowRankAdapter

__all__ = ["Adapter", "LowRankAdapter", "make", "register", "variant_class", "variants"]
