"""The linear-probe baseline of the text task: logistic regression on the frozen encoder's
mean-pooled token states, its inverse regularisation C chosen on dev (Alain & Bengio, 2016,
arXiv 1610.01644).

A probe row is computed here, not by a sweep, so it is stamped with the fingerprint of the run
code and of this module (:func:`lowrank.sweep.fingerprint.code_fingerprint`): a study's tables
and figures can change without making its probes stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pandas as pd
import torch

from . import tasks
from .sweep import KEY, provenance, read_results, write_atomic
from .sweep.fingerprint import COLUMN, code_fingerprint
from .train import PeakMemory

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
VARIANT = "probe"  # the ``variant`` of a probe row


def fingerprint() -> str:
    """The ``code_fingerprint`` a probe row made by the code at hand carries."""
    return code_fingerprint(__file__)


def probe_id(options: dict) -> str:
    """The ``run_id`` of the probe of the text task with ``options``."""
    text = json.dumps({"probe": options, "C": list(C_GRID)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@torch.no_grad()
def sentence_embeddings(task: tasks.Task, split: str) -> np.ndarray:
    """Mean-pooled token states of the frozen encoder, as the classifier head reads them."""
    model = task.pretrained().eval()
    ids, mask, _ = task.split(split).tensors
    out = []
    for i in range(0, len(ids), 256):
        n = int(mask[i : i + 256].sum(1).max())
        m = mask[i : i + 256, :n]
        h = model.encoder(input_ids=ids[i : i + 256, :n], attention_mask=m).last_hidden_state
        w = m.unsqueeze(-1).to(h.dtype)
        out.append(((h * w).sum(1) / w.sum(1).clamp_min(1e-9)).numpy())
    return np.concatenate(out)


def probe_row(options: dict) -> dict:
    """The probe of the text task with ``options`` (no adapter options: a probe adapts nothing)
    as a results row: dev and test accuracy and macro-F1 at the C of :data:`C_GRID` with the best
    dev accuracy (ties to the smaller C), its parameter count, time and peak memory."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    task = tasks.get("text", **options)
    start = time.perf_counter()
    with PeakMemory() as mem:
        x = {s: sentence_embeddings(task, s) for s in ("train", "dev", "test")}
        y = {s: task.split(s).tensors[2].numpy() for s in x}
        fits = {c: LogisticRegression(C=c, max_iter=5000).fit(x["train"], y["train"]) for c in C_GRID}
        c = max(C_GRID, key=lambda c: (fits[c].score(x["dev"], y["dev"]), -c))
    pred = {s: fits[c].predict(x[s]) for s in ("dev", "test")}
    metrics = {
        f"{s}_{k}": v
        for s in pred
        for k, v in (
            ("accuracy", float((pred[s] == y[s]).mean())),
            ("macro_f1", float(f1_score(y[s], pred[s], average="macro"))),
        )
    }
    return {
        KEY: probe_id(options),
        "task": "text",
        "variant": VARIANT,
        "rank": None,
        "seed": 0,
        "lr": None,
        "task_options": json.dumps(options, sort_keys=True),
        "metric": "accuracy",
        "higher_is_better": True,
        "status": "ok",
        "lr_selected": True,
        "lr_selection": f"C of {'/'.join(map(str, C_GRID))} with the best dev accuracy: {c:g}",
        "trainable_params": int(fits[c].coef_.size + fits[c].intercept_.size),
        "train_seconds": round(time.perf_counter() - start, 4),
        "peak_mem_mb": mem.peak,
        "threads": torch.get_num_threads(),
        **provenance(),
        **metrics,
        COLUMN: fingerprint(),
    }


def add_probes(out: str | os.PathLike, option_sets: list[dict]) -> None:
    """Fit the probe of each of ``option_sets`` that the CSV at ``out`` holds no row of made by
    the code at hand (:func:`fingerprint`), and put its row in place of any older one; the CSV
    is rewritten atomically after each."""
    current = fingerprint()
    for options in option_sets:
        df, key = read_results(out), probe_id(options)
        held = df[df[KEY] == key] if not df.empty else df
        if not held.empty and COLUMN in held and (held[COLUMN] == current).all():
            continue
        rest = df[df[KEY] != key] if not df.empty else df
        write_atomic(pd.concat([rest, pd.DataFrame([probe_row(options)])], ignore_index=True), out)
