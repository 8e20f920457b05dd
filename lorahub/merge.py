"""Merge LoRA adapters into a base model, and unmerge them, streaming one tensor at a time.

The math (per touched base tensor, all in fp32, rounded once to the output dtype):

| op       | effect on the fp32 upcast `W` of the base tensor (base layout)                          |
| -------- | ---------------------------------------------------------------------------------------- |
| add      | `W += c·s·B₂A₂` in the base layout (Conv1D / embedding: transposed; conv: reshaped)       |
| dora     | `W ← (m / ‖W₀ + c·ΔW‖_row) ⊙ (W + c·ΔW)`; the row norm is recorded for unmerge             |
| bias     | `b += c·s·bias` (lora_bias)                                                              |
| replace  | `W ← T` (modules_to_save), or `W + c·(T − W)` for a weight c ≠ 1                          |
| undora   | `W ← W / (m / n_recorded) − c·ΔW`                                                       |
| restore  | the recorded original bytes, bit-exact                                                   |

`c` is the user's weight (negated by unmerge for `add`/`bias`), `s` the layer's scale, `W₀` the base
tensor before this merge (PEFT computes the DoRA norm from the unmerged base weight too).

The I/O (see docs/merge.md): a merge changes values only, so every tensor keeps its dtype, shape and
relative offset. Each base safetensors file is either copied whole (kernel-side `copy_file_range`) when
no tensor in it is touched, or rewritten as: a new header (the old one plus a `lorahub_merge`
metadata record, so absolute offsets shift by the header growth) + untouched byte ranges copied
kernel-side + touched tensors computed and written. A reader thread, the computing thread and a writer
thread overlap (read k+1 / compute k / write k−1); on CUDA the host↔device copies run on one stream
per buffer slot from pinned memory. Memory is bounded by a few slots of the largest touched tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import queue
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

from . import __version__
from .adapter import ST_DTYPES, ST_ITEMSIZE, Adapter, LazyTensor, LoraLayer
from .devices import exact_fp32_matmul, resolve_device
from .errors import CheckFailed, LorahubError, UnsupportedError
from .storage import PICKLE_SUFFIXES, SafetensorsHeader, TensorInfo, atomic_path, file_sha256, read_header

RECORD_FILE = "lorahub_merge.json"
UNDO_PREFIX = "lorahub_merge_undo."
METADATA_KEY = "lorahub_merge"
# hidden: seconds to sleep per written item, so a test can kill a merge in the middle
THROTTLE_ENV = "LORAHUB_MERGE_THROTTLE_S"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
DTYPE_ALIASES = {"fp32": "F32", "float32": "F32", "f32": "F32", "fp16": "F16", "float16": "F16", "f16": "F16",
                 "half": "F16", "bf16": "BF16", "bfloat16": "BF16", "fp64": "F64", "float64": "F64"}
_COPY_CHUNK = 64 << 20  # copy_file_range per call: its speed does not depend on it; progress does
# pwrite per call. Measured on Linux 6.18 / ext4: buffered writes of ≥ 512 KB per call ran at 0.4–1.5 GB/s
# of kernel CPU time (large page-cache folios to allocate), ≤ 256 KB at ~5 GB/s; syscalls are cheap.
_WRITE_CHUNK = 256 << 10
# progress(total_bytes) -> a context manager yielding advance(nbytes), e.g. lorahub.ui.byte_progress
ProgressFactory = Callable[[int], ContextManager[Callable[[int], None]]]


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass
class AdapterInput:
    """One adapter to merge and its weight (negative allowed). `label` is what the user typed."""

    adapter: Adapter
    weight: float = 1.0
    label: str = ""
    weight_given: bool = True

    @property
    def name(self) -> str:
        return self.label or self.adapter.name


def parse_adapter_arg(arg: str) -> tuple[str, float | None]:
    """`PATH[:WEIGHT]`: split on the last ':' only when what follows parses as a number.

    Paths and hub ids may hold ':' (`hf://org/repo`, `C:\\x`), so `hf://org/repo` stays whole and
    `hf://org/repo:0.5` is the repo with weight 0.5.
    """
    head, sep, tail = arg.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        try:
            weight = float(tail)
        except ValueError:
            return arg, None
        if not math.isfinite(weight):
            raise LorahubError(f"adapter weight must be a finite number, got '{tail}'", path=head)
        return head, weight
    return arg, None


_HASHES: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def adapter_fingerprint(adapter: Adapter) -> dict[str, str]:
    """sha256 of each file the adapter's math comes from (weights and, for PEFT, its config)."""
    files: list[Path] = [Path(f) for f in adapter.files]
    if adapter.path is not None and Path(adapter.path).is_dir():
        config = Path(adapter.path) / "adapter_config.json"
        if config.is_file():
            files.append(config)
    return {f.name: _cached_sha256(f) for f in files if f.is_file()}


def _combined_hash(hashes: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(f"{name}\0{hashes[name]}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# math


@dataclass
class Op:
    """One change to one base tensor (see the module docstring)."""

    kind: str  # add | dora | bias | replace | undora | restore
    coeff: float = 1.0
    layer: LoraLayer | None = None
    tensor: LazyTensor | None = None  # replace: the new value
    norm: torch.Tensor | None = None  # undora: the row norms recorded at merge time
    norm_key: str | None = None  # dora: the undo-file key to record the row norms under
    adapter_index: int = 0
    # replace: the base's storage dtype; a replacement becomes the new weight as the model would hold it
    # (PEFT loads modules_to_save / saved embeddings into the model's dtype before merging the rest)
    storage_dtype: torch.dtype | None = None
    rows: tuple[int, int] | None = None  # add/bias: the row block of a fused weight (OpenCLIP in_proj)


class Workspace:
    """Reusable scratch tensors: a fresh allocation per tensor page-faults, which on a 7B merge costs
    more than the arithmetic."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self._buffers[name] = buffer
        return buffer[:numel].view(tuple(shape))


def _math_view(weight: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """The (n, k) view of a base-layout tensor: rows are the layer's output features."""
    n = layer.out_features
    if layer.kind == "embedding" or layer.fan_in_fan_out:
        return weight.view(-1, n).T
    return weight.view(n, -1)


def _check_shape(weight: torch.Tensor, layer: LoraLayer, name: str) -> None:
    n, k = layer.out_features, layer.in_features
    expected = tuple(layer.base_shape)
    squeezed = tuple(d for d in weight.shape if d != 1) == tuple(d for d in expected if d != 1)
    if weight.numel() != n * k or not (tuple(weight.shape) == expected or squeezed):
        raise LorahubError(f"adapter layer '{layer.target}' has ΔW of shape {list(expected)} but the base "
                           f"tensor is {list(weight.shape)}", key=name)


def _is_power_of_two(value: float) -> bool:
    return value != 0 and math.isfinite(value) and math.frexp(abs(value))[0] == 0.5


def _add_delta(weight: torch.Tensor, layer: LoraLayer, coeff: float, device: torch.device,
               workspace: Workspace | None = None) -> None:
    """weight += coeff·s·ΔW in place, fp32, in the base layout, in PEFT's own order of operations.

    PEFT computes `(B @ A) * s` and then adds. When `coeff·s` is a power of two the scaling is exact, so
    one GEMM with beta=1 (`addmm_`) gives the same bits with one pass over the weight instead of three;
    otherwise the product is formed in a scratch buffer, scaled and added, exactly as PEFT does.
    """
    scale = coeff * layer.scale
    if scale == 0:
        return
    if layer.kind == "conv" and any(size != 1 for size in layer.kernel_size):
        # k×k kernels: PEFT (and diffusers' fuse_lora) form ΔW as a convolution of the factors
        down = layer.A.load().to(device=device, dtype=torch.float32)
        up = layer.B.load().to(device=device, dtype=torch.float32)
        conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d,
                5: torch.nn.functional.conv3d}[down.dim()]
        delta = conv(down.transpose(0, 1), up).transpose(0, 1) * scale
        weight.add_(delta.reshape(weight.shape))
        return
    up, down = layer.factors(device, torch.float32)
    n = up.shape[0]
    transposed = layer.kind == "embedding" or layer.fan_in_fan_out
    # cuBLAS's addmm accumulates the product onto W, so a merge and its unmerge would round differently:
    # the fused form is used on CPU only, where it gives the same bits as forming the product first
    if _is_power_of_two(scale) and weight.device.type == "cpu":
        if transposed:
            weight.view(-1, n).addmm_(down.T, (up * scale).T)  # (k, n) += (B·A)ᵀ
        else:
            weight.view(n, -1).addmm_(up * scale, down)
        return
    delta = workspace.get("delta", (n, down.shape[1])) if workspace is not None else \
        torch.empty((n, down.shape[1]), dtype=torch.float32, device=device)
    torch.mm(up, down, out=delta)
    delta.mul_(scale)
    if transposed:
        weight.view(-1, n).add_(delta.T)
    else:
        weight.view(n, -1).add_(delta)


def fits_dtype(work: torch.Tensor, dtype: torch.dtype) -> bool:
    """No NaN/inf in the fp32 `work`, and none after rounding it to `dtype`.

    ‖work‖₂ is finite only if every element is, and bounds every |element|; if it is ≤ the dtype's
    largest finite value no element rounds to inf. One fast reduction instead of `isfinite().all()`,
    which is ten times slower than the whole merge arithmetic on CPU; that exact check runs only when
    the norm test is inconclusive.
    """
    norm = float(torch.linalg.vector_norm(work))
    if math.isfinite(norm) and norm <= torch.finfo(dtype).max:
        return True
    return bool(torch.isfinite(work.to(dtype)).all())


def _magnitude(layer: LoraLayer, device: torch.device, name: str) -> torch.Tensor:
    magnitude = layer.magnitude.load().to(device=device, dtype=torch.float32).reshape(-1)
    if magnitude.numel() != layer.out_features:
        raise LorahubError(f"DoRA magnitude has {magnitude.numel()} values but the layer has "
                           f"{layer.out_features} output features", key=name)
    return magnitude


def apply_ops(weight: torch.Tensor, ops: Sequence[Op], *, name: str = "",
              device: torch.device | str | None = None,
              workspace: Workspace | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply `ops` in order to an fp32 tensor in the base layout (modified in place).

    Returns it and the DoRA row norms to record ({norm_key: (n,) fp32}).
    """
    device = torch.device(device) if device is not None else weight.device
    norms: dict[str, torch.Tensor] = {}
    original: torch.Tensor | None = None
    if any(op.kind == "dora" for op in ops[1:]):  # a later DoRA op takes its norm from the unmerged W₀
        original = workspace.get("original", weight.shape) if workspace is not None else torch.empty_like(weight)
        original.copy_(weight)
    for index, op in enumerate(ops):
        if op.kind == "add":
            target = weight[op.rows[0]:op.rows[1]] if op.rows else weight
            _check_shape(target, op.layer, name)
            _add_delta(target, op.layer, op.coeff, device, workspace)
        elif op.kind == "bias":
            target = weight[op.rows[0]:op.rows[1]] if op.rows else weight
            bias = op.layer.bias.load().to(device=device, dtype=torch.float32).reshape(target.shape)
            target.add_(bias * (op.coeff * op.layer.scale))
        elif op.kind == "dora":
            _check_shape(weight, op.layer, name)
            magnitude = _magnitude(op.layer, device, name)
            if index == 0 or original is None:
                _add_delta(weight, op.layer, op.coeff, device, workspace)
                norm = torch.linalg.vector_norm(_math_view(weight, op.layer), dim=1)
            else:
                unmerged = original.clone()
                _add_delta(unmerged, op.layer, op.coeff, device, workspace)
                norm = torch.linalg.vector_norm(_math_view(unmerged, op.layer), dim=1)
                del unmerged
                _add_delta(weight, op.layer, op.coeff, device, workspace)
            _math_view(weight, op.layer).mul_((magnitude / norm).unsqueeze(1))
            if op.norm_key:
                norms[op.norm_key] = norm
        elif op.kind == "undora":
            _check_shape(weight, op.layer, name)
            magnitude = _magnitude(op.layer, device, name)
            norm = op.norm.to(device=device, dtype=torch.float32).reshape(-1)
            _math_view(weight, op.layer).div_((magnitude / norm).unsqueeze(1))
            _add_delta(weight, op.layer, -op.coeff, device, workspace)
        elif op.kind in ("replace", "restore"):
            value = op.tensor.load().to(device=device)
            if op.storage_dtype is not None:
                value = value.to(op.storage_dtype)
            value = value.to(torch.float32)
            if value.numel() != weight.numel():
                raise LorahubError(f"replacement has shape {list(value.shape)} but the base tensor is "
                                   f"{list(weight.shape)}", key=name)
            value = value.reshape(weight.shape)
            if op.kind == "restore" or op.coeff == 1.0:
                weight.copy_(value)
            else:
                weight.add_(value - weight, alpha=op.coeff)
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown op {op.kind}")
    return weight, norms


# ---------------------------------------------------------------------------------------------
# the base: its files and tensor names


@dataclass
class BaseFile:
    path: Path  # the file on disk
    rel: Path  # its path inside the base (the output path inside --out)
    prefix: str  # component prefix of its tensor names ("unet." in a diffusers layout), or ""
    header: SafetensorsHeader


@dataclass
class BaseLayout:
    """A local base: where each tensor lives, and every file that is not a weight file."""

    root: Path  # a directory, or the single file
    files: list[BaseFile]
    tensors: dict[str, tuple[BaseFile, str]]  # full base name -> (file, key in the file)
    other_files: list[Path]  # relative paths of non-weight files to copy
    skipped: list[Path]  # weight files we will not copy (pickles, other variants)
    model: Any = None  # lorahub.base.BaseModel when available (for names/validate)

    @property
    def is_file(self) -> bool:
        return self.root.is_file()



def _is_lorahub_file(name: str) -> bool:
    return name == RECORD_FILE or name.startswith(UNDO_PREFIX)


def load_layout(spec: str | Path) -> BaseLayout:
    """Open a local base (directory, shards, diffusers layout, single file) with `lorahub.base`."""
    from .base import load_base

    model = load_base(str(spec))
    single = Path(str(spec)).expanduser().is_file()
    if model.root is None:
        raise LorahubError("merge needs the base's weights on local disk; download them first "
                           "(e.g. `hf download REPO --local-dir DIR`) and pass the directory", path=spec)
    if not model.complete:
        raise LorahubError("the base's weight files hold less data than their headers describe "
                           "(a header-only skeleton or an interrupted download)", path=spec)
    model_root = Path(model.root)
    root = Path(str(spec)).expanduser() if single else model_root
    rels = [rel for rel in model.files if not _is_lorahub_file(Path(rel).name)]
    if not rels:
        raise LorahubError("no safetensors weight files in the base", path=spec)
    names_by_file: dict[str, list[str]] = {}
    for tensor in model.tensors.values():
        names_by_file.setdefault(tensor.file, []).append(tensor.name)
    files: list[BaseFile] = []
    tensors: dict[str, tuple[BaseFile, str]] = {}
    for rel in rels:
        path = model_root / rel
        header = read_header(path)
        prefix = _file_prefix(names_by_file.get(rel, []), header)
        bf = BaseFile(path, Path(rel) if not single else Path(path.name), prefix, header)
        files.append(bf)
        for key in header.tensors:
            tensors[prefix + key] = (bf, key)
    other: list[Path] = []
    skipped: list[Path] = []
    if not single:
        weight_rel = {bf.rel for bf in files}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file() or rel in weight_rel:
                continue
            lower = path.name.lower()
            if (lower.endswith(".safetensors") and not _is_lorahub_file(path.name)) or \
                    lower.endswith(PICKLE_SUFFIXES) or lower.endswith((".bin.index.json", ".gguf")):
                skipped.append(rel)  # weights this merge does not update must not ship stale
                continue
            other.append(rel)
    return BaseLayout(root, files, tensors, other, skipped, model)


def _file_prefix(names: list[str], header: SafetensorsHeader) -> str:
    """The prefix lorahub.base put before this file's keys (`unet.` in a diffusers layout), or ''."""
    if not names:
        return ""
    keys = set(header.tensors)
    sample = min(names, key=len)
    for cut in range(len(sample) + 1):
        prefix = sample[:cut]
        if sample[cut:] in keys and all(n.startswith(prefix) and n[cut:] in keys for n in names):
            return prefix
    raise LorahubError("cannot relate the base's tensor names to the file's keys", path=header.path)


# ---------------------------------------------------------------------------------------------
# planning: which base tensor gets which ops


@dataclass
class TensorPlan:
    name: str  # full base tensor name
    file: BaseFile
    key: str  # key inside the file
    ops: list[Op] = field(default_factory=list)
    keep_original: bool = False


def validate_inputs(layout: BaseLayout, inputs: Sequence[AdapterInput]) -> None:
    """Refuse, with the validate report, any adapter that does not fit the base."""
    from .validate import validate

    for item in inputs:
        adapter = item.adapter
        adapter.require_lora("merge")
        report = validate(adapter, layout.model, suggest=False)
        if not report.ok:
            raise CheckFailed(f"{item.name}: {report.summary}; nothing was written", report=report)


def plan_merge(layout: BaseLayout, inputs: Sequence[AdapterInput], *, check: bool = True) -> list[TensorPlan]:
    """Ops per touched base tensor, in command-line order per tensor (order matters only for DoRA)."""
    from .names import match_layers

    if check:
        validate_inputs(layout, inputs)
    plans: dict[str, TensorPlan] = {}

    def plan_for(name: str, item: AdapterInput) -> TensorPlan:
        if name not in layout.tensors:
            raise LorahubError(f"base has no tensor '{name}'", path=item.adapter.path)
        if name not in plans:
            bf, key = layout.tensors[name]
            dtype = bf.header.tensors[key].dtype
            if dtype not in FLOAT_DTYPES:
                raise UnsupportedError(f"cannot merge into a {dtype} tensor (quantized or integer base); "
                                       "dequantize the base first", path=bf.path, key=key)
            plans[name] = TensorPlan(name, bf, key)
        return plans[name]

    for index, item in enumerate(inputs):
        adapter = item.adapter
        match = match_layers(adapter, layout.model)
        missing = list(match.missing) + list(match.full_missing)
        if missing:
            raise LorahubError(f"{len(missing)} adapter module(s) have no weight in the base, e.g. "
                               f"'{missing[0]}' (run `lorahub validate`)", path=adapter.path)
        # full tensors first: they replace the weight that the adapter's LoRA layers then apply to
        for source_name, tensor in adapter.full_tensors.items():
            plan = plan_for(match.full_tensors[source_name], item)
            storage = ST_DTYPES[plan.file.header.tensors[plan.key].dtype]
            plan.ops.append(Op("replace", item.weight, tensor=tensor, adapter_index=index, storage_dtype=storage))
            plan.keep_original = True
        for target, layer in adapter.layers.items():
            ref = match.refs[target]
            plan = plan_for(ref.weight, item)
            if layer.is_dora:
                if ref.rows is not None:
                    raise UnsupportedError("DoRA on a block of a fused weight is not supported",
                                           path=adapter.path, key=target)
                plan.ops.append(Op("dora", item.weight, layer=layer, adapter_index=index,
                                   norm_key=f"dora_norm::{index}::{ref.weight}"))
            else:
                plan.ops.append(Op("add", item.weight, layer=layer, adapter_index=index, rows=ref.rows))
            if layer.bias is not None:
                if ref.bias is None:
                    raise LorahubError(f"adapter layer '{target}' has a LoRA bias but the base module has no "
                                       "bias", path=adapter.path)
                bias = plan_for(ref.bias, item)
                bias.ops.append(Op("bias", item.weight, layer=layer, adapter_index=index, rows=ref.rows))
    return list(plans.values())


# ---------------------------------------------------------------------------------------------
# records


def read_record(root: Path) -> dict[str, Any]:
    path = (root if root.is_dir() else root.parent) / RECORD_FILE
    if not path.is_file():
        return {"merges": []}
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LorahubError(f"unreadable merge record ({exc})", path=path) from None
    if not isinstance(record, dict) or not isinstance(record.get("merges"), list):
        raise LorahubError("merge record has no 'merges' list", path=path)
    return record


def _adapter_record(item: AdapterInput) -> dict[str, Any]:
    adapter = item.adapter
    hashes = adapter_fingerprint(adapter)
    return {
        "name": item.name,
        "path": str(adapter.path) if adapter.path is not None else None,
        "format": adapter.format,
        "weight": item.weight,
        "sha256": _combined_hash(hashes),
        "files": hashes,
        "layers": len(adapter.layers),
        "replaced_tensors": len(adapter.full_tensors),
        "dora": adapter.is_dora,
    }


def _compact_record(record: dict[str, Any]) -> str | None:
    """The safetensors metadata value: what was merged, without per-file detail (None: nothing)."""
    if not record["merges"]:
        return None
    merges = []
    for entry in record["merges"]:
        merges.append({
            "operation": entry.get("operation", "merge"),
            "adapters": [{"name": a["name"], "weight": a["weight"], "sha256": a["sha256"]}
                         for a in entry.get("adapters", [])],
            "created": entry.get("created"),
        })
    return json.dumps({"lorahub_version": __version__, "merges": merges}, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# low-level I/O


def _pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    view = buffer
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise LorahubError("unexpected end of file while reading tensor data")
        view = view[got:]
        offset += got


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        done = os.pwrite(fd, view[:_WRITE_CHUNK], offset)
        view = view[done:]
        offset += done


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int,
                advance: Callable[[int], None] | None = None) -> None:
    """Kernel-side copy (copy_file_range, reflinks where the filesystem has them), else pread/pwrite."""
    use_kernel = hasattr(os, "copy_file_range")
    while count > 0:
        step = min(count, _COPY_CHUNK)
        done = 0
        if use_kernel:
            try:
                done = os.copy_file_range(src_fd, dst_fd, step, src_off, dst_off)
            except OSError:
                use_kernel = False
        if not use_kernel:
            step = min(step, 8 << 20)
            chunk = os.pread(src_fd, step, src_off)
            if not chunk:
                raise LorahubError("unexpected end of file while copying")
            _pwrite_all(dst_fd, chunk, dst_off)
            done = len(chunk)
        if done <= 0:
            raise LorahubError("unexpected end of file while copying")
        src_off += done
        dst_off += done
        count -= done
        if advance:
            advance(done)


def _load_sync_file_range():
    """libc's sync_file_range, to start writeback of what we just wrote (Linux only)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
        func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return func
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2
# benchmarks compare with and without the hint
_NO_WRITEBACK_HINT = os.environ.get("LORAHUB_NO_WRITEBACK_HINT") == "1"


def _start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing a finished range to disk now (non-blocking), so the disk works
    while we compute the next tensors instead of all at the final flush. A hint: errors are ignored."""
    if _SYNC_FILE_RANGE is not None and count > 0 and not _NO_WRITEBACK_HINT:
        _SYNC_FILE_RANGE(fd, offset, count, _SYNC_FILE_RANGE_WRITE)


def build_header(entries: Iterable[tuple[str, str, tuple[int, ...], int, int]],
                 metadata: dict[str, str] | None) -> bytes:
    """8-byte length + JSON (space-padded to a multiple of 8), entries in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# ---------------------------------------------------------------------------------------------
# the execution plan of one output file


@dataclass
class _TensorJob:
    plan: TensorPlan | None  # None: a dtype conversion only
    file: BaseFile
    key: str
    info: TensorInfo
    out_dtype: str
    out_offset: int  # absolute offset in the output file
    undo_offset: int | None = None  # absolute offset of the original bytes in the undo file
    restore: bool = False  # write the original bytes back (exact unmerge)

    @property
    def in_bytes(self) -> int:
        return self.info.end - self.info.begin

    @property
    def out_bytes(self) -> int:
        return math.prod(self.info.shape) * ST_ITEMSIZE[self.out_dtype]


@dataclass
class _FileJob:
    source: BaseFile
    dest: Path
    header_bytes: bytes | None  # None: copy the whole file
    items: list[tuple]  # ("copy", src_off, dst_off, n) | ("tensor", _TensorJob), in output order
    out_size: int


def _file_jobs(layout: BaseLayout, plans: Sequence[TensorPlan], out_dir: Path, out_dtype: str | None,
               metadata_value: str | None) -> list[_FileJob]:
    by_file: dict[Path, dict[str, TensorPlan]] = {}
    for plan in plans:
        by_file.setdefault(plan.file.rel, {})[plan.key] = plan
    jobs: list[_FileJob] = []
    for bf in layout.files:
        dest = out_dir / bf.rel
        touched = by_file.get(bf.rel, {})
        header = bf.header
        convert = {key for key, info in header.tensors.items()
                   if out_dtype and info.dtype in FLOAT_DTYPES and info.dtype != out_dtype}
        if not touched and not convert:
            jobs.append(_FileJob(bf, dest, None, [], header.file_size))
            continue
        metadata = dict(header.metadata)
        metadata.pop(METADATA_KEY, None)
        if metadata_value is not None:
            metadata[METADATA_KEY] = metadata_value
        ordered = sorted(header.tensors.values(), key=lambda info: (info.begin, info.end))
        entries = []
        if convert:  # new dtypes: a new, contiguous layout in the same tensor order
            offset = 0
            layout_of = {}
            for info in ordered:
                dtype = out_dtype if info.name in convert else info.dtype
                size = math.prod(info.shape) * ST_ITEMSIZE[dtype]
                layout_of[info.name] = (dtype, offset, offset + size)
                offset += size
        else:
            layout_of = {info.name: (info.dtype, info.begin, info.end) for info in header.tensors.values()}
        for name, info in header.tensors.items():  # header order as in the source
            dtype, begin, end = layout_of[name]
            entries.append((name, dtype, info.shape, begin, end))
        header_bytes = build_header(entries, metadata)
        data_start = len(header_bytes)
        items: list[tuple] = []
        run: list[int] | None = None  # [src_off, dst_off, n] of a pending untouched run
        for info in ordered:
            dtype, begin, end = layout_of[info.name]
            if info.name in touched or info.name in convert:
                if run:
                    items.append(("copy", *run))
                    run = None
                items.append(("tensor", _TensorJob(touched.get(info.name), bf, info.name, info, dtype,
                                                   data_start + begin)))
            else:
                src = header.data_start + info.begin
                dst = data_start + begin
                size = info.end - info.begin
                if run and run[0] + run[2] == src and run[1] + run[2] == dst:
                    run[2] += size
                else:
                    if run:
                        items.append(("copy", *run))
                    run = [src, dst, size]
        if run:
            items.append(("copy", *run))
        data_len = max((end for _, _, _, _, end in entries), default=0)
        if not convert:  # keep any trailing bytes the source had after its data
            data_len = max(data_len, header.file_size - header.data_start)
            tail = header.data_start + max((i.end for i in ordered), default=0)
            if tail < header.file_size:
                items.append(("copy", tail, data_start + (tail - header.data_start), header.file_size - tail))
        jobs.append(_FileJob(bf, dest, header_bytes, items, data_start + data_len))
    return jobs


# ---------------------------------------------------------------------------------------------
# device handling


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


class _Abort(Exception):
    pass


class _Pipeline:
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
        self.bytes_read = 0
        # seconds each stage spent working (not waiting): what limited the run
        self.busy = {"read": 0.0, "compute": 0.0, "write": 0.0, "copy": 0.0}

    # queue helpers that give up when another stage failed
    def _get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Abort
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()

    def run(self, files: list[_FileJob], undo: "_UndoFile | None") -> None:
        tensor_jobs = [item[1] for job in files for item in job.items if item[0] == "tensor"]
        reader = threading.Thread(target=self._reader, args=(tensor_jobs,), name="lorahub-read", daemon=True)
        writer = threading.Thread(target=self._writer, args=(files, undo), name="lorahub-write", daemon=True)
        reader.start()
        writer.start()
        try:
            self._compute(len(tensor_jobs))
        except _Abort:
            pass
        except BaseException as exc:  # KeyboardInterrupt too: stop the other stages, then re-raise
            self._fail(exc)
        writer.join()
        reader.join()
        if self.error is not None:
            raise self.error

    def _reader(self, jobs: list[_TensorJob]) -> None:
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
                _pread_into(fd, memoryview(slot.input.numpy())[: job.in_bytes], start)
                self.busy["read"] += time.perf_counter() - began
                self.bytes_read += job.in_bytes
                self.to_compute.put((job, slot))
        except _Abort:
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

    def _compute_one(self, job: _TensorJob, slot: _Slot):
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

    def _writer(self, files: list[_FileJob], undo: "_UndoFile | None") -> None:
        undo_fd = os.open(undo.path, os.O_WRONLY) if undo is not None else None
        try:
            for job in files:
                job.dest.parent.mkdir(parents=True, exist_ok=True)
                src_fd = os.open(job.source.path, os.O_RDONLY)
                dst_fd = os.open(job.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    if job.header_bytes is None:
                        began = time.perf_counter()
                        _copy_range(src_fd, dst_fd, 0, 0, job.out_size, self._advance_copy)
                        _start_writeback(dst_fd, 0, job.out_size)
                        self.busy["copy"] += time.perf_counter() - began
                        self._throttle()
                        continue
                    _pwrite_all(dst_fd, job.header_bytes, 0)
                    self._advance_copy(len(job.header_bytes))
                    for item in job.items:
                        if self.stop.is_set():
                            raise _Abort
                        if item[0] == "copy":
                            _, src_off, dst_off, count = item
                            began = time.perf_counter()
                            _copy_range(src_fd, dst_fd, src_off, dst_off, count, self._advance_copy)
                            _start_writeback(dst_fd, dst_off, count)
                            self.busy["copy"] += time.perf_counter() - began
                        else:
                            self._write_tensor(item[1], dst_fd, undo_fd)
                        self._throttle()
                finally:
                    os.close(src_fd)
                    os.close(dst_fd)
        except _Abort:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            if undo_fd is not None:
                os.close(undo_fd)

    def _write_tensor(self, job: _TensorJob, dst_fd: int, undo_fd: int | None) -> None:
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
        _pwrite_all(dst_fd, memoryview(data), job.out_offset)
        _start_writeback(dst_fd, job.out_offset, job.out_bytes)
        if undo_fd is not None and job.undo_offset is not None:
            _pwrite_all(undo_fd, memoryview(slot.input[: job.in_bytes].numpy()), job.undo_offset)
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


# ---------------------------------------------------------------------------------------------
# the undo file: original bytes and DoRA norms


@dataclass
class _UndoFile:
    path: Path
    norm_offsets: dict[str, tuple[int, int]]  # key -> (absolute offset, count)


def _prepare_undo(path: Path, jobs: list[_FileJob], plans: Sequence[TensorPlan], save_all: bool,
                  metadata: dict[str, str]) -> _UndoFile | None:
    entries = []
    offset = 0
    originals: list[_TensorJob] = []
    for job in jobs:
        for item in job.items:
            if item[0] != "tensor" or item[1].plan is None:
                continue
            tjob = item[1]
            if save_all or tjob.plan.keep_original:
                size = tjob.in_bytes
                entries.append((f"original::{tjob.plan.name}", tjob.info.dtype, tjob.info.shape, offset, offset + size))
                tjob.undo_offset = offset
                originals.append(tjob)
                offset += size
    norm_specs = []
    for plan in plans:
        for op in plan.ops:
            if op.kind == "dora" and op.norm_key:
                count = op.layer.out_features
                entries.append((op.norm_key, "F32", (count,), offset, offset + 4 * count))
                norm_specs.append((op.norm_key, offset, count))
                offset += 4 * count
    if not entries:
        return None
    header = build_header(entries, metadata)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + offset)
    for tjob in originals:
        tjob.undo_offset += len(header)
    return _UndoFile(path, {key: (len(header) + off, count) for key, off, count in norm_specs})


def _finish_undo(undo: _UndoFile | None, norms: dict[str, torch.Tensor]) -> None:
    if undo is None or not undo.norm_offsets:
        return
    fd = os.open(undo.path, os.O_WRONLY)
    try:
        for key, (offset, count) in undo.norm_offsets.items():
            norm = norms[key].detach().to("cpu", torch.float32).reshape(-1).contiguous()
            assert norm.numel() == count
            _pwrite_all(fd, memoryview(norm.numpy()).cast("B"), offset)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class MergeResult:
    operation: str  # "merge" | "unmerge"
    out: Path
    device: str
    adapters: list[dict[str, Any]]
    tensors_changed: int
    tensors_copied: int
    files_rewritten: int
    files_copied: int
    bytes_written: int
    bytes_computed: int  # bytes of touched tensors (read, computed, written)
    seconds: float
    exact: bool = False  # unmerge restored recorded originals bit for bit
    busy: dict[str, float] = field(default_factory=dict)  # seconds per pipeline stage (read/compute/write/copy)
    record: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation, "out": str(self.out), "device": self.device, "adapters": self.adapters,
            "tensors_changed": self.tensors_changed, "tensors_copied": self.tensors_copied,
            "files_rewritten": self.files_rewritten, "files_copied": self.files_copied,
            "bytes_written": self.bytes_written, "bytes_computed": self.bytes_computed,
            "seconds": round(self.seconds, 3), "gb_per_s": round(self.gb_per_s, 3), "exact": self.exact,
            "stage_seconds": self.busy,
            "warnings": self.warnings,
        }


# ---------------------------------------------------------------------------------------------
# the driver shared by merge and unmerge


def _normalize_dtype(dtype: str | None) -> str | None:
    if dtype in (None, "", "auto", "same"):
        return None
    key = str(dtype).lower()
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    if str(dtype).upper() in FLOAT_DTYPES:
        return str(dtype).upper()
    raise LorahubError(f"unknown dtype '{dtype}' (use fp32, fp16 or bf16)")


def _check_out(base_root: Path, out: Path, overwrite: bool) -> None:
    base_dir = base_root if base_root.is_dir() else base_root.parent
    out_abs, base_abs = out.resolve(), base_dir.resolve()
    if out_abs == base_abs or out_abs == base_root.resolve():
        raise LorahubError("--out is the base itself; write to a new directory (the merge reads the base while "
                           "writing, and an in-place merge could not be undone if interrupted)", path=out)
    if base_root.is_dir() and base_abs in out_abs.parents:
        raise LorahubError("--out must not be inside the base directory", path=out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LorahubError("output exists; pass --overwrite to replace it (it is replaced only once the new "
                           "one is complete)", path=out)


def _copy_others(layout: BaseLayout, out_dir: Path, record_json: dict[str, Any] | None,
                 drop: set[str], dtype_changed: bool) -> int:
    copied = 0
    for rel in layout.other_files:
        if rel.name in drop or rel.name == RECORD_FILE:
            continue
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = layout.root / rel
        if dtype_changed and rel.name.endswith(".safetensors.index.json"):
            _rewrite_index(src, dest, layout, out_dir)
        else:
            shutil.copyfile(src, dest)
        copied += 1
    if layout.is_file:
        for name in sorted(os.listdir(layout.root.parent)):
            if name.startswith(UNDO_PREFIX) and name not in drop:
                shutil.copyfile(layout.root.parent / name, out_dir / name)
    if record_json is not None and record_json.get("merges"):
        (out_dir / RECORD_FILE).write_text(json.dumps(record_json, indent=2) + "\n")
    return copied


def _rewrite_index(src: Path, dest: Path, layout: BaseLayout, out_dir: Path) -> None:
    index = json.loads(src.read_text())
    total = 0
    for bf in layout.files:
        if bf.path.parent == src.parent:
            header = read_header(out_dir / bf.rel)
            total += sum(info.end - info.begin for info in header.tensors.values())
    index.setdefault("metadata", {})["total_size"] = total
    dest.write_text(json.dumps(index, indent=2) + "\n")


def _execute(layout: BaseLayout, plans: list[TensorPlan], out: Path, *, out_dtype: str | None,
             device: torch.device, record: dict[str, Any], save_originals: bool, undo_name: str | None,
             drop_files: set[str], progress: ProgressFactory | None, restore: bool = False,
             undo_source: Path | None = None) -> tuple[dict[str, int], float]:
    """Plan the files, run the pipeline into a temporary directory beside `out`, rename into place."""
    started = time.perf_counter()
    metadata_value = _compact_record(record)
    stats = {"files_rewritten": 0, "files_copied": 0, "bytes_written": 0, "bytes_computed": 0,
             "tensors_copied": 0}
    with atomic_path(out, is_dir=True) as tmp, contextlib.ExitStack() as stack:
        jobs = _file_jobs(layout, plans, tmp, out_dtype, metadata_value)
        tensor_jobs = [item[1] for job in jobs for item in job.items if item[0] == "tensor"]
        if restore:
            _attach_originals(tensor_jobs, undo_source)
        undo = None
        if undo_name is not None:
            undo = _prepare_undo(tmp / undo_name, jobs, plans, save_originals,
                                 {METADATA_KEY: metadata_value or "", "format": "pt"})
        in_size = max((j.in_bytes for j in tensor_jobs), default=1)
        out_size = max((j.out_bytes for j in tensor_jobs), default=1)
        slots = 4 if device.type == "cuda" else 3
        total = sum(job.out_size for job in jobs)
        if device.type == "cuda":
            _preload_factors(plans, device)
            stack.enter_context(exact_fp32_matmul())
            stack.enter_context(torch.cuda.device(device))
        advance = stack.enter_context(progress(total)) if progress is not None else (lambda n: None)
        pipeline = _Pipeline(device, slots, in_size, out_size, advance)
        pipeline.run(jobs, undo)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # DoRA norms live on the slots' streams
        _finish_undo(undo, pipeline.norms)
        _copy_others(layout, tmp, record, drop_files, out_dtype is not None)
        stats["files_rewritten"] = sum(1 for j in jobs if j.header_bytes is not None)
        stats["files_copied"] = sum(1 for j in jobs if j.header_bytes is None)
        stats["bytes_written"] = pipeline.bytes_written
        stats["busy"] = {k: round(v, 3) for k, v in pipeline.busy.items()}
        stats["bytes_computed"] = sum(j.out_bytes for j in tensor_jobs if j.plan is not None)
        stats["tensors_copied"] = sum(len(bf.header.tensors) for bf in layout.files) - \
            sum(1 for j in tensor_jobs if j.plan is not None)
    return stats, time.perf_counter() - started


def _preload_factors(plans: Sequence[TensorPlan], device: torch.device) -> None:
    """CUDA: put every factor on the device once (adapters are small). A per-tensor copy from pageable
    memory would synchronise the slot's stream in the middle of the pipeline."""
    cache: dict[int, LoraLayer] = {}

    def on_device(tensor: LazyTensor | None) -> LazyTensor | None:
        if tensor is None:
            return None
        value = tensor.load()
        if value.is_floating_point():
            value = value.to(torch.float32)
        return LazyTensor.of(value.to(device), key=tensor.key)

    for plan in plans:
        for op in plan.ops:
            if op.layer is not None:
                if id(op.layer) not in cache:
                    layer = op.layer
                    cache[id(layer)] = dataclasses.replace(layer, A=on_device(layer.A), B=on_device(layer.B),
                                                           magnitude=on_device(layer.magnitude),
                                                           bias=on_device(layer.bias))
                op.layer = cache[id(op.layer)]
            if op.norm is not None:
                op.norm = op.norm.to(device=device, dtype=torch.float32)
    torch.cuda.synchronize(device)


def _attach_originals(jobs: list[_TensorJob], undo_source: Path | None) -> None:
    """Exact unmerge: read each touched tensor's original bytes from the recorded undo file."""
    header = read_header(undo_source)
    for job in jobs:
        if job.plan is None:
            continue
        key = f"original::{job.plan.name}"
        if key not in header.tensors:
            raise LorahubError("recorded originals do not cover this tensor", path=undo_source, key=job.plan.name)
        info = header.tensors[key]
        if info.dtype != job.info.dtype or info.shape != job.info.shape:
            raise LorahubError("recorded original has another dtype or shape", path=undo_source, key=key)
        job.plan.ops = [Op("restore", tensor=LazyTensor(path=undo_source, key=key, shape=info.shape,
                                                        dtype=info.dtype))]
        # restore by bytes: the reader reads from the undo file instead of the merged base
        job.file = BaseFile(undo_source, job.file.rel, job.file.prefix, header)
        job.key = key
        job.restore = True


def _new_entry(operation: str, inputs: Sequence[AdapterInput], layout: BaseLayout, out_dtype: str | None,
               device: torch.device, undo_name: str | None, save_originals: bool) -> dict[str, Any]:
    return {
        "operation": operation,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lorahub_version": __version__,
        "base": str(layout.root),
        "adapters": [_adapter_record(item) for item in inputs],
        "dtype": out_dtype,
        "device": str(device),
        "undo_file": undo_name,
        "originals_saved": bool(save_originals),
    }


def merge(base: str | Path, adapters: Sequence[AdapterInput], out: str | Path, *, dtype: str | None = None,
          device: str | torch.device | None = "auto", save_originals: bool = False, overwrite: bool = False,
          progress: ProgressFactory | None = None, check: bool = True) -> MergeResult:
    """Merge `adapters` (each with its weight) into a local base, writing the result to `out`.

    `out` is always a directory holding the base's layout (a single-file base becomes `out/<name>`).
    """
    if not adapters:
        raise LorahubError("no adapters to merge")
    out = Path(out)
    layout = load_layout(base)
    _check_out(layout.root, out, overwrite)
    out_dtype = _normalize_dtype(dtype)
    dev = resolve_device(device)
    plans = plan_merge(layout, adapters, check=check)
    record = read_record(layout.root)
    index = len(record["merges"])
    undo_name = f"{UNDO_PREFIX}{index}.safetensors"
    entry = _new_entry("merge", adapters, layout, out_dtype, dev, undo_name, save_originals)
    entry["tensors_changed"] = len(plans)
    needs_undo = save_originals or any(p.keep_original or any(o.kind == "dora" for o in p.ops) for p in plans)
    if not needs_undo:
        entry["undo_file"] = None
        undo_name = None
    record = {"merges": record["merges"] + [entry]}
    stats, seconds = _execute(layout, plans, out, out_dtype=out_dtype, device=dev, record=record,
                              save_originals=save_originals, undo_name=undo_name, drop_files=set(),
                              progress=progress)
    warnings = [f"not copied: {rel} (weights in a format this merge does not rewrite)" for rel in layout.skipped]
    return MergeResult("merge", out, str(dev), entry["adapters"], len(plans), stats["tensors_copied"],
                       stats["files_rewritten"], stats["files_copied"], stats["bytes_written"],
                       stats["bytes_computed"], seconds, busy=stats["busy"], record=record, warnings=warnings)


def _same_adapters(entry: dict[str, Any], inputs: Sequence[AdapterInput], hashes: list[str]) -> bool:
    recorded = sorted((a["sha256"], float(a["weight"])) for a in entry.get("adapters", []))
    given = sorted((h, float(item.weight)) for h, item in zip(hashes, inputs))
    return recorded == given


def unmerge(merged: str | Path, adapters: Sequence[AdapterInput], out: str | Path, *, dtype: str | None = None,
            device: str | torch.device | None = "auto", overwrite: bool = False,
            progress: ProgressFactory | None = None, check: bool = True,
            exact: bool | None = None) -> MergeResult:
    """Subtract the adapters' deltas from a merged model (or restore recorded originals exactly).

    With the merge record of the last `merge` (same adapters, same weights), DoRA layers and replaced
    tensors are undone from the recorded norms / originals, and with `--save-originals` at merge time
    the whole unmerge is a bit-exact restore. Without a record only additive adapters can be unmerged.
    """
    if not adapters:
        raise LorahubError("no adapters to unmerge")
    out = Path(out)
    layout = load_layout(merged)
    _check_out(layout.root, out, overwrite)
    out_dtype = _normalize_dtype(dtype)
    dev = resolve_device(device)
    record = read_record(layout.root)
    entries = [e for e in record["merges"] if e.get("operation", "merge") == "merge"]
    last = record["merges"][-1] if record["merges"] else None
    hashes = [_combined_hash(adapter_fingerprint(item.adapter)) for item in adapters]
    # an adapter given without a weight takes the weight it was merged with
    recorded_weights = {a["sha256"]: float(a["weight"]) for e in entries for a in e.get("adapters", [])}
    inputs = []
    warnings: list[str] = []
    for item, digest in zip(adapters, hashes):
        if not item.weight_given and digest in recorded_weights:
            item = AdapterInput(item.adapter, recorded_weights[digest], item.label, True)
        elif item.weight_given and digest in recorded_weights and recorded_weights[digest] != item.weight:
            warnings.append(f"{item.name}: unmerging with weight {item.weight:g}, but it was merged with "
                            f"{recorded_weights[digest]:g}")
        inputs.append(item)
    matches_last = last is not None and last.get("operation", "merge") == "merge" and \
        _same_adapters(last, inputs, hashes)
    if matches_last:
        # undo in the recorded order (LIFO per tensor matters for DoRA; the norm keys use merge positions)
        recorded = [(a["sha256"], float(a["weight"])) for a in last["adapters"]]
        order = sorted(range(len(inputs)), key=lambda i: recorded.index((hashes[i], float(inputs[i].weight))))
        inputs, hashes = [inputs[i] for i in order], [hashes[i] for i in order]
    undo_path = None
    if matches_last and last.get("undo_file"):
        undo_path = layout.root / last["undo_file"] if layout.root.is_dir() else \
            layout.root.parent / last["undo_file"]
        if not undo_path.is_file():
            warnings.append(f"recorded undo file {last['undo_file']} is missing")
            undo_path = None
    use_originals = bool(matches_last and last.get("originals_saved") and undo_path is not None)
    if exact and not use_originals:
        raise LorahubError("an exact unmerge needs the originals recorded by `lorahub merge --save-originals` "
                           "for exactly these adapters and weights (the last merge recorded in "
                           f"{RECORD_FILE})", path=layout.root)
    if exact is False:
        use_originals = False

    merge_plans = plan_merge(layout, inputs, check=check)
    undo_header = read_header(undo_path) if undo_path is not None else None
    plans: list[TensorPlan] = []
    for plan in merge_plans:
        ops: list[Op] = []
        for op in reversed(plan.ops):
            who = inputs[op.adapter_index].name
            if op.kind in ("add", "bias"):
                ops.append(Op(op.kind, -op.coeff, layer=op.layer, adapter_index=op.adapter_index, rows=op.rows))
            elif use_originals:
                continue  # restored below
            elif op.kind == "dora":
                key = op.norm_key
                if undo_header is None or key not in undo_header.tensors:
                    raise UnsupportedError(
                        f"{who}: DoRA cannot be unmerged from the merged weights alone: the merge rescaled "
                        f"each row of '{plan.name}' by m/‖W₀+ΔW‖ and that norm is not in the merged model. "
                        f"Unmerge needs the {RECORD_FILE} and undo file that `lorahub merge` wrote for this "
                        "exact merge (same adapters and weights), or merge again from the original base")
                norm = LazyTensor(path=undo_path, key=key, shape=undo_header.tensors[key].shape, dtype="F32").load()
                ops.append(Op("undora", op.coeff, layer=op.layer, norm=norm, adapter_index=op.adapter_index))
            elif op.kind == "replace":
                key = f"original::{plan.name}"
                if undo_header is None or key not in undo_header.tensors:
                    raise UnsupportedError(
                        f"{who}: '{plan.name}' was replaced by a full tensor (modules_to_save); the old value "
                        f"is not in the merged model. Unmerge needs the undo file `lorahub merge` recorded "
                        "for this exact merge")
                info = undo_header.tensors[key]
                # a replace overwrote everything merged before it on this tensor: restore W₀ and stop
                ops = [Op("restore", tensor=LazyTensor(path=undo_path, key=key, shape=info.shape,
                                                       dtype=info.dtype))]
                break
        plan.ops = ops
        plans.append(plan)

    if matches_last:
        new_record = {"merges": record["merges"][:-1]}
        drop = {last["undo_file"]} if last.get("undo_file") else set()
    else:
        entry = _new_entry("unmerge", inputs, layout, out_dtype, dev, None, False)
        new_record = {"merges": record["merges"] + [entry]}
        drop = set()
    stats, seconds = _execute(layout, plans, out, out_dtype=out_dtype, device=dev, record=new_record,
                              save_originals=False, undo_name=None, drop_files=drop, progress=progress,
                              restore=use_originals, undo_source=undo_path)
    warnings += [f"not copied: {rel} (weights in a format this unmerge does not rewrite)" for rel in layout.skipped]
    adapters_out = [{"name": item.name, "weight": item.weight, "sha256": digest}
                    for item, digest in zip(inputs, hashes)]
    return MergeResult("unmerge", out, str(dev), adapters_out, len(plans), stats["tensors_copied"],
                       stats["files_rewritten"], stats["files_copied"], stats["bytes_written"],
                       stats["bytes_computed"], seconds, exact=use_originals, busy=stats["busy"], record=new_record,
                       warnings=warnings)


def load_inputs(args: Sequence[str], *, input_format: str | None = None,
                allow_pickle: bool = False) -> list[AdapterInput]:
    """Adapters from `PATH[:WEIGHT]` arguments (local paths or `hf://` references, pulled first)."""
    from .options import open_adapter

    inputs = []
    for arg in args:
        spec, weight = parse_adapter_arg(arg)
        adapter = open_adapter(spec, input_format or "auto", allow_pickle)
        inputs.append(AdapterInput(adapter, 1.0 if weight is None else weight, spec, weight is not None))
    return inputs
