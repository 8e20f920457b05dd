"""`lorahub list --fits BASE`: the adapters that validate against a base model.

The base is read once (headers only, any spec `lorahub validate` takes: a folder, a file, a registry name,
a Hub repo); each adapter is read (headers; `.alpha` scalars) and checked by `lorahub.validate` itself, so
`--fits` keeps exactly what `lorahub validate ADAPTER --base BASE` passes. The checks run in forked
worker processes, which share the base loaded here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import LorahubError
from .parallel import run_parallel

if TYPE_CHECKING:
    from ..base import BaseModel
    from . import Entry, Problem

_BASE: "BaseModel | None" = None  # set before the workers fork; they inherit it


def load_fits_base(spec: str) -> "BaseModel":
    from ..base import load_base

    return load_base(spec)


def check_fit(path: str) -> tuple[bool, str | None]:
    """(fits, error): whether the adapter at `path` validates against the base (`None` error), or why it
    could not be checked."""
    from ..formats import load_adapter
    from ..validate import validate

    assert _BASE is not None
    try:
        report = validate(load_adapter(path), _BASE, suggest=False)
    except LorahubError as exc:
        return False, str(exc)
    return report.ok and report.matched > 0, None


def _task(path: str) -> tuple[bool, str | None]:
    return check_fit(path)


def keep_fitting(entries: list["Entry"], base: "BaseModel") -> tuple[list["Entry"], int, list["Problem"]]:
    """(the entries that fit, how many did not, the ones that could not be checked as problems)."""
    from . import Problem

    global _BASE
    _BASE = base
    try:
        results: list[Any] = run_parallel(_task, [entry.candidate.key for entry in entries])
    finally:
        _BASE = None
    kept, problems, misfits = [], [], 0
    for entry, (fits, error) in zip(entries, results):
        if error is not None:
            problems.append(Problem(entry.name, f"cannot check against {base.display_name}: {error}"))
        elif fits:
            kept.append(entry)
        else:
            misfits += 1
    return kept, misfits, problems
