"""Where runs execute: in this process, a local process pool, a dask.distributed cluster or
submitit (SLURM, or local subprocesses). Optional dependencies are imported on use."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def execute(
    fn: Callable[[T], Any],
    items: Sequence[T],
    workers: int,
    executor: str,
    scheduler: str | None,
    folder: Path,
) -> Iterator[Any]:
    """Yield ``fn(item)`` for every item, in completion order. ``fn`` must be importable by name
    (it is pickled by reference). ``scheduler``: a dask scheduler address, or submitit's cluster
    name (``"slurm"``, ``"local"``; None picks SLURM when present); ``folder``: submitit's job
    folder."""
    if executor == "dask":
        yield from _dask(fn, items, workers, scheduler)
    elif executor == "submitit":
        yield from _submitit(fn, items, scheduler, folder)
    elif executor == "local" and workers <= 1:
        for item in items:
            yield fn(item)
    elif executor == "local":
        yield from _pool(fn, items, workers)
    else:
        raise ValueError(f"executor={executor!r} is unknown; use 'local', 'dask' or 'submitit'")


def _pool(fn: Callable[[T], Any], items: Sequence[T], workers: int) -> Iterator[Any]:
    """A pool of spawned processes sharing the cores; pending runs are cancelled on an error."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _dask(fn: Callable[[T], Any], items: Sequence[T], workers: int, scheduler: str | None) -> Iterator[Any]:
    """The cluster at ``scheduler``, or a private one on loopback without a dashboard."""
    try:
        from distributed import Client, LocalCluster
        from distributed import as_completed as dask_completed
    except ImportError as e:
        raise ImportError("executor='dask' needs dask.distributed; pip install 'lowrank[cluster]'") from e
    if scheduler:
        client = Client(scheduler)
    else:
        client = Client(
            LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None)
        )
    try:
        futures = client.map(fn, list(items), pure=False)
        for fut in dask_completed(futures):
            yield fut.result()
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and not scheduler:
            cluster.close()


def _submitit(
    fn: Callable[[T], Any], items: Sequence[T], scheduler: str | None, folder: Path
) -> Iterator[Any]:
    """One job array, one CPU and at most a day per run."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError("executor='submitit' needs submitit; pip install 'lowrank[cluster]'") from e
    ex = submitit.AutoExecutor(folder=folder, cluster=scheduler)
    ex.update_parameters(timeout_min=24 * 60, cpus_per_task=1)
    jobs = ex.map_array(fn, list(items))
    for job in submitit.helpers.as_completed(jobs):
        yield job.result()
