"""Qwen-Image (one naming: musubi-tuner's `lora_unet_transformer_blocks_0_attn_to_q` must become `transformer.…`,
not `unet.…`) and SD3/SD3.5 (SAI `joint_blocks.N.x_block.attn.qkv` ↔ diffusers `transformer_blocks.N.attn.to_q`)
(issue 12). References: diffusers' converters, `load_lora_adapter` + `fuse_lora` (fp32).
"""
from __future__ import annotations

import pytest
from cli_runner import run_cli
from fixtures_families import (
    diffusers_fused,
    kohya_lora_file,
    peft_fused,
    peft_lora_file,
    sd3_original_state,
    tiny_qwen_image,
    tiny_sd3,
)
from safetensors.torch import load_file, save_file
from test_families_flux import assert_merged

from lorahub.base import load_base
from lorahub.formats import load_adapter
from lorahub.inspect import describe
from lorahub.merge import AdapterInput, merge
from lorahub.registry import load_manifest
from lorahub.validate import validate

D = 32


def qwen_musubi_modules(d: int, layers: int = 1) -> dict[str, tuple[int, int]]:
    """musubi-tuner's Qwen-Image LoRA modules (the Linear layers of QwenImageTransformerBlock, diffusers names
    flattened) with their (out, in) sizes."""
    modules = {}
    for i in range(layers):
        b = f"transformer_blocks_{i}_"
        for name in ("attn_to_q", "attn_to_k", "attn_to_v", "attn_to_out_0", "attn_add_q_proj", "attn_add_k_proj",
                     "attn_add_v_proj", "attn_to_add_out"):
            modules[b + name] = (d, d)
        for s in ("img", "txt"):
            modules[f"{b}{s}_mlp_net_0_proj"] = (4 * d, d)
            modules[f"{b}{s}_mlp_net_2"] = (d, 4 * d)
            modules[f"{b}{s}_mod_1"] = (6 * d, d)
    return modules


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    folder = tiny_qwen_image(root / "diffusers")
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    lora = kohya_lora_file(root / "musubi_qwen.safetensors", qwen_musubi_modules(D), rank=4, alpha=8.0, seed=31,
                           metadata={"ss_network_module": "networks.lora_qwen_image"})
    return {"root": root, "folder": folder, "state": state, "lora": lora}


def test_musubi_qwen_image_is_a_transformer_lora(qwen):
    adapter = load_adapter(qwen["lora"])
    assert "transformer.transformer_blocks.0.img_mlp.net.0.proj" in adapter.layers
    assert "transformer.transformer_blocks.0.attn.to_out.0" in adapter.layers
    assert not any(t.startswith("unet.") for t in adapter.layers) and not adapter.warnings
    info = describe(adapter, read_data=False)
    assert info["components"] == {"transformer": 14}
    assert info["family"]["label"] == "Qwen-Image"
    assert validate(adapter, load_base(str(qwen["folder"]))).ok


def test_musubi_qwen_image_merge_and_convert_equal_fuse_lora(qwen, tmp_path):
    reference, loaded = diffusers_fused(qwen["folder"], qwen["lora"], "QwenImagePipeline")
    assert loaded == 14
    merge(str(qwen["folder"]), [AdapterInput(load_adapter(qwen["lora"]))], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert assert_merged(got, reference, qwen["state"]) == 14
    for to in ("diffusers", "kohya", "peft"):
        out = tmp_path / (to if to == "peft" else f"{to}.safetensors")
        result = run_cli("convert", qwen["lora"], "--to", to, "--out", out)
        assert result.returncode == 0, result.stderr
        got, count = (peft_fused(qwen["folder"], out) if to == "peft"
                      else diffusers_fused(qwen["folder"], out, "QwenImagePipeline"))
        assert count == loaded, to
        assert_merged(got, reference, qwen["state"])
    keys = load_file(str(tmp_path / "diffusers.safetensors"))
    assert "transformer.transformer_blocks.0.img_mod.1.lora_A.weight" in keys
    assert "lora_unet_transformer_blocks_0_img_mod_1.alpha" in load_file(str(tmp_path / "kohya.safetensors"))


def test_registry_validates_musubi_qwen_image(tmp_path):
    lora = kohya_lora_file(tmp_path / "q.safetensors", qwen_musubi_modules(3072, layers=60), rank=1, alpha=1.0,
                           seed=1)
    report = validate(load_adapter(lora), load_manifest("qwen-image"))
    assert report.ok and report.matched == 14 * 60, report.problems[:3]
    assert run_cli("validate", lora, "--base", "qwen-image").returncode == 0


# ---------------------------------------------------------------------------------------------
# SD3 / SD3.5


SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
               "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    folder = tiny_sd3(root / "diffusers")
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    original = root / "sd3.5_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd3_original_state(state).items()}, str(original))
    lora = peft_lora_file(folder, root / "lora", SD3_TARGETS, rank=4, alpha=8.0, seed=41,
                          pipeline="StableDiffusion3Pipeline")
    return {"root": root, "folder": folder, "state": state, "original": original, "lora": lora}


def test_sd3_original_layout_is_diffusers_converters_inverse(sd3):
    import torch
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(load_file(str(sd3["original"]))))
    assert set(back) == set(sd3["state"]) and all(torch.equal(back[k], sd3["state"][k]) for k in back)


def test_sd3_diffusers_lora_validates_and_merges_into_the_sai_file(sd3, tmp_path):
    """split → fused into joint_blocks.N.{x,context}_block.attn(2).qkv; norm_out and the last block's context
    adaLN land swapped, the other blocks' not."""
    adapter = load_adapter(sd3["lora"])
    assert describe(adapter, read_data=False)["family"]["label"] == "SD3"
    for base in (sd3["original"], sd3["folder"]):
        report = validate(adapter, load_base(str(base)))
        assert report.ok, (base, report.problems[:3])
    reference, loaded = diffusers_fused(sd3["folder"], sd3["lora"], "StableDiffusion3Pipeline")
    merge(str(sd3["original"]), [AdapterInput(adapter)], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / sd3["original"].name))
    assert assert_merged(got, sd3_original_state(reference), load_file(str(sd3["original"]))) > 20


def test_sd3_kohya_names_round_trip_to_fuse_lora(sd3, tmp_path):
    """--to kohya writes sd-scripts' SD3 names (`lora_unet_joint_blocks_0_x_block_attn_qkv`, fused); that file
    merged into the diffusers folder (fused → split again) and converted back to diffusers (loaded by diffusers)
    equals diffusers' fuse of the original LoRA."""
    reference, loaded = diffusers_fused(sd3["folder"], sd3["lora"], "StableDiffusion3Pipeline")
    kohya = tmp_path / "k.safetensors"
    assert run_cli("convert", sd3["lora"], "--to", "kohya", "--out", kohya).returncode == 0
    keys = load_file(str(kohya))
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.alpha" in keys
    adapter = load_adapter(kohya)
    assert "transformer.joint_blocks.0.x_block.attn.qkv" in adapter.layers
    assert validate(adapter, load_manifest("sd3.5-medium")).problems  # tiny shapes: the registry says no
    merge(str(sd3["folder"]), [AdapterInput(adapter)], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert_merged(got, reference, sd3["state"])
    back = tmp_path / "d.safetensors"
    assert run_cli("convert", kohya, "--to", "diffusers", "--out", back).returncode == 0
    got, count = diffusers_fused(sd3["folder"], back, "StableDiffusion3Pipeline")
    assert count == loaded
    assert_merged(got, reference, sd3["state"])


# ---------------------------------------------------------------------------------------------
# HunyuanVideo: the table against diffusers' own LoRA converter, at the real width it hard-codes


def test_hunyuan_video_table_matches_diffusers_lora_converter():
    """An original-named HunyuanVideo LoRA (the official `img_attn_qkv`, `linear1`, refiner `self_attn_qkv`,
    final adaLN) re-expressed by lorahub gives diffusers' `_convert_hunyuan_video_lora_to_diffusers` modules
    with the same products B·A (fused → split). Not compared: `final_layer.adaLN_modulation.1`, whose
    halves diffusers 0.42 swaps in lora_A as well as lora_B (chunking A along the rank: wrong for rank ≥ 2,
    an error for rank 1; lorahub swaps B's rows only, as for Flux's identical final layer), and the token
    refiner's `self_attn_qkv`, whose lora_A diffusers also chunks in three (ranks that do not fit B)."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    from lorahub.adapter import Adapter, LazyTensor, LoraLayer
    from lorahub.families import to_naming

    d = 3072
    modules = {"double_blocks.0.img_attn_qkv": (3 * d, d), "double_blocks.0.txt_attn_qkv": (3 * d, d),
               "double_blocks.0.img_attn_proj": (d, d), "double_blocks.0.txt_attn_proj": (d, d),
               "double_blocks.0.img_mod.linear": (6 * d, d), "double_blocks.0.txt_mlp.fc1": (4 * d, d),
               "single_blocks.0.linear1": (7 * d, d), "single_blocks.0.linear2": (d, 5 * d),
               "single_blocks.0.modulation.linear": (3 * d, d), "final_layer.linear": (64, d), "img_in.proj": (d, 16), "time_in.mlp.0": (d, 256),
               "txt_in.individual_token_refiner.blocks.0.mlp.fc1": (4 * d, d),
               "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1": (2 * d, d)}
    g = torch.Generator().manual_seed(0)
    state, layers = {}, {}
    for name, (n, k) in modules.items():
        a = torch.randn((1, k, 1, 1, 1) if name == "img_in.proj" else (1, k), generator=g, dtype=torch.float64)
        b = torch.randn((n, 1, 1, 1, 1) if name == "img_in.proj" else (n, 1), generator=g, dtype=torch.float64)
        state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = a, b
        layers[f"transformer.{name}"] = LoraLayer(f"transformer.{name}", "conv" if a.dim() == 5 else "linear",
                                                  LazyTensor.of(a), LazyTensor.of(b), 1.0, 1)
    theirs = _convert_hunyuan_video_lora_to_diffusers(dict(state))
    converted, found = to_naming(Adapter(path=None, format="diffusers", layers=layers, has_components=True),
                                 "diffusers")
    assert found is not None and found.family.name == "hunyuan-video" and found.naming == "original"
    ours = {t[len("transformer."):]: layer for t, layer in converted.layers.items()}
    expected = {k[len("transformer."):-len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight")}
    assert set(ours) == expected
    for module, layer in ours.items():
        a = theirs[f"transformer.{module}.lora_A.weight"].flatten(1)
        b = theirs[f"transformer.{module}.lora_B.weight"].flatten(1)
        assert torch.equal(layer.delta_math(dtype=torch.float64), b @ a), module


# ---------------------------------------------------------------------------------------------
# LTX-Video: the original checkpoint names differ in patchify_proj / adaln_single only


LTX_TINY = dict(in_channels=16, out_channels=16, patch_size=1, patch_size_t=1, num_attention_heads=2,
                attention_head_dim=16, cross_attention_dim=32, num_layers=1, caption_channels=16,
                qk_norm="rms_norm_across_heads")


def _ltx_original(state: dict) -> dict:
    """The inverse of diffusers' `convert_ltx_transformer_checkpoint_to_diffusers` (renames only)."""
    out = {}
    for key, value in state.items():
        new = key.replace("proj_in", "patchify_proj").replace("time_embed", "adaln_single")
        out[new.replace("norm_q", "q_norm").replace("norm_k", "k_norm")] = value
    return out


def test_ltx_video_lora_merges_into_the_original_checkpoint(tmp_path):
    import torch
    from diffusers import LTXVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers
    from fixtures_families import _seeded, save_diffusers_folder

    folder = save_diffusers_folder(_seeded(LTXVideoTransformer3DModel(**LTX_TINY), 2), tmp_path / "ltx", "LTXPipeline")
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    original = tmp_path / "ltx-video-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in _ltx_original(state).items()}, str(original))
    back = convert_ltx_transformer_checkpoint_to_diffusers(dict(load_file(str(original))))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in back)

    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "time_embed.linear"]
    lora = peft_lora_file(folder, tmp_path / "lora", targets, rank=4, alpha=8.0, seed=51, pipeline="LTXPipeline")
    adapter = load_adapter(lora)
    assert describe(adapter, read_data=False)["family"]["label"] == "LTX-Video"
    for base in (original, folder):
        assert validate(adapter, load_base(str(base))).ok
    reference, loaded = diffusers_fused(folder, lora, "LTXPipeline")
    merge(str(original), [AdapterInput(adapter)], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / original.name))
    assert assert_merged(got, _ltx_original(reference), load_file(str(original))) == loaded
    kohya = tmp_path / "k.safetensors"
    assert run_cli("convert", lora, "--to", "kohya", "--out", kohya).returncode == 0
    keys = load_file(str(kohya))
    assert "lora_unet_patchify_proj.alpha" in keys and "lora_unet_transformer_blocks_0_attn1_to_q.alpha" in keys
    merge(str(folder), [AdapterInput(load_adapter(kohya))], tmp_path / "out2", device="cpu")
    got = load_file(str(tmp_path / "out2" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert assert_merged(got, reference, state) == loaded
    report = validate(adapter, load_manifest("ltx-video"))
    assert not report.ok and report.modules == loaded  # tiny shapes; the names all exist in the manifest
    assert not any(p.kind == "missing" for p in report.problems)


HUNYUAN_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                    rope_axes_dim=(4, 6, 6))


def test_hunyuan_video_diffusers_lora_round_trips_through_kohya_names(tmp_path):
    """A diffusers HunyuanVideo LoRA written in the original names (`img_attn_qkv`, `linear1`, refiner
    `self_attn_qkv`: fused) and merged into the diffusers folder (split again) equals diffusers' fuse of the
    original LoRA; so does the file converted back to diffusers, as diffusers loads it."""
    from diffusers import HunyuanVideoTransformer3DModel
    from fixtures_families import _seeded, save_diffusers_folder

    model = _seeded(HunyuanVideoTransformer3DModel(**HUNYUAN_TINY), 4)
    folder = save_diffusers_folder(model, tmp_path / "hv", "HunyuanVideoPipeline")
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "proj_mlp", "norm.linear", "norm_out.linear"]
    lora = peft_lora_file(folder, tmp_path / "lora", targets, rank=4, alpha=8.0, seed=61,
                          pipeline="HunyuanVideoPipeline")
    adapter = load_adapter(lora)
    assert describe(adapter, read_data=False)["family"]["label"] == "HunyuanVideo"
    reference, loaded = diffusers_fused(folder, lora, "HunyuanVideoPipeline")
    kohya = tmp_path / "k.safetensors"
    result = run_cli("convert", lora, "--to", "kohya", "--out", kohya)
    assert result.returncode == 0, result.stderr
    keys = load_file(str(kohya))
    for name in ("double_blocks_0_img_attn_qkv", "single_blocks_0_linear1", "final_layer_adaLN_modulation_1",
                 "txt_in_individual_token_refiner_blocks_0_self_attn_qkv"):
        assert f"lora_unet_{name}.lora_down.weight" in keys, name
    assert validate(load_adapter(kohya), load_base(str(folder))).ok
    merge(str(folder), [AdapterInput(load_adapter(kohya))], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert assert_merged(got, reference, state) == loaded
    back = tmp_path / "d.safetensors"
    assert run_cli("convert", kohya, "--to", "diffusers", "--out", back).returncode == 0
    got, count = diffusers_fused(folder, back, "HunyuanVideoPipeline")
    assert count == loaded
    assert_merged(got, reference, state)


def test_dora_on_a_fused_module_is_refused(tmp_path):
    import torch

    from lorahub.adapter import Adapter, LazyTensor, LoraLayer
    from lorahub.errors import LorahubError
    from lorahub.families import to_naming

    layer = LoraLayer("transformer.double_blocks.0.img_attn.qkv", "linear", LazyTensor.of(torch.ones(2, 8)),
                      LazyTensor.of(torch.ones(24, 2)), 2.0, 2, magnitude=LazyTensor.of(torch.ones(24)),
                      source_name="lora_unet_double_blocks_0_img_attn_qkv")
    adapter = Adapter(path=tmp_path / "x.safetensors", format="kohya", layers={layer.target: layer},
                      has_components=True)
    with pytest.raises(LorahubError, match="lora_unet_double_blocks_0_img_attn_qkv.*DoRA"):
        to_naming(adapter, "diffusers")


def test_sd3_kohya_file_into_both_layouts(sd3, tmp_path):
    """A file in sd-scripts' SD3 layout (`lora_unet_joint_blocks_N_x_block_attn_qkv`, every Linear layer of the
    MMDiT and the final layer): merged into the SAI file it is W + s·B·A per module; merged into the diffusers
    folder (qkv split, the last block's context adaLN and the final adaLN swapped back) it is what diffusers'
    own single-file converter makes of that merged SAI file."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from fixtures_families import direct_merge

    base = load_file(str(sd3["original"]))
    modules = {k[:-len(".weight")].replace(".", "_"): tuple(v.shape) for k, v in base.items()
               if k.endswith(".weight") and v.dim() == 2 and not k.startswith(("pos_embed", "x_embedder"))}
    lora = kohya_lora_file(tmp_path / "sd3.safetensors", modules, rank=4, alpha=2.0, seed=43,
                           metadata={"ss_base_model_version": "sd3"})
    adapter = load_adapter(lora)
    assert "transformer.joint_blocks.1.context_block.adaLN_modulation.1" in adapter.layers and not adapter.warnings
    names = {layer.source_name: layer.target[len("transformer."):] for layer in adapter.layers.values()}
    reference = direct_merge(base, load_file(str(lora)), names)
    merge(str(sd3["original"]), [AdapterInput(adapter)], tmp_path / "o", device="cpu")
    assert assert_merged(load_file(str(tmp_path / "o" / sd3["original"].name)), reference, base) == len(modules)
    report = validate(adapter, load_base(str(sd3["folder"])))
    assert report.ok and report.matched == report.modules == len(modules)
    merge(str(sd3["folder"]), [AdapterInput(adapter)], tmp_path / "f", device="cpu")
    got = load_file(str(tmp_path / "f" / "transformer" / "diffusion_pytorch_model.safetensors"))
    expected = convert_sd3_transformer_checkpoint_to_diffusers(dict(reference))
    assert assert_merged(got, expected, sd3["state"]) > len(modules)
