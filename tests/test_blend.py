"""`lorahub blend` / `lorahub interpolate` against PEFT's own add_weighted_adapter and dense math.

The adapters are made by PEFT on a tiny llama with different ranks, alphas, rsLoRA, rank/alpha
patterns and target sets; B factors are random (PEFT initialises B = 0).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lorahub.adapter import Adapter, LazyTensor, LoraLayer
from lorahub.blend import blend, check_compatible, factored_fro_norm, interpolate, merge_elementwise
from lorahub.cli import cli
from lorahub.errors import LorahubError
from lorahub.formats import load_adapter, save_adapter

PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------
# adapters made by PEFT


def _make_peft_adapter(out: Path, base_dir: Path, seed: int, **lora_kwargs) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(**lora_kwargs))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("blend_adapters")


@pytest.fixture(scope="module")
def lora_a(adapters_dir, tiny_llama_dir) -> Path:
    """r=8, alpha=16, q/v/down_proj."""
    return _make_peft_adapter(adapters_dir / "a", tiny_llama_dir, 11, r=8, lora_alpha=16,
                              target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def lora_b(adapters_dir, tiny_llama_dir) -> Path:
    """rsLoRA r=4, alpha=8, q/k/v_proj, with a rank pattern and an alpha pattern."""
    return _make_peft_adapter(adapters_dir / "b", tiny_llama_dir, 22, r=4, lora_alpha=8, use_rslora=True,
                              rank_pattern={"model.layers.1.self_attn.q_proj": 6}, alpha_pattern={"k_proj": 3},
                              target_modules=["q_proj", "k_proj", "v_proj"])


@pytest.fixture(scope="module")
def lora_c(adapters_dir, tiny_llama_dir) -> Path:
    """r=8, alpha=32, q/v/down_proj (same ranks as A: PEFT's linear accepts the pair)."""
    return _make_peft_adapter(adapters_dir / "c", tiny_llama_dir, 33, r=8, lora_alpha=32,
                              target_modules=["q_proj", "v_proj", "down_proj"])


def _peft_model(base_dir: Path, adapters: dict[str, Path]):
    """One PeftModel holding every adapter under its own name (PEFT reads the configs itself)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    names = list(adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    return model


def _lora_modules(model) -> dict[str, object]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {name[len(PEFT_PREFIX):]: module for name, module in model.named_modules()
            if isinstance(module, PeftLoraLayer)}


def _peft_raw_product(module, adapter: str) -> torch.Tensor:
    """B·A of a PEFT-made combined adapter (its scale is meant to be 1)."""
    return (module.lora_B[adapter].weight @ module.lora_A[adapter].weight).detach()


def _peft_delta(module, adapter: str) -> torch.Tensor:
    return module.get_delta_weight(adapter).detach()


def _deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {target: layer.delta_weight(dtype=torch.float64) for target, layer in adapter.layers.items()}


def _exact_sum(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·ΔWᵢ per module in float64, each ΔWᵢ as lorahub reads it (scale from the config)."""
    out: dict[str, torch.Tensor] = {}
    for path, weight in zip(paths, weights):
        for target, delta in _deltas(load_adapter(path)).items():
            out[target] = out.get(target, 0) + weight * delta
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _blend_files(paths, weights, out, **kwargs):
    result = blend([load_adapter(p) for p in paths], weights, **kwargs)
    save_adapter(result.adapter, out)
    return load_adapter(out), result.report


# ----------------------------------------------------------------------------------------------
# the peer: PEFT add_weighted_adapter


def test_peft_reads_the_scales_lorahub_reads(tiny_llama_dir, lora_a, lora_b):
    """Precondition of every comparison: PEFT's ΔWᵢ equals lorahub's (rsLoRA and patterns included)."""
    model = _peft_model(tiny_llama_dir, {"a": lora_a, "b": lora_b})
    modules = _lora_modules(model)
    for name, path in (("a", lora_a), ("b", lora_b)):
        for target, delta in _deltas(load_adapter(path)).items():
            assert _rel(_peft_delta(modules[target], name), delta) < 1e-6


def test_cat_equals_peft_cat_on_every_layer(tiny_llama_dir, lora_a, lora_b, tmp_path):
    weights = [0.7, -0.3]
    model = _peft_model(tiny_llama_dir, {"a": lora_a, "b": lora_b})
    model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
    modules = _lora_modules(model)
    ours, report = _blend_files([lora_a, lora_b], weights, tmp_path / "cat", method="cat")
    # every module of either adapter is there; k_proj is only in B, down_proj only in A
    assert set(ours.layers) == set(load_adapter(lora_a).layers) | set(load_adapter(lora_b).layers)
    assert any("k_proj" in t for t in ours.layers) and any("down_proj" in t for t in ours.layers)
    for target, layer in ours.layers.items():
        assert layer.scale == 1.0 and not layer.use_rslora
        assert layer.rank == sum(report.layers[[l.target for l in report.layers].index(target)].input_ranks)
        peft = _peft_delta(modules[target], "mix")  # A (first) is not rsLoRA: PEFT's scale is 1
        assert torch.allclose(layer.delta_weight(), peft, rtol=0, atol=1e-6 * float(peft.abs().max()))
        assert _rel(layer.delta_weight(), peft) < 1e-6


# lorahub computes blends in float32 and stores float32 factors; the references below are float64
FP32_EPS = float(np.finfo(np.float32).eps)


def test_svd_is_the_optimal_truncation_and_never_worse_than_peft(tiny_llama_dir, lora_a, lora_b, tmp_path):
    weights = [0.6, 0.9]
    model = _peft_model(tiny_llama_dir, {"a": lora_a, "b": lora_b})
    model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="svd")
    modules = _lora_modules(model)
    exact = _exact_sum([lora_a, lora_b], weights)
    ours, report = _blend_files([lora_a, lora_b], weights, tmp_path / "svd")  # default: svd, rank 8
    for target, layer in ours.layers.items():
        target_exact = exact[target].numpy()
        U, S, Vt = np.linalg.svd(target_exact, full_matrices=False)  # the float64 reference
        rank = min(8, int((S > 1e-12 * S[0]).sum()))
        assert layer.rank == rank
        optimal = (U[:, :rank] * S[:rank]) @ Vt[:rank]
        ours_delta = layer.delta_weight(dtype=torch.float64).numpy()
        norm = np.linalg.norm(target_exact)
        err_opt = np.linalg.norm(optimal - target_exact)  # Eckart–Young: no rank-r matrix does better
        err_ours = np.linalg.norm(ours_delta - target_exact)
        # What float32 may cost. The factored SVD (QR of both factors, an r×r SVD) is backward stable: it is
        # the exact SVD of ΔW + δ with ‖δ‖_F ≲ a few·√r·ε₃₂·‖ΔW‖_F, and storing the new factors in float32
        # adds about √r·ε₃₂·‖ΔW‖_F more. By Weyl, the truncation error then exceeds the float64 optimum by
        # at most 2‖δ‖ + that rounding, whatever the spectrum: `noise` = 10·√r·ε₃₂·‖ΔW‖_F (≈ 28 ε₃₂ at
        # r = 8; measured ≤ 6 ε₃₂). Where ΔW has rank ≤ r the optimum is exact (err_opt ~ 1e-15) and both
        # lorahub's and PEFT's errors are nothing but this float32 noise, which varies with the BLAS
        # thread count (5.6e-7 vs 3.7e-7 on 2 cores): compare each with the optimum, not with each other.
        noise = 10 * math.sqrt(rank) * FP32_EPS * norm
        assert err_ours <= err_opt + noise
        # the matrix itself is the optimum up to that noise, amplified by the gap at the cut (Wedin):
        # the truncated SVD moves by ~‖δ‖·σ₀/(σ_r − σ_{r+1})
        gap = S[rank - 1] - (S[rank] if rank < len(S) else 0.0)
        assert np.linalg.norm(ours_delta - optimal) <= noise * (1 + S[0] / gap)
        # the singular values of what we wrote are the top ones of the exact sum (Weyl: within ‖δ‖₂ ≤ noise)
        ours_S = np.linalg.svd(ours_delta, compute_uv=False)[:rank]
        assert np.abs(ours_S - S[:rank]).max() <= noise
        entry = next(l for l in report.layers if l.target == target)
        assert entry.energy_retained == pytest.approx(float((S[:rank] ** 2).sum() / (S ** 2).sum()), rel=1e-6)
        assert entry.rel_error == pytest.approx(err_opt / norm, rel=1e-4, abs=1e-6)
        # PEFT 0.21: svd builds dense deltas (scale applied once, PR #3111) and truncates to max r = 8. Its
        # factors' product, taken in float64 (a float32 product adds full-rank rounding), has rank ≤ 8, so it
        # cannot beat the float64 optimum (float64 rounding aside) ...
        module = modules[target]
        peft = (module.lora_B["mix"].weight.detach().double() @ module.lora_A["mix"].weight.detach().double()).numpy()
        err_peft = np.linalg.norm(peft - target_exact)
        assert err_opt <= err_peft * (1 + 1e-9) + 1e-12 * norm
        # ... and lorahub is never worse than PEFT beyond float32 noise
        assert err_ours <= err_peft + noise


def test_linear_equals_peft_linear(tiny_llama_dir, lora_a, lora_c, tmp_path):
    weights = [0.8, -0.5]
    model = _peft_model(tiny_llama_dir, {"a": lora_a, "c": lora_c})
    model.add_weighted_adapter(["a", "c"], weights, "mix", combination_type="linear")
    modules = _lora_modules(model)
    ours, report = _blend_files([lora_a, lora_c], weights, tmp_path / "linear", method="linear")
    exact = _exact_sum([lora_a, lora_c], weights)
    for target, layer in ours.layers.items():
        assert layer.rank == 8
        peft = _peft_delta(modules[target], "mix")
        assert _rel(layer.delta_weight(), peft) < 1e-6
        # it is *not* the weighted sum: the report says how far off the cross terms put it
        entry = next(l for l in report.layers if l.target == target)
        assert entry.rel_error == pytest.approx(_rel(layer.delta_weight(dtype=torch.float64), exact[target]),
                                                rel=1e-4)
        assert entry.rel_error > 0.1


def test_linear_refuses_unequal_ranks_like_peft(lora_a, lora_b):
    with pytest.raises(LorahubError, match="equal ranks"):
        blend([load_adapter(lora_a), load_adapter(lora_b)], [0.5, 0.5], method="linear")


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_elementwise_equals_peft_svd_variant(tiny_llama_dir, lora_a, lora_c, tmp_path, method):
    """Our element-wise methods act on dense ΔWᵢ like PEFT's `<method>_svd` (not on the factors)."""
    weights = [1.5, 0.7]
    model = _peft_model(tiny_llama_dir, {"a": lora_a, "c": lora_c})
    model.add_weighted_adapter(["a", "c"], weights, "mix", combination_type=f"{method}_svd", density=0.3,
                               majority_sign_method="frequency" if method == "ties" else "total")
    modules = _lora_modules(model)
    ours, _ = _blend_files([lora_a, lora_c], weights, tmp_path / method, method=method, density=0.3,
                           majority_sign="frequency" if method == "ties" else "total", device="cpu")
    for target, layer in ours.layers.items():
        assert layer.rank == 8
        assert _rel(layer.delta_weight(), _peft_raw_product(modules[target], "mix")) < 1e-5


def test_merge_utils_match_peft_on_random_tensors():
    from peft.utils import merge_utils

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 9, generator=generator) for _ in range(3)]
    weights = torch.tensor([1.0, -0.5, 2.0])
    for method in ("ties", "magnitude_prune"):
        for sign in ("total", "frequency"):
            ours = merge_elementwise(method, tensors, weights, density=0.4, majority_sign=sign)
            peft = (merge_utils.ties(tensors, weights, 0.4, sign) if method == "ties"
                    else merge_utils.magnitude_prune(tensors, weights, 0.4))
            assert torch.equal(ours, peft)
    # DARE with density 1 keeps everything: plain weighted sum
    dare = merge_elementwise("dare_linear", tensors, weights, density=1.0,
                             generator=torch.Generator().manual_seed(1))
    assert torch.allclose(dare, sum(w * t for w, t in zip(weights, tensors)), atol=1e-6)


def test_dare_is_seeded_and_keeps_expected_fraction(lora_a, lora_c):
    adapters = [load_adapter(lora_a), load_adapter(lora_c)]
    run = lambda seed: blend(adapters, [1.0, 1.0], method="dare_linear", density=0.5, seed=seed, rank=64,
                             device="cpu").adapter
    first, again, other = run(7), run(7), run(8)
    target = next(iter(first.layers))
    assert torch.equal(first.layers[target].delta_weight(), again.layers[target].delta_weight())
    assert not torch.allclose(first.layers[target].delta_weight(), other.layers[target].delta_weight())
    # full-rank DARE: about half the entries of each ΔWᵢ survive, rescaled by 2
    generator = torch.Generator().manual_seed(3)
    t = torch.randn(200, 300, generator=generator)
    pruned = merge_elementwise("dare_linear", [t], torch.tensor([1.0]), density=0.5,
                               generator=torch.Generator().manual_seed(4))
    kept = pruned != 0
    assert 0.47 < kept.float().mean() < 0.53
    assert torch.allclose(pruned[kept], 2 * t[kept])


# ----------------------------------------------------------------------------------------------
# blend then merge; PEFT reloads what we write


def _base_weights(base_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(base_dir / "model.safetensors"))


def test_blend_then_merge_equals_merging_each_with_its_weight(tiny_llama_dir, lora_a, lora_b, tmp_path):
    from fixtures_models import peft_merged_state_dict

    weights = [0.7, -1.3]
    out = tmp_path / "cat"
    _blend_files([lora_a, lora_b], weights, out, method="cat")
    merged = peft_merged_state_dict(tiny_llama_dir, out)  # PEFT reloads our config and merges
    # reference: the base plus each adapter's own ΔW (as PEFT computes it) times its weight
    model = _peft_model(tiny_llama_dir, {"a": lora_a, "b": lora_b})
    modules = _lora_modules(model)
    expected = {k: v.clone() for k, v in _base_weights(tiny_llama_dir).items()}
    for name, weight in zip(("a", "b"), weights):
        for target, module in modules.items():
            if name in module.lora_A:
                expected[target + ".weight"] += weight * _peft_delta(module, name)
    assert set(merged) >= set(expected)
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, rtol=0, atol=2e-6), key


def test_peft_reloads_dynamic_ranks_with_rank_pattern(tiny_llama_dir, lora_a, lora_b, peft_rslora_dir, tmp_path):
    """Per-module ranks (sv_fro) need a correct rank_pattern/alpha_pattern (peft#3737 writes none)."""
    from fixtures_models import peft_merged_state_dict

    paths = [lora_a, lora_b, peft_rslora_dir]
    out = tmp_path / "dyn"
    ours, report = _blend_files(paths, [0.5, 1.0, -0.25], out, rank_method="sv_fro", param=0.9)
    ranks = {layer.rank for layer in ours.layers.values()}
    assert len(ranks) > 1, ranks
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["rank_pattern"]
    merged = peft_merged_state_dict(tiny_llama_dir, out)
    base = _base_weights(tiny_llama_dir)
    for target, layer in ours.layers.items():
        key = target + ".weight"
        assert torch.allclose(merged[key] - base[key], layer.delta_weight(), rtol=0, atol=2e-6), key
    # and what we wrote is within the reported error of the exact sum
    exact = _exact_sum(paths, [0.5, 1.0, -0.25])
    for entry in report.layers:
        written = ours.layers[entry.target].delta_weight(dtype=torch.float64)
        assert _rel(written, exact[entry.target]) == pytest.approx(entry.rel_error, rel=1e-3, abs=1e-6)
        assert entry.fro_retained >= 0.9 - 1e-9


# ----------------------------------------------------------------------------------------------
# interpolate


def test_interpolate_is_exact(lora_a, lora_b, tmp_path):
    runner = CliRunner()
    out = tmp_path / "quarter"
    result = runner.invoke(cli, ["interpolate", str(lora_a), str(lora_b), "-t", "0.25", "--out", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "cat" and [a["weight"] for a in report["adapters"]] == [0.75, 0.25]
    ours = load_adapter(out)
    exact = _exact_sum([lora_a, lora_b], [0.75, 0.25])
    for target, layer in ours.layers.items():
        assert _rel(layer.delta_weight(dtype=torch.float64), exact[target]) < 1e-6
    # t = 0 is A itself, at A's own rank
    at_zero = interpolate(load_adapter(lora_a), load_adapter(lora_b), 0.0).adapter
    a = load_adapter(lora_a)
    assert set(at_zero.layers) == set(a.layers)
    for target, layer in at_zero.layers.items():
        assert layer.rank == a.layers[target].rank
        assert _rel(layer.delta_weight(), a.layers[target].delta_weight()) < 1e-6


# ----------------------------------------------------------------------------------------------
# other layer kinds and formats


def test_gpt2_conv1d_same_adapter_twice_is_the_adapter(peft_gpt2_dir):
    adapter = load_adapter(peft_gpt2_dir)
    for method in ("cat", "svd"):
        out = blend([adapter, load_adapter(peft_gpt2_dir)], [0.25, 0.75], method=method).adapter
        for target, layer in out.layers.items():
            assert layer.fan_in_fan_out
            assert _rel(layer.delta_weight(), adapter.layers[target].delta_weight()) < 1e-5
            if method == "svd":
                assert layer.rank == adapter.layers[target].rank


def _second_kohya_file(kohya_file: Path, out: Path, seed: int) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    with safe_open(str(kohya_file), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, value in tensors.items():
        if key.endswith(".lora_up.weight"):
            tensors[key] = torch.randn(value.shape, generator=generator, dtype=value.dtype) * 0.1
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_kohya_conv_blend_keeps_the_format(kohya_unet_file, tmp_path):
    other = _second_kohya_file(kohya_unet_file, tmp_path / "other.safetensors", 5)
    out = tmp_path / "mix.safetensors"
    ours, report = _blend_files([kohya_unet_file, other], [1.0, 0.5], out, rank=8)
    assert ours.format == "kohya"
    assert any(layer.kind == "conv" and layer.kernel_size == (3, 3) for layer in ours.layers.values())
    exact = _exact_sum([kohya_unet_file, other], [1.0, 0.5])
    for target, layer in ours.layers.items():
        # rank 8 = r₁ + r₂: the svd result is exact
        assert _rel(layer.delta_weight(dtype=torch.float64), exact[target]) < 1e-5
        assert layer.scale == 1.0


def test_to_another_format(lora_a, lora_c, tmp_path):
    out = tmp_path / "mix.safetensors"
    result = blend([load_adapter(lora_a), load_adapter(lora_c)], [0.5, 0.5], method="cat", to="kohya")
    save_adapter(result.adapter, out)
    ours = load_adapter(out)
    assert ours.format == "kohya"
    exact = _exact_sum([lora_a, lora_c], [0.5, 0.5])
    for target, layer in ours.layers.items():
        assert _rel(layer.delta_weight(dtype=torch.float64), exact[target]) < 1e-6


# ----------------------------------------------------------------------------------------------
# refusals


def test_refuses_dora_with_the_reason(lora_a, peft_dora_dir):
    with pytest.raises(LorahubError, match="not additive"):
        blend([load_adapter(lora_a), load_adapter(peft_dora_dir)], [1, 1])


def test_refuses_different_bases(lora_a, peft_wide_dir, tmp_path):
    with pytest.raises(LorahubError, match="different base models"):
        blend([load_adapter(lora_a), load_adapter(peft_wide_dir)], [1, 1])
    with pytest.raises(LorahubError, match=r"adapts a \[64, 64\] weight .* but a \[96, 96\] weight"):
        blend([load_adapter(lora_a), load_adapter(peft_wide_dir)], [1, 1], allow_base_mismatch=True)
    renamed = load_adapter(lora_a)
    renamed.base_model = "someone/other-model"
    with pytest.raises(LorahubError, match="different base models.*--allow-base-mismatch"):
        blend([load_adapter(lora_a), renamed], [1, 1])
    assert blend([load_adapter(lora_a), renamed], [1, 1], allow_base_mismatch=True).adapter.layers


def _layer(target: str, kind: str, n: int = 6, k: int = 5, r: int = 2) -> LoraLayer:
    down_shape = (r, k, 3, 3) if kind == "conv" else (r, k)
    up_shape = (n, r, 1, 1) if kind == "conv" else (n, r)
    return LoraLayer(target=target, kind=kind, A=LazyTensor.of(torch.randn(down_shape)),
                     B=LazyTensor.of(torch.randn(up_shape)), alpha=float(r), rank=r)


def test_refuses_different_kinds_on_one_module():
    a = Adapter(path=None, format="peft", layers={"m": _layer("m", "linear", k=45)})
    b = Adapter(path=None, format="peft", layers={"m": _layer("m", "conv")})
    with pytest.raises(LorahubError, match="different layer kinds"):
        check_compatible([a, b])
    lycoris = Adapter(path=None, format="lycoris", layers={"m": _layer("m", "linear")},
                      other_modules={"x": "loha"})
    with pytest.raises(LorahubError, match="LyCORIS"):
        check_compatible([a, lycoris])


def test_full_tensors_refused_unless_identical_or_dropped(peft_embed_dir, tiny_llama_dir, tmp_path):
    embed = load_adapter(peft_embed_dir)  # modules_to_save lm_head (trained) + saved base embedding
    other = _make_peft_adapter(tmp_path / "q", tiny_llama_dir, 44, r=8, lora_alpha=16, target_modules=["q_proj"])
    with pytest.raises(LorahubError, match="drop-full-tensors"):
        blend([embed, load_adapter(other)], [1, 1])
    result = blend([embed, load_adapter(other)], [1, 1], drop_full_tensors=True)
    assert not result.adapter.full_tensors and result.report.dropped_full_tensors
    # the same replacement in every input passes through unchanged
    same = blend([embed, load_adapter(peft_embed_dir)], [0.5, 0.5], method="cat").adapter
    assert set(same.full_tensors) == set(embed.full_tensors)
    assert any(layer.kind == "embedding" for layer in same.layers.values())


def test_cancelling_weights_leave_nothing(lora_a):
    with pytest.raises(LorahubError, match="zero on every module"):
        blend([load_adapter(lora_a), load_adapter(lora_a)], [1.0, -1.0])


def test_factored_norm_matches_dense():
    generator = torch.Generator().manual_seed(0)
    terms = [(c, torch.randn(20, r, generator=generator), torch.randn(r, 30, generator=generator))
             for c, r in ((0.5, 3), (-2.0, 4))]
    dense = sum(c * u @ d for c, u, d in terms)
    assert factored_fro_norm(terms) == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_blend_json_report_and_exit_codes(lora_a, lora_b, tmp_path):
    runner = CliRunner()
    out = tmp_path / "mix"
    result = runner.invoke(cli, ["blend", str(lora_a), str(lora_b), "--weights", "-0.5,1", "--rank", "4",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "svd" and [a["weight"] for a in report["adapters"]] == [-0.5, 1.0]
    assert report["summary"]["rank_max"] == 4 and report["layers"]
    for layer in report["layers"]:
        assert 0.0 < layer["energy_retained"] <= 1.0
        assert layer["rel_error"] == pytest.approx(math.sqrt(1 - layer["energy_retained"]), abs=1e-6)
    assert (out / "adapter_config.json").is_file()
    # human output
    result = runner.invoke(cli, ["blend", str(lora_a), str(lora_b), "-w", "1,1", "--method", "cat",
                                 "--out", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    assert "energy" in result.output or "rank" in result.output
    # option errors are usage errors: 2 (README), whether Click or the method registry finds them
    bad = runner.invoke(cli, ["blend", str(lora_a), str(lora_b), "-w", "1", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "2 adapters but 1 weights" in bad.output
    bad = runner.invoke(cli, ["blend", str(lora_a), str(lora_b), "-w", "1,1", "--method", "ties",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--density" in bad.output
    usage = runner.invoke(cli, ["blend", str(lora_a), "--out", str(tmp_path / "x")])
    assert usage.exit_code == 2
    assert not (tmp_path / "x").exists()


def test_cli_help_has_examples():
    runner = CliRunner()
    for command in ("blend", "interpolate"):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and "Examples:" in result.output
    assert "cross terms" in runner.invoke(cli, ["blend", "--help"]).output


def test_lora_bias_is_combined_as_peft_applies_it(tiny_llama_dir, tmp_path):
    """lora_bias=True: PEFT adds s·(B(Ax) + b); the blend's module output is Σ wᵢ·(adapter i's)."""
    paths = [_make_peft_adapter(tmp_path / name, tiny_llama_dir, seed, r=r, lora_alpha=alpha, lora_bias=True,
                                target_modules=["q_proj", "v_proj"])
             for name, seed, r, alpha in (("x", 5, 4, 8), ("y", 6, 8, 4))]
    weights = [0.5, -2.0]
    out = tmp_path / "mix"
    ours, _ = _blend_files(paths, weights, out, method="cat")
    assert all(layer.bias is not None for layer in ours.layers.values())
    model = _peft_model(tiny_llama_dir, {"x": paths[0], "y": paths[1], "mix": out})
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for target, module in _lora_modules(model).items():
        def lora_out(name):
            return module.scaling[name] * module.lora_B[name](module.lora_A[name](x))
        expected = sum(w * lora_out(name) for w, name in zip(weights, ("x", "y")))
        assert module.lora_B["mix"].bias is not None
        assert torch.allclose(lora_out("mix"), expected, rtol=0, atol=1e-5), target


def test_kohya_and_diffusers_inputs_combine(kohya_unet_file, tmp_path):
    """Modules are matched by base-model names, whatever each input's key format."""
    diffusers_file = save_adapter(load_adapter(_second_kohya_file(kohya_unet_file, tmp_path / "o.safetensors", 9)),
                                  tmp_path / "other_diffusers.safetensors", "diffusers")
    other = load_adapter(diffusers_file)
    assert other.format == "diffusers"
    first = load_adapter(kohya_unet_file)
    assert set(other.layers) == set(first.layers)
    result = blend([first, other], [0.5, 0.5], method="cat")
    assert result.adapter.format == "kohya"
    for target, layer in result.adapter.layers.items():
        expected = 0.5 * first.layers[target].delta_weight() + 0.5 * other.layers[target].delta_weight()
        assert _rel(layer.delta_weight(), expected) < 1e-6


# ----------------------------------------------------------------------------------------------
# properties on random in-memory adapters


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st


def _random_adapter(seed: int, rank: int, alpha: float, rslora: bool, targets: list[str], n=12, k=10) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    layers = {t: LoraLayer(target=t, kind="linear", A=LazyTensor.of(torch.randn(rank, k, generator=generator)),
                           B=LazyTensor.of(torch.randn(n, rank, generator=generator)), alpha=alpha, rank=rank,
                           use_rslora=rslora) for t in targets}
    return Adapter(path=None, format="peft", layers=layers)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       weights=st.lists(st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=3, max_size=3),
       rslora=st.booleans())
def test_cat_and_full_rank_svd_are_the_exact_sum(seed, ranks, weights, rslora):
    adapters = [_random_adapter(seed + i, r, 1.5 * r, rslora and i % 2 == 0, ["m", f"only{i}"])
                for i, r in enumerate(ranks)]
    weights = weights[:len(adapters)]
    exact = {}
    for adapter, w in zip(adapters, weights):
        for target, layer in adapter.layers.items():
            exact[target] = exact.get(target, 0) + w * layer.delta_weight(dtype=torch.float64)
    cat = blend(adapters, weights, method="cat", workers=1).adapter
    full = blend(adapters, weights, rank=sum(ranks), workers=1).adapter
    for result in (cat, full):
        assert set(result.layers) == set(exact)
        for target, layer in result.layers.items():
            assert layer.scale == 1.0
            assert _rel(layer.delta_weight(dtype=torch.float64), exact[target]) < 2e-6


def test_method_sv_fro_is_svd_with_that_rank_rule(tmp_path, peft_lora_dir, peft_rslora_dir):
    """`--method sv_fro --param P` (the issue's spelling) equals `--method svd --rank-method sv_fro`."""
    import json as _json

    from cli_runner import run_cli

    short = run_cli("blend", peft_lora_dir, peft_rslora_dir, "-w", "0.5,0.5", "--method", "sv_fro", "--param",
                    "0.9", "--out", tmp_path / "a", "--json", check=True)
    long = run_cli("blend", peft_lora_dir, peft_rslora_dir, "-w", "0.5,0.5", "--method", "svd", "--rank-method",
                   "sv_fro", "--param", "0.9", "--out", tmp_path / "b", "--json", check=True)
    ranks_short = [layer["rank"] for layer in _json.loads(short.stdout)["layers"]]
    ranks_long = [layer["rank"] for layer in _json.loads(long.stdout)["layers"]]
    assert ranks_short == ranks_long and len(set(ranks_short)) > 1
    clash = run_cli("blend", peft_lora_dir, peft_rslora_dir, "-w", "0.5,0.5", "--method", "sv_fro",
                    "--rank-method", "sv_ratio", "--param", "2", "--out", tmp_path / "c")
    assert clash.returncode == 2


# ----------------------------------------------------------------------------------------------
# the method registry: docs, CLI and checks come from it


DOCS_BEGIN = "<!-- generated by lorahub.blend.methods_markdown() from the method registry; tests/test_blend.py checks it -->\n"
DOCS_END = "<!-- end of generated tables -->\n"


def test_docs_tables_are_generated_from_the_registry():
    """docs/blend.md's methods and options tables equal methods_markdown() (LORAHUB_UPDATE_DOCS=1 rewrites them)."""
    import os

    from lorahub.blend import methods_markdown

    path = Path(__file__).resolve().parents[1] / "docs" / "blend.md"
    text = path.read_text()
    assert text.count(DOCS_BEGIN) == 1 and text.count(DOCS_END) == 1
    start = text.index(DOCS_BEGIN) + len(DOCS_BEGIN)
    end = text.index(DOCS_END)
    generated = methods_markdown()
    if os.environ.get("LORAHUB_UPDATE_DOCS") and text[start:end] != generated:
        path.write_text(text[:start] + generated + text[end:])
        text = path.read_text()
        end = text.index(DOCS_END)
    assert text[start:end] == generated, ("docs/blend.md's method tables drifted from the registry; rerun with "
                                          "LORAHUB_UPDATE_DOCS=1")
    for name in ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        assert f"| `{name}`" in generated


def test_cli_choices_and_options_come_from_the_registry():
    from lorahub.blend import METHODS, methods
    from lorahub.blend.registry import declarations

    command = cli.commands["blend"]
    by_name = {param.name: param for param in command.params}
    assert set(METHODS) == {"cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    assert list(by_name["method"].type.choices)[:len(METHODS)] == list(METHODS)
    for name in declarations():
        assert name in by_name, name
    help_text = CliRunner().invoke(cli, ["blend", "--help"]).output
    for method in methods():
        assert method.name in help_text and method.reference


def test_option_checks_come_from_the_declared_ranges(lora_a, lora_c):
    adapters = [load_adapter(lora_a), load_adapter(lora_c)]
    for kwargs, message in ((dict(method="dare_linear", density=0.0), r"--density must be in \(0, 1\], got 0"),
                            (dict(method="ties", density=1.5), r"--density must be in \[0, 1\], got 1.5"),
                            (dict(method="ties"), "method ties needs --density"),
                            (dict(rank=0), "--rank must be ≥ 1, got 0"),
                            (dict(method="cat", rank=4), "--rank applies to svd and the element-wise methods, not cat"),
                            (dict(method="cat", density=0.5), "--density applies to the element-wise methods"),
                            (dict(method="ties", density=0.5, majority_sign="most"), "--majority-sign must be total or frequency"),
                            (dict(rank_method="sv_fro"), "--rank-method sv_fro needs --param"),
                            (dict(method="nope"), "unknown method 'nope'; choose one of cat, svd")):
        with pytest.raises(LorahubError, match=message):
            blend(adapters, [0.5, 0.5], device="cpu", **kwargs)
    with pytest.raises(TypeError, match="unknown blend option"):
        blend(adapters, [0.5, 0.5], no_such_option=1)
    runner = CliRunner()
    bad = runner.invoke(cli, ["blend", str(lora_a), str(lora_c), "-w", "1,1", "--method", "dare_ties",
                              "--density", "0", "--out", "x"])
    assert bad.exit_code == 2 and "--density must be in (0, 1]" in bad.output
    assert runner.invoke(cli, ["blend", str(lora_a), str(lora_c), "-w", "1,1", "--rank", "0", "--out", "x"]).exit_code == 2


def test_report_records_only_the_methods_own_options(lora_a, lora_c):
    adapters = [load_adapter(lora_a), load_adapter(lora_c)]
    assert blend(adapters, [0.5, 0.5], method="cat").report.options == {"method": "cat"}
    ties = blend(adapters, [0.5, 0.5], method="ties", density=0.5, device="cpu").report.options
    assert ties == {"method": "ties", "rank": None, "rank_method": "fixed", "split": "balanced", "density": 0.5,
                    "majority_sign": "total"}
