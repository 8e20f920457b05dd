"""Layers in batches: which layers go together, their factors stacked on the device, overlap.

`plan_batches` groups same-shape layers (any key) and cuts the groups to sizes that suit the device;
`stack_factors` reads a batch's factors into one (b, rows, cols) tensor (file bytes straight into
their slot; to a GPU through pinned memory); `to_cpu` brings a batch of results back; `prefetched`
loads the next batch in a background thread (its own CUDA stream) while the current one computes.
Used by `resize` with `lowrank.BatchedFactoredSVD`; `blend` can batch the same way.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor

from .adapter import ST_DTYPES

T = TypeVar("T")
R = TypeVar("R")


# per batch: layers and bytes of factors in the compute dtype. On a GPU a batch is a chain of ~30
# batched kernels whatever its size, so batches are large (but small enough that the next one's
# copy to the device overlaps the current one's work); on the CPU the LAPACK calls run matrix by
# matrix anyway (one geqrf over a batch measured 1.6× slower than a loop: cache), so batches only
# share the bookkeeping and are kept small, several per group, for the worker threads.
GPU_BATCH_LAYERS, GPU_BATCH_BYTES = 64, 256 << 20
CPU_BATCH_LAYERS, CPU_BATCH_BYTES = 16, 64 << 20


def plan_batches(keys: Sequence[Hashable], nbytes: Sequence[int], *, device: torch.device | str | None = None,
                 max_layers: int | None = None, max_bytes: int | None = None, workers: int = 1) -> list[list[int]]:
    """Indices of items grouped by `keys` (items that can be stacked: same shapes and dtypes), each
    group cut into near-equal batches of at most `max_layers` items and `max_bytes` (`nbytes` each),
    and on the CPU into at least `workers` batches where the group allows. Groups in first-seen order."""
    on_gpu = device is not None and torch.device(device).type != "cpu"
    max_layers = max_layers or (GPU_BATCH_LAYERS if on_gpu else CPU_BATCH_LAYERS)
    max_bytes = max_bytes or (GPU_BATCH_BYTES if on_gpu else CPU_BATCH_BYTES)
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    batches: list[list[int]] = []
    for indices in groups.values():
        per_item = max(1, max(nbytes[i] for i in indices))
        size = max(1, min(max_layers, max_bytes // per_item))
        count = -(-len(indices) // size)
        if not on_gpu:
            count = max(count, min(workers, len(indices)))
        bounds = [(len(indices) * j) // count for j in range(count + 1)]
        batches += [indices[bounds[j]:bounds[j + 1]] for j in range(count)]
    return batches


def stack_factors(tensors: Sequence, shape: tuple[int, ...], *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """b tensors or `LazyTensor`s reshaped to `shape`, stacked into one (b, *shape) tensor of `dtype` on
    `device`. File-backed factors are read straight into their slot (`LazyTensor.load_into`). To a
    GPU the stored bytes travel (bf16 stays half the size) from a pinned staging buffer (about 3× the
    speed of copying from ordinary memory) and are converted there."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    first = tensors[0]
    stored = first.dtype if isinstance(first, Tensor) else ST_DTYPES.get(first.dtype, dtype)
    if dev.type == "cpu" and stored == dtype:
        out = torch.empty((len(tensors), *shape), dtype=dtype)
        _fill(out, tensors)
        return out
    stage = torch.empty((len(tensors), *shape), dtype=stored, pin_memory=dev.type == "cuda")
    _fill(stage, tensors)
    return stage.to(dev, non_blocking=True).to(dtype)


def _fill(out: Tensor, tensors: Sequence) -> None:
    for slot, tensor in zip(out, tensors):
        if isinstance(tensor, Tensor):
            slot.copy_(tensor.reshape(slot.shape))
        else:
            tensor.load_into(slot)


def to_cpu(batch: Tensor) -> Tensor:
    """A device batch in ordinary CPU memory, through a pinned buffer: a copy from a GPU straight into
    fresh pageable memory ran at ~1 GB/s on an H200 host (page faults inside the driver's copy); into
    pinned memory and then one multi-threaded CPU copy, ~5× faster."""
    if batch.device.type == "cpu":
        return batch
    staging = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
    staging.copy_(batch, non_blocking=True)
    torch.cuda.current_stream(batch.device).synchronize()
    return staging.clone()  # ordinary memory: the pinned block goes back to torch's cache


def prefetched(load: Callable[[T], tuple], compute: Callable[..., R], batches: Sequence[T], *,
               device: torch.device | str | None = None) -> Iterator[R]:
    """`compute(batch, *load(batch))` for each batch in order, the next batch's `load` running in a
    background thread (on a GPU on its own CUDA stream) while the current batch computes."""
    from concurrent.futures import ThreadPoolExecutor

    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = dev.type == "cuda"

    def load_ready(batch: T) -> tuple:
        if not cuda:
            return load(batch)
        stream = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            loaded = load(batch)
        stream.synchronize()
        return loaded

    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorahub-load") as pool:
        pending = pool.submit(load_ready, batches[0])
        for index, batch in enumerate(batches):
            loaded = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(load_ready, batches[index + 1])
            if cuda:  # allocated on the loader's stream: keep the memory until this stream is done with it
                current = torch.cuda.current_stream(dev)
                for tensor in loaded:
                    if isinstance(tensor, Tensor) and tensor.is_cuda:
                        tensor.record_stream(current)
            yield compute(batch, *loaded)
