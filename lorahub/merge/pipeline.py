"""Running the file jobs: a reader thread, the computing (calling) thread and a writer thread overlap
(read k+1 / compute k / write k−1). Untouched byte ranges are copied kernel-side (`copy_file_range`).
On CUDA the host↔device copies run on one stream per buffer slot from pinned memory. Memory is
bounded by a few slots of the largest touched tensor.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..adapter import ST_DTYPES, LazyTensor, LoraLayer
from ..devices import Stopped, get_unless_stopped
from ..errors import LorahubError
from ..storage import copy_range, pread_into, pwrite_all, start_writeback
from .ops import Workspace, apply_ops, fits_dtype
from .plan import FileJob, TensorJob, TensorPlan
from .record import UndoFile

# hidden: seconds to sleep per written item, so a test can kill a merge in the middle
THROTTLE_ENV = "LORAHUB_MERGE_THROTTLE_S"


def preload_factors(plans: Sequence[TensorPlan], device: torch.device) -> None:
    """CUDA: put every factor on the device once (adapters are small). A per-tensor copy from pageable
    memory would synchronise the slot's stream in the middle of the pipeline."""
    cache: dict[int, LoraLayer] = {}

    def on_device(tensor: LazyTensor) -> LazyTensor:
        value = tensor.load()
        if value.is_floating_point():
            value = value.to(torch.float32)
        return LazyTensor.of(value.to(device), key=tensor.key)

    def on_device_or_none(tensor: LazyTensor | None) -> LazyTensor | None:
        return None if tensor is None else on_device(tensor)

    for plan in plans:
        for op in plan.ops:
            if op.layer is not None:
                if id(op.layer) not in cache:
                    layer = op.layer
                    if layer.lycoris is not None:  # merge forms ΔW from the LyCORIS factors, not from A/B
                        mod = dataclasses.replace(layer.lycoris, tensors={
                            role: on_device(t) for role, t in layer.lycoris.tensors.items()})
                        cache[id(layer)] = dataclasses.replace(layer, lycoris=mod,
                                                               magnitude=on_device_or_none(layer.magnitude),
                                                               bias=on_device_or_none(layer.bias))
                    else:
                        cache[id(layer)] = dataclasses.replace(layer, A=on_device(layer.A), B=on_device(layer.B),
                                                               magnitude=on_device_or_none(layer.magnitude),
                                                               bias=on_device_or_none(layer.bias))
                op.layer = cache[id(op.layer)]
            if op.norm is not None:
                op.norm = op.norm.to(device=device, dtype=torch.float32)
            if op.kind == "add_tensor" and op.tensor is not None:
                op.tensor = on_device(op.tensor)
    torch.cuda.synchronize(device)


class _Slot:
    """Buffers for one tensor in flight: bytes read, bytes to write; on CUDA a stream and scratch."""

    def __init__(self, in_size: int, out_size: int, device: torch.device, workspace: Workspace):
        cuda = device.type == "cuda"
        self.input = torch.empty(max(in_size, 1), dtype=torch.uint8, pin_memory=cuda)
        self.output = torch.empty(max(out_size, 1), dtype=torch.uint8, pin_memory=cuda)
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        self.event = torch.cuda.Event(blocking=True) if cuda else None  # the writer sleeps, not spins
        self.finite = torch.ones(1, dtype=torch.bool, pin_memory=True) if cuda else None
        # CUDA: scratch per slot (per stream); CPU: one scratch shared by the single computing thread
        self.workspace = Workspace(device) if cuda else workspace


class Pipeline:
    """reader thread → computing (calling) thread → writer thread, with bounded slots."""

    def __init__(self, device: torch.device, slots: int, in_size: int, out_size: int,
                 advance: Callable[[int], None]):
        self.device = device
        self.advance = advance
        self.free: queue.Queue = queue.Queue()
        shared = Workspace("cpu")
        for _ in range(slots):
            self.free.put(_Slot(in_size, out_size, device, shared))
        self.to_compute: queue.Queue = queue.Queue()
        self.to_write: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)
        self.norms: dict[str, torch.Tensor] = {}
        self.bytes_written = 0
        # seconds each stage spent working (not waiting): what limited the run
        self.busy = {"read": 0.0, "compute": 0.0, "write": 0.0, "copy": 0.0}

    # queue helpers that give up when another stage failed
    def _get(self, q: queue.Queue):
        return get_unless_stopped(q, self.stop)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()

    def run(self, files: list[FileJob], undo: UndoFile | None) -> None:
        tensor_jobs = [tjob for job in files for tjob in job.tensors]
        reader = threading.Thread(target=self._reader, args=(tensor_jobs,), name="lorahub-read", daemon=True)
        writer = threading.Thread(target=self._writer, args=(files, undo), name="lorahub-write", daemon=True)
        reader.start()
        writer.start()
        try:
            self._compute(len(tensor_jobs))
        except Stopped:
            pass
        except BaseException as exc:  # KeyboardInterrupt too: stop the other stages, then re-raise
            self._fail(exc)
        writer.join()
        reader.join()
        if self.error is not None:
            raise self.error

    def _reader(self, jobs: list[TensorJob]) -> None:
        fds: dict[Path, int] = {}
        try:
            for job in jobs:
                slot = self._get(self.free)
                fd = fds.get(job.file.path)
                if fd is None:
                    for old in fds.values():
                        os.close(old)
                    fds = {job.file.path: os.open(job.file.path, os.O_RDONLY)}
                    fd = fds[job.file.path]
                start, _ = job.file.header.absolute_range(job.key)
                began = time.perf_counter()
                pread_into(fd, memoryview(slot.input.numpy())[: job.in_bytes], start)
                self.busy["read"] += time.perf_counter() - began
                self.to_compute.put((job, slot))
        except Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _compute(self, count: int) -> None:
        for _ in range(count):
            job, slot = self._get(self.to_compute)
            began = time.perf_counter()
            result = self._compute_one(job, slot)
            self.busy["compute"] += time.perf_counter() - began
            self.to_write.put((job, slot, result))

    def _compute_one(self, job: TensorJob, slot: _Slot):
        src_dtype = ST_DTYPES[job.info.dtype]
        out_dtype = ST_DTYPES[job.out_dtype]
        shape = job.info.shape
        raw = slot.input[: job.in_bytes]
        ops = [] if job.restore or job.plan is None else job.plan.ops
        name = job.plan.name if job.plan is not None else job.key
        if not ops and src_dtype == out_dtype:
            return ("bytes", raw)  # exact restore: the recorded bytes as they are
        out = slot.output[: job.out_bytes].view(out_dtype).view(shape)
        if self.device.type == "cuda":
            # queued on this slot's stream; the writer waits for the slot's event before writing.
            # Scratch belongs to the slot, so the next job on this stream reuses it only after this one.
            # a slot made for a CUDA device has its stream, event and pinned finite flag
            assert slot.event is not None and slot.finite is not None
            with torch.cuda.stream(slot.stream):
                source = raw.to(self.device, non_blocking=True).view(src_dtype).view(shape)
                work = slot.workspace.get("work", shape)
                work.copy_(source)
                del source
                _, norms = apply_ops(work, ops, name=name, device=self.device, workspace=slot.workspace)
                result = work.to(out_dtype) if out_dtype != torch.float32 else work
                if ops:
                    # on the GPU the element-wise check is cheap; no host round trip needed
                    slot.finite.copy_(torch.isfinite(result).all().reshape(1), non_blocking=True)
                out.copy_(result, non_blocking=True)
                del result
                self.norms.update(norms)  # still on the device; read after a synchronize
                slot.event.record(slot.stream)
                return ("cuda", bool(ops))
        source = raw.view(src_dtype).view(shape)
        # fp32 output: compute straight in the output buffer (the input buffer must stay the original)
        work = out if out_dtype == torch.float32 else slot.workspace.get("work", shape)
        work.copy_(source)
        _, norms = apply_ops(work, ops, name=name, device=self.device, workspace=slot.workspace)
        if ops and not fits_dtype(work, out_dtype):
            raise LorahubError("merged values are not finite (NaN or inf); the adapter or weight is broken, "
                               "or the values overflow the output dtype", key=name)
        if work is not out:
            out.copy_(work)
        self.norms.update(norms)
        return ("tensor", out.reshape(-1).view(torch.uint8))

    def _writer(self, files: list[FileJob], undo: UndoFile | None) -> None:
        undo_fd = os.open(undo.path, os.O_WRONLY) if undo is not None else None
        try:
            for job in files:
                job.dest.parent.mkdir(parents=True, exist_ok=True)
                src_fd = os.open(job.source.path, os.O_RDONLY)
                dst_fd = os.open(job.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask
                try:
                    if job.header_bytes is None:
                        began = time.perf_counter()
                        copy_range(src_fd, dst_fd, 0, 0, job.out_size, self._advance_copy)
                        start_writeback(dst_fd, 0, job.out_size)
                        self.busy["copy"] += time.perf_counter() - began
                        self._throttle()
                        continue
                    pwrite_all(dst_fd, job.header_bytes, 0)
                    self._advance_copy(len(job.header_bytes))
                    for item in job.items:
                        if self.stop.is_set():
                            raise Stopped
                        if item[0] == "copy":
                            _, src_off, dst_off, count = item
                            began = time.perf_counter()
                            copy_range(src_fd, dst_fd, src_off, dst_off, count, self._advance_copy)
                            start_writeback(dst_fd, dst_off, count)
                            self.busy["copy"] += time.perf_counter() - began
                        else:
                            self._write_tensor(item[1], dst_fd, undo_fd)
                        self._throttle()
                finally:
                    os.close(src_fd)
                    os.close(dst_fd)
        except Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            if undo_fd is not None:
                os.close(undo_fd)

    def _write_tensor(self, job: TensorJob, dst_fd: int, undo_fd: int | None) -> None:
        got_job, slot, (kind, payload) = self._get(self.to_write)
        assert got_job is job, "pipeline out of order"
        if kind == "cuda":
            slot.event.synchronize()
            if payload and not bool(slot.finite.item()):
                raise LorahubError("merged values are not finite (NaN or inf); the adapter or weight is broken, "
                                   "or the values overflow the output dtype", key=job.plan.name)
            data = slot.output[: job.out_bytes].numpy()
        else:
            data = payload.numpy()
        began = time.perf_counter()
        pwrite_all(dst_fd, memoryview(data), job.out_offset)
        start_writeback(dst_fd, job.out_offset, job.out_bytes)
        if undo_fd is not None and job.undo_offset is not None:
            pwrite_all(undo_fd, memoryview(slot.input[: job.in_bytes].numpy()), job.undo_offset)
        self.busy["write"] += time.perf_counter() - began
        self.bytes_written += job.out_bytes
        self.advance(job.out_bytes)
        self.free.put(slot)

    def _advance_copy(self, count: int) -> None:
        self.bytes_written += count
        self.advance(count)

    def _throttle(self) -> None:
        if self.throttle > 0:
            time.sleep(self.throttle)
