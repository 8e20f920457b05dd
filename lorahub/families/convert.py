"""The naming a converted file must use so that its readers load every module (convert's family step).

`--to diffusers` / `--to peft`: diffusers names under the `transformer` component (what
`load_lora_adapter` matches against the diffusers model); `--to kohya`: the names kohya sd-scripts,
musubi-tuner and ComfyUI use for that model (Flux, Wan, HunyuanVideo, SD3: the original checkpoint's;
Qwen-Image: diffusers'). A module of a detected family that its table does not know is refused: a
file whose modules a peer silently skips is not a conversion.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LorahubError
from . import denoiser_targets, detect_adapter
from .spec import DIFFUSERS
from .transform import convert_naming

if TYPE_CHECKING:
    from ..adapter import Adapter


def to_family_naming(adapter: "Adapter", to_format: str) -> tuple["Adapter", str | None]:
    """(the adapter in the naming `to_format`'s readers expect, a line saying what changed or None)."""
    names = denoiser_targets(adapter)
    found = detect_adapter(adapter)
    if found is None or 2 * found.hits < len(names):
        return adapter, None
    family = found.family
    wanted = family.kohya_naming if to_format == "kohya" else DIFFUSERS
    if wanted == found.naming:  # already what the format's readers load (ComfyUI's `diffusion_model.<original
        return adapter, None    # path>` included: the kohya writer names those itself)
    unknown = [t for t in names if t not in found.matches]
    if unknown:
        layer = adapter.layers[unknown[0]]
        raise LorahubError(f"module '{layer.source_name or layer.target}' is not in {family.label}'s layout "
                           f"({len(unknown)} such module(s)); converting it would write a name that "
                           f"{'kohya/ComfyUI' if to_format == 'kohya' else 'diffusers'} does not load",
                           path=adapter.path)
    if found.ambiguous and wanted != found.naming and any(
            other.kohya_naming != found.family.kohya_naming or other.has_two_namings()
            for other, _, _ in found.others):
        names_fit = ", ".join(sorted({found.family.label, *(other.label for other, _, _ in found.others)}))
        raise LorahubError(f"the module names fit several models ({names_fit}) whose {to_format} names differ; "
                           "nothing in the file says which (add `ss_base_model_version` or "
                           "`modelspec.architecture` metadata)", path=adapter.path)
    converted = convert_naming(adapter, found, wanted, "transformer.")
    before = {layer.target for layer in adapter.layers.values()}
    if set(converted.layers) == before:
        return converted, None
    return converted, (f"{family.label}: {len(found.matches)} module(s) in {family.naming_label(found.naming)} names "
                       f"written as {len(converted.layers) - (len(adapter.layers) - len(found.matches))} "
                       f"{family.naming_label(wanted)}-named module(s) under `transformer.`")
