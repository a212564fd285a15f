"""Grid → runs → one tidy CSV row per run; resumable, with local or dask.distributed executors.

Every run is identified by ``run_id``, a hash of everything that defines it (task and its
options, variant and its options, rank, seed, learning rate, training config). After each run
the whole CSV is rewritten to a temporary file and renamed over the old one, so the file on disk
is always complete; re-running a sweep skips the run_ids already present, so it resumes after a
crash or Ctrl-C with nothing lost or duplicated.

Fair comparison (:func:`tuned_sweep`): each (task, variant, rank, options, training config) — a
run's ``group_id`` — gets its own learning rate, chosen on the dev split from a log grid at the
first seed with the same step budget as every other variant; the other seeds reuse it. The test
split is never used for a choice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._version import __version__
from .files import atomic_path
from .inject import inject
from .train import (
    NonFiniteLossError,
    TrainConfig,
    fgsm,
    pgd,
    robust_accuracy,
    seed_everything,
    train,
)

KEY = "run_id"
GROUP = "group_id"  # the runs that share one learning-rate search


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``rank=None`` for variants without a rank (``full``)."""

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


@functools.lru_cache(maxsize=8)
def _task(name: str, options: str) -> Any:
    from . import tasks

    return tasks.get(name, **json.loads(options))


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Versions, commit, hardware and threads, recorded in every row."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or "unknown"
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


def training_hooks(model: Any, variant: str, total_steps: int) -> list:
    """Hooks a variant needs inside the training loop (AdaLoRA's rank allocator)."""
    from .adapters.base import variant_class

    make_hooks = getattr(variant_class(variant), "training_hooks", None)
    return list(make_hooks(model, total_steps)) if make_hooks else []


def _weights(model: Any, task: Any, config: TrainConfig) -> dict[str, Any]:
    """Column ``weights``: :func:`lowrank.analysis.weight_report` of every layer, as JSON."""
    from .analysis import weight_report

    return {"weights": json.dumps(weight_report(model))}


def _robustness(model: Any, task: Any, config: TrainConfig) -> dict[str, Any]:
    """Test accuracy clean, under FGSM and under 10-step PGD, at ε = ``config.adv_eps``."""
    eps, bounds = config.adv_eps, getattr(task, "input_bounds", None)
    return {"robust_eps": eps,
            "test_clean_accuracy": robust_accuracy(model, task, "test", None),
            "test_fgsm_accuracy": robust_accuracy(model, task, "test", fgsm(eps, bounds)),
            "test_pgd_accuracy": robust_accuracy(model, task, "test",
                                                 pgd(eps, ROBUST_PGD_STEPS, config.seed, bounds))}


ROBUST_PGD_STEPS = 10
# What RunSpec.measure may ask for after training: name → (model, task, config) → row columns.
MEASURES = {"weights": _weights, "robustness": _robustness}


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Build the task's pretrained model, inject the variant, train, and return the row."""
    unknown = sorted(set(spec.measure) - set(MEASURES))
    if unknown:
        raise ValueError(f"measure {unknown} is unknown; choose from {', '.join(MEASURES)}")
    task = _task(spec.task, json.dumps(spec.task_options, sort_keys=True))
    config = TrainConfig(seed=spec.seed, lr=spec.lr, quiet=True, **spec.train)
    seed_everything(spec.seed)
    model = task.pretrained()
    options = dict(spec.variant_options)
    if spec.rank is not None:
        options["rank"] = spec.rank
    inject(model, spec.variant, targets=task.targets, modules_to_save=task.modules_to_save,
           seed=spec.seed, **options)
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
        "selection_metric": getattr(task, "selection_metric", "") or task.metric,
        **{k: v for k, v in asdict(config).items() if k not in ("seed", "lr", "quiet")},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        **provenance(),
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
        **measured,
    }


def read_results(path: str | os.PathLike, key: str | None = KEY) -> pd.DataFrame:
    """The results CSV as a DataFrame (empty when the file does not exist). With ``key``, a
    file without that column is refused: it was not written by lowrank and must not be
    overwritten."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame()
    df = pd.read_csv(path)
    if key is not None and key not in df.columns:
        raise ValueError(
            f"{path} exists but was not written by a lowrank sweep (no {key!r} column); "
            "choose another output path so it is not overwritten"
        )
    return df


def saved_results(path: str | os.PathLike, key: str | None = KEY) -> pd.DataFrame | None:
    """:func:`read_results` for a study's ``--plot-only``: None, after saying on stderr that the
    study has to run first, when ``path`` holds no rows."""
    df = read_results(path, key=key)
    if df.empty:
        print(f"{path} does not exist; run without --plot-only first", file=sys.stderr)
        return None
    return df


def write_atomic(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` as CSV (no index) through :func:`lowrank.files.atomic_path`."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _execute(specs: Sequence[RunSpec], workers: int, executor: str, scheduler: str | None,
             folder: Path):
    """Yield finished rows in completion order. ``scheduler``: a dask scheduler address, or
    submitit's cluster name (``"slurm"``, ``"local"``; None picks SLURM when present)."""
    if executor == "dask":
        try:
            from distributed import Client, LocalCluster
            from distributed import as_completed as dask_completed
        except ImportError as e:
            raise ImportError(
                "--executor dask needs dask.distributed; pip install 'lowrank[cluster]'"
            ) from e
        if scheduler:
            client = Client(scheduler)
        else:  # a private cluster on loopback, no dashboard
            client = Client(LocalCluster(n_workers=workers, threads_per_worker=1,
                                         host="127.0.0.1", dashboard_address=None))
        try:
            futures = client.map(run_one, list(specs), pure=False)
            for fut in dask_completed(futures):
                yield fut.result()
        finally:
            cluster = client.cluster
            client.close()
            if cluster is not None and not scheduler:
                cluster.close()
    elif executor == "submitit":  # SLURM when available, else local subprocesses
        try:
            import submitit
        except ImportError as e:
            raise ImportError(
                "--executor submitit needs submitit; pip install 'lowrank[cluster]'"
            ) from e
        ex = submitit.AutoExecutor(folder=folder, cluster=scheduler)
        ex.update_parameters(timeout_min=24 * 60, cpus_per_task=1)
        jobs = ex.map_array(run_one, list(specs))
        for job in submitit.helpers.as_completed(jobs):
            yield job.result()
    elif executor == "local" and workers <= 1:
        for spec in specs:
            yield run_one(spec)
    elif executor == "local":
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            futures = [pool.submit(run_one, s) for s in specs]
            try:
                for fut in as_completed(futures):
                    yield fut.result()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    else:
        raise ValueError(f"executor={executor!r} is unknown; use 'local', 'dask' or 'submitit'")


def sweep(
    specs: Iterable[RunSpec],
    out: str | os.PathLike,
    workers: int = 1,
    executor: str = "local",
    scheduler: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every spec whose run_id is not in ``out`` yet; append each row as it finishes.

    Returns the whole table (old and new rows).
    """
    df = read_results(out)
    done = set(df[KEY]) if len(df) else set()
    pending = list(dict.fromkeys(s for s in specs if s.run_id not in done))
    rows = df.to_dict("records")
    bar = tqdm(total=len(pending), desc="runs", disable=not progress or not pending,
               file=sys.stderr)
    logs = Path(out).parent / f".{Path(out).stem}.submitit"  # submitit's job folder
    for row in _execute(pending, workers, executor, scheduler, logs):
        rows.append(row)
        write_atomic(pd.DataFrame(rows), out)
        bar.update()
    bar.close()
    return pd.DataFrame(rows) if rows else df


LEGACY_GROUP = ["task", "variant", "rank", "task_options", "variant_options"]


def groups(df: pd.DataFrame) -> pd.Series:
    """Each row's learning-rate search group: ``group_id`` (every field of the spec but seed and
    lr, so training configurations never share a search), or for rows written before that
    column existed, their (task, variant, rank, options)."""
    legacy = pd.Series(["|".join(map(str, t)) for t in df[LEGACY_GROUP].itertuples(index=False)],
                       index=df.index, dtype=object)
    return df[GROUP].fillna(legacy) if GROUP in df else legacy


def best_lr(df: pd.DataFrame, search_seed: int = 0) -> pd.DataFrame:
    """The learning rate each search group (:func:`groups`) reached its best dev
    ``selection_metric`` with (default: the headline metric), at ``search_seed``; diverged runs
    count as worst. Columns: ``group``, the legacy group columns and ``lr``."""
    df = df[df["seed"] == search_seed].assign(group=groups)
    chosen_on = df["selection_metric"] if "selection_metric" in df else df["metric"]
    metric = "dev_" + chosen_on.fillna(df["metric"])
    df["_dev"] = [row.get(m, float("nan")) for row, m in zip(df.to_dict("records"), metric)]
    sign = df["higher_is_better"].map({True: -1.0, False: 1.0, "True": -1.0, "False": 1.0})
    df["_score"] = (df["_dev"] * sign).fillna(float("inf"))
    pick = df.sort_values(["_score", "lr"]).groupby("group", sort=False).head(1)
    return pick[["group", *LEGACY_GROUP, "lr"]].reset_index(drop=True)


def tuned_sweep(
    base: Sequence[RunSpec],
    lr_grid: Sequence[float] | Callable[[RunSpec], Sequence[float]],
    seeds: Sequence[int],
    out: str | os.PathLike,
    **execute: Any,
) -> pd.DataFrame:
    """Per-variant learning-rate search on dev at ``seeds[0]``, then the other seeds at the best
    learning rate. ``base`` holds one spec per (task, variant, rank, options, training config);
    its seed and lr are replaced. ``lr_grid`` is one grid for all, or a function giving each
    spec its own. Returns the rows of the chosen learning rates for every seed; in the CSV,
    ``lr_selected`` marks exactly those rows of these groups (a row chosen by an earlier,
    different grid loses the mark) and ``lr_selection`` says how they were chosen."""
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed")
    grids = {s.group_id: list(lr_grid(s) if callable(lr_grid) else lr_grid) for s in base}
    for s in base:
        if not grids[s.group_id]:
            raise ValueError(f"the learning-rate grid of {s.variant} (rank {s.rank}) is empty; "
                             "give it at least one rate")
    search = [replace(s, seed=seeds[0], lr=x) for s in base for x in grids[s.group_id]]
    df = _with_groups(sweep(search, out, **execute), search)
    chosen = best_lr(df[df[GROUP].isin(grids)], seeds[0])
    lookup = dict(zip(chosen["group"], chosen["lr"]))
    final = [replace(s, seed=seed, lr=lookup[s.group_id]) for s in base for seed in seeds]
    df = _with_groups(sweep(final, out, **execute), search + final)
    selected = df[KEY].isin({s.run_id for s in final})
    earlier = df["lr_selected"].fillna(False).astype(bool) if "lr_selected" in df else False
    df["lr_selected"] = selected | (earlier & ~df[GROUP].isin(grids))
    chosen_on = df["selection_metric"] if "selection_metric" in df else df["metric"]
    if "lr_selection" not in df:
        df["lr_selection"] = None
    df["lr_selection"] = df["lr_selection"].where(df["lr_selected"], None)
    df.loc[selected, "lr_selection"] = [
        f"best dev {m} of lr {'/'.join(f'{x:g}' for x in grids[g])} at seed {seeds[0]}, "
        "reused for the other seeds" for m, g in zip(chosen_on[selected], df.loc[selected, GROUP])]
    write_atomic(df, out)
    return df[selected].copy()


def _with_groups(df: pd.DataFrame, specs: Sequence[RunSpec]) -> pd.DataFrame:
    """``df`` with ``group_id`` filled in from ``specs`` by run_id (rows of older versions)."""
    known = {s.run_id: s.group_id for s in specs}
    filled = df[KEY].map(known)
    df[GROUP] = filled.fillna(df[GROUP]) if GROUP in df else filled
    return df


def tuned_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows run at each search group's dev-chosen learning rate (:func:`best_lr`), every
    seed: what the figures show."""
    best = best_lr(df)[["group", "lr"]]
    return df.assign(group=groups).merge(best, on=["group", "lr"], how="inner").drop(columns="group")
