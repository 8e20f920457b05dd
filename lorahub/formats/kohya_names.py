"""kohya module names: `lora_unet_down_blocks_0_attentions_0_proj_in` <-> `unet.down_blocks.0.attentions.0.proj_in`.

A name table, not a format: the kohya/LyCORIS reader and writer and `lorahub.names` (which resolves
kohya names against a base's real tensor names) share it.
"""
from __future__ import annotations

import re

from .common import COMPONENTS, infer_component

# Module names contain '_' themselves, so a name cannot be split by string replacement; without the
# base model at hand we split with a vocabulary of identifiers that contain '_' (longest first).
# `lorahub validate/merge` resolve names against the base's real tensor names instead.

# the one kohya prefix table: prefix -> (the component it names, the components to try, in order, when
# resolving names against a base; "" = the base's own top level)
KOHYA_PREFIXES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora_unet_": ("unet", ("unet", "transformer", "")),
    "lora_transformer_": ("transformer", ("transformer", "unet", "")),
    "lora_te_": ("text_encoder", ("text_encoder", "")),
    "lora_te1_": ("text_encoder", ("text_encoder", "")),
    "lora_te2_": ("text_encoder_2", ("text_encoder_2", "")),
    "lora_te3_": ("text_encoder_3", ("text_encoder_3", "text_encoder_2", "")),
}
UNDERSCORE_IDENTIFIERS = sorted({
    # transformers LLMs
    "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
    "gate_up_proj", "embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm",
    "block_sparse_moe", "shared_expert", "shared_expert_gate", "dense_h_to_4h", "dense_4h_to_h",
    "query_key_value", "word_embeddings", "c_attn", "c_proj", "c_fc", "self_attention", "out_proj",
    "pre_feedforward_layernorm", "post_feedforward_layernorm",
    # CLIP / T5 text encoders
    "text_model", "token_embedding", "position_embedding", "final_layer_norm", "layer_norm1",
    "layer_norm2", "text_projection", "relative_attention_bias", "DenseReluDense", "wi_0", "wi_1",
    # diffusers UNet / transformers
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks",
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "proj_mlp", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "conv_norm_out", "time_embedding", "linear_1", "linear_2", "ff_context", "norm1_context",
    "norm_out", "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder",
    "context_embedder", "x_embedder", "add_embedding", "class_embedding", "norm_q", "norm_k",
    "norm_added_q", "norm_added_k", "attn_qkv", "attn_proj", "img_attn", "txt_attn", "img_mlp",
    "txt_mlp", "img_mod", "txt_mod", "mod_lin", "double_blocks", "single_blocks", "modulation_lin",
    "final_layer", "adaLN_modulation", "input_blocks", "output_blocks", "middle_block", "in_layers",
    "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
}, key=len, reverse=True)


_PREFIXES_LONGEST_FIRST = sorted(KOHYA_PREFIXES, key=len, reverse=True)


def kohya_split_prefix(name: str) -> tuple[str, str]:
    """('lora_unet_', 'down_blocks_0_...') for a kohya module name; ('', name) if no known prefix."""
    for prefix in _PREFIXES_LONGEST_FIRST:
        if name.startswith(prefix):
            return prefix, name[len(prefix):]
    if name.startswith("lora_"):
        return "lora_", name[len("lora_"):]
    return "", name


def is_kohya_name(name: str) -> bool:
    """A kohya module name (flattened with '_', `lora_` prefix) rather than a dotted module path."""
    return "." not in name and name.startswith("lora_")


def kohya_candidates(name: str) -> tuple[str, tuple[str, ...]]:
    """(the flattened module path, the components to look for it in, in order) of a kohya name."""
    prefix, rest = kohya_split_prefix(name)
    if prefix in KOHYA_PREFIXES:
        return rest, KOHYA_PREFIXES[prefix][1]
    return rest, ("",)


# one alternation, longest first, each ending at a '_' or the end: the first that matches wins, as in
# the vocabulary's order (a compiled pattern instead of ~150 startswith calls per position)
_IDENTIFIER = re.compile("(?:" + "|".join(map(re.escape, UNDERSCORE_IDENTIFIERS)) + ")(?=_|$)")


def guess_dotted(flat: str) -> str:
    """Split an underscore-flattened module path into a dotted one using the identifier vocabulary."""
    parts: list[str] = []
    i = 0
    while i < len(flat):
        match = _IDENTIFIER.match(flat, i)
        if match:
            parts.append(match.group())
            i = match.end() + 1
        else:
            end = flat.find("_", i)
            end = len(flat) if end < 0 else end
            parts.append(flat[i:end])
            i = end + 1
    return ".".join(parts)


def kohya_to_target(name: str) -> str:
    prefix, rest = kohya_split_prefix(name)
    component = KOHYA_PREFIXES[prefix][0] + "." if prefix in KOHYA_PREFIXES else ""
    return component + guess_dotted(rest)


def target_to_kohya(target: str, components: set[str | None], has_components: bool = True) -> str:
    """kohya module name; `has_components=False` means the target is a bare model path."""
    component, _, rest = target.partition(".")
    if not has_components:
        inferred = infer_component(target)
        component, rest = (inferred, target) if inferred else ("", target)
    if component in COMPONENTS and rest:
        if component in ("unet", "transformer"):  # kohya and musubi-tuner name a DiT `lora_unet_` too
            prefix = "lora_unet_"
        elif component == "text_encoder":
            prefix = "lora_te1_" if "text_encoder_2" in components else "lora_te_"
        elif component == "text_encoder_2":
            prefix = "lora_te2_"
        elif component == "text_encoder_3":
            prefix = "lora_te3_"
        else:
            prefix = f"lora_{component}_"
        return prefix + rest.replace(".", "_")
    return "lora_" + target.replace(".", "_")


# the prefixes kohya sd-scripts and musubi-tuner give a diffusion transformer's modules (Flux, SD3, Wan,
# HunyuanVideo, Qwen-Image all train as `lora_unet_…`)
DENOISER_PREFIXES = ("lora_unet_", "lora_transformer_")


def family_targets(names: list[str], metadata: dict[str, str] | None = None) -> tuple[dict[str, str], list[str], str]:
    """Targets of kohya names that a model family's table explains (`lora_unet_double_blocks_0_img_attn_qkv`
    → `transformer.double_blocks.0.img_attn.qkv`): ({name: target}, names of the denoiser the table does
    not know (given a `transformer.` target guessed from the vocabulary), the family's label); ({}, [], "")
    when no family explains most denoiser names (SD 1.x/SDXL UNets keep the name guesser)."""
    from ..families import detect_flat

    flat = {}
    for name in names:
        prefix, rest = kohya_split_prefix(name)
        if prefix in DENOISER_PREFIXES and rest:
            flat[name] = rest
    found = detect_flat(list(flat.values()), metadata)
    if found is None or 2 * found.hits < len(flat):
        return {}, [], ""
    targets, unknown = {}, []
    for name, rest in flat.items():
        match = found.matches.get(rest)
        if match is not None:
            targets[name] = "transformer." + match.name
        else:
            targets[name] = "transformer." + guess_dotted(rest)
            unknown.append(name)
    return targets, unknown, found.label


def kohya_name_fits(name: str, target: str) -> bool:
    """Whether a dotted target can be what a kohya module name flattens (`lora_unet_a_b` fits `unet.a.b`
    and a bare `a.b`): what a file's `lorahub.layers` metadata says about a module must fit its keys."""
    flat = target.replace(".", "_")
    rest = kohya_split_prefix(name)[1]
    return bool(rest) and (flat == rest or flat == name or flat.endswith("_" + rest))
