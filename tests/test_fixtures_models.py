"""Sanity checks of the real-peer fixtures in fixtures_models.py (and of the peers' math)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from fixtures_models import (
    KOHYA_ALPHA,
    KOHYA_RANK,
    LLAMA_TARGETS,
    load_file_metadata,
    load_file_state,
    make_tiny_llama,
    peft_merged_state_dict,
    reference_fused_unet_state_dict,
)

P = "base_model.model."


def _adapter(d):
    return load_file_state(d / "adapter_model.safetensors"), json.loads((d / "adapter_config.json").read_text())


def _close(a, b, tol=1e-5):
    return torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- bases


def test_tiny_llama_layout(tiny_llama_dir):
    names = {p.name for p in tiny_llama_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in names)
    sd = load_file_state(tiny_llama_dir / "model.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_sharded_and_bf16_hold_same_weights(tiny_llama_dir, tiny_llama_sharded_dir, tiny_llama_bf16_dir):
    ref = load_file_state(tiny_llama_dir / "model.safetensors")
    shards = sorted(tiny_llama_sharded_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((tiny_llama_sharded_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    sharded = load_file_state(tiny_llama_sharded_dir)
    assert set(sharded) == set(ref) and all(torch.equal(sharded[k], ref[k]) for k in ref)

    bf = load_file_state(tiny_llama_bf16_dir / "model.safetensors")
    assert set(bf) == set(ref)
    assert all(v.dtype == torch.bfloat16 for v in bf.values())
    assert all(torch.equal(bf[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert json.loads((tiny_llama_bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_wide_llama_shapes(wide_llama_dir):
    sd = load_file_state(wide_llama_dir / "model.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (96, 96)
    assert sd["model.layers.0.mlp.up_proj.weight"].shape == (192, 96)


def test_base_models_load_with_peers(tiny_llama_sharded_dir, tiny_gpt2_dir, tiny_unet_dir):
    from diffusers import UNet2DConditionModel
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(str(tiny_llama_sharded_dir))
    gpt2 = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_dir))
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    unet = UNet2DConditionModel.from_pretrained(str(tiny_unet_dir), subfolder="unet")
    assert unet.config.block_out_channels == [32, 64] or tuple(unet.config.block_out_channels) == (32, 64)
    index = json.loads((tiny_unet_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_build_is_deterministic(tmp_path, tiny_llama_dir):
    again = make_tiny_llama(tmp_path / "again")

    def h(p):
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    assert h(again) == h(tiny_llama_dir)


# ---------------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize(
    "name,base",
    [
        ("peft_lora_dir", "tiny_llama_dir"),
        ("peft_rslora_dir", "tiny_llama_dir"),
        ("peft_dora_dir", "tiny_llama_dir"),
        ("peft_embed_dir", "tiny_llama_dir"),
        ("peft_gpt2_dir", "tiny_gpt2_dir"),
        ("peft_wide_dir", "wide_llama_dir"),
    ],
)
def test_peft_adapters_are_real(request, name, base):
    adapter_dir = request.getfixturevalue(name)
    base_dir = request.getfixturevalue(base)
    sd, cfg = _adapter(adapter_dir)
    assert cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == str(base_dir)
    assert all(k.startswith(P) for k in sd)
    factors = [k for k in sd if "lora_B" in k or "lora_embedding_B" in k]
    assert factors
    for k in factors:
        assert sd[k].abs().min() > 0, k  # not PEFT's zero init


def test_peft_lora_merge_changes_exactly_targets(tiny_llama_dir, peft_lora_dir):
    base = load_file_state(tiny_llama_dir / "model.safetensors")
    merged = peft_merged_state_dict(tiny_llama_dir, peft_lora_dir)
    ad, cfg = _adapter(peft_lora_dir)
    assert set(merged) == set(base)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    expected = {k for k in base if k.endswith(".weight") and k.split(".")[-2] in LLAMA_TARGETS}
    assert changed == expected and len(expected) == 14
    s = cfg["lora_alpha"] / cfg["r"]
    for k in expected:
        mod = P + k[: -len(".weight")]
        delta = s * ad[mod + ".lora_B.weight"] @ ad[mod + ".lora_A.weight"]
        assert _close(merged[k], base[k] + delta), k


def test_peft_rslora_patterns(tiny_llama_dir, peft_rslora_dir):
    ad, cfg = _adapter(peft_rslora_dir)
    assert cfg["use_rslora"] is True
    assert cfg["rank_pattern"] == {"q_proj": 4, "model.layers.1.mlp.down_proj": 12}
    assert cfg["alpha_pattern"] == {"v_proj": 32}

    def rank(m):
        return ad[f"{P}model.{m}.lora_A.weight"].shape[0]

    assert rank("layers.0.self_attn.q_proj") == 4 and rank("layers.1.self_attn.q_proj") == 4
    assert rank("layers.0.mlp.down_proj") == 8 and rank("layers.1.mlp.down_proj") == 12
    assert rank("layers.0.self_attn.v_proj") == 8

    base = load_file_state(tiny_llama_dir / "model.safetensors")
    merged = peft_merged_state_dict(tiny_llama_dir, peft_rslora_dir)
    scales = {
        "layers.0.self_attn.q_proj": 16 / math.sqrt(4),
        "layers.1.mlp.down_proj": 16 / math.sqrt(12),
        "layers.0.mlp.down_proj": 16 / math.sqrt(8),
        "layers.1.self_attn.v_proj": 32 / math.sqrt(8),
        "layers.1.self_attn.k_proj": 16 / math.sqrt(8),
    }
    for m, s in scales.items():
        mod = f"{P}model.{m}"
        k = f"model.{m}.weight"
        assert _close(merged[k], base[k] + s * ad[mod + ".lora_B.weight"] @ ad[mod + ".lora_A.weight"]), m
    # gate/up are not targeted here
    assert torch.equal(merged["model.layers.0.mlp.gate_proj.weight"], base["model.layers.0.mlp.gate_proj.weight"])


def test_peft_dora_magnitudes_are_trained(tiny_llama_dir, peft_dora_dir):
    base = load_file_state(tiny_llama_dir / "model.safetensors")
    ad, cfg = _adapter(peft_dora_dir)
    assert cfg["use_dora"] is True
    mags = [k for k in ad if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 4  # q_proj, v_proj × 2 layers; no ".weight" suffix on disk
    merged = peft_merged_state_dict(tiny_llama_dir, peft_dora_dir)
    s = cfg["lora_alpha"] / cfg["r"]
    for mk in mags:
        mod = mk[: -len(".lora_magnitude_vector")]
        k = mod[len(P) :] + ".weight"
        w = base[k] + s * ad[mod + ".lora_B.weight"] @ ad[mod + ".lora_A.weight"]
        norm = w.norm(p=2, dim=1)
        m = ad[mk]
        assert m.shape == (w.shape[0],)
        assert not torch.allclose(m, norm, rtol=1e-3), mk  # perturbed like training would
        assert _close(merged[k], (m / norm)[:, None] * w), k  # DoRA merge formula (formats.md §1.7)


def test_peft_embed_and_modules_to_save(tiny_llama_dir, peft_embed_dir):
    base = load_file_state(tiny_llama_dir / "model.safetensors")
    ad, cfg = _adapter(peft_embed_dir)
    emb = f"{P}model.embed_tokens"
    assert ad[emb + ".lora_embedding_A"].shape == (8, 128)  # (r, num_embeddings)
    assert ad[emb + ".lora_embedding_B"].shape == (64, 8)  # (dim, r)
    assert f"{P}lm_head.weight" in ad
    assert not torch.equal(ad[f"{P}lm_head.weight"], base["lm_head.weight"])
    merged = peft_merged_state_dict(tiny_llama_dir, peft_embed_dir)
    s = cfg["lora_alpha"] / cfg["r"]
    delta = s * (ad[emb + ".lora_embedding_B"] @ ad[emb + ".lora_embedding_A"]).T
    assert _close(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"] + delta)
    assert torch.equal(merged["lm_head.weight"], ad[f"{P}lm_head.weight"])  # modules_to_save replaces


def test_peft_gpt2_conv1d_transposed(tiny_gpt2_dir, peft_gpt2_dir):
    base = load_file_state(tiny_gpt2_dir / "model.safetensors")
    ad, cfg = _adapter(peft_gpt2_dir)
    assert cfg["fan_in_fan_out"] is True
    merged = peft_merged_state_dict(tiny_gpt2_dir, peft_gpt2_dir, model_cls="gpt2")
    s = cfg["lora_alpha"] / cfg["r"]
    for m in ["h.0.attn.c_attn", "h.1.mlp.c_proj", "h.0.attn.c_proj", "h.1.mlp.c_fc"]:
        mod = f"{P}transformer.{m}"
        k = f"transformer.{m}.weight"
        delta = s * (ad[mod + ".lora_B.weight"] @ ad[mod + ".lora_A.weight"]).T  # Conv1D weight is (in, out)
        assert merged[k].shape == base[k].shape == delta.shape
        assert _close(merged[k], base[k] + delta), m


def test_peft_wide_mismatches_tiny(tiny_llama_dir, peft_wide_dir):
    ad, _ = _adapter(peft_wide_dir)
    base = load_file_state(tiny_llama_dir / "model.safetensors")
    a = ad[f"{P}model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape[1] == 96 != base["model.layers.0.self_attn.q_proj.weight"].shape[1]


# ---------------------------------------------------------------------------------------------- kohya


def test_kohya_file_layout(kohya_unet_file):
    sd = load_file_state(kohya_unet_file)
    assert all(k.startswith("lora_unet_") for k in sd)
    modules = {k.split(".")[0] for k in sd}
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(sd), m
        alpha = sd[f"{m}.alpha"]
        assert alpha.ndim == 0 and alpha.dtype == torch.float32
        assert alpha.item() == KOHYA_ALPHA != sd[f"{m}.lora_down.weight"].shape[0] == KOHYA_RANK
        assert sd[f"{m}.lora_up.weight"].abs().min() > 0
    conv3 = sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv3.shape == (4, 32, 3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 4, 1, 1)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in sd
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight" in sd
    meta = load_file_metadata(kohya_unet_file)
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == KOHYA_ALPHA
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"]


def test_reference_fused_unet_matches_hand_math(tiny_unet_dir, kohya_unet_file):
    base = load_file_state(tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors")
    lora = load_file_state(kohya_unet_file)
    fused = reference_fused_unet_state_dict(tiny_unet_dir, kohya_unet_file)
    assert set(fused) == set(base)

    def unscaled_delta(kohya_name, base_key):
        down = lora[f"{kohya_name}.lora_down.weight"]
        up = lora[f"{kohya_name}.lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)).reshape(base[base_key].shape)

    cases = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        ),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0": (
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"
        ),
        "lora_unet_down_blocks_0_attentions_0_proj_in": "down_blocks.0.attentions.0.proj_in.weight",
        "lora_unet_down_blocks_1_resnets_0_conv1": "down_blocks.1.resnets.0.conv1.weight",
        "lora_unet_mid_block_resnets_1_conv2": "mid_block.resnets.1.conv2.weight",
    }
    for kohya_name, key in cases.items():
        delta = unscaled_delta(kohya_name, key)
        s = lora[f"{kohya_name}.alpha"].item() / lora[f"{kohya_name}.lora_down.weight"].shape[0]
        assert s == KOHYA_ALPHA / KOHYA_RANK == 0.5
        assert not torch.equal(fused[key], base[key]), key
        assert _close(fused[key], base[key] + s * delta), key
        # alpha honoured: scale 1 (alpha = rank, what the converter alone would write) does not match
        assert not _close(fused[key], base[key] + delta), key
    n_modules = len({k.split(".")[0] for k in lora})
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert len(changed) == n_modules
    for k in ["conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight", "down_blocks.0.downsamplers.0.conv.weight"]:
        assert torch.equal(fused[k], base[k]), k
