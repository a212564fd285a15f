"""The argparse types of the command lines (studies and ``lowrank``): each turns one word into a
value or raises ``argparse.ArgumentTypeError`` with one sentence naming the word and what to pass."""

from __future__ import annotations

import argparse
import json
import math

from . import tasks
from .adapters import variants

AUTO = "auto"  # --lr-grid auto (the default): every spec searches its own grid (lowrank.study.auto_grid)


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
        raise argparse.ArgumentTypeError(f"{text} is not a learning rate; pass a positive number "
                                         "such as 1e-3")
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
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; pass one such as "
                                         "'{\"key\": 1}'")
    return value
