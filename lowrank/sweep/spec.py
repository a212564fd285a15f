"""What a run is: :class:`RunSpec`, its ``run_id`` and ``group_id``, and the provenance every
row records."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

KEY = "run_id"
GROUP = "group_id"  # the runs that share one learning-rate search


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``rank=None`` for variants without a rank.

    ``run_id`` hashes :meth:`canonical`, and results CSVs resume on it: any change to the JSON
    it produces (a renamed or new field, another key order or float format) re-runs every
    committed run.
    """

    task: str
    variant: str
    rank: int | None
    seed: int
    lr: float
    task_options: dict[str, Any] = field(default_factory=dict)
    variant_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields besides seed, lr
    measure: tuple[str, ...] = ()  # measurements after training, names of MEASURES

    def canonical(self) -> str:
        d = asdict(self)
        if not d["measure"]:  # so run_ids from before the field existed stay valid
            del d["measure"]
        else:
            d["measure"] = sorted(d["measure"])
        return json.dumps(d, sort_keys=True, default=str)

    @property
    def run_id(self) -> str:
        return hashlib.sha1(self.canonical().encode()).hexdigest()[:16]

    @property
    def group_id(self) -> str:
        """The runs that share one learning-rate search: everything but seed and lr."""
        return replace(self, seed=0, lr=0.0).run_id

    def __hash__(self) -> int:
        return hash(self.canonical())


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Versions, commit and hardware, recorded in every row."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "lowrank_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": commit,
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    }
