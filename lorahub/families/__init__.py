"""Model families whose original checkpoints and diffusers folders name modules differently.

Flux (`double_blocks.N.img_attn.qkv` ↔ `transformer_blocks.N.attn.to_q|to_k|to_v`), Wan
(`blocks.N.self_attn.q` ↔ `blocks.N.attn1.to_q`), HunyuanVideo, SD3/SD3.5, LTX-Video, and Qwen-Image
(one naming). The tables are in `tables`; this module says which family and naming a list of module
names belongs to (`detect`, `detect_flat` for kohya's underscore-flattened names), and re-expresses an
adapter in another naming (`align_to_base`, `to_naming`: fused ↔ split exactly, see `transform`).

Nothing here knows an adapter file's key names: the kohya reader strips its prefixes before asking.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from .spec import DIFFUSERS, NAMINGS, ORIGINAL, Family, Match
from .tables import FAMILIES

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..base import BaseModel

# prefixes in front of a denoiser's module names: diffusers' component, ComfyUI / single-file checkpoints,
# what older lorahub versions gave kohya transformer files
PREFIXES = ("transformer.", "model.diffusion_model.", "diffusion_model.", "unet.", "")
# what training metadata (kohya's ss_base_model_version, modelspec.architecture, lorahub.base_model) says
_META = ((r"flux", "flux"), (r"\bwan|wan2", "wan"), (r"hunyuan", "hunyuan-video"), (r"qwen", "qwen-image"),
         (r"sd3|stable-diffusion-3", "sd3"), (r"ltx", "ltx-video"))
_META_KEYS = ("ss_base_model_version", "modelspec.architecture", "ss_architecture", "lorahub.base_model",
              "ss_sd_model_name")


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def _named_bases(metadata: dict[str, str]) -> list[str]:
    """`base_model_name_or_path` of the LoraConfigs diffusers stores in `lora_adapter_metadata`."""
    import json

    try:
        configs = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except (ValueError, RecursionError):
        return []
    if not isinstance(configs, dict):
        return []
    return [str(v) for k, v in configs.items() if str(k).endswith("base_model_name_or_path") and v]


def metadata_family(metadata: dict[str, str] | None, base_model: str | None = None) -> str | None:
    """The family that training metadata or the adapter's base model name says, or None."""
    metadata = metadata or {}
    values = [metadata.get(key) for key in _META_KEYS] + [base_model] + _named_bases(metadata)
    for raw in values:
        value = str(raw or "").lower()
        for pattern, name in _META:
            if value and re.search(pattern, value):
                return name
    return None


@dataclass
class Detected:
    """Which family and naming a set of module names belongs to."""

    family: Family
    naming: str
    hits: int  # names that fit the family's table in this naming
    total: int  # names looked at
    prefix: str = ""  # the prefix in front of the family's names (`transformer.`, `model.diffusion_model.`)
    matches: dict[str, Match] = field(default_factory=dict)  # name as given -> its table row
    others: list[tuple[Family, str, int]] = field(default_factory=list)  # the runners-up that fit as well

    @property
    def label(self) -> str:
        return f"{self.family.label} ({self.family.naming_label(self.naming)} names)"

    @property
    def ambiguous(self) -> bool:
        return any(hits == self.hits and family is not self.family for family, _, hits in self.others)


def _strip(name: str) -> list[tuple[str, str]]:
    return [(prefix, name[len(prefix):]) for prefix in PREFIXES if name.startswith(prefix) and len(name) > len(prefix)]


def _score(family: Family, naming: str, names: list[str]) -> tuple[int, int, dict[str, Match], str]:
    hits, marked = 0, 0
    matches: dict[str, Match] = {}
    prefixes: Counter = Counter()
    for name in names:
        for prefix, rest in _strip(name):
            match = family.lookup(rest, naming)
            if match is not None:
                hits += 1
                marked += family.marked(rest)
                matches[name] = match
                prefixes[prefix] += 1
                break
    prefix = prefixes.most_common(1)[0][0] if prefixes else ""
    return hits, marked, matches, prefix


def detect(names: Iterable[str], metadata: dict[str, str] | None = None,
           only: Family | None = None, base_model: str | None = None) -> Detected | None:
    """The family and naming that explain the most of `names` (dotted module paths, with or without a
    prefix), or None when no family explains any. Ties go to the family the metadata names, then to
    the naming with more distinctive modules, then to the table order."""
    names = list(names)
    hinted = metadata_family(metadata, base_model)
    ranked = []
    for order, family in enumerate(FAMILIES if only is None else (only,)):
        for naming in NAMINGS:
            hits, marked, matches, prefix = _score(family, naming, names)
            if hits:
                key = (hits, family.name == hinted, marked, naming == DIFFUSERS, -order)
                ranked.append((key, family, naming, hits, matches, prefix))
    if not ranked:
        return None
    ranked.sort(key=lambda item: item[0], reverse=True)
    _, family, naming, hits, matches, prefix = ranked[0]
    # another family whose names fit as many modules, with no metadata or marker to tell them apart
    others = [(f, n, h) for key, f, n, h, _, _ in ranked[1:]
              if f is not family and key[:3] == ranked[0][0][:3]]
    return Detected(family, naming, hits, len(names), prefix, matches, others)


def detect_flat(flat_names: Iterable[str], metadata: dict[str, str] | None = None) -> Detected | None:
    """`detect` for kohya's underscore-flattened names (kohya's module prefix stripped): the
    matches give each name's dotted form in the family's table."""
    names = [name for name in flat_names if name.startswith(_ALL_FLAT_HEADS)]
    hinted = metadata_family(metadata)
    ranked = []
    for order, family in enumerate(FAMILIES):
        for naming in NAMINGS:
            matches = {}
            for name in names:
                match = family.lookup_flat(name, naming)
                if match is not None:
                    matches[name] = match
            if matches:
                marked = sum(family.marked(m.name) for m in matches.values())
                key = (len(matches), family.name == hinted, marked, naming == family.kohya_naming, -order)
                ranked.append((key, family, naming, matches))
    if not ranked:
        return None
    ranked.sort(key=lambda item: item[0], reverse=True)
    key, family, naming, matches = ranked[0]
    others = [(f, n, len(m)) for k, f, n, m in ranked[1:] if f is not family and k[:3] == key[:3]]
    return Detected(family, naming, len(matches), len(names), "", matches, others)


def denoiser_targets(adapter: "Adapter") -> list[str]:
    """The adapter's module names that may belong to a diffusion transformer (text encoders left out)."""
    return [t for t in adapter.layers if not t.startswith("text_encoder")]


def detect_adapter(adapter: "Adapter", only: Family | None = None) -> Detected | None:
    names = denoiser_targets(adapter)
    candidates = [name for name in names if _may_fit(name)]
    if not candidates:
        return None
    found = detect(candidates, adapter.metadata, only=only, base_model=adapter.base_model)
    if found is not None:
        found.total = len(names)
    return found


_ALL_HEADS = frozenset(head for family in FAMILIES for heads in family.heads.values() for head in heads)


_ALL_FLAT_HEADS = tuple({head for family in FAMILIES for heads in family.flat_heads.values() for head in heads})


def _may_fit(name: str) -> bool:
    """Whether any family's table could hold `name` (its first segment after a known prefix is a head);
    fast, as it runs on every module of a base or an adapter."""
    head, _, rest = name.partition(".")
    if head in _ALL_HEADS:
        return True
    if head in ("transformer", "unet", "diffusion_model"):
        return rest.partition(".")[0] in _ALL_HEADS
    if head == "model" and rest.startswith("diffusion_model."):
        return rest[len("diffusion_model."):].partition(".")[0] in _ALL_HEADS
    return False


def detect_base(base: "BaseModel") -> Detected | None:
    from ..names import base_index

    modules = [m for m in base_index(base).modules if not m.startswith(("text_encoder", "vae.")) and _may_fit(m)]
    found = detect(modules)
    # a base is a whole model: a family it fits must explain a good part of its modules
    if found is None or found.hits < 4:
        return None
    return found


def align_to_base(adapter: "Adapter", base: "BaseModel") -> "Adapter":
    """The adapter in the base's naming when they are one family's two namings (a kohya Flux LoRA and
    a diffusers Flux folder, an ai-toolkit LoRA and `flux1-dev.safetensors`); else the adapter itself."""
    if not adapter.layers:
        return adapter
    on_base = detect_base(base)
    if on_base is None or not on_base.family.has_two_namings():
        return adapter
    mine = detect_adapter(adapter, only=on_base.family)
    if mine is None or mine.naming == on_base.naming:
        return adapter
    from .transform import convert_naming

    return convert_naming(adapter, mine, on_base.naming, on_base.prefix)


def alignment_note(given: "Adapter", aligned: "Adapter", base: "BaseModel") -> str:
    """One line saying which naming the adapter was checked in."""
    found = detect_adapter(given)
    on_base = detect_base(base)
    if found is None or on_base is None:
        return "module names re-expressed in the base's naming"
    family = on_base.family
    return (f"{family.label} modules in {family.naming_label(found.naming)} names checked against the base's "
            f"{family.naming_label(on_base.naming)} names ({len(given.layers)} modules as {len(aligned.layers)})")


def to_naming(adapter: "Adapter", naming: str, *, family: Family | None = None,
              prefix: str = "transformer.") -> tuple["Adapter", Detected | None]:
    """The adapter in `naming` ("original" | "diffusers" | "kohya": the family's kohya naming), its
    denoiser modules under `prefix`; (adapter, None) when no family explains its names."""
    found = detect_adapter(adapter, only=family)
    if found is None:
        return adapter, None
    wanted = found.family.kohya_naming if naming == "kohya" else naming
    from .transform import convert_naming

    return convert_naming(adapter, found, wanted, prefix), found


def common_naming(adapters: Sequence["Adapter"]) -> list["Adapter"]:
    """Adapters of one diffusion transformer in different namings (a kohya Flux file, an ai-toolkit one, a
    ComfyUI one) re-expressed, exactly, in the first one's naming and prefix so that their modules line up
    (blend); unchanged when they are not all one family's or already agree."""
    if len(adapters) < 2:
        return list(adapters)
    found = []
    for adapter in adapters:
        detected = detect_adapter(adapter)
        if detected is None or 2 * detected.hits < len(denoiser_targets(adapter)):
            return list(adapters)
        found.append(detected)
    first = found[0]
    if any(f.family is not first.family for f in found) or \
            all(f.naming == first.naming and f.prefix == first.prefix for f in found):
        return list(adapters)
    return [adapters[0], *(to_naming(adapter, first.naming, family=first.family, prefix=first.prefix)[0]
                           for adapter in adapters[1:])]


__all__ = ["DIFFUSERS", "FAMILIES", "NAMINGS", "ORIGINAL", "Detected", "Family", "align_to_base", "alignment_note",
           "common_naming", "detect",
           "detect_adapter", "detect_base", "detect_flat", "family_named", "metadata_family", "to_naming"]
