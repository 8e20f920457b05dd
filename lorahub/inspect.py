"""`inspect`: everything a user wants to know about an adapter file, as one dict."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .adapter import ST_DTYPES, ST_ITEMSIZE, Adapter, LazyTensor
from .errors import LorahubError
from .formats import load_adapter
from .lazy import LazyDict, torch
from .storage import file_hashes, gc_paused, open_safetensors


def leaf_name(target: str) -> str:
    """The module's own name for grouping: `q_proj`, `to_out.0` (a numbered container keeps its name)."""
    parts = target.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _distribution(values: list[Any]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _number(value: float) -> float | int | str:
    """16.0 → 16; NaN/Inf as the strings "NaN", "Infinity", "-Infinity" (the JSON output stays JSON)."""
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return int(value) if float(value).is_integer() else round(float(value), 8)


def alpha_problems(adapter: Adapter) -> list[dict[str, Any]]:
    """NaN/Inf alphas, reported like NaN/Inf tensors ({key, nan, inf}) plus the module and its alpha; the
    key is the module's `.alpha` in the file (kohya), or the config field it came from."""
    found = []
    bad = adapter.nonfinite_alphas()
    keys: set[str] = set()
    if bad:
        for file in adapter.files:
            if Path(file).suffix == ".safetensors":
                keys.update(open_safetensors(file).header.tensors)
    for layer in bad:
        source = f"{layer.source_key}.alpha"
        if source not in keys:
            source = "lora_alpha / alpha_pattern in the config"
        found.append({"key": source, "module": layer.target, "alpha": _number(layer.alpha),
                      "nan": int(math.isnan(layer.alpha)), "inf": int(math.isinf(layer.alpha))})
    return found


# neighbouring tensors of one dtype are read and tested together: up to this many bytes at once,
# across gaps of up to this many bytes
_SCAN_RUN_BYTES, _SCAN_GAP_BYTES = 64 << 20, 4096


# the dtypes isfinite/isnan/isinf test as stored (others are widened first); built on first use (imports torch)
_CHECKED_DTYPES = LazyDict(lambda: dict.fromkeys((torch.float16, torch.bfloat16, torch.float32, torch.float64)))

# The float dtypes of safetensors files (little-endian), for the scan's first pass without torch: a value
# is NaN or Inf exactly when its exponent bits are all ones, i.e. when each (byte offset in the value,
# mask) listed has every bit of its mask set. float8_e4m3fn has no Inf; its NaN is S.1111.111.
_EXPONENT_BYTES: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {
    "F64": (8, ((7, 0x7F), (6, 0xF0))),
    "F32": (4, ((3, 0x7F), (2, 0x80))),
    "F16": (2, ((1, 0x7C),)),
    "BF16": (2, ((1, 0x7F), (0, 0x80))),
    "F8_E5M2": (1, ((0, 0x7C),)),
    "F8_E4M3": (1, ((0, 0x7F),)),
}
# mask -> a byte translation table: 1 where a byte has every bit of the mask set, else 0
_ALL_SET = {mask: bytes(int(b & mask == mask) for b in range(256))
            for _, parts in _EXPONENT_BYTES.values() for _, mask in parts}


def has_nonfinite(raw: bytes | bytearray, dtype: str) -> bool:
    """Whether the little-endian `dtype` values (a float dtype of `_EXPONENT_BYTES`) in `raw` include
    a NaN or an Inf. Pure Python at C speed, no torch: per exponent byte, one strided slice, one
    byte translation and one big-integer AND (~1 ms per MB)."""
    size, parts = _EXPONENT_BYTES[dtype]
    hits = -1
    for offset, mask in parts:
        hits &= int.from_bytes(raw[offset::size].translate(_ALL_SET[mask]), "little")
        if not hits:
            return False
    return True


def scan_nonfinite(adapter: Adapter) -> list[dict[str, Any]]:
    """Every tensor with NaN or Inf values ({key, nan, inf}), in the adapter's order.

    Tensors in safetensors files are tested straight from the file's bytes: runs of neighbouring
    tensors of one dtype are read with one call and tested at once by `has_nonfinite`, without torch
    (an adapter of 300,000 small tensors otherwise spends seconds in per-tensor calls), and NaN/Inf are
    counted per tensor, with torch, only in a run where the test finds something (so inspect imports
    torch only then). Tensors in memory are tested one by one. FP8 is widened first for the count (it
    has no isinf kernel)."""
    tensors: list[LazyTensor] = []
    for layer in adapter.layers.values():
        # a LyCORIS layer's A and B are computed from its stored factors: scan those
        factors = list(layer.lycoris.tensors.values()) if layer.lycoris is not None else [layer.A, layer.B]
        tensors += factors + [t for t in (layer.magnitude, layer.bias) if t is not None]
    tensors += list(adapter.full_tensors.values()) + list(adapter.delta_tensors.values())
    found: dict[int, dict[str, Any]] = {}

    def check(index: int, value: torch.Tensor) -> None:
        if not value.is_floating_point() or value.numel() == 0:
            return
        if value.dtype not in _CHECKED_DTYPES:
            value = value.float()
        if bool(torch.isfinite(value).all()):
            return
        found[index] = {"key": tensors[index].key, "nan": int(torch.isnan(value).sum()),
                        "inf": int(torch.isinf(value).sum())}

    by_file: dict[str, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.loaded or tensor.path is None:
            check(index, tensor.load())
        else:
            by_file.setdefault(str(tensor.path), []).append(index)
    for path, indices in by_file.items():
        file = open_safetensors(path)
        spans = []  # (begin, end, dtype, index) of the float tensors this scan reads from the file
        for index in indices:
            key = tensors[index].key
            info = file.header.tensors.get(key) if key is not None else None
            dtype = info.dtype if info is not None and info.dtype in ST_ITEMSIZE else None  # a dtype torch reads
            if info is not None and dtype is None:
                continue  # U16, F8_E8M0, F4…: no values torch reads (describe warns about such factors)
            if info is None or info.end - info.begin != math.prod(info.shape) * ST_ITEMSIZE[info.dtype]:
                check(index, tensors[index].load())  # missing or corrupt: the loader says what is wrong
            elif dtype in _EXPONENT_BYTES and info.end > info.begin:
                spans.append((info.begin, info.end, dtype, index))
            # else integer, U16, F8_E8M0, F4…: no NaN/Inf for torch to test (describe warns about them)
        spans.sort(key=lambda span: span[0])
        run: list[tuple[int, int, str, int]] = []
        for span in spans + [None]:
            if run and (span is None or span[2] != run[-1][2] or span[0] - run[-1][1] > _SCAN_GAP_BYTES
                        or (span[0] - run[0][0]) % ST_ITEMSIZE[span[2]] or span[1] - run[0][0] > _SCAN_RUN_BYTES):
                # neighbours of one dtype: read at once (with the small gaps between them: another
                # tensor's bytes, e.g. kohya's .alpha, can only cause a false alarm, checked below),
                # tested together, one by one only on a hit
                start, dtype = run[0][0], run[0][2]
                raw = bytearray(run[-1][1] - start)
                try:
                    file.read_range(start, run[-1][1], raw, key=tensors[run[0][3]].key)
                except LorahubError:
                    # name the tensor that cannot be read, not the first of the run
                    for begin, end, _, index in run:
                        file.read_range(begin, end, memoryview(raw)[begin - start:end - start], key=tensors[index].key)
                    raise
                if has_nonfinite(raw, dtype):
                    values = torch.frombuffer(raw, dtype=torch.uint8)
                    for begin, end, _, index in run:
                        check(index, values[begin - start:end - start].view(ST_DTYPES[dtype]))
                run = []
            if span is not None:
                run.append(span)
    return [found[index] for index in sorted(found)]


def inspect_adapter(path: Path | str, *, format: str | None = None, allow_pickle: bool = False,
                    read_data: bool = True, spectrum: bool = False, alpha: float | None = None) -> dict[str, Any]:
    """Summary of an adapter. `read_data=False` reads headers only (no hashes, no NaN scan); `alpha` gives
    the scale of an adapter whose file does not (`Adapter.assume_alpha`)."""
    # one object per tensor and per layer, no cycles: with 300,000 tensors the cyclic collector's
    # passes over them cost more than building them
    with gc_paused():
        adapter = load_adapter(path, format, allow_pickle=allow_pickle)
        if alpha is not None:
            adapter.assume_alpha(alpha)
        return describe(adapter, read_data=read_data, spectrum=spectrum)


def model_family(adapter: Adapter) -> dict[str, str] | None:
    """The diffusion-transformer family the adapter's module names belong to (Flux, Wan, …) and which of
    its namings they use, or None."""
    from .families import denoiser_targets, detect_adapter

    found = detect_adapter(adapter)
    if found is None or 2 * found.hits < len(denoiser_targets(adapter)):
        return None
    return {"name": found.family.name, "label": found.family.label,
            "naming": found.family.naming_label(found.naming)}


def describe(adapter: Adapter, *, read_data: bool = True, spectrum: bool = False) -> dict[str, Any]:
    layers = list(adapter.layers.values())
    ranks = [layer.rank for layer in layers]
    scales = [layer.scale for layer in layers]
    alphas = [layer.alpha for layer in layers]
    dtypes: Counter[str] = Counter()
    for layer in layers:
        for tensor in (layer.lycoris.tensors.values() if layer.lycoris is not None else (layer.A, layer.B)):
            dtypes[tensor.dtype] += 1
    for tensor in adapter.full_tensors.values():
        dtypes[tensor.dtype] += 1
    targets = Counter(leaf_name(layer.target) for layer in layers)
    kinds = Counter(layer.kind + (f" {'×'.join(map(str, layer.kernel_size))}" if layer.kernel_size else "")
                    for layer in layers)
    components = Counter(layer.target.split(".", 1)[0] for layer in layers
                         if layer.target.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2",
                                                               "text_encoder_3", "transformer"))
    info: dict[str, Any] = {
        "path": str(adapter.path),
        "format": adapter.format,
        "base_model": adapter.base_model,
        "modules": len(layers),
        "rank": ranks[0] if len(set(ranks)) == 1 else None,
        "rank_distribution": _distribution(ranks),
        "alpha": _number(alphas[0]) if len(set(alphas)) == 1 else None,
        "alpha_distribution": _distribution([_number(a) for a in alphas]),
        "scale": _number(scales[0]) if len(set(scales)) == 1 else None,
        "scale_distribution": _distribution([_number(s) for s in scales]),
        "kinds": dict(kinds),
        "components": dict(components),
        "family": model_family(adapter),
        "targets": dict(sorted(targets.items(), key=lambda kv: (-kv[1], kv[0]))),
        "trainable_parameters": adapter.num_params,
        "dtypes": dict(dtypes),
        "dora": adapter.is_dora,
        "rslora": adapter.use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "modules_to_save": sorted(adapter.full_tensors),
        "delta_tensors": sorted(t.key or name for name, t in adapter.delta_tensors.items()),
        "lycoris": dict(Counter([layer.lycoris.algo for layer in layers if layer.lycoris is not None]
                                + list(adapter.other_modules.values()))),
        "unclaimed_keys": adapter.extra_keys,
        "files": [],
        "metadata": adapter.metadata,
        "layers": [
            {"target": layer.target, "kind": layer.kind, "rank": layer.rank, "alpha": _number(layer.alpha),
             "scale": _number(layer.scale), "rslora": layer.use_rslora, "dora": layer.is_dora,
             "fan_in_fan_out": layer.fan_in_fan_out, "A": list(layer.A.shape), "B": list(layer.B.shape),
             "base_shape": list(layer.base_shape), "dtype": layer.A.dtype,
             **({"source_name": layer.source_name} if layer.source_name else {}),
             **(lycoris_fields(layer) if layer.lycoris is not None else {})}
            for layer in layers
        ],
    }
    unsupported = adapter.unsupported_variant
    warnings = list(adapter.warnings)
    if unsupported:
        warnings.append(f"PEFT variant {unsupported}: its delta is not s·B·A; merge/resize/blend refuse it")
    odd = adapter.odd_factor_dtypes()
    if odd:
        odd_dtypes = ", ".join(sorted({dtype for _, dtype in odd}))
        warnings.append(f"{len(odd)} factor tensors are {odd_dtypes}, not floating point (e.g. {odd[0][0]}); "
                        "convert/resize/blend/merge refuse them")
    if warnings:
        info["warnings"] = warnings
    for file in adapter.files:
        entry: dict[str, Any] = {"path": str(file), "size": Path(file).stat().st_size}
        if read_data:
            entry["hashes"] = file_hashes(file)
            embedded = adapter.metadata.get("sshs_model_hash")
            if embedded and file.suffix == ".safetensors":
                entry["embedded_sshs_model_hash_matches"] = embedded.lower().removeprefix("0x") == \
                    entry["hashes"]["sshs_model_hash"]
        info["files"].append(entry)
    info["file_size"] = sum(entry["size"] for entry in info["files"])
    if read_data:
        info["nonfinite"] = scan_nonfinite(adapter) + alpha_problems(adapter)
    elif adapter.nonfinite_alphas():  # alphas are known from headers and configs: report them all the same
        info["nonfinite"] = alpha_problems(adapter)
    if spectrum:
        from .lowrank import effective_rank
        from .resize import layer_spectra

        spectra = layer_spectra(adapter)
        for entry in info["layers"]:
            values = spectra.get(entry["target"])
            if values is not None:
                entry["effective_rank_99"] = effective_rank(values, 0.99)
                if "algorithm" in entry:  # LyCORIS: the true rank of ΔW (σ > σ₀·1e-5, fp32 factors)
                    entry["true_rank"] = int((values > values[0] * 1e-5).sum()) if len(values) and values[0] > 0 else 0
                entry["singular_values"] = [round(float(v), 6) for v in values]
    return info


def lycoris_fields(layer) -> dict[str, Any]:
    """A LyCORIS layer's own description: its algorithm, factor shapes, the scale its forward applies,
    the rank of its exact LoRA form (a bound on the true rank; `--spectrum` gives the true rank) and
    its stored parameters. `rank`/`alpha`/`A`/`B` describe that exact LoRA form."""
    mod = layer.lycoris
    return {"algorithm": mod.algo, "factors": mod.factor_shapes(), "lycoris_scale": _number(mod.scale),
            "rank_bound": mod.rank, "params": mod.num_params,
            **({"dora_axis": "out" if mod.dora_on_out else "in"} if layer.magnitude is not None else {})}


def nonfinite_error(info: dict[str, Any]) -> LorahubError | None:
    bad = info.get("nonfinite") or []
    if not bad:
        return None
    first = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    path = info["files"][0]["path"] if info["files"] else info["path"]
    if "module" in first:
        return LorahubError(f"alpha of module '{first['module']}' is {first['alpha']} ({first['key']}){more}",
                            path=path)
    return LorahubError(f"{first['nan']} NaN and {first['inf']} Inf values{more}", path=path, key=first["key"])

