"""The CUDA path of `lorahub extract` (skipped without CUDA; run on a GPU machine).

ΔW assembled on the device from pinned chunks (bf16 and fp32 sides), the randomized SVD with
CholeskyQR2, the exact fallback on the host: the same results as on the CPU, within float32 rounding.

    python -m pytest tests/test_extract_gpu.py -q
"""
from __future__ import annotations

import pytest
import torch
from test_extract import (
    _adapter_delta,
    _decaying,
    _grouped_pair,
    _optimum,
    _rank6_linears,
    _rel,
    _tuned_copy,
    _unet_change,
)

from lorahub.extract import RankRule, decompose, extract, randomized_svd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("route", ["exact", "randomized"])
def test_cuda_extract_matches_cpu(tmp_path, tiny_llama_dir, tiny_llama_bf16_dir, route, monkeypatch):
    if route == "randomized":
        monkeypatch.setattr("lorahub.extract.svd.EXACT_BELOW", 8)
    deltas = _tuned_copy(tiny_llama_dir, tmp_path / "tuned", _rank6_linears)
    for base in (tiny_llama_dir, tiny_llama_bf16_dir):
        cpu = extract(base, tmp_path / "tuned", None, rank=6, device="cpu", chunk_bytes=4096)
        gpu = extract(base, tmp_path / "tuned", None, rank=6, device="cuda", chunk_bytes=4096)
        assert gpu.report.device.startswith("cuda")
        assert {row.svd for row in gpu.report.layers} == {route}
        assert set(gpu.adapter.layers) == set(cpu.adapter.layers) and gpu.report.unchanged == cpu.report.unchanged
        for target, layer in gpu.adapter.layers.items():
            assert layer.A.load().device.type == "cpu"
            expected = _adapter_delta(cpu.adapter.layers[target])
            assert _rel(_adapter_delta(layer), expected) <= 1e-4, target
            if base == tiny_llama_dir:
                assert _rel(_adapter_delta(layer), deltas[target + ".weight"]) <= 1e-5, target


def test_cuda_randomized_svd_within_1_02_of_the_optimum():
    gen = torch.Generator().manual_seed(5)
    for n, k in ((4096, 1024), (1024, 3000)):
        M = _decaying(n, k, gen, decay=20.0)
        for rank in (16, 64):
            d = decompose(M.float().cuda(), RankRule(rank=rank), energy=float(M.norm()) ** 2,
                          generator=torch.Generator(device="cuda").manual_seed(0))
            assert not d.exact and d.up.is_cuda
            assert _rel((d.up.double() @ d.down.double()).cpu(), M) <= 1.02 * _optimum(M, rank)
    # a rank-deficient panel: CholeskyQR2 fails, Householder takes over
    low = torch.randn(2000, 5, generator=gen) @ torch.randn(5, 1500, generator=gen)
    svd = randomized_svd(low.cuda(), 40)
    assert _rel(((svd.U[:, :5] * svd.S[:5].to("cuda", torch.float32)) @ svd.Vh[:5]).cpu(), low) <= 1e-5


def test_cuda_unet_convs(tmp_path, tiny_unet_dir):
    _tuned_copy(tiny_unet_dir, tmp_path / "tuned", _unet_change)
    cpu = extract(tiny_unet_dir, tmp_path / "tuned", None, rank=4, device="cpu")
    gpu = extract(tiny_unet_dir, tmp_path / "tuned", None, rank=4, device="cuda")
    for target, layer in gpu.adapter.layers.items():
        assert _rel(_adapter_delta(layer), _adapter_delta(cpu.adapter.layers[target])) <= 1e-4, target


@pytest.mark.parametrize("rule", [{"rank": 12}, {"method": "sv_fro", "param": 0.9}, {"method": "sv_ratio", "param": 6.0}])
def test_cuda_grouped_route_matches_cpu(tmp_path, rule):
    """The GPU factors same-shape layers in groups (batched CholeskyQR2, one host round trip per step; dynamic
    rules decide each layer's rank on its sketch): the same targets, ranks and unchanged list as the CPU,
    errors equal within float32 rounding."""
    base, tuned = _grouped_pair(tmp_path)
    runs = {dev: extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", None, device=dev, **rule)
            for dev in ("cpu", "cuda")}
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu.report.unchanged == cpu.report.unchanged == ["model.layers.2.self_attn.q_proj.weight"]
    assert [(r.target, r.rank, r.svd) for r in gpu.report.layers] == [(r.target, r.rank, r.svd)
                                                                       for r in cpu.report.layers]
    for a, b in zip(cpu.report.layers, gpu.report.layers):
        assert abs(a.rel_error - b.rel_error) <= 1e-3 * a.rel_error, (a.target, a.rel_error, b.rel_error)
    for target, layer in gpu.adapter.layers.items():
        name = target + ".weight"
        delta = tuned[name].double() - base[name].double()
        kernel = delta.T if "c_fc" in name else delta
        assert _rel(_adapter_delta(layer), delta) <= 1.02 * _optimum(kernel, layer.rank), name
