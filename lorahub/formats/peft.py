"""PEFT adapter directories: adapter_config.json + adapter_model.safetensors (or .bin)."""
from __future__ import annotations

import json
from pathlib import Path

from ..adapter import Adapter, LoraLayer
from ..errors import LorahubError
from ..kinds import EMBEDDING, LINEAR, conv1d_by_name
from ..lazy import save_file, torch
from ..storage import check_regular, read_json_file
from .common import (
    TensorSource,
    check_lora_config,
    check_pair,
    component_of,
    layer_kind,
    looks_peft_style,
    lora_config_fields,
    missing_partner,
    pattern_value,
    peft_bias,
    peft_magnitude,
    read_peft_style_file,
    refuse_delta_tensors,
    settle_fan_in_fan_out,
)
from .spec import Format

NAME = "peft"
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# config keys whose non-default value means a delta that is not s·B·A; refused rather than misread
UNSUPPORTED_VARIANTS = {
    "kasa_config": "KaSA", "use_bdlora": "block-diagonal LoRA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow", "layer_replication": "layer replication", "target_parameters": "target_parameters",
}
SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
    ".lora_embedding_A": "embA", ".lora_embedding_B": "embB",
    ".lora_magnitude_vector": "mag", ".lora_magnitude_vector.weight": "mag",
}


def detect(path: Path) -> bool:
    if path.is_dir():
        check_regular(path / CONFIG)  # a FIFO or a device named adapter_config.json: refused, not skipped
        return (path / CONFIG).is_file()
    return path.is_file() and path.name in WEIGHTS and (path.parent / CONFIG).is_file()


def looks_like_weights(keys: list[str]) -> bool:
    """PEFT weights without their config: PEFT-style keys, all under PEFT's `base_model.model.`."""
    return looks_peft_style(keys) and all(k.startswith(PREFIX) for k in keys)


def read(path: Path, *, allow_pickle: bool = False, source: TensorSource | None = None) -> Adapter:
    if path.is_file() and not detect(path):
        return _read_weights_only(path, source or TensorSource(path, allow_pickle=allow_pickle))
    directory = path if path.is_dir() else path.parent
    config_path = directory / CONFIG
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise LorahubError("adapter_config.json is not a JSON object", path=config_path)
    check_lora_config(config, config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if path.is_file():
        weights = path
    else:
        found = next((directory / name for name in WEIGHTS if (directory / name).exists()), None)
        if found is None:
            raise LorahubError(f"PEFT directory has {CONFIG} but no {' or '.join(WEIGHTS)}", path=directory)
        weights = found
    source = TensorSource(weights, allow_pickle=allow_pickle)
    adapter = Adapter(path=directory, format=NAME, config=config, metadata=source.metadata, files=[weights],
                      base_model=config.get("base_model_name_or_path"))
    if peft_type != "LORA":
        # LoHa / LoKr / IA3 ... : recognised and listed, their math is not implemented
        algo = peft_type.lower()
        for key in source.keys():
            module = key[len(PREFIX):] if key.startswith(PREFIX) else key
            adapter.other_modules[module.rsplit(".", 2)[0]] = algo
        adapter.format = "lycoris" if peft_type in ("LOHA", "LOKR") else NAME
        return adapter
    for key, label in UNSUPPORTED_VARIANTS.items():
        value = config.get(key)
        if value not in (None, False, {}, [], 0) and adapter.unsupported_variant is None:
            adapter.unsupported_variant = label

    component = source.metadata.get("lorahub.component")
    adapter.has_components = bool(component)
    groups: dict[str, dict[str, str]] = {}
    for key in source.keys():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, label in SUFFIXES.items():
            if name.endswith(suffix):
                groups.setdefault(name[: -len(suffix)], {})[label] = key
                break
        else:
            # modules_to_save copies and saved embedding layers replace base tensors
            base_name = name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
            if ".lora_" in name:
                adapter.extra_keys.append(key)
            else:
                adapter.full_tensors[_qualify(component, base_name)] = source.lazy(key)

    def number(key: str, value, cast):
        try:
            return cast(value)
        except (TypeError, ValueError):
            raise LorahubError(f"'{key}' must be a number, found {value!r}", path=config_path) from None

    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise LorahubError(f"'{key}' must be an object {{pattern: value}}", path=config_path)
    default_r = number("r", config.get("r", 8), int)
    default_alpha = number("lora_alpha", config.get("lora_alpha", default_r), float)
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for module, keys in groups.items():
        embedding = "embA" in keys or "embB" in keys
        down_label, up_label = ("embA", "embB") if embedding else ("A", "B")
        if down_label not in keys or up_label not in keys:
            present = keys.get(down_label) or keys.get(up_label) or next(iter(keys.values()))
            missing = f"{module}.lora_{'embedding_' if embedding else ''}{'B' if down_label in keys else 'A'}"
            if down_label not in keys and up_label not in keys:
                raise LorahubError(f"'{present}' has no lora_A/lora_B factors", path=weights)
            raise missing_partner(weights, present, PREFIX + missing + ("" if embedding else ".weight"))
        down, up = source.lazy(keys[down_label]), source.lazy(keys[up_label])
        rank = check_pair(weights, module, keys[down_label], keys[up_label], down, up)
        config_rank = number("rank_pattern", pattern_value(config.get("rank_pattern"), module, default_r), int)
        if config_rank != rank:
            raise LorahubError(f"rank {rank} in the tensors but {config_rank} in {CONFIG} "
                               f"(r / rank_pattern); PEFT would refuse to load it", path=weights,
                               key=keys[down_label])
        alpha = number("alpha_pattern", pattern_value(config.get("alpha_pattern"), module, default_alpha), float)
        kind = layer_kind(down.shape, embedding)
        adapter.layers[_qualify(component, module)] = LoraLayer(
            target=_qualify(component, module), kind=kind,
            A=down, B=up, alpha=alpha, rank=rank, use_rslora=use_rslora,
            # PEFT forces the flag for Conv1D layers and ignores it for others (settled below)
            fan_in_fan_out=(fan_in_fan_out or conv1d_by_name(module, bool(component))) and kind == LINEAR.name,
            magnitude=source.lazy(keys["mag"]) if "mag" in keys else None,
            bias=source.lazy(keys["bias"]) if "bias" in keys else None,
            source_key=PREFIX + module)
    settle_fan_in_fan_out(adapter)
    return adapter


def _read_weights_only(path: Path, source: TensorSource) -> Adapter:
    """A PEFT weights file without adapter_config.json: module names unprefixed; the scale is unknown
    (`lora_alpha`, `alpha_pattern`, `use_rslora` live in the config): read as alpha = rank, and operations
    that need the scale refuse until the user gives it (`Adapter.assume_alpha`, --alpha)."""
    adapter = read_peft_style_file(path, source, NAME, {})
    if adapter.layers and not any(key.endswith(".alpha") for key in source.keys()):
        adapter.scale_unknown = f"PEFT weights without {CONFIG}, which holds lora_alpha"
        adapter.warnings.append(f"scale unknown: no {CONFIG} beside this PEFT weights file (lora_alpha, "
                                "alpha_pattern, use_rslora live there); shown as alpha = rank (scale 1); "
                                "pass --alpha LORA_ALPHA to merge, convert, resize or blend it")
    renamed = {}
    for target, layer in adapter.layers.items():
        layer.target = target[len(PREFIX):] if target.startswith(PREFIX) else target
        renamed[layer.target] = layer
    adapter.layers = renamed
    return adapter


def _qualify(component: str | None, name: str) -> str:
    return f"{component}.{name}" if component else name


def write(adapter: Adapter, out: Path) -> Path:
    """Write a PEFT directory that PEFT itself loads; out is the directory."""
    refuse_delta_tensors(adapter, "PEFT")
    components = {component_of(t) for t in list(adapter.layers) + list(adapter.full_tensors)} \
        if adapter.has_components else {None}
    if len(components) > 1:
        raise LorahubError(f"a PEFT directory holds one model, this adapter has components "
                           f"{sorted(c or '(none)' for c in components)}; use --to diffusers or --to kohya",
                           path=adapter.path)
    component = next(iter(components)) if components else None
    strip = (lambda name: name[len(component) + 1:]) if component else (lambda name: name)

    layers = list(adapter.layers.values())
    if not layers:
        raise LorahubError("adapter has no LoRA layers to write", path=adapter.path)
    config = dict(adapter.config) if adapter.format == NAME else {}
    config.update(lora_config_fields(layers, strip))
    config["base_model_name_or_path"] = adapter.base_model
    config.setdefault("bias", "none")
    config.setdefault("task_type", None)
    config.setdefault("inference_mode", True)
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("init_lora_weights", True)
    full_modules = sorted({strip(name).rsplit(".", 1)[0] for name in adapter.full_tensors})
    if full_modules and not config.get("modules_to_save"):
        config["modules_to_save"] = [m.rsplit(".", 1)[-1] for m in full_modules]
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        config[key] = None  # target_modules is now an exact list; stale filters would drop layers

    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        base = PREFIX + strip(layer.target)
        if layer.geometry is EMBEDDING:
            tensors[base + ".lora_embedding_A"] = layer.A.load().contiguous()
            tensors[base + ".lora_embedding_B"] = layer.B.load().contiguous()
        else:
            tensors[base + ".lora_A.weight"] = layer.A.load().contiguous()
            tensors[base + ".lora_B.weight"] = layer.B.load().contiguous()
        if layer.magnitude is not None:
            tensors[base + ".lora_magnitude_vector"] = peft_magnitude(layer)
        if layer.bias is not None:
            tensors[base + ".lora_B.bias"] = peft_bias(layer, adapter.path)
    embedding_modules = {strip(layer.target) for layer in layers if layer.geometry is EMBEDDING}
    for name, tensor in adapter.full_tensors.items():
        module = strip(name).rsplit(".", 1)[0]
        key = strip(name)
        if module in embedding_modules:  # PEFT saves a targeted embedding's weight under base_layer
            key = f"{module}.base_layer.{strip(name).rsplit('.', 1)[1]}"
        tensors[PREFIX + key] = tensor.load().contiguous()
    metadata = {"format": "pt"}
    if component:
        metadata["lorahub.component"] = component
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / WEIGHTS[0]), metadata=metadata)
    return out


FORMATS = (Format(
    name=NAME, summary="a directory: adapter_config.json + adapter_model.safetensors (PEFT `save_pretrained`)",
    read=read, write=write, directory=True, detect_path=detect, detect_keys=looks_like_weights,
    detect_priority=30, marker_files=(CONFIG, *WEIGHTS)),)
