"""diffusers PEFT-style single files: `unet.<path>.lora_A.weight`, `text_encoder.…`, `transformer.…`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter import Adapter, LoraLayer
from ..errors import LorahubError
from .common import (
    COMPONENTS,
    COMPONENTS_METADATA,
    TensorSource,
    check_pair,
    component_of,
    infer_component,
    layer_kind,
    missing_partner,
    peft_magnitude,
)
from .kohya import LAYERS_METADATA, layer_entry, read_layers_metadata
from .peft import lora_config_fields, pattern_value

NAME = "diffusers"
DEFAULT_FILE = "pytorch_lora_weights.safetensors"
SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".alpha": "alpha",
    ".lora_embedding_A": "embA", ".lora_embedding_B": "embB",
    ".lora_magnitude_vector": "mag", ".lora_magnitude_vector.weight": "mag",
    ".lora.down.weight": "A", ".lora.up.weight": "B",  # older diffusers LoRACompatible layers
    "_lora.down.weight": "A", "_lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A", ".lora_linear_layer.up.weight": "B",
}


def looks_like(keys: list[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k or "lora_embedding_" in k or "lora_linear_layer" in k
               or k.endswith(("_lora.down.weight", ".lora.down.weight")) for k in keys)


def _split(key: str) -> tuple[str, str] | None:
    for suffix, label in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], label
    return None


def _module_name(module: str) -> str:
    # old attention-processor names: unet.….attn1.processor.to_q -> unet.….attn1.to_q
    return module.replace(".processor.", ".")


def read(path: Path, *, allow_pickle: bool = False, source: TensorSource | None = None) -> Adapter:
    source = source or TensorSource(path, allow_pickle=allow_pickle)
    metadata = source.metadata
    adapter = Adapter(path=path, format=NAME, metadata=metadata, files=[path],
                      base_model=metadata.get("lorahub.base_model"))
    configs = _adapter_configs(metadata)
    known = read_layers_metadata(metadata)
    groups: dict[str, dict[str, str]] = {}
    for key in source.keys():
        split = _split(key)
        if split is None:
            adapter.extra_keys.append(key)
            continue
        module, label = split
        groups.setdefault(_module_name(module), {})[label] = key
    for module, keys in groups.items():
        embedding = "embA" in keys or "embB" in keys
        down_label, up_label = ("embA", "embB") if embedding else ("A", "B")
        if down_label not in keys or up_label not in keys:
            present = keys.get(down_label) or keys.get(up_label)
            if present is None:
                adapter.extra_keys.extend(keys.values())
                continue
            raise missing_partner(path, present, f"{module}.lora_{'B' if down_label in keys else 'A'}.weight")
        down, up = source.lazy(keys[down_label]), source.lazy(keys[up_label])
        rank = check_pair(path, module, keys[down_label], keys[up_label], down, up)
        alpha, use_rslora = float(rank), False  # no alpha anywhere: alpha = rank, as diffusers reads it
        component, _, inner = module.partition(".")
        config = configs.get(component)
        if "alpha" in keys:
            alpha = source.scalar(keys["alpha"])
        elif config:
            alpha = float(pattern_value(config.get("alpha_pattern"), inner,
                                        config.get("lora_alpha", config.get("r", rank))))
            use_rslora = bool(config.get("use_rslora", False))
        entry = known.get(module, {})
        adapter.layers[module] = LoraLayer(
            target=module, kind=layer_kind(down.shape, embedding), A=down, B=up, alpha=alpha, rank=rank,
            use_rslora=use_rslora, fan_in_fan_out=bool(entry.get("fan_in_fan_out", False)), magnitude=source.lazy(keys["mag"]) if "mag" in keys else None,
            bias=source.lazy(keys["bias"]) if "bias" in keys else None, source_key=module)
    if COMPONENTS_METADATA in metadata:
        adapter.has_components = metadata[COMPONENTS_METADATA] == "1"
    else:
        adapter.has_components = bool(adapter.layers) and all(
            target.split(".", 1)[0] in COMPONENTS for target in adapter.layers)
    return adapter


def _adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers stores the PEFT config per component as JSON under `lora_adapter_metadata`."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        return {}
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if field:
            configs.setdefault(component, {})[field] = value
    return configs


def write(adapter: Adapter, out: Path) -> Path:
    """One .safetensors file, keys `<component>.<path>.lora_A.weight`. Each component's LoraConfig
    (r, lora_alpha, exact rank/alpha patterns) goes into the `lora_adapter_metadata` JSON, which is
    what diffusers' `load_lora_weights` reads for PEFT-style files: every layer keeps its exact scale.
    Adapters without components (a transformers model's LoRA) carry a 0-d `<target>.alpha` instead."""
    adapter.require_lora("writing diffusers format")
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, object] = {}
    keyed = {layer.target: layer for layer in adapter.layers.values()}
    has_components = adapter.has_components
    if not has_components:
        inferred = {target: infer_component(target) for target in keyed}
        if keyed and all(inferred.values()):  # a PEFT adapter saved on a UNet/transformer alone
            keyed = {f"{inferred[target]}.{target}": layer for target, layer in keyed.items()}
            has_components = True
    if has_components:
        by_component: dict[str, list[tuple[str, LoraLayer]]] = {}
        for key, layer in keyed.items():
            by_component.setdefault(component_of(key), []).append((key, layer))
        for component, items in by_component.items():
            # pattern names are relative to the component (an inferred component is not in the target)
            inner = (lambda target, c=component: target[len(c) + 1:] if target.startswith(c + ".") else target)
            fields = lora_config_fields([layer for _, layer in items], inner)
            configs.update({f"{component}.{key}": value for key, value in fields.items()})
    for base, layer in keyed.items():
        if layer.kind == "embedding":
            tensors[f"{base}.lora_embedding_A"] = layer.A.load().contiguous()
            tensors[f"{base}.lora_embedding_B"] = layer.B.load().contiguous()
        else:
            tensors[f"{base}.lora_A.weight"] = layer.A.load().contiguous()
            tensors[f"{base}.lora_B.weight"] = layer.B.load().contiguous()
        if not has_components:
            tensors[f"{base}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=torch.float32)
        if layer.magnitude is not None:
            tensors[f"{base}.lora_magnitude_vector"] = peft_magnitude(layer)
        if layer.bias is not None:
            tensors[f"{base}.lora_B.bias"] = layer.bias.load().contiguous()
    if adapter.full_tensors:
        raise LorahubError("diffusers LoRA files cannot carry full replacement tensors (modules_to_save: "
                           f"{', '.join(sorted(adapter.full_tensors))}); use --to peft", path=adapter.path)
    metadata = {"format": "pt", COMPONENTS_METADATA: "1" if has_components else "0", LAYERS_METADATA: json.dumps(
        {key: layer_entry(layer) for key, layer in keyed.items() if layer.fan_in_fan_out}, sort_keys=True)}
    if configs:
        metadata["lora_adapter_metadata"] = json.dumps(configs, sort_keys=True)
    if adapter.base_model:
        metadata["lorahub.base_model"] = adapter.base_model
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out
