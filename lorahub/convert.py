"""Format conversion: read into the one Adapter model, write out in another format."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .adapter import Adapter
from .errors import LorahubError
from .families.convert import to_family_naming
from .formats import save_adapter
from .lycoris import lycoris_for_writing


def convert_adapter(adapter: Adapter, out: Path | str, to_format: str, *, drop_full_tensors: bool = False,
                    overwrite: bool = False) -> dict[str, Any]:
    """Write `adapter` at `out` in `to_format` (under lorahub.output's policy; `overwrite` replaces an
    earlier lorahub output)."""
    adapter.require_lora("convert")
    lycoris_warnings = lycoris_for_writing(adapter, "convert")
    if not (adapter.layers or adapter.delta_tensors):
        raise LorahubError("no LoRA modules to convert", path=adapter.path)
    if adapter.is_dora and to_format == "diffusers":
        raise LorahubError("diffusers drops DoRA magnitudes when loading; converting would silently change "
                           "the adapter (use --to peft or --to kohya)", path=adapter.path)
    warnings = list(adapter.warnings) + lycoris_warnings
    if adapter.full_tensors and to_format != "peft":
        if not drop_full_tensors:
            raise LorahubError(f"{to_format} files cannot carry full tensors "
                               f"({', '.join(sorted(adapter.full_tensors))}); pass --drop-full-tensors "
                               f"to leave them out, or convert --to peft", path=adapter.path)
        warnings.append(f"left out {len(adapter.full_tensors)} full tensors: {', '.join(sorted(adapter.full_tensors))}")
        adapter.full_tensors = {}
    adapter, family_line = to_family_naming(adapter, to_format)
    if family_line:
        warnings.append(family_line)
    if to_format != "kohya" and _sgm_unet_targets(adapter):
        renamed = _sgm_unet_to_diffusers(adapter)
        warnings.append(f"renamed {renamed} SDXL UNet modules from kohya's SGM layout (input_blocks, "
                        f"middle_block, output_blocks) to diffusers names")
    if any(layer.use_rslora for layer in adapter.layers.values()) and to_format != "peft":
        warnings.append("rsLoRA scales were re-expressed as alpha = scale·rank (same effective scale)")
    path = save_adapter(adapter, out, to_format, overwrite=overwrite)
    return {"from": adapter.format, "to": to_format, "out": str(path),
            "modules": len(adapter.layers) + len(adapter.delta_tensors),
            "warnings": warnings}


# kohya trains SDXL on its own SGM UNet and names modules `input_blocks.4.1...`; PEFT and diffusers
# files must use diffusers' `down_blocks.1.attentions.0...` or nothing loads them
_SGM_PREFIXES = ("unet.input_blocks.", "unet.middle_block.", "unet.output_blocks.", "unet.time_embed.",
                 "unet.label_emb.", "unet.out.")
SDXL_LAYERS_PER_BLOCK = 2  # the only kohya family with SGM UNet names is SDXL


def _sgm_unet_targets(adapter: Adapter) -> list[str]:
    return [target for target in adapter.layers if target.startswith(_SGM_PREFIXES)]


def _sgm_unet_to_diffusers(adapter: Adapter) -> int:
    from .names import ldm_to_diffusers_unet

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
    adapter.layers = layers
    return renamed
