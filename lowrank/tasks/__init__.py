"""Tasks: offline datasets and pretrained base models behind one interface (:class:`Task`).

>>> import lowrank.tasks
>>> lowrank.tasks.names()
['charlm', 'digits', 'mnist', 'synthetic', 'text']
>>> task = lowrank.tasks.get("synthetic", planted_rank=4)  # doctest: +SKIP

Task modules are imported on first use, so ``get("synthetic")`` never imports transformers.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .base import Classification, Task
from .pretrained import cache_dir
from .protocols import HasAnalysis, HasInputBounds, HasLengths, HasPerExampleScores, TrainTask

_REGISTRY = {
    "synthetic": "synthetic:Synthetic",
    "digits": "digits:Digits",
    "mnist": "mnist:MNIST",
    "text": "text:Text",
    "charlm": "charlm:CharLM",
}


def names() -> list[str]:
    """Sorted names of every task."""
    return sorted(_REGISTRY)


def task_class(name: str) -> type[Task]:
    """The Task subclass registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(names())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get(name: str, **options: Any) -> Task:
    """A new instance of the task ``name`` with ``options`` (see each task's docstring)."""
    cls = task_class(name)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(
            f"option {unknown[0]!r} is unknown for task {name!r}; valid options are: "
            f"{', '.join(valid) or 'none'}"
        )
    return cls(**options)


__all__ = [
    "Classification",
    "HasAnalysis",
    "HasInputBounds",
    "HasLengths",
    "HasPerExampleScores",
    "Task",
    "TrainTask",
    "cache_dir",
    "get",
    "names",
    "task_class",
]
