"""One run: a :class:`RunSpec` → the task's pretrained model, the variant injected, trained,
measured → one results row."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from .. import tasks
from ..adapters.registry import variant_class
from ..analysis import weight_report
from ..inject import inject
from ..tasks.base import Task
from ..tasks.protocols import HasPerExampleScores
from ..train import NonFiniteLossError, TrainConfig, fgsm, pgd, robust_accuracy, seed_everything, train
from .fingerprint import COLUMN, code_fingerprint
from .spec import GROUP, KEY, RunSpec, provenance


@functools.lru_cache(maxsize=8)
def _task(name: str, options: str) -> Task:
    return tasks.get(name, **json.loads(options))


def training_hooks(model: Any, variant: str, total_steps: int) -> list:
    """Hooks a variant needs inside the training loop (e.g. a rank allocator that prunes)."""
    make_hooks = getattr(variant_class(variant), "training_hooks", None)
    return list(make_hooks(model, total_steps)) if make_hooks else []


def _weights(model: Any, task: Task, config: TrainConfig) -> dict[str, Any]:
    """Column ``weights``: :func:`lowrank.analysis.weight_report` of every layer, as JSON."""
    return {"weights": json.dumps(weight_report(model))}


def _robustness(model: Any, task: Task, config: TrainConfig) -> dict[str, Any]:
    """Test accuracy clean, under FGSM and under 10-step PGD, at ε = ``config.adv_eps``."""
    eps, bounds = config.adv_eps, task.input_bounds
    return {
        "robust_eps": eps,
        "test_clean_accuracy": robust_accuracy(model, task, "test", None),
        "test_fgsm_accuracy": robust_accuracy(model, task, "test", fgsm(eps, bounds)),
        "test_pgd_accuracy": robust_accuracy(
            model, task, "test", pgd(eps, ROBUST_PGD_STEPS, config.seed, bounds)
        ),
    }


def _predictions(model: Any, task: Task, config: TrainConfig) -> dict[str, Any]:
    """Column ``test_correct``: the test split's per-example score of the headline metric
    (:func:`encode_correct`), for a paired comparison of two runs on the same examples."""
    return {"test_correct": encode_correct(task.correct(model, "test"))}


def encode_correct(correct: Any) -> str:
    """Per-example right/wrong scores as a string with one character per example, in split
    order: ``"1"`` right, ``"0"`` wrong (2,000 examples → 2,000 bytes in the CSV)."""
    return "".join("1" if c else "0" for c in np.asarray(correct, dtype=bool).ravel())


def decode_correct(text: Any) -> np.ndarray:
    """The 0/1 scores of :func:`encode_correct`'s string, as a float array."""
    if not (isinstance(text, str) and text and set(text) <= {"0", "1"}):
        raise ValueError(
            f"test_correct={str(text)[:40]!r} is not a string of 0s and 1s; read the "
            "CSV with lowrank.sweep.read_results (pandas alone reads it as a number)"
        )
    return (np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")).astype(np.float64)


ROBUST_PGD_STEPS = 10
# What RunSpec.measure may ask for after training: name → (model, task, config) → row columns.
MEASURES = {"weights": _weights, "robustness": _robustness, "predictions": _predictions}


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Build the task's pretrained model, inject the variant, train, and return the row."""
    unknown = sorted(set(spec.measure) - set(MEASURES))
    if unknown:
        raise ValueError(f"measure {unknown} is unknown; choose from {', '.join(MEASURES)}")
    task = _task(spec.task, json.dumps(spec.task_options, sort_keys=True))
    if "predictions" in spec.measure and not isinstance(task, HasPerExampleScores):
        scored = [n for n in tasks.names() if issubclass(tasks.task_class(n), HasPerExampleScores)]
        raise ValueError(
            f"measure 'predictions' needs per-example test scores, which task "
            f"{spec.task!r} (metric {task.metric!r}) does not give; ask for it on a "
            f"classification task: {', '.join(scored)}"
        )
    config = TrainConfig(seed=spec.seed, lr=spec.lr, quiet=True, **spec.train)
    seed_everything(spec.seed)
    model = task.pretrained()
    options = dict(spec.variant_options)
    if spec.rank is not None:
        options["rank"] = spec.rank
    inject(
        model,
        spec.variant,
        targets=task.targets,
        modules_to_save=task.modules_to_save,
        seed=spec.seed,
        **options,
    )
    row: dict[str, Any] = {
        KEY: spec.run_id,
        GROUP: spec.group_id,
        "task": spec.task,
        "variant": spec.variant,
        "rank": spec.rank,
        "seed": spec.seed,
        "lr": spec.lr,
        "task_options": json.dumps(spec.task_options, sort_keys=True),
        "variant_options": json.dumps(spec.variant_options, sort_keys=True),
        "targets": json.dumps(task.targets),
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "selection_metric": task.selection_metric or task.metric,
        **{k: v for k, v in asdict(config).items() if k not in ("seed", "lr", "quiet")},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        **provenance(),
        COLUMN: code_fingerprint(),
    }
    try:
        result = train(model, task, config, hooks=training_hooks(model, spec.variant, config.steps))
    except NonFiniteLossError as e:
        return {**row, "status": "diverged", "error": str(e)}
    measured = {k: v for name in spec.measure for k, v in MEASURES[name](model, task, config).items()}
    return {
        **row,
        "status": "ok",
        "error": "",
        "trainable_params": result.trainable_params,
        "train_seconds": round(result.train_seconds, 4),
        "peak_mem_mb": round(result.peak_mem_mb, 1),
        **result.metrics,
        "dev_curve": dev_curve(result.history, row["selection_metric"]),
        **measured,
    }


def dev_curve(history: list[dict[str, float]], metric: str) -> str:
    """The dev ``metric`` after each evaluation as JSON [[step, value], …] (6 significant
    digits), so a reader of the CSV sees whether the step budget converged."""
    return json.dumps([[h["step"], float(f"{h[metric]:.6g}")] for h in history if metric in h])
