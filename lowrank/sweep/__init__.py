"""Grid → runs → one tidy CSV row per run; resumable, with local, dask or submitit executors.

Every run is identified by ``run_id``, a hash of everything that defines it (task and its
options, variant and its options, rank, seed, learning rate, training config). After each run
the whole CSV is rewritten to a temporary file and renamed over the old one, so the file on disk
is always complete; re-running a sweep skips the run_ids already present, so it resumes after a
crash or Ctrl-C with nothing lost or duplicated.

Fair comparison (:func:`tuned_sweep`): each (task, variant, rank, options, training config) — a
run's ``group_id`` — gets its own learning rate, chosen on the dev split from a log grid at the
first seed with the same step budget as every other variant; the other seeds reuse it. The test
split is never used for a choice.

One module per concern: :mod:`.spec` (RunSpec, ids, provenance), :mod:`.run` (one run → one
row), :mod:`.executors` (where runs execute), :mod:`.results` (the CSV, resume) and
:mod:`.tuning` (learning-rate selection).
"""

from .executors import execute
from .results import read_results, saved_results, sweep, write_atomic
from .run import MEASURES, ROBUST_PGD_STEPS, decode_correct, encode_correct, run_one, training_hooks
from .spec import GROUP, KEY, RunSpec, provenance
from .tuning import (
    LEGACY_GROUP,
    best_lr,
    chosen_on,
    groups,
    log_grid,
    search_status,
    search_summary,
    tuned_rows,
    tuned_sweep,
)

__all__ = [
    "GROUP",
    "KEY",
    "LEGACY_GROUP",
    "MEASURES",
    "ROBUST_PGD_STEPS",
    "RunSpec",
    "best_lr",
    "chosen_on",
    "decode_correct",
    "encode_correct",
    "execute",
    "groups",
    "log_grid",
    "provenance",
    "read_results",
    "run_one",
    "saved_results",
    "search_status",
    "search_summary",
    "sweep",
    "training_hooks",
    "tuned_rows",
    "tuned_sweep",
    "write_atomic",
]
