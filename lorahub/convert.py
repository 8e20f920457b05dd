"""Format conversion: read into the one Adapter model, write out in another format."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter import Adapter
from .errors import LorahubError
from .formats import save_adapter


def convert_adapter(adapter: Adapter, out: Path | str, to_format: str, *,
                    drop_full_tensors: bool = False) -> dict[str, Any]:
    adapter.require_lora("convert")
    if adapter.is_dora and to_format == "diffusers":
        raise LorahubError("diffusers drops DoRA magnitudes when loading; converting would silently change "
                           "the adapter (use --to peft or --to kohya)", path=adapter.path)
    warnings = []
    if adapter.full_tensors and to_format != "peft":
        if not drop_full_tensors:
            raise LorahubError(f"{to_format} files cannot carry full tensors "
                               f"({', '.join(sorted(adapter.full_tensors))}); pass --drop-full-tensors "
                               f"to leave them out, or convert --to peft", path=adapter.path)
        warnings.append(f"left out {len(adapter.full_tensors)} full tensors: {', '.join(sorted(adapter.full_tensors))}")
        adapter.full_tensors = {}
    if any(layer.use_rslora for layer in adapter.layers.values()) and to_format != "peft":
        warnings.append("rsLoRA scales were re-expressed as alpha = scale·rank (same effective scale)")
    path = save_adapter(adapter, out, to_format)
    return {"from": adapter.format, "to": to_format, "out": str(path), "modules": len(adapter.layers),
            "warnings": warnings}
