"""Benchmark: LoHa → LoRA conversion, factored (lorahub) vs dense (form ΔW, full SVD), SDXL shapes.

The LoHa is generated on the 700 linear modules of SDXL's UNet transformer blocks (70 blocks: 10 of
width 640, 60 of width 1280; per block attn1 q/k/v/out (d×d), attn2 q/out (d×d) and k/v (d×2048),
ff.net.0.proj (8d×d), ff.net.2 (d×4d)), r1 = r2 = 16 (so the exact LoRA form has rank 256), random
factors. Timed in one run:

  1. factored, exact: the exact LoRA factors of every module (face-splitting / Khatri–Rao products,
     `lorahub.lycoris.lora_up/lora_down`, n×256 and 256×k), no SVD.
  2. factored + SVD: `resize_adapter(rank=R)`: those factors, then the batched factored SVD (QR of both
     factors, 256×256 SVD): the optimal rank-R LoRA of the true ΔW, with the retained-energy report.
  3. dense: ΔW formed as LyCORIS forms it, `torch.linalg.svd(ΔW, full_matrices=False)`, truncated to R.
     On 2 cores a full SVD of every module takes too long, so by default --dense-samples modules of
     each shape are timed and the per-shape mean is scaled to the module counts (printed ESTIMATED);
     --dense-all times all 700.
Correctness in the same run: for every densely decomposed module, the rank-R result of route 2
against the dense Eckart–Young optimum (relative Frobenius error).

    python bench/bench_lycoris.py                 # the SDXL-shaped LoHa, CPU
    python bench/bench_lycoris.py --tiny          # smoke test
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from common import fmt_s, print_cpu_model  # noqa: F401  (puts the repository root on sys.path)

from lorahub.adapter import Adapter, LazyTensor, LoraLayer
from lorahub.lycoris import LycorisModule, dense_delta, factor_tensors, lora_down, lora_up
from lorahub.resize import resize_adapter


def block_shapes(d: int, context: int = 2048) -> dict[str, tuple[int, int]]:
    return {"attn1.to_q": (d, d), "attn1.to_k": (d, d), "attn1.to_v": (d, d), "attn1.to_out.0": (d, d),
            "attn2.to_q": (d, d), "attn2.to_k": (d, context), "attn2.to_v": (d, context),
            "attn2.to_out.0": (d, d), "ff.net.0.proj": (8 * d, d), "ff.net.2": (d, 4 * d)}


def make_loha(widths: list[int], r: int, seed: int = 0, context: int = 2048) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for block, d in enumerate(widths):
        for name, (n, k) in block_shapes(d, context).items():
            t = {role: LazyTensor.of(torch.randn(*shape, generator=g) * std) for role, shape, std in (
                ("w1a", (n, r), 0.1), ("w1b", (r, k), 1.0), ("w2a", (n, r), 0.1), ("w2b", (r, k), 1.0))}
            mod = LycorisModule(algo="loha", tensors=t, out_features=n, in_shape=(k,), scale=1.0, rank=r * r,
                                resolved=True)
            a, b = factor_tensors(mod, conv=False)
            target = f"unet.blocks.{block}.{name}"
            layers[target] = LoraLayer(target=target, kind="linear", A=a, B=b, alpha=float(r * r), rank=r * r,
                                       source_name=target, lycoris=mod)
    return Adapter(path=None, format="lycoris", layers=layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64, help="rank R of the optimal LoRA (route 2, 3)")
    parser.add_argument("--dim", type=int, default=16, help="LoHa r1 = r2")
    parser.add_argument("--dense-samples", type=int, default=1, help="dense SVDs timed per shape")
    parser.add_argument("--dense-all", action="store_true", help="time the dense route on every module")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the factored routes (median)")
    parser.add_argument("--tiny", action="store_true", help="2 blocks of width 64, context 32 (smoke test)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    widths = [64, 64] if args.tiny else [640] * 10 + [1280] * 60
    context = 32 if args.tiny else 2048
    adapter = make_loha(widths, args.dim, context=context)
    layers = list(adapter.layers.values())
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}")
    print_cpu_model()
    shapes: dict[tuple[int, int], list[LoraLayer]] = {}
    for layer in layers:
        shapes.setdefault((layer.out_features, layer.in_features), []).append(layer)
    print(f"LoHa: {len(layers)} modules, r1 = r2 = {args.dim} (exact LoRA rank {args.dim ** 2}), "
          f"{len(shapes)} shapes; target rank R = {args.rank}")

    def exact_factors() -> None:
        for layer in layers:
            assert layer.lycoris is not None
            lora_up(layer.lycoris)
            lora_down(layer.lycoris)

    exact_times, svd_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        exact_factors()
        exact_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        resized, report = resize_adapter(adapter, rank=args.rank)
        svd_times.append(time.perf_counter() - t0)
    exact_s, svd_s = statistics.median(exact_times), statistics.median(svd_times)

    torch.linalg.svd(torch.randn(64, 48), full_matrices=False)  # warm-up (first-call overhead)
    dense_total, estimated, worst = 0.0, False, 0.0
    for (n, k), group in shapes.items():
        sample = group if args.dense_all else group[:max(args.dense_samples, 0)]
        if not sample:
            estimated = True
            continue
        times = []
        for layer in sample:
            assert layer.lycoris is not None
            t0 = time.perf_counter()
            delta = dense_delta(layer.lycoris)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            best = (U[:, :args.rank] * S[:args.rank]) @ Vh[:args.rank]
            times.append(time.perf_counter() - t0)
            got = resized.layers[layer.target].delta_math()
            worst = max(worst, float((got.double() - best.double()).norm() / best.double().norm()))
        mean = sum(times) / len(times)
        dense_total += mean * len(group)
        estimated = estimated or len(sample) < len(group)
        print(f"  dense {n}×{k}: {fmt_s(mean)} per module × {len(group)} modules ({len(sample)} timed)")
    label = "ESTIMATED (per-shape samples × counts)" if estimated else "measured"
    print(f"\nmean retained energy at rank {args.rank}: {report.mean_energy_retained:.4f}; "
          f"factored vs dense optimum, worst relative error: {worst:.2e}")
    print(f"\n| route | seconds ({len(layers)} modules) | ratio dense / route |")
    print("| --- | --- | --- |")
    print(f"| factored, exact LoRA factors (no SVD) | {exact_s:.3f} | {dense_total / exact_s:,.0f}× |")
    print(f"| factored + SVD (optimal rank-{args.rank} LoRA, resize) | {svd_s:.3f} | {dense_total / svd_s:,.0f}× |")
    print(f"| dense: form ΔW, full SVD — {label} | {dense_total:.1f} | 1× |")
    print(f"RATIO dense / factored+SVD: {dense_total / svd_s:.0f}x ({label})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
