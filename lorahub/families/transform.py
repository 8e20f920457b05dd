"""Re-express an adapter in another naming of its family, exactly.

- fused → split (a LoRA on Flux's `img_attn.qkv` for diffusers' `to_q`, `to_k`, `to_v`): every part
  keeps A (shared) and takes its rows of B; alpha and rank stay, so each part's ΔW is the row block
  of the fused ΔW, bit for bit.
- split → fused (LoRAs on `to_q`, `to_k`, `to_v`, `proj_mlp` for `single_blocks.N.linear1`): A is the
  parts' A stacked (rank Σrᵢ), B is block-diagonal (part i's B in its rows and its rank columns, zeros
  elsewhere; a missing part's rows are zero). ΔW's row block i is then Bᵢ·Aᵢ plus exact zeros. One scale
  for all: equal scales stay in alpha (alpha' = s·Σrᵢ), different ones are multiplied into B's blocks.
- swapped halves (Flux's final `adaLN_modulation.1` shift|scale ↔ `norm_out.linear` scale|shift): B's
  two row halves change places.

Tensors that change are `DerivedTensor`s: their shape and dtype are known at once (validate reads no
data), their values are computed when an operation loads them. Renamed modules keep their tensors.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from ..adapter import Adapter, LazyTensor, LoraLayer
from ..errors import LorahubError
from ..kinds import LINEAR
from ..lazy import torch
from .spec import DIFFUSERS, Entry, Match, fill

if TYPE_CHECKING:
    from . import Detected


class DerivedTensor(LazyTensor):
    """A tensor computed from others when it is loaded (row slices, stacks, block-diagonal factors)."""

    __slots__ = ("_compute",)

    def __init__(self, shape: tuple[int, ...], dtype: str, compute: Callable[[], torch.Tensor]):
        super().__init__(shape=shape, dtype=dtype)
        self._compute = compute

    def load(self) -> torch.Tensor:
        return self._compute()

    def __repr__(self) -> str:
        return f"DerivedTensor({self.dtype}{list(self.shape)})"


def _rows(tensor: LazyTensor, blocks: list[tuple[int, int]]) -> LazyTensor:
    """The rows `blocks` of a factor, concatenated in that order (the tensor itself when that is all)."""
    n = tensor.shape[0]
    if blocks == [(0, n)]:
        return tensor
    size = sum(stop - start for start, stop in blocks)

    def compute() -> torch.Tensor:
        value = tensor.load()
        return torch.cat([value[start:stop] for start, stop in blocks]).contiguous()

    return DerivedTensor((size, *tensor.shape[1:]), tensor.dtype, compute)


def _refuse(adapter: Adapter, layer: LoraLayer, what: str) -> LorahubError:
    name = layer.source_name or layer.target
    return LorahubError(f"module '{name}': {what}", path=adapter.path)


def _check_linear(adapter: Adapter, layer: LoraLayer, entry: Entry) -> None:
    if layer.geometry is not LINEAR:
        raise _refuse(adapter, layer, f"a {layer.kind} layer on {entry.original}, which is a linear layer")
    if layer.magnitude is not None:
        raise _refuse(adapter, layer, "DoRA on a fused/split module cannot be re-expressed in the other naming "
                      "(its magnitude belongs to the whole fused weight)")


def _swap_applies(entry: Entry, layer: LoraLayer) -> bool:
    return not entry.swap_if_two or layer.B.shape[0] == 2 * layer.in_features


def _split(adapter: Adapter, layer: LoraLayer, match: Match, prefix: str) -> list[LoraLayer]:
    """An original-named layer as the diffusers layers of its entry (fused → split, swapped halves)."""
    entry = match.entry
    assert entry is not None
    if entry.is_rename or not _swap_applies(entry, layer):
        target = prefix + fill(entry.parts[0].module, match.index)
        return [dataclasses.replace(layer, target=target)]
    _check_linear(adapter, layer, entry)
    if layer.lycoris is not None:  # LoHa/LoKr/...: their exact LoRA factors A, B split like any LoRA's
        layer = dataclasses.replace(layer, lycoris=None)
    n = layer.B.shape[0]
    total = entry.total_units
    if n % total:
        raise _refuse(adapter, layer, f"B has {n} rows, not a multiple of {total} ({entry.original} is "
                      f"{' | '.join(p.module.rsplit('.', 1)[-1] for p in entry.parts)})")
    unit = n // total
    offsets, start = [], 0
    for part in entry.parts:
        offsets.append((part, start * unit, (start + part.units) * unit))
        start += part.units
    layers = []
    for module in entry.diffusers_modules:
        mine = sorted((p for p in offsets if p[0].module == module), key=lambda p: p[0].at)
        blocks = [(begin, stop) for _, begin, stop in mine]
        leaf = module.replace("{i}.", "")
        source = f"{layer.source_name or layer.target} → {leaf}"
        layers.append(dataclasses.replace(
            layer, target=prefix + fill(module, match.index), B=_rows(layer.B, blocks),
            bias=_rows(layer.bias, blocks) if layer.bias is not None else None, source_name=source))
    return layers


def _common_dtype(tensors: list[LazyTensor]) -> str:
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


def _fuse(adapter: Adapter, entry: Entry, index: str | None, parts: dict[str, LoraLayer], prefix: str) -> LoraLayer:
    """Diffusers-named layers of one entry as one layer on the original (fused) module."""
    target = prefix + fill(entry.original, index)
    first = next(iter(parts.values()))
    if entry.is_rename or (len(parts) == 1 and not _swap_applies(entry, first)):
        return dataclasses.replace(first, target=target)
    for layer in parts.values():
        _check_linear(adapter, layer, entry)
    k = {layer.in_features for layer in parts.values()}
    if len(k) > 1:
        raise _refuse(adapter, first, f"the parts of {fill(entry.original, index)} have different input sizes "
                      f"({sorted(k)})")
    pattern_of = {fill(p, index): p for p in entry.diffusers_modules}
    units = {}
    for module, layer in parts.items():
        share = entry.units_of(pattern_of[module])
        rows = layer.B.shape[0]
        if rows % share:
            raise _refuse(adapter, layer, f"B has {rows} rows, not a multiple of {share}")
        units[module] = rows // share
    if len(set(units.values())) > 1:
        raise _refuse(adapter, first, f"the parts of {fill(entry.original, index)} do not fit one fused weight "
                      f"(rows {', '.join(f'{m}: {parts[m].B.shape[0]}' for m in parts)})")
    unit = next(iter(units.values()))
    n = entry.total_units * unit
    ordered = [fill(m, index) for m in entry.diffusers_modules if fill(m, index) in parts]
    ranks = {m: parts[m].rank for m in ordered}
    columns, col = {}, 0
    for m in ordered:
        columns[m] = col
        col += ranks[m]
    rank = col
    scales = {m: parts[m].scale for m in ordered}
    same = len(set(scales.values())) == 1
    scale = next(iter(scales.values()))
    alpha = scale * rank if same else float(rank)
    if same and alpha / rank != scale:  # alpha' = s·R would not give back s exactly: fold s into B instead
        same, alpha = False, float(rank)
    fold = {m: 1.0 if same else scales[m] for m in ordered}
    a_dtype = _common_dtype([parts[m].A for m in ordered])
    b_dtype = _common_dtype([parts[m].B for m in ordered])
    compute_dtype = "F32" if not same else b_dtype
    chunks = []  # (original row start, stop, module, its row start)
    start = 0
    for part in entry.parts:
        module = fill(part.module, index)
        chunks.append((start * unit, (start + part.units) * unit, module, part.at * unit))
        start += part.units

    def load_a() -> torch.Tensor:
        from ..adapter import ST_DTYPES

        dtype = ST_DTYPES[a_dtype]
        return torch.cat([parts[m].A.load().to(dtype) for m in ordered]).contiguous()

    def load_b() -> torch.Tensor:
        from ..adapter import ST_DTYPES

        dtype = ST_DTYPES[compute_dtype]
        out = torch.zeros((n, rank), dtype=dtype)
        for begin, stop, module, at in chunks:
            if module in parts:
                value = parts[module].B.load()[at:at + (stop - begin)].to(dtype)
                if fold[module] != 1.0:
                    value = value.to(torch.float32) * fold[module]
                out[begin:stop, columns[module]:columns[module] + ranks[module]] = value
        return out

    def load_bias(layers_with_bias: dict[str, LoraLayer]) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.float32)
        for begin, stop, module, at in chunks:
            layer = layers_with_bias.get(module)
            if layer is not None and layer.bias is not None:
                # each part's bias enters as s_i·b_i; the fused layer has one scale s' = alpha'/R
                value = layer.bias.load().reshape(-1)[at:at + (stop - begin)].to(torch.float32)
                out[begin:stop] = value * ((1.0 if layer.bias_unscaled else layer.scale) / (alpha / rank))
        return out

    with_bias = {m: parts[m] for m in ordered if parts[m].bias is not None}
    names = ", ".join(parts[m].source_name or m for m in ordered)
    kernel_a = parts[ordered[0]].A.shape[1:]
    return LoraLayer(
        target=target, kind=first.kind, A=DerivedTensor((rank, *kernel_a), a_dtype, load_a),
        B=DerivedTensor((n, rank), compute_dtype, load_b), alpha=alpha, rank=rank, use_rslora=False,
        bias=DerivedTensor((n,), "F32", lambda: load_bias(with_bias)) if with_bias else None,
        source_key="|".join(parts[m].source_key for m in ordered),  # validate counts the file's own modules
        source_name=f"{names} → {fill(entry.original, index)}")


def convert_naming(adapter: Adapter, found: "Detected", naming: str, prefix: str) -> Adapter:
    """`adapter` with the modules `found` explains re-expressed in `naming` under `prefix`; others kept."""
    family = found.family
    layers: dict[str, LoraLayer] = {}
    if naming == found.naming or not family.has_two_namings():
        for target, layer in adapter.layers.items():
            match = found.matches.get(target)
            new = prefix + match.name if match is not None else target
            _add(adapter, layers, dataclasses.replace(layer, target=new) if new != target else layer)
        return dataclasses.replace(_with_layers(adapter, layers),
                                   delta_tensors=_renamed_deltas(adapter, found, naming, prefix))
    groups: dict[tuple[int, str | None], tuple[Entry, dict[str, LoraLayer]]] = {}
    for target, layer in adapter.layers.items():
        match = found.matches.get(target)
        if match is None:
            _add(adapter, layers, layer)
            continue
        if match.entry is None:  # named alike in both namings
            _add(adapter, layers, dataclasses.replace(layer, target=prefix + match.name))
            continue
        if found.naming == "original":
            for part in _split(adapter, layer, match, prefix):
                _add(adapter, layers, part)
        else:
            key = (id(match.entry), match.index)
            groups.setdefault(key, (match.entry, {}))[1][match.name] = layer
    for (_, index), (entry, parts) in groups.items():
        _add(adapter, layers, _fuse(adapter, entry, index, parts, prefix))
    return dataclasses.replace(_with_layers(adapter, layers), delta_tensors=_renamed_deltas(adapter, found, naming,
                                                                                           prefix))


def _renamed_deltas(adapter: Adapter, found: "Detected", naming: str, prefix: str) -> dict[str, LazyTensor]:
    """`diff`/`diff_b` deltas on vectors (`<module>.weight|bias`) under their modules' names in `naming`:
    renamed modules (Wan's norms) follow the table; others keep their names (merge and validate report a
    name the base lacks, never drop it)."""
    family, out = found.family, {}
    for name, tensor in adapter.delta_tensors.items():
        target, _, role = name.rpartition(".")
        bare = target[len(found.prefix):] if found.prefix and target.startswith(found.prefix) else target
        match = family.lookup(bare, found.naming)
        new = target
        if match is not None and (match.entry is None or found.naming == naming):
            new = prefix + bare
        elif match is not None and match.entry is not None and match.entry.is_rename:
            other = match.entry.parts[0].module if naming == DIFFUSERS else match.entry.original
            new = prefix + fill(other, match.index)
        out[f"{new}.{role}"] = tensor
    return out


def _add(adapter: Adapter, layers: dict[str, LoraLayer], layer: LoraLayer) -> None:
    if layer.target in layers:
        raise LorahubError(f"modules '{layers[layer.target].source_name or layers[layer.target].target}' and "
                           f"'{layer.source_name or layer.target}' both become '{layer.target}'", path=adapter.path)
    layers[layer.target] = layer


def _with_layers(adapter: Adapter, layers: dict[str, LoraLayer]) -> Adapter:
    # a renamed module's file name no longer says what it is: writers name it from its new target
    layers = {target: layer if layer.source_name is None or target == _target_of(adapter, layer)
              else dataclasses.replace(layer, source_name=None) for target, layer in layers.items()}
    has_components = adapter.has_components or all(t.split(".", 1)[0] == "transformer" for t in layers)
    return dataclasses.replace(adapter, layers=layers, warnings=list(adapter.warnings),
                               has_components=has_components)


def _target_of(adapter: Adapter, layer: LoraLayer) -> str | None:
    original = adapter.layers.get(layer.target)
    return layer.target if original is not None and original.source_name == layer.source_name else None

