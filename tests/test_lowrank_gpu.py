"""The CUDA paths of resize and blend (skipped without CUDA; run on a GPU machine).

Factored SVDs on the GPU are compared with float64 on the CPU (numpy's dense SVD of the product), and
whole-adapter resize/blend results with the CPU results on PEFT-made adapters.

    python -m pytest tests/test_lowrank_gpu.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorahub.blend import blend
from lorahub.formats import load_adapter
from lorahub.lowrank import factored_svd, factored_svd_sum
from lorahub.resize import resize_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("n,k,r", [(4096, 4096, 64), (11008, 4096, 16), (320, 2880, 8), (64, 48, 100)])
def test_factored_svd_on_cuda_matches_float64(n, k, r):
    generator = torch.Generator().manual_seed(n + k + r)
    up = torch.randn(n, r, generator=generator) / n ** 0.5
    down = torch.randn(r, k, generator=generator) / k ** 0.5
    svd = factored_svd(up, down, device="cuda")
    assert svd.S.device.type == "cuda"
    reference = np.linalg.svd(up.double().numpy() @ down.double().numpy(), compute_uv=False)[: svd.S.shape[0]]
    error = np.abs(svd.S.double().cpu().numpy() - reference).max() / reference[0]
    assert error < 1e-5, error
    q = min(8, svd.S.shape[0])
    product = (svd.U[:, :q] * svd.S[:q]) @ svd.Vh[:q]
    dense = torch.from_numpy(up.double().numpy() @ down.double().numpy())
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = (u[:, :q] * s[:q]) @ vh[:q]
    assert float((product.double().cpu() - best).norm() / best.norm()) < 1e-4


def test_factored_svd_sum_on_cuda():
    generator = torch.Generator().manual_seed(5)
    terms = [(0.7, torch.randn(512, 8, generator=generator), torch.randn(8, 256, generator=generator)),
             (-0.3, torch.randn(512, 4, generator=generator), torch.randn(4, 256, generator=generator))]
    svd = factored_svd_sum(terms, device="cuda")
    dense = sum(c * (u.double() @ d.double()) for c, u, d in terms)
    reference = torch.linalg.svdvals(dense)[: svd.S.shape[0]]
    assert float((svd.S.double().cpu() - reference).abs().max() / reference[0]) < 1e-5


def test_resize_on_cuda_equals_cpu(peft_rslora_dir):
    adapter = load_adapter(peft_rslora_dir)
    on_cpu, report_cpu = resize_adapter(load_adapter(peft_rslora_dir), rank=3, device="cpu")
    on_gpu, report_gpu = resize_adapter(adapter, rank=3, device="cuda")
    assert [l.new_rank for l in report_gpu.layers] == [l.new_rank for l in report_cpu.layers]
    for target, layer in on_cpu.layers.items():
        torch.testing.assert_close(on_gpu.layers[target].delta_weight(), layer.delta_weight(), rtol=1e-4, atol=1e-5)


def test_blend_on_cuda_equals_cpu(peft_lora_dir, peft_rslora_dir):
    adapters = lambda: [load_adapter(peft_lora_dir), load_adapter(peft_rslora_dir)]  # noqa: E731
    for method in ("svd", "ties"):
        extra = {"density": 0.5} if method == "ties" else {}
        on_cpu = blend(adapters(), [0.6, 0.4], method=method, rank=6, device="cpu", **extra)
        on_gpu = blend(adapters(), [0.6, 0.4], method=method, rank=6, device="cuda", **extra)
        assert on_gpu.report.device.startswith("cuda")
        for target, layer in on_cpu.adapter.layers.items():
            torch.testing.assert_close(on_gpu.adapter.layers[target].delta_weight(), layer.delta_weight(),
                                       rtol=1e-3, atol=1e-5)
