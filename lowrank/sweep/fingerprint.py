"""Which code made a row: a hash of the source a run executes, recorded in every results row so
that resuming never mixes numbers of different code.

The hash covers what a run executes: :func:`lowrank.sweep.run.run_one`, the executors that call
it (they set the torch threads), every variant and every task (both registries import their
modules by name), with the modules
these import inside lowrank, followed statically (a package imported by name brings its
``__init__``; lowrank's own ``__init__`` only re-exports and is left out), and for rows a study
computes itself, the code that computes them (the study's script, or a module of its own such as
:mod:`lowrank.probe`). Each file counts as its syntax tree without docstrings, so
reformatting, comments and documentation change nothing, while any change to what the code does
changes the hash. Presentation (figures, the command line, adapter files, statistics) is outside
it: redrawing a figure or fixing a message does not make hours of runs stale.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from pathlib import Path

import pandas as pd

COLUMN = "code_fingerprint"
PACKAGE = Path(__file__).resolve().parent.parent
# What a run starts from; everything they import inside lowrank follows.
ENTRIES = ("sweep/run.py", "sweep/executors.py", "adapters", "tasks")


def _module_file(name: str) -> Path | None:
    """The file of lowrank module ``name`` (dotted, relative to the package), or None."""
    base = PACKAGE.joinpath(*name.split(".")) if name else PACKAGE
    if base.is_dir() and (base / "__init__.py").exists():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else None


def _imports(path: Path) -> set[Path]:
    """The lowrank files ``path`` imports anywhere in it (module level or inside functions)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from (a package's own, for __init__)
    found: set[Path | None] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            root = ".".join([*base, *([node.module] if node.module else [])])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lowrank":
            root = node.module.removeprefix("lowrank").lstrip(".")
        elif isinstance(node, ast.Import):
            found |= {
                _module_file(a.name.removeprefix("lowrank").lstrip("."))
                for a in node.names
                if a.name.split(".")[0] == "lowrank"
            }
            continue
        else:
            continue
        found.add(_module_file(root))
        found |= {_module_file(f"{root}.{a.name}".lstrip(".")) for a in node.names}
    return {p for p in found if p is not None and p != PACKAGE / "__init__.py"}


@functools.lru_cache(maxsize=1)
def run_files() -> tuple[Path, ...]:
    """The lowrank files a run executes (see the module docstring), sorted."""
    todo = []
    for entry in ENTRIES:
        path = PACKAGE / entry
        todo += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += sorted(_imports(path) - seen)
    return tuple(sorted(seen))


def _normalised(path: Path) -> str:
    """``path``'s syntax tree without docstrings, as text: blind to layout and comments."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def code_fingerprint(*scripts: str | os.PathLike) -> str:
    """12 hex digits of a hash of :func:`run_files` and ``scripts`` (a study's own script, for
    the rows it computes itself), each by its path inside the package and :func:`_normalised`."""
    h = hashlib.sha256()
    files = [(p.relative_to(PACKAGE).as_posix(), p) for p in run_files()]
    files += [(Path(s).name, Path(s)) for s in scripts]
    for name, path in files:
        h.update(name.encode() + b"\0" + _normalised(path).encode() + b"\0")
    return h.hexdigest()[:12]


def stale(df: pd.DataFrame, *scripts: str | os.PathLike) -> pd.Series:
    """Which rows of ``df`` were not made by the code at hand: their ``code_fingerprint`` is
    missing or neither :func:`code_fingerprint` (a sweep's run) nor that with ``scripts`` (a row
    the study computed itself)."""
    current = {code_fingerprint(), code_fingerprint(*scripts)}
    made = df[COLUMN] if COLUMN in df else pd.Series(None, index=df.index, dtype=object)
    return ~made.isin(current)
