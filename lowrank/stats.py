"""Uncertainty of a comparison: paired bootstrap intervals and Holm's correction.

Two methods A and B are evaluated on the same test examples with the same seeds, so their
scores are paired twice: by example and by seed. :func:`paired_bootstrap` resamples test
examples (keeping A's and B's score on an example together, and the seeds paired) and reports
the mean difference A − B with a percentile interval and a two-sided p-value; :func:`holm`
corrects a family of p-values for multiple comparisons (Holm, 1979, Scand. J. Statist. 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Comparison", "paired_bootstrap", "holm"]


@dataclass(frozen=True)
class Comparison:
    """Mean difference A − B, its ``level`` interval [low, high] and a two-sided p-value."""

    diff: float
    low: float
    high: float
    p: float
    level: float
    n_boot: int

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the difference is significant at ``alpha`` (uncorrected)."""
        return self.p < alpha


def _scores(x: np.ndarray | list, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} has shape {a.shape}; pass per-example scores as (seeds, examples)")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf scores; pass finite per-example scores")
    return a


def paired_bootstrap(
    a: np.ndarray | list,
    b: np.ndarray | list,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    shared_examples: bool = True,
) -> Comparison:
    """Mean over seeds and examples of a − b, with a paired bootstrap interval and p-value.

    Parameters
    ----------
    a, b : array of shape (seeds, examples) or (examples,)
        Per-example scores (e.g. 1 for a correct prediction, 0 otherwise) of the two methods;
        row s of ``a`` and row s of ``b`` come from the same seed and the same test examples.
    n_boot : int
        Bootstrap replicates. Each draws, for every seed, ``examples`` indices with replacement
        and takes the mean of a − b over the drawn examples and the seeds.
    level : float
        Coverage of the percentile interval.
    seed : int
        Seed of the resampling (the result is a deterministic function of its inputs).
    shared_examples : bool
        True (default): every seed evaluated the same test examples, so one draw of indices
        serves all seeds of a replicate and an example's difficulty stays shared across seeds.
        False: the seeds' rows are independent samples and each is resampled on its own.

    Returns
    -------
    Comparison
        ``diff`` = mean(a − b); [``low``, ``high``] the percentile interval of the replicates;
        ``p`` = (1 + #{|d* − diff| ≥ |diff|}) / (1 + n_boot), the centred bootstrap test of
        "no difference" (1 when a and b agree on every example).
    """
    a, b = _scores(a, "a"), _scores(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"a has shape {a.shape} but b {b.shape}; the scores must be paired "
            "(same seeds, same examples, same order)"
        )
    if not (isinstance(n_boot, int) and n_boot >= 100):
        raise ValueError(f"n_boot={n_boot!r}; pass an integer of at least 100 replicates")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must lie in (0, 1), e.g. 0.95")
    d = a - b
    seeds, n = d.shape
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    chunk = max(1, 2_000_000 // (seeds * n))  # bound the index array to ~16 MB
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        shape = (k, 1, n) if shared_examples else (k, seeds, n)
        idx = rng.integers(0, n, size=shape)
        reps[start : start + k] = np.take_along_axis(
            d[None], np.broadcast_to(idx, (k, seeds, n)), axis=2
        ).mean(axis=(1, 2))
    diff = float(d.mean())
    tail = (1 - level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    extreme = int(np.count_nonzero(np.abs(reps - diff) >= abs(diff)))
    return Comparison(
        diff=diff,
        low=float(low),
        high=float(high),
        p=(1 + extreme) / (1 + n_boot),
        level=level,
        n_boot=n_boot,
    )


def holm(pvalues: np.ndarray | list) -> np.ndarray:
    """Holm's step-down adjusted p-values: p̃₍ᵢ₎ = max_{j≤i} min(1, (m − j + 1)·p₍ⱼ₎) over the
    sorted p-values, returned in the input order. Rejecting where p̃ < α controls the
    family-wise error rate at α for any dependence between the tests."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1) | np.isnan(p)).any():
        raise ValueError(f"pvalues={pvalues!r}; pass a 1-D sequence of p-values in [0, 1]")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out
