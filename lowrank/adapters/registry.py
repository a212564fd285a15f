"""The variant registry: every Adapter subclass under its ``name``, and :func:`make`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .base import Adapter

_REGISTRY: dict[str, type[Adapter]] = {}
# Constructor parameters that are not options: the wrapped layer, and what a subclass passes up
# to Adapter.__init__ (the options its rank bounds read).
_NOT_OPTIONS = {"self", "base", "rank_options"}


class OptionError(TypeError):
    """An option that the variant's constructor does not take (a misspelt ``alpha``, say)."""


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add a variant to the registry under ``cls.name``. The class must set its
    own ``display_name`` (what figures and tables call it), one no other variant uses."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"variant name {cls.name!r} is empty or already registered")
    shown = vars(cls).get("display_name", "")
    if not (isinstance(shown, str) and shown.strip()):
        raise ValueError(
            f"variant {cls.name!r} ({cls.__qualname__}) has no display_name of its own; "
            "set the class attribute display_name to the name figures should show, "
            'e.g. display_name = "LoRA"'
        )
    taken = {other.display_name: name for name, other in _REGISTRY.items()}
    if shown in taken:
        raise ValueError(
            f"variant {cls.name!r} has display_name {shown!r}, which variant "
            f"{taken[shown]!r} already uses; give it a display_name of its own"
        )
    _REGISTRY[cls.name] = cls
    return cls


def variants() -> list[str]:
    """Sorted names of every registered variant."""
    return sorted(_REGISTRY)


def variant_class(name: str) -> type[Adapter]:
    """The Adapter subclass registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown variant {name!r}; choose one of: {', '.join(variants())}")
    return _REGISTRY[name]


def option_names(name: str) -> list[str] | None:
    """The options variant ``name`` takes: the keyword parameters after the layer of its
    constructor and, where that passes ``**common`` up, of its bases' (the common options rank,
    alpha, dropout and seed first); None when a constructor takes any keyword and passes none up."""
    found: list[list[str]] = []
    for klass in variant_class(name).__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        found.append(
            [
                p.name
                for p in params
                if p.name not in _NOT_OPTIONS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
        )
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return [n for names in reversed(found) for n in names]
    return None


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`OptionError` in one sentence, listing the valid options, when ``options``
    has a name that variant ``name``'s constructor does not take."""
    valid = option_names(name)
    unknown = [k for k in options if valid is not None and k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(
            f"unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} for {name}{hint}; valid: {', '.join(valid)}"
        )


def make(name: str, linear: nn.Linear, **options: Any) -> Adapter:
    """Wrap one ``nn.Linear`` in the variant ``name`` (see ``lr.variants()``); an option its
    constructor does not take is an :class:`OptionError` naming the valid ones."""
    cls = variant_class(name)
    check_options(name, options)
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
