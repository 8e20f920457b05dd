"""What a merge does, before any tensor data is read: the base's files, which base tensor gets which
ops, and where every byte of each output file comes from.

A merge changes values only, so every tensor keeps its dtype, shape and relative offset. Each base
safetensors file is either copied whole when no tensor in it is touched, or rewritten as: a new header
(the old one plus a `lorahub_merge` metadata record, so absolute offsets shift by the header growth) +
untouched byte ranges copied + touched tensors computed. `--dtype` rewrites every file contiguously.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..adapter import ST_DTYPES, ST_ITEMSIZE, Adapter, LoraLayer
from ..base import BaseModel, load_base
from ..errors import CheckFailed, LorahubError, UnsupportedError
from ..families import align_to_base
from ..kinds import CONV1D, LINEAR
from ..lycoris import delta_base_names
from ..names import ModuleRef, base_conv1d, match_layers
from ..storage import PICKLE_SUFFIXES, SafetensorsHeader, TensorInfo, build_header, read_header
from ..validate import validate
from .ops import FLOAT_DTYPES, Op
from .record import METADATA_KEY, is_lorahub_file


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


# ---------------------------------------------------------------------------------------------
# the base: its files


@dataclass
class BaseFile:
    path: Path  # the file on disk
    rel: Path  # its path inside the base (the output path inside --out)
    header: SafetensorsHeader


@dataclass
class BaseLayout:
    """A local base: its weight files (with their headers) and every file that is not a weight file."""

    root: Path  # a directory, or the single file
    files: dict[str, BaseFile]  # by the model's file path (`BaseTensor.file`), in the model's order
    other_files: list[Path]  # relative paths of non-weight files to copy
    skipped: list[Path]  # weight files we will not copy (pickles, other variants)
    model: BaseModel

    @property
    def is_file(self) -> bool:
        return self.root.is_file()

    def locate(self, name: str) -> tuple[BaseFile, str] | None:
        """The file holding base tensor `name` and its key there, or None."""
        tensor = self.model.tensors.get(name)
        if tensor is None or tensor.key is None or tensor.file not in self.files:
            return None
        return self.files[tensor.file], tensor.key


def load_layout(spec: str | Path) -> BaseLayout:
    """Open a local base (directory, shards, diffusers layout, single file) with `lorahub.base`."""
    model = load_base(str(spec))
    single = Path(str(spec)).expanduser().is_file()
    if model.root is None:
        raise LorahubError("merge needs the base's weights on local disk; download them first "
                           "(e.g. `hf download REPO --local-dir DIR`) and pass the directory", path=spec)
    if not model.complete:
        for name in model.files:  # name the file and the first tensor whose bytes are missing
            try:
                read_header(Path(model.root) / name)
            except LorahubError as exc:
                raise LorahubError(f"{exc}; merging needs the whole file (a header-only skeleton or an "
                                   "interrupted download?)") from None
        raise LorahubError("the base's weight files hold less data than their headers describe "
                           "(a header-only skeleton or an interrupted download)", path=spec)
    model_root = Path(model.root)
    root = Path(str(spec)).expanduser() if single else model_root
    rels = [rel for rel in model.files if not is_lorahub_file(Path(rel).name)]
    if not rels:
        raise LorahubError("no safetensors weight files in the base", path=spec)
    # the offsets of every tensor, for positioned reads and copies: each header read once
    files = {rel: BaseFile(model_root / rel, Path(rel), read_header(model_root / rel)) for rel in rels}
    other: list[Path] = []
    skipped: list[Path] = []
    if not single:
        weight_rel = {bf.rel for bf in files.values()}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file() or rel in weight_rel:
                continue
            lower = path.name.lower()
            if (lower.endswith(".safetensors") and not is_lorahub_file(path.name)) or \
                    lower.endswith(PICKLE_SUFFIXES) or lower.endswith((".bin.index.json", ".gguf")):
                skipped.append(rel)  # weights this merge does not update must not ship stale
                continue
            other.append(rel)
    return BaseLayout(root, files, other, skipped, model)


# ---------------------------------------------------------------------------------------------
# which base tensor gets which ops


@dataclass
class TensorPlan:
    name: str  # full base tensor name
    file: BaseFile
    key: str  # key inside the file
    ops: list[Op] = field(default_factory=list)
    keep_original: bool = False


def validate_inputs(layout: BaseLayout, inputs: Sequence[AdapterInput]) -> None:
    """Refuse, with the validate report, any adapter that does not fit the base."""
    for item in inputs:
        adapter = item.adapter
        adapter.require_lora("merge")
        report = validate(adapter, layout.model, suggest=False)
        if not report.ok:
            raise CheckFailed(f"{item.name}: {report.summary}; nothing was written", report=report)


def oriented_by_base(layer: LoraLayer, base: BaseModel, ref: ModuleRef) -> LoraLayer:
    """The layer as the base layer's type says it lies: a Conv1D base transposes ΔW, an ordinary layer
    does not, whatever the adapter's fan_in_fan_out says (PEFT decides by the layer's type)."""
    conv1d = base_conv1d(layer, base, ref)
    if conv1d is None or conv1d == (layer.geometry is CONV1D):
        return layer
    return replace(layer, kind=LINEAR.name, fan_in_fan_out=conv1d)


def plan_merge(layout: BaseLayout, inputs: Sequence[AdapterInput], *, check: bool = True,
               warnings: list[str] | None = None) -> list[TensorPlan]:
    """Ops per touched base tensor, in command-line order per tensor (order matters only for DoRA).
    What the base decided against the adapter (orientation) is said once per adapter in `warnings`."""
    if check:
        validate_inputs(layout, inputs)
    plans: dict[str, TensorPlan] = {}

    def plan_for(name: str, item: AdapterInput) -> TensorPlan:
        located = layout.locate(name)
        if located is None:
            raise LorahubError(f"base has no tensor '{name}'", path=item.adapter.path)
        if name not in plans:
            bf, key = located
            dtype = bf.header.tensors[key].dtype
            if dtype not in FLOAT_DTYPES:
                raise UnsupportedError(f"cannot merge into a {dtype} tensor (quantized or integer base); "
                                       "dequantize the base first", path=bf.path, key=key)
            plans[name] = TensorPlan(name, bf, key)
        return plans[name]

    for index, item in enumerate(inputs):
        adapter = item.adapter
        if not (adapter.layers or adapter.full_tensors or adapter.delta_tensors):
            raise LorahubError("no LoRA modules to merge", path=adapter.path)
        adapter.require_finite_alphas("merge")
        adapter = align_to_base(adapter, layout.model)  # a family's other naming: fused ↔ split, exactly
        match = match_layers(adapter, layout.model)
        deltas = delta_base_names(adapter, layout.model) if adapter.delta_tensors else {}
        missing = list(match.missing) + list(match.full_missing) + [n for n, t in deltas.items() if t is None]
        if missing:
            raise LorahubError(f"{len(missing)} adapter module(s) have no weight in the base, e.g. "
                               f"'{missing[0]}' (run `lorahub validate`)", path=adapter.path)
        # full tensors first: they replace the weight that the adapter's LoRA layers then apply to
        for source_name, tensor in adapter.full_tensors.items():
            plan = plan_for(match.full_tensors[source_name], item)
            storage = ST_DTYPES[plan.file.header.tensors[plan.key].dtype]
            plan.ops.append(Op("replace", item.weight, tensor=tensor, adapter_index=index, storage_dtype=storage))
            plan.keep_original = True
        for name, tensor in adapter.delta_tensors.items():  # diff/diff_b on vectors: W += c·T
            plan_for(str(deltas[name]), item).ops.append(Op("add_tensor", item.weight, tensor=tensor,
                                                             adapter_index=index))
        flipped: dict[bool, list[str]] = {True: [], False: []}
        for target, given in adapter.layers.items():
            ref = match.refs[target]
            layer = oriented_by_base(given, layout.model, ref)
            if given.lycoris is not None and layer.fan_in_fan_out:
                raise UnsupportedError(f"LyCORIS module '{given.source_name or target}' targets a transformers Conv1D "
                                       "(in, out) weight, which LyCORIS does not adapt", path=adapter.path)
            if layer is not given:
                flipped[layer.fan_in_fan_out].append(target)
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
        if warnings is not None and flipped[False]:
            warnings.append(f"{item.name}: fan_in_fan_out=true on {len(flipped[False])} layer(s) that are ordinary "
                            f"(out, in) layers in the base (e.g. '{flipped[False][0]}'): ignored, as PEFT does")
        if warnings is not None and flipped[True]:
            warnings.append(f"{item.name}: {len(flipped[True])} layer(s) are Conv1D (in, out) in the base but the "
                            f"adapter says fan_in_fan_out=false (e.g. '{flipped[True][0]}'): ΔW transposed, as "
                            "PEFT does")
    return list(plans.values())


# ---------------------------------------------------------------------------------------------
# where every byte of each output file comes from


@dataclass
class TensorJob:
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
class FileJob:
    source: BaseFile
    dest: Path
    header_bytes: bytes | None  # None: copy the whole file
    items: list[tuple]  # ("copy", src_off, dst_off, n) | ("tensor", TensorJob), in output order
    out_size: int

    @property
    def tensors(self) -> list[TensorJob]:
        return [item[1] for item in self.items if item[0] == "tensor"]


def file_jobs(layout: BaseLayout, plans: Sequence[TensorPlan], out_dir: Path, out_dtype: str | None,
              metadata_value: str | None) -> list[FileJob]:
    by_file: dict[Path, dict[str, TensorPlan]] = {}
    for plan in plans:
        by_file.setdefault(plan.file.rel, {})[plan.key] = plan
    jobs: list[FileJob] = []
    for bf in layout.files.values():
        dest = out_dir / bf.rel
        touched = by_file.get(bf.rel, {})
        header = bf.header
        convert = {key for key, info in header.tensors.items()
                   if out_dtype and info.dtype in FLOAT_DTYPES and info.dtype != out_dtype}
        if not touched and not convert:
            jobs.append(FileJob(bf, dest, None, [], header.file_size))
            continue
        metadata = dict(header.metadata)
        metadata.pop(METADATA_KEY, None)
        if metadata_value is not None:
            metadata[METADATA_KEY] = metadata_value
        ordered = sorted(header.tensors.values(), key=lambda info: (info.begin, info.end))
        entries = []
        if convert:  # new dtypes: a new, contiguous layout in the same tensor order
            assert out_dtype is not None  # `convert` is empty without an output dtype
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
                items.append(("tensor", TensorJob(touched.get(info.name), bf, info.name, info, dtype,
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
        jobs.append(FileJob(bf, dest, header_bytes, items, data_start + data_len))
    return jobs
