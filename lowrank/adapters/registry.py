"""The variant registry: every Adapter subclass under its ``name``, and :func:`make`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .base import Adapter

_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add a variant to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"variant name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def variants() -> list[str]:
    """Sorted names of every registered variant."""
    return sorted(_REGISTRY)


def variant_class(name: str) -> type[Adapter]:
    """The Adapter subclass registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown variant {name!r}; choose one of: {', '.join(variants())}"
        )
    return _REGISTRY[name]


def make(name: str, linear: nn.Linear, **options: Any) -> Adapter:
    """Wrap one ``nn.Linear`` in the variant ``name`` (see ``lr.variants()``)."""
    cls = variant_class(name)
    with grad_flags_kept_on_error(linear):
        return cls(linear, **options)


@contextmanager
def grad_flags_kept_on_error(module: nn.Module) -> Iterator[None]:
    """Restore the ``requires_grad`` flags of ``module``'s parameters if the block raises, so a
    failed construction leaves the caller's layer (or model) as it was."""
    flags = [(p, p.requires_grad) for p in module.parameters()] if isinstance(module, nn.Module) else []
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
