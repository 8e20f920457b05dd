"""File layouts found in the wild (issue 12): ComfyUI dotted keys, kohya names for `diffusion_model.*`,
XLabs Flux LoRAs, old diffusers attention-processor LoRAs, text encoders after `--to diffusers`, PEFT
weights without their config. Every file is built in its exact key layout; every expected value comes
from the peer that reads that layout (diffusers' converters, loaders and `fuse_lora`, PEFT's merge)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from fixtures_models import _unet_config, load_file_state
from safetensors.torch import save_file

from lorahub.formats import load_adapter

warnings.filterwarnings("ignore", category=FutureWarning)


def _peft_merge_all(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Merge every PEFT LoRA layer of `model` in place (fp32) and return the merged weights by module name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            out[name] = module.get_base_layer().weight.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------
# old diffusers attention-processor LoRAs: `…attn1.processor.to_out_lora.up.weight`


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(7)
    return UNet2DConditionModel(**_unet_config()).eval()


def test_old_attention_processor_lora_targets_to_out_0(tmp_path):
    """An old diffusers LoRA (`attn1.processor.to_q_lora.down.weight`, `to_out_lora`): lorahub's targets are
    the modules diffusers itself loads it into (`to_out.0`), and the merge equals diffusers' fused UNet."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    unet = _tiny_unet()
    base_dir = tmp_path / "sd"
    unet.save_pretrained(str(base_dir / "unet"))
    torch.manual_seed(11)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                linear = module.to_out[0] if proj == "to_out" else getattr(module, proj)
                tensors[f"unet.{name}.processor.{proj}_lora.down.weight"] = torch.randn(2, linear.in_features) * 0.1
                tensors[f"unet.{name}.processor.{proj}_lora.up.weight"] = torch.randn(linear.out_features, 2) * 0.1
    lora = tmp_path / "old.safetensors"
    save_file(tensors, str(lora))

    adapter = load_adapter(lora)
    assert adapter.format == "diffusers" and len(adapter.layers) == len(tensors) // 2
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in adapter.layers
    assert not any(target.endswith(".to_out") for target in adapter.layers)

    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(lora))
    unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas)
    loaded = {name.removesuffix(".lora_A") for name, _ in unet.named_modules() if name.endswith(".lora_A")}
    assert {f"unet.{name}" for name in loaded} == set(adapter.layers)
    fused = _peft_merge_all(unet)

    run_cli("validate", lora, "--base", base_dir, check=True)
    run_cli("merge", lora, "--base", base_dir, "--out", tmp_path / "merged", "--dtype", "fp32", check=True)
    merged = load_file_state(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    for name, weight in fused.items():
        torch.testing.assert_close(merged[f"{name}.weight"], weight, rtol=0, atol=2e-6)


def test_old_text_encoder_processor_names_map_to_clip_projections(tmp_path):
    """Old text-encoder keys (`self_attn.to_q_lora.down.weight`) adapt `q_proj` … `out_proj`, as diffusers'
    DIFFUSERS_OLD → PEFT table maps them."""
    tensors = {}
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        stem = f"text_encoder.text_model.encoder.layers.0.self_attn.{proj}_lora"
        tensors[f"{stem}.down.weight"] = torch.randn(2, 32)
        tensors[f"{stem}.up.weight"] = torch.randn(32, 2)
    lora = tmp_path / "old_te.safetensors"
    save_file(tensors, str(lora))
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT

    expected = set()
    for key in tensors:
        for old, new in DIFFUSERS_OLD_TO_PEFT.items():
            if old in key:
                expected.add(key.replace(old, new).rsplit(".lora_", 1)[0])
                break
    assert set(load_adapter(lora).layers) == expected


# ---------------------------------------------------------------------------------------------
# text encoders after `--to diffusers` load in diffusers + transformers 5


def _clip(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=16)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


_CLIP_LEAVES = {"self_attn_q_proj": (32, 32), "self_attn_k_proj": (32, 32), "self_attn_v_proj": (32, 32),
                "self_attn_out_proj": (32, 32), "mlp_fc1": (32, 37), "mlp_fc2": (37, 32)}


def _kohya_text_encoder_lora(path: Path, prefixes: list[str]) -> Path:
    """A kohya file for CLIP text encoders (every attention and MLP projection, as kohya trains them), with
    one module of another rank and one of another alpha (so the converted file needs rank/alpha patterns)."""
    torch.manual_seed(5)
    tensors = {}
    for prefix in prefixes:
        for layer in range(2):
            for leaf, (fan_in, fan_out) in _CLIP_LEAVES.items():
                name = f"{prefix}text_model_encoder_layers_{layer}_{leaf}"
                rank = 6 if (layer, leaf) == (1, "mlp_fc1") else 4
                tensors[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in) * 0.2
                tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank) * 0.2
                tensors[f"{name}.alpha"] = torch.tensor(8.0 if (layer, leaf) == (0, "self_attn_v_proj") else 2.0)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def _fused_text_encoders(lora: Path, loader, specs: list[tuple[str, bool]]) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own load of `lora` into fresh CLIP text encoders (`lora_state_dict` →
    `load_lora_into_text_encoder` with the file's metadata), merged in fp32."""
    state, alphas, metadata = loader.lora_state_dict(str(lora), return_lora_metadata=True)
    out = {}
    for prefix, with_projection in specs:
        model = _clip(with_projection, seed=len(prefix))
        loader.load_lora_into_text_encoder(state, alphas, model, prefix=prefix, metadata=metadata or None)
        out[prefix] = _peft_merge_all(model)
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text_encoders_after_to_diffusers_load_like_the_kohya_file(tmp_path, family):
    """kohya text-encoder LoRA → `convert --to diffusers` → diffusers (transformers 5 CLIPTextModel, which
    has no `text_model.` module) loads every layer with the same fused weights as the kohya file itself."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    if family == "sd15":
        loader, prefixes, specs = StableDiffusionLoraLoaderMixin, ["lora_te_"], [("text_encoder", False)]
    else:
        loader, prefixes = StableDiffusionXLLoraLoaderMixin, ["lora_te1_", "lora_te2_"]
        specs = [("text_encoder", False), ("text_encoder_2", True)]
    kohya = _kohya_text_encoder_lora(tmp_path / "kohya.safetensors", prefixes)
    converted = tmp_path / "diffusers.safetensors"
    run_cli("convert", kohya, "--to", "diffusers", "--out", converted, check=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _fused_text_encoders(kohya, loader, specs)
        result = _fused_text_encoders(converted, loader, specs)
    kohya_tensors = load_file_state(kohya)
    for (prefix, with_projection), kohya_prefix in zip(specs, prefixes):
        assert len(reference[prefix]) == 2 * len(_CLIP_LEAVES), sorted(reference[prefix])
        assert set(result[prefix]) == set(reference[prefix])
        base = _clip(with_projection, seed=len(prefix)).state_dict()
        for name, weight in reference[prefix].items():
            inner = name.removeprefix("text_model.")
            # the module with its own alpha: diffusers 0.42 fuses the kohya file's text-encoder module
            # at the file's common alpha instead of its own (measured: 0.65 and 0.69 off here, both
            # encoders); the converted file carries it in an alpha_pattern, so that one is compared
            # with kohya's definition W + α/r·up·down
            if inner == "encoder.layers.0.self_attn.v_proj":
                stem = f"{kohya_prefix}text_model_{inner.replace('.', '_')}"
                down, up = kohya_tensors[f"{stem}.lora_down.weight"], kohya_tensors[f"{stem}.lora_up.weight"]
                weight = base[f"{name}.weight"] + kohya_tensors[f"{stem}.alpha"] / down.shape[0] * up @ down
            torch.testing.assert_close(result[prefix][name], weight, rtol=0, atol=1e-6)
