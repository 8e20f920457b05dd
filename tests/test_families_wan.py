"""Wan LoRAs in both namings (issue 12): musubi-tuner files (`lora_unet_blocks_0_self_attn_q`, original Wan
names) and diffusers files (`transformer.blocks.0.attn1.to_q`), against the original checkpoint layout, the
diffusers folder and the registry. References: diffusers' own converters, `load_lora_adapter` + `fuse_lora`
(fp32), PEFT's `merge_and_unload`.
"""
from __future__ import annotations

import pytest
import torch
from cli_runner import run_cli
from fixtures_families import (
    WAN_TINY,
    diffusers_fused,
    kohya_lora_file,
    peft_fused,
    peft_lora_file,
    tiny_wan,
    wan_musubi_modules,
    wan_original_state,
)
from safetensors.torch import load_file, save_file
from test_families_flux import assert_merged

from lorahub.base import load_base
from lorahub.formats import load_adapter
from lorahub.inspect import describe
from lorahub.merge import AdapterInput, merge
from lorahub.registry import load_manifest
from lorahub.validate import validate

DIM = WAN_TINY["num_attention_heads"] * WAN_TINY["attention_head_dim"]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    folder = tiny_wan(root / "diffusers")
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    original = root / "wan2.1_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in wan_original_state(state).items()}, str(original))
    return {"root": root, "folder": folder, "original": original, "state": state}


@pytest.fixture(scope="module")
def musubi_file(wan):
    modules = wan_musubi_modules(DIM, WAN_TINY["ffn_dim"], WAN_TINY["num_layers"])
    return kohya_lora_file(wan["root"] / "musubi_wan.safetensors", modules, rank=4, alpha=2.0, seed=21,
                           metadata={"ss_network_module": "networks.lora_wan", "ss_architecture": "wan"})


@pytest.fixture(scope="module")
def diffusers_file(wan):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out", "time_proj"]
    return peft_lora_file(wan["folder"], wan["root"] / "diffusers_lora", targets, rank=4, alpha=8.0, seed=22,
                          pipeline="WanPipeline")


def test_wan_original_layout_is_diffusers_converters_inverse(wan):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    back = convert_wan_transformer_to_diffusers(dict(load_file(str(wan["original"]))))
    assert set(back) == set(wan["state"]) and all(torch.equal(back[k], wan["state"][k]) for k in back)


def test_musubi_wan_detect_and_inspect(musubi_file):
    adapter = load_adapter(musubi_file)
    assert adapter.format == "kohya" and not adapter.warnings
    assert "transformer.blocks.0.self_attn.q" in adapter.layers
    assert "transformer.blocks.1.ffn.2" in adapter.layers
    info = describe(adapter, read_data=False)
    assert info["components"] == {"transformer": 20}
    assert info["family"] == {"name": "wan", "label": "Wan", "naming": "Wan original"}


@pytest.mark.parametrize("which", ["musubi", "diffusers"])
def test_wan_validates_against_both_layouts(wan, musubi_file, diffusers_file, which):
    adapter = load_adapter(musubi_file if which == "musubi" else diffusers_file)
    for base in (wan["original"], wan["folder"]):
        report = validate(adapter, load_base(str(base)))
        assert report.ok and report.matched == report.modules == len(adapter.layers), (base, report.problems[:3])


@pytest.mark.parametrize("which", ["musubi", "diffusers"])
@pytest.mark.parametrize("into", ["folder", "original"])
def test_wan_merge_equals_fuse_lora(wan, musubi_file, diffusers_file, tmp_path, which, into):
    lora = musubi_file if which == "musubi" else diffusers_file
    reference, loaded = diffusers_fused(wan["folder"], lora, "WanPipeline")
    assert loaded == len(load_adapter(lora).layers)
    base = wan["folder"] if into == "folder" else wan["original"]
    merge(str(base), [AdapterInput(load_adapter(lora))], tmp_path / "out", device="cpu")
    if into == "folder":
        got = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
        assert assert_merged(got, reference, wan["state"]) == loaded
    else:
        got = load_file(str(tmp_path / "out" / wan["original"].name))
        assert assert_merged(got, wan_original_state(reference), load_file(str(wan["original"]))) == loaded


@pytest.mark.parametrize("which", ["musubi", "diffusers"])
@pytest.mark.parametrize("to", ["diffusers", "kohya", "peft"])
def test_wan_convert_loads_in_the_peers(wan, musubi_file, diffusers_file, tmp_path, which, to):
    lora = musubi_file if which == "musubi" else diffusers_file
    if which == "diffusers" and to == "kohya":
        # musubi-tuner's names cover the blocks' Linear layers; diffusers' musubi converter wants every one
        pytest.skip("a diffusers Wan LoRA on proj_out/time_proj has no musubi-tuner file to become")
    reference, loaded = diffusers_fused(wan["folder"], lora, "WanPipeline")
    out = tmp_path / ("peft" if to == "peft" else f"{to}.safetensors")
    result = run_cli("convert", lora, "--to", to, "--out", out)
    assert result.returncode == 0, result.stderr
    got, count = (peft_fused(wan["folder"], out) if to == "peft" else diffusers_fused(wan["folder"], out, "WanPipeline"))
    assert count == loaded
    assert_merged(got, reference, wan["state"])
    keys = set(load_file(str(out if to != "peft" else out / "adapter_model.safetensors")))
    if to == "kohya":
        assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in keys
    elif to == "diffusers":
        assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys


def test_diffusers_wan_attention_to_musubi_names(wan, tmp_path):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    lora = peft_lora_file(wan["folder"], tmp_path / "lora", targets, rank=4, alpha=8.0, seed=23, pipeline="WanPipeline")
    reference, loaded = diffusers_fused(wan["folder"], lora, "WanPipeline")
    out = tmp_path / "k.safetensors"
    assert run_cli("convert", lora, "--to", "kohya", "--out", out).returncode == 0
    assert "lora_unet_blocks_1_cross_attn_o.alpha" in load_file(str(out))
    got, count = diffusers_fused(wan["folder"], out, "WanPipeline")
    assert count == loaded == 20
    assert_merged(got, reference, wan["state"])


@pytest.mark.parametrize("registry", ["wan2.1-t2v-1.3b"])
def test_registry_validates_musubi_and_diffusers_wan_files(tmp_path, registry):
    modules = wan_musubi_modules(1536, 8960, 30)
    musubi = kohya_lora_file(tmp_path / "m.safetensors", modules, rank=1, alpha=1.0, seed=1)
    base = load_manifest(registry)
    report = validate(load_adapter(musubi), base)
    assert report.ok and report.matched == 300, report.problems[:3]
    assert run_cli("validate", musubi, "--base", registry).returncode == 0
    converted = tmp_path / "d.safetensors"
    assert run_cli("convert", musubi, "--to", "diffusers", "--out", converted).returncode == 0
    report = validate(load_adapter(converted), base)
    assert report.ok and report.matched == 300, report.problems[:3]
    wrong = validate(load_adapter(musubi), load_manifest("wan2.1-t2v-14b"))
    assert not wrong.ok


def test_wan_comfy_file_with_diff_b_and_norm_diffs(wan, tmp_path):
    """The Wan LoRAs most people download (lightx2v/CausVid style: `diffusion_model.blocks.0.self_attn.q.lora_down.weight`,
    `.alpha`, a `.diff_b` bias delta per module, `.diff` on norms): merged into the diffusers folder and the
    original file as diffusers loads and fuses the LoRA and its diff_b (PEFT `lora_bias`); the norm diffs,
    which diffusers 0.42 drops with a debug message, are added as ComfyUI adds them; nothing is dropped."""
    import re

    gen = torch.Generator().manual_seed(31)
    tensors = {}
    for module, (n, k) in wan_musubi_modules(DIM, WAN_TINY["ffn_dim"], WAN_TINY["num_layers"]).items():
        name = "diffusion_model." + re.sub(r"^blocks_(\d+)_(self_attn|cross_attn|ffn)_", r"blocks.\1.\2.", module)
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, k, generator=gen) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(n, 4, generator=gen) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
        tensors[f"{name}.diff_b"] = torch.randn(n, generator=gen) * 0.01
    norm = torch.randn(DIM, generator=gen) * 0.01
    lora = tmp_path / "wan_lightx2v_style.safetensors"
    save_file(tensors, str(lora))
    reference, loaded = diffusers_fused(wan["folder"], lora, "WanPipeline")
    assert loaded == len(load_adapter(lora).layers) == 2 * 10
    with_norm = tmp_path / "with_norm.safetensors"
    save_file({**tensors, "diffusion_model.blocks.0.norm3.diff": norm}, str(with_norm))
    assert validate(load_adapter(with_norm), load_base(str(wan["folder"]))).ok
    for into in ("folder", "original"):
        base = wan["folder"] if into == "folder" else wan["original"]
        merge(str(base), [AdapterInput(load_adapter(lora))], tmp_path / f"out-{into}", device="cpu")
        merge(str(base), [AdapterInput(load_adapter(with_norm))], tmp_path / f"norm-{into}", device="cpu")
        rel = "transformer/diffusion_pytorch_model.safetensors" if into == "folder" else wan["original"].name
        got = load_file(str(tmp_path / f"out-{into}" / rel))
        ref = reference if into == "folder" else wan_original_state(reference)
        base_state = wan["state"] if into == "folder" else load_file(str(wan["original"]))
        changed = assert_merged(got, ref, base_state)
        assert changed == 2 * 10 * 2  # every module's weight and bias: diff_b applied, not dropped
        normed = load_file(str(tmp_path / f"norm-{into}" / rel))
        key = "blocks.0.norm2.weight" if into == "folder" else "blocks.0.norm3.weight"
        assert torch.equal(normed[key], base_state[key] + norm)
        assert all(torch.equal(normed[k], got[k]) for k in got if k != key)
