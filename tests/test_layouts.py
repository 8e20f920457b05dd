"""File layouts found in the wild (issue 12): ComfyUI dotted keys, kohya names for `diffusion_model.*`,
XLabs Flux LoRAs, old diffusers attention-processor LoRAs, text encoders after `--to diffusers`, PEFT
weights without their config. Every file is built in its exact key layout; every expected value comes
from the peer that reads that layout (diffusers' converters, loaders and `fuse_lora`, PEFT's merge)."""
from __future__ import annotations

import json
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


def assert_within_ulp(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to within one fp32 ulp of the tensor's largest magnitude (the fused reference rounds the
    product once in another order: diffusers bakes α/r into A, PEFT scales B·A)."""
    tolerance = torch.finfo(torch.float32).eps * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)


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
        assert_within_ulp(merged[f"{name}.weight"], weight)
    # converted to kohya names (`…attn1_to_out_0`), diffusers' own kohya load fuses the same UNet
    from fixtures_models import reference_fused_unet_state_dict

    run_cli("convert", lora, "--to", "kohya", "--out", tmp_path / "kohya.safetensors", check=True)
    via_kohya = reference_fused_unet_state_dict(base_dir, tmp_path / "kohya.safetensors")
    for name, weight in fused.items():
        assert_within_ulp(via_kohya[f"{name}.weight"], weight)


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
            assert_within_ulp(result[prefix][name], weight)


# ---------------------------------------------------------------------------------------------
# Flux: a tiny diffusers transformer and the same weights in the original (BFL) layout


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(3)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(2, 2, 4)).eval()


# original-layout Flux module -> the diffusers modules whose weights it stacks (rows), as diffusers'
# own converters split them (`_convert_kohya_flux_lora_to_diffusers`, `_convert_xlabs_flux_lora_to_diffusers`)
FLUX_ORIGINAL = {
    "double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_attn.qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"],
    "double_blocks.0.txt_attn.proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.net.0.proj"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.net.2"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.net.0.proj"],
    "double_blocks.0.txt_mlp.2": ["transformer_blocks.0.ff_context.net.2"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
}


def _original_flux_file(model, path: Path, prefix: str = "") -> Path:
    """The diffusers model's weights under original-layout names (fused rows stacked), as one file."""
    state = model.state_dict()
    tensors = {}
    for original, parts in FLUX_ORIGINAL.items():
        for param in ("weight", "bias"):
            tensors[f"{prefix}{original}.{param}"] = torch.cat([state[f"{p}.{param}"] for p in parts]).contiguous()
    save_file(tensors, str(path))
    return path


def _fused_flux(lora: Path) -> dict[str, torch.Tensor]:
    """diffusers' own load of a Flux LoRA file (`FluxPipeline.lora_state_dict` → `load_lora_adapter`),
    merged in fp32: the weights by diffusers module name."""
    from diffusers import FluxPipeline

    model = _tiny_flux()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas = FluxPipeline.lora_state_dict(str(lora), return_alphas=True)
        model.load_lora_adapter(state, prefix="transformer", network_alphas=alphas)
    return _peft_merge_all(model)


def _compare_original_merge(merged: dict[str, torch.Tensor], fused: dict[str, torch.Tensor],
                            prefix: str = "") -> int:
    """Each fused diffusers weight equals its row block of the merged original-layout weight."""
    checked = 0
    for original, parts in FLUX_ORIGINAL.items():
        if not all(p in fused for p in parts):
            continue
        assert_within_ulp(merged[f"{prefix}{original}.weight"], torch.cat([fused[p] for p in parts]))
        checked += 1
    return checked


# ---------------------------------------------------------------------------------------------
# ComfyUI dotted keys: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` + `.alpha`

_DOUBLE = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
           "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
           "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2"]


def _comfy_flux_lora(path: Path, shapes: dict[str, tuple[int, int]], *, peft_keys: bool = False,
                     text: dict[str, tuple[int, int]] | None = None, rank: int = 4) -> Path:
    """A ComfyUI-layout Flux LoRA (as ComfyUI's LoraSave names it: `diffusion_model.<original path>`,
    `text_encoders.clip_l.transformer.<path>`), alpha ≠ rank; `lora_A`/`lora_B` keys with `peft_keys`."""
    torch.manual_seed(9)
    down, up = (".lora_A.weight", ".lora_B.weight") if peft_keys else (".lora_down.weight", ".lora_up.weight")
    tensors = {}
    modules = {f"diffusion_model.{m}": s for m, s in shapes.items()}
    modules.update({f"text_encoders.clip_l.transformer.{m}": s for m, s in (text or {}).items()})
    for i, (module, (fan_out, fan_in)) in enumerate(modules.items()):
        tensors[module + down] = torch.randn(rank, fan_in) * 0.1
        tensors[module + up] = torch.randn(fan_out, rank) * 0.1
        tensors[module + ".alpha"] = torch.tensor(2.0 + i % 3)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("peft_keys", [False, True], ids=["lora_down", "lora_A"])
def test_comfyui_flux_lora_reads_dotted_names_and_merges_like_diffusers(tmp_path, peft_keys):
    """ComfyUI dotted keys are read verbatim (not `diffusion.model.double.blocks…`); validate finds them
    in an original-layout Flux file and in a ComfyUI checkpoint (`model.diffusion_model.…`); the merge
    equals diffusers' own load (its kohya/ComfyUI Flux converter) and fp32 fuse."""
    model = _tiny_flux()
    shapes = {m: tuple(torch.cat([model.state_dict()[f"{p}.weight"] for p in FLUX_ORIGINAL[m]]).shape)
              for m in _DOUBLE}
    lora = _comfy_flux_lora(tmp_path / "comfy.safetensors", shapes, peft_keys=peft_keys)
    adapter = load_adapter(lora)
    assert set(adapter.layers) == {f"diffusion_model.{m}" for m in _DOUBLE}
    assert adapter.format == ("diffusers" if peft_keys else "kohya")
    info = json.loads(run_cli("inspect", lora, "--json", check=True).stdout)
    assert info["modules"] == len(_DOUBLE)

    bare = _original_flux_file(model, tmp_path / "flux1-tiny.safetensors")
    checkpoint = _original_flux_file(model, tmp_path / "comfy-ckpt.safetensors", prefix="model.diffusion_model.")
    for base in (bare, checkpoint):
        report = json.loads(run_cli("validate", lora, "--base", base, "--json", check=True).stdout)
        assert report["ok"] and report["matched"] == len(_DOUBLE), report

    # diffusers reads the `lora_down` spelling (its ComfyUI branch); ComfyUI reads both spellings as one
    # LoRA (comfy/weight_adapter), so the reference for `lora_A` keys is diffusers' load of the same tensors
    reference = lora if not peft_keys else _comfy_flux_lora(tmp_path / "comfy-down.safetensors", shapes)
    fused = _fused_flux(reference)
    for base, prefix in ((bare, ""), (checkpoint, "model.diffusion_model.")):
        out = tmp_path / f"merged-{base.stem}"
        run_cli("merge", lora, "--base", base, "--out", out, "--dtype", "fp32", check=True)
        merged = load_file_state(out / base.name)
        assert _compare_original_merge(merged, fused, prefix) == len(_DOUBLE)


# the modules of one double and one single block at Flux's real width (3072; diffusers' kohya Flux
# converter splits single-block `linear1` at fixed 3072/12288 row blocks)
_FLUX_REAL = {"double_blocks.0.img_attn.qkv": (9216, 3072), "double_blocks.0.img_attn.proj": (3072, 3072),
              "double_blocks.0.txt_attn.qkv": (9216, 3072), "double_blocks.0.img_mlp.0": (12288, 3072),
              "double_blocks.0.txt_mlp.2": (3072, 12288), "single_blocks.0.linear1": (21504, 3072),
              "single_blocks.0.linear2": (3072, 15360)}
_CLIP_L = {"text_model.encoder.layers.0.self_attn.q_proj": (768, 768), "text_model.encoder.layers.0.mlp.fc1": (3072, 768)}


def test_comfyui_flux_to_kohya_writes_lora_unet_names_diffusers_reads_alike(tmp_path):
    """`convert --to kohya` of a ComfyUI Flux file writes kohya's names (`lora_unet_double_blocks_0_img_attn_qkv`,
    `lora_te_text_model_…`), not `lora_diffusion_model_…`; diffusers' Flux converter turns the written file
    into exactly the layers it makes of the ComfyUI file."""
    from diffusers import FluxPipeline

    lora = _comfy_flux_lora(tmp_path / "comfy.safetensors", _FLUX_REAL, text=_CLIP_L, rank=2)
    out = tmp_path / "kohya.safetensors"
    run_cli("convert", lora, "--to", "kohya", "--out", out, check=True)
    written = load_file_state(out)
    modules = {key.rsplit(".", 2)[0] for key in written if key.endswith(".lora_down.weight")}
    assert modules == {"lora_unet_" + m.replace(".", "_") for m in _FLUX_REAL} | {
        "lora_te_" + m.replace(".", "_") for m in _CLIP_L}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, _ = FluxPipeline.lora_state_dict(str(lora), return_alphas=True)
        got, _ = FluxPipeline.lora_state_dict(str(out), return_alphas=True)
    assert len(expected) == 2 * (3 + 1 + 3 + 1 + 1 + 4 + 1) + 2 * len(_CLIP_L)
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    # and back: the kohya file reads as the same ComfyUI targets (lorahub.layers metadata), same deltas
    source, back = load_adapter(lora), load_adapter(out)
    assert set(back.layers) == set(source.layers)
    for target in ("diffusion_model.double_blocks.0.img_attn.proj", "text_encoders.clip_l.transformer."
                   "text_model.encoder.layers.0.self_attn.q_proj"):
        torch.testing.assert_close(back.layers[target].delta_math(), source.layers[target].delta_math())



@pytest.mark.parametrize("to", ["diffusers", "peft"])
def test_comfyui_text_encoders_to_diffusers_or_peft_are_refused_not_dropped(tmp_path, to):
    """diffusers/PEFT have no reader for ComfyUI's `text_encoders.clip_l.transformer.…` names: a converted file
    would load those modules as nothing, so the conversion is refused with one line, and nothing is written."""
    lora = _comfy_flux_lora(tmp_path / "comfy.safetensors", _FLUX_REAL, text=_CLIP_L, rank=2)
    out = tmp_path / ("out.safetensors" if to == "diffusers" else "out")
    result = run_cli("convert", lora, "--to", to, "--out", out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "text_encoders.clip_l.transformer.text_model" in result.stderr and "--to kohya" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["comfy.safetensors"]


def test_comfyui_flux_with_text_encoder_fits_the_flux_registry_entries(tmp_path):
    """The FLUX.1 manifests hold the text encoders too (CLIP-L, T5-XXL), so a ComfyUI Flux file that trains
    CLIP-L validates offline against flux.1-dev, and so does its `--to kohya` conversion; against another
    model's entry it fails, naming the modules."""
    lora = _comfy_flux_lora(tmp_path / "comfy.safetensors", _FLUX_REAL, text=_CLIP_L, rank=2)
    for base in ("flux.1-dev", "flux.1-schnell"):
        result = run_cli("validate", lora, "--base", base)
        assert result.returncode == 0 and "9/9 modules" in result.stdout, result.stdout + result.stderr
    run_cli("convert", lora, "--to", "kohya", "--out", tmp_path / "kohya.safetensors", check=True)
    result = run_cli("validate", tmp_path / "kohya.safetensors", "--base", "flux.1-dev")
    assert result.returncode == 0 and "9/9 modules" in result.stdout, result.stdout + result.stderr
    wrong = run_cli("validate", lora, "--base", "sd3.5-large")
    assert wrong.returncode == 1 and "diffusion_model.double_blocks.0.img_attn.qkv" in wrong.stdout

def _ldm_checkpoint(unet, clip, path: Path) -> Path:
    """An SD 1.x single-file checkpoint (`model.diffusion_model.<LDM>`, `cond_stage_model.transformer.…`) of
    a diffusers UNet and CLIP text model, checked with diffusers' own `convert_ldm_unet_checkpoint`."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lorahub.names import diffusers_to_ldm_unet

    config = dict(unet.config)
    up_attn = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    state = unet.state_dict()
    checkpoint = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        ldm = diffusers_to_ldm_unet(module, config["layers_per_block"], up_attn)
        checkpoint[f"model.diffusion_model.{ldm}.{param}"] = value.contiguous()
    back = convert_ldm_unet_checkpoint(dict(checkpoint), config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    for key, value in clip.state_dict().items():
        checkpoint[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = value.contiguous()
    save_file(checkpoint, str(path))
    return path


def test_comfyui_sd_lora_with_text_encoder_merges_into_sd_checkpoint(tmp_path, tiny_unet_dir, kohya_unet_file):
    """A ComfyUI SD LoRA (`diffusion_model.input_blocks.1.1.proj_in`, `text_encoders.clip_l.transformer.
    text_model.…`: LDM names, as ComfyUI saves them) validates against and merges into an SD single-file
    checkpoint, equal to diffusers' fuse of the same LoRA in kohya's names; `--to kohya` gives a file that
    diffusers loads (SGM `lora_unet_input_blocks_…` names) with the same fused UNet."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from fixtures_models import reference_fused_unet_state_dict

    from lorahub.names import diffusers_to_ldm_unet

    unet = UNet2DConditionModel.from_pretrained(str(tiny_unet_dir), subfolder="unet").eval()
    config = dict(unet.config)
    up_attn = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    clip = _clip(False, seed=len("text_encoder"))
    checkpoint = _ldm_checkpoint(unet, clip, tmp_path / "sd-tiny.safetensors")

    # the ComfyUI file: the kohya fixture's UNet modules under their LDM names, plus a CLIP text-encoder part
    kohya = load_file_state(kohya_unet_file)
    te = load_file_state(_kohya_text_encoder_lora(tmp_path / "te.safetensors", ["lora_te_"]))
    adapter = load_adapter(kohya_unet_file)
    comfy = {}
    for target, layer in adapter.layers.items():
        ldm = diffusers_to_ldm_unet(target.removeprefix("unet."), config["layers_per_block"], up_attn)
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            comfy[f"diffusion_model.{ldm}{suffix}"] = kohya[layer.source_name + suffix]
    for key, value in te.items():
        stem, _, suffix = key.partition(".")
        path = stem.removeprefix("lora_te_text_model_")
        layer_no, leaf = path.removeprefix("encoder_layers_").split("_", 1)
        leaf = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
                "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
                "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}[leaf]
        comfy[f"text_encoders.clip_l.transformer.text_model.encoder.layers.{layer_no}.{leaf}.{suffix}"] = value
    lora = tmp_path / "comfy-sd.safetensors"
    save_file(comfy, str(lora))
    assert len(load_adapter(lora).layers) == len(adapter.layers) + 2 * len(_CLIP_LEAVES)

    report = json.loads(run_cli("validate", lora, "--base", checkpoint, "--json", check=True).stdout)
    assert report["ok"] and report["matched"] == len(adapter.layers) + 2 * len(_CLIP_LEAVES), report
    # the diffusers folder (a UNet alone): every UNet module found through its LDM alias, the text-encoder
    # modules reported missing
    folder = json.loads(run_cli("validate", lora, "--base", tiny_unet_dir, "--json").stdout)
    assert not folder["ok"] and folder["matched"] == len(adapter.layers), folder["headline"]
    run_cli("merge", lora, "--base", checkpoint, "--out", tmp_path / "merged", "--dtype", "fp32", check=True)
    merged = load_file_state(tmp_path / "merged" / checkpoint.name)
    expected = reference_fused_unet_state_dict(tiny_unet_dir, kohya_unet_file)
    unet_merged = convert_ldm_unet_checkpoint({k: v for k, v in merged.items() if k.startswith("model.")}, config)
    for key, value in expected.items():
        assert_within_ulp(unet_merged[key], value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = _fused_text_encoders(tmp_path / "te.safetensors", StableDiffusionLoraLoaderMixin,
                                    [("text_encoder", False)])["text_encoder"]
    for name, value in text.items():
        if name != "encoder.layers.0.self_attn.v_proj":  # diffusers misreads its per-module alpha (see above)
            assert_within_ulp(merged[f"cond_stage_model.transformer.text_model.{name}.weight"], value)

    # --to kohya: kohya's SGM names, which diffusers maps to its UNet with the same fused result
    out = tmp_path / "kohya-sgm.safetensors"
    run_cli("convert", lora, "--to", "kohya", "--out", out, check=True)
    names = {k.rsplit(".", 2)[0] for k in load_file_state(out) if k.endswith(".lora_down.weight")}
    assert "lora_unet_input_blocks_1_1_proj_in" in names and not any("diffusion_model" in n for n in names)
    fresh = UNet2DConditionModel.from_pretrained(str(tiny_unet_dir), subfolder="unet").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # as `pipe.load_lora_weights` calls it: the UNet's config maps SGM block names
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(out), unet_config=fresh.config)
        fresh.load_lora_adapter(state, prefix="unet", network_alphas=alphas)
    fused = _peft_merge_all(fresh)
    assert len(fused) == len(adapter.layers)
    for name, value in fused.items():
        assert_within_ulp(value, expected[f"{name}.weight"])


# ---------------------------------------------------------------------------------------------
# XLabs Flux LoRAs: `double_blocks.0.processor.qkv_lora1.down.weight`


def _xlabs_lora(path: Path, dim: int, mlp: int, rank: int = 4, prefix: str = "") -> Path:
    """An XLabs (x-flux) Flux LoRA for one double and one single block, in x-flux's processor key layout
    (`DoubleStreamBlockLoraProcessor`: qkv_lora1/proj_lora1 image, qkv_lora2/proj_lora2 text;
    `SingleStreamBlockLoraProcessor`: qkv_lora dim→3·dim, proj_lora (dim+mlp)→dim)."""
    torch.manual_seed(13)
    shapes = {"double_blocks.0.processor.qkv_lora1": (3 * dim, dim), "double_blocks.0.processor.proj_lora1": (dim, dim),
              "double_blocks.0.processor.qkv_lora2": (3 * dim, dim), "double_blocks.0.processor.proj_lora2": (dim, dim),
              "single_blocks.0.processor.qkv_lora": (3 * dim, dim),
              "single_blocks.0.processor.proj_lora": (dim, dim + mlp)}
    tensors = {}
    for module, (fan_out, fan_in) in shapes.items():
        tensors[f"{prefix}{module}.down.weight"] = torch.randn(rank, fan_in) * 0.1
        tensors[f"{prefix}{module}.up.weight"] = torch.randn(fan_out, rank) * 0.1
    save_file(tensors, str(path))
    return path


XLABS_TARGETS = {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
                 "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1", "single_blocks.0.linear2"}


def test_xlabs_flux_lora_detected_and_merged_like_diffusers(tmp_path):
    """An XLabs Flux LoRA is a format (not "unknown format"): its modules are the original-layout Flux
    modules; validate finds them in an original-layout file and a ComfyUI checkpoint; the merge equals
    diffusers' own load (`_convert_xlabs_flux_lora_to_diffusers`, scale 1) and fp32 fuse."""
    model = _tiny_flux()
    lora = _xlabs_lora(tmp_path / "xlabs.safetensors", dim=16, mlp=64)
    adapter = load_adapter(lora)
    assert adapter.format == "xlabs" and set(adapter.layers) == XLABS_TARGETS
    assert all(layer.scale == 1 for layer in adapter.layers.values())
    info = json.loads(run_cli("inspect", lora, "--json", check=True).stdout)
    assert info["format"] == "xlabs" and info["modules"] == len(XLABS_TARGETS)

    bare = _original_flux_file(model, tmp_path / "flux1-tiny.safetensors")
    checkpoint = _original_flux_file(model, tmp_path / "comfy-ckpt.safetensors", prefix="model.diffusion_model.")
    fused = _fused_flux(lora)
    assert len(fused) == 3 + 1 + 3 + 1 + 3 + 1  # diffusers splits the fused q/k/v LoRAs
    for base, prefix in ((bare, ""), (checkpoint, "model.diffusion_model.")):
        report = json.loads(run_cli("validate", lora, "--base", base, "--json", check=True).stdout)
        assert report["ok"] and report["matched"] == len(XLABS_TARGETS), report
        out = tmp_path / f"merged-{base.stem}"
        run_cli("merge", lora, "--base", base, "--out", out, "--dtype", "fp32", check=True)
        merged = load_file_state(out / base.name)
        assert _compare_original_merge(merged, fused, prefix) == len(XLABS_TARGETS) - 1  # linear1: below
        # single block: diffusers adapts to_q/to_k/to_v (the first 3·dim rows of linear1); the MLP rows
        # (proj_mlp) are unchanged
        parts = FLUX_ORIGINAL["single_blocks.0.linear1"]
        expected = torch.cat([fused[p] for p in parts[:3]] + [model.state_dict()[f"{parts[3]}.weight"]])
        assert_within_ulp(merged[f"{prefix}single_blocks.0.linear1.weight"], expected)


def test_xlabs_to_kohya_loads_in_diffusers_with_the_same_deltas(tmp_path):
    """`convert --to kohya` of an XLabs file (real Flux width) writes kohya's Flux names; diffusers' kohya
    converter gives every module the delta its XLabs converter gives (and zero for the MLP rows of linear1)."""
    from diffusers import FluxPipeline

    lora = _xlabs_lora(tmp_path / "xlabs.safetensors", dim=3072, mlp=12288, rank=2, prefix="diffusion_model.")
    out = tmp_path / "kohya.safetensors"
    run_cli("convert", lora, "--to", "kohya", "--out", out, check=True)
    names = {k.rsplit(".", 2)[0] for k in load_file_state(out) if k.endswith(".lora_down.weight")}
    assert names == {"lora_unet_" + t.replace(".", "_") for t in XLABS_TARGETS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xlabs, _ = FluxPipeline.lora_state_dict(str(lora), return_alphas=True)
        kohya, _ = FluxPipeline.lora_state_dict(str(out), return_alphas=True)

    probes: dict[int, torch.Tensor] = {}

    def deltas(state):  # ΔW·X for a fixed random X (ΔW itself is up to 21504×3072 here)
        out = {}
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                probe = probes.setdefault(down.shape[1], torch.randn(down.shape[1], 3, dtype=torch.float64))
                out[key.removesuffix(".lora_A.weight")] = state[key.replace("lora_A", "lora_B")].double() @ (
                    down.double() @ probe)
        return out

    expected, got = deltas(xlabs), deltas(kohya)
    assert len(expected) == 12 and set(expected) <= set(got)
    for module, delta in got.items():
        torch.testing.assert_close(delta, expected.get(module, torch.zeros_like(delta)), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# PEFT weights without adapter_config.json: the scale is unknown; --alpha gives it


def _weights_only(tmp_path: Path, peft_lora_dir: Path) -> Path:
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "adapter_model.safetensors").write_bytes((peft_lora_dir / "adapter_model.safetensors").read_bytes())
    return lone / "adapter_model.safetensors"


def test_peft_weights_without_config_say_the_scale_is_unknown(tmp_path, peft_lora_dir, tiny_llama_dir):
    """inspect and validate warn (one line; in --json too); merge, convert, resize and blend refuse with one
    line naming --alpha, writing nothing."""
    weights = _weights_only(tmp_path, peft_lora_dir)
    info = json.loads(run_cli("inspect", weights, "--json", check=True).stdout)
    assert any(w.startswith("scale unknown") and "--alpha" in w for w in info["warnings"]), info["warnings"]
    report = json.loads(run_cli("validate", weights, "--base", tiny_llama_dir, "--json", check=True).stdout)
    assert report["ok"] and any(w.startswith("scale unknown") for w in report["warnings"])
    human = run_cli("validate", weights, "--base", tiny_llama_dir, check=True)
    assert [line for line in human.stderr.splitlines() if "scale unknown" in line] == [human.stderr.strip()]

    for args in (("merge", weights, "--base", tiny_llama_dir, "--out", tmp_path / "merged"),
                 ("convert", weights, "--to", "kohya", "--out", tmp_path / "k.safetensors"),
                 ("resize", weights, "--rank", "2", "--out", tmp_path / "small"),
                 ("blend", weights, peft_lora_dir, "-w", "1,1", "--out", tmp_path / "blend")):
        result = run_cli(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, (args[0], result.stderr)
        assert "pass --alpha" in lines[0] and "Traceback" not in result.stderr, lines[0]
        assert not Path(args[-1]).exists()


def test_peft_weights_with_alpha_merge_like_peft(tmp_path, peft_lora_dir, tiny_llama_dir):
    """With `--alpha` (the lora_alpha of the lost config) the merge equals PEFT's own merge_and_unload of
    the full adapter; `--alpha` on an adapter whose file gives its scale is refused."""
    from fixtures_models import peft_merged_state_dict

    weights = _weights_only(tmp_path, peft_lora_dir)
    alpha = json.loads((peft_lora_dir / "adapter_config.json").read_text())["lora_alpha"]
    assert alpha != 8  # r = 8: alpha = rank would be another merge
    run_cli("merge", weights, "--base", tiny_llama_dir, "--out", tmp_path / "merged", "--alpha", alpha,
            "--dtype", "fp32", check=True)
    merged = load_file_state(tmp_path / "merged" / "model.safetensors")
    expected = peft_merged_state_dict(tiny_llama_dir, peft_lora_dir)
    changed = 0
    for key, value in expected.items():
        changed += not torch.equal(value, load_file_state(tiny_llama_dir / "model.safetensors")[key])
        assert_within_ulp(merged[key], value)
    assert changed > 0
    info = json.loads(run_cli("inspect", weights, "--alpha", alpha, "--json", check=True).stdout)
    assert info["alpha"] == alpha and not any(w.startswith("scale unknown") for w in info["warnings"])
    run_cli("convert", weights, "--alpha", alpha, "--to", "kohya", "--out", tmp_path / "k.safetensors", check=True)
    kohya = load_file_state(tmp_path / "k.safetensors")
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {alpha}
    refused = run_cli("merge", peft_lora_dir, "--base", tiny_llama_dir, "--out", tmp_path / "m2", "--alpha", "4")
    assert refused.returncode == 1 and "drop --alpha" in refused.stderr and not (tmp_path / "m2").exists()


@pytest.mark.parametrize("registry, modules", [
    ("sd-1.5", {"diffusion_model.input_blocks.1.1.proj_in": (320, 320, 1, 1),
                "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q": (1280, 1280),
                "diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2": (320, 1280),
                "diffusion_model.input_blocks.1.0.in_layers.2": (320, 320, 3, 3),
                "text_encoders.clip_l.transformer.text_model.encoder.layers.11.self_attn.q_proj": (768, 768)}),
    ("sdxl", {"diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k": (640, 2048),
              "diffusion_model.output_blocks.0.1.transformer_blocks.9.ff.net.0.proj": (10240, 1280),
              "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1": (3072, 768),
              "text_encoders.clip_g.transformer.text_model.encoder.layers.31.self_attn.out_proj": (1280, 1280)}),
])
def test_comfyui_sd_names_validate_against_the_registry(tmp_path, registry, modules):
    """ComfyUI SD/SDXL names (LDM UNet paths, `text_encoders.clip_l`/`clip_g`) are found in the shipped
    diffusers-layout manifests (`unet.…` LDM aliases, `text_encoder`, `text_encoder_2`), shapes checked."""
    tensors = {}
    for module, shape in modules.items():
        out, fan_in, *kernel = shape
        tensors[f"{module}.lora_down.weight"] = torch.zeros(4, fan_in, *kernel)
        tensors[f"{module}.lora_up.weight"] = torch.zeros(out, 4, *([1] * len(kernel)))
    lora = tmp_path / "comfy.safetensors"
    save_file(tensors, str(lora))
    report = json.loads(run_cli("validate", lora, "--base", registry, "--json", check=True).stdout)
    assert report["ok"] and report["matched"] == len(modules), report


def test_xlabs_unknown_keys_are_refused_not_dropped(tmp_path):
    """An XLabs file with a key x-flux does not write (an `.alpha`) is refused with one line naming it."""
    lora = _xlabs_lora(tmp_path / "xlabs.safetensors", dim=16, mlp=64)
    tensors = load_file_state(lora)
    tensors["double_blocks.0.processor.qkv_lora1.alpha"] = torch.tensor(8.0)
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    result = run_cli("inspect", tmp_path / "odd.safetensors")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "qkv_lora1.alpha" in lines[0], result.stderr


def test_alpha_must_be_a_finite_number(tmp_path, peft_lora_dir):
    weights = _weights_only(tmp_path, peft_lora_dir)
    result = run_cli("inspect", weights, "--alpha", "nan")
    assert result.returncode == 2 and "finite" in result.stderr
