"""Pieces the format modules share: reading tensors lazily, grouping keys into layers, name guessing."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..adapter import Adapter, LazyTensor, LoraLayer
from ..errors import LorahubError
from ..kinds import CONV, CONV1D, EMBEDDING, KINDS, LINEAR, conv1d_by_name, factor_kind
from ..lazy import torch
from ..storage import (
    SafetensorsHeader,
    TensorInfo,
    is_pickle_path,
    json_type,
    load_pickle_state_dict,
    open_safetensors,
    parse_json,
)
from .comfy_names import dotted_name_problem

# substrings that only adapter tensors carry (any format), to tell an adapter file from a model's weights
ADAPTER_KEY_MARKERS = (".lora_A", ".lora_B", "lora_down", "lora_up", "lora_embedding_", ".alpha",
                       "lora_magnitude_vector", "hada_", "lokr_", "dora_scale",
                       "_lora.down", "_lora.up", "_lora1.", "_lora2.")  # old diffusers processors, XLabs
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior", "decoder")


class TensorSource:
    """The tensors of one weights file, lazily: names, shapes and dtypes from the header only.

    A safetensors file's header comes from its one cached handle (`storage.open_safetensors`), so the
    `LazyTensor`s handed out read through the same parsed header; scalars (`.alpha`) are read there too,
    a few bytes each, without building tensors."""

    def __init__(self, path: Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.header: SafetensorsHeader | None = None
        self._memory: dict[str, torch.Tensor] | None = None
        if is_pickle_path(self.path):
            self._memory = {str(k): v for k, v in load_pickle_state_dict(self.path, allow_pickle).items()
                            if isinstance(v, torch.Tensor)}
            self.metadata: dict[str, str] = {}
        else:
            self._file = open_safetensors(self.path)  # held while reading: no lookup per scalar
            self.header = self._file.header
            self.metadata = dict(self.header.metadata)

    def _entries(self) -> dict[str, TensorInfo]:
        assert self.header is not None  # not a pickle: __init__ read the header
        return self.header.tensors

    def keys(self) -> list[str]:
        if self._memory is not None:
            return list(self._memory)
        return list(self._entries())

    def shape(self, key: str) -> tuple[int, ...]:
        if self._memory is not None:
            return tuple(self._memory[key].shape)
        return self._entries()[key].shape

    def lazy(self, key: str) -> LazyTensor:
        if self._memory is not None:
            return LazyTensor(value=self._memory[key], key=key)
        info = self._entries()[key]
        return LazyTensor(path=self.path, key=key, shape=info.shape, dtype=info.dtype)

    def scalar(self, key: str) -> float:
        shape = self.shape(key)
        if math.prod(shape) != 1:
            raise LorahubError(f"expected a scalar, found shape {list(shape)}", path=self.path, key=key)
        value = None if self._memory is not None else self._file.scalar(key)
        if value is None:  # in memory, or a dtype struct cannot decode (FP8)
            value = float(self.lazy(key).load().reshape(()).to(torch.float64))
        return value


def layer_kind(down_shape: tuple[int, ...], embedding: bool = False) -> str:
    return factor_kind(down_shape, embedding)


def check_pair(path: Path, name: str, down_key: str, up_key: str, down: LazyTensor, up: LazyTensor) -> int:
    """The rank both factors agree on, or a one-line error naming the keys."""
    if len(down.shape) < 2 or len(up.shape) < 2:
        raise LorahubError(f"factor is not a matrix (A {list(down.shape)}, B {list(up.shape)})",
                           path=path, key=down_key if len(down.shape) < 2 else up_key)
    if down.numel == 0 or up.numel == 0:
        raise LorahubError("empty factor (0 elements; was it saved under DeepSpeed ZeRO-3?)", path=path,
                           key=down_key if down.numel == 0 else up_key)
    if down.shape[0] != up.shape[1]:
        raise LorahubError(
            f"rank mismatch: {down_key} has rank {down.shape[0]} but {up_key} has rank {up.shape[1]}", path=path)
    if len(up.shape) > 2 and any(d != 1 for d in up.shape[2:]):
        raise LorahubError(f"conv up factor must be 1×1, found {list(up.shape)}", path=path, key=up_key)
    return down.shape[0]


def missing_partner(path: Path, present_key: str, missing_key: str) -> LorahubError:
    return LorahubError(f"'{present_key}' has no matching '{missing_key}'", path=path)


def peft_magnitude(layer: LoraLayer) -> torch.Tensor:
    """The DoRA magnitude as PEFT stores it: (out,), or (1, out, 1, 1) for a conv (PEFT's
    `_DoraConvNdLayer` keeps the transposed keepdim norm)."""
    assert layer.magnitude is not None
    magnitude = layer.magnitude.load().reshape(-1)
    if layer.geometry is CONV:
        magnitude = magnitude.reshape(1, -1, *([1] * (len(layer.base_shape) - 2)))
    return magnitude.contiguous()


def kohya_dora_scale(layer: LoraLayer) -> torch.Tensor:
    """The DoRA magnitude as LyCORIS (wd_on_out) stores `dora_scale`: (out, 1) or (out, 1, 1, 1).
    ComfyUI tells the axis by shape[0] == out."""
    assert layer.magnitude is not None
    return layer.magnitude.load().reshape(-1, *([1] * (len(layer.base_shape) - 1))).contiguous()


COMPONENTS_METADATA = "lorahub.components"


def refuse_delta_tensors(adapter: Adapter, format_name: str) -> None:
    """PEFT-style files have no tensor that is added to a base tensor as it is (`diff`/`diff_b` on a norm
    weight or bias): refuse, naming them, rather than drop them."""
    if adapter.delta_tensors:
        keys = [tensor.key or name for name, tensor in adapter.delta_tensors.items()]
        raise LorahubError(f"{format_name} files cannot carry the diff/diff_b deltas {', '.join(keys[:3])}"
                           + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "") + "; use --to kohya",
                           path=adapter.path)


def peft_bias(layer: LoraLayer, path: Path | None) -> torch.Tensor:
    """The `lora_B.bias` to write: PEFT adds it times the layer's scale. A bias delta that is added as it
    is (`diff_b`) is written divided by the scale when that is exact (a power of two), else refused."""
    assert layer.bias is not None
    bias = layer.bias.load().contiguous()
    if not layer.bias_unscaled or layer.scale == 1:
        return bias
    mantissa = math.frexp(abs(layer.scale))[0] if layer.scale else 0.0
    if mantissa == 0.5:
        return (bias.to(torch.float32) / layer.scale).to(bias.dtype)
    raise LorahubError(f"the bias delta {layer.bias.key or layer.target} is added unscaled, but PEFT-style files "
                       f"scale lora_B.bias by alpha/r = {layer.scale:g}; it cannot be written exactly (use --to "
                       "kohya, which keeps it as diff_b)", path=path)


def infer_component(target: str) -> str | None:
    """The diffusers component a bare module path belongs to (PEFT adapters saved on a UNet alone)."""
    head = target.split(".", 1)[0]
    if head in ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding",
                "add_embedding"):
        return "unet"
    if head in ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                "time_text_embed"):
        return "transformer"
    if head == "text_model":
        return "text_encoder"
    return None


def component_of(target: str) -> str | None:
    head = target.split(".", 1)[0]
    return head if head in COMPONENTS else None


def settle_fan_in_fan_out(adapter: Adapter) -> None:
    """PEFT decides a layer's orientation by its type and ignores `fan_in_fan_out` for `nn.Linear` (with
    a warning): a layer whose name says it is not a transformers Conv1D (`kinds.conv1d_by_name`) is an
    ordinary layer whatever the file says, and the adapter says so once. Conv and embedding layers have
    no such flag (their factor shapes say what they are). With a base, the base decides again at merge."""
    ignored = []
    for layer in adapter.layers.values():
        kind = layer.geometry
        if kind not in (LINEAR, CONV1D):
            layer.fan_in_fan_out = False
            continue
        if kind is LINEAR:
            continue
        component = component_of(layer.target) if adapter.has_components else infer_component(layer.target)
        if not conv1d_by_name(layer.target, component is not None):
            ignored.append(layer.target)
            layer.fan_in_fan_out, layer.kind = False, LINEAR.name
    if ignored:
        adapter.warnings.append(
            f"fan_in_fan_out=true on {len(ignored)} layer(s) that are not transformers Conv1D layers (e.g. "
            f"'{ignored[0]}'): ignored, as PEFT ignores it for nn.Linear (ΔW is not transposed)")


# lorahub writes each module's exact target, kind and orientation here (JSON), so round trips through
# kohya files need no name guessing and keep embedding / Conv1D layers what they were
LAYERS_METADATA = "lorahub.layers"


def layer_entry(layer: LoraLayer) -> dict:
    return {"target": layer.target, "kind": layer.kind, "fan_in_fan_out": layer.fan_in_fan_out}


def checked_kind(path: Path, module: str, entry: dict, down: LazyTensor, up: LazyTensor, *,
                 embedding_keys: bool | None = None) -> str:
    """A layer's kind: what the factor shapes say (≥ 3-D factors: a convolution) and, in PEFT-style files,
    the keys (`lora_embedding_A` or `lora_A`); `lorahub.layers` metadata only tells apart what they leave
    open (a 2-D pair in a kohya file: linear, Conv1D or embedding). Metadata the tensors contradict is
    refused, naming the module: obeying it would apply another delta than the file's."""
    evidence = factor_kind(down.shape, bool(embedding_keys))
    declared = entry.get("kind")
    if declared in (None, ""):
        return evidence
    if not isinstance(declared, str) or declared not in KINDS:
        raise LorahubError(f"{LAYERS_METADATA} says module '{module}' is a {declared!r} layer, which is no layer "
                           f"kind ({', '.join(KINDS)})", path=path)
    matrices = len(down.shape) == 2 and len(up.shape) == 2
    fits = (len(down.shape) > 2) if KINDS[declared] is CONV else matrices
    if fits and embedding_keys is not None:
        fits = (KINDS[declared] is EMBEDDING) == embedding_keys
    if not fits:
        keys = "" if embedding_keys is None else \
            (" (lora_embedding_A/B keys)" if embedding_keys else " (lora_A/lora_B keys)")
        raise LorahubError(f"{LAYERS_METADATA} says module '{module}' is a {declared} layer but its factors are "
                           f"A {list(down.shape)}, B {list(up.shape)}{keys}: the metadata contradicts the "
                           "tensors", path=path)
    return declared


def read_layers_metadata(metadata: dict[str, str], path: Path | str | None = None) -> dict[str, dict]:
    """`lorahub.layers`: {file module name: {"target": str, "kind": str, "fan_in_fan_out": bool}}, or a
    one-line error naming the file when it is not JSON of that shape."""
    raw = metadata.get(LAYERS_METADATA)
    if raw is None:
        return {}
    what = f"metadata '{LAYERS_METADATA}'"
    known = parse_json(raw, path, what=what)
    if not isinstance(known, dict):
        raise LorahubError(f"{what} must be a JSON object {{module: {{target, kind, fan_in_fan_out}}}}, found "
                           f"{json_type(known)}", path=path)
    for module, entry in known.items():
        if not isinstance(entry, dict):
            raise LorahubError(f"{what}: the entry of '{module}' is {json_type(entry)}, not an object", path=path)
        # (`kind` is checked against the tensors by checked_kind)
        for key, types, label in (("target", (str,), "a string"), ("fan_in_fan_out", (bool,), "true or false")):
            if key in entry and entry[key] is not None and not isinstance(entry[key], types):
                raise LorahubError(f"{what}: '{key}' of '{module}' must be {label}, found "
                                   f"{json_type(entry[key])} {_shown(entry[key])}", path=path)
    return {str(k): dict(v) for k, v in known.items() if isinstance(v.get("target"), str)}


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def check_lora_config(config: dict, path: Path | str | None, *, prefix: str = "", what: str = "") -> None:
    """The LoraConfig fields lorahub reads have the JSON types PEFT gives them: strings, booleans,
    numbers, and rank/alpha patterns whose keys are regular expressions. `prefix` is put before each
    key in messages (`unet.` in a diffusers file's `lora_adapter_metadata`), `what` before the message."""
    def fail(message: str) -> LorahubError:
        return LorahubError(f"{what}{message}", path=path)

    for key, label, ok in (
            ("base_model_name_or_path", "a string", lambda v: isinstance(v, str)),
            ("peft_type", "a string", lambda v: isinstance(v, str)),
            ("use_rslora", "true or false", lambda v: isinstance(v, bool)),
            ("fan_in_fan_out", "true or false", lambda v: isinstance(v, bool)),
            ("r", "a number", _is_number),
            ("lora_alpha", "a number", _is_number)):
        value = config.get(key)
        if value is not None and not ok(value):
            raise fail(f"'{prefix}{key}' must be {label}, found {json_type(value)} {_shown(value)}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise fail(f"'{prefix}{key}' must be an object {{pattern: value}}, found {json_type(patterns)}")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as exc:
                raise fail(f"'{prefix}{key}': '{pattern}' is not a valid regular expression ({exc})") from None
            if not _is_number(value):
                raise fail(f"'{prefix}{key}': the value of '{pattern}' must be a number, found "
                           f"{json_type(value)} {_shown(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# PEFT config fields (PEFT directories and diffusers files carry the same LoraConfig)


def pattern_value(patterns: dict | None, name: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key K (a regex) with `(.*\\.)?(K)$` matching the name wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _pattern_key(name: str, anchor: bool = True) -> str:
    return ("^" if anchor else "") + re.escape(name) + "$"


def lora_config_fields(layers: list[LoraLayer], strip=lambda name: name, *, anchor: bool = True) -> dict:
    """The LoraConfig fields that give every layer its exact rank and scale: one `r`/`lora_alpha` (the
    most common rank and its alpha) plus `^name$` rank/alpha patterns where a layer differs (`name$`
    with `anchor=False`: PEFT's `(.*\\.)?(pattern)$` then also finds the name under a wrapper module)."""
    use_rslora = {layer.use_rslora for layer in layers} == {True}
    r = Counter(layer.rank for layer in layers).most_common(1)[0][0]

    def alpha_of(layer: LoraLayer) -> float:
        # one use_rslora flag per file: re-express alpha so each layer keeps its exact scale
        if layer.use_rslora == use_rslora:
            return layer.alpha
        return layer.scale * (layer.rank ** 0.5 if use_rslora else layer.rank)

    alphas = Counter(alpha_of(layer) for layer in layers if layer.rank == r)
    lora_alpha = alphas.most_common(1)[0][0] if alphas else float(r)
    rank_pattern, alpha_pattern = {}, {}
    for layer in layers:
        name = strip(layer.target)
        if layer.rank != r:
            rank_pattern[_pattern_key(name, anchor)] = layer.rank
        if alpha_of(layer) != lora_alpha:
            alpha_pattern[_pattern_key(name, anchor)] = _number(alpha_of(layer))
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _number(lora_alpha),
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # full module names: PEFT matches list entries exactly or as a '.'-suffix
        "target_modules": sorted(strip(layer.target) for layer in layers),
        "use_dora": any(layer.is_dora for layer in layers),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "lora_bias": any(layer.bias is not None for layer in layers),
    }


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


# ---------------------------------------------------------------------------------------------
# PEFT-style single files

PEFT_STYLE_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias", ".alpha": "alpha",
    ".lora_embedding_A": "embA", ".lora_embedding_B": "embB",
    ".lora_magnitude_vector": "mag", ".lora_magnitude_vector.weight": "mag",
    ".lora.down.weight": "A", ".lora.up.weight": "B",  # older diffusers LoRACompatible layers
    "_lora.down.weight": "A", "_lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A", ".lora_linear_layer.up.weight": "B",
    ".diff_b": "diff_b", ".diff": "diff",  # Wan: a bias delta beside the factors; full/vector deltas
}


def looks_peft_style(keys: list[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k or "lora_embedding_" in k or "lora_linear_layer" in k
               or k.endswith(("_lora.down.weight", ".lora.down.weight")) for k in keys)


def _split_peft_style(key: str) -> tuple[str, str] | None:
    for suffix, label in PEFT_STYLE_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], label
    return None


# old diffusers attention-processor LoRAs (`…attn1.processor.to_out_lora.up.weight`, text encoders'
# `…self_attn.to_q_lora.up.weight`): the module each `<name>_lora` adapts, as diffusers' own
# `UNET_TO_DIFFUSERS` / `DIFFUSERS_OLD_TO_PEFT` tables map it
_OLD_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _module_name(module: str, key: str = "") -> str:
    """The module a PEFT-style key adapts: old processor names `unet.….attn1.processor.to_q` ->
    `unet.….attn1.to_q`, `….processor.to_out` -> `….to_out.0` (the Linear inside diffusers' `to_out`
    ModuleList), a text encoder's `self_attn.to_q` -> `self_attn.q_proj`."""
    module = module.replace(".processor.", ".")
    if not key.endswith(("_lora.down.weight", "_lora.up.weight")):
        return module
    head, _, leaf = module.rpartition(".")
    if head.endswith(".self_attn") and leaf in _OLD_PROCESSOR_TEXT:
        return f"{head}.{_OLD_PROCESSOR_TEXT[leaf]}"
    return module + ".0" if leaf == "to_out" else module


def _peft_style_diffs(path: Path, source: TensorSource, adapter: Adapter, module: str, keys: dict[str, str]) -> None:
    """`<module>.diff` / `.diff_b` without factors: a full ΔW on a matrix (a LyCORIS full layer) or
    deltas added to a vector (a norm's weight, a bias)."""
    from .lycoris_read import build_layer

    others = sorted(key for label, key in keys.items() if label not in ("diff", "diff_b"))
    if others:
        raise LorahubError(f"module '{module}' has a diff and LoRA factors ({', '.join(others)})", path=path)
    if "diff" in keys and len(source.shape(keys["diff"])) >= 2:
        adapter.layers[module] = build_layer(path, source, module, module, {"full": keys}, {})
        return
    for label, key in keys.items():
        adapter.delta_tensors[f"{module}.{'weight' if label == 'diff' else 'bias'}"] = source.lazy(key)


def read_peft_style_file(path: Path, source: TensorSource, format_name: str,
                         configs: dict[str, dict]) -> Adapter:
    """A single file of PEFT-style keys (`<module>.lora_A.weight`, ...): diffusers files, and PEFT
    weights without their config. `configs` holds a LoraConfig per diffusers component."""
    metadata = source.metadata
    adapter = Adapter(path=path, format=format_name, metadata=metadata, files=[path],
                      base_model=metadata.get("lorahub.base_model"))
    known = read_layers_metadata(metadata, path)
    groups: dict[str, dict[str, str]] = {}
    for key in source.keys():
        split = _split_peft_style(key)
        if split is None:
            adapter.extra_keys.append(key)
            continue
        module, label = split
        module = _module_name(module, key)
        problem = dotted_name_problem(module)  # `diffusion_model..x`, `diffusion_model.lora_unet_…`
        if problem is not None:
            raise LorahubError(f"module name '{module}' {problem}", path=path, key=key)
        group = groups.setdefault(module, {})
        if label in group:  # `a.processor.to_q` and `a.to_q`: two tensors for one module
            raise LorahubError(f"'{group[label]}' and '{key}' are the same tensor of module '{module}'", path=path)
        group[label] = key
    for module, keys in groups.items():
        if "diff" in keys or ("diff_b" in keys and "A" not in keys and "B" not in keys):
            _peft_style_diffs(path, source, adapter, module, keys)
            continue
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
        if entry and entry.get("target") != module:
            raise LorahubError(f"{LAYERS_METADATA} maps module '{module}' to target {entry.get('target')!r}: the "
                               "metadata contradicts the keys", path=path)
        adapter.layers[module] = LoraLayer(
            target=module, kind=checked_kind(path, module, entry, down, up, embedding_keys=embedding),
            A=down, B=up, alpha=alpha, rank=rank,
            use_rslora=use_rslora, fan_in_fan_out=bool(entry.get("fan_in_fan_out", False)),
            magnitude=source.lazy(keys["mag"]) if "mag" in keys else None,
            bias=source.lazy(keys["bias"]) if "bias" in keys else
            source.lazy(keys["diff_b"]) if "diff_b" in keys else None, bias_unscaled="diff_b" in keys,
            source_key=module)
        if "diff_b" in keys and "bias" in keys:
            raise LorahubError(f"module '{module}' has both lora_B.bias and a diff_b bias delta", path=path)
    if COMPONENTS_METADATA in metadata:
        adapter.has_components = metadata[COMPONENTS_METADATA] == "1"
    else:
        adapter.has_components = bool(adapter.layers) and all(
            target.split(".", 1)[0] in COMPONENTS for target in adapter.layers)
    settle_fan_in_fan_out(adapter)
    return adapter
