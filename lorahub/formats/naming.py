"""The module names a written file's readers load: one step every writer takes (`save_adapter`).

- A diffusion transformer's modules (Flux, SD3, Wan, HunyuanVideo, LTX-Video, Qwen-Image) in the target
  format's naming (`lorahub.families`: diffusers names for diffusers/PEFT, kohya's for kohya; exact
  fused ↔ split re-expression; unchanged when already so).
- kohya's SGM SDXL UNet names (`unet.input_blocks.4.1…`) as diffusers names for diffusers/PEFT files.
- ComfyUI names (`diffusion_model.…`, `text_encoders.…`), which no diffusers or PEFT reader knows, are
  refused for those formats rather than written as a file that loads as nothing.
"""
from __future__ import annotations

import dataclasses

from ..adapter import Adapter
from ..errors import LorahubError
from .comfy_names import is_comfy_name


def in_readers_naming(adapter: Adapter, name: str) -> tuple[Adapter, list[str]]:
    """(`adapter` with the module names format `name`'s readers load, a line per renaming done)."""
    from ..families.convert import to_family_naming

    notes = []
    adapter, line = to_family_naming(adapter, name)
    if line:
        notes.append(line)
    if name != "kohya" and any(target.startswith(_SGM_PREFIXES) for target in adapter.layers):
        adapter, renamed = _sgm_unet_to_diffusers(adapter)
        notes.append(f"renamed {renamed} SDXL UNet modules from kohya's SGM layout (input_blocks, "
                     f"middle_block, output_blocks) to diffusers names")
    comfy = [target for target in adapter.layers if is_comfy_name(target)] if name != "kohya" else []
    if comfy:
        raise LorahubError(f"module '{comfy[0]}' has a ComfyUI name with no {name} equivalent known to lorahub "
                           f"({len(comfy)} such module(s)); write --to kohya, which ComfyUI and diffusers read",
                           path=adapter.path)
    return adapter, notes


# kohya trains SDXL on its own SGM UNet and names modules `input_blocks.4.1...`; PEFT and diffusers
# files must use diffusers' `down_blocks.1.attentions.0...` or nothing loads them
_SGM_PREFIXES = ("unet.input_blocks.", "unet.middle_block.", "unet.output_blocks.", "unet.time_embed.",
                 "unet.label_emb.", "unet.out.")
SDXL_LAYERS_PER_BLOCK = 2  # the only kohya family with SGM UNet names is SDXL


def _sgm_unet_to_diffusers(adapter: Adapter) -> tuple[Adapter, int]:
    from ..names import ldm_to_diffusers_unet

    renamed, layers = 0, {}
    for target, layer in adapter.layers.items():
        if target.startswith(_SGM_PREFIXES):
            mapped = ldm_to_diffusers_unet(target[len("unet."):], SDXL_LAYERS_PER_BLOCK)
            if mapped is None:
                raise LorahubError("no diffusers name for the SGM UNet module "
                                   f"'{layer.source_name or target}'", path=adapter.path)
            layer = dataclasses.replace(layer, target="unet." + mapped)
            renamed += 1
        if layer.target in layers:
            raise LorahubError(f"two modules map to '{layer.target}'", path=adapter.path)
        layers[layer.target] = layer
    return dataclasses.replace(adapter, layers=layers), renamed
