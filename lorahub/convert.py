"""Format conversion: read into the one Adapter model, write out in another format."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter import Adapter
from .errors import LorahubError
from .formats import in_readers_naming, save_adapter
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
    adapter, lines = in_readers_naming(adapter, to_format)
    warnings += lines
    if any(layer.use_rslora for layer in adapter.layers.values()) and to_format != "peft":
        warnings.append("rsLoRA scales were re-expressed as alpha = scale·rank (same effective scale)")
    path = save_adapter(adapter, out, to_format, overwrite=overwrite, named=True)
    return {"from": adapter.format, "to": to_format, "out": str(path),
            "modules": len(adapter.layers) + len(adapter.delta_tensors),
            "warnings": warnings}
