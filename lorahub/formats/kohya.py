"""kohya / A1111 single files: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`, `.dora_scale`.

LyCORIS files use the same module names with other tensor kinds (`hada_*`, `lokr_*`, ...); they are
recognised here and listed as `other_modules` (format "lycoris").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..adapter import Adapter, LoraLayer
from ..errors import LorahubError
from ..lazy import save_file, torch, unshare
from .comfy_names import comfy_kohya_name, dotted_name_problem
from .common import (
    COMPONENTS_METADATA,
    LAYERS_METADATA,
    TensorSource,
    check_pair,
    checked_kind,
    component_of,
    kohya_dora_scale,
    layer_entry,
    missing_partner,
    read_layers_metadata,
    settle_fan_in_fan_out,
)
from .kohya_names import (
    KOHYA_PREFIXES,
    family_targets,
    kohya_name_fits,
    kohya_split_prefix,
    kohya_to_target,
    target_to_kohya,
)
from .lycoris_read import build_layer, dora_orientation, plain_lora_with_input_dora
from .lycoris_read import split as lycoris_split
from .spec import Format

NAME = "kohya"
LYCORIS_MARKERS = {
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha",
    "hada_t2": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr",
    "lokr_w2_a": "lokr", "lokr_w2_b": "lokr", "lokr_t2": "lokr", "oft_blocks": "oft", "oft_diag": "oft",
    "diff": "full", "diff_b": "full", "w_norm": "norm", "b_norm": "norm", "a1.weight": "glora",
    "lora_mid.weight": "locon-tucker", "on_input": "ia3",
}
LORA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
                 ".dora_scale": "dora", ".lora_down.bias": "down_bias", ".lora_up.bias": "bias"}


def _split(key: str) -> tuple[str, str] | None:
    for suffix, label in LORA_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], label
    return None


def looks_like(keys: list[str]) -> bool:
    return any(".lora_down." in k or ".lora_up." in k for k in keys) or lycoris_keys(keys) > 0


def lycoris_keys(keys: list[str]) -> int:
    count = 0
    for key in keys:
        tail = key.split(".", 1)[1] if "." in key else key
        if tail in LYCORIS_MARKERS or tail.removesuffix(".weight") in LYCORIS_MARKERS:
            count += 1
    return count


def read(path: Path, *, allow_pickle: bool = False, source: TensorSource | None = None) -> Adapter:
    source = source or TensorSource(path, allow_pickle=allow_pickle)
    metadata = source.metadata
    known = read_layers_metadata(metadata, path)

    # a diffusion transformer's names resolved against its family's table (Flux, Wan, …), never guessed
    modules = sorted({(_split(key) or (key.partition(".")[0], ""))[0] for key in source.keys()})
    by_family, unknown, family = family_targets([m for m in modules if m not in known], metadata)

    def target_of(module: str) -> str:
        """The module's target: lorahub's metadata where it fits the key names, else the model family's
        name for it, else guessed from them."""
        declared = known.get(module, {}).get("target")
        if "." in module:  # a dotted module path (ComfyUI's `diffusion_model.…`): the target, verbatim
            problem = dotted_name_problem(module)
            if problem is not None:
                raise LorahubError(f"module name '{module}' {problem}", path=path)
            if declared not in (None, module):
                raise LorahubError(f"{LAYERS_METADATA} maps module '{module}' to target {declared!r}: the metadata "
                                   "contradicts the keys", path=path)
            return module
        if declared is None:
            return by_family.get(module) or kohya_to_target(module)
        if not isinstance(declared, str) or not kohya_name_fits(module, declared):
            raise LorahubError(f"{LAYERS_METADATA} maps module '{module}' to target {declared!r}, which is not "
                               "what its name flattens: the metadata contradicts the keys", path=path)
        return declared

    base_model = metadata.get("lorahub.base_model") or metadata.get("ss_sd_model_name") or \
        metadata.get("modelspec.architecture")
    adapter = Adapter(path=path, format=NAME, metadata=metadata, files=[path], base_model=base_model)
    if unknown:
        adapter.warnings.append(f"{len(unknown)} module(s) are not in {family}'s layout, their names are guessed "
                                f"(e.g. '{unknown[0]}')")
    groups: dict[str, dict[str, str]] = {}
    lycoris: dict[str, dict[str, dict[str, str]]] = {}  # module -> algorithm -> role -> key
    for key in source.keys():
        lyco = lycoris_split(key)
        if lyco is not None:
            lycoris.setdefault(lyco[0], {}).setdefault(lyco[1], {})[lyco[2]] = key
            continue
        split = _split(key)
        if split is None:
            module, _, tail = key.partition(".")
            algo = LYCORIS_MARKERS.get(tail) or LYCORIS_MARKERS.get(tail.removesuffix(".weight"))
            if algo:
                adapter.other_modules[target_of(module)] = algo
            else:
                adapter.extra_keys.append(key)
            continue
        module, label = split
        groups.setdefault(module, {})[label] = key

    for module, algos in lycoris.items():
        keys = groups.setdefault(module, {})
        if list(algos) == ["full"] and "diff" not in algos["full"] and "down" in keys:
            keys["diff_b"] = algos["full"]["diff_b"]  # a LoRA module's bias delta (Wan)
            continue
        if list(algos) == ["full"] and ("diff" not in algos["full"] or len(source.shape(algos["full"]["diff"])) < 2):
            # vector deltas (a norm's weight, a bias): added to the base tensor as they are
            if any(label in keys for label in ("down", "up")):
                raise LorahubError(f"module '{module}' has a vector diff and lora_down/lora_up", path=path)
            for role, key in algos["full"].items():
                adapter.delta_tensors[f"{target_of(module)}.{'weight' if role == 'diff' else 'bias'}"] = \
                    source.lazy(key)
            adapter.extra_keys.extend(groups.pop(module).values())  # an alpha, if any: no scale applies
            continue
        target = target_of(module)
        if target in adapter.layers:
            raise LorahubError(f"modules '{adapter.layers[target].source_name}' and '{module}' both map to "
                               f"'{target}'", path=path)
        adapter.layers[target] = build_layer(path, source, module, target, algos, groups.pop(module))

    for module, keys in groups.items():
        target = target_of(module)
        if target in adapter.other_modules:
            continue  # OFT/GLoRA/... modules carry .alpha too
        if "down" not in keys or "up" not in keys:
            present = keys.get("down") or keys.get("up")
            if present is None:
                adapter.extra_keys.extend(keys.values())  # a lone alpha
                continue
            other = f"{module}.lora_{'up' if 'down' in keys else 'down'}.weight"
            raise missing_partner(path, present, other)
        down, up = source.lazy(keys["down"]), source.lazy(keys["up"])
        rank = check_pair(path, module, keys["down"], keys["up"], down, up)
        # missing alpha means alpha = rank (scale 1), as kohya, A1111 and diffusers read it
        alpha = source.scalar(keys["alpha"]) if "alpha" in keys else float(rank)
        if alpha == 0:  # the peers disagree: kohya sd-scripts reads 0 as alpha = rank, diffusers and ComfyUI as 0
            adapter.zero_alphas.append(keys["alpha"])
        magnitude = source.lazy(keys["dora"]) if "dora" in keys else None
        if "diff_b" in keys and "bias" in keys:
            raise LorahubError(f"module '{module}' has both a LoRA bias and a diff_b bias delta", path=path)
        entry = known.get(module, {})
        if target in adapter.layers:
            raise LorahubError(f"modules '{adapter.layers[target].source_name}' and '{module}' both map to "
                               f"'{target}'" + (f" ({LAYERS_METADATA} metadata)" if entry else "")
                               + ": one module would silently replace the other", path=path)
        adapter.layers[target] = LoraLayer(
            target=target, kind=checked_kind(path, module, entry, down, up), A=down, B=up, alpha=alpha,
            rank=rank, fan_in_fan_out=bool(entry.get("fan_in_fan_out", False)),
            magnitude=magnitude, bias=source.lazy(keys["bias"]) if "bias" in keys else
            source.lazy(keys["diff_b"]) if "diff_b" in keys else None, bias_unscaled="diff_b" in keys,
            source_key=module, source_name=None if "." in module else module)
        if magnitude is not None and len(magnitude.shape) >= 2 and magnitude.shape[0] == 1 < magnitude.shape[1] \
                and dora_orientation(path, keys["dora"], magnitude.shape, up.shape[0]) is False:
            # LyCORIS wd_on_out=False: one norm per input channel, LyCORIS's DoRA math
            adapter.layers[target] = plain_lora_with_input_dora(path, module, adapter.layers[target])
    if adapter.zero_alphas:
        adapter.warnings.append(f"{len(adapter.zero_alphas)} module(s) have alpha 0 (e.g. '{adapter.zero_alphas[0]}'), "
                                "which kohya's scripts apply as alpha = rank and diffusers and ComfyUI as scale 0: "
                                "operations refuse them")
    if COMPONENTS_METADATA in metadata:
        adapter.has_components = metadata[COMPONENTS_METADATA] == "1"
    else:
        modules = list(groups) + list(lycoris)
        adapter.has_components = bool(modules) and all(
            kohya_split_prefix(module)[0] in KOHYA_PREFIXES for module in modules)
    settle_fan_in_fan_out(adapter)
    if adapter.other_modules or adapter.delta_tensors or \
            any(layer.lycoris is not None for layer in adapter.layers.values()):
        adapter.format = "lycoris"
    return adapter


def write(adapter: Adapter, out: Path) -> Path:
    """One .safetensors file in kohya's layout; the scale is stored in `.alpha` (kohya has no rsLoRA)."""
    adapter.require_lora("writing kohya format")
    components = {component_of(t) for t in adapter.layers} if adapter.has_components else set()
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, dict] = {}
    dtype = torch.float32
    for layer in adapter.layers.values():
        try:
            name = layer.source_name if (layer.source_name and adapter.format == NAME) else \
                comfy_kohya_name(layer.target, adapter.layers.keys()) or \
                target_to_kohya(layer.target, components, adapter.has_components)
        except LorahubError as exc:  # a ComfyUI name kohya has no prefix for: name the file
            if exc.path is not None or adapter.path is None:
                raise
            raise LorahubError(str(exc), path=adapter.path) from None
        if name in names:
            raise LorahubError(f"two modules map to the same kohya name '{name}'", path=adapter.path)
        names[name] = layer_entry(layer)
        down, up = layer.A.load().contiguous(), layer.B.load().contiguous()
        dtype = down.dtype if down.is_floating_point() else dtype
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        # kohya's scale is alpha/rank: keep the effective scale, rsLoRA included
        tensors[f"{name}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=torch.float32)
        if layer.magnitude is not None:
            tensors[f"{name}.dora_scale"] = kohya_dora_scale(layer)
        if layer.bias is not None:
            tensors[f"{name}.diff_b" if layer.bias_unscaled else f"{name}.lora_up.bias"] = \
                layer.bias.load().contiguous()
    for name, tensor in adapter.delta_tensors.items():  # diff/diff_b deltas on vectors, as LyCORIS writes them
        target, _, role = name.rpartition(".")
        key = tensor.key if tensor.key and tensor.key.endswith((".diff", ".diff_b")) else \
            f"{target_to_kohya(target, components, adapter.has_components)}.{'diff' if role == 'weight' else 'diff_b'}"
        if key in tensors:
            raise LorahubError(f"two tensors map to the kohya key '{key}'", path=adapter.path)
        tensors[key] = tensor.load().contiguous()
    if adapter.full_tensors:
        raise LorahubError("kohya files cannot carry full replacement tensors (modules_to_save: "
                           f"{', '.join(sorted(adapter.full_tensors))}); use --to peft", path=adapter.path)
    metadata = {k: v for k, v in adapter.metadata.items() if k.startswith(("ss_", "modelspec."))}
    ranks = sorted({layer.rank for layer in adapter.layers.values()})
    alphas = sorted({layer.scale * layer.rank for layer in adapter.layers.values()})
    metadata["ss_network_module"] = metadata.get("ss_network_module", "networks.lora")
    metadata["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    metadata["ss_network_alpha"] = _fmt(alphas[0]) if len(alphas) == 1 else "Dynamic"
    metadata[LAYERS_METADATA] = json.dumps(names, sort_keys=True)
    metadata[COMPONENTS_METADATA] = "1" if adapter.has_components else "0"
    if adapter.base_model:
        metadata["lorahub.base_model"] = adapter.base_model
    _add_kohya_hashes(tensors, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def on_resize(metadata: dict[str, str], report: Any) -> dict[str, str]:
    """kohya metadata after `lorahub resize`: a training comment saying so, conv ranks in the network args."""
    metadata = dict(metadata)
    old = sorted({layer.old_rank for layer in report.layers})
    new = sorted({layer.new_rank for layer in report.layers})
    what = (f"rank {report.rank}" if report.method == "fixed" else
            f"{report.method} {report.param}" + (f" (cap {report.rank})" if report.rank else ""))
    old_s = str(old[0]) if len(old) == 1 else f"{old[0]}-{old[-1]}"
    new_s = str(new[0]) if len(new) == 1 else f"{new[0]}-{new[-1]}"
    comment = f"dimension is resized from {old_s} to {new_s} by lorahub ({what})"
    previous = metadata.get("ss_training_comment")
    metadata["ss_training_comment"] = f"{comment}; {previous}" if previous and previous != "None" else comment
    args = metadata.get("ss_network_args")
    if args:
        # kohya keeps stale conv_dim/conv_alpha here; they describe training, not this file any more
        try:
            parsed = json.loads(args)
        except (ValueError, RecursionError):  # not lorahub's to fix: the stale args stay as they were
            parsed = None
        if isinstance(parsed, dict) and ("conv_dim" in parsed or "conv_alpha" in parsed):
            conv = [layer for layer in report.layers if layer.kernel not in ("", "1x1")]
            conv_ranks = sorted({layer.new_rank for layer in conv})
            conv_alphas = sorted({layer.new_alpha for layer in conv})
            if len(conv_ranks) == 1:
                parsed["conv_dim"] = str(conv_ranks[0])
                parsed["conv_alpha"] = _fmt(conv_alphas[0]) if len(conv_alphas) == 1 else "Dynamic"
            elif conv_ranks:
                parsed["conv_dim"] = parsed["conv_alpha"] = "Dynamic"
            metadata["ss_network_args"] = json.dumps(parsed)
    return metadata


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _add_kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Recompute `sshs_*` for the bytes we write, as kohya does (stale hashes mislead A1111/civitai)."""
    import hashlib
    import struct

    from safetensors.torch import save

    from ..storage import legacy_hash_of_bytes

    metadata.pop("sshs_model_hash", None)
    metadata.pop("sshs_legacy_hash", None)
    raw = save(unshare(tensors), metadata=metadata)
    (header_len,) = struct.unpack("<Q", raw[:8])
    metadata["sshs_model_hash"] = hashlib.sha256(raw[8 + header_len:]).hexdigest()
    metadata["sshs_legacy_hash"] = legacy_hash_of_bytes(raw)


def _is_lycoris(keys: list[str]) -> bool:
    return looks_like(keys) and lycoris_keys(keys) > 0


# LyCORIS files share kohya's module names; one reader takes both (LoRA/LoCon modules become layers,
# LoHa/LoKr/... modules are listed in `other_modules`)
FORMATS = (
    Format(name=NAME, summary="one .safetensors file, `lora_unet_…lora_down.weight` / `.lora_up.weight` / "
           "`.alpha` (kohya sd-scripts, A1111, ComfyUI)", read=read, write=write,
           default_file="adapter.safetensors", detect_keys=looks_like, detect_priority=20, on_resize=on_resize),
    Format(name="lycoris", summary="kohya-named LyCORIS files (LoHa `hada_*`, LoKr `lokr_*`, ...): read and "
           "listed; their math is not implemented yet", read=read, detect_keys=_is_lycoris, detect_priority=10),
)
