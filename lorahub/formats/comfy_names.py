"""ComfyUI's LoRA module names: dotted paths under ComfyUI's model prefixes, read verbatim.

ComfyUI saves and reads LoRAs keyed by its own model's state-dict names (comfy/lora.py
`model_lora_keys_unet` / `model_lora_keys_clip`, LoraSave in comfy_extras/nodes_lora_extract.py):

- `diffusion_model.<path>`: the denoiser in its original layout, `model.diffusion_model.<path>` in a
  checkpoint, `<path>` in a bare diffusion-model file (`flux1-dev.safetensors`);
- `text_encoders.<clip>.transformer.<path>`: text encoder `<clip>` (`clip_l`, `clip_g`, `clip_h`,
  `t5xxl`), `<path>` as transformers names it (`text_model.encoder.layers.0.self_attn.q_proj`).

A name table, not a format: kohya and diffusers-style files use these names with their own suffixes
(`.lora_down.weight` / `.lora_A.weight`, `.alpha`); their readers keep the dotted path as the target,
`lorahub.names` looks it up in a base under the names below, and the kohya writer names it as kohya
and ComfyUI do (`lora_unet_<path>`, `lora_te_…`).
"""
from __future__ import annotations

from typing import Iterable

from ..errors import LorahubError

DENOISER = "diffusion_model."
TEXT_ENCODERS = "text_encoders."
# the heads of original-layout denoiser paths that lorahub's readers name without ComfyUI's prefix
# (XLabs Flux LoRAs: `double_blocks.0.img_attn.qkv`)
ORIGINAL_DENOISER_HEADS = ("double_blocks", "single_blocks")
# ComfyUI's text-encoder names -> the diffusers components that hold them (in the order to try) and
# the kohya prefix both kohya's scripts and ComfyUI use for them (CLIP-L: `lora_te_`, or `lora_te1_`
# beside another text encoder)
_TEXT_ENCODERS: dict[str, tuple[tuple[str, ...], str]] = {
    "clip_l": (("text_encoder",), "lora_te1_"),
    "clip_h": (("text_encoder",), "lora_te1_"),
    "clip_g": (("text_encoder_2",), "lora_te2_"),
    "t5xxl": (("text_encoder_3", "text_encoder_2"), "lora_te3_"),
}


def is_comfy_name(target: str) -> bool:
    """A module path under ComfyUI's model prefixes (`diffusion_model.…`, `text_encoders.…`)."""
    return target.startswith((DENOISER, TEXT_ENCODERS))


_KOHYA_HEADS = ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def dotted_name_problem(module: str) -> str | None:
    """Why a dotted module name (ComfyUI's `diffusion_model.<path>`, read verbatim) is no module path,
    or None: an empty segment (`diffusion_model..x`, a trailing dot) or a kohya-flattened name inside
    it (`diffusion_model.lora_unet_…`). Either would be written back as a name no reader loads."""
    parts = module.split(".")
    if not all(parts):
        return "has an empty path segment"
    kohya = next((part for part in parts if part.startswith(_KOHYA_HEADS)), None) if len(parts) > 1 else None
    if kohya is not None:
        return f"holds the kohya name '{kohya}' inside a dotted path"
    return None


def _text_encoder(target: str) -> tuple[str, str] | None:
    """(ComfyUI's text-encoder name, the path inside it) of `text_encoders.<clip>.transformer.<path>`."""
    if not target.startswith(TEXT_ENCODERS):
        return None
    clip, _, rest = target[len(TEXT_ENCODERS):].partition(".")
    if not rest.startswith("transformer."):
        return None
    return clip, rest[len("transformer."):]


def comfy_base_candidates(target: str) -> list[str]:
    """The module names a ComfyUI-named target may have in a base, in the order to try: ComfyUI's own
    checkpoints, original single files, diffusers-named aliases (`unet.`, `text_encoder.`, …)."""
    if target.startswith(DENOISER):
        path = target[len(DENOISER):]
        return [f"model.{target}", path, f"unet.{path}", f"transformer.{path}"]
    if target.split(".", 1)[0] in ORIGINAL_DENOISER_HEADS:
        return [f"model.{DENOISER}{target}", f"transformer.{target}"]
    encoder = _text_encoder(target)
    if encoder is None:
        return []
    clip, path = encoder
    components = _TEXT_ENCODERS.get(clip, ((),))[0]
    return [f"{component}.{path}" for component in components]


def comfy_kohya_name(target: str, targets: Iterable[str]) -> str | None:
    """The kohya module name of a ComfyUI-named (or bare original-layout denoiser) target, as kohya's
    scripts and ComfyUI name it: `lora_unet_double_blocks_0_img_attn_qkv`, `lora_te_text_model_…`
    (`lora_te1_` beside another text encoder), `lora_te2_…` (CLIP-G), `lora_te3_…` (T5-XXL). None for
    other targets; a text encoder kohya has no prefix for is refused (a name no reader knows is a
    file that loads as nothing)."""
    if target.startswith(DENOISER):
        return "lora_unet_" + target[len(DENOISER):].replace(".", "_")
    if target.split(".", 1)[0] in ORIGINAL_DENOISER_HEADS:
        return "lora_unet_" + target.replace(".", "_")
    encoder = _text_encoder(target)
    if encoder is None:
        if target.startswith(TEXT_ENCODERS):
            raise LorahubError(f"no kohya name for '{target}': ComfyUI text-encoder names are "
                               "text_encoders.<clip_l|clip_g|clip_h|t5xxl>.transformer.<path>")
        return None
    clip, path = encoder
    if clip not in _TEXT_ENCODERS:
        raise LorahubError(f"no kohya prefix for ComfyUI text encoder '{clip}' (module '{target}'); kohya names "
                           f"{', '.join(_TEXT_ENCODERS)}: use --to diffusers or --to peft")
    prefix = _TEXT_ENCODERS[clip][1]
    if prefix == "lora_te1_":
        others = {found[0] for other in targets if (found := _text_encoder(other)) is not None} - {clip}
        prefix = "lora_te1_" if others else "lora_te_"
    return prefix + path.replace(".", "_")
