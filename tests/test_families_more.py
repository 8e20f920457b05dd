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
