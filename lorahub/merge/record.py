"""What a merge leaves behind so it can be undone: the merge record (`lorahub_merge.json` and a compact
copy in each rewritten file's metadata), adapter fingerprints, and the undo file (original bytes of
replaced tensors, DoRA row norms)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .. import __version__
from ..adapter import Adapter
from ..errors import LorahubError
from ..formats.peft import CONFIG as PEFT_CONFIG
from ..storage import build_header, file_sha256, json_type, pwrite_all, read_json_file

if TYPE_CHECKING:
    from .plan import AdapterInput, BaseLayout, FileJob, TensorPlan

RECORD_FILE = "lorahub_merge.json"
UNDO_PREFIX = "lorahub_merge_undo."
METADATA_KEY = "lorahub_merge"


def is_lorahub_file(name: str) -> bool:
    return name == RECORD_FILE or name.startswith(UNDO_PREFIX)


# ---------------------------------------------------------------------------------------------
# fingerprints: which adapter was merged, whatever it is called now

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
        config = Path(adapter.path) / PEFT_CONFIG
        if config.is_file():
            files.append(config)
    return {f.name: _cached_sha256(f) for f in files if f.is_file()}


def combined_hash(hashes: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(f"{name}\0{hashes[name]}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the record


def read_record(root: Path) -> dict[str, Any]:
    """The merge record beside a merged model (`{"merges": []}` when there is none), every field of
    the JSON type lorahub writes; anything else is a one-line error naming the file and the field."""
    path = (root if root.is_dir() else root.parent) / RECORD_FILE
    if not path.exists() and not path.is_symlink():
        return {"merges": []}
    record = read_json_file(path, what="merge record")
    if not isinstance(record, dict) or not isinstance(record.get("merges"), list):
        raise LorahubError("merge record has no 'merges' list", path=path)
    for index, entry in enumerate(record["merges"]):
        problem = _entry_problem(entry)
        if problem:
            raise LorahubError(f"corrupt merge record: merges[{index}]{problem}", path=path)
    return record


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one entry of a merge record, or None."""
    if not isinstance(entry, dict):
        return f" is {json_type(entry)}, not an object"
    for key, types, label in (("operation", (str,), "a string"), ("created", (str,), "a string"),
                              ("undo_file", (str,), "a file name"), ("originals_saved", (bool,), "true or false"),
                              ("adapters", (list,), "an array")):
        value = entry.get(key)
        if value is not None and not isinstance(value, types):
            return f".{key} must be {label}, found {json_type(value)}"
    if entry.get("operation") not in (None, "merge", "unmerge"):
        return f".operation is '{entry['operation']}', not merge or unmerge"
    undo = entry.get("undo_file")
    if undo is not None and (not undo.startswith(UNDO_PREFIX) or "/" in undo or "\\" in undo):
        return f".undo_file '{undo}' is not an undo file name ({UNDO_PREFIX}…, beside the model)"
    for index, adapter in enumerate(entry.get("adapters") or ()):
        if not isinstance(adapter, dict):
            return f".adapters[{index}] is {json_type(adapter)}, not an object"
        for key, label in (("name", "a string"), ("sha256", "a string"), ("weight", "a number")):
            if key not in adapter:
                return f".adapters[{index}] has no '{key}'"
            value = adapter[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if key == "weight" else \
                isinstance(value, str)
            if not ok:
                return f".adapters[{index}].{key} must be {label}, found {json_type(value)}"
    return None


def _adapter_record(item: AdapterInput) -> dict[str, Any]:
    adapter = item.adapter
    hashes = adapter_fingerprint(adapter)
    return {
        "name": item.name,
        "path": str(adapter.path) if adapter.path is not None else None,
        "format": adapter.format,
        "weight": item.weight,
        "sha256": combined_hash(hashes),
        "files": hashes,
        "layers": len(adapter.layers),
        "replaced_tensors": len(adapter.full_tensors),
        "dora": adapter.is_dora,
    }


def new_entry(operation: str, inputs: Sequence[AdapterInput], layout: BaseLayout, out_dtype: str | None,
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


def same_adapters(entry: dict[str, Any], inputs: Sequence[AdapterInput], hashes: list[str]) -> bool:
    recorded = sorted((a["sha256"], float(a["weight"])) for a in entry.get("adapters", []))
    given = sorted((h, float(item.weight)) for h, item in zip(hashes, inputs))
    return recorded == given


def compact_record(record: dict[str, Any]) -> str | None:
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
# the undo file: original bytes and DoRA norms


@dataclass
class UndoFile:
    path: Path
    norm_offsets: dict[str, tuple[int, int]]  # key -> (absolute offset, count)


def prepare_undo(path: Path, jobs: list[FileJob], plans: Sequence[TensorPlan], save_all: bool,
                 metadata: dict[str, str]) -> UndoFile | None:
    """Lay out the undo file and size it; the writer thread fills in original bytes, `finish_undo` the norms."""
    entries = []
    offset = 0
    originals = []
    for job in jobs:
        for tjob in job.tensors:
            if tjob.plan is None:
                continue
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
                layer = op.lora_layer
                # LyCORIS DoRA may norm per input channel: one norm per magnitude
                count = layer.magnitude.numel if layer.lycoris is not None and layer.magnitude else layer.out_features
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
        assert tjob.undo_offset is not None  # set above for every job put in `originals`
        tjob.undo_offset += len(header)
    return UndoFile(path, {key: (len(header) + off, count) for key, off, count in norm_specs})


def finish_undo(undo: UndoFile | None, norms: dict[str, torch.Tensor]) -> None:
    if undo is None or not undo.norm_offsets:
        return
    fd = os.open(undo.path, os.O_WRONLY)
    try:
        for key, (offset, count) in undo.norm_offsets.items():
            norm = norms[key].detach().to("cpu", torch.float32).reshape(-1).contiguous()
            assert norm.numel() == count
            # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; ndarray is a buffer on 3.10 too
            pwrite_all(fd, memoryview(norm.numpy()).cast("B"), offset)  # type: ignore[arg-type]
    finally:
        os.close(fd)
