"""Readers and writers, one module per on-disk format; nothing outside this package knows a key name.

    load_adapter(path, format=None, allow_pickle=False) -> Adapter
    save_adapter(adapter, out, format=None) -> Path
"""
from __future__ import annotations

from pathlib import Path

from ..adapter import Adapter
from ..errors import LorahubError
from ..storage import is_pickle_path
from . import diffusers, kohya, peft
from .common import TensorSource

FORMATS = ("peft", "kohya", "diffusers")
READ_FORMATS = FORMATS + ("lycoris",)


def _format_from_keys(file: Path, keys: list[str]) -> str:
    if kohya.looks_like(keys):
        return "lycoris" if kohya.lycoris_keys(keys) else "kohya"
    if diffusers.looks_like(keys):
        if all(k.startswith(peft.PREFIX) for k in keys):
            return "peft-file"
        return "diffusers"
    if not keys:
        raise LorahubError("no tensors in file", path=file)
    sample = ", ".join(keys[:3])
    raise LorahubError(f"unknown adapter format: no LoRA tensors (lora_A/lora_B, lora_down/lora_up, "
                       f"hada_*, lokr_*) among {len(keys)} keys (e.g. {sample})", path=file)


def _single_file(path: Path) -> Path:
    if not path.exists():
        raise LorahubError("no such file or directory", path=path)
    if path.is_file():
        return path
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if not candidates:
        pickles = sorted(p.name for p in path.iterdir() if p.is_file() and is_pickle_path(p))
        if pickles:  # reading it says whether --allow-pickle is needed
            return path / pickles[0]
        raise LorahubError("no adapter here: no adapter_config.json and no .safetensors file", path=path)
    if len(candidates) > 1:
        preferred = [p for p in candidates if p.name == diffusers.DEFAULT_FILE]
        if preferred:
            return preferred[0]
        raise LorahubError(f"several .safetensors files ({', '.join(p.name for p in candidates)}); "
                           f"name the one to use", path=path)
    return candidates[0]


def load_adapter(path: Path | str, format: str | None = None, *, allow_pickle: bool = False) -> Adapter:
    """Read an adapter from a PEFT directory or a kohya/diffusers/LyCORIS file (format auto-detected)."""
    path = Path(path)
    if not path.exists():
        raise LorahubError("no such file or directory", path=path)
    if format in (None, "auto"):
        if peft.detect(path):
            return peft.read(path, allow_pickle=allow_pickle)
        file = _single_file(path)
        source = TensorSource(file, allow_pickle=allow_pickle)
        detected = _format_from_keys(file, source.keys())
        if detected in ("kohya", "lycoris"):
            return kohya.read(file, source=source)
        adapter = diffusers.read(file, source=source)
        if detected == "peft-file":  # PEFT weights without their config: keys minus the prefix
            _strip_peft_prefix(adapter)
        return adapter
    if format == "peft":
        if not peft.detect(path):
            raise LorahubError(f"not a PEFT adapter: no {peft.CONFIG} here", path=path)
        return peft.read(path, allow_pickle=allow_pickle)
    if format in ("kohya", "lycoris"):
        return kohya.read(_single_file(path), allow_pickle=allow_pickle)
    if format == "diffusers":
        return diffusers.read(_single_file(path), allow_pickle=allow_pickle)
    raise LorahubError(f"unknown format '{format}' (choose from {', '.join(READ_FORMATS)})")


def _strip_peft_prefix(adapter: Adapter) -> None:
    adapter.format = "peft"
    renamed = {}
    for target, layer in adapter.layers.items():
        layer.target = target[len(peft.PREFIX):] if target.startswith(peft.PREFIX) else target
        renamed[layer.target] = layer
    adapter.layers = renamed


def save_adapter(adapter: Adapter, out: Path | str, format: str | None = None) -> Path:
    """Write `adapter` at `out` (a directory for PEFT, a file otherwise), atomically."""
    from ..storage import atomic_path

    format = format or (adapter.format if adapter.format in FORMATS else "peft")
    if format not in FORMATS:
        raise LorahubError(f"cannot write format '{format}' (choose from {', '.join(FORMATS)})")
    out = Path(out)
    writer = {"peft": peft.write, "kohya": kohya.write, "diffusers": diffusers.write}[format]
    if format == "peft":
        if out.exists() and not out.is_dir():
            raise LorahubError("output exists and is not a directory (PEFT adapters are directories)", path=out)
        with atomic_path(out, is_dir=True) as tmp:
            writer(adapter, tmp)
    else:
        if out.suffix != ".safetensors":
            if out.is_dir():
                out = out / (diffusers.DEFAULT_FILE if format == "diffusers" else "adapter.safetensors")
            else:
                raise LorahubError("output file name must end in .safetensors", path=out)
        with atomic_path(out) as tmp:
            writer(adapter, tmp)
    return out
