"""Adapter variants. Importing this package registers every variant."""

from . import adalora, dora, frobenius, full, loha, lokr, lora, random_alignment, svd_init, vera  # noqa: F401
from .base import Adapter, RankWarning, make, register, variant_class, variants
from .lora import LowRankAdapter

__all__ = ["Adapter", "LowRankAdapter", "RankWarning", "make", "register", "variant_class",
           "variants"]
