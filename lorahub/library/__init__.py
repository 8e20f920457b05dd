"""The adapter library: every adapter under some folders and in the Hugging Face cache, from headers.

    list_library(paths=None, format=None, sort="name", fits=None) -> Listing
    remove.plan(target) -> Removal; remove.execute(removal)      (`lorahub rm`)
    remote.check_hub_adapters(models, base) -> {repo_id: HubCheck}   (`lorahub search --check`)

    scan      walking paths (and the cache layout) into adapter candidates
    describe  one candidate's summary from its header (no tensor data)
    index     the SQLite index in LORAHUB_HOME: only what changed is read again
    parallel  forked worker processes for header parsing and --fits
    fits      --fits: which adapters validate against a base

The listing runs no torch code and its modules import none when loaded: headers are parsed by
`lorahub.storage`, formats told apart by the registry's key detection (tests/test_library.py checks both).
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import OptionError
from .describe import describe as describe_candidate
from .index import Index, default_index_path
from .parallel import run_parallel
from .scan import Candidate, Scan, scan

SORTS = ("name", "size", "rank", "modified")


def _distribution(pairs: list[list[Any]] | None) -> dict[str, Any]:
    return {str(value): count for value, count in (pairs or [])}


def _one(pairs: list[list[Any]] | None) -> Any:
    return pairs[0][0] if pairs and len(pairs) == 1 else None


def iso_time(ns: int) -> str:
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Entry:
    """One adapter of the library."""

    candidate: Candidate
    summary: dict[str, Any]

    @property
    def path(self) -> str:
        return self.candidate.path

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def format(self) -> str | None:
        return self.summary.get("format")

    @property
    def max_rank(self) -> int:
        return max((int(r) for r, _ in self.summary.get("ranks") or []), default=0)

    def to_dict(self) -> dict[str, Any]:
        """The row of `lorahub list --json` (docs/json.md): the contract's keys where it has them."""
        s, c = self.summary, self.candidate
        location = c.location
        return {
            "path": c.path,
            "name": c.name,
            "repo_id": location.repo_id if location else None,
            "revision": location.commit if location else None,
            "refs": list(location.refs) if location else [],
            "format": s.get("format"),
            "algorithm": s.get("algorithm"),
            "family": s.get("family"),
            "base_model": s.get("base_model"),
            "modules": s.get("modules"),
            "rank": _one(s.get("ranks")), "rank_distribution": _distribution(s.get("ranks")),
            "alpha": _one(s.get("alphas")), "alpha_distribution": _distribution(s.get("alphas")),
            "scale": _one(s.get("scales")), "scale_distribution": _distribution(s.get("scales")),
            "alpha_from": s.get("alpha_from"),
            "targets": _distribution(s.get("targets")),
            "components": _distribution(s.get("components")),
            "lycoris": s.get("lycoris") or {},
            "dora": bool(s.get("dora")),
            "rslora": bool(s.get("rslora")),
            "params": s.get("params"),
            "size": c.size,
            "modified": iso_time(c.modified_ns),
            "files": [path for path, _ in c.files],
            "also": list(c.also),
        }


@dataclass
class Problem:
    path: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}


@dataclass
class Listing:
    roots: list[str]
    entries: list[Entry]
    problems: list[Problem]
    index_path: str | None
    read: int  # candidates whose headers were read this run
    reused: int  # candidates whose summary came from the index
    warnings: list[str] = field(default_factory=list)
    base: str | None = None  # --fits
    excluded: int = 0  # adapters --fits left out
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "roots": self.roots,
            "adapters": [entry.to_dict() for entry in self.entries],
            "problems": [problem.to_dict() for problem in self.problems],
            "index": {"path": self.index_path, "read": self.read, "reused": self.reused},
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }
        if self.base is not None:
            payload["base"] = self.base
            payload["excluded"] = self.excluded
        return payload


def _strip_path(message: str, candidate: Candidate) -> str:
    """The message without the path it starts with when that is the adapter's (the row names it already);
    a file inside an adapter's folder is named by its file name."""
    if message.startswith(candidate.key + ": "):
        return message[len(candidate.key) + 2:]
    for path, _ in candidate.files:
        if message.startswith(path + ": "):
            return os.path.basename(path) + ": " + message[len(path) + 2:]
    return message


def _describe_task(task: tuple[str, list[str]]) -> dict[str, Any]:
    return describe_candidate(*task)


def summaries(candidates: list[Candidate], index: Index,
              progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Each candidate's summary, from the index when its stamp still matches, else from its header (in
    parallel); new summaries are stored. Returns (summaries, how many were read)."""
    stored = index.lookup(c.key for c in candidates)
    out: list[dict[str, Any] | None] = []
    todo: list[int] = []
    for i, candidate in enumerate(candidates):
        hit = stored.get(candidate.key)
        if hit is not None and hit[0] == candidate.stamp:
            out.append(hit[1])
        else:
            out.append(None)
            todo.append(i)
    if todo:
        tasks = [(candidates[i].kind, [path for path, _ in candidates[i].files]) for i in todo]
        described = run_parallel(_describe_task, tasks, progress=progress)
        for i, summary in zip(todo, described):
            out[i] = summary
        index.store([(candidates[i].key, candidates[i].stamp, out[i] or {}) for i in todo])
    return [s or {} for s in out], len(todo)


def list_library(paths: list[str | os.PathLike] | None = None, *, format: str | None = None, sort: str = "name",
                 fits: str | None = None, index_path: str | os.PathLike | None = None, use_index: bool = True,
                 progress: Callable[[int], None] | None = None) -> Listing:
    """Every adapter under `paths` (default: the Hugging Face cache and the LORAHUB_LIBRARY folders), one
    `Entry` each, from headers only; corrupt ones as `problems`. `format` keeps one format, `sort` orders
    (name ascending; size, rank, modified descending), `fits` keeps the adapters that validate against
    that base (any base `lorahub validate` takes)."""
    if sort not in SORTS:
        raise OptionError(f"unknown sort '{sort}' (choose from {', '.join(SORTS)})")
    started = time.perf_counter()
    found: Scan = scan(paths)
    base_model = None
    if fits is not None:  # the base first: a base that cannot be read fails before any work
        from .fits import load_fits_base

        base_model = load_fits_base(fits)
    index = Index(default_index_path() if index_path is None else Path(index_path)) if use_index else Index(None)
    with index:
        described, read = summaries(found.candidates, index, progress)
        seen = {c.key for c in found.candidates}
        index.prune(found.walked, seen)
        index_used = str(index.path) if index.path is not None and index.usable else None
    entries: list[Entry] = []
    problems = [Problem(path, message) for path, message in found.errors]
    for candidate, summary in zip(found.candidates, described):
        status = summary.get("status")
        if status == "adapter":
            entries.append(Entry(candidate, summary))
        elif status == "problem":
            problems.append(Problem(candidate.name, _strip_path(str(summary.get("error")), candidate)))
    if format is not None:
        entries = [e for e in entries if e.format == format]
    listing = Listing(found.roots, entries, problems, index_used, read,
                      len(found.candidates) - read, [index.warning] if index.warning else [])
    if base_model is not None:
        from .fits import keep_fitting

        listing.entries, misfits, failed = keep_fitting(entries, base_model)
        listing.base = base_model.display_name
        listing.excluded = misfits
        listing.problems += failed
    listing.entries = sort_entries(listing.entries, sort)
    listing.seconds = time.perf_counter() - started
    return listing


def sort_entries(entries: list[Entry], sort: str) -> list[Entry]:
    by_name = sorted(entries, key=lambda e: (e.name.casefold(), e.name))
    if sort == "size":
        return sorted(by_name, key=lambda e: -e.candidate.size)
    if sort == "rank":
        return sorted(by_name, key=lambda e: -e.max_rank)
    if sort == "modified":
        return sorted(by_name, key=lambda e: -e.candidate.modified_ns)
    return by_name


__all__ = ["SORTS", "Entry", "Listing", "Problem", "list_library", "sort_entries", "summaries"]
