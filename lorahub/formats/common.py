"""Pieces the format modules share: reading tensors lazily, grouping keys into layers, name guessing."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..adapter import LazyTensor, LoraLayer
from ..errors import LorahubError
from ..storage import SafetensorsHeader, is_pickle_path, load_pickle_state_dict, read_header

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior", "decoder")


class TensorSource:
    """The tensors of one weights file, lazily: names, shapes and dtypes from the header only."""

    def __init__(self, path: Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.header: SafetensorsHeader | None = None
        self._memory: dict[str, torch.Tensor] | None = None
        if is_pickle_path(self.path):
            self._memory = {str(k): v for k, v in load_pickle_state_dict(self.path, allow_pickle).items()
                            if isinstance(v, torch.Tensor)}
            self.metadata: dict[str, str] = {}
        else:
            self.header = read_header(self.path)
            self.metadata = dict(self.header.metadata)

    def keys(self) -> list[str]:
        if self._memory is not None:
            return list(self._memory)
        return list(self.header.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._memory is not None:
            return tuple(self._memory[key].shape)
        return self.header.tensors[key].shape

    def lazy(self, key: str) -> LazyTensor:
        if self._memory is not None:
            return LazyTensor(value=self._memory[key], key=key)
        info = self.header.tensors[key]
        return LazyTensor(path=self.path, key=key, shape=info.shape, dtype=info.dtype)

    def scalar(self, key: str) -> float:
        value = self.lazy(key).load()
        if value.numel() != 1:
            raise LorahubError(f"expected a scalar, found shape {list(value.shape)}", path=self.path, key=key)
        return float(value.reshape(()).to(torch.float64))


def layer_kind(down_shape: tuple[int, ...], embedding: bool = False) -> str:
    if embedding:
        return "embedding"
    return "conv" if len(down_shape) > 2 else "linear"


def check_pair(path: Path, name: str, down_key: str, up_key: str, down: LazyTensor, up: LazyTensor) -> int:
    """The rank both factors agree on, or a one-line error naming the keys."""
    if len(down.shape) < 2 or len(up.shape) < 2:
        raise LorahubError(f"factor is not a matrix (A {list(down.shape)}, B {list(up.shape)})",
                           path=path, key=down_key if len(down.shape) < 2 else up_key)
    if down.numel == 0 or up.numel == 0:
        raise LorahubError("empty factor (0 elements; was it saved under DeepSpeed ZeRO-3?)", path=path,
                           key=down_key if down.numel == 0 else up_key)
    if down.shape[0] != up.shape[1]:
        raise LorahubError(
            f"rank mismatch: {down_key} has rank {down.shape[0]} but {up_key} has rank {up.shape[1]}", path=path)
    if len(up.shape) > 2 and any(d != 1 for d in up.shape[2:]):
        raise LorahubError(f"conv up factor must be 1×1, found {list(up.shape)}", path=path, key=up_key)
    return down.shape[0]


def missing_partner(path: Path, present_key: str, missing_key: str) -> LorahubError:
    return LorahubError(f"'{present_key}' has no matching '{missing_key}'", path=path)


def peft_magnitude(layer: LoraLayer) -> torch.Tensor:
    """The DoRA magnitude as PEFT stores it: (out,), or (1, out, 1, 1) for a conv (PEFT's
    `_DoraConvNdLayer` keeps the transposed keepdim norm)."""
    magnitude = layer.magnitude.load().reshape(-1)
    if layer.kind == "conv":
        magnitude = magnitude.reshape(1, -1, *([1] * (len(layer.base_shape) - 2)))
    return magnitude.contiguous()


def kohya_dora_scale(layer: LoraLayer) -> torch.Tensor:
    """The DoRA magnitude as LyCORIS (wd_on_out) stores `dora_scale`: (out, 1) or (out, 1, 1, 1).
    ComfyUI tells the axis by shape[0] == out."""
    return layer.magnitude.load().reshape(-1, *([1] * (len(layer.base_shape) - 1))).contiguous()


# ---------------------------------------------------------------------------------------------
# kohya names: "lora_unet_down_blocks_0_attentions_0_proj_in" -> "unet.down_blocks.0.attentions.0.proj_in"
# Module names contain '_' themselves, so a name cannot be split by string replacement; without the
# base model at hand we split with a vocabulary of identifiers that contain '_' (longest first).
# `lorahub validate/merge` resolve names against the base's real tensor names instead.

KOHYA_PREFIXES = {
    "lora_unet_": "unet.",
    "lora_te_": "text_encoder.",
    "lora_te1_": "text_encoder.",
    "lora_te2_": "text_encoder_2.",
    "lora_te3_": "text_encoder_3.",
    "lora_transformer_": "transformer.",
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


def kohya_split_prefix(name: str) -> tuple[str, str]:
    """('lora_unet_', 'down_blocks_0_...') for a kohya module name; ('', name) if no known prefix."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            return prefix, name[len(prefix):]
    if name.startswith("lora_"):
        return "lora_", name[len("lora_"):]
    return "", name


def guess_dotted(flat: str) -> str:
    """Split an underscore-flattened module path into a dotted one using the identifier vocabulary."""
    parts: list[str] = []
    i = 0
    while i < len(flat):
        for ident in UNDERSCORE_IDENTIFIERS:
            end = i + len(ident)
            if flat.startswith(ident, i) and (end == len(flat) or flat[end] == "_"):
                parts.append(ident)
                i = end + 1
                break
        else:
            end = flat.find("_", i)
            end = len(flat) if end < 0 else end
            parts.append(flat[i:end])
            i = end + 1
    return ".".join(parts)


def kohya_to_target(name: str) -> str:
    prefix, rest = kohya_split_prefix(name)
    component = KOHYA_PREFIXES.get(prefix, "")
    dotted = guess_dotted(rest)
    # diffusers' ff.net.0.proj and to_out.0 carry numbered ModuleLists after identifiers
    dotted = re.sub(r"\bff\.net\.(\d)", r"ff.net.\1", dotted)
    return component + dotted


COMPONENTS_METADATA = "lorahub.components"


def infer_component(target: str) -> str | None:
    """The diffusers component a bare module path belongs to (PEFT adapters saved on a UNet alone)."""
    head = target.split(".", 1)[0]
    if head in ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding",
                "add_embedding"):
        return "unet"
    if head in ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                "time_text_embed"):
        return "transformer"
    if head == "text_model":
        return "text_encoder"
    return None


def target_to_kohya(target: str, components: set[str], has_components: bool = True) -> str:
    """kohya module name; `has_components=False` means the target is a bare model path."""
    component, _, rest = target.partition(".")
    if not has_components:
        component, rest = (infer_component(target), target) if infer_component(target) else ("", target)
    if component in COMPONENTS and rest:
        if component == "unet":
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


def component_of(target: str) -> str | None:
    head = target.split(".", 1)[0]
    return head if head in COMPONENTS else None
