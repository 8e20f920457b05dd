"""`inspect`: everything a user wants to know about an adapter file, as one dict."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, LazyTensor
from .errors import LorahubError
from .formats import load_adapter
from .storage import file_hashes


def leaf_name(target: str) -> str:
    """The module's own name for grouping: `q_proj`, `to_out.0` (a numbered container keeps its name)."""
    parts = target.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _distribution(values: list[Any]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 8)


def scan_nonfinite(adapter: Adapter) -> list[dict[str, Any]]:
    """Every tensor with NaN or Inf values, read one at a time."""
    found = []
    tensors: list[LazyTensor] = []
    for layer in adapter.layers.values():
        tensors += [layer.A, layer.B] + [t for t in (layer.magnitude, layer.bias) if t is not None]
    tensors += list(adapter.full_tensors.values())
    for tensor in tensors:
        value = tensor.load()
        if not value.is_floating_point():
            continue
        nan = int(torch.isnan(value).sum())
        inf = int(torch.isinf(value).sum())
        if nan or inf:
            found.append({"key": tensor.key, "nan": nan, "inf": inf})
    return found


def inspect_adapter(path: Path | str, *, format: str | None = None, allow_pickle: bool = False,
                    read_data: bool = True, spectrum: bool = False) -> dict[str, Any]:
    """Summary of an adapter. `read_data=False` reads headers only (no hashes, no NaN scan)."""
    adapter = load_adapter(path, format, allow_pickle=allow_pickle)
    return describe(adapter, read_data=read_data, spectrum=spectrum)


def describe(adapter: Adapter, *, read_data: bool = True, spectrum: bool = False) -> dict[str, Any]:
    layers = list(adapter.layers.values())
    ranks = [layer.rank for layer in layers]
    scales = [layer.scale for layer in layers]
    alphas = [layer.alpha for layer in layers]
    dtypes: Counter[str] = Counter()
    for layer in layers:
        dtypes[layer.A.dtype] += 1
        dtypes[layer.B.dtype] += 1
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
        "targets": dict(sorted(targets.items(), key=lambda kv: (-kv[1], kv[0]))),
        "trainable_parameters": adapter.num_params,
        "dtypes": dict(dtypes),
        "dora": adapter.is_dora,
        "rslora": adapter.use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "modules_to_save": sorted(adapter.full_tensors),
        "lycoris": dict(Counter(adapter.other_modules.values())),
        "unclaimed_keys": adapter.extra_keys,
        "files": [],
        "metadata": adapter.metadata,
        "layers": [
            {"target": layer.target, "kind": layer.kind, "rank": layer.rank, "alpha": _number(layer.alpha),
             "scale": _number(layer.scale), "rslora": layer.use_rslora, "dora": layer.is_dora,
             "fan_in_fan_out": layer.fan_in_fan_out, "A": list(layer.A.shape), "B": list(layer.B.shape),
             "base_shape": list(layer.base_shape), "dtype": layer.A.dtype,
             **({"source_name": layer.source_name} if layer.source_name else {})}
            for layer in layers
        ],
    }
    unsupported = adapter.unsupported_variant
    if unsupported:
        info["warnings"] = [f"PEFT variant {unsupported}: its delta is not s·B·A; merge/resize/blend refuse it"]
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
        info["nonfinite"] = scan_nonfinite(adapter)
    if spectrum:
        from .lowrank import effective_rank
        from .resize import layer_spectra

        spectra = layer_spectra(adapter)
        for entry in info["layers"]:
            values = spectra.get(entry["target"])
            if values is not None:
                entry["effective_rank_99"] = effective_rank(values, 0.99)
                entry["singular_values"] = [round(float(v), 6) for v in values]
    return info


def nonfinite_error(info: dict[str, Any]) -> LorahubError | None:
    bad = info.get("nonfinite") or []
    if not bad:
        return None
    first = bad[0]
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    return LorahubError(f"{first['nan']} NaN and {first['inf']} Inf values{more}",
                        path=info["files"][0]["path"] if info["files"] else info["path"], key=first["key"])

