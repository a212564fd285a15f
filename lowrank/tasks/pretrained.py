"""Pretrained bases: a deterministic pretraining loop, the on-disk cache of pretrained weights
(safetensors under ``$LOWRANK_CACHE``, default ``~/.cache/lowrank``) and where a data package is.

A pretrained base never depends on the run seed (:data:`PRETRAIN_SEED`), so every run of a task
adapts the same network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..files import atomic_path
from .protocols import Batch

CACHE_VERSION = "1"  # bump to invalidate every cached pretrained model
PRETRAIN_SEED = 0  # pretrained bases never depend on the run seed


def package_dir(package: str, pip: str) -> Path:
    """Directory of the installed ``package`` (found without importing it); ``pip`` is the
    install command the error message suggests when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"this task needs the {package} package; install it with `{pip}`")
    return Path(next(iter(spec.submodule_search_locations)))


def pretrain(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    tensors: Sequence[Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    clip: float | None = None,
) -> nn.Module:
    """Adam on every parameter for ``steps`` shuffled mini-batches (seeded by PRETRAIN_SEED)."""
    gen = torch.Generator().manual_seed(PRETRAIN_SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n, step = len(tensors[0]), 0
    model.train()
    while step < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, max(1, n - batch_size + 1), batch_size):
            idx = perm[i : i + batch_size]
            loss = loss_fn(model, tuple(t[idx] for t in tensors))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            step += 1
            if step >= steps:
                break
    return model.eval()


# ---------------------------------------------------------------------- the weight cache
def cache_dir() -> Path:
    """Where pretrained weights are cached: ``$LOWRANK_CACHE`` or ``~/.cache/lowrank``."""
    return Path(os.environ.get("LOWRANK_CACHE") or "~/.cache/lowrank").expanduser()


def cached_pretrained(
    task: str, options: dict[str, Any], model: nn.Module, train: Callable[[nn.Module], Any]
) -> nn.Module:
    """Load ``model``'s weights from the cache, or ``train(model)`` and cache them.

    The cache file is keyed by the task name, its pretraining ``options`` and
    :data:`CACHE_VERSION`; it is written to a temporary file and renamed into place, so a
    crash or a concurrent writer never leaves a partial file. An unreadable file is rebuilt.
    """
    key = json.dumps(
        {"task": task, "options": options, "version": CACHE_VERSION}, sort_keys=True, default=str
    )
    path = cache_dir() / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        try:
            state = load_file(path)
            model.load_state_dict(state, strict=True)
            return model.eval()
        except (SafetensorError, OSError, RuntimeError) as e:
            warnings.warn(f"cached weights {path} are unreadable ({e}); retraining", stacklevel=2)
    train(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"key": key})
    return model.eval()
