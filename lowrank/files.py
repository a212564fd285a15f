"""Atomic writes: a file or directory appears complete at its path, or not at all.

>>> with atomic_path("results/r.csv") as tmp:  # doctest: +SKIP
...     df.to_csv(tmp, index=False)

The block writes to ``tmp`` (same name as the target, inside a private temporary directory next
to it, so the final rename stays on one file system); on success ``tmp`` is renamed over the
target, on any failure (an exception, Ctrl-C) it is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A not-yet-existing path to write a file or directory to, renamed over ``path`` when the
    block succeeds and removed when it fails; ``path``'s parent directories are created.

    An existing directory at ``path`` is moved aside first and deleted after the rename (two
    renames: a crash between them leaves it in the hidden temporary directory, never half-way).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp = scratch / path.name
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = scratch / ".old"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
