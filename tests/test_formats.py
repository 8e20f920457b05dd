"""Formats, inspect and convert against adapters made by PEFT and diffusers themselves."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli, run_cli_subprocess
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorahub.formats import load_adapter, save_adapter

LORAHUB = [sys.executable, "-m", "lorahub.cli"]


def inspect_json(path) -> dict:
    result = run_cli("inspect", path, "--json", check=True)
    return json.loads(result.stdout)


def peft_layers(base_dir: Path, adapter_dir: Path, model_cls: str = "llama"):
    """PEFT's own view of every LoRA layer: {module name: tuner layer}."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cls = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}[model_cls]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(cls.from_pretrained(str(base_dir)), str(adapter_dir))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            out[name.removeprefix("base_model.model.")] = module
    return out


# --------------------------------------------------------------------------------------------
# inspect reports what PEFT itself computes


@pytest.mark.parametrize("fixture,model_cls", [
    ("peft_lora_dir", "llama"), ("peft_rslora_dir", "llama"), ("peft_dora_dir", "llama"),
    ("peft_embed_dir", "llama"), ("peft_gpt2_dir", "gpt2"),
])
def test_inspect_matches_peft(request, fixture, model_cls):
    adapter_dir = request.getfixturevalue(fixture)
    base_dir = Path(json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    info = inspect_json(adapter_dir)
    peft_view = peft_layers(base_dir, adapter_dir, model_cls)
    assert info["format"] == "peft"
    assert info["modules"] == len(peft_view)
    by_target = {entry["target"]: entry for entry in info["layers"]}
    assert set(by_target) == set(peft_view)
    for name, module in peft_view.items():
        entry = by_target[name]
        assert entry["rank"] == module.r["default"], name
        assert entry["alpha"] == pytest.approx(module.lora_alpha["default"]), name
        assert entry["scale"] == pytest.approx(module.scaling["default"], rel=1e-7), name
        assert entry["dora"] == bool(module.use_dora.get("default", False))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert info["rslora"] == bool(config.get("use_rslora"))
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        total = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    assert info["params"] == total
    assert info["nonfinite"] == []


def test_inspect_rslora_patterns_distribution(peft_rslora_dir):
    info = inspect_json(peft_rslora_dir)
    # rank_pattern {"q_proj": 4, "model.layers.1.mlp.down_proj": 12} over 2 layers × 5 targets
    assert info["rank"] is None
    assert info["rank_distribution"] == {"8": 7, "4": 2, "12": 1}
    assert info["targets"]["q_proj"] == 2


def test_inspect_kohya_file(kohya_unet_file):
    info = inspect_json(kohya_unet_file)
    with safe_open(str(kohya_unet_file), "pt") as handle:
        keys = list(handle.keys())
        alphas = {float(handle.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        ranks = {handle.get_slice(k).get_shape()[0] for k in keys if k.endswith(".lora_down.weight")}
    assert info["format"] == "kohya"
    assert info["modules"] == sum(k.endswith(".lora_down.weight") for k in keys)
    assert info["rank"] == ranks.pop()
    assert info["alpha"] == alphas.pop()
    assert info["scale"] == pytest.approx(info["alpha"] / info["rank"])
    assert "conv 3×3" in info["kinds"] and "conv 1×1" in info["kinds"] and "linear" in info["kinds"]
    assert info["metadata"]["ss_network_dim"] == str(info["rank"])
    hashes = info["files"][0]["hashes"]
    import hashlib
    raw = kohya_unet_file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert hashes["sha256"] == hashlib.sha256(raw).hexdigest()
    assert hashes["autov2"] == hashlib.sha256(raw).hexdigest()[:10].upper()
    assert hashes["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()


def test_inspect_human_output_and_layers(peft_lora_dir):
    result = run_cli("inspect", peft_lora_dir, "--all-layers", check=True)
    assert "q_proj ×2" in result.stdout
    assert "model.layers.1.mlp.down_proj" in result.stdout


def test_inspect_spectrum_matches_dense_svd_of_peft_delta(peft_rslora_dir):
    """`inspect --spectrum`: every layer's singular values are those of PEFT's own ΔW (numpy's dense
    SVD), and the effective rank is the minimal k holding 99% of Σσ²."""
    import numpy as np

    base_dir = Path(json.loads((peft_rslora_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    info = json.loads(run_cli("inspect", peft_rslora_dir, "--spectrum", "--json", check=True).stdout)
    layers = {entry["target"]: entry for entry in info["layers"]}
    peft_view = peft_layers(base_dir, peft_rslora_dir)
    assert set(layers) == set(peft_view)
    for name, module in peft_view.items():
        S = np.linalg.svd(module.get_delta_weight("default").detach().double().numpy(), compute_uv=False)
        got = np.array(layers[name]["singular_values"])
        assert len(got) == module.r["default"], name
        np.testing.assert_allclose(got, S[:len(got)], rtol=0, atol=1e-5 * S[0] + 1e-6, err_msg=name)
        energy = np.cumsum(S ** 2) / np.sum(S ** 2)
        assert layers[name]["effective_rank_99"] == int(np.argmax(energy >= 0.99 - 1e-12)) + 1, name
    text = run_cli("inspect", peft_rslora_dir, "--spectrum", check=True).stdout
    assert "model.layers.1.mlp.down_proj" in text


# --------------------------------------------------------------------------------------------
# round trips keep B·A·scale of every layer (compared with PEFT's own delta)


def _peft_delta(module) -> torch.Tensor:
    return module.get_delta_weight("default").detach().float()


@pytest.mark.parametrize("fixture,model_cls", [
    ("peft_lora_dir", "llama"), ("peft_rslora_dir", "llama"), ("peft_gpt2_dir", "gpt2"),
    ("peft_embed_dir", "llama"), ("peft_dora_dir", "llama"),
])
@pytest.mark.parametrize("via", ["kohya", "diffusers"])
def test_round_trip_keeps_delta(request, tmp_path, fixture, model_cls, via):
    adapter_dir = request.getfixturevalue(fixture)
    if via == "diffusers" and fixture == "peft_dora_dir":
        result = run_cli("convert", adapter_dir, "--to", via, "--out", tmp_path / "x.safetensors")
        assert result.returncode == 1 and "DoRA" in result.stderr
        return
    base_dir = Path(json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    middle = tmp_path / "middle.safetensors"
    run_cli("convert", adapter_dir, "--to", via, "--out", middle, "--drop-full-tensors", check=True)
    back = tmp_path / "back"
    run_cli("convert", middle, "--to", "peft", "--out", back, check=True)
    # PEFT itself loads the round-tripped adapter and computes the same deltas
    original = peft_layers(base_dir, adapter_dir, model_cls)
    returned = peft_layers(base_dir, back, model_cls)
    assert set(original) == set(returned)
    for name, module in original.items():
        torch.testing.assert_close(_peft_delta(returned[name]), _peft_delta(module), rtol=1e-6, atol=1e-7)
        if module.use_dora.get("default"):
            torch.testing.assert_close(returned[name].lora_magnitude_vector["default"].weight,
                                       module.lora_magnitude_vector["default"].weight)


def test_kohya_to_peft_to_kohya_loads_in_diffusers(tmp_path, tiny_unet_dir, kohya_unet_file):
    from fixtures_models import reference_fused_unet_state_dict

    peft_dir = tmp_path / "peft"
    run_cli("convert", kohya_unet_file, "--to", "peft", "--out", peft_dir, check=True)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 2
    kohya_again = tmp_path / "again.safetensors"
    run_cli("convert", peft_dir, "--to", "kohya", "--out", kohya_again, check=True)
    expected = reference_fused_unet_state_dict(tiny_unet_dir, kohya_unet_file)
    actual = reference_fused_unet_state_dict(tiny_unet_dir, kohya_again)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)


def test_peft_unet_adapter_to_kohya_matches_peft_merge(tmp_path, tiny_unet_dir):
    """A PEFT adapter saved on a diffusers UNet, converted to kohya, fused by diffusers ==
    PEFT's own merge_and_unload of the original."""
    from diffusers import UNet2DConditionModel
    from fixtures_models import reference_fused_unet_state_dict
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_unet_dir), subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["to_q", "to_v", "conv1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(unet, config)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn_like(param) * 0.1
    model.save_pretrained(str(tmp_path / "peft_unet"))
    merged = model.merge_and_unload().state_dict()
    kohya_file = tmp_path / "unet_kohya.safetensors"
    run_cli("convert", tmp_path / "peft_unet", "--to", "kohya", "--out", kohya_file, check=True)
    with safe_open(str(kohya_file), "pt") as handle:
        assert all(k.startswith("lora_unet_") for k in handle.keys())
    fused = reference_fused_unet_state_dict(tiny_unet_dir, kohya_file)
    for key, value in merged.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-5, atol=1e-6)
    # and as a diffusers file: the rsLoRA scale travels in `lora_adapter_metadata`, which diffusers reads
    diffusers_file = tmp_path / "pytorch_lora_weights.safetensors"
    run_cli("convert", tmp_path / "peft_unet", "--to", "diffusers", "--out", diffusers_file, check=True)
    with safe_open(str(diffusers_file), "pt") as handle:
        assert all(k.startswith("unet.") for k in handle.keys())
    fused = reference_fused_unet_state_dict(tiny_unet_dir, diffusers_file)
    for key, value in merged.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-5, atol=1e-6)


def test_kohya_names_without_metadata_are_guessed(tmp_path, kohya_unet_file):
    adapter = load_adapter(kohya_unet_file)
    targets = set(adapter.layers)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in targets
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in targets
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj" in targets
    assert "unet.down_blocks.0.resnets.0.conv1" in targets


def test_kohya_without_alpha_means_alpha_equals_rank(tmp_path, tiny_unet_dir, kohya_unet_file):
    """A kohya file with no `.alpha` keys: scale 1, as diffusers' own loader fuses it."""
    from fixtures_models import load_file_state, reference_fused_unet_state_dict

    with safe_open(str(kohya_unet_file), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.endswith(".alpha")}
    path = tmp_path / "no_alpha.safetensors"
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if k != "ss_network_alpha"})
    info = inspect_json(path)
    assert info["alpha"] == info["rank"] == 4 and info["scale"] == 1
    assert all(entry["alpha"] == entry["rank"] and entry["scale"] == 1 for entry in info["layers"])
    fused = reference_fused_unet_state_dict(tiny_unet_dir, path)
    base = load_file_state(tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors")
    adapter = load_adapter(path)
    assert len(adapter.layers) == info["modules"] > 0
    for target, layer in adapter.layers.items():
        key = target.removeprefix("unet.") + ".weight"
        torch.testing.assert_close(fused[key] - base[key], layer.delta_weight(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# LyCORIS is recognised; LoHa/LoKr factors are flattened, so writing them needs the base


def test_lycoris_loha_recognised(tmp_path):
    torch.manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {f"{name}.hada_w1_a": torch.randn(32, 4), f"{name}.hada_w1_b": torch.randn(4, 32),
               f"{name}.hada_w2_a": torch.randn(32, 4), f"{name}.hada_w2_b": torch.randn(4, 32),
               f"{name}.alpha": torch.tensor(4.0)}
    path = tmp_path / "loha.safetensors"
    save_file(tensors, str(path))
    info = inspect_json(path)
    assert info["format"] == "lycoris" and info["lycoris"] == {"loha": 1}
    assert info["layers"][0]["algorithm"] == "loha" and info["layers"][0]["rank_bound"] == 16
    result = run_cli("convert", path, "--to", "peft", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert name in result.stderr and "pass --base" in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# bad input: one line naming the file (and key), exit 1, no traceback


def _assert_clean_error(result, *needles, code=1):
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def _lora_file(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


def test_missing_path(tmp_path):
    # the installed console entry point, in a real process
    _assert_clean_error(run_cli_subprocess("inspect", tmp_path / "nope"), "nope", "no such file")


def test_directory_without_adapter(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    _assert_clean_error(run_cli("inspect", tmp_path), str(tmp_path), "no adapter here")


def test_not_safetensors(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_text("this is not a safetensors file at all")
    _assert_clean_error(run_cli("inspect", path), "adapter.safetensors", "not a safetensors file")


def test_truncated_file(tmp_path, peft_lora_dir):
    raw = (peft_lora_dir / "adapter_model.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[: len(raw) // 2])
    _assert_clean_error(run_cli("inspect", path), "cut.safetensors", "truncated")


def test_corrupt_header(tmp_path):
    body = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # no closing brace
    body += b" " * (-len(body) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    _assert_clean_error(run_cli("inspect", path), "bad.safetensors", "corrupt safetensors header")


def test_rank_mismatch(tmp_path):
    path = _lora_file(tmp_path / "r.safetensors", {
        "unet.x.to_q.lora_A.weight": torch.randn(4, 8), "unet.x.to_q.lora_B.weight": torch.randn(8, 3)})
    _assert_clean_error(run_cli("inspect", path), "r.safetensors", "rank mismatch",
                        "unet.x.to_q.lora_A.weight", "rank 4", "rank 3")


def test_a_without_b(tmp_path):
    path = _lora_file(tmp_path / "ab.safetensors", {
        "lora_unet_x_to_q.lora_down.weight": torch.randn(4, 8), "lora_unet_x_to_q.alpha": torch.tensor(4.0)})
    _assert_clean_error(run_cli("inspect", path), "ab.safetensors", "lora_unet_x_to_q.lora_down.weight",
                        "lora_unet_x_to_q.lora_up.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_factor(tmp_path, bad):
    up = torch.randn(8, 4)
    up[1, 2] = bad
    path = _lora_file(tmp_path / "nan.safetensors", {
        "unet.x.to_q.lora_A.weight": torch.randn(4, 8), "unet.x.to_q.lora_B.weight": up})
    result = run_cli("inspect", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "nan.safetensors" in result.stderr and "unet.x.to_q.lora_B.weight" in result.stderr


def test_unknown_format(tmp_path):
    path = _lora_file(tmp_path / "model.safetensors", {"encoder.weight": torch.randn(4, 4)})
    _assert_clean_error(run_cli("inspect", path), "model.safetensors", "unknown adapter format", "encoder.weight")


def test_pickle_refused_then_loaded_weights_only(tmp_path, peft_lora_dir):
    pickled = tmp_path / "adapter"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((peft_lora_dir / "adapter_config.json").read_text())
    torch.save(load_file(str(peft_lora_dir / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    _assert_clean_error(run_cli("inspect", pickled), "adapter_model.bin", "--allow-pickle")
    allowed = run_cli("inspect", pickled, "--allow-pickle", "--json", check=True)
    assert json.loads(allowed.stdout)["modules"] == inspect_json(peft_lora_dir)["modules"]


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    with open(path, "wb") as handle:
        pickle.dump({"x.lora_A.weight": Evil()}, handle)
    result = run_cli("inspect", path, "--allow-pickle")
    assert result.returncode == 1 and "pwned" not in result.stdout
    assert "weights_only" in result.stderr


def test_usage_error_exit_2(peft_lora_dir):
    result = run_cli("convert", peft_lora_dir, "--to", "onnx", "--out", "x")
    assert result.returncode == 2


def test_debug_shows_traceback(tmp_path):
    result = subprocess.run([*LORAHUB, "--debug", "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_config_with_unknown_keys_loads(tmp_path, peft_lora_dir):
    copy = tmp_path / "future"
    copy.mkdir()
    config = json.loads((peft_lora_dir / "adapter_config.json").read_text())
    config["some_future_option"] = {"x": 1}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (copy / "adapter_model.safetensors").write_bytes((peft_lora_dir / "adapter_model.safetensors").read_bytes())
    adapter = load_adapter(copy)
    assert len(adapter.layers) == 14
    out = save_adapter(adapter, tmp_path / "rewritten", "peft")
    assert json.loads((out / "adapter_config.json").read_text())["some_future_option"] == {"x": 1}


def test_inputs_are_never_modified(tmp_path, peft_lora_dir):
    before = {p.name: p.read_bytes() for p in peft_lora_dir.iterdir() if p.is_file()}
    run_cli("convert", peft_lora_dir, "--to", "kohya", "--out", tmp_path / "k.safetensors", check=True)
    after = {p.name: p.read_bytes() for p in peft_lora_dir.iterdir() if p.is_file()}
    assert before == after


def test_peft_variant_with_other_math_is_flagged_and_refused(tmp_path, peft_lora_dir):
    copy = tmp_path / "kasa"
    copy.mkdir()
    config = json.loads((peft_lora_dir / "adapter_config.json").read_text())
    config["kasa_config"] = {"r": 4}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (copy / "adapter_model.safetensors").write_bytes((peft_lora_dir / "adapter_model.safetensors").read_bytes())
    info = inspect_json(copy)
    assert any("KaSA" in w for w in info["warnings"])
    for args in (("convert", copy, "--to", "kohya", "--out", tmp_path / "k.safetensors"),
                 ("resize", copy, "--rank", "2", "--out", tmp_path / "r"),
                 ("blend", copy, peft_lora_dir, "--weights", "0.5,0.5", "--out", tmp_path / "b"),
                 ("merge", "--base", config["base_model_name_or_path"], copy, "--out", tmp_path / "m")):
        result = run_cli(*args)
        _assert_clean_error(result, "KaSA", "not s·B·A")


def test_headers_only_inspect_reads_no_tensor_data(tmp_path, peft_lora_dir):
    """Lazy factors: a file whose every data byte is 0xFF (NaN in fp32) inspects cleanly with
    --headers-only (the data was never read) and fails the NaN scan when the data is read."""
    source = peft_lora_dir / "adapter_model.safetensors"
    raw = bytearray(source.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    raw[8 + header_len:] = b"\xff" * (len(raw) - 8 - header_len)
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    (poisoned / "adapter_config.json").write_text((peft_lora_dir / "adapter_config.json").read_text())
    (poisoned / "adapter_model.safetensors").write_bytes(bytes(raw))
    adapter = load_adapter(poisoned)
    assert not any(layer.A.loaded or layer.B.loaded for layer in adapter.layers.values())
    fast = run_cli("inspect", poisoned, "--headers-only", "--json", check=True)
    assert json.loads(fast.stdout)["modules"] == 14
    full = run_cli("inspect", poisoned)
    assert full.returncode == 1 and "NaN" in full.stderr


@pytest.mark.parametrize("command", ["convert", "resize", "blend"])
def test_sdxl_kohya_sgm_names_convert_to_diffusers_names(tmp_path, command):
    """kohya names SDXL UNet modules in its SGM layout (input_blocks.4.1...). diffusers maps those
    itself when it loads the kohya file; `convert --to diffusers` (and any writer: `resize --to
    diffusers` at the file's own rank keeps the layers; `blend` of the file alone at weight 1, `cat`) must
    write the diffusers names and the components diffusers loads them by, so the written file fuses to
    the same weights as diffusers' own load of the kohya file."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_kohya
    from fixtures_models import reference_fused_unet_state_dict
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from lorahub.names import diffusers_to_ldm_unet

    torch.manual_seed(3)
    config = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, sample_size=16)
    unet = UNet2DConditionModel(**config)
    unet_dir = tmp_path / "sdxl_like"
    unet.save_pretrained(str(unet_dir / "unet"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"]),
                                       UNet2DConditionModel.from_pretrained(str(unet_dir), subfolder="unet"))
    for name, param in lora.named_parameters():
        if "lora_" in name:
            param.data = torch.randn_like(param) * 0.1
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(lora).items()})
    sgm = {}
    for key, value in kohya.items():
        module, _, suffix = key.partition(".")
        dotted = load_adapter_target(module)
        ldm = diffusers_to_ldm_unet(dotted, 2, {1})
        assert ldm is not None, dotted
        sgm[f"lora_unet_{ldm.replace('.', '_')}.{suffix}"] = \
            torch.tensor(2.0) if suffix == "alpha" else value.contiguous()
    sgm_file = tmp_path / "sdxl_kohya.safetensors"
    save_file(sgm, str(sgm_file))
    assert any("input_blocks" in k for k in sgm)

    # diffusers' own reading of the SGM-named kohya file (it needs the UNet config to map the blocks)
    reference = UNet2DConditionModel.from_pretrained(str(unet_dir), subfolder="unet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(sgm_file), unet_config=reference.config)
        reference.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="k")
        reference.fuse_lora(lora_scale=1.0)
    expected = {k.replace(".base_layer.", "."): v for k, v in reference.state_dict().items() if ".lora_" not in k}

    converted = tmp_path / "converted.safetensors"
    args = {"convert": ["convert", sgm_file], "resize": ["resize", sgm_file, "--rank", "4"],
            "blend": ["blend", sgm_file, "-w", "1", "--method", "cat"]}[command]
    result = run_cli(*args, "--to", "diffusers", "--out", converted, "--json", check=True)
    assert any("SGM" in w for w in json.loads(result.stdout)["warnings"])
    with safe_open(str(converted), "pt") as handle:
        assert not any("input_blocks" in k for k in handle.keys())
    fused = reference_fused_unet_state_dict(unet_dir, converted)
    base = UNet2DConditionModel.from_pretrained(str(unet_dir), subfolder="unet").state_dict()
    changed = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert len(changed) >= 6
    for key in expected:
        torch.testing.assert_close(fused[key], expected[key], rtol=1e-6, atol=1e-7)


def load_adapter_target(kohya_module: str) -> str:
    """diffusers' own converter wrote `lora_unet_<path>`; its dotted path without the `unet.`."""
    from lorahub.formats.kohya_names import kohya_to_target

    return kohya_to_target(kohya_module).removeprefix("unet.")
