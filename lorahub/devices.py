"""Where the math runs: device resolution, the per-layer worker pool, the fp32-exact matmul guard.

Every command that computes (merge, unmerge, resize, blend, extract) resolves `--device` here and runs
its per-layer work through `map_layers`, so the rules (what `auto` means, how many threads a layer
gets, TF32 off while lorahub computes) are the same everywhere.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from .errors import LorahubError
from .lazy import torch

T = TypeVar("T")
R = TypeVar("R")

DEVICE_HELP = "Where to compute: auto (CUDA when available), cpu, cuda or cuda:N."


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto`/None → CUDA when available, else CPU; `cuda` → the current CUDA device; refuse what
    this machine does not have with one line."""
    spec = str(device or "auto").lower()
    if spec == "auto":
        resolved = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            resolved = torch.device(spec)
        except RuntimeError:
            raise LorahubError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LorahubError(f"device '{device}' requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LorahubError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s)")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu":
        raise LorahubError(f"unsupported device '{device}' (use auto, cpu, cuda or cuda:N)")
    return resolved


def device_of(device: str | torch.device | None, *tensors: torch.Tensor) -> torch.device:
    """The device named, else the first tensor's, else the CPU (library calls that got tensors)."""
    if device is not None:
        return torch.device(device)
    for tensor in tensors:
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    saved = torch.get_num_threads()
    if saved != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


@contextlib.contextmanager
def exact_fp32_matmul() -> Iterator[None]:
    """No TF32 (or bf16) shortcuts in fp32 GEMMs while lorahub computes, whatever the caller set."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def default_workers(device: torch.device | str | None, parallel: bool = True) -> int:
    """Layers side by side on a CPU (one BLAS thread each: the QRs of n×R panels use many threads
    poorly); one layer at a time with every thread on CUDA or for dense work (`parallel=False`)."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    return torch.get_num_threads() if on_cpu and parallel else 1


def map_layers(job: Callable[[T], R], items: Iterable[T], *, device: torch.device | str | None = None,
               workers: int | None = None, parallel: bool = True, name: str = "lorahub") -> Iterator[R]:
    """`job` over `items`, results in order. With more than one worker (CPU only), a thread pool runs
    jobs with single-threaded torch ops and a bounded look-ahead (≤ 2·workers layers alive)."""
    items = list(items)
    on_cpu = device is None or torch.device(device).type == "cpu"
    count = default_workers(device, parallel) if workers is None else int(workers)
    count = max(1, min(count, len(items))) if on_cpu else 1
    if count == 1:
        if on_cpu and workers == 1:
            with torch_threads(1):
                yield from map(job, items)
        else:
            yield from map(job, items)
        return
    with torch_threads(1), ThreadPoolExecutor(max_workers=count, thread_name_prefix=name) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(job, item))
            if len(pending) >= 2 * count:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class Stopped(Exception):
    """A pipeline thread stopped waiting: another stage failed or the run was stopped."""


def get_unless_stopped(q: queue.Queue, stop: threading.Event):
    """The next item of `q` for a pipeline stage: waits until one comes, or raises `Stopped` once `stop`
    is set (so no thread waits forever on a stage that failed)."""
    while True:
        if stop.is_set():
            raise Stopped
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
