"""The warning for a rank above what a variant can use on a layer, issued once per case."""

from __future__ import annotations

import os
import sys
import warnings


class RankWarning(UserWarning):
    """A rank above the variant's :meth:`Adapter.useful_rank` for a layer: legal (PEFT accepts it
    too), but the extra rank adds parameters and no expressiveness. Issued once per process for
    each (variant, layer shape, rank, useful rank); silence it with
    ``warnings.filterwarnings("ignore", category=lr.RankWarning)``."""


_RANK_WARNED: set[tuple] = set()  # (variant, out, in, rank, useful)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _caller_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that points at the first
    frame outside lowrank, the user's ``make``/``inject`` call (Python ≥ 3.12's
    ``skip_file_prefixes``, by hand)."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    return level


def warn_once(key: tuple, message: str) -> None:
    """A :class:`RankWarning` with ``message`` the first time ``key`` (variant, out, in, rank,
    useful rank) is seen in this process, pointing at the user's call."""
    if key not in _RANK_WARNED:
        _RANK_WARNED.add(key)
        warnings.warn(message, RankWarning, stacklevel=_caller_stacklevel())
