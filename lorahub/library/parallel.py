"""Running one function over many files on every core: header parsing is pure Python (the GIL), so
threads would not help; forked worker processes do, and start in milliseconds (they share what the
parent already imported and loaded — a base model for `--fits`). Small batches, a single core, or a
platform without `fork` run in the calling process."""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

MIN_PARALLEL = 24  # fewer tasks than this run in process: forking costs more than it saves
MAX_WORKERS = 8


def workers() -> int:
    """The cores this process may use (its CPU affinity, not the machine's count), at most MAX_WORKERS."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_WORKERS))


def run_parallel(fn: Callable[[Any], Any], tasks: Sequence[Any], *,
                 progress: Callable[[int], None] | None = None) -> list[Any]:
    """[fn(task) for task in tasks], in order, across forked workers when it pays."""
    n = workers()
    if n >= 2 and len(tasks) >= MIN_PARALLEL:  # imported here: a warm listing never needs them
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
    if n < 2 or len(tasks) < MIN_PARALLEL or "fork" not in multiprocessing.get_all_start_methods():
        out = []
        for task in tasks:
            out.append(fn(task))
            if progress is not None:
                progress(1)
        return out
    chunk = max(1, min(64, len(tasks) // (n * 8)))
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("fork")) as pool:
        out = []
        for result in pool.map(fn, tasks, chunksize=chunk):
            out.append(result)
            if progress is not None:
                progress(1)
        return out
