"""diffusers PEFT-style single files: `unet.<path>.lora_A.weight`, `text_encoder.…`, `transformer.…`."""
from __future__ import annotations

import json
from pathlib import Path

from ..adapter import Adapter, LoraLayer
from ..errors import LorahubError
from ..kinds import EMBEDDING
from ..lazy import save_file, torch
from ..storage import json_type, parse_json
from .common import (
    COMPONENTS_METADATA,
    LAYERS_METADATA,
    TensorSource,
    check_lora_config,
    component_of,
    infer_component,
    layer_entry,
    looks_peft_style,
    lora_config_fields,
    peft_bias,
    peft_magnitude,
    read_peft_style_file,
    refuse_delta_tensors,
)
from .spec import Format

NAME = "diffusers"
DEFAULT_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA = "lora_adapter_metadata"


def read(path: Path, *, allow_pickle: bool = False, source: TensorSource | None = None) -> Adapter:
    source = source or TensorSource(path, allow_pickle=allow_pickle)
    return read_peft_style_file(path, source, NAME, _adapter_configs(source.metadata, path))


def _adapter_configs(metadata: dict[str, str], path: Path | None = None) -> dict[str, dict]:
    """diffusers stores the PEFT config per component as JSON under `lora_adapter_metadata`
    (`{"unet.r": 4, "unet.lora_alpha": 8, ...}`); a value of the wrong JSON type is a one-line error."""
    raw = metadata.get(ADAPTER_METADATA)
    if not raw:
        return {}
    what = f"metadata '{ADAPTER_METADATA}'"
    flat = parse_json(raw, path, what=what)
    if not isinstance(flat, dict):
        raise LorahubError(f"{what} must be a JSON object {{\"component.field\": value}}, found {json_type(flat)}",
                           path=path)
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if field:
            configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        check_lora_config(config, path, prefix=f"{component}.", what=f"{what}: ")
    return configs


def write(adapter: Adapter, out: Path) -> Path:
    """One .safetensors file, keys `<component>.<path>.lora_A.weight`. Each component's LoraConfig
    (r, lora_alpha, exact rank/alpha patterns) goes into the `lora_adapter_metadata` JSON, which is
    what diffusers' `load_lora_weights` reads for PEFT-style files: every layer keeps its exact scale.
    Adapters without components (a transformers model's LoRA) carry a 0-d `<target>.alpha` instead."""
    adapter.require_lora("writing diffusers format")
    refuse_delta_tensors(adapter, "diffusers")
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
        by_component: dict[str | None, list[tuple[str, LoraLayer]]] = {}
        for key, layer in keyed.items():
            by_component.setdefault(component_of(key), []).append((key, layer))
        for component, items in by_component.items():
            # pattern names are relative to the component (an inferred component is not in the target)
            inner = (lambda target, c=component: target[len(c) + 1:] if target.startswith(c + ".") else target)
            text = str(component).startswith("text_encoder")
            if text:  # CLIP: module names without `text_model.` (see _text_encoder_name)
                inner = (lambda target, f=inner: _text_encoder_name(f(target)))
            fields = lora_config_fields([layer for _, layer in items], inner, anchor=not text)
            configs.update({f"{component}.{key}": value for key, value in fields.items()})
    for base, layer in keyed.items():
        if layer.geometry is EMBEDDING:
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
            tensors[f"{base}.lora_B.bias"] = peft_bias(layer, adapter.path)
    if adapter.full_tensors:
        raise LorahubError("diffusers LoRA files cannot carry full replacement tensors (modules_to_save: "
                           f"{', '.join(sorted(adapter.full_tensors))}); use --to peft", path=adapter.path)
    metadata = {"format": "pt", COMPONENTS_METADATA: "1" if has_components else "0", LAYERS_METADATA: json.dumps(
        {key: {**layer_entry(layer), "target": key} for key, layer in keyed.items() if layer.fan_in_fan_out},
        sort_keys=True)}
    if configs:
        metadata[ADAPTER_METADATA] = json.dumps(configs, sort_keys=True)
    if adapter.base_model:
        metadata["lorahub.base_model"] = adapter.base_model
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _text_encoder_name(name: str) -> str:
    """A text encoder's module name in the LoraConfig diffusers hands to PEFT: without CLIP's `text_model.`
    wrapper, which transformers >= 5 dropped from `CLIPTextModel` (`encoder.layers.0.self_attn.q_proj`) but
    kept in `CLIPTextModelWithProjection`. Target names and rank/alpha patterns (unanchored, `name$`) are
    matched by PEFT as a '.'-suffix, so these find the module in both; the tensor keys keep `text_model.`
    (diffusers drops it from the keys itself where the model has no `text_model`)."""
    return name[len("text_model."):] if name.startswith("text_model.") else name


FORMATS = (Format(
    name=NAME, summary="one .safetensors file, `unet.…lora_A.weight` / `text_encoder.…` / `transformer.…` "
    "keys, per-component LoraConfig in `lora_adapter_metadata` (diffusers `load_lora_weights`)",
    read=read, write=write, default_file=DEFAULT_FILE, detect_keys=looks_peft_style, detect_priority=40,
    marker_files=(DEFAULT_FILE,)),)
