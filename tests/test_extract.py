"""`lorahub extract` (issue 14): a LoRA from a fine-tuned model.

- an exact rank-6 delta on a tiny Llama (fp32) comes back to ≤ 1e-5 per layer, and PEFT's own
  `merge_and_unload` of the extracted adapter reproduces the tuned weights;
- a decaying spectrum plus noise: every layer's error ≤ 1.02× the Eckart–Young optimum (float64 SVD here);
- SD UNet convs (3×3 and 1×1) as kohya conv LoRA that diffusers fuses back to the tuned UNet, and the
  same from SD single-file checkpoints (diffusers names);
- mismatched models refused, naming the tensor, nothing written;
- kohya's `extract_lora_from_models.py` algorithm (dense ΔW, full SVD, U·S split, quantile clamp),
  re-implemented below, and lorahub agree on the same inputs within the randomized tolerance;
- the CLI: usage errors, the JSON contract (docs/json.md), the output policy (kill -9, Ctrl-C).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from fixtures_models import load_file_state, peft_merged_state_dict, reference_fused_unet_state_dict
from safetensors.torch import save_file

from lorahub.errors import LorahubError, OptionError
from lorahub.extract import RankRule, decompose, extract, plan_extract, randomized_svd
from lorahub.extract import api as extract_api
from lorahub.extract import batched as extract_batched
from lorahub.extract.api import BATCH_ENV
from lorahub.formats import load_adapter

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# models


def _low_rank(shape: tuple[int, ...], rank: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A rank-`rank` delta in a weight's math view (out × in·kh·kw), in the weight's shape."""
    n, k = shape[0], int(torch.tensor(shape[1:]).prod())
    return ((torch.randn(n, rank, generator=gen) @ torch.randn(rank, k, generator=gen)) * scale).reshape(shape)


def _tuned_copy(base: Path, out: Path, change, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of the model directory `base` whose safetensors tensors are `change(name, tensor, gen)`
    (None: unchanged). Returns the deltas actually stored (tuned − base, in float64)."""
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.built"))
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for file in sorted(out.rglob("*.safetensors")):
        state = load_file_state(file)
        for name in sorted(state):
            new = change(name, state[name], gen)
            if new is not None:
                new = new.to(state[name].dtype).contiguous()
                deltas[name] = new.double() - state[name].double()
                state[name] = new
        save_file(state, str(file), metadata={"format": "pt"})
    return deltas


def _rank6_linears(name: str, w: torch.Tensor, gen: torch.Generator):
    if w.ndim == 2 and "embed" not in name:
        return w + _low_rank(tuple(w.shape), 6, 0.05, gen)
    return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _adapter_delta(layer) -> torch.Tensor:
    """The layer's ΔW in the base weight's layout, float64."""
    return layer.delta_weight(dtype=torch.float64)


@pytest.fixture
def tuned_llama(tmp_path, tiny_llama_dir):
    deltas = _tuned_copy(tiny_llama_dir, tmp_path / "tuned", _rank6_linears)
    return tmp_path / "tuned", deltas


# ---------------------------------------------------------------------------------------------
# exact recovery, PEFT


@pytest.mark.parametrize("route", ["exact", "randomized"])
def test_exact_rank6_delta_is_recovered_and_peft_merge_reproduces_tuned(tmp_path, tiny_llama_dir, tuned_llama,
                                                                       route, monkeypatch):
    tuned, deltas = tuned_llama
    if route == "randomized":  # the tiny model's layers (≤ 128 wide) would all take the exact SVD
        monkeypatch.setattr("lorahub.extract.svd.EXACT_BELOW", 8)
    out = tmp_path / "lora"
    result = extract(tiny_llama_dir, tuned, out, rank=6, device="cpu")
    assert {layer.svd for layer in result.report.layers} == {route}
    assert len(result.report.layers) == len(deltas) == 15  # 2 × 7 projections + lm_head
    assert set(result.report.unchanged) == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")}
    adapter = load_adapter(out)
    assert adapter.format == "peft" and {layer.rank for layer in adapter.layers.values()} == {6}
    for target, layer in adapter.layers.items():
        rel = _rel(_adapter_delta(layer), deltas[target + ".weight"])
        assert rel <= 1e-5, (target, rel)
    for row in result.report.layers:  # the report's error is the one measured here
        assert row.rel_error <= 1e-5 and row.energy_retained >= 1 - 1e-10
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_dir) and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 6 and config["lora_alpha"] == 6
    merged = peft_merged_state_dict(tiny_llama_dir, out)
    tuned_state = load_file_state(tuned / "model.safetensors")
    base_state = load_file_state(tiny_llama_dir / "model.safetensors")
    for name, value in tuned_state.items():
        if name in deltas:
            assert _rel(merged[name] - base_state[name].double(), deltas[name]) <= 1e-5, name
        else:
            assert torch.equal(merged[name], value), name


def test_randomized_svd_recovers_exact_low_rank_matrices():
    gen = torch.Generator().manual_seed(1)
    for n, k in ((700, 300), (300, 700)):
        delta = torch.randn(n, 6, generator=gen) @ torch.randn(6, k, generator=gen)
        for rank in (6, 10):
            work = delta.clone()
            d = decompose(work, RankRule(rank=rank), energy=float(delta.norm()) ** 2,
                          generator=torch.Generator().manual_seed(0))
            assert not d.exact and d.rank == rank
            assert _rel(d.up @ d.down, delta) <= 1e-5
    # a transposed view (GPT-2 Conv1D, embeddings) decomposes the same
    d = decompose(delta.T, RankRule(rank=6), energy=float(delta.norm()) ** 2)
    assert _rel(d.up @ d.down, delta.T) <= 1e-5


# ---------------------------------------------------------------------------------------------
# decaying spectrum + noise: error vs the Eckart–Young optimum


def _decaying(n: int, k: int, gen: torch.Generator, decay: float = 12.0, noise: float = 2e-3) -> torch.Tensor:
    q = min(n, k)
    U = torch.linalg.qr(torch.randn(n, q, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(k, q, generator=gen, dtype=torch.float64))[0]
    S = torch.exp(-torch.arange(q, dtype=torch.float64) / decay)
    return (U * S) @ V.T + noise * torch.randn(n, k, generator=gen, dtype=torch.float64)


def _optimum(delta: torch.Tensor, rank: int) -> float:
    S = torch.linalg.svdvals(delta.double())
    return float(S[rank:].norm() / S.norm())


@pytest.fixture(scope="module")
def spectrum_pair(tmp_path_factory):
    """Single-file 'models' whose deltas have a decaying spectrum plus noise: linear layers of several
    shapes and a 3×3 conv, all wide enough for the randomized route."""
    root = tmp_path_factory.mktemp("spectrum")
    gen = torch.Generator().manual_seed(7)
    shapes = {"blocks.0.attn.q.weight": (384, 512), "blocks.0.mlp.up.weight": (768, 320),
              "blocks.0.mlp.down.weight": (320, 768), "blocks.1.conv.weight": (192, 64, 3, 3),
              "blocks.1.norm.weight": (320,)}
    base, tuned = {}, {}
    for name, shape in shapes.items():
        base[name] = torch.randn(shape, generator=gen) * 0.02
        if len(shape) == 1:
            tuned[name] = base[name] + 0.01
            continue
        delta = _decaying(shape[0], int(torch.tensor(shape[1:]).prod()), gen).reshape(shape) * 0.01
        tuned[name] = (base[name].double() + delta).float()
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return root / "base.safetensors", root / "tuned.safetensors", base, tuned


@pytest.mark.parametrize("rank, power_iters, batch", [(16, 2, "0"), (32, 2, "0"), (16, 1, "0"), (16, 2, "1"),
                                                      (16, 1, "1")])
def test_decaying_spectrum_error_within_1_02_of_the_optimum(tmp_path, spectrum_pair, rank, power_iters, batch,
                                                           monkeypatch):
    monkeypatch.setenv(BATCH_ENV, batch)  # "1": the GPU's grouped route, here on the CPU
    base_file, tuned_file, base, tuned = spectrum_pair
    result = extract(base_file, tuned_file, None, rank=rank, power_iters=power_iters, device="cpu")
    rows = {row.tensor: row for row in result.report.layers}
    assert {row.svd for row in rows.values()} == {"randomized"} and len(rows) == 4
    assert result.report.changed == [{"tensor": "blocks.1.norm.weight", "reason": "1-D (norm or scale)",
                                      "kept": False}]
    for target, layer in result.adapter.layers.items():
        name = target + ".weight"
        delta = tuned[name].double() - base[name].double()
        error = _rel(_adapter_delta(layer), delta)
        optimum = _optimum(delta.reshape(delta.shape[0], -1), rank)
        assert error <= 1.02 * optimum, (name, error / optimum)
        assert abs(rows[name].rel_error - error) <= 1e-4 * error + 1e-6  # the report measured it
    # --exact: the optimum itself, and the report says so
    exact = extract(base_file, tuned_file, None, rank=rank, exact=True, device="cpu")
    for row in exact.report.layers:
        assert row.svd == "exact" and abs(row.error_ratio - 1.0) <= 1e-3, row
        delta = (tuned[row.tensor].double() - base[row.tensor].double())
        assert abs(row.optimal_rel_error - _optimum(delta.reshape(delta.shape[0], -1), rank)) <= 1e-5


def _grouped_pair(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """base/tuned.safetensors in `root`: five same-shape linears (one unchanged) and three Conv1D layers,
    decaying spectra, wide enough for the randomized route."""
    gen = torch.Generator().manual_seed(3)
    base, tuned = {}, {}
    for i in range(5):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        base[name] = torch.randn(256, 320, generator=gen) * 0.02
        delta = torch.zeros(256, 320) if i == 2 else _decaying(256, 320, gen).float() * 0.01
        tuned[name] = base[name] + delta
    for i in range(3):  # GPT-2 Conv1D: stored (in, out)
        name = f"transformer.h.{i}.mlp.c_fc.weight"
        base[name] = torch.randn(320, 640, generator=gen) * 0.02
        tuned[name] = base[name] + _decaying(640, 320, gen).float().T * 0.01
    save_file(base, str(root / "base.safetensors"))
    save_file(tuned, str(root / "tuned.safetensors"))
    return base, tuned


def test_grouped_route_equals_the_one_layer_route(tmp_path, monkeypatch):
    """Same-shape layers factored in groups (the GPU route) give what one layer at a time gives: the same
    sketches (per-layer seeds), ranks and errors; an unchanged layer inside a group is listed, transposed
    (Conv1D) layers are updated in place, full groups are factored as they fill."""
    base, tuned = _grouped_pair(tmp_path)
    sizes: list[int] = []
    real = extract_api.factor_group

    def counting(group, **kwargs):
        sizes.append(len(group.pairs))
        return real(group, **kwargs)

    monkeypatch.setattr(extract_api, "factor_group", counting)
    monkeypatch.setattr(extract_batched, "MAX_BATCH", 2)
    results = {}
    for batch in ("0", "1"):
        monkeypatch.setenv(BATCH_ENV, batch)
        results[batch] = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", None, rank=12,
                                 device="cpu")
    assert sorted(sizes) == [1, 1, 2, 2, 2]  # q_proj: 2 + 2 (one of them unchanged), c_fc: 2 + 1
    one, grouped = results["0"].report, results["1"].report
    assert grouped.unchanged == one.unchanged == ["model.layers.2.self_attn.q_proj.weight"]
    assert [row.target for row in grouped.layers] == [row.target for row in one.layers] and len(one.layers) == 7
    for a, b in zip(one.layers, grouped.layers):
        assert (a.rank, a.svd, a.sketch) == (b.rank, b.svd, b.sketch) == (12, "randomized", 20)
        assert abs(a.rel_error - b.rel_error) <= 1e-4 * a.rel_error, (a.target, a.rel_error, b.rel_error)
    for target, layer in results["1"].adapter.layers.items():
        name = target + ".weight"
        delta = tuned[name].double() - base[name].double()
        kernel = delta.T if "c_fc" in name else delta
        error = _rel(_adapter_delta(layer), delta)
        assert error <= 1.02 * _optimum(kernel, 12), name
        assert abs(error - _rel(_adapter_delta(results["0"].adapter.layers[target]), delta)) <= 1e-4 * error


@pytest.mark.parametrize("method, param", [("sv_fro", 0.9), ("sv_ratio", 6.0), ("sv_fro", 0.9995)])
def test_grouped_route_dynamic_ranks_equal_the_one_layer_route(tmp_path, monkeypatch, method, param):
    """A dynamic rule in the grouped route decides each layer's rank on its own sketch, as the one-layer
    route does; a layer whose sketch cannot decide (sv_fro 0.9995 here) takes the one-layer route, which
    grows the sketch (here up to the exact SVD). Same ranks, routes and errors either way."""
    _grouped_pair(tmp_path)
    results = {}
    for batch in ("0", "1"):
        monkeypatch.setenv(BATCH_ENV, batch)
        results[batch] = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", None,
                                 method=method, param=param, device="cpu")
    one, grouped = results["0"].report, results["1"].report
    assert grouped.unchanged == one.unchanged and len(one.layers) == 7
    assert [(r.target, r.rank, r.svd, r.sketch) for r in grouped.layers] == \
        [(r.target, r.rank, r.svd, r.sketch) for r in one.layers]
    assert len({r.rank for r in one.layers}) > 1 or method == "sv_fro" and param > 0.999  # ranks differ per shape
    for a, b in zip(one.layers, grouped.layers):
        assert abs(a.rel_error - b.rel_error) <= 1e-4 * a.rel_error + 1e-7, (a.target, a.rel_error, b.rel_error)


@pytest.mark.parametrize("batch", ["0", "1"])
def test_dynamic_rank_rules_match_the_exact_spectrum(spectrum_pair, batch, monkeypatch):
    monkeypatch.setenv(BATCH_ENV, batch)  # "1": the GPU's grouped route, here on the CPU
    base_file, tuned_file, base, tuned = spectrum_pair
    from lorahub.lowrank import choose_rank

    for method, param, cap in (("sv_fro", 0.9, None), ("sv_fro", 0.99, 24), ("sv_ratio", 8.0, None),
                               ("sv_cumulative", 0.5, None)):
        result = extract(base_file, tuned_file, None, rank=cap, method=method, param=param, device="cpu")
        for row in result.report.layers:
            delta = (tuned[row.tensor].double() - base[row.tensor].double())
            S = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
            want = choose_rank(S, rank=cap, method=method, param=param)
            assert abs(row.rank - want) <= 1, (method, param, row.tensor, row.rank, want)
            assert row.svd == ("exact" if method == "sv_cumulative" else "randomized")


# ---------------------------------------------------------------------------------------------
# kohya: extract_lora_from_models.py, re-implemented (networks/extract_lora_from_models.py, sd-scripts)


def _kohya_extract(diff: torch.Tensor, rank: int, clamp_quantile: float | None = 0.99) -> torch.Tensor:
    """kohya's per-layer algorithm on one weight delta: dense fp32 ΔW (conv 3×3 flattened, 1×1
    squeezed), `torch.linalg.svd` (full matrices), up = U[:, :r]·diag(S[:r]), down = Vh[:r], both clamped
    to ±quantile(cat(up, down), q); alpha = rank, so ΔW ≈ up·down. Returns up·down in diff's shape."""
    mat = diff.float()
    out_dim, in_dim = mat.shape[:2]
    rank = min(rank, in_dim, out_dim)
    if mat.ndim == 4:
        mat = mat.flatten(start_dim=1) if mat.shape[2:] != (1, 1) else mat.squeeze()
    U, S, Vh = torch.linalg.svd(mat)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    if clamp_quantile is not None:
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi = torch.quantile(dist, clamp_quantile)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    return (U @ Vh).reshape(diff.shape)


def test_kohya_extract_and_lorahub_agree(spectrum_pair, tmp_path):
    base_file, tuned_file, base, tuned = spectrum_pair
    rank = 16
    out = tmp_path / "lora.safetensors"
    result = extract(base_file, tuned_file, out, rank=rank, to_format="kohya", split="up", device="cpu")
    ours = load_adapter(out)
    assert ours.format == "kohya" and {layer.alpha for layer in ours.layers.values()} == {float(rank)}
    for target, layer in ours.layers.items():
        name = target + ".weight"
        delta = (tuned[name].float() - base[name].float())
        mine = _adapter_delta(layer)
        kohya_plain = _kohya_extract(delta, rank, clamp_quantile=None).double()
        kohya = _kohya_extract(delta, rank).double()
        err_mine, err_plain, err_kohya = (_rel(x, delta) for x in (mine, kohya_plain, kohya))
        # the same best rank-r approximation, within the randomized tolerance
        assert err_mine <= 1.02 * err_plain, (name, err_mine / err_plain)
        assert _rel(mine, kohya_plain) <= 0.25 * err_plain, (name, _rel(mine, kohya_plain), err_plain)
        # kohya's default quantile clamp only adds error to the optimum lorahub approximates
        assert err_mine <= err_kohya * 1.001, (name, err_mine, err_kohya)
    assert len(result.report.layers) == 4


def test_kohya_agreement_on_a_spectral_gap(tmp_path):
    """With a gap after σ_r (a rank-r fine-tune plus noise) both find the same subspace: the products agree
    far below the error."""
    gen = torch.Generator().manual_seed(3)
    base = {"m.fc.weight": torch.randn(640, 448, generator=gen) * 0.02}
    delta = _low_rank((640, 448), 12, 0.01, gen) + 1e-5 * torch.randn(640, 448, generator=gen)
    tuned = {"m.fc.weight": base["m.fc.weight"] + delta}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    result = extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", None, rank=12, device="cpu")
    layer = result.adapter.layers["m.fc"]
    actual = tuned["m.fc.weight"].float() - base["m.fc.weight"].float()
    assert result.report.layers[0].svd == "randomized"
    assert _rel(_adapter_delta(layer), _kohya_extract(actual, 12, clamp_quantile=None)) <= 1e-4


# ---------------------------------------------------------------------------------------------
# SD UNet: convs


def _unet_change(name: str, w: torch.Tensor, gen: torch.Generator):
    if w.ndim >= 2:
        return w + _low_rank(tuple(w.shape), 4, 0.01, gen)
    if "norm" in name and name.endswith(".weight"):
        return w * 1.01
    return None


def test_sd_unet_convs_extract_to_kohya_that_diffusers_fuses_back(tmp_path, tiny_unet_dir):
    deltas = _tuned_copy(tiny_unet_dir, tmp_path / "tuned", _unet_change)
    out = tmp_path / "unet_lora.safetensors"
    payload = json.loads(run_cli("extract", "--base", tiny_unet_dir, "--tuned", tmp_path / "tuned", "--rank", 4,
                                 "--to", "kohya", "-o", out, "--device", "cpu", "--json", check=True).stdout)
    kinds = {(row["kind"], row["kernel"]) for row in payload["layers"]}
    assert {("conv", "3x3"), ("conv", "1x1"), ("linear", "")} <= kinds
    changed_norms = {entry["tensor"] for entry in payload["changed"]}
    assert changed_norms and all(".norm" in name or "norm_out" in name for name in changed_norms)
    adapter = load_adapter(out)
    conv = adapter.layers["unet.down_blocks.0.resnets.0.conv1"]
    assert adapter.format == "kohya" and conv.kind == "conv" and conv.source_name == \
        "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tuple(conv.A.shape) == (4, 32, 3, 3) and tuple(conv.B.shape) == (32, 4, 1, 1)
    for target, layer in adapter.layers.items():
        assert _rel(_adapter_delta(layer), deltas[target.removeprefix("unet.") + ".weight"]) <= 1e-5, target
    # diffusers' own kohya loader + fuse_lora gives the tuned UNet (up to the norms, reported as changed)
    fused = reference_fused_unet_state_dict(tiny_unet_dir, out)
    tuned_state = load_file_state(tmp_path / "tuned" / "unet" / "diffusion_pytorch_model.safetensors")
    base_state = load_file_state(tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors")
    for name, value in tuned_state.items():
        if f"unet.{name}" in changed_norms:
            assert torch.equal(fused[name], base_state[name]), name
        else:
            assert torch.allclose(fused[name], value, atol=1e-6, rtol=1e-5), name


def test_sd_unet_to_diffusers_format_fuses_back(tmp_path, tiny_unet_dir):
    """The same UNet extraction as a diffusers file (PEFT-style keys, LoraConfig in the metadata), with
    per-layer ranks (conv 3×3 at --conv-rank): diffusers' loader gives every layer its exact scale."""
    _tuned_copy(tiny_unet_dir, tmp_path / "tuned", _unet_change)
    out = tmp_path / "unet_lora.safetensors"
    result = extract(tiny_unet_dir, tmp_path / "tuned", out, rank=4, conv_rank=3, to_format="diffusers",
                     device="cpu")
    ranks = {(row.kernel, row.rank) for row in result.report.layers}
    assert ("3x3", 3) in ranks and ("", 4) in ranks and ("1x1", 4) in ranks
    fused = reference_fused_unet_state_dict(tiny_unet_dir, out)
    expected = {row.tensor.removeprefix("unet."): layer for row, layer in zip(result.report.layers,
                                                                            result.adapter.layers.values())}
    base_state = load_file_state(tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors")
    for name, layer in expected.items():
        assert _rel(fused[name].double() - base_state[name].double(), _adapter_delta(layer)) <= 1e-5, name


def _sd_single_file(unet_dir: Path, out: Path) -> None:
    from diffusers import UNet2DConditionModel

    from lorahub.names import diffusers_to_ldm_unet

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), subfolder="unet")
    config = dict(unet.config)
    up_attn = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    state = {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        ldm = diffusers_to_ldm_unet(module, config["layers_per_block"], up_attn)
        state[f"model.diffusion_model.{ldm}.{param}"] = value.contiguous()
    save_file(state, str(out))


def test_sd_single_file_checkpoints_extract_with_diffusers_names(tmp_path, tiny_unet_dir):
    tuned_dir = tmp_path / "tuned"
    _tuned_copy(tiny_unet_dir, tuned_dir, _unet_change)
    _sd_single_file(tiny_unet_dir, tmp_path / "base.safetensors")
    _sd_single_file(tuned_dir, tmp_path / "tuned.safetensors")
    single = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", None, rank=4, device="cpu")
    folder = extract(tiny_unet_dir, tuned_dir, None, rank=4, device="cpu")
    assert single.adapter.has_components
    assert set(single.adapter.layers) == set(folder.adapter.layers)  # `unet.down_blocks.0.resnets.0.conv1`, …
    for target, layer in single.adapter.layers.items():
        assert _rel(_adapter_delta(layer), _adapter_delta(folder.adapter.layers[target])) <= 1e-5, target


def test_sd_single_file_with_a_text_encoder_needs_a_multi_component_format(tmp_path, tiny_unet_dir):
    """UNet + CLIP text encoder in one checkpoint: kohya names both (`lora_unet_…`, `lora_te_…`); a PEFT
    directory cannot hold both, which is refused before anything is read."""
    from safetensors.torch import load_file

    tuned_dir = tmp_path / "tuned"
    _tuned_copy(tiny_unet_dir, tuned_dir, _unet_change)
    gen = torch.Generator().manual_seed(2)
    clip = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    weight = torch.randn(32, 32, generator=gen)
    for folder, name, value in ((tiny_unet_dir, "base", weight), (tuned_dir, "tuned", weight + 0.01)):
        _sd_single_file(folder, tmp_path / f"{name}.safetensors")
        state = load_file(str(tmp_path / f"{name}.safetensors"))
        state[clip] = value.contiguous()
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(OptionError, match="--to kohya or --to diffusers"):
        extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "o", rank=4)
    out = tmp_path / "lora.safetensors"
    extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, rank=4, to_format="kohya",
            device="cpu")
    adapter = load_adapter(out)
    assert adapter.layers["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].source_name == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert json.loads(adapter.metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}


def test_dynamic_ranks_become_peft_rank_patterns(tmp_path, tiny_llama_dir):
    """Per-layer ranks (sv_fro) give `rank_pattern`/`alpha_pattern`; PEFT loads them and its merge is the
    tuned model."""
    def change(name, w, gen):
        if w.ndim == 2 and "embed" not in name:
            return w + _low_rank(tuple(w.shape), 3 if "q_proj" in name else 5, 0.05, gen)
        return None

    deltas = _tuned_copy(tiny_llama_dir, tmp_path / "tuned", change)
    out = tmp_path / "lora"
    result = extract(tiny_llama_dir, tmp_path / "tuned", out, method="sv_fro", param=0.99999, device="cpu")
    ranks = {row.target: row.rank for row in result.report.layers}
    assert {r for t, r in ranks.items() if "q_proj" in t} == {3} and {r for t, r in ranks.items()
                                                                     if "q_proj" not in t} == {5}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 5 and set(config["rank_pattern"].values()) == {3}
    merged = peft_merged_state_dict(tiny_llama_dir, out)
    base_state = load_file_state(tiny_llama_dir / "model.safetensors")
    for name, delta in deltas.items():
        assert _rel(merged[name] - base_state[name].double(), delta) <= 1e-5, name


# ---------------------------------------------------------------------------------------------
# GPT-2 Conv1D, --keep-full, embeddings


def test_gpt2_conv1d_layers_load_in_peft(tmp_path, tiny_gpt2_dir):
    def change(name, w, gen):
        if w.ndim == 2 and any(leaf in name for leaf in ("c_attn", "c_fc", "c_proj")):
            return w + _low_rank(tuple(w.shape), 4, 0.05, gen)
        return None

    deltas = _tuned_copy(tiny_gpt2_dir, tmp_path / "tuned", change)
    out = tmp_path / "lora"
    extract(tiny_gpt2_dir, tmp_path / "tuned", out, rank=4, device="cpu")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    merged = peft_merged_state_dict(tiny_gpt2_dir, out, model_cls="gpt2")
    base_state = load_file_state(tiny_gpt2_dir / "model.safetensors")
    for name, delta in deltas.items():
        key = name if name in merged else f"transformer.{name}"
        assert _rel(merged[key] - base_state[name].double(), delta) <= 1e-5, name


def test_keep_full_carries_changed_norms_as_modules_to_save(tmp_path, tiny_llama_dir):
    def change(name, w, gen):
        if name == "model.norm.weight":
            return w * 1.5
        if name == "model.embed_tokens.weight":
            return w + _low_rank(tuple(w.shape), 3, 0.05, gen)
        return _rank6_linears(name, w, gen)

    _tuned_copy(tiny_llama_dir, tmp_path / "tuned", change)
    out = tmp_path / "lora"
    result = extract(tiny_llama_dir, tmp_path / "tuned", out, rank=6, keep_full=["model.norm"], device="cpu")
    assert {entry["tensor"]: entry["kept"] for entry in result.report.changed} == {
        "model.norm.weight": True, "model.embed_tokens.weight": False}
    assert "model.embed_tokens.weight" in result.warnings[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"]
    merged = peft_merged_state_dict(tiny_llama_dir, out)
    tuned_state = load_file_state(tmp_path / "tuned" / "model.safetensors")
    assert torch.equal(merged["model.norm.weight"], tuned_state["model.norm.weight"])
    # --lora-embeddings: the embedding as a PEFT embedding LoRA (lora_embedding_A/B)
    out2 = tmp_path / "lora2"
    extract(tiny_llama_dir, tmp_path / "tuned", out2, rank=6, lora_embeddings=True, device="cpu")
    merged = peft_merged_state_dict(tiny_llama_dir, out2)
    base_state = load_file_state(tiny_llama_dir / "model.safetensors")
    name = "model.embed_tokens.weight"
    assert _rel(merged[name] - base_state[name], tuned_state[name] - base_state[name]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# refusals


def test_mismatched_models_are_refused_and_nothing_is_written(tmp_path, tiny_llama_dir, wide_llama_dir):
    out = tmp_path / "out"
    result = run_cli("extract", "--base", tiny_llama_dir, "--tuned", wide_llama_dir, "--rank", 4, "-o", out)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: ") and "shapes differ" in line[0]
    assert "model.layers.0.mlp.down_proj.weight (base [64, 128], tuned [96, 192])" in line[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    # a tensor on one side only, named; --exclude lets the rest through
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_llama_dir, tuned)
    state = load_file_state(tuned / "model.safetensors")
    state["model.extra.weight"] = torch.ones(4, 4)
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"] + 0.1
    save_file(state, str(tuned / "model.safetensors"))
    with pytest.raises(LorahubError, match=r"not in the base.*model\.extra\.weight"):
        plan_extract(tiny_llama_dir, tuned)
    result = extract(tiny_llama_dir, tuned, None, rank=2, exclude=["model.extra*"], device="cpu")
    assert list(result.adapter.layers) == ["model.layers.0.self_attn.q_proj"]
    # identical models: nothing to extract
    with pytest.raises(LorahubError, match="nothing to extract"):
        extract(tiny_llama_dir, tiny_llama_dir, None, rank=2, device="cpu")


def test_usage_errors_come_before_reading_anything(tmp_path):
    missing = tmp_path / "missing"
    cases = {
        ("--rank", "0"): "0 is not in the range",
        (): "give --rank",
        ("--rank-method", "sv_fro"): "needs --param",
        ("--rank", "4", "--param", "0.9"): "--param goes with",
        ("--rank-method", "sv_fro", "--param", "1.5"): "0 < p ≤ 1",
        ("--rank", "4", "--keep-full", "x*", "--to", "kohya"): "--keep-full goes with --to peft",
        ("--rank", "4", "--device", "meta"): "not a device",
    }
    for extra, message in cases.items():
        result = run_cli("extract", "--base", missing, "--tuned", missing, "-o", tmp_path / "o", *extra)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
    with pytest.raises(OptionError):
        extract(missing, missing, None, rank=4, power_iters=-1)


def test_out_policy_refuses_inputs_and_existing_outputs(tmp_path, tiny_llama_dir, tuned_llama):
    tuned, _ = tuned_llama
    result = run_cli("extract", "--base", tiny_llama_dir, "--tuned", tuned, "--rank", 2, "-o", tuned / "lora")
    assert result.returncode == 1 and "inside" in result.stderr
    out = tmp_path / "lora"
    run_cli("extract", "--base", tiny_llama_dir, "--tuned", tuned, "--rank", 2, "-o", out, check=True)
    result = run_cli("extract", "--base", tiny_llama_dir, "--tuned", tuned, "--rank", 2, "-o", out)
    assert result.returncode == 1 and "--overwrite" in result.stderr
    run_cli("extract", "--base", tiny_llama_dir, "--tuned", tuned, "--rank", 3, "-o", out, "--overwrite", check=True)
    assert load_adapter(out).ranks == [3] * 15


# ---------------------------------------------------------------------------------------------
# the JSON contract


def _documented_keys() -> dict[str, tuple[set[str], set[str]]]:
    """docs/json.md's per-command table: command -> (keys always present, keys present in some runs)."""
    text = (ROOT / "docs" / "json.md").read_text()
    rows = {}
    for match in re.finditer(r"^\| `lorahub ([a-z ]+)` \| (.+?) \|", text, re.M):
        keys = re.findall(r"`([a-z_]+\??)`", match.group(2))
        rows[match.group(1)] = ({k for k in keys if not k.endswith("?")}, {k[:-1] for k in keys if k.endswith("?")})
    return rows


def test_json_payload_has_the_documented_keys(tmp_path, tiny_llama_dir, tuned_llama):
    tuned, _ = tuned_llama
    result = run_cli("extract", "--base", tiny_llama_dir, "--tuned", tuned, "--rank", 6, "-o", tmp_path / "lora",
                     "--json", check=True)
    payload = json.loads(result.stdout)
    required, optional = _documented_keys()["extract"]
    assert list(payload)[0] == "ok" and payload["ok"] is True
    assert required <= set(payload) <= required | optional, set(payload) ^ required
    written = json.loads(run_cli("inspect", tmp_path / "lora", "--json", check=True).stdout)
    for key in ("modules", "rank", "rank_distribution", "alpha", "scale", "params"):
        assert payload[key] == written[key], key
    assert payload["scale"] == 1 and payload["rank"] == 6 and payload["device"] == "cpu"
    assert {"target", "kind", "rank", "energy_retained", "fro_retained", "rel_error"} <= set(payload["layers"][0])
    from lorahub.storage import read_header

    header = read_header(tiny_llama_dir / "model.safetensors")
    assert payload["bytes_read"] == 2 * sum(info.end - info.begin for info in header.tensors.values())


# ---------------------------------------------------------------------------------------------
# interrupted extractions leave nothing


def _start(base, tuned, out, *extra, throttle="0.3"):
    env = dict(os.environ, LORAHUB_EXTRACT_THROTTLE_S=throttle, LORAHUB_NO_PROGRESS="1")
    return subprocess.Popen([sys.executable, "-m", "lorahub.cli", "extract", "--base", str(base), "--tuned",
                             str(tuned), "--rank", "2", "-o", str(out), "--device", "cpu", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # a pytest started in the background (`… &`) ignores SIGINT, and so would the child
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt_mid_run(proc, out: Path, sig) -> None:
    """Send `sig` once the run holds its output lock (the work has begun) and a few tensors are done."""
    lock = out.parent / f".{out.name}.lorahub-lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # 0.3 s per tensor pair, 21 pairs
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_extract_leaves_no_output_and_keeps_the_old_one(tmp_path, tiny_llama_dir, tuned_llama, sig):
    tuned, _ = tuned_llama
    out = tmp_path / "lora"
    extract(tiny_llama_dir, tuned, out, rank=1, device="cpu")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _start(tiny_llama_dir, tuned, out, "--overwrite")
    _interrupt_mid_run(proc, out, sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted; no output was written" in stderr.decode()
    else:
        assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # and a fresh output: nothing at all
    fresh = tmp_path / "fresh"
    proc = _start(tiny_llama_dir, tuned, fresh)
    _interrupt_mid_run(proc, fresh, sig)
    proc.communicate(timeout=60)
    assert not fresh.exists()
    extract(tiny_llama_dir, tuned, fresh, rank=2, device="cpu")  # the next run is unaffected
    assert load_adapter(fresh).ranks == [2] * 15


# ---------------------------------------------------------------------------------------------
# the streaming reader


def test_small_chunks_and_mixed_dtypes_give_the_same_result(tmp_path, tiny_llama_dir, tiny_llama_bf16_dir,
                                                            tuned_llama):
    """ΔW assembled chunk by chunk (chunks smaller than a tensor) equals the one-chunk result; a bf16
    base against an fp32 tuned model pairs by element."""
    tuned, _ = tuned_llama
    whole = extract(tiny_llama_dir, tuned, None, rank=6, device="cpu")
    small = extract(tiny_llama_dir, tuned, None, rank=6, device="cpu", chunk_bytes=4096)
    for target, layer in whole.adapter.layers.items():
        assert torch.equal(layer.A.load(), small.adapter.layers[target].A.load()), target
    mixed = extract(tiny_llama_bf16_dir, tuned, None, rank=6, device="cpu", chunk_bytes=4096)
    base32 = load_file_state(tiny_llama_dir / "model.safetensors")
    base16 = load_file_state(tiny_llama_bf16_dir / "model.safetensors")
    tuned_state = load_file_state(tuned / "model.safetensors")
    for target, layer in mixed.adapter.layers.items():
        name = target + ".weight"
        expected = tuned_state[name].double() - base16[name].double()
        assert _rel(_adapter_delta(layer), expected) <= 1e-2  # rank 6 of (delta + bf16 rounding of W)
        assert not torch.equal(base16[name].float(), base32[name])


def test_randomized_svd_is_reproducible_per_seed():
    gen = torch.Generator().manual_seed(0)
    M = _decaying(300, 200, gen).float()
    a = randomized_svd(M, 24, generator=torch.Generator().manual_seed(5))
    b = randomized_svd(M, 24, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.S, b.S) and torch.equal(a.U, b.U)


@pytest.mark.parametrize("orth", ["householder", "cholesky"])
def test_both_orthonormalisations_reach_the_optimum(orth):
    """CholeskyQR2 (the GPU's route) and Householder QR (the CPU's) give the same quality; a ΔW of lower
    rank than the sketch (Cholesky fails) falls back to Householder."""
    gen = torch.Generator().manual_seed(11)
    M = _decaying(500, 400, gen)
    svd = randomized_svd(M.float(), 40, generator=torch.Generator().manual_seed(1), orth=orth)
    approx = (svd.U[:, :32].double() * svd.S[:32]) @ svd.Vh[:32].double()
    assert _rel(approx, M) <= 1.02 * _optimum(M, 32)
    low = (torch.randn(500, 5, generator=gen) @ torch.randn(5, 400, generator=gen))
    svd = randomized_svd(low, 40, orth=orth)
    assert _rel((svd.U[:, :5].double() * svd.S[:5]) @ svd.Vh[:5].double(), low) <= 1e-5


def test_bench_extract_tiny(monkeypatch, capsys):
    """bench/bench_extract.py still runs (smallest settings; it times nothing useful here)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_extract

    assert bench_extract.main(["--tiny", "--repeats", "1", "--cli-repeats", "0"]) == 0
    out = capsys.readouterr().out
    assert "RATIO lorahub / read" in out and "RATIO dense / lorahub" in out and "of the optimum" in out
