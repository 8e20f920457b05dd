"""XLabs Flux LoRAs (XLabs-AI/x-flux): one .safetensors file of attention-processor LoRAs.

Keys `double_blocks.<N>.processor.<lora>.down.weight` / `.up.weight` (optionally under
`diffusion_model.`), as x-flux's `DoubleStreamBlockLoraProcessor` / `SingleStreamBlockLoraProcessor`
save them. Each processor LoRA adds `up(down(x))` to one projection of the original (BFL) Flux block,
so each is a LoRA of one original-layout module:

| processor LoRA | adds to | original module |
| --- | --- | --- |
| `double_blocks.N…qkv_lora1` | `img_attn.qkv(x)` | `double_blocks.N.img_attn.qkv` |
| `double_blocks.N…proj_lora1` | `img_attn.proj(x)` (before the gate) | `double_blocks.N.img_attn.proj` |
| `double_blocks.N…qkv_lora2` | `txt_attn.qkv(x)` | `double_blocks.N.txt_attn.qkv` |
| `double_blocks.N…proj_lora2` | `txt_attn.proj(x)` | `double_blocks.N.txt_attn.proj` |
| `single_blocks.N…qkv_lora` | the q/k/v rows (first 3·dim) of `linear1` | `single_blocks.N.linear1` |
| `single_blocks.N…proj_lora` | `linear2(cat(attn, mlp))` | `single_blocks.N.linear2` |

The scale is 1: x-flux's `LoRALinearLayer` multiplies by `network_alpha / rank` only when a
`network_alpha` is given, its training scripts give none, and the files store none (diffusers'
`_convert_xlabs_flux_lora_to_diffusers` reads them at scale 1 too); x-flux's `lora_weight` is the
strength chosen at inference. A single block's `qkv_lora` adapts only the q/k/v rows of `linear1`:
its up factor is read with zero rows for the MLP part (the MLP width from the block's `proj_lora`
input, dim + mlp, or Flux's 4·dim), so ΔW is exactly the file's, in `linear1`'s full shape. Any other
key (an `.alpha`, another processor) is refused, naming it: nothing in the file is dropped silently.

Read-only: `convert --to kohya` writes these layers under kohya's Flux names
(`lora_unet_double_blocks_0_img_attn_qkv`), which kohya's scripts, ComfyUI and diffusers read.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..adapter import Adapter, LazyTensor, LoraLayer
from ..errors import LorahubError
from ..lazy import torch
from .common import TensorSource, check_pair, missing_partner
from .spec import Format

NAME = "xlabs"
_KEY = re.compile(r"(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\."
                  r"(qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight")
# (block kind, processor LoRA) -> the original-layout module it adapts (inside the block)
_MODULES = {
    ("double_blocks", "qkv_lora1"): "img_attn.qkv", ("double_blocks", "proj_lora1"): "img_attn.proj",
    ("double_blocks", "qkv_lora2"): "txt_attn.qkv", ("double_blocks", "proj_lora2"): "txt_attn.proj",
    ("single_blocks", "qkv_lora"): "linear1", ("single_blocks", "proj_lora"): "linear2",
}
_FLUX_MLP_RATIO = 4  # every Flux.1 model (dev, schnell, Kontext): mlp_hidden_dim = 4 · hidden_size


def looks_like(keys: list[str]) -> bool:
    return any(".processor." in key and _KEY.fullmatch(key) for key in keys)


class _RowPadded(LazyTensor):
    """An up factor read with zero rows below it: a LoRA of the first rows of a fused weight, as a LoRA
    of the whole weight (ΔW's other rows are exactly zero)."""

    __slots__ = ("inner",)

    def __init__(self, inner: LazyTensor, rows: int):
        super().__init__(key=inner.key, shape=(rows, *inner.shape[1:]), dtype=inner.dtype)
        self.inner = inner

    def load(self) -> torch.Tensor:
        up = self.inner.load()
        padding = up.new_zeros((self.shape[0] - up.shape[0], *up.shape[1:]))
        return torch.cat([up, padding])


def read(path: Path, *, allow_pickle: bool = False, source: TensorSource | None = None) -> Adapter:
    source = source or TensorSource(path, allow_pickle=allow_pickle)
    groups: dict[tuple[str, int, str], dict[str, str]] = {}
    for key in source.keys():
        match = _KEY.fullmatch(key)
        if match is None or (match[1], match[3]) not in _MODULES:
            raise LorahubError(f"'{key}' is not an XLabs Flux LoRA key (<double|single>_blocks.N.processor."
                               "<qkv|proj>_lora[1|2].<down|up>.weight); refusing to drop it", path=path)
        groups.setdefault((match[1], int(match[2]), match[3]), {})[match[4]] = key
    adapter = Adapter(path=path, format=NAME, metadata=source.metadata, files=[path],
                      base_model=source.metadata.get("lorahub.base_model") or "flux.1")
    mlp_width: dict[int, tuple[int, str]] = {}  # single block -> (dim + mlp: its linear2's input, proj_lora down key)
    for (kind, block, lora), keys in groups.items():
        if kind == "single_blocks" and lora == "proj_lora" and "down" in keys:
            mlp_width[block] = (source.lazy(keys["down"]).shape[1], keys["down"])
    for (kind, block, lora), keys in sorted(groups.items()):
        if "down" not in keys or "up" not in keys:
            present = keys.get("down") or keys.get("up") or ""
            raise missing_partner(path, present, present.rsplit(".", 2)[0] +
                                  (".up.weight" if "down" in keys else ".down.weight"))
        module = f"{kind}.{block}.processor.{lora}"
        down, up = source.lazy(keys["down"]), source.lazy(keys["up"])
        rank = check_pair(path, module, keys["down"], keys["up"], down, up)
        if kind == "single_blocks" and lora == "qkv_lora":
            dim = down.shape[1]
            if up.shape[0] != 3 * dim:
                raise LorahubError(f"'{keys['up']}' has {up.shape[0]} rows; an XLabs single-block qkv LoRA has "
                                   f"3·{dim} (q, k, v of width {dim})", path=path)
            width, proj = mlp_width.get(block) or next(iter(mlp_width.values()), None) or \
                ((1 + _FLUX_MLP_RATIO) * dim, "")
            if width <= dim:  # linear2's input is cat(attn of width dim, mlp): the MLP rows would be ≤ 0
                raise LorahubError(f"'{proj}' has {width} input features; a single block's proj_lora reads "
                                   f"cat(attention, MLP), more than the {dim} of its qkv_lora", path=path)
            up = _RowPadded(up, 3 * dim + (width - dim))
        target = f"{kind}.{block}.{_MODULES[kind, lora]}"
        # scale 1: no network_alpha in the file (see the module docstring)
        adapter.layers[target] = LoraLayer(target=target, kind="linear", A=down, B=up, alpha=float(rank),
                                           rank=rank, source_key=module)
    return adapter


FORMATS = (Format(
    name=NAME, summary="XLabs Flux LoRA (x-flux): `double_blocks.N.processor.qkv_lora1.down.weight`, "
    "`proj_lora1`, `qkv_lora2`, `proj_lora2`, single-block `qkv_lora`/`proj_lora`; read as original-layout "
    "Flux modules at scale 1", read=read, detect_keys=looks_like, detect_priority=15),)
