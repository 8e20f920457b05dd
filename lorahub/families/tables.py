"""The families' name tables, original checkpoint ↔ diffusers folder (see `spec` for the entry kinds).

Sources, checked against diffusers 0.42's own converters: `convert_flux_transformer_checkpoint_to_diffusers`,
`convert_wan_transformer_to_diffusers`, `convert_sd3_transformer_checkpoint_to_diffusers`,
`convert_ltx_transformer_checkpoint_to_diffusers` (diffusers/loaders/single_file_utils.py) and
`_convert_kohya_flux_lora_to_diffusers`, `_convert_musubi_wan_lora_to_diffusers`,
`_convert_hunyuan_video_lora_to_diffusers` (diffusers/loaders/lora_conversion_utils.py).
"""
from __future__ import annotations

from .spec import DIFFUSERS, ORIGINAL, Family, fused, rename, swapped

_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."

FLUX = Family(
    name="flux", label="Flux", kohya_naming=ORIGINAL,
    labels={ORIGINAL: "BFL", DIFFUSERS: "diffusers"},
    registry=("flux.1-dev", "flux.1-schnell"),
    markers=("double_blocks.{i}.img_attn.qkv", "double_blocks.{i}.img_mod.lin", "double_blocks.{i}.img_mlp.0",
             "single_blocks.{i}.modulation.lin", "single_transformer_blocks.{i}.proj_mlp",
             "single_transformer_blocks.{i}.attn.to_q", "single_blocks.{i}.linear1"),
    entries=(
        rename("img_in", "x_embedder"),
        rename("txt_in", "context_embedder"),
        rename("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        rename("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        rename("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        rename("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        rename("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        rename("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        rename("double_blocks.{i}.img_mod.lin", _D + "norm1.linear"),
        rename("double_blocks.{i}.txt_mod.lin", _D + "norm1_context.linear"),
        fused("double_blocks.{i}.img_attn.qkv", _D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"),
        fused("double_blocks.{i}.txt_attn.qkv", _D + "attn.add_q_proj", _D + "attn.add_k_proj",
              _D + "attn.add_v_proj"),
        rename("double_blocks.{i}.img_attn.proj", _D + "attn.to_out.0"),
        rename("double_blocks.{i}.txt_attn.proj", _D + "attn.to_add_out"),
        rename("double_blocks.{i}.img_mlp.0", _D + "ff.net.0.proj"),
        rename("double_blocks.{i}.img_mlp.2", _D + "ff.net.2"),
        rename("double_blocks.{i}.txt_mlp.0", _D + "ff_context.net.0.proj"),
        rename("double_blocks.{i}.txt_mlp.2", _D + "ff_context.net.2"),
        rename("single_blocks.{i}.modulation.lin", _S + "norm.linear"),
        fused("single_blocks.{i}.linear1", _S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp",
              units=(1, 1, 1, 4)),
        rename("single_blocks.{i}.linear2", _S + "proj_out"),
        rename("final_layer.linear", "proj_out"),
        swapped("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
)

_W = "blocks.{i}."
WAN = Family(
    name="wan", label="Wan", kohya_naming=ORIGINAL,
    labels={ORIGINAL: "Wan original", DIFFUSERS: "diffusers"},
    registry=("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b"),
    markers=("blocks.{i}.self_attn.q", "blocks.{i}.cross_attn.q", "blocks.{i}.attn1.to_q", "blocks.{i}.attn2.to_q",
             "blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    modules=("patch_embedding",),
    entries=(
        *(rename(_W + f"{attn}.{o}", _W + f"{new}.{c}")
          for attn, new in (("self_attn", "attn1"), ("cross_attn", "attn2"))
          for o, c in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
        rename(_W + "cross_attn.k_img", _W + "attn2.add_k_proj"),
        rename(_W + "cross_attn.v_img", _W + "attn2.add_v_proj"),
        rename(_W + "ffn.0", _W + "ffn.net.0.proj"),
        rename(_W + "ffn.2", _W + "ffn.net.2"),
        rename("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
        rename("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
        rename("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
        rename("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
        rename("time_projection.1", "condition_embedder.time_proj"),
        rename("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
        rename("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
        rename("head.head", "proj_out"),
        # norms (what `.diff`/`.diff_b` deltas on vectors name): diffusers swaps norm2 and norm3
        rename(_W + "norm2", _W + "norm3"),
        rename(_W + "norm3", _W + "norm2"),
        *(rename(_W + f"{attn}.{norm}", _W + f"{new}.{norm}")
          for attn, new in (("self_attn", "attn1"), ("cross_attn", "attn2")) for norm in ("norm_q", "norm_k")),
        rename(_W + "cross_attn.norm_k_img", _W + "attn2.norm_added_k"),
        rename("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
        rename("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ),
)

HUNYUAN_VIDEO = Family(
    name="hunyuan-video", label="HunyuanVideo", kohya_naming=ORIGINAL,
    labels={ORIGINAL: "HunyuanVideo original", DIFFUSERS: "diffusers"},
    registry=("hunyuanvideo",),
    markers=("double_blocks.{i}.img_attn_qkv", "double_blocks.{i}.img_mod.linear", "double_blocks.{i}.img_mlp.fc1",
             "single_blocks.{i}.modulation.linear", "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_q",
             "txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv", "x_embedder.proj"),
    entries=(
        rename("img_in.proj", "x_embedder.proj"),
        rename("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        rename("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        rename("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
        rename("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
        rename("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        rename("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        rename("txt_in.input_embedder", "context_embedder.proj_in"),
        rename("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
        rename("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
        rename("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
        rename("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
        fused("txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv",
              *(f"context_embedder.token_refiner.refiner_blocks.{{i}}.attn.{x}" for x in ("to_q", "to_k", "to_v"))),
        rename("txt_in.individual_token_refiner.blocks.{i}.self_attn_proj",
               "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_out.0"),
        rename("txt_in.individual_token_refiner.blocks.{i}.mlp.fc1",
               "context_embedder.token_refiner.refiner_blocks.{i}.ff.net.0.proj"),
        rename("txt_in.individual_token_refiner.blocks.{i}.mlp.fc2",
               "context_embedder.token_refiner.refiner_blocks.{i}.ff.net.2"),
        rename("txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1",
               "context_embedder.token_refiner.refiner_blocks.{i}.norm_out.linear"),
        fused("double_blocks.{i}.img_attn_qkv", _D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"),
        fused("double_blocks.{i}.txt_attn_qkv", _D + "attn.add_q_proj", _D + "attn.add_k_proj",
              _D + "attn.add_v_proj"),
        rename("double_blocks.{i}.img_attn_proj", _D + "attn.to_out.0"),
        rename("double_blocks.{i}.txt_attn_proj", _D + "attn.to_add_out"),
        rename("double_blocks.{i}.img_mod.linear", _D + "norm1.linear"),
        rename("double_blocks.{i}.txt_mod.linear", _D + "norm1_context.linear"),
        rename("double_blocks.{i}.img_mlp.fc1", _D + "ff.net.0.proj"),
        rename("double_blocks.{i}.img_mlp.fc2", _D + "ff.net.2"),
        rename("double_blocks.{i}.txt_mlp.fc1", _D + "ff_context.net.0.proj"),
        rename("double_blocks.{i}.txt_mlp.fc2", _D + "ff_context.net.2"),
        fused("single_blocks.{i}.linear1", _S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp",
              units=(1, 1, 1, 4)),
        rename("single_blocks.{i}.linear2", _S + "proj_out"),
        rename("single_blocks.{i}.modulation.linear", _S + "norm.linear"),
        rename("final_layer.linear", "proj_out"),
        swapped("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
)

_J = "joint_blocks.{i}."
SD3 = Family(
    name="sd3", label="SD3", kohya_naming=ORIGINAL,
    labels={ORIGINAL: "SAI original", DIFFUSERS: "diffusers"},
    registry=("sd3.5-large", "sd3.5-medium"),
    markers=("joint_blocks.{i}.x_block.attn.qkv", "joint_blocks.{i}.context_block.attn.qkv", "pos_embed.proj",
             "x_embedder.proj", "transformer_blocks.{i}.attn2.to_q"),
    modules=("context_embedder",),
    entries=(
        rename("x_embedder.proj", "pos_embed.proj"),
        rename("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        rename("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        rename("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        rename("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        fused(_J + "x_block.attn.qkv", _D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"),
        fused(_J + "context_block.attn.qkv", _D + "attn.add_q_proj", _D + "attn.add_k_proj", _D + "attn.add_v_proj"),
        fused(_J + "x_block.attn2.qkv", _D + "attn2.to_q", _D + "attn2.to_k", _D + "attn2.to_v"),
        rename(_J + "x_block.attn.proj", _D + "attn.to_out.0"),
        rename(_J + "context_block.attn.proj", _D + "attn.to_add_out"),
        rename(_J + "x_block.attn2.proj", _D + "attn2.to_out.0"),
        rename(_J + "x_block.adaLN_modulation.1", _D + "norm1.linear"),
        # the last block's context adaLN is shift|scale only, and swapped like the final layer's
        swapped(_J + "context_block.adaLN_modulation.1", _D + "norm1_context.linear", only_if_two=True),
        rename(_J + "x_block.mlp.fc1", _D + "ff.net.0.proj"),
        rename(_J + "x_block.mlp.fc2", _D + "ff.net.2"),
        rename(_J + "context_block.mlp.fc1", _D + "ff_context.net.0.proj"),
        rename(_J + "context_block.mlp.fc2", _D + "ff_context.net.2"),
        rename("final_layer.linear", "proj_out"),
        swapped("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
)

_L = "transformer_blocks.{i}."
LTX_VIDEO = Family(
    name="ltx-video", label="LTX-Video", kohya_naming=ORIGINAL,
    labels={ORIGINAL: "LTX original", DIFFUSERS: "diffusers"},
    registry=("ltx-video",),
    markers=("patchify_proj", "adaln_single.linear", "time_embed.linear", "caption_projection.linear_1"),
    modules=tuple(_L + m for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                   "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"))
    + ("caption_projection.linear_1", "caption_projection.linear_2", "proj_out"),
    entries=(
        rename("patchify_proj", "proj_in"),
        rename("adaln_single.linear", "time_embed.linear"),
        rename("adaln_single.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_1"),
        rename("adaln_single.emb.timestep_embedder.linear_2", "time_embed.emb.timestep_embedder.linear_2"),
    ),
)

_Q = "transformer_blocks.{i}."
QWEN_IMAGE = Family(
    name="qwen-image", label="Qwen-Image", kohya_naming=DIFFUSERS,
    labels={DIFFUSERS: "diffusers"},
    registry=("qwen-image",),
    markers=(_Q + "img_mlp.net.0.proj", _Q + "txt_mlp.net.0.proj", _Q + "img_mod.1", _Q + "txt_mod.1"),
    modules=tuple(_Q + m for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                   "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                                   "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1",
                                   "txt_mod.1"))
    + ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
       "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out"),
)

# in the order detection prefers them when the names alone fit several equally well
FAMILIES: tuple[Family, ...] = (FLUX, WAN, QWEN_IMAGE, SD3, HUNYUAN_VIDEO, LTX_VIDEO)
