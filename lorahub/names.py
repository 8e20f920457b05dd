"""Which base tensor each adapter module changes.

`match_layers(adapter, base)` maps every `LoraLayer.target` (and every full tensor the adapter
replaces) to the base tensor that holds its weight:

- PEFT / diffusers targets are dotted module paths; they are looked up as `<target>.weight`. When the
  adapter and the base disagree by a wrapper prefix (`transformer.h.0…` vs `h.0…` in GPT-2's own
  file, `model.` vs `model.language_model.`), the one prefix rule that matches the most targets is
  applied to all of them.
- kohya names (flattened with `_`, see `lorahub.formats.kohya_names`) cannot be split back into a dotted
  path by string replacement (module names contain `_`), so they are resolved against the base's own
  names: every base module path is flattened (`.` → `_`) and looked up; several candidates are told
  apart by shape.
- Stable Diffusion single-file checkpoints (SD 1.x/2.x `model.diffusion_model.…`,
  `cond_stage_model.…`; SDXL `conditioner.embedders.0.transformer.…` (CLIP-L) and
  `conditioner.embedders.1.model.…` (OpenCLIP bigG)) get diffusers-named aliases, and diffusers UNets
  get LDM/SGM-named aliases, so either naming finds the other:

  | diffusers (UNet2DConditionModel)              | LDM / SGM (`model.diffusion_model.` in single files)      |
  | --------------------------------------------- | --------------------------------------------------------- |
  | `conv_in`                                     | `input_blocks.0.0`                                        |
  | `time_embedding.linear_1/2`                   | `time_embed.0/2`                                          |
  | `add_embedding.linear_1/2` (SDXL)             | `label_emb.0.0/2`                                         |
  | `down_blocks.i.resnets.j`                     | `input_blocks.{i·(L+1)+j+1}.0`                            |
  | `down_blocks.i.attentions.j`                  | `input_blocks.{i·(L+1)+j+1}.1`                            |
  | `down_blocks.i.downsamplers.0.conv`           | `input_blocks.{i·(L+1)+L+1}.0.op`                         |
  | `mid_block.resnets.0/1`, `attentions.0`       | `middle_block.0/2`, `middle_block.1`                      |
  | `up_blocks.i.resnets.j`                       | `output_blocks.{i·(L+1)+j}.0`                             |
  | `up_blocks.i.attentions.j`                    | `output_blocks.{i·(L+1)+j}.1`                             |
  | `up_blocks.i.upsamplers.0.conv`               | `output_blocks.{i·(L+1)+L}.{2 if attentions else 1}.conv` |
  | `conv_norm_out`, `conv_out`                   | `out.0`, `out.2`                                          |
  | resnet `norm1`, `conv1`, `time_emb_proj`      | `in_layers.0`, `in_layers.2`, `emb_layers.1`              |
  | resnet `norm2`, `conv2`, `conv_shortcut`      | `out_layers.0`, `out_layers.3`, `skip_connection`         |
  | attention blocks (`proj_in`, `ff.net.0.proj`, | identical                                                 |
  | `transformer_blocks.k.attn1.to_q`, …)         |                                                           |

  (L = layers_per_block.) OpenCLIP text encoders map to CLIP names (`resblocks.i` → `layers.i`,
  `ln_1/ln_2` → `layer_norm1/2`, `mlp.c_fc/c_proj` → `mlp.fc1/fc2`, `attn.out_proj` →
  `self_attn.out_proj`); `q_proj/k_proj/v_proj` are row blocks of the fused `attn.in_proj_weight`
  (`ModuleRef.rows`). Not covered: VAE, `text_projection` (stored transposed by OpenCLIP), ControlNet.
  Diffusion transformers whose original checkpoint and diffusers folder differ (Flux's fused qkv, …) are
  re-expressed in the base's naming before matching (`lorahub.families.align_to_base`).

Also from names: how a base layer stores its weight (`base_conv1d`: the base decides Conv1D, never an
adapter's `fan_in_fan_out`), and which model an adapter's names belong to (`model_evidence`,
`different_models`: blend refuses adapters of different models).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from .formats.comfy_names import comfy_base_candidates
from .formats.kohya_names import is_kohya_name, kohya_candidates
from .kinds import CONV1D, CONV1D_LEAVES, CONV1D_MODEL_TYPES, LINEAR, kind_of

if TYPE_CHECKING:
    from .adapter import Adapter, LoraLayer
    from .base import BaseModel

@dataclass(frozen=True)
class ModuleRef:
    """Where a module's parameters live in the base."""

    module: str  # the module path the adapter named (possibly an alias)
    weight: str  # base tensor name of the weight
    bias: str | None = None  # base tensor name of the bias, if the base has one
    rows: tuple[int, int] | None = None  # row block [start, stop) of a fused weight (OpenCLIP in_proj)


@dataclass
class NameMatch:
    """The result of `match_layers`: adapter names → base tensor names."""

    targets: dict[str, str] = field(default_factory=dict)  # layer target -> base weight tensor name
    refs: dict[str, ModuleRef] = field(default_factory=dict)  # layer target -> weight, bias, row block
    missing: list[str] = field(default_factory=list)  # layer targets with no module in the base
    full_tensors: dict[str, str] = field(default_factory=dict)  # adapter full tensor -> base tensor name
    full_missing: list[str] = field(default_factory=list)
    other: dict[str, str] = field(default_factory=dict)  # LyCORIS module target -> base weight tensor name
    other_missing: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # target -> candidate modules (kept first)
    rule: str | None = None  # prefix rule applied to dotted names, e.g. "strip 'transformer.'"

    def files(self, base: "BaseModel") -> dict[str | None, list[str]]:
        """Base file -> layer targets whose weight it holds (the merge engine streams per file)."""
        out: dict[str | None, list[str]] = {}
        for target, tensor in self.targets.items():
            info = base.get(tensor)
            out.setdefault(info.file if info else None, []).append(target)
        return out


# ---------------------------------------------------------------------------------------------
# the base's module index: real module paths plus aliases in other namings


class BaseIndex:
    """Module paths of a base (with aliases) and their underscore-flattened forms."""

    def __init__(self, base: "BaseModel"):
        self.base = base
        self.ntensors = len(base.tensors)  # a cached index is stale once the base gains tensors
        self.modules: dict[str, ModuleRef] = {}
        for name in base.tensors:
            if name.endswith(".weight"):
                module = name[: -len(".weight")]
                bias = module + ".bias"
                self.modules[module] = ModuleRef(module, name, bias if bias in base.tensors else None)
            elif name.endswith(".in_proj_weight"):  # nn.MultiheadAttention
                module = name[: -len(".in_proj_weight")]
                bias = module + ".in_proj_bias"
                self.modules.setdefault(module, ModuleRef(module, name, bias if bias in base.tensors else None))
        real = dict(self.modules)
        for alias, ref in _aliases(base, real):
            self.modules.setdefault(alias, ModuleRef(alias, ref.weight, ref.bias, ref.rows))
        self._flat: dict[str, list[str]] | None = None
        self._prefixes: list[str] | None = None

    @property
    def flat(self) -> dict[str, list[str]]:
        if self._flat is None:
            flat: dict[str, list[str]] = {}
            for module in self.modules:
                flat.setdefault(module.replace(".", "_"), []).append(module)
            self._flat = flat
        return self._flat

    def top_prefixes(self) -> list[str]:
        """Leading one- and two-segment prefixes of module paths ("model.", "model.language_model.")."""
        if self._prefixes is None:
            counts: Counter = Counter()
            for module in self.modules:
                parts = module.split(".")
                if len(parts) > 1:
                    counts[parts[0] + "."] += 1
                if len(parts) > 2:
                    counts[parts[0] + "." + parts[1] + "."] += 1
            self._prefixes = [p for p, n in counts.most_common(24) if n > 1]
        return self._prefixes


def base_index(base: "BaseModel") -> BaseIndex:
    index = base.__dict__.get("_lorahub_name_index")
    if index is None or index.base is not base or index.ntensors != len(base.tensors):
        index = BaseIndex(base)
        base.__dict__["_lorahub_name_index"] = index
    return index


# ---------------------------------------------------------------------------------------------
# matching


def match_layers(adapter: "Adapter", base: "BaseModel") -> NameMatch:
    """Map the adapter's layers, full tensors and LyCORIS modules to base tensor names."""
    index = base_index(base)
    result = NameMatch()
    unresolved: list[str] = []
    for target, layer in adapter.layers.items():
        ref, candidates = _resolve_layer(layer, index)
        if ref is None:
            unresolved.append(target)
            continue
        _record(result, target, ref, candidates)

    rule = None
    if unresolved:
        rule = _best_rule([t for t in unresolved if not is_kohya_name(adapter.layers[t].source_name or t)],
                          index.modules, index.top_prefixes())
        for target in unresolved:
            layer = adapter.layers[target]
            ref = None
            if rule is not None:
                module = _apply_rule(rule, target)
                ref = index.modules.get(module) if module is not None else None
            if ref is None:
                result.missing.append(target)
            else:
                _record(result, target, ref, [])
    result.rule = _describe_rule(rule) if rule and any(result.targets) else None

    tensor_names = base.tensors
    tensor_rule = rule
    full_unresolved = []
    for name in adapter.full_tensors:
        found = _resolve_tensor_name(name, tensor_names)
        if found is None:
            full_unresolved.append(name)
        else:
            result.full_tensors[name] = found
    if full_unresolved and tensor_rule is None:
        tensor_rule = _best_rule(full_unresolved, tensor_names, index.top_prefixes())
    for name in full_unresolved:
        mapped = _apply_rule(tensor_rule, name) if tensor_rule else None
        found = _resolve_tensor_name(mapped, tensor_names) if mapped else None
        if found is None:
            result.full_missing.append(name)
        else:
            result.full_tensors[name] = found

    for target in getattr(adapter, "other_modules", {}) or {}:
        ref = next((index.modules[n] for n in (target, *comfy_base_candidates(target)) if n in index.modules), None) \
            or _first(index.flat.get(target.replace(".", "_"), []), index)
        if ref is None and rule is not None:
            module = _apply_rule(rule, target)
            ref = index.modules.get(module) if module else None
        if ref is None:
            result.other_missing.append(target)
        else:
            result.other[target] = ref.weight
    return result


def _record(result: NameMatch, target: str, ref: ModuleRef, candidates: list[str]) -> None:
    result.targets[target] = ref.weight
    result.refs[target] = ref
    if len(candidates) > 1:
        result.ambiguous[target] = candidates


def _resolve_layer(layer: "LoraLayer", index: BaseIndex) -> tuple[ModuleRef | None, list[str]]:
    """The base module a layer adapts: kohya names through the flattened index, dotted names directly."""
    raw = layer.source_name
    if raw and is_kohya_name(raw):
        ref, candidates = _resolve_kohya(raw, layer, index)
        if ref is not None:
            return ref, candidates
    # the target itself, or the names a ComfyUI target (`diffusion_model.…`) has in other bases
    for name in (layer.target, *comfy_base_candidates(layer.target)):
        if (ref := index.modules.get(name)) is not None:
            return ref, []
    if is_kohya_name(layer.target):
        return _resolve_kohya(layer.target, layer, index)
    # a guessed dotted name (kohya reader) is only as good as its flattened form
    if raw:
        candidates = index.flat.get(layer.target.replace(".", "_"), [])
        if candidates:
            return _pick(candidates, layer, index), candidates
    return None, []


def _resolve_kohya(raw: str, layer: "LoraLayer", index: BaseIndex) -> tuple[ModuleRef | None, list[str]]:
    rest, components = kohya_candidates(raw)
    for component in components:
        key = f"{component}_{rest}" if component else rest
        candidates = index.flat.get(key)
        if candidates:
            return _pick(candidates, layer, index, prefer=layer.target), candidates
    return None, []


def _pick(candidates: list[str], layer: "LoraLayer", index: BaseIndex, prefer: str | None = None) -> ModuleRef:
    """One module among those whose flattened names collide: the one whose shape fits, else `prefer`."""
    if len(candidates) > 1:
        fitting = [c for c in candidates if layer_fits(layer, ref_shape(index.base, index.modules[c]))]
        if len(fitting) == 1:
            return index.modules[fitting[0]]
        if prefer in candidates:
            return index.modules[prefer]
        if fitting:
            return index.modules[fitting[0]]
    return index.modules[candidates[0]]


def _first(candidates: list[str], index: BaseIndex) -> ModuleRef | None:
    return index.modules[candidates[0]] if candidates else None


def _resolve_tensor_name(name: str | None, tensors: dict | set) -> str | None:
    if name is None:
        return None
    if name in tensors:
        return name
    stripped = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    return stripped if stripped in tensors else None


# prefix rules: ("strip", k, "") drops k leading segments; ("add", 0, p) prepends p; ("swap", k, p) both

def _apply_rule(rule: tuple[str, int, str] | None, name: str) -> str | None:
    if rule is None:
        return name
    kind, k, prefix = rule
    parts = name.split(".")
    if kind in ("strip", "swap"):
        if len(parts) <= k:
            return None
        parts = parts[k:]
    return prefix + ".".join(parts)


def _describe_rule(rule: tuple[str, int, str]) -> str:
    kind, k, prefix = rule
    if kind == "strip":
        return f"dropped {k} leading name segment{'s' if k > 1 else ''}"
    if kind == "add":
        return f"added prefix '{prefix}'"
    return f"replaced {k} leading segment{'s' if k > 1 else ''} by '{prefix}'"


def _best_rule(names: list[str], universe: Iterable[str] | dict, prefixes: list[str]) -> tuple[str, int, str] | None:
    """The prefix rule under which the most `names` exist in `universe` (None if none helps)."""
    if not names:
        return None
    lookup = universe if isinstance(universe, (dict, set)) else set(universe)
    rules: list[tuple[str, int, str]] = [("strip", 1, ""), ("strip", 2, "")]
    rules += [("add", 0, p) for p in prefixes]
    rules += [("swap", k, p) for k in (1, 2) for p in prefixes]
    sample = names[:200]
    best, best_hits = None, 0
    for rule in rules:
        hits = 0
        for name in sample:
            mapped = _apply_rule(rule, name)
            if mapped is not None and (mapped in lookup or _resolve_tensor_name(mapped, lookup) is not None):
                hits += 1
        if hits > best_hits:
            best, best_hits = rule, hits
    return best


# ---------------------------------------------------------------------------------------------
# shapes


def ref_shape(base: "BaseModel", ref: ModuleRef) -> tuple[int, ...] | None:
    """The shape of the weight a module adapts (a row block's shape for fused weights)."""
    shape = base.shape(ref.weight)
    if shape is None:
        return None
    if ref.rows is not None:
        return (ref.rows[1] - ref.rows[0], *shape[1:])
    return shape


def is_conv1d(base: "BaseModel", weight_name: str) -> bool:
    """Whether a base weight belongs to a transformers Conv1D (stored (in, out)), like GPT-2's c_attn.

    Safetensors headers do not say a layer's type; this uses the model type from the config and the
    layer name (PEFT decides by `isinstance(layer, Conv1D)`).
    """
    module = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name
    leaf = module.rsplit(".", 1)[-1]
    if leaf not in CONV1D_LEAVES:
        return False
    config = base.component_config(weight_name) or {}
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type:
        return model_type in CONV1D_MODEL_TYPES
    return re.search(r"(^|\.)h\.\d+\.(attn|mlp|crossattention)\.", module) is not None


def model_type_known(base: "BaseModel", weight: str) -> bool:
    config = base.component_config(weight)
    return isinstance(config, dict) and bool(config.get("model_type"))


def base_conv1d(layer: "LoraLayer", base: "BaseModel", ref: ModuleRef) -> bool | None:
    """Whether the base layer a linear layer adapts is a transformers Conv1D (weight stored (in, out)).

    The base decides, as PEFT decides by the layer's type whatever the adapter's `fan_in_fan_out` says:
    by the model type and the layer's name (`is_conv1d`), and, where the model type is unknown and the
    weight is not square, by the one orientation the factors fit. None for other kinds (conv, embedding)
    and for weights that are not matrices."""
    if layer.geometry not in (LINEAR, CONV1D):
        return None
    shape = ref_shape(base, ref)
    if shape is None or len(shape) != 2:
        return None
    conv1d = is_conv1d(base, ref.weight)
    if (shape[0] != shape[1] and not layer_fits(layer, shape, conv1d) and layer_fits(layer, shape, not conv1d)
            and not model_type_known(base, ref.weight)):
        conv1d = not conv1d  # without a model type, Conv1D is a guess from the name: the shapes say which
    return conv1d


def layer_fits(layer: "LoraLayer", shape: tuple[int, ...] | None, conv1d: bool | None = None) -> bool:
    """Whether a layer's factors fit a base weight of this shape (its kind decides the orientation;
    `conv1d` says what the base layer is, where known)."""
    return kind_of(layer, conv1d).fits(layer.A.shape, layer.B.shape, shape)


# ---------------------------------------------------------------------------------------------
# aliases between diffusers and LDM/SGM (single-file) namings


_CLIP_TEXT_HEADS = ("embeddings.", "encoder.", "final_layer_norm")


def _clip_text_model_aliases(real: dict[str, ModuleRef]) -> Iterable[tuple[str, ModuleRef]]:
    """CLIP text encoders with and without `text_model.` (transformers >= 5 drops it from module names;
    published files and LoRAs keep it), so either naming finds the tensor."""
    for module, ref in real.items():
        component, _, rest = module.partition(".")
        if not component.startswith("text_encoder"):
            continue
        if rest.startswith("text_model."):
            yield f"{component}.{rest[len('text_model.'):]}", ref
        elif rest.startswith(_CLIP_TEXT_HEADS):
            yield f"{component}.text_model.{rest}", ref


def _aliases(base: "BaseModel", real: dict[str, ModuleRef]) -> Iterable[tuple[str, ModuleRef]]:
    if base.layout == "diffusers":
        yield from _clip_text_model_aliases(real)
        unet = {m[len("unet."):]: ref for m, ref in real.items() if m.startswith("unet.")}
        if unet:
            layers = _diffusers_layers_per_block(unet, base)
            up_attn = {int(m.split(".")[1]) for m in unet if m.startswith("up_blocks.") and ".attentions." in m}
            for module, ref in unet.items():
                ldm = diffusers_to_ldm_unet(module, layers, up_attn)
                if ldm is not None:
                    yield "unet." + ldm, ref
        return
    if base.layout != "sd-single-file":
        return
    unet_prefix = "model.diffusion_model."
    ldm_modules = {m[len(unet_prefix):]: ref for m, ref in real.items() if m.startswith(unet_prefix)}
    if ldm_modules:
        ldm_layers = _ldm_layers_per_block(ldm_modules)
        for module, ref in ldm_modules.items():
            yield "unet." + module, ref
            diffusers = ldm_to_diffusers_unet(module, ldm_layers) if ldm_layers else None
            if diffusers is not None:
                yield "unet." + diffusers, ref
    for module, ref in real.items():
        for prefix, component in (("cond_stage_model.transformer.", "text_encoder."),
                                  ("conditioner.embedders.0.transformer.", "text_encoder.")):
            if module.startswith(prefix):
                rest = module[len(prefix):]
                if not rest.startswith("text_model."):
                    rest = "text_model." + rest
                yield component + rest, ref
        for prefix, component in (("conditioner.embedders.1.model.", "text_encoder_2."),
                                  ("conditioner.embedders.0.model.", "text_encoder_2."),
                                  ("cond_stage_model.model.", "text_encoder.")):
            if module.startswith(prefix):
                for alias, alias_ref in _open_clip_aliases(module[len(prefix):], ref, base):
                    yield component + alias, alias_ref
    # OpenCLIP positional embedding is a bare parameter (no ".weight")
    for prefix, component in (("conditioner.embedders.1.model.", "text_encoder_2."),
                              ("cond_stage_model.model.", "text_encoder.")):
        name = prefix + "positional_embedding"
        if name in base.tensors:
            yield component + "text_model.embeddings.position_embedding", ModuleRef(name, name)


_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "attn.out_proj": "self_attn.out_proj"}


def _open_clip_aliases(module: str, ref: ModuleRef, base: "BaseModel") -> Iterable[tuple[str, ModuleRef]]:
    if module == "token_embedding":
        yield "text_model.embeddings.token_embedding", ref
        return
    if module == "ln_final":
        yield "text_model.final_layer_norm", ref
        return
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", module)
    if not match:
        return
    layer, rest = match.groups()
    head = f"text_model.encoder.layers.{layer}."
    if rest == "attn":  # fused in_proj: q, k, v are row blocks
        shape = base.shape(ref.weight)
        if shape and shape[0] % 3 == 0:
            d = shape[0] // 3
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                yield head + "self_attn." + name, ModuleRef(head + "self_attn." + name, ref.weight, ref.bias,
                                                            (i * d, (i + 1) * d))
        return
    if rest in _OPEN_CLIP_LAYER:
        yield head + _OPEN_CLIP_LAYER[rest], ref


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_FROM_LDM = {v: k for k, v in _RESNET_TO_LDM.items()}
_UNET_SIMPLE = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_SIMPLE_FROM_LDM = {v: k for k, v in _UNET_SIMPLE.items()}


def _diffusers_layers_per_block(unet: dict, base: "BaseModel") -> int:
    config = (base.config or {}).get("unet") if isinstance(base.config, dict) else None
    if isinstance(config, dict) and isinstance(config.get("layers_per_block"), int):
        return config["layers_per_block"]
    resnets = [int(m.split(".")[3]) for m in unet if re.match(r"down_blocks\.0\.resnets\.\d+\.", m)]
    return max(resnets) + 1 if resnets else 2


def _ldm_layers_per_block(ldm: dict) -> int | None:
    ops = sorted(int(m.split(".")[1]) for m in ldm if re.fullmatch(r"input_blocks\.\d+\.0\.op", m))
    return ops[0] - 1 if ops else None


def _map_prefix(path: str, table: dict[str, str]) -> str | None:
    """`path` with its leading module name (a key of `table`, up to a '.') replaced; None if none matches."""
    for key, value in table.items():
        if path == key or path.startswith(key + "."):
            return value + path[len(key):]
    return None


def _map_resnet(rest: str, table: dict[str, str]) -> str | None:
    """Map the part of a module path inside a resnet ('' for the block itself)."""
    if not rest:
        return ""
    mapped = _map_prefix(rest[1:], table)
    return None if mapped is None else "." + mapped


def diffusers_to_ldm_unet(path: str, layers: int, up_attn: set[int]) -> str | None:
    """A diffusers UNet2DConditionModel module path in LDM/SGM naming (None if not covered)."""
    simple = _map_prefix(path, _UNET_SIMPLE)
    if simple is not None:
        return simple
    step = layers + 1
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)((?:\..*)?)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * step + j + 1
        if kind == "attentions":
            return f"input_blocks.{n}.1{rest}"
        mapped = _map_resnet(rest, _RESNET_TO_LDM)
        return None if mapped is None else f"input_blocks.{n}.0{mapped}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv((?:\..*)?)", path)
    if m:
        return f"input_blocks.{int(m[1]) * step + layers + 1}.0.op{m[2]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)((?:\..*)?)", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1{rest}"
        mapped = _map_resnet(rest, _RESNET_TO_LDM)
        return None if mapped is None else f"middle_block.{2 * j}{mapped}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)((?:\..*)?)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * step + j
        if kind == "attentions":
            return f"output_blocks.{n}.1{rest}"
        mapped = _map_resnet(rest, _RESNET_TO_LDM)
        return None if mapped is None else f"output_blocks.{n}.0{mapped}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv((?:\..*)?)", path)
    if m:
        i = int(m[1])
        return f"output_blocks.{i * step + layers}.{2 if i in up_attn else 1}.conv{m[2]}"
    return None


def ldm_to_diffusers_unet(path: str, layers: int) -> str | None:
    """An LDM/SGM UNet module path (without `model.diffusion_model.`) in diffusers naming."""
    simple = _map_prefix(path, _UNET_SIMPLE_FROM_LDM)
    if simple is not None:
        return simple
    step = layers + 1
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)((?:\..*)?)", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None
        i, j = divmod(n - 1, step)
        if j == layers:
            if sub == 0 and (rest == ".op" or rest.startswith(".op.")):
                return f"down_blocks.{i}.downsamplers.0.conv{rest[3:]}"
            return None
        if sub == 1:
            return f"down_blocks.{i}.attentions.{j}{rest}"
        mapped = _map_resnet(rest, _RESNET_FROM_LDM) if sub == 0 else None
        return None if mapped is None else f"down_blocks.{i}.resnets.{j}{mapped}"
    m = re.fullmatch(r"middle_block\.(\d+)((?:\..*)?)", path)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub == 1:
            return f"mid_block.attentions.0{rest}"
        mapped = _map_resnet(rest, _RESNET_FROM_LDM)
        return None if mapped is None or sub not in (0, 2) else f"mid_block.resnets.{sub // 2}{mapped}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)((?:\..*)?)", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, step)
        if sub == 0:
            mapped = _map_resnet(rest, _RESNET_FROM_LDM)
            return None if mapped is None else f"up_blocks.{i}.resnets.{j}{mapped}"
        if rest == ".conv" or rest.startswith(".conv."):
            return f"up_blocks.{i}.upsamplers.0.conv{rest[5:]}" if j == layers else None
        if sub == 1:
            return f"up_blocks.{i}.attentions.{j}{rest}"
        return None
    return None


# ---------------------------------------------------------------------------------------------
# which model an adapter's names belong to (blend refuses adapters of different models)

DENOISERS = ("unet", "transformer", "prior", "decoder")
# the first segment of a denoiser's module path: which denoiser it is (kohya names Flux's and SD3's
# transformer `lora_unet_…` too) and whose naming it uses
_DENOISER_HEADS = {
    **dict.fromkeys(("down_blocks", "mid_block", "up_blocks", "time_embedding", "add_embedding"),
                    ("unet", "diffusers")),
    **dict.fromkeys(("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb"), ("unet", "SGM")),
    **dict.fromkeys(("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                     "time_text_embed"), ("transformer", "diffusers")),
    **dict.fromkeys(("double_blocks", "single_blocks", "img_in", "txt_in", "vector_in", "guidance_in"),
                    ("transformer", "BFL")),
    "joint_blocks": ("transformer", "SAI"),
}
# kohya's `ss_base_model_version` and modelspec's `modelspec.architecture`, as one family name
_FAMILY_PATTERNS = (
    (r"^sdxl|stable-diffusion-xl", "SDXL"), (r"^sd_v1|stable-diffusion-v1", "SD 1.x"),
    (r"^sd_v2|stable-diffusion-v2", "SD 2.x"), (r"^sd3|stable-diffusion-3", "SD 3"), (r"flux", "Flux"),
)


@dataclass
class ModelEvidence:
    """What an adapter's names and metadata say about the model it was trained on."""

    components: set[str] = field(default_factory=set)  # diffusers components; "" for a transformers model
    denoisers: set[str] = field(default_factory=set)  # "unet" | "transformer" (DiT) | "prior" | "decoder"
    naming: dict[str, set[str]] = field(default_factory=dict)  # denoiser -> {"diffusers", "SGM", "BFL", ...}
    blocks: set[str] = field(default_factory=set)  # repeated-block containers of a model's paths: "model.layers.#"
    family: str | None = None  # from kohya / modelspec metadata: "SDXL", "SD 1.x", ...
    canonical: dict[str, str] = field(default_factory=dict)  # component-qualified name -> target as named

    @property
    def domains(self) -> set[str]:
        return {"a transformers model" if c == "" else "a diffusers pipeline" for c in self.components}


def _family(metadata: dict[str, str]) -> str | None:
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = str(metadata.get(key) or "").lower()
        for pattern, name in _FAMILY_PATTERNS:
            if value and re.search(pattern, value):
                return name
    return None


def model_evidence(adapter: "Adapter") -> ModelEvidence:
    """The model family evidence of an adapter: its diffusers components (declared, or inferred from bare
    UNet/transformer/text-model paths), the block containers of transformers-model paths, the UNet's
    naming, the family its metadata names."""
    from .formats.common import component_of, infer_component

    evidence = ModelEvidence(family=_family(adapter.metadata))
    for target in list(adapter.layers) + list(adapter.other_modules):
        component = component_of(target) if adapter.has_components else infer_component(target)
        rest = target[len(component) + 1:] if adapter.has_components and component else target
        evidence.canonical[f"{component or ''}:{rest}"] = target
        if component:
            evidence.components.add(component)
            if component in DENOISERS:
                denoiser, style = _DENOISER_HEADS.get(rest.split(".", 1)[0], (component, None))
                evidence.denoisers.add(denoiser)
                if style is not None:
                    evidence.naming.setdefault(denoiser, set()).add(style)
            continue
        evidence.components.add("")
        parts = target.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index:  # the container of repeated blocks: model.layers.#, transformer.h.#, encoder.block.#
            evidence.blocks.add(".".join(parts[:index]) + ".#")
    return evidence


def different_models(a: ModelEvidence, b: ModelEvidence, same_base: bool = False) -> str | None:
    """Why two adapters cannot be for the same model, or None when nothing says so. Adapters of one base
    may adapt different subsets of its modules; the evidence must contradict, not merely differ.
    `same_base`: both name the same base model, which outweighs disjoint block containers (a VLM's
    language model and its vision tower)."""
    if a.domains and b.domains and not a.domains & b.domains:
        return f"{' / '.join(sorted(a.domains))} vs {' / '.join(sorted(b.domains))}"
    if a.denoisers and b.denoisers and not a.denoisers & b.denoisers:
        return f"a {'/'.join(sorted(a.denoisers))} vs a {'/'.join(sorted(b.denoisers))}"
    if a.blocks and b.blocks and not a.blocks & b.blocks and not same_base:
        return f"modules under {', '.join(sorted(a.blocks))} vs {', '.join(sorted(b.blocks))}"
    for denoiser in sorted(set(a.naming) & set(b.naming)):
        if not a.naming[denoiser] & b.naming[denoiser]:
            return (f"{denoiser} modules named {'/'.join(sorted(a.naming[denoiser]))}-style vs "
                    f"{'/'.join(sorted(b.naming[denoiser]))}-style: not one model's names")
    return None


def renamed_modules(a: ModelEvidence, b: ModelEvidence) -> tuple[str, str] | None:
    """One module that two adapters name differently (`unet.down_blocks…` and a bare `down_blocks…`), or
    None: blending them would keep both names, as two modules."""
    for key, name in a.canonical.items():
        other = b.canonical.get(key)
        if other is not None and other != name:
            return name, other
    return None

