"""Flux LoRAs in both naming worlds (issue 12): kohya sd-scripts files (`lora_unet_double_blocks_0_img_attn_qkv`,
BFL names, fused q/k/v) and diffusers/ai-toolkit files (`transformer.transformer_blocks.0.attn.to_q`), against
the BFL checkpoint layout (`flux1-dev.safetensors`), the diffusers folder and the registry manifest.

References are diffusers' own: its single-file converter for the base layouts, its kohya converter +
`load_lora_adapter` + `fuse_lora` (fp32) for merges, PEFT's `merge_and_unload` for PEFT folders.
"""
from __future__ import annotations

import json

import pytest
import torch
from cli_runner import run_cli
from fixtures_families import (
    diffusers_fused,
    flux_kohya_modules,
    flux_original_state,
    kohya_lora_file,
    peft_fused,
    peft_lora_file,
    tiny_flux,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorahub.adapter import Adapter, LazyTensor, LoraLayer
from lorahub.base import load_base
from lorahub.families import detect_adapter, to_naming
from lorahub.formats import load_adapter
from lorahub.inspect import describe
from lorahub.merge import AdapterInput, merge
from lorahub.registry import load_manifest
from lorahub.validate import validate

D = 32  # the tiny model's width


def ulps(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """max |got − ref| in units of fp32 eps at max(|W|, |ref|, |ΔW|): the rounding of ΔW = B·A (formed
    first, as PEFT does, or accumulated onto W) is measured against the operands, not a cancelled sum."""
    mag = torch.maximum(torch.maximum(ref.abs(), base.abs()), (ref - base).abs())
    return float(((got.double() - ref.double()).abs() / torch.finfo(ref.dtype).eps / mag.clamp_min(1e-30)
                  .double()).max()) if got.numel() else 0.0


def assert_merged(got: dict, reference: dict, base: dict) -> int:
    """Every tensor within 1 ulp of the reference (measured at the base weight's magnitude); returns how
    many the LoRA changed."""
    assert set(got) == set(reference)
    changed = 0
    for name, value in got.items():
        assert ulps(value, reference[name], base[name]) <= 1.0, name
        if not torch.equal(reference[name], base[name]):
            changed += 1
        else:
            assert torch.equal(value, base[name]), name
    return changed


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    folder = tiny_flux(root / "diffusers")
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    original = root / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in flux_original_state(state).items()}, str(original))
    return {"root": root, "folder": folder, "original": original, "state": state}


@pytest.fixture(scope="module")
def kohya_file(flux):
    # sd-scripts' default Flux modules (the Linear layers of the double and single blocks). Left out at this
    # width: single_blocks.N.linear1 (diffusers' kohya converter splits it with Flux's real sizes 3072, 3072,
    # 3072, 12288 only; tested at full width below) and img_in/txt_in/…/final_layer (diffusers 0.42's kohya
    # converter names them without `transformer.`, so load_lora_adapter skips them: no reference)
    modules = flux_kohya_modules(D, linear1=False, extra=False)
    return kohya_lora_file(flux["root"] / "kohya_flux.safetensors", modules, rank=4, alpha=8.0, seed=11,
                           metadata={"ss_base_model_version": "flux1"})


DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                     "norm1_context.linear", "proj_mlp", "single_transformer_blocks.0.proj_out", "norm.linear",
                     "norm_out.linear", "x_embedder", "context_embedder"]


@pytest.fixture(scope="module")
def diffusers_file(flux):
    return peft_lora_file(flux["folder"], flux["root"] / "ai_toolkit", DIFFUSERS_TARGETS, rank=4, alpha=8.0,
                          seed=12)


def original_reference(flux, lora) -> tuple[dict, int]:
    fused, loaded = diffusers_fused(flux["folder"], lora)
    return flux_original_state(fused), loaded


# ---------------------------------------------------------------------------------------------
# the tables, checked against diffusers' converter at Flux's real widths


def test_flux_table_matches_diffusers_single_file_converter():
    """lorahub's Flux table re-expresses each original module exactly as diffusers' single-file converter
    splits, swaps and renames it: a "LoRA" whose B is the original weight (A = I, scale 1) becomes layers
    whose B is diffusers' converted weight, and back."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        meta = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    # every tensor with its real row count and two columns: the converter splits and swaps rows only
    state = {k: torch.randn((v.shape[0], 2) if v.dim() == 2 else tuple(v.shape), generator=g)
             for k, v in meta.state_dict().items()}
    original = flux_original_state(state)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)  # the fixtures' BFL layout is diffusers' inverse

    eye = LazyTensor.of(torch.eye(2))
    layers = {f"transformer.{k[:-7]}": LoraLayer(f"transformer.{k[:-7]}", "linear", eye, LazyTensor.of(v), 2.0, 2)
              for k, v in original.items() if k.endswith(".weight") and v.dim() == 2}
    adapter = Adapter(path=None, format="kohya", layers=layers, has_components=True)
    split, found = to_naming(adapter, "diffusers")
    assert found is not None and found.family.name == "flux" and found.naming == "original"
    want = {f"transformer.{k[:-7]}": v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2}
    assert set(split.layers) == set(want)
    for target, layer in split.layers.items():
        assert torch.equal(layer.delta_math(), want[target]), target
    fused, found = to_naming(split, "original")
    assert found is not None and found.naming == "diffusers"
    assert set(fused.layers) == set(layers)
    for target, layer in fused.layers.items():
        assert torch.equal(layer.delta_math(), layers[target].B.load()), target


# ---------------------------------------------------------------------------------------------
# kohya sd-scripts files (BFL names)


def test_kohya_flux_detect_and_inspect(kohya_file):
    adapter = load_adapter(kohya_file)
    assert adapter.format == "kohya" and adapter.has_components
    assert "transformer.double_blocks.0.img_attn.qkv" in adapter.layers
    assert adapter.layers["transformer.double_blocks.0.img_attn.qkv"].source_name == \
        "lora_unet_double_blocks_0_img_attn_qkv"
    assert all(t.startswith("transformer.") for t in adapter.layers)
    assert not adapter.warnings
    info = describe(adapter, read_data=False)
    assert info["components"] == {"transformer": len(adapter.layers)}
    assert info["family"] == {"name": "flux", "label": "Flux", "naming": "BFL"}
    result = run_cli("inspect", kohya_file, "--headers-only")
    assert result.returncode == 0 and "Flux" in result.stdout, result.stderr


@pytest.mark.parametrize("where", ["original", "folder", "folder_transformer"])
def test_kohya_flux_validates_against_both_layouts(flux, kohya_file, where):
    base = {"original": flux["original"], "folder": flux["folder"],
            "folder_transformer": flux["folder"] / "transformer"}[where]
    report = validate(load_adapter(kohya_file), load_base(str(base)))
    assert report.ok, report.problems[:3]
    assert report.matched == report.modules == len(flux_kohya_modules(D, linear1=False, extra=False)) == 12
    result = run_cli("validate", kohya_file, "--base", base)
    assert result.returncode == 0, result.stderr + result.stdout


def test_kohya_flux_merge_into_diffusers_folder_equals_fuse_lora(flux, kohya_file, tmp_path):
    reference, loaded = diffusers_fused(flux["folder"], kohya_file)
    assert loaded == 2 * 3 + 8 + 2  # img/txt qkv split in three, 8 more in the double block, 2 in the single
    merge(str(flux["folder"]), [AdapterInput(load_adapter(kohya_file))], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert assert_merged(got, reference, flux["state"]) == loaded


def test_kohya_flux_merge_into_original_file_equals_fuse_lora(flux, kohya_file, tmp_path):
    reference, _ = original_reference(flux, kohya_file)
    merge(str(flux["original"]), [AdapterInput(load_adapter(kohya_file))], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / flux["original"].name))
    base = load_file(str(flux["original"]))
    assert assert_merged(got, reference, base) == 12


@pytest.mark.parametrize("to", ["diffusers", "kohya", "peft"])
def test_kohya_flux_convert_loads_in_the_peers(flux, kohya_file, tmp_path, to):
    reference, loaded = diffusers_fused(flux["folder"], kohya_file)
    out = tmp_path / ("peft" if to == "peft" else f"{to}.safetensors")
    result = run_cli("convert", kohya_file, "--to", to, "--out", out)
    assert result.returncode == 0, result.stderr
    if to == "peft":
        got, count = peft_fused(flux["folder"], out)
    else:
        got, count = diffusers_fused(flux["folder"], out)
    assert count == loaded  # every module loaded: none silently skipped
    assert_merged(got, reference, flux["state"])
    if to == "diffusers":
        keys = load_file(str(out))
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
        assert not any(k.startswith("unet.") for k in keys)


# ---------------------------------------------------------------------------------------------
# diffusers / ai-toolkit files (diffusers names, split q/k/v/mlp)


def test_diffusers_flux_detect_and_validate(flux, diffusers_file):
    adapter = load_adapter(diffusers_file)
    assert adapter.format == "diffusers"
    found = detect_adapter(adapter)
    assert found is not None and found.family.name == "flux" and found.naming == "diffusers"
    info = describe(adapter, read_data=False)
    assert info["family"] == {"name": "flux", "label": "Flux", "naming": "diffusers"}
    for base in (flux["original"], flux["folder"]):
        report = validate(adapter, load_base(str(base)))
        assert report.ok, (base, report.problems[:3])


def test_diffusers_flux_merge_into_original_file_equals_fuse_lora(flux, diffusers_file, tmp_path):
    """split → fused: to_q/to_k/to_v/proj_mlp land in row blocks of single_blocks.0.linear1, norm_out.linear
    in the swapped halves of final_layer.adaLN_modulation.1."""
    reference, loaded = original_reference(flux, diffusers_file)
    assert loaded == 23
    merge(str(flux["original"]), [AdapterInput(load_adapter(diffusers_file))], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / flux["original"].name))
    base = load_file(str(flux["original"]))
    changed = assert_merged(got, reference, base)
    assert changed == 10 + 3 + 3  # the double block's 10 (qkv fused), linear1/linear2/modulation, 3 outside


def test_diffusers_flux_merge_into_folder_equals_fuse_lora(flux, diffusers_file, tmp_path):
    reference, _ = diffusers_fused(flux["folder"], diffusers_file)
    merge(str(flux["folder"]), [AdapterInput(load_adapter(diffusers_file))], tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert assert_merged(got, reference, flux["state"]) > 0


def test_diffusers_flux_convert_to_kohya_is_bfl_named_and_exact(flux, diffusers_file, tmp_path):
    """--to kohya writes sd-scripts' names (fused qkv/linear1: A stacked, B block-diagonal); merged into the
    BFL file it gives diffusers' fuse of the original file."""
    out = tmp_path / "k.safetensors"
    result = run_cli("convert", diffusers_file, "--to", "kohya", "--out", out)
    assert result.returncode == 0, result.stderr
    keys = set(load_file(str(out)))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in keys
    assert not any(".lora_A." in k or k.startswith("transformer") for k in keys)
    reference, _ = original_reference(flux, diffusers_file)
    merge(str(flux["original"]), [AdapterInput(load_adapter(out))], tmp_path / "m", device="cpu")
    got = load_file(str(tmp_path / "m" / flux["original"].name))
    assert_merged(got, reference, load_file(str(flux["original"])))


def test_diffusers_flux_convert_to_kohya_loads_in_diffusers(flux, tmp_path):
    """Without the single-block q/k/v/mlp (diffusers' kohya loader splits linear1 at Flux's real width only)
    and the modules outside the blocks (its kohya converter drops them, see kohya_file), the kohya file
    lorahub writes loads in diffusers module for module."""
    targets = [t for t in DIFFUSERS_TARGETS if t not in ("proj_mlp", "x_embedder", "context_embedder",
                                                          "norm_out.linear")]
    targets = [t if t not in ("to_q", "to_k", "to_v") else f"transformer_blocks.0.attn.{t}" for t in targets]
    lora = tmp_path / "lora"
    peft_lora_file(flux["folder"], lora, targets, rank=4, alpha=8.0, seed=13)
    # by their names alone these modules could be HunyuanVideo's (same diffusers names, other kohya names)
    result = run_cli("convert", lora / "pytorch_lora_weights.safetensors", "--to", "kohya", "--out", tmp_path / "x")
    assert result.returncode == 1 and "HunyuanVideo" in result.stderr and "Traceback" not in result.stderr
    # training metadata tells them apart (ai-toolkit and kohya write modelspec.architecture)
    lora = lora / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), "pt") as f:
        metadata = {**f.metadata(), "modelspec.architecture": "flux-1-dev/lora"}
    save_file(load_file(str(lora)), str(lora), metadata=metadata)
    reference, loaded = diffusers_fused(flux["folder"], lora)
    out = tmp_path / "k.safetensors"
    result = run_cli("convert", lora, "--to", "kohya", "--out", out)
    assert result.returncode == 0, result.stderr
    got, count = diffusers_fused(flux["folder"], out)
    assert count == loaded
    assert_merged(got, reference, flux["state"])


# ---------------------------------------------------------------------------------------------
# the registry: every Flux layout validates offline at the real sizes


@pytest.mark.parametrize("registry", ["flux.1-dev", "flux.1-schnell"])
def test_registry_validates_kohya_and_diffusers_flux_files(tmp_path, registry):
    guidance = registry == "flux.1-dev"
    modules = flux_kohya_modules(3072, double=19, single=38, extra=False)
    kohya = kohya_lora_file(tmp_path / "k.safetensors", modules, rank=1, alpha=1.0, seed=1)
    assert len(modules) == 304
    base = load_manifest(registry)
    report = validate(load_adapter(kohya), base)
    assert report.ok and report.matched == 304, report.problems[:3]
    result = run_cli("validate", kohya, "--base", registry)
    assert result.returncode == 0, result.stdout + result.stderr
    extra = flux_kohya_modules(3072, double=0, single=0, joint=4096, pooled=768, in_ch=64)
    if not guidance:
        extra = {k: v for k, v in extra.items() if not k.startswith("guidance_in")}
    kohya_extra = kohya_lora_file(tmp_path / "e.safetensors", extra, rank=1, alpha=1.0, seed=2)
    report = validate(load_adapter(kohya_extra), base)
    assert report.ok, report.problems[:3]
    # the diffusers naming of the same modules
    converted = tmp_path / "d.safetensors"
    assert run_cli("convert", kohya, "--to", "diffusers", "--out", converted).returncode == 0
    report = validate(load_adapter(converted), base)
    assert report.ok and report.modules == 19 * 14 + 38 * 6, report.problems[:3]
    assert json.loads(run_cli("validate", converted, "--base", registry, "--json").stdout)["ok"]


# ---------------------------------------------------------------------------------------------
# single_blocks.N.linear1 at Flux's real width (diffusers' kohya converter knows only 3072/12288)


def _deltas_times(state: dict, x: torch.Tensor, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """{module: (B·A)·x} of a diffusers-named LoRA state dict (scales folded in, as diffusers' kohya
    converter returns them); x is (in, m): cheaper than forming 21504×3072 deltas."""
    out = {}
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(prefix):-len(".lora_A.weight")]
            b = state[key.replace(".lora_A.", ".lora_B.")].double()
            out[module] = b @ (value.double() @ x)
    return out


def test_linear1_kohya_to_diffusers_at_real_width_matches_diffusers_converter(tmp_path):
    from diffusers import FluxPipeline

    modules = {"single_blocks_0_linear1": (3 * 3072 + 12288, 3072), "double_blocks_1_img_attn_qkv": (3 * 3072, 3072)}
    kohya = kohya_lora_file(tmp_path / "k.safetensors", modules, rank=2, alpha=4.0, seed=5)
    theirs = FluxPipeline.lora_state_dict(str(kohya))
    out = tmp_path / "d.safetensors"
    assert run_cli("convert", kohya, "--to", "diffusers", "--out", out).returncode == 0
    adapter = load_adapter(out)
    x = torch.randn(3072, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = {t[len("transformer."):]: (layer.B.load().double() * layer.scale) @ (layer.A.load().double() @ x)
            for t, layer in adapter.layers.items()}
    reference = _deltas_times(theirs, x)
    assert set(ours) == set(reference) and len(ours) == 7
    for module, value in reference.items():
        assert torch.allclose(ours[module], value, rtol=1e-12, atol=1e-12), module


def test_linear1_diffusers_to_kohya_at_real_width_loads_in_diffusers(tmp_path):
    """to_q/to_k/to_v/proj_mlp → one kohya linear1 (A stacked, B block-diagonal): diffusers' kohya converter
    recognises the block structure and gives back the four modules, each with its own product."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(3)
    sizes = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288}
    state = {}
    for name, n in sizes.items():
        state[f"single_transformer_blocks.0.{name}.lora_A.weight"] = torch.randn(2, 3072, generator=g)
        state[f"single_transformer_blocks.0.{name}.lora_B.weight"] = torch.randn(n, 2, generator=g)
    FluxPipeline.save_lora_weights(str(tmp_path / "lora"), transformer_lora_layers=state)
    out = tmp_path / "k.safetensors"
    result = run_cli("convert", tmp_path / "lora" / "pytorch_lora_weights.safetensors", "--to", "kohya", "--out", out)
    assert result.returncode == 0, result.stderr
    keys = load_file(str(out))
    assert keys["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, 3072)
    assert keys["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 8)
    theirs = FluxPipeline.lora_state_dict(str(out))
    x = torch.randn(3072, 3, generator=g, dtype=torch.float64)
    reference = _deltas_times(state, x, prefix="")
    got = _deltas_times(theirs, x)
    assert set(got) == set(reference)
    for module, value in reference.items():
        assert torch.allclose(got[module], value, rtol=1e-12, atol=1e-12), module


def test_kohya_flux_with_linear1_and_outer_modules_into_both_layouts(flux, tmp_path):
    """Every sd-scripts Flux module, linear1 and img_in/…/final_layer included, at the tiny width where
    diffusers cannot load them: merged into the BFL file it is W + s·B·A module by module; merged into
    the diffusers folder (linear1 split in four, norm_out's halves swapped) and written back in BFL names
    with the inverse of diffusers' converter, the same."""
    from fixtures_families import direct_merge

    modules = flux_kohya_modules(D)
    lora = kohya_lora_file(tmp_path / "all.safetensors", modules, rank=4, alpha=8.0, seed=17)
    adapter = load_adapter(lora)
    names = {layer.source_name: layer.target[len("transformer."):] for layer in adapter.layers.values()}
    assert len(names) == len(modules) == 23
    base = load_file(str(flux["original"]))
    reference = direct_merge(base, load_file(str(lora)), names)
    merge(str(flux["original"]), [AdapterInput(adapter)], tmp_path / "o", device="cpu")
    assert assert_merged(load_file(str(tmp_path / "o" / flux["original"].name)), reference, base) == 23
    merge(str(flux["folder"]), [AdapterInput(load_adapter(lora))], tmp_path / "f", device="cpu")
    got = flux_original_state(load_file(str(tmp_path / "f" / "transformer" / "diffusion_pytorch_model.safetensors")))
    assert assert_merged(got, reference, base) == 23


def test_flattened_diffusers_names_lora_transformer(flux, diffusers_file, tmp_path):
    """`lora_transformer_single_transformer_blocks_0_attn_to_q` files (diffusers names flattened, kohya
    tensors; diffusers reads them as its "mixture" layout) resolve against Flux's table and load back."""
    state = load_file(str(diffusers_file))
    scale = 2.0  # the LoRA's alpha/r, written as kohya alphas
    mixture = {}
    for key, value in state.items():
        module, kind = key[len("transformer."):].rsplit(".lora_", 1)
        if ".attn." not in module:
            continue  # diffusers' mixture reader knows the blocks' attention modules only
        name = "lora_transformer_" + module.replace(".", "_")
        mixture[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        mixture[f"{name}.alpha"] = torch.tensor(scale * value.shape[0 if kind.startswith("A") else 1])
    path = tmp_path / "mixture.safetensors"
    save_file(mixture, str(path))
    adapter = load_adapter(path)
    assert "transformer.single_transformer_blocks.0.attn.to_q" in adapter.layers and not adapter.warnings
    assert "transformer.transformer_blocks.0.attn.to_add_out" in adapter.layers
    reference, loaded = diffusers_fused(flux["folder"], path)
    assert loaded == len(adapter.layers) == 11
    out = tmp_path / "d.safetensors"
    assert run_cli("convert", path, "--to", "diffusers", "--out", out).returncode == 0
    got, count = diffusers_fused(flux["folder"], out)
    assert count == loaded
    assert_merged(got, reference, flux["state"])


def test_unmerge_of_a_family_aligned_merge(flux, diffusers_file, tmp_path):
    """merge (split → fused into the BFL file) and unmerge plan the same aligned layers: the base comes back
    within one ulp (bit-exact with --save-originals)."""
    from lorahub.merge import unmerge

    base = load_file(str(flux["original"]))
    merge(str(flux["original"]), [AdapterInput(load_adapter(diffusers_file))], tmp_path / "m", device="cpu")
    unmerge(str(tmp_path / "m" / flux["original"].name), [AdapterInput(load_adapter(diffusers_file))],
            tmp_path / "u", device="cpu")
    got = load_file(str(tmp_path / "u" / flux["original"].name))
    merged = load_file(str(tmp_path / "m" / flux["original"].name))
    assert set(got) == set(base)
    changed = 0
    for name, value in got.items():
        assert ulps(value, base[name], merged[name]) <= 1.0, name  # W + ΔW − ΔW: rounded at |W + ΔW|
        changed += not torch.equal(merged[name], base[name])
    assert changed == 16


def test_loha_on_fused_flux_modules_merges_into_both_layouts(flux, tmp_path):
    """A LyCORIS LoHa in kohya's Flux names (`lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a`, …) on fused
    modules: merged into the BFL file as LyCORIS's ΔW = (W1a·W1b) ⊙ (W2a·W2b)·alpha/dim, and into the diffusers
    folder through its exact LoRA factors split by rows (q | k | v; linear1's q | k | v | mlp). Both merged models
    are the same model: the diffusers result, renamed to BFL names by the single-file converter's inverse,
    equals the BFL result."""
    gen = torch.Generator().manual_seed(11)
    original = load_file(str(flux["original"]))
    tensors, deltas = {}, {}
    rank, alpha = 2, 3.0
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1"):
        n, k = original[module + ".weight"].shape
        w1a, w1b = torch.randn(n, rank, generator=gen), torch.randn(rank, k, generator=gen)
        w2a, w2b = torch.randn(n, rank, generator=gen), torch.randn(rank, k, generator=gen)
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                        f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(alpha)})
        deltas[module + ".weight"] = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * (alpha / rank)
    lora = tmp_path / "loha.safetensors"
    save_file(tensors, str(lora))
    adapter = load_adapter(lora)
    assert adapter.format == "lycoris" and set(adapter.layers) == {
        "transformer.double_blocks.0.img_attn.qkv", "transformer.double_blocks.0.txt_attn.qkv",
        "transformer.single_blocks.0.linear1"}
    assert validate(adapter, load_base(str(flux["folder"]))).ok
    merge(str(flux["original"]), [AdapterInput(load_adapter(lora))], tmp_path / "bfl", device="cpu")
    bfl = load_file(str(tmp_path / "bfl" / flux["original"].name))
    for name, value in bfl.items():
        expected = original[name].double() + deltas[name] if name in deltas else original[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    merge(str(flux["folder"]), [AdapterInput(load_adapter(lora))], tmp_path / "split", device="cpu")
    split = load_file(str(tmp_path / "split" / "transformer" / "diffusion_pytorch_model.safetensors"))
    renamed = flux_original_state(split)
    assert set(renamed) == set(bfl)
    for name, value in renamed.items():
        torch.testing.assert_close(value, bfl[name], rtol=1e-6, atol=1e-6 * float(bfl[name].abs().max()))


@pytest.mark.parametrize("first", ["kohya", "diffusers"])
def test_blend_of_a_kohya_and_a_diffusers_flux_lora(flux, kohya_file, diffusers_file, tmp_path, first):
    """A kohya (BFL names, fused qkv) and an ai-toolkit (diffusers names, split) Flux LoRA blend once their
    modules are in one naming (the first adapter's): `cat` is exact, so merging the blend equals merging
    both adapters with the same weights, into either layout; the file is in the first adapter's format
    and naming."""
    pair = [kohya_file, diffusers_file] if first == "kohya" else [diffusers_file, kohya_file]
    out = tmp_path / "blend.safetensors"
    result = run_cli("blend", pair[0], pair[1], "--weights", "0.7,0.5", "--method", "cat", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    blended = load_adapter(out)
    names = set(blended.layers)
    if first == "kohya":
        assert blended.format == "kohya" and "transformer.double_blocks.0.img_attn.qkv" in names
    else:
        assert "transformer.transformer_blocks.0.attn.to_q" in names and not any("double_blocks" in n for n in names)
    for where in ("original", "folder"):
        base = str(flux[where])
        merge(base, [AdapterInput(load_adapter(out))], tmp_path / f"b-{where}", device="cpu")
        merge(base, [AdapterInput(load_adapter(pair[0]), 0.7), AdapterInput(load_adapter(pair[1]), 0.5)],
              tmp_path / f"m-{where}", device="cpu")
        rel = "transformer/diffusion_pytorch_model.safetensors" if where == "folder" else flux["original"].name
        got, want = load_file(str(tmp_path / f"b-{where}" / rel)), load_file(str(tmp_path / f"m-{where}" / rel))
        base_state = flux["state"] if where == "folder" else load_file(str(flux["original"]))
        assert set(got) == set(want) == set(base_state)
        for name, value in got.items():
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6 * float(want[name].abs().max()))
        changed = [name for name in got if not torch.equal(got[name], base_state[name])]
        assert len(changed) >= (12 if where == "original" else 16), changed


def _comfy_name(kohya_module: str) -> str:
    """sd-scripts' flattened Flux module name (`lora_unet_double_blocks_0_img_attn_qkv`) as ComfyUI names the
    module: its BFL path, dotted, under `diffusion_model.`."""
    block, _, rest = kohya_module.removeprefix("lora_unet_").partition("_blocks_")
    index, _, leaf = rest.partition("_")
    dotted = {"img_mod_lin": "img_mod.lin", "txt_mod_lin": "txt_mod.lin", "img_attn_qkv": "img_attn.qkv",
              "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj", "txt_attn_proj": "txt_attn.proj",
              "img_mlp_0": "img_mlp.0", "img_mlp_2": "img_mlp.2", "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2",
              "linear1": "linear1", "linear2": "linear2", "modulation_lin": "modulation.lin"}[leaf]
    return f"diffusion_model.{block}_blocks.{index}.{dotted}"


@pytest.mark.parametrize("to", ["diffusers", "peft", "kohya"])
def test_comfyui_flux_file_against_the_diffusers_folder(flux, kohya_file, tmp_path, to):
    """A ComfyUI Flux LoRA (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`: the kohya file's
    tensors under ComfyUI's names) validates against the diffusers folder, merges into it as diffusers fuses
    the same LoRA, and converts to files the peers load with every module and the same fused weights."""
    comfy = {}
    for key, value in load_file(str(kohya_file)).items():
        module, _, suffix = key.partition(".")
        comfy[f"{_comfy_name(module)}.{suffix}"] = value
    lora = tmp_path / "comfy.safetensors"
    save_file(comfy, str(lora))
    adapter = load_adapter(lora)
    assert all(t.startswith("diffusion_model.") for t in adapter.layers) and len(adapter.layers) == 12
    assert validate(adapter, load_base(str(flux["folder"]))).ok
    reference, loaded = diffusers_fused(flux["folder"], kohya_file)
    merge(str(flux["folder"]), [AdapterInput(load_adapter(lora))], tmp_path / "merged", device="cpu")
    got = load_file(str(tmp_path / "merged" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert assert_merged(got, reference, flux["state"]) == loaded
    out = tmp_path / ("peft" if to == "peft" else f"{to}.safetensors")
    result = run_cli("convert", lora, "--to", to, "--out", out)
    assert result.returncode == 0, result.stderr
    got, count = peft_fused(flux["folder"], out) if to == "peft" else diffusers_fused(flux["folder"], out)
    assert count == loaded  # every module loaded: none silently skipped
    assert_merged(got, reference, flux["state"])


def test_validate_counts_misfits_in_the_files_own_modules(kohya_file):
    """A tiny kohya Flux file against the full-size flux.1-dev manifest: every module misfits; the headline
    counts them in the file's modules (12 fused/renamed ones), not in the 16 diffusers modules they were
    checked as."""
    report = validate(load_adapter(kohya_file), load_base("flux.1-dev"))
    assert not report.ok and report.modules == 12 and report.matched == 0
    assert "does not fit: 12 of 12 modules" in report.summary, report.summary


@pytest.mark.parametrize("command", ["resize", "blend"])
def test_resize_and_blend_write_flux_in_the_target_formats_names(flux, kohya_file, tmp_path, command):
    """resize/blend `--to diffusers` of a kohya Flux file go through the same naming step as convert: the
    fused modules are split (their A shared in memory, written as copies) and diffusers loads every module.
    At the file's own rank (resize: the layers are kept, ≤ 1 ulp) or as a weight-1 cat (blend: the scale is
    moved into the factors, √s·B · √s·A, float32 rounding), the fused weights are the original's."""
    reference, loaded = diffusers_fused(flux["folder"], kohya_file)
    out = tmp_path / "out.safetensors"
    args = ["resize", kohya_file, "--rank", "4"] if command == "resize" else \
        ["blend", kohya_file, "-w", "1", "--method", "cat"]
    result = run_cli(*args, "--to", "diffusers", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    keys = load_file(str(out))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys and not any("double_blocks" in k
                                                                                          for k in keys)
    got, count = diffusers_fused(flux["folder"], out)
    assert count == loaded
    if command == "resize":
        assert_merged(got, reference, flux["state"])
    else:
        assert set(got) == set(reference)
        for name, value in got.items():
            torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6 * float(reference[name].abs().max()))


def test_xlabs_file_against_the_diffusers_folder(flux, tmp_path):
    """An XLabs Flux LoRA (`double_blocks.0.processor.qkv_lora1.down.weight`, …; original-layout targets at
    scale 1) merges into the diffusers folder and converts to diffusers/kohya files exactly as diffusers'
    own XLabs converter loads and fuses it (every module loaded)."""
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for proc, rows in (("qkv_lora1", 3 * D), ("proj_lora1", D), ("qkv_lora2", 3 * D), ("proj_lora2", D)):
        tensors[f"double_blocks.0.processor.{proc}.down.weight"] = torch.randn(2, D, generator=gen) * 0.1
        tensors[f"double_blocks.0.processor.{proc}.up.weight"] = torch.randn(rows, 2, generator=gen) * 0.1
    lora = tmp_path / "xlabs.safetensors"
    save_file(tensors, str(lora))
    reference, loaded = diffusers_fused(flux["folder"], lora)
    assert loaded == 8 and load_adapter(lora).format == "xlabs"
    assert validate(load_adapter(lora), load_base(str(flux["folder"]))).ok
    merge(str(flux["folder"]), [AdapterInput(load_adapter(lora))], tmp_path / "merged", device="cpu")
    got = load_file(str(tmp_path / "merged" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert assert_merged(got, reference, flux["state"]) == loaded
    for to in ("diffusers", "kohya"):
        out = tmp_path / f"{to}.safetensors"
        assert run_cli("convert", lora, "--to", to, "--out", out).returncode == 0
        got, count = diffusers_fused(flux["folder"], out)
        assert count == loaded
        assert_merged(got, reference, flux["state"])
