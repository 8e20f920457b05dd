"""lorahub resize: outputs load in PEFT / diffusers and hold the truncated-SVD optimum."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures_models import load_file_state, peft_merged_state_dict, reference_fused_unet_state_dict
from safetensors.torch import load_file

from lorahub.adapter import Adapter, LazyTensor, LoraLayer
from lorahub.cli import cli
from lorahub.errors import LorahubError
from lorahub.formats import load_adapter, save_adapter
from lorahub.lowrank import choose_rank, effective_rank
from lorahub.resize import is_spatial_conv, layer_spectra, resize_adapter


def optimum(layer: LoraLayer, new_rank: int) -> torch.Tensor:
    """Best rank-new_rank approximation of the layer's ΔW (base layout), by a dense float64 SVD."""
    delta = layer.delta_math(dtype=torch.float64).numpy()
    U, S, Vt = np.linalg.svd(delta, full_matrices=False)
    best = (U[:, :new_rank] * S[:new_rank]) @ Vt[:new_rank]
    return layer.to_base_layout(torch.from_numpy(best))


def dense_spectrum(layer: LoraLayer) -> np.ndarray:
    return np.linalg.svd(layer.delta_math(dtype=torch.float64).numpy(), compute_uv=False)


def run_cli(*args: str):
    result = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    return result


# ------------------------------------------------------------------------------------------- PEFT

def _check_peft_merge(base_dir, src_dir, out_dir, expect_ranks: dict[str, int]):
    """PEFT loads out_dir; merged − base equals the truncated-SVD optimum of the source layers."""
    source = load_adapter(src_dir)
    base = load_file_state(base_dir / "model.safetensors")
    merged = peft_merged_state_dict(base_dir, out_dir)
    for target, layer in source.layers.items():
        new_rank = expect_ranks[target]
        key = target + ".weight"
        got = merged[key].double() - base[key].double()
        want = optimum(layer, min(new_rank, layer.rank))
        err = float((got - want).abs().max())
        assert err <= 2e-5 * max(1.0, float(want.abs().max())), (target, err)
        # and it is the Eckart–Young optimum: the error to the original is √(Σ dropped σ²)
        S = dense_spectrum(layer)
        full = layer.delta_weight(dtype=torch.float64)
        dropped = math.sqrt(float(np.sum(S[new_rank:] ** 2)))
        assert abs(float(torch.linalg.matrix_norm(full - got)) - dropped) <= 1e-4 * max(S[0], 1e-12)


def test_peft_fixed_rank_loads_in_peft_and_is_optimal(tmp_path, tiny_llama_dir, peft_rslora_dir):
    out = tmp_path / "r3"
    result = run_cli("resize", peft_rslora_dir, "--rank", 3, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["format"] == "peft" and payload["modules"] == 10 and payload["rank"] == 3
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["use_rslora"] is True
    source = load_adapter(peft_rslora_dir)
    _check_peft_merge(tiny_llama_dir, peft_rslora_dir, out, {t: 3 for t in source.layers})
    # alpha' = alpha·√(r'/r) for rsLoRA: the scale is unchanged
    resized = load_adapter(out)
    for target, layer in resized.layers.items():
        assert layer.rank == 3
        assert layer.scale == pytest.approx(source.layers[target].scale, rel=1e-12)


def test_peft_dynamic_ranks_write_patterns_that_peft_reloads(tmp_path, tiny_llama_dir, peft_lora_dir):
    source = load_adapter(peft_lora_dir)
    resized, report = resize_adapter(source, method="sv_fro", param=0.8, rank=6)
    ranks = {entry.target: entry.new_rank for entry in report.layers}
    assert len(set(ranks.values())) > 1, ranks  # per-layer ranks differ on this adapter
    for entry in report.layers:
        S = torch.from_numpy(dense_spectrum(source.layers[entry.target]))
        assert entry.new_rank == min(6, choose_rank(S, method="sv_fro", param=0.8))
        assert entry.fro_retained >= 0.8 - 1e-6 or entry.new_rank == 6
    out = save_adapter(resized, tmp_path / "dyn")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and all(k.startswith("^") for k in config["rank_pattern"])
    _check_peft_merge(tiny_llama_dir, peft_lora_dir, out, ranks)


def test_rank_at_or_above_layer_rank_keeps_tensors_exactly(tmp_path, peft_rslora_dir):
    # q_proj has rank 4, layers.1.down_proj 12, the rest 8: --rank 8 keeps all but down_proj
    out = tmp_path / "r8"
    assert run_cli("resize", peft_rslora_dir, "--rank", 8, "--out", out).exit_code == 0
    src = load_file(str(peft_rslora_dir / "adapter_model.safetensors"))
    dst = load_file(str(out / "adapter_model.safetensors"))
    assert set(src) == set(dst)
    for key, value in src.items():
        if "layers.1.mlp.down_proj" in key:
            assert value.shape != dst[key].shape and 8 in dst[key].shape
        else:
            assert torch.equal(value, dst[key]), key  # bit-identical, no zero padding
    resized = load_adapter(out)
    assert resized.layers["model.layers.0.self_attn.q_proj"].rank == 4


def test_kohya_compat_keeps_one_more(peft_lora_dir):
    source = load_adapter(peft_lora_dir)
    _, exact = resize_adapter(source, method="sv_cumulative", param=0.5)
    _, compat = resize_adapter(source, method="sv_cumulative", param=0.5, kohya_compat=True)
    for a, b in zip(exact.layers, compat.layers):
        assert b.new_rank == min(a.new_rank + 1, 8) or (b.kept and a.new_rank + 1 >= 8)


# ------------------------------------------------------------------------------------------- kohya

def test_kohya_resize_loads_in_diffusers(tmp_path, tiny_unet_dir, kohya_unet_file):
    out = tmp_path / "small.safetensors"
    result = run_cli("resize", kohya_unet_file, "--rank", 2, "--conv-rank", 1, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    source = load_adapter(kohya_unet_file)
    resized = load_adapter(out)
    assert resized.format == "kohya" and set(resized.layers) == set(source.layers)
    base = load_file_state(tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors")
    fused = reference_fused_unet_state_dict(tiny_unet_dir, out)
    n_conv = n_1x1 = 0
    for target, layer in source.layers.items():
        spatial = is_spatial_conv(layer)
        n_conv += spatial
        n_1x1 += layer.kind == "conv" and not spatial
        new_rank = 1 if spatial else 2  # 1×1 convs take --rank, not --conv-rank
        assert resized.layers[target].rank == new_rank
        # the scale is kept: alpha' = alpha/r · r'
        assert resized.layers[target].alpha == pytest.approx(layer.alpha / layer.rank * new_rank)
        key = target.removeprefix("unet.") + ".weight"
        got = fused[key].double() - base[key].double()
        want = optimum(layer, new_rank)
        assert float((got - want).abs().max()) <= 2e-5 * max(1.0, float(want.abs().max())), target
    assert n_conv > 0 and n_1x1 > 0
    meta_dim = json.loads(result.output)["summary"]
    assert meta_dim["resized"] == len(source.layers)


def test_kohya_to_peft_and_split_up(tmp_path, kohya_unet_file):
    source = load_adapter(kohya_unet_file)
    resized, _ = resize_adapter(source, rank=2, split="up")
    for target, layer in resized.layers.items():
        _, down = layer.factors(dtype=torch.float64)
        np.testing.assert_allclose((down @ down.T).numpy(), np.eye(layer.rank), atol=1e-5)  # Vᵀ rows orthonormal
    out = tmp_path / "peft"
    assert run_cli("resize", kohya_unet_file, "--rank", 2, "--to", "peft", "--out", out).exit_code == 0
    back = load_adapter(out)
    for target, layer in back.layers.items():
        ref = optimum(source.layers[target], 2)  # --conv-rank defaults to --rank
        assert float((layer.delta_weight(dtype=torch.float64) - ref).abs().max()) < 1e-5


# ------------------------------------------------------------------------------------------- report, spectra, refusals

def test_report_fields_and_text_output(tmp_path, peft_lora_dir):
    result = run_cli("resize", peft_lora_dir, "--rank", 2, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "energy retained: mean" in result.output and "worst" in result.output
    source = load_adapter(peft_lora_dir)
    _, report = resize_adapter(source, rank=2)
    summary = report.summary()
    for entry in report.layers:
        S = dense_spectrum(source.layers[entry.target])
        assert entry.old_rank == 8 and entry.new_rank == 2 and not entry.kept
        assert entry.fro_retained == pytest.approx(np.linalg.norm(S[:2]) / np.linalg.norm(S), rel=1e-5)
        assert entry.energy_retained == pytest.approx(entry.fro_retained ** 2, rel=1e-12)
        assert entry.sum_retained == pytest.approx(S[:2].sum() / S.sum(), rel=1e-5)
        assert entry.max_dropped_ratio == pytest.approx(S[2] / S[0], rel=1e-5)
    assert summary["worst_energy_retained"] == min(e.energy_retained for e in report.layers)
    assert summary["mean_energy_retained"] == pytest.approx(np.mean([e.energy_retained for e in report.layers]))


def test_layer_spectra_and_effective_rank(peft_rslora_dir):
    source = load_adapter(peft_rslora_dir)
    spectra = layer_spectra(source)
    assert set(spectra) == set(source.layers)
    for target, S in spectra.items():
        ref = dense_spectrum(source.layers[target])  # of s·B·A
        np.testing.assert_allclose(S.numpy(), ref[:len(S)], rtol=0, atol=1e-5 * ref[0])
        assert 1 <= effective_rank(S) <= source.layers[target].rank


def test_refuses_dora_and_bad_arguments(tmp_path, peft_dora_dir, peft_lora_dir):
    result = run_cli("resize", peft_dora_dir, "--rank", 2, "--out", tmp_path / "d")
    assert result.exit_code == 1 and "DoRA" in result.output
    with pytest.raises(LorahubError, match="DoRA"):
        resize_adapter(load_adapter(peft_dora_dir), rank=2)
    with pytest.raises(LorahubError, match="needs --param"):
        resize_adapter(load_adapter(peft_lora_dir), method="sv_fro")
    assert not (tmp_path / "d").exists()
    for args in (["--rank-method", "sv_fro"], ["--param", "0.5"], ["--rank", "0"],
                 ["--rank-method", "sv_fro", "--param", "2"], ["--rank-method", "sv_ratio", "--param", "0.5"]):
        result = run_cli("resize", peft_lora_dir, *args, "--out", tmp_path / "x")
        assert result.exit_code == 2, args  # usage errors
        assert not (tmp_path / "x").exists()
    (tmp_path / "exists").mkdir()
    assert run_cli("resize", peft_lora_dir, "--rank", 2, "--out", tmp_path / "exists").exit_code == 1


def test_zero_layer_becomes_rank_one_zero():
    A = torch.zeros(4, 6)
    B = torch.zeros(5, 4)
    layer = LoraLayer(target="m", kind="linear", A=LazyTensor.of(A), B=LazyTensor.of(B), alpha=8.0, rank=4)
    adapter = Adapter(path=None, format="peft", layers={"m": layer})
    out, report = resize_adapter(adapter, method="sv_fro", param=0.9)
    assert report.layers[0].zero and out.layers["m"].rank == 1
    assert torch.all(out.layers["m"].delta_weight() == 0)


def test_bf16_factors_stay_bf16_and_fp64_compute():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 40, generator=g).to(torch.bfloat16)
    B = torch.randn(30, 6, generator=g).to(torch.bfloat16)
    layer = LoraLayer(target="m", kind="linear", A=LazyTensor.of(A), B=LazyTensor.of(B), alpha=6.0, rank=6)
    adapter = Adapter(path=None, format="peft", layers={"m": layer})
    out, _ = resize_adapter(adapter, rank=3, compute_dtype=torch.float64)
    new = out.layers["m"]
    assert new.A.load().dtype == torch.bfloat16 and new.rank == 3 and new.alpha == pytest.approx(3.0)
    ref = optimum(layer, 3)
    assert float((new.delta_weight(dtype=torch.float64) - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
