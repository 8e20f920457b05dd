"""Reading both models at disk speed: two reader threads, a ring of chunk buffers, ΔW built on the device.

Every pair is read in chunks of the same *elements* on both sides (so a bf16 base and an fp32 tuned
model line up), in the base's file order. One thread reads the base's chunks, another the tuned
model's, each into its own ring of reusable buffers (pinned on CUDA) with positioned reads
(`storage.pread_into`), running ahead of the computing thread by up to a ring's worth of bytes. The
computing thread takes the chunks in order and either

- **assembles ΔW** of a LoRA layer into a float32 work buffer on the device (CUDA: each chunk's raw
  bytes are copied to the device and converted and subtracted there, so bf16 travels at half the
  size), or
- **compares** a pair byte for byte on the host (norms, biases, embeddings), keeping the tuned copy
  when it is to be carried whole.

Memory is bounded by the rings (2 × `ring` × `chunk_bytes`) plus the largest layer's float32 ΔW,
whatever the models' size; a buffer goes back to its reader as soon as its chunk is consumed (on CUDA,
once the copy that reads it has run).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..adapter import ST_DTYPES
from ..devices import Stopped, get_unless_stopped
from ..errors import LorahubError
from ..storage import pread_into
from .plan import Pair

CHUNK_BYTES = 32 << 20
RING_CPU, RING_CUDA = 4, 16  # chunk buffers per side


class _Reader(threading.Thread):
    """Reads byte ranges, in order, into a ring of buffers; `take()` hands them out in the same order."""

    def __init__(self, ranges: list[tuple[Path, int, int]], buffers: list[Tensor], stop: threading.Event,
                 fail: Callable[[BaseException], None], name: str):
        super().__init__(name=name, daemon=True)
        self.ranges = ranges
        self.free: queue.Queue = queue.Queue()
        for buffer in buffers:
            self.free.put(buffer)
        self.ready: queue.Queue = queue.Queue()
        self.stop = stop
        self.fail = fail
        self.busy = 0.0
        self.bytes = 0

    def _get(self, q: queue.Queue):
        return get_unless_stopped(q, self.stop)

    def run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            for path, offset, count in self.ranges:
                buffer = self._get(self.free)
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    if hasattr(os, "posix_fadvise"):  # a larger kernel read-ahead for a sequential pass
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                began = time.perf_counter()
                try:
                    pread_into(fd, memoryview(buffer.numpy())[:count], offset)
                except LorahubError as exc:
                    raise LorahubError(f"{exc} (truncated file?)", path=path) from None
                except OSError as exc:
                    raise LorahubError(f"cannot read: {exc.strerror}", path=path) from None
                self.busy += time.perf_counter() - began
                self.bytes += count
                self.ready.put((buffer, count))
        except Stopped:
            pass
        except BaseException as exc:  # reported by the computing thread
            self.fail(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    def take(self) -> tuple[Tensor, int]:
        return self._get(self.ready)

    def give_back(self, buffer: Tensor) -> None:
        self.free.put(buffer)


def _chunks(pair: Pair, chunk_bytes: int) -> list[tuple[int, int]]:
    """[begin, end) element ranges of a pair, the same on both sides."""
    step = max(1, chunk_bytes // max(pair.base.itemsize, pair.tuned.itemsize))
    return [(begin, min(begin + step, pair.numel)) for begin in range(0, pair.numel, step)]


class PairStream:
    """The pairs' bytes, read ahead by two threads; consume them in order with `delta` or `compare`."""

    def __init__(self, pairs: Sequence[Pair], device: torch.device, *, chunk_bytes: int = CHUNK_BYTES,
                 ring: int | None = None, advance: Callable[[int], None] | None = None):
        self.pairs = list(pairs)
        self.device = device
        self.cuda = device.type == "cuda"
        self.chunk_bytes = chunk_bytes
        self.advance = advance or (lambda n: None)
        self.plans = [_chunks(pair, chunk_bytes) for pair in self.pairs]
        self.next = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        count = ring or (RING_CUDA if self.cuda else RING_CPU)
        largest = max((pair.numel * max(pair.base.itemsize, pair.tuned.itemsize) for pair in self.pairs), default=1)
        size = max(1, min(chunk_bytes, largest))
        count = max(2, min(count, sum(len(plan) for plan in self.plans)))
        self.readers = []
        for side in ("base", "tuned"):
            ranges = []
            for pair, plan in zip(self.pairs, self.plans):
                info = pair.base if side == "base" else pair.tuned
                ranges += [(info.path, info.offset + b * info.itemsize, (e - b) * info.itemsize) for b, e in plan]
            buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(count)]
            self.readers.append(_Reader(ranges, buffers, self.stop, self._fail, name=f"lorahub-read-{side}"))
        self._pending: list[tuple[torch.cuda.Event, Tensor, Tensor]] = []
        if self.cuda:
            self._stage = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]

    # -- lifecycle ---------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()

    def __enter__(self) -> "PairStream":
        for reader in self.readers:
            reader.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self._release_pending()
        for reader in self.readers:
            reader.join()

    @property
    def read_seconds(self) -> dict[str, float]:
        return {"read_base": self.readers[0].busy, "read_tuned": self.readers[1].busy}

    @property
    def bytes_read(self) -> int:
        return self.readers[0].bytes + self.readers[1].bytes

    # -- consuming ---------------------------------------------------------------------------------
    def _begin(self, pair: Pair) -> list[tuple[int, int]]:
        index = self.next
        assert index < len(self.pairs) and self.pairs[index] is pair, "pairs consumed out of order"
        self.next += 1
        return self.plans[index]

    def _take(self) -> tuple[Tensor, int, Tensor, int]:
        try:
            base, nb = self.readers[0].take()
            tuned, nt = self.readers[1].take()
        except Stopped:
            raise self.error if self.error is not None else Stopped from None
        self.advance(nb + nt)
        return base, nb, tuned, nt

    def _give_back(self, base: Tensor, tuned: Tensor) -> None:
        self.readers[0].give_back(base)
        self.readers[1].give_back(tuned)

    def _release_pending(self) -> None:
        for event, base, tuned in self._pending:
            event.synchronize()
            self._give_back(base, tuned)
        self._pending = []

    def delta(self, pair: Pair, out: Tensor) -> Tensor:
        """tuned − base of `pair` in float32 into `out` (a flat float32 tensor of pair.numel elements
        on the device), queued on the current stream on CUDA. Returns `out` viewed in the pair's shape."""
        base_dtype, tuned_dtype = ST_DTYPES[pair.base.dtype], ST_DTYPES[pair.tuned.dtype]
        for begin, end in self._begin(pair):
            base, nb, tuned, nt = self._take()
            dst = out[begin:end]
            if self.cuda:
                stage_b, stage_t = self._stage
                stage_b[:nb].copy_(base[:nb], non_blocking=True)
                stage_t[:nt].copy_(tuned[:nt], non_blocking=True)
                dst.copy_(stage_t[:nt].view(tuned_dtype))
                dst.sub_(stage_b[:nb].view(base_dtype))
                event = torch.cuda.Event(blocking=True)
                event.record(torch.cuda.current_stream(self.device))
                self._release_pending()  # the previous chunk's copies have run by now or soon
                self._pending.append((event, base, tuned))
            else:
                dst.copy_(tuned[:nt].view(tuned_dtype))
                dst.sub_(base[:nb].view(base_dtype))
                self._give_back(base, tuned)
        return out.view(pair.shape)

    def compare(self, pair: Pair, keep: bool = False) -> tuple[bool, Tensor | None]:
        """Whether the pair differs (bit for bit when both dtypes agree, else by value), and with `keep`
        the tuned tensor (CPU, its own dtype and shape) when it does."""
        self._release_pending()
        kept = torch.empty(pair.tuned.nbytes, dtype=torch.uint8) if keep else None
        same_dtype = pair.base.dtype == pair.tuned.dtype
        changed = False
        for begin, _end in self._begin(pair):
            base, nb, tuned, nt = self._take()
            if not changed:
                if same_dtype:
                    changed = not torch.equal(base[:nb], tuned[:nt])
                else:
                    changed = not torch.equal(base[:nb].view(ST_DTYPES[pair.base.dtype]).double(),
                                              tuned[:nt].view(ST_DTYPES[pair.tuned.dtype]).double())
            if kept is not None:
                kept[begin * pair.tuned.itemsize:][:nt].copy_(tuned[:nt])
            self._give_back(base, tuned)
        if not changed or kept is None:
            return changed, None
        dtype = ST_DTYPES.get(pair.tuned.dtype)
        if dtype is None:
            raise LorahubError(f"cannot carry a {pair.tuned.dtype} tensor", path=pair.tuned.path, key=pair.name)
        return True, kept.view(dtype).view(pair.tuned.shape)
