"""The command lines' arguments (studies and ``lowrank ablate``): the argparse types, each turning one
word into a value or raising ``argparse.ArgumentTypeError`` with one sentence naming the word and
what to pass; the sweep options every study shares (:data:`COMMON`); and the default learning-rate
grid of ``--lr-grid auto`` (:func:`auto_grid`)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from . import tasks
from .adapters import variant_class, variants
from .sweep import RunSpec, log_grid

AUTO = "auto"  # --lr-grid auto (the default): every spec searches its own auto_grid


def _whole_number(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a rank, a count of seeds, steps ...)."""
    return _whole_number(text, 1)


def count(text: str) -> int:
    """argparse type: a whole number of at least 0 (how many extensions, retries ...)."""
    return _whole_number(text, 0)


def learning_rate(text: str) -> float:
    """argparse type: a positive, finite learning rate."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"{text} is not a learning rate; pass a positive number such as 1e-3"
        )
    return value


def grid_rate(text: str) -> float | str:
    """argparse type of --lr-grid: a learning rate, or ``auto`` (:func:`auto_grid`)."""
    return AUTO if text == AUTO else learning_rate(text)


def variant(text: str) -> str:
    """argparse type: the name of a registered variant."""
    if text not in variants():
        raise argparse.ArgumentTypeError(f"unknown variant {text!r}; choose from {', '.join(variants())}")
    return text


def task(text: str) -> str:
    """argparse type: the name of a task."""
    if text not in tasks.names():
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; choose from {', '.join(tasks.names())}")
    return text


def json_object(text: str) -> dict:
    """argparse type: a JSON object such as ``'{"alpha": 16}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; pass one such as '{{\"key\": 1}}'")
    return value


AUTO_POINTS = 3  # rates of an auto grid before any extension


def auto_grid(spec: RunSpec) -> list[float]:
    """The default grid of ``spec``: three rates half a decade apart (one decade in all)
    centred on its task's ``lr_centre`` × its variant's ``lr_scale`` (e.g. text, full
    fine-tuning: 1e-2 × 0.03 → 9.5e-5, 3e-4, 9.5e-4), by :func:`lowrank.sweep.log_grid`; the
    search steps past an edge from there (``--lr-extend``) until the best rate is interior."""
    return log_grid(
        tasks.task_class(spec.task).lr_centre * variant_class(spec.variant).lr_scale, points=AUTO_POINTS
    )


def search_grid(lr_grid: Sequence[float] | str) -> Sequence[float] | Callable[[RunSpec], list[float]]:
    """What :func:`lowrank.sweep.tuned_sweep` searches for --lr-grid ``lr_grid``: its rates, or
    for ``auto`` each spec's :func:`auto_grid`."""
    return auto_grid if lr_grid == AUTO else lr_grid


# The options add_common adds: name → add_argument keywords (a study may give its own help).
COMMON: dict[str, dict[str, Any]] = {
    "variants": {
        "nargs": "+",
        "type": variant,
        "metavar": "VARIANT",
        "help": "variants to compare, from {variants}",
    },
    "ranks": {"nargs": "+", "type": positive_int, "metavar": "R", "help": "ranks r"},
    "seeds": {"type": positive_int, "help": "number of seeds (0 … n−1)"},
    "lr_grid": {
        "nargs": "+",
        "type": grid_rate,
        "metavar": "LR",
        "default": AUTO,
        "help": "learning rates searched per variant and rank on the dev split at seed 0 "
        "(the best is reused for the other seeds)",
    },
    "lr_extend": {
        "type": count,
        "default": 3,
        "metavar": "N",
        "help": "when a search's best dev score is at an edge of the rates it tried, try "
        "one more rate a grid step past that edge and search again, at most "
        "N times (0: the grid alone)",
    },
    "steps": {"type": positive_int, "help": "optimiser steps per run"},
    "batch_size": {"type": positive_int, "help": "training batch size"},
    "workers": {"type": positive_int, "default": 2, "help": "parallel processes"},
    "threads": {"type": positive_int, "default": 1, "help": "torch threads of this process"},
    "executor": {
        "choices": ["local", "dask", "submitit"],
        "default": "local",
        "help": "local process pool, a dask.distributed cluster, or SLURM via submitit",
    },
    "scheduler": {
        "default": None,
        "help": "dask scheduler address (--executor dask; default: a private local "
        "cluster), or submitit cluster 'slurm' or 'local' (default: SLURM if "
        "present)",
    },
}
