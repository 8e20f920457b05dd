"""One library row from headers only: format, algorithm, model family, base model, ranks, alpha/scale,
targets, parameters — never a tensor's data (an `.alpha` tensor included).

`describe(kind, files)` returns a JSON-able summary with `status`:

- `adapter`: the summary below;
- `other`: a safetensors file that is not an adapter (a base model's shard, an embedding): not listed;
- `problem`: a corrupt or unreadable adapter (`error`: one line), listed as a problem.

The format comes from the formats registry (`detect_by_keys`, the directory formats' marker files); the
key suffixes that tell factors apart are the format modules' own tables (`peft.SUFFIXES`,
`kohya.LORA_SUFFIXES`, `kohya.LYCORIS_MARKERS`, `common.PEFT_STYLE_SUFFIXES`), so nothing here spells a
key name. Ranks and shapes are exact (from the header); alpha is exact where the format keeps it
outside the tensors (a PEFT config, diffusers' `lora_adapter_metadata`, no `.alpha` at all: alpha =
rank) and otherwise taken from kohya's training metadata (`ss_network_alpha`, `conv_alpha`) and marked
so (`alpha_from: "metadata"`), or unknown (`null`): `lorahub inspect` reads the `.alpha` tensors.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import LorahubError
from ..formats import detect_by_keys, is_adapter_state
from ..formats import diffusers as _diffusers
from ..formats import kohya as _kohya
from ..formats import peft as _peft
from ..formats.common import COMPONENTS, PEFT_STYLE_SUFFIXES, pattern_value
from ..formats.kohya_names import kohya_to_target
from ..storage import SafetensorsHeader, gc_paused, is_pickle_path, read_header

# bump when the summary changes: the index re-reads every file described by an older version
DESCRIBE_VERSION = 1

MAGNITUDE = ("mag", "dora")  # the DoRA magnitude's label in the format tables


def _number(value: float) -> float | int:
    """16.0 -> 16, 1/3 -> 0.33333333 (payloads.number)."""
    value = float(value)
    return int(value) if value.is_integer() else round(value, 8)


def leaf_name(target: str) -> str:
    """The module's own name: `q_proj`, `to_out.0` (as inspect groups targets)."""
    parts = target.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


@lru_cache(maxsize=1 << 16)
def _kohya_target(module: str) -> str:
    """kohya's flattened name -> dotted target (name guessing; the same few thousand names recur across
    a library, so each is guessed once per process)."""
    return kohya_to_target(module)


_leaf = lru_cache(maxsize=1 << 16)(leaf_name)

_Roles = tuple[tuple[str, ...], dict[str, str], list[tuple[str, str]], list[tuple[str, str]], tuple[str, ...]]
_ROLES: dict[int, _Roles] = {}


def _roles(table: dict[str, str]) -> _Roles:
    """A format's suffix table split by role: the down factor's suffixes (whose first dimension is the
    rank), the up factor's, the rest (alpha, DoRA magnitude, biases)."""
    roles = _ROLES.get(id(table))
    if roles is None:
        downs = {s: label for s, label in table.items() if label in ("A", "embA", "down")}
        ups = [(s, label) for s, label in table.items() if label in ("B", "embB", "up")]
        others = [(s, label) for s, label in table.items() if label not in ("A", "embA", "down", "B", "embB", "up")]
        roles = _ROLES[id(table)] = (tuple(downs), downs, ups, others, tuple(s for s, _ in ups))
    return roles


def _modules(tensors: dict[str, Any], table: dict[str, str]) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """[(module, {label: key})] of every module with a down factor (its key, the up factor's, alpha, DoRA
    magnitude, biases, by the format's suffix table), and the keys no module claims. Found from the down
    factors and looked up by name (the keys are scanned once, in C), not by grouping every key."""
    down_tuple, downs, ups, others, up_tuple = _roles(table)
    out: list[tuple[str, dict[str, str]]] = []
    claimed = 0
    single = down_tuple[0] if len(down_tuple) == 1 else None
    for key in [k for k in tensors if k.endswith(down_tuple)]:
        suffix = single or next(s for s in down_tuple if key.endswith(s))
        module = key[: -len(suffix)]
        labels = {downs[suffix]: key}
        for s, label in ups:
            if module + s in tensors:
                labels[label] = module + s
                break
        for s, label in others:
            if module + s in tensors:
                labels[label] = module + s
        claimed += len(labels)
        out.append((module, labels))
    if claimed == len(tensors):
        return out, []
    taken = {key for _, labels in out for key in labels.values()}
    rest = [k for k in tensors if k not in taken]
    orphan = next((k for k in rest if k.endswith(up_tuple)), None)
    if orphan is not None:  # an up factor without its down factor: the reader refuses the file
        raise LorahubError(f"'{orphan}' has no matching down/A factor")
    return out, rest


class _Layer:
    __slots__ = ("target", "component", "rank", "alpha", "rslora", "conv", "in_features", "params", "dora")

    def __init__(self, target: str, component: str | None, rank: int, conv: bool, in_features: int, params: int,
                 dora: bool) -> None:
        self.target = target
        self.component = component
        self.rank = rank
        self.conv = conv  # a spatial (k×k, k > 1) convolution
        self.in_features = in_features
        self.params = params
        self.dora = dora
        self.alpha: float | None = None
        self.rslora = False


def _pair(header: SafetensorsHeader, keys: dict[str, str], target: str, component: str | None) -> _Layer:
    """The layer of one module's keys; a down factor without its partner or ranks that disagree are a
    corrupt adapter."""
    down_key = keys.get("A") or keys.get("embA") or keys.get("down")
    up_key = keys.get("B") or keys.get("embB") or keys.get("up")
    if down_key is None or up_key is None:
        raise LorahubError(f"'{down_key or up_key}' has no matching {'up/B' if down_key else 'down/A'} factor",
                           path=header.path)
    tensors = header.tensors
    down, up = tensors[down_key].shape, tensors[up_key].shape
    if len(down) < 2 or len(up) < 2:
        raise LorahubError(f"factor is not a matrix (A {list(down)}, B {list(up)})", path=header.path,
                           key=down_key if len(down) < 2 else up_key)
    if down[0] != up[1]:
        raise LorahubError(f"rank mismatch: {down_key} has rank {down[0]} but {up_key} has rank {up[1]}",
                           path=header.path)
    in_features = down[1] if len(down) == 2 else math.prod(down[1:])
    params = down[0] * in_features + (up[0] * up[1] if len(up) == 2 else math.prod(up))
    dora = False
    if len(keys) > 2:
        for label, key in keys.items():
            if label in MAGNITUDE or label in ("bias", "down_bias"):
                params += math.prod(tensors[key].shape)
                dora = dora or label in MAGNITUDE
    conv = len(down) == 4 and (down[2] != 1 or down[3] != 1)
    return _Layer(target, component, down[0], conv, in_features, params, dora)


# ---------------------------------------------------------------------------------------------
# per format


MAX_CONFIG_BYTES = 16 << 20  # an adapter_config.json is a few KB; more is not a config


def _peft_dir(config_path: str, weights_path: str | None) -> dict[str, Any]:
    try:
        with open(config_path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise LorahubError(f"larger than {MAX_CONFIG_BYTES >> 20} MB: not an adapter config", path=config_path)
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise LorahubError("invalid JSON (not UTF-8 text)", path=config_path) from None
    except json.JSONDecodeError as exc:
        raise LorahubError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path=config_path) from None
    except OSError as exc:
        raise LorahubError(f"cannot read: {exc.strerror}", path=config_path) from None
    if not isinstance(config, dict):
        raise LorahubError(f"{_peft.CONFIG} is not a JSON object", path=config_path)
    if weights_path is None:
        raise LorahubError(f"PEFT directory has {_peft.CONFIG} but no {' or '.join(_peft.WEIGHTS)}",
                           path=os.path.dirname(config_path))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    base_model = config.get("base_model_name_or_path")
    summary: dict[str, Any] = {"format": _peft.NAME, "base_model": base_model if isinstance(base_model, str) else None}
    try:
        default_r = int(config.get("r", 8))
        default_alpha = float(config.get("lora_alpha", default_r))
    except (TypeError, ValueError):
        raise LorahubError("'r' and 'lora_alpha' must be numbers", path=config_path) from None
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise LorahubError(f"'{key}' must be an object {{pattern: value}}", path=config_path)
    if is_pickle_path(Path(weights_path)):
        # never unpickled: the config alone
        summary.update(algorithm="lora" if peft_type == "LORA" else peft_type.lower(), layers=[], unread=True,
                       config_rank=default_r, config_alpha=default_alpha, metadata={})
        if peft_type in ("LOHA", "LOKR"):
            summary["format"] = "lycoris"
        return summary
    header = read_header(weights_path)
    component = header.metadata.get("lorahub.component") or None
    summary["metadata"] = header.metadata
    if peft_type != "LORA":
        summary.update(format="lycoris" if peft_type in ("LOHA", "LOKR") else _peft.NAME,
                       algorithm=peft_type.lower(), layers=[],
                       lycoris={peft_type.lower(): len({k.rsplit(".", 2)[0] for k in header.tensors})})
        return summary
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern"), config.get("alpha_pattern")
    layers = []
    modules, _ = _modules(header.tensors, _peft.SUFFIXES)
    for full, labels in modules:
        module = full[len(_peft.PREFIX):] if full.startswith(_peft.PREFIX) else full
        layer = _pair(header, labels, f"{component}.{module}" if component else module, component)
        try:
            config_rank = int(pattern_value(rank_pattern, module, default_r)) if rank_pattern else default_r
            layer.alpha = float(pattern_value(alpha_pattern, module, default_alpha)) if alpha_pattern else \
                default_alpha
        except (TypeError, ValueError, re.error):
            raise LorahubError("invalid rank_pattern/alpha_pattern", path=config_path) from None
        if config_rank != layer.rank:
            raise LorahubError(f"rank {layer.rank} in the tensors but {config_rank} in {_peft.CONFIG} "
                               f"(r / rank_pattern); PEFT would refuse to load it", path=weights_path)
        layer.rslora = use_rslora
        layers.append(layer)
    summary.update(layers=layers, alpha_from="config", algorithm="lora")
    return summary


def _kohya_file(header: SafetensorsHeader, fmt_name: str) -> dict[str, Any]:
    meta = header.metadata
    modules, rest = _modules(header.tensors, _kohya.LORA_SUFFIXES)
    lycoris: Counter[str] = Counter()
    lycoris_modules = set()
    for key in rest:
        module, _, tail = key.partition(".")
        algo = _kohya.LYCORIS_MARKERS.get(tail) or _kohya.LYCORIS_MARKERS.get(tail.removesuffix(".weight"))
        if algo and module not in lycoris_modules:
            lycoris_modules.add(module)
            lycoris[algo] += 1
    claimed = len(header.tensors) - len(rest)
    if lycoris_modules:  # LoHa/LoKr modules carry .alpha too
        claimed += sum(1 for key in rest if key.partition(".")[0] in lycoris_modules)
    network_alpha = _meta_number(meta.get("ss_network_alpha"))
    conv_alpha = None
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
        if isinstance(args, dict) and args.get("conv_dim") not in (None, "", "None"):
            conv_alpha = _meta_number(args.get("conv_alpha"))
    except (ValueError, TypeError):
        pass
    has_alpha_tensors = False
    layers = []
    for module, labels in modules:
        target = _kohya_target(module)
        head = target.partition(".")[0]
        layer = _pair(header, labels, target, head if head in COMPONENTS else None)
        if "alpha" in labels:
            has_alpha_tensors = True
            layer.alpha = conv_alpha if layer.conv else network_alpha
        else:
            layer.alpha = float(layer.rank)  # no .alpha: alpha = rank, as kohya and A1111 read it
        layers.append(layer)
    base_model = meta.get("lorahub.base_model") or meta.get("ss_sd_model_name") or meta.get("modelspec.architecture")
    algorithm = "+".join(sorted(lycoris)) if lycoris else "lora"
    if lycoris and layers:
        algorithm += "+lora"
    return {"format": fmt_name, "base_model": base_model, "layers": layers, "lycoris": dict(lycoris),
            "algorithm": algorithm, "alpha_from": "metadata" if has_alpha_tensors else "rank", "metadata": meta,
            "claimed": claimed}


def _meta_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None  # absent, "Dynamic", "None"
    return number if math.isfinite(number) else None


def _peft_style_file(header: SafetensorsHeader, fmt_name: str) -> dict[str, Any]:
    meta = header.metadata
    configs = _diffusers._adapter_configs(meta) if fmt_name == _diffusers.NAME else {}
    modules, rest = _modules(header.tensors, PEFT_STYLE_SUFFIXES)
    layers = []
    alpha_from = "rank"
    for module, labels in modules:
        target = module.replace(".processor.", ".")  # old attention-processor names, as the reader reads them
        if fmt_name == _peft.NAME and target.startswith(_peft.PREFIX):
            target = target[len(_peft.PREFIX):]
        head = target.partition(".")[0]
        component = head if head in COMPONENTS else None
        layer = _pair(header, labels, target, component)
        config = configs.get(head) if configs else None
        if "alpha" in labels:
            alpha_from = "tensors"
            layer.alpha = None  # in the tensor only: not read here
        elif config:
            alpha_from = "metadata" if alpha_from == "rank" else alpha_from
            try:
                layer.alpha = float(pattern_value(config.get("alpha_pattern"), target.partition(".")[2],
                                                  config.get("lora_alpha", config.get("r", layer.rank))))
            except (TypeError, ValueError, re.error):
                layer.alpha = None
            layer.rslora = bool(config.get("use_rslora", False))
        else:
            layer.alpha = float(layer.rank)
        layers.append(layer)
    base_model = meta.get("lorahub.base_model")
    return {"format": fmt_name, "base_model": base_model, "layers": layers, "algorithm": "lora",
            "alpha_from": alpha_from, "metadata": meta, "claimed": len(header.tensors) - len(rest)}


# ---------------------------------------------------------------------------------------------
# the model family


_META_FAMILIES = (("flux", "flux"), ("stable-diffusion-3", "sd3"), ("sd3", "sd3"), ("sdxl", "sdxl"),
                  ("stable-diffusion-xl", "sdxl"), ("sd_v2", "sd2"), ("stable-diffusion-v2", "sd2"),
                  ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"))
_NAME_FAMILIES = tuple((re.compile(pattern, re.I), family) for pattern, family in (
    (r"flux", "flux"), (r"stable-diffusion-3|\bsd3", "sd3"), (r"xl", "sdxl"),
    (r"stable-diffusion-2|\bsd-?2", "sd2"), (r"stable-diffusion|\bsd-?1|runwayml", "sd1"),
    (r"mixtral", "mixtral"), (r"mistral", "mistral"), (r"llama", "llama"), (r"qwen", "qwen"),
    (r"gemma", "gemma"), (r"\bphi", "phi"), (r"gpt-?2", "gpt2"), (r"falcon", "falcon"), (r"\bt5|flan", "t5"),
    (r"bert", "bert"),
))
# a UNet's cross-attention width tells SD 1.x (768), 2.x (1024) and SDXL (2048) apart
_CROSS_ATTENTION = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def model_family(layers: list[_Layer], metadata: dict[str, str], base_model: str | None) -> str | None:
    """sd1, sd2, sdxl, sd3, flux, llama, mistral, qwen, … or None: from training metadata, then the base
    model's name, then the adapted modules (components, block names, cross-attention width)."""
    text = f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
    for needle, family in _META_FAMILIES:
        if needle in text:
            return family
    if base_model:
        name = base_model.replace("\\", "/").rstrip("/").rsplit("/", 2)[-2:]
        for pattern, family in _NAME_FAMILIES:
            if pattern.search("/".join(name)):
                return family
    flat = [layer.target.replace(".", "_") for layer in layers]
    components = {layer.component for layer in layers}
    if any("double_blocks" in n or "single_blocks" in n or "single_transformer_blocks" in n for n in flat):
        return "flux"
    if any("joint_blocks" in n or "context_embedder" in n or "add_q_proj" in n for n in flat):
        return "sd3"
    if "text_encoder_2" in components:
        return "sdxl"
    if "unet" in components or any("down_blocks" in n or "input_blocks" in n for n in flat):
        widths = Counter(layer.in_features for layer, n in zip(layers, flat) if "attn2_to_k" in n)
        if widths:
            return _CROSS_ATTENTION.get(widths.most_common(1)[0][0], "sd")
        return "sd"
    if any("self_attn_q_proj" in n or "mlp_gate_proj" in n for n in flat):
        return "llm"
    return None


# ---------------------------------------------------------------------------------------------
# the summary


def _distribution(values: list[Any], convert: Any = None) -> list[list[Any]]:
    """[[value, count], ...], most common first (the JSON contract's `*_distribution`, as pairs);
    `convert` maps each distinct value (16.0 -> 16)."""
    counts: Counter[Any] = Counter()
    for value, n in Counter(values).items():
        counts[convert(value) if convert else value] += n
    return [[value, n] for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]


def _finish(found: dict[str, Any]) -> dict[str, Any]:
    layers: list[_Layer] = found.pop("layers")
    metadata = found.pop("metadata", {}) or {}
    found.pop("claimed", None)
    if found.pop("unread", False):  # PEFT weights in a pickle: what the config says
        rank, alpha = found.pop("config_rank"), found.pop("config_alpha")
        found.update(modules=None, ranks=[[rank, None]], alphas=[[_number(alpha), None]],
                     scales=[[_number(alpha / rank if rank else 0), None]], alpha_from="config",
                     targets=[], components=[], params=None, dora=False, rslora=False)
        found["family"] = model_family([], metadata, found.get("base_model"))
        found.setdefault("lycoris", {})
        found["status"] = "adapter"
        return found
    lycoris = found.get("lycoris") or {}
    if not layers and not lycoris:
        raise LorahubError("no LoRA modules (the keys hold no factor pairs)")
    known = all(layer.alpha is not None for layer in layers)
    found["modules"] = len(layers)
    found["ranks"] = _distribution([layer.rank for layer in layers])
    if known:
        found["alphas"] = _distribution([layer.alpha for layer in layers], _number)
        found["scales"] = _distribution([(layer.alpha or 0.0) / (math.sqrt(layer.rank) if layer.rslora else layer.rank)
                                         for layer in layers if layer.rank], _number)
    else:
        found["alphas"] = found["scales"] = None
        found["alpha_from"] = None
    found["targets"] = _distribution([_leaf(layer.target) for layer in layers])
    found["components"] = _distribution([layer.component for layer in layers if layer.component])
    found["params"] = sum(layer.params for layer in layers)
    found["dora"] = any(layer.dora for layer in layers)
    found["rslora"] = any(layer.rslora for layer in layers)
    if found.get("algorithm") == "lora" and found["dora"]:
        found["algorithm"] = "dora"
    found["lycoris"] = lycoris
    found["family"] = model_family(layers, metadata, found.get("base_model"))
    found["status"] = "adapter"
    return found


def _mostly_adapter(keys: list[str], found: dict[str, Any] | None) -> bool:
    """An adapter file rather than a model's weights that happen to hold LoRA-named keys: every key is an
    adapter key (the registry's `is_adapter_state`), or most are (extra keys: embeddings bundled with a LoRA)."""
    claimed = found.get("claimed", 0) if found is not None else 0
    if claimed == len(keys) or is_adapter_state(keys):
        return True
    return max(claimed, sum(is_adapter_state([k]) for k in keys)) * 2 > len(keys)


def describe(kind: str, files: list[str]) -> dict[str, Any]:
    """The summary of one candidate (`scan.Candidate`: kind "dir" with [config, weights?], or "file"
    with [path]); errors become `{"status": "problem", "error": …}`."""
    with gc_paused():  # thousands of small objects, no cycles: the collector's passes are pure cost
        return _describe(kind, files)


def _describe(kind: str, files: list[str]) -> dict[str, Any]:
    try:
        if kind == "dir":
            return _finish(_peft_dir(files[0], files[1] if len(files) > 1 else None))
        header = read_header(files[0])
        keys = list(header.tensors)
        if not keys:
            return {"status": "other", "why": "no tensors"}
        try:
            fmt = detect_by_keys(Path(files[0]), keys)
        except LorahubError:
            return {"status": "other", "why": "no adapter keys"}
        try:
            if fmt.name in ("kohya", "lycoris"):
                found = _kohya_file(header, fmt.name)
            elif fmt.name in (_diffusers.NAME, _peft.NAME):
                found = _peft_style_file(header, fmt.name)
            else:
                found = None
        except LorahubError:
            if not _mostly_adapter(keys, None):
                return {"status": "other", "why": "mostly model weights"}
            raise
        if not _mostly_adapter(keys, found):
            return {"status": "other", "why": "mostly model weights"}  # a base model with a few LoRA-named keys
        if found is not None:
            return _finish(found)
        # a format registered later: named, not summarised
        return {"status": "adapter", "format": fmt.name, "algorithm": None, "family": None, "base_model": None,
                "modules": None, "ranks": [], "alphas": None, "scales": None, "alpha_from": None, "targets": [],
                "components": [], "params": None, "dora": False, "rslora": False, "lycoris": {}}
    except LorahubError as exc:
        return {"status": "problem", "error": str(exc)}
    except (OSError, ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        where = files[0] if files else "?"
        return {"status": "problem", "error": f"{where}: cannot describe ({exc.__class__.__name__}: {exc})"}
