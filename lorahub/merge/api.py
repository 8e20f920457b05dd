"""`merge` and `unmerge`: plan the ops, run the pipeline into a temporary directory beside `out`, record
what was done, rename into place."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from ..adapter import LazyTensor
from ..devices import exact_fp32_matmul, resolve_device
from ..errors import LorahubError, UnsupportedError
from ..output import InputSpec
from ..output import prepare as prepare_output
from ..output import write as write_output
from ..storage import read_header, read_json_file
from .ops import FLOAT_DTYPES, Op
from .pipeline import Pipeline, preload_factors
from .plan import AdapterInput, BaseFile, BaseLayout, TensorJob, TensorPlan, file_jobs, load_layout, plan_merge
from .record import (
    METADATA_KEY,
    RECORD_FILE,
    UNDO_PREFIX,
    adapter_fingerprint,
    combined_hash,
    compact_record,
    finish_undo,
    new_entry,
    prepare_undo,
    read_record,
    same_adapters,
)

DTYPE_ALIASES = {"fp32": "F32", "float32": "F32", "f32": "F32", "fp16": "F16", "float16": "F16", "f16": "F16",
                 "half": "F16", "bf16": "BF16", "bfloat16": "BF16", "fp64": "F64", "float64": "F64"}
# progress(total_bytes) -> a context manager yielding advance(nbytes), e.g. lorahub.ui.byte_progress
ProgressFactory = Callable[[int], ContextManager[Callable[[int], None]]]


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


def _check_out(layout: BaseLayout, adapters: Sequence[AdapterInput], role: str, out: Path,
               overwrite: bool) -> list[InputSpec]:
    """lorahub.output's policy, before any work: `--out` is never the base (or merged model) or an
    adapter, nor holds or lies inside one. Returns those inputs for the write."""
    from ..formats import adapter_sources

    inputs: list[InputSpec] = [(role, layout.root)]
    inputs += [("adapter", p) for item in adapters for p in adapter_sources(item.adapter)]
    prepare_output(out, kind="dir", overwrite=overwrite, inputs=inputs)
    return inputs


def _copy_others(layout: BaseLayout, out_dir: Path, record_json: dict[str, Any] | None,
                 drop: set[str], dtype_changed: bool) -> None:
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
    if layout.is_file:
        for name in sorted(os.listdir(layout.root.parent)):
            if name.startswith(UNDO_PREFIX) and name not in drop:
                shutil.copyfile(layout.root.parent / name, out_dir / name)
    if record_json is not None and record_json.get("merges"):
        (out_dir / RECORD_FILE).write_text(json.dumps(record_json, indent=2) + "\n")


def _rewrite_index(src: Path, dest: Path, layout: BaseLayout, out_dir: Path) -> None:
    index = read_json_file(src)
    total = 0
    for bf in layout.files.values():
        if bf.path.parent == src.parent:
            header = read_header(out_dir / bf.rel)
            total += sum(info.end - info.begin for info in header.tensors.values())
    index.setdefault("metadata", {})["total_size"] = total
    dest.write_text(json.dumps(index, indent=2) + "\n")


def _attach_originals(jobs: list[TensorJob], undo_source: Path) -> None:
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
        job.file = BaseFile(undo_source, job.file.rel, header)
        job.key = key
        job.restore = True


def _execute(layout: BaseLayout, plans: list[TensorPlan], out: Path, *, out_inputs: list[InputSpec],
             overwrite: bool, operation: str, out_dtype: str | None,
             device: torch.device, record: dict[str, Any], save_originals: bool, undo_name: str | None,
             drop_files: set[str], progress: ProgressFactory | None, restore: bool = False,
             undo_source: Path | None = None) -> tuple[dict[str, Any], float]:
    """Plan the files, run the pipeline into a temporary directory beside `out` (locked: a second writer
    fails here, before any data is written) and swap it into place (lorahub.output)."""
    started = time.perf_counter()
    metadata_value = compact_record(record)
    with write_output(out, kind="dir", overwrite=overwrite, inputs=out_inputs, command=operation) as tmp, \
            contextlib.ExitStack() as stack:
        jobs = file_jobs(layout, plans, tmp, out_dtype, metadata_value)
        tensor_jobs = [tjob for job in jobs for tjob in job.tensors]
        if restore:
            assert undo_source is not None  # unmerge restores only from a recorded undo file (use_originals)
            _attach_originals(tensor_jobs, undo_source)
        undo = None
        if undo_name is not None:
            undo = prepare_undo(tmp / undo_name, jobs, plans, save_originals,
                                {METADATA_KEY: metadata_value or "", "format": "pt"})
        in_size = max((j.in_bytes for j in tensor_jobs), default=1)
        out_size = max((j.out_bytes for j in tensor_jobs), default=1)
        slots = 4 if device.type == "cuda" else 3
        total = sum(job.out_size for job in jobs)
        if device.type == "cuda":
            preload_factors(plans, device)
            stack.enter_context(exact_fp32_matmul())
            stack.enter_context(torch.cuda.device(device))
        advance = stack.enter_context(progress(total)) if progress is not None else (lambda n: None)
        pipeline = Pipeline(device, slots, in_size, out_size, advance)
        pipeline.run(jobs, undo)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # DoRA norms live on the slots' streams
        finish_undo(undo, pipeline.norms)
        _copy_others(layout, tmp, record, drop_files, out_dtype is not None)
        computed = [j for j in tensor_jobs if j.plan is not None]
        stats = {
            "files_rewritten": sum(1 for j in jobs if j.header_bytes is not None),
            "files_copied": sum(1 for j in jobs if j.header_bytes is None),
            "bytes_written": pipeline.bytes_written,
            "busy": {k: round(v, 3) for k, v in pipeline.busy.items()},
            "bytes_computed": sum(j.out_bytes for j in computed),
            "tensors_copied": sum(len(bf.header.tensors) for bf in layout.files.values()) - len(computed),
        }
    return stats, time.perf_counter() - started


def _result(operation: str, out: Path, device: torch.device, adapters: list[dict[str, Any]], changed: int,
            stats: dict[str, Any], seconds: float, **extra: Any) -> MergeResult:
    return MergeResult(operation, out, str(device), adapters, changed, stats["tensors_copied"],
                       stats["files_rewritten"], stats["files_copied"], stats["bytes_written"],
                       stats["bytes_computed"], seconds, busy=stats["busy"], **extra)


# ---------------------------------------------------------------------------------------------
# merge


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
    out_inputs = _check_out(layout, adapters, "base", out, overwrite)
    out_dtype = _normalize_dtype(dtype)
    dev = resolve_device(device)
    planned = [f"{item.name}: {line}" for item in adapters for line in item.adapter.warnings]
    plans = plan_merge(layout, adapters, check=check, warnings=planned)
    record = read_record(layout.root)
    index = len(record["merges"])
    undo_name: str | None = f"{UNDO_PREFIX}{index}.safetensors"
    entry = new_entry("merge", adapters, layout, out_dtype, dev, undo_name, save_originals)
    entry["tensors_changed"] = len(plans)
    needs_undo = save_originals or any(p.keep_original or any(o.kind == "dora" for o in p.ops) for p in plans)
    if not needs_undo:
        entry["undo_file"] = None
        undo_name = None
    record = {"merges": record["merges"] + [entry]}
    stats, seconds = _execute(layout, plans, out, out_inputs=out_inputs, overwrite=overwrite, operation="merge",
                              out_dtype=out_dtype, device=dev, record=record,
                              save_originals=save_originals, undo_name=undo_name, drop_files=set(),
                              progress=progress)
    warnings = planned + [f"not copied: {rel} (weights in a format this merge does not rewrite)"
                          for rel in layout.skipped]
    return _result("merge", out, dev, entry["adapters"], len(plans), stats, seconds, record=record,
                   warnings=warnings)


# ---------------------------------------------------------------------------------------------
# unmerge


def _unmerge_plans(merge_plans: list[TensorPlan], inputs: Sequence[AdapterInput], use_originals: bool,
                   undo_path: Path | None) -> list[TensorPlan]:
    """The merge's ops reversed: negated deltas, DoRA undone from recorded norms, replaced tensors restored."""
    undo_header = read_header(undo_path) if undo_path is not None else None
    plans: list[TensorPlan] = []
    for plan in merge_plans:
        ops: list[Op] = []
        for op in reversed(plan.ops):
            who = inputs[op.adapter_index].name
            if op.kind in ("add", "bias"):
                ops.append(Op(op.kind, -op.coeff, layer=op.layer, adapter_index=op.adapter_index, rows=op.rows))
            elif op.kind == "add_tensor":
                ops.append(Op(op.kind, -op.coeff, tensor=op.tensor, adapter_index=op.adapter_index))
            elif use_originals:
                continue  # restored by _attach_originals
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
    return plans


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
    out_inputs = _check_out(layout, adapters, "merged model", out, overwrite)
    out_dtype = _normalize_dtype(dtype)
    dev = resolve_device(device)
    record = read_record(layout.root)
    entries = [e for e in record["merges"] if e.get("operation", "merge") == "merge"]
    last = record["merges"][-1] if record["merges"] else None
    hashes = [combined_hash(adapter_fingerprint(item.adapter)) for item in adapters]
    # an adapter given without a weight takes the weight it was merged with
    recorded_weights = {a["sha256"]: float(a["weight"]) for e in entries for a in e.get("adapters", [])}
    inputs = []
    warnings = [f"{item.name}: {line}" for item in adapters for line in item.adapter.warnings]
    for item, digest in zip(adapters, hashes):
        if not item.weight_given and digest in recorded_weights:
            item = AdapterInput(item.adapter, recorded_weights[digest], item.label, True)
        elif item.weight_given and digest in recorded_weights and recorded_weights[digest] != item.weight:
            warnings.append(f"{item.name}: unmerging with weight {item.weight:g}, but it was merged with "
                            f"{recorded_weights[digest]:g}")
        inputs.append(item)
    # the last merge, if these are exactly its adapters and weights
    matched = last if last is not None and last.get("operation", "merge") == "merge" and \
        same_adapters(last, inputs, hashes) else None
    if matched is not None:
        # undo in the recorded order (LIFO per tensor matters for DoRA; the norm keys use merge positions)
        recorded = [(a["sha256"], float(a["weight"])) for a in matched["adapters"]]
        order = sorted(range(len(inputs)), key=lambda i: recorded.index((hashes[i], float(inputs[i].weight))))
        inputs, hashes = [inputs[i] for i in order], [hashes[i] for i in order]
    undo_path = None
    if matched is not None and matched.get("undo_file"):
        undo_path = layout.root / matched["undo_file"] if layout.root.is_dir() else \
            layout.root.parent / matched["undo_file"]
        if not undo_path.is_file():
            warnings.append(f"recorded undo file {matched['undo_file']} is missing")
            undo_path = None
    use_originals = bool(matched is not None and matched.get("originals_saved") and undo_path is not None)
    if exact and not use_originals:
        raise LorahubError("an exact unmerge needs the originals recorded by `lorahub merge --save-originals` "
                           "for exactly these adapters and weights (the last merge recorded in "
                           f"{RECORD_FILE})", path=layout.root)
    if exact is False:
        use_originals = False

    plans = _unmerge_plans(plan_merge(layout, inputs, check=check, warnings=warnings), inputs, use_originals,
                           undo_path)
    if matched is not None:
        new_record = {"merges": record["merges"][:-1]}
        drop = {matched["undo_file"]} if matched.get("undo_file") else set()
    else:
        # nothing says these deltas are in this model: subtract them as given, say so, and record it
        unrecorded = [item.name for item, digest in zip(inputs, hashes) if digest not in recorded_weights]
        if not entries:
            warnings.insert(0, f"no lorahub merge record in {layout.root}: subtracting the adapter's delta as "
                               "given; the result is exact only if it was merged with the same weights")
        elif unrecorded:
            warnings.insert(0, f"the lorahub merge record in {layout.root} does not list {', '.join(unrecorded)}: "
                               "subtracting the adapter's delta as given; the result is exact only if it was "
                               "merged with the same weights")
        entry = new_entry("unmerge", inputs, layout, out_dtype, dev, None, False)
        entry["recorded_merge"] = False
        new_record = {"merges": record["merges"] + [entry]}
        drop = set()
    stats, seconds = _execute(layout, plans, out, out_inputs=out_inputs, overwrite=overwrite, operation="unmerge",
                              out_dtype=out_dtype, device=dev, record=new_record,
                              save_originals=False, undo_name=None, drop_files=drop, progress=progress,
                              restore=use_originals, undo_source=undo_path)
    warnings += [f"not copied: {rel} (weights in a format this unmerge does not rewrite)" for rel in layout.skipped]
    adapters_out = [{"name": item.name, "weight": item.weight, "sha256": digest}
                    for item, digest in zip(inputs, hashes)]
    return _result("unmerge", out, dev, adapters_out, len(plans), stats, seconds, exact=use_originals,
                   record=new_record, warnings=warnings)
