"""Tiny diffusion transformers and LoRA files in the layouts people download (issue 12, families).

Bases are built by diffusers from tiny configs (seeded), saved as a diffusers folder (`model_index.json`
+ `transformer/`); the original-checkpoint layout of the same weights is written with the inverse of
diffusers' own single-file converter (`flux_original_state`, checked against
`convert_flux_transformer_checkpoint_to_diffusers` at Flux's real widths in the tests). LoRA files are
made by the peers where they have a saver (PEFT `add_adapter` + diffusers' `save_lora_weights`), and
in kohya sd-scripts' / musubi-tuner's key layout (`lora_unet_<module path with _>`) otherwise. The
reference merge is diffusers' own: `lora_state_dict` → `load_lora_adapter` → `fuse_lora` on the fp32
model. Nothing here uses lorahub.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=1e-6, rope_max_seq_len=32)

QWEN_TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def save_diffusers_folder(model, root: Path, pipeline_class: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(root / "transformer"))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": pipeline_class, "_diffusers_version": "0.42.1",
         "transformer": ["diffusers", type(model).__name__]}))
    return root


def _tiny(root: Path, model_class: str, config: dict, pipeline: str, seed: int) -> Path:
    """A diffusers folder holding one tiny transformer built by diffusers from `config`, seeded weights."""
    import diffusers

    model = _seeded(getattr(diffusers, model_class)(**config), seed)
    return save_diffusers_folder(model, root, pipeline)


def tiny_flux(root: Path, seed: int = 7) -> Path:
    return _tiny(root, "FluxTransformer2DModel", FLUX_TINY, "FluxPipeline", seed)


def tiny_wan(root: Path, seed: int = 9) -> Path:
    return _tiny(root, "WanTransformer3DModel", WAN_TINY, "WanPipeline", seed)


def tiny_qwen_image(root: Path, seed: int = 5) -> Path:
    return _tiny(root, "QwenImageTransformer2DModel", QWEN_TINY, "QwenImagePipeline", seed)


def tiny_sd3(root: Path, seed: int = 3) -> Path:
    return _tiny(root, "SD3Transformer2DModel", SD3_TINY, "StableDiffusion3Pipeline", seed)


# ---------------------------------------------------------------------------------------------
# the original (BFL) Flux checkpoint names: the inverse of diffusers' single-file converter

_FLUX_RENAMES = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def flux_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict under the BFL checkpoint's names."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(value)
            continue
        if module in _FLUX_RENAMES:
            out[f"{_FLUX_RENAMES[module]}.{param}"] = value
            continue
        m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
        assert m, key
        kind, i, rest = m.groups()
        block = f"{'double' if kind == 'transformer_blocks' else 'single'}_blocks.{i}."
        table = _FLUX_DOUBLE if kind == "transformer_blocks" else _FLUX_SINGLE
        if rest in table:
            name = table[rest]
            out[block + name + "." + ("scale" if name.endswith("_norm") else param)] = value
            continue
        if kind == "transformer_blocks" and rest in ("attn.to_q", "attn.to_k", "attn.to_v"):
            fused.setdefault(f"{block}img_attn.qkv.{param}", {})[rest] = value
        elif kind == "transformer_blocks" and rest in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"):
            fused.setdefault(f"{block}txt_attn.qkv.{param}", {})[rest] = value
        elif kind == "single_transformer_blocks" and rest in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
            fused.setdefault(f"{block}linear1.{param}", {})[rest] = value
        else:
            raise AssertionError(key)
    order = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "proj_mlp")
    for key, parts in fused.items():
        out[key] = torch.cat([parts[name] for name in order if name in parts])
    return out


# the original Wan checkpoint names: the inverse of diffusers' `convert_wan_transformer_to_diffusers`

_WAN_RENAMES = (  # diffusers -> original, applied in this order to the module path
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"), ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0", ".o"), (".to_q", ".q"), (".to_k", ".k"), (".to_v", ".v"), (".add_k_proj", ".k_img"),
    (".add_v_proj", ".v_img"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
)


def wan_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers WanTransformer3DModel state dict under the original Wan checkpoint's names."""
    out = {}
    for key, value in state.items():
        new = key
        for diffusers_name, original in _WAN_RENAMES:
            new = new.replace(diffusers_name, original)
        if new == "scale_shift_table":
            new = "head.modulation"
        new = new.replace(".scale_shift_table", ".modulation")
        new = re.sub(r"\.norm2\.", ".norm__x.", new).replace(".norm3.", ".norm2.").replace(".norm__x.", ".norm3.")
        out[new] = value
    return out


def wan_musubi_modules(dim: int, ffn: int, layers: int) -> dict[str, tuple[int, int]]:
    """musubi-tuner's Wan LoRA modules (networks/lora_wan.py: the Linear layers of WanAttentionBlock) with
    their (out, in) sizes, all of them: diffusers' musubi converter expects every one per block."""
    modules = {}
    for i in range(layers):
        for attn in ("self_attn", "cross_attn"):
            for o in ("q", "k", "v", "o"):
                modules[f"blocks_{i}_{attn}_{o}"] = (dim, dim)
        modules[f"blocks_{i}_ffn_0"] = (ffn, dim)
        modules[f"blocks_{i}_ffn_2"] = (dim, ffn)
    return modules


# the original SD3 (SAI MMDiT) names: the inverse of `convert_sd3_transformer_checkpoint_to_diffusers`

_SD3_TOP = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
            "proj_out": "final_layer.linear"}
_SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
              "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
              "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
              "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
_SD3_QKV = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
            "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
            "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
            "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
            "attn2.to_v": ("x_block.attn2.qkv", 2)}


def sd3_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict under the SAI checkpoint's names."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    last = max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    for key, value in state.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        module, _, param = key.rpartition(".")
        if module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(value)
            continue
        if module in _SD3_TOP:
            out[f"{_SD3_TOP[module]}.{param}"] = value
            continue
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
        assert m, key
        i, rest = int(m[1]), m[2]
        block = f"joint_blocks.{i}."
        if rest == "norm1_context.linear":
            out[f"{block}context_block.adaLN_modulation.1.{param}"] = _swap_halves(value) if i == last else value
        elif rest in _SD3_BLOCK:
            out[f"{block}{_SD3_BLOCK[rest]}.{param}"] = value
        elif rest in _SD3_QKV:
            name, part = _SD3_QKV[rest]
            fused.setdefault(f"{block}{name}.{param}", {})[part] = value
        else:
            raise AssertionError(key)
    for key, parts in fused.items():
        out[key] = torch.cat([parts[j] for j in sorted(parts)])
    return out


# ---------------------------------------------------------------------------------------------
# LoRA files


def peft_lora_file(folder: Path, out: Path, targets: list[str], *, rank: int, alpha: float, seed: int,
                   pipeline: str = "FluxPipeline") -> Path:
    """A diffusers-named LoRA (ai-toolkit / diffusers training scripts): PEFT `add_adapter` on the
    model, random B, saved by the pipeline's own `save_lora_weights` with its LoraConfig metadata."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model_cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["transformer"][1])
    model = model_cls.from_pretrained(str(folder / "transformer"))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = get_peft_model_state_dict(model)
    out.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, pipeline).save_lora_weights(
        str(out), transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def kohya_lora_file(out: Path, modules: dict[str, tuple[int, int]], *, rank: int, alpha: float | dict,
                    seed: int, metadata: dict[str, str] | None = None) -> Path:
    """A kohya / musubi-tuner file: `lora_unet_<path>.lora_down.weight` (rank, in), `.lora_up.weight`
    (out, rank), `.alpha` (0-d float32) for every module {flattened path: (out, in)}."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (n, k) in modules.items():
        key = "lora_unet_" + name
        tensors[f"{key}.lora_down.weight"] = torch.randn((rank, k), generator=g) * 0.2
        tensors[f"{key}.lora_up.weight"] = torch.randn((n, rank), generator=g) * 0.2
        a = alpha.get(name, alpha.get("*")) if isinstance(alpha, dict) else alpha
        tensors[f"{key}.alpha"] = torch.tensor(float(a), dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank),
                                           **(metadata or {})})
    return out


def flux_kohya_modules(d: int, *, double: int = 1, single: int = 1, linear1: bool = True,
                       extra: bool = True, joint: int = 32, pooled: int = 16, in_ch: int = 16) -> dict:
    """kohya sd-scripts' Flux LoRA modules (networks/lora_flux.py: the Linear layers of DoubleStreamBlock
    and SingleStreamBlock, optionally img_in/txt_in/time_in/vector_in/guidance_in/final_layer) with
    their (out, in) sizes."""
    mlp = 4 * d
    modules = {}
    for i in range(double):
        for s in ("img", "txt"):
            modules.update({f"double_blocks_{i}_{s}_mod_lin": (6 * d, d), f"double_blocks_{i}_{s}_attn_qkv": (3 * d, d),
                            f"double_blocks_{i}_{s}_attn_proj": (d, d), f"double_blocks_{i}_{s}_mlp_0": (mlp, d),
                            f"double_blocks_{i}_{s}_mlp_2": (d, mlp)})
    for i in range(single):
        if linear1:
            modules[f"single_blocks_{i}_linear1"] = (3 * d + mlp, d)
        modules.update({f"single_blocks_{i}_linear2": (d, d + mlp), f"single_blocks_{i}_modulation_lin": (3 * d, d)})
    if extra:
        modules.update({"img_in": (d, in_ch), "txt_in": (d, joint), "time_in_in_layer": (d, 256),
                        "time_in_out_layer": (d, d), "vector_in_in_layer": (d, pooled), "vector_in_out_layer": (d, d),
                        "guidance_in_in_layer": (d, 256), "guidance_in_out_layer": (d, d),
                        "final_layer_linear": (in_ch, d), "final_layer_adaLN_modulation_1": (2 * d, d)})
    return modules


# ---------------------------------------------------------------------------------------------
# the reference: diffusers' own load + fuse


def diffusers_fused(folder: Path, lora: Path, pipeline: str = "FluxPipeline") -> tuple[dict[str, torch.Tensor], int]:
    """(the fp32 transformer's state dict after diffusers loads `lora` and fuses it, the number of
    modules diffusers loaded the LoRA into)."""
    import diffusers

    pipe_cls = getattr(diffusers, pipeline)
    model_cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["transformer"][1])
    model = model_cls.from_pretrained(str(folder / "transformer"), torch_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import inspect

        if "return_alphas" in inspect.signature(pipe_cls.lora_state_dict).parameters:
            state, alphas, metadata = pipe_cls.lora_state_dict(str(lora), return_alphas=True,
                                                               return_lora_metadata=True)
        else:
            (state, metadata), alphas = pipe_cls.lora_state_dict(str(lora), return_lora_metadata=True), None
        state = {k: v.to(torch.float32) for k, v in state.items()}
        model.load_lora_adapter(state, network_alphas=alphas, metadata=metadata or None, prefix="transformer",
                                adapter_name="ref")
        loaded = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "ref" in m.lora_A)
        model.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
             if ".lora_" not in k}
    return fused, loaded


def peft_fused(folder: Path, peft_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT's own load + merge of a PEFT folder into the diffusers transformer."""
    import diffusers
    from peft import PeftModel

    model_cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["transformer"][1])
    model = model_cls.from_pretrained(str(folder / "transformer"), torch_dtype=torch.float32)
    wrapped = PeftModel.from_pretrained(model, str(peft_dir))
    loaded = sum(1 for _, m in wrapped.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    merged = wrapped.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, loaded


def direct_merge(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], names: dict[str, str]) -> dict:
    """W + (B·A)·(alpha/rank) for every kohya module {kohya name: base module}, in PEFT's order of
    operations (fp32): the reference for a kohya file merged into a checkpoint in the file's own naming."""
    out = dict(base)
    for kohya, module in names.items():
        down, up = lora[f"{kohya}.lora_down.weight"], lora[f"{kohya}.lora_up.weight"]
        scale = float(lora[f"{kohya}.alpha"]) / down.shape[0]
        key = f"{module}.weight"
        out[key] = base[key] + (up @ down) * scale
    return out
