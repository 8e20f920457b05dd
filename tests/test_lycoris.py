"""LyCORIS layers (LoHa, LoKr, LoCon-Tucker, full, DoRA both axes), against LyCORIS itself.

Every file is made by LyCORIS's own network code (`lycoris.create_lycoris` on a tiny diffusers UNet,
factors randomised — they start at a zero delta — and saved by `LycorisNetwork.save_weights`, with
kohya's `lora_unet` prefix as kohya-trained LyCORIS files have). The truth is the weight delta each
module's FORWARD pass applies: the `delta_weight` it hands to its layer op, captured there (not
`get_diff_weight`/`merge_to`, which in lycoris-lora 4.1.3 apply alpha/dim twice for LoHa and LoKr).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from fixtures_models import reference_fused_unet_state_dict
from safetensors.torch import load_file, save_file

from lorahub.base import load_base
from lorahub.convert import convert_adapter
from lorahub.errors import LorahubError
from lorahub.formats import load_adapter
from lorahub.lycoris import dense_delta, lora_down, lora_up, resolve_with_base
from lorahub.merge import merge, unmerge
from lorahub.merge.plan import AdapterInput
from lorahub.resize import resize_adapter
from lorahub.validate import validate

lycoris = pytest.importorskip("lycoris")

BASE_FILE = "unet/diffusion_pytorch_model.safetensors"

# name -> (algo, create_lycoris keyword arguments)
CONFIGS = {
    "loha": ("loha", {}),
    "loha_tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {"factor": 4}),
    "lokr_both": ("lokr", {"factor": 4, "decompose_both": True, "linear_dim": 2}),
    "lokr_tucker": ("lokr", {"factor": 4, "use_tucker": True, "linear_dim": 2}),
    "lokr_full": ("lokr", {"full_matrix": True}),
    "locon_tucker": ("locon", {"use_tucker": True}),
    "full": ("full", {}),
    "loha_dora_out": ("loha", {"dora_wd": True}),
    "loha_dora_in": ("loha", {"dora_wd": True, "wd_on_output": False}),
    "lokr_dora_in": ("lokr", {"factor": 4, "dora_wd": True, "wd_on_output": False}),
    "locon_dora_in": ("locon", {"dora_wd": True, "wd_on_output": False}),
}


def _unet(unet_dir: Path, **config):
    from diffusers import UNet2DConditionModel

    if config:
        from fixtures_models import _unet_config

        torch.manual_seed(1)
        return UNet2DConditionModel(**{**_unet_config(), **config}).eval()
    return UNet2DConditionModel.from_pretrained(str(unet_dir), subfolder="unet").eval()


def make_lycoris(out: Path, unet_dir: Path, algo: str, seed: int = 0, unet_config: dict | None = None,
                 **kwargs) -> dict[str, torch.Tensor]:
    """A LyCORIS file made by LyCORIS on the tiny UNet; returns {module name: ΔW its forward applies}."""
    from lycoris import LycorisNetwork, create_lycoris

    unet = _unet(unet_dir, **(unet_config or {}))
    prefix = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"  # kohya's, as sd-scripts' `lycoris.kohya` writes
    try:
        torch.manual_seed(seed)
        dim = kwargs.pop("linear_dim", 4)
        net = create_lycoris(unet, 1.0, linear_dim=dim, linear_alpha=kwargs.pop("linear_alpha", 3), algo=algo,
                             preset="full", **kwargs)
    finally:
        LycorisNetwork.LORA_PREFIX = prefix
    net.apply_to()
    with torch.no_grad():
        for module in net.loras:
            for name, param in module.named_parameters():
                if name.startswith("org_module"):
                    continue
                if name == "dora_scale":
                    param.mul_(1 + 0.1 * torch.randn_like(param))
                else:
                    param.copy_(torch.randn_like(param) * 0.3)
    truth = {}
    for module in net.loras:
        truth.update(forward_delta(module))
    net.save_weights(str(out), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return truth


def forward_delta(module) -> dict[str, torch.Tensor]:
    """{name: ΔW} (and {name.bias: Δb} for full modules) that the module's forward pass applies: the
    weight it hands to its layer op, captured there."""
    seen: dict[str, torch.Tensor] = {}
    real = module.op

    def capture(x, weight=None, bias=None, *args, **kw):
        weight, bias = kw.pop("weight", weight), kw.pop("bias", bias)
        seen["weight"], seen["bias"] = weight.detach().clone(), bias
        return real(x, weight, bias, *args, **kw)

    module.op = capture
    org = module.org_module[0]
    x = torch.randn(1, org.in_features) if isinstance(org, torch.nn.Linear) else torch.randn(1, org.in_channels, 8, 8)
    try:
        with torch.no_grad():
            module(x)
    finally:
        module.op = real
    delta = seen["weight"]
    out = {}
    if type(module).__name__ == "FullModule":  # its forward runs the whole weight (org + diff)
        delta = delta - module.org_weight
        if seen["bias"] is not None:
            out[module.lora_name + ".bias"] = seen["bias"].detach() - module.org_bias[0]
    out[module.lora_name] = delta
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_unet_dir):
    root = tmp_path_factory.mktemp("lycoris")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in cache:
            algo, kwargs = CONFIGS[name]
            path = root / f"{name}.safetensors"
            cache[name] = (path, make_lycoris(path, tiny_unet_dir, algo, **dict(kwargs)))
        return cache[name]
    return get


def _base_key(module: str, base: dict) -> str:
    flat = module.removeprefix("lora_unet_")
    (key,) = [k for k in base if k.endswith(".weight") and k[:-len(".weight")].replace(".", "_") == flat]
    return key


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------
# merge = LyCORIS's forward; unmerge restores


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_equals_lycoris_forward_and_unmerge_restores(made, name, tiny_unet_dir, tmp_path):
    path, truth = made(name)
    adapter = load_adapter(path)
    assert adapter.format == "lycoris" or name == "locon_dora_in"
    assert validate(adapter, load_base(str(tiny_unet_dir))).ok
    merge(str(tiny_unet_dir), [AdapterInput(adapter, 1.0)], tmp_path / "merged", device="cpu")
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    merged = load_file(str(tmp_path / "merged" / BASE_FILE))
    checked = 0
    for module, delta in truth.items():
        if module.endswith(".bias"):
            key = _base_key(module[:-len(".bias")], base)[:-len(".weight")] + ".bias"
        else:
            key = _base_key(module, base)
        assert _rel(merged[key] - base[key], delta.reshape(base[key].shape)) <= 1e-6, (name, module)
        checked += 1
    assert checked >= 83
    unmerge(str(tmp_path / "merged"), [AdapterInput(adapter, 1.0)], tmp_path / "unmerged", device="cpu")
    restored = load_file(str(tmp_path / "unmerged" / BASE_FILE))
    for key, value in base.items():
        assert float((restored[key] - value).abs().max()) <= 1e-5 * max(float(value.abs().max()), 1.0), key


def test_exact_unmerge_with_originals(made, tiny_unet_dir, tmp_path):
    path, _ = made("loha_dora_in")
    adapter = load_adapter(path)
    merge(str(tiny_unet_dir), [AdapterInput(adapter, 1.0)], tmp_path / "merged", device="cpu", save_originals=True)
    result = unmerge(str(tmp_path / "merged"), [AdapterInput(adapter, 1.0)], tmp_path / "back", device="cpu")
    assert result.exact
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    back = load_file(str(tmp_path / "back" / BASE_FILE))
    assert all(torch.equal(back[k], v) for k, v in base.items())


def test_dora_weight_follows_lycoris_multiplier(made, tiny_unet_dir, tmp_path):
    """A merge weight c is LyCORIS's `multiplier`: for DoRA, W' = (W₀+ΔW)·(c·(m/‖·‖ − 1) + 1)."""
    from lycoris import create_lycoris_from_weights

    path, _ = made("loha_dora_out")
    adapter = load_adapter(path)
    merge(str(tiny_unet_dir), [AdapterInput(adapter, 0.6)], tmp_path / "merged", device="cpu")
    merged = load_file(str(tmp_path / "merged" / BASE_FILE))
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    from lycoris import LycorisNetwork

    unet = _unet(tiny_unet_dir)
    prefix = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        net, _ = create_lycoris_from_weights(0.6, str(path), unet)
    finally:
        LycorisNetwork.LORA_PREFIX = prefix
    net.apply_to()
    assert len(net.loras) == len(adapter.layers)
    for module in net.loras:
        assert module.multiplier == 0.6 and module.wd
        key = _base_key(module.lora_name, base)
        assert _rel(merged[key] - base[key], forward_delta(module)[module.lora_name]) <= 1e-6, module.lora_name


# ---------------------------------------------------------------------------------------------
# exact LoRA factorisations


@pytest.mark.parametrize("name", ["loha", "loha_tucker", "lokr", "lokr_both", "lokr_tucker", "lokr_full",
                                  "locon_tucker", "full"])
def test_factorisation_identities_equal_the_dense_delta(made, name):
    path, truth = made(name)
    checked = 0
    for layer in load_adapter(path).layers.values():
        mod = layer.lycoris
        if mod is None:  # LoCon's linear layers are plain LoRA layers (no Tucker mid)
            continue
        checked += 1
        delta = truth[layer.source_name].reshape(mod.out_features, -1)
        product = (lora_up(mod).double() @ lora_down(mod).double()) * mod.scale
        assert product.shape[1] == delta.shape[1] and lora_up(mod).shape[1] == mod.rank
        assert _rel(product, delta) <= 1e-5, layer.source_name
        assert _rel(dense_delta(mod).reshape(delta.shape), delta) <= 1e-6
    assert checked >= 10


@pytest.mark.parametrize("name", ["loha", "loha_tucker", "lokr_tucker", "locon_tucker"])
def test_convert_to_kohya_is_loaded_by_diffusers_as_the_lycoris_delta(made, name, tiny_unet_dir, tmp_path):
    """The converted plain kohya LoRA, loaded and fused by diffusers, applies LyCORIS's ΔW."""
    path, truth = made(name)
    adapter = load_adapter(path)
    resolve_with_base(adapter, load_base(str(tiny_unet_dir)))
    convert_adapter(adapter, tmp_path / "lora.safetensors", "kohya")
    keys = load_file(str(tmp_path / "lora.safetensors"))
    assert not any("hada_" in k or "lokr_" in k or "lora_mid" in k for k in keys)
    fused = reference_fused_unet_state_dict(tiny_unet_dir, tmp_path / "lora.safetensors")
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    for module, delta in truth.items():
        key = _base_key(module, base)
        assert _rel(fused[key] - base[key], delta.reshape(base[key].shape)) <= 1e-5, module


@pytest.mark.parametrize("to", ["peft", "diffusers"])
def test_convert_to_peft_and_diffusers_keeps_the_delta(made, to, tiny_unet_dir, tmp_path):
    path, truth = made("lokr")
    adapter = load_adapter(path)
    resolve_with_base(adapter, load_base(str(tiny_unet_dir)))
    out = tmp_path / ("peft" if to == "peft" else "lora.safetensors")
    convert_adapter(adapter, out, to)
    back = load_adapter(out)
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    assert len(back.layers) == len(truth)
    for layer in back.layers.values():
        module = "lora_unet_" + layer.target.removeprefix("unet.").replace(".", "_")
        key = _base_key(module, base)
        assert _rel(layer.delta_weight().reshape(base[key].shape), truth[module].reshape(base[key].shape)) <= 1e-5


def test_convert_cli_needs_base_for_flattened_factors(made, tiny_unet_dir, tmp_path):
    path, _ = made("loha")
    result = run_cli("convert", path, "--to", "kohya", "-o", tmp_path / "x.safetensors")
    assert result.returncode == 1 and "pass --base" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
    result = run_cli("convert", path, "--base", tiny_unet_dir, "--to", "kohya", "-o", tmp_path / "x.safetensors")
    assert result.returncode == 0, result.stderr
    downs = [v for k, v in load_file(str(tmp_path / "x.safetensors")).items()
             if k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.lora_down")]
    assert downs[0].shape == (16, 32, 3, 3)  # a 3×3 conv: the kernel comes from the base


def test_input_axis_dora_is_not_converted(made, tiny_unet_dir, tmp_path):
    path, _ = made("loha_dora_in")
    adapter = load_adapter(path)
    resolve_with_base(adapter, load_base(str(tiny_unet_dir)))
    with pytest.raises(LorahubError, match="per input channel"):
        convert_adapter(adapter, tmp_path / "out.safetensors", "kohya")


# ---------------------------------------------------------------------------------------------
# resize and blend through the factorisation


def test_resize_of_loha_is_the_eckart_young_optimum(made, tiny_unet_dir):
    path, truth = made("loha")
    adapter = load_adapter(path)
    resolve_with_base(adapter, load_base(str(tiny_unet_dir)))
    resized, report = resize_adapter(adapter, rank=5, compute_dtype=torch.float64)
    assert len(report.layers) == len(truth)
    for layer, entry in zip(resized.layers.values(), report.layers):
        delta = truth[layer.source_name].reshape(layer.out_features, -1).double()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(5, *delta.shape)
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        # a layer whose r1·r2 exceeds min(n, k) is factored through ΔW (rank min(n, k)): at or below the
        # requested rank, resize keeps it as it is
        assert layer.rank == r and (layer.lycoris is None or layer.lycoris.dense and r < 5)
        assert _rel(layer.delta_math(dtype=torch.float64), best) <= 1e-5, layer.source_name
        assert math.isclose(entry.energy_retained, float((S[:r] ** 2).sum() / (S ** 2).sum()), rel_tol=1e-6)


def test_resize_cli_reports_retained_energy(made, tiny_unet_dir, tmp_path):
    path, _ = made("lokr")
    out = tmp_path / "r2.safetensors"
    result = run_cli("resize", path, "--base", tiny_unet_dir, "--rank", "2", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    import json

    payload = json.loads(result.stdout)
    assert payload["format"] == "kohya" and 0 < payload["summary"]["energy_retained_mean"] < 1


def test_blend_accepts_lycoris(made, tiny_unet_dir, tmp_path):
    path_a, truth_a = made("loha")
    path_b, truth_b = made("lokr")
    out = tmp_path / "mix.safetensors"
    result = run_cli("blend", path_a, path_b, "-w", "0.5,2", "--method", "cat", "--base", tiny_unet_dir,
                     "-o", out)
    assert result.returncode == 0, result.stderr
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    for layer in load_adapter(out).layers.values():
        module = "lora_unet_" + layer.target.removeprefix("unet.").replace(".", "_")
        key = _base_key(module, base)
        expected = 0.5 * truth_a[module] + 2 * truth_b[module]
        assert _rel(layer.delta_weight().reshape(base[key].shape), expected.reshape(base[key].shape)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# validate and inspect


def test_wrong_base_fails_validate_naming_the_module(tiny_unet_dir, tmp_path):
    path = tmp_path / "other.safetensors"
    make_lycoris(path, tiny_unet_dir, "lokr", factor=4, unet_config={"cross_attention_dim": 48})
    result = run_cli("validate", path, "--base", tiny_unet_dir, "--json")
    assert result.returncode == 1
    import json

    report = json.loads(result.stdout)
    problems = {p["module"]: p for p in report["problems"]}
    problem = problems["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert "kron" in problem["hint"] and "lokr" in problem["found"] and report["matched"] == 75


def test_inspect_lists_algorithm_factors_and_true_rank(made):
    path, _ = made("loha")
    result = run_cli("inspect", path, "--json", "--spectrum")
    assert result.returncode == 0, result.stderr
    import json

    info = json.loads(result.stdout)
    assert info["lycoris"] == {"loha": 83}
    layer = next(entry for entry in info["layers"] if entry["source_name"].endswith("attn1_to_q"))
    assert layer["algorithm"] == "loha" and layer["factors"]["w1a"] == [32, 4] and layer["rank_bound"] == 16
    assert layer["params"] == 4 * 32 * 4 and 1 <= layer["true_rank"] <= 16


# ---------------------------------------------------------------------------------------------
# diff_b next to a LoRA (Wan): a bias delta, applied, carried or refused — never dropped


def _lora_with_diff_b(path: Path, unet_dir: Path, alpha: float) -> dict[str, torch.Tensor]:
    base = load_file(str(unet_dir / BASE_FILE))
    torch.manual_seed(3)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    tensors = {f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4),
               f"{name}.alpha": torch.tensor(alpha), f"{name}.diff_b": torch.randn(32)}
    save_file(tensors, str(path))
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias" in base
    return tensors


def test_diff_b_is_applied_by_merge_and_carried_by_convert(tiny_unet_dir, tmp_path):
    tensors = _lora_with_diff_b(tmp_path / "wan.safetensors", tiny_unet_dir, alpha=3.0)
    adapter = load_adapter(tmp_path / "wan.safetensors")
    merge(str(tiny_unet_dir), [AdapterInput(adapter, 1.0)], tmp_path / "merged", device="cpu")
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    merged = load_file(str(tmp_path / "merged" / BASE_FILE))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"
    (diff_b,) = [v for k, v in tensors.items() if k.endswith(".diff_b")]
    assert torch.equal(merged[key], base[key] + diff_b)  # unscaled, as diffusers and ComfyUI add it
    convert_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    written = load_file(str(tmp_path / "k.safetensors"))
    assert any(k.endswith(".diff_b") and torch.equal(v, diff_b) for k, v in written.items())
    with pytest.raises(LorahubError, match="diff_b|bias delta"):  # scale 0.75: PEFT would rescale lora_B.bias
        convert_adapter(adapter, tmp_path / "p", "peft")
    assert not (tmp_path / "p").exists()


def test_diff_b_goes_to_peft_when_exact(tiny_unet_dir, tmp_path):
    tensors = _lora_with_diff_b(tmp_path / "wan.safetensors", tiny_unet_dir, alpha=4.0)  # scale 1
    adapter = load_adapter(tmp_path / "wan.safetensors")
    convert_adapter(adapter, tmp_path / "p", "peft")
    back = load_adapter(tmp_path / "p")
    (layer,) = back.layers.values()
    (diff_b,) = [v for k, v in tensors.items() if k.endswith(".diff_b")]
    assert layer.bias is not None and torch.equal(layer.bias.load() * layer.scale, diff_b)


def test_vector_diffs_are_applied_carried_or_refused(tiny_unet_dir, tmp_path):
    """`diff`/`diff_b` on a norm layer (Wan LoRAs, LyCORIS full on norms): added to the base weight and
    bias by merge and unmerge, written back by --to kohya, refused by --to peft naming the tensor."""
    path = tmp_path / "norm.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_norm"
    torch.manual_seed(5)
    diff, diff_b = torch.randn(32), torch.randn(32)
    save_file({f"{name}.diff": diff, f"{name}.diff_b": diff_b}, str(path))
    result = run_cli("inspect", path, "--json")
    assert result.returncode == 0 and f"{name}.diff" in result.stdout
    result = run_cli("merge", "--base", tiny_unet_dir, path, "-o", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    merged = load_file(str(tmp_path / "m" / BASE_FILE))
    key = "down_blocks.0.attentions.0.norm"
    assert torch.equal(merged[key + ".weight"], base[key + ".weight"] + diff)
    assert torch.equal(merged[key + ".bias"], base[key + ".bias"] + diff_b)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert sorted(changed) == [key + ".bias", key + ".weight"]
    result = run_cli("unmerge", "--base", tmp_path / "m", path, "-o", tmp_path / "u")
    assert result.returncode == 0, result.stderr
    back = load_file(str(tmp_path / "u" / BASE_FILE))
    assert torch.allclose(back[key + ".weight"], base[key + ".weight"], atol=1e-6)
    adapter = load_adapter(path)
    convert_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    written = load_file(str(tmp_path / "k.safetensors"))
    assert torch.equal(written[f"{name}.diff"], diff) and torch.equal(written[f"{name}.diff_b"], diff_b)
    with pytest.raises(LorahubError, match=f"{name}.diff"):
        convert_adapter(adapter, tmp_path / "p", "peft")
    assert not (tmp_path / "p").exists()
    shutil.rmtree(tmp_path / "m", ignore_errors=True)


def test_peft_style_diff_b_and_norm_diff_are_applied(tiny_unet_dir, tmp_path):
    """The same deltas in a PEFT-style (diffusers) file: `lora_A`/`lora_B` + `diff_b`, and a norm `diff`."""
    torch.manual_seed(6)
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    norm = "unet.down_blocks.0.attentions.0.norm"
    tensors = {f"{module}.lora_A.weight": torch.randn(4, 32), f"{module}.lora_B.weight": torch.randn(32, 4),
               f"{module}.diff_b": torch.randn(32), f"{norm}.diff": torch.randn(32)}
    save_file(tensors, str(tmp_path / "wan.safetensors"))
    adapter = load_adapter(tmp_path / "wan.safetensors")
    assert adapter.format == "diffusers" and not adapter.extra_keys
    merge(str(tiny_unet_dir), [AdapterInput(adapter, 1.0)], tmp_path / "merged", device="cpu")
    base = load_file(str(tiny_unet_dir / BASE_FILE))
    merged = load_file(str(tmp_path / "merged" / BASE_FILE))
    inner, norm_inner = module.removeprefix("unet."), norm.removeprefix("unet.")
    assert torch.equal(merged[inner + ".bias"], base[inner + ".bias"] + tensors[f"{module}.diff_b"])
    assert torch.equal(merged[norm_inner + ".weight"], base[norm_inner + ".weight"] + tensors[f"{norm}.diff"])
    expected = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
    assert _rel(merged[inner + ".weight"] - base[inner + ".weight"], expected) <= 1e-6
