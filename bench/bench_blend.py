"""Benchmark: lorahub blend (svd, factored) vs the dense method on two Llama-2-7B-shaped r64 adapters.

The adapters are generated: Llama-2-7B shapes (hidden 4096, intermediate 11008, 32 blocks), all seven
linear projections per block (224 layers), rank 64, random factors with a decaying spectrum
σᵢ = e^(−i/8) (never zeros: zeros take fast paths). Adapter 1: alpha 128 (scale 2); adapter 2:
rsLoRA alpha 16 (scale 16/√64 = 2), different random factors. Weights 0.7 and 0.3. Output rank 64.
Factors start on the CPU in fp32, as after reading a file.

Timed, in one run:
  1. lorahub, in memory: `blend([a, b], [0.7, 0.3], method="svd", rank=64)` over all 224 layers
     (warm-up on 7 layers first, then the median of --repeats runs). This is the whole library
     call: factored SVD of the stacked factors (rank 128), truncation, split, the per-layer report.
  2. lorahub, end to end: read both PEFT adapters from disk, blend, write (median of ≤ 3 runs, page
     cache warm).
  3. The dense method (kohya svd_merge_lora.py, PEFT add_weighted_adapter "svd"): per layer
     ΔW = c₁B₁A₁ + c₂B₂A₂ (dense n×k), torch.linalg.svd(ΔW, full_matrices=True), keep 64 (fp32, on
     --device). A full SVD of 4096×11008 takes seconds to minutes on a CPU, so by default only
     --dense-samples layers of each of the three shapes are timed (one call each, after a small
     warm-up SVD) and the per-shape mean is scaled to the layer counts; --dense-all times all 224.
     The output says which.
Correctness in the same run, for every densely timed layer: max |σ_lorahub − σ_dense| / σ₀ over the
128 non-zero singular values, the same relative to each σᵢ over the 64 kept ones, and the rank-64
reconstruction error of lorahub's written factors against the Eckart–Young optimum √(Σ dropped σ²).

    python bench/bench_blend.py                      # CPU
    python bench/bench_blend.py --device cuda         # GPU (also times the dense method on the GPU)
    python bench/bench_blend.py --dense-samples 0     # lorahub only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

# bench/common.py (bench/ is on sys.path when this runs as a script); it puts the repository root there too
from common import BLOCKS, fmt_s, make_adapter, print_cpu_model, sync, timed

from lorahub.adapter import Adapter, LoraLayer
from lorahub.blend import blend
from lorahub.formats import load_adapter, save_adapter
from lorahub.lowrank import factored_svd_sum

WEIGHTS = [0.7, 0.3]


def dense_blend(layers: list[LoraLayer], device: torch.device, out_rank: int, full_matrices: bool):
    """The dense method: ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ as an n×k matrix, full SVD, keep `out_rank` (PEFT/kohya)."""
    delta = None
    for weight, layer in zip(WEIGHTS, layers):
        up, down = layer.factors(device=device)
        term = (up * (weight * layer.scale)) @ down
        delta = term if delta is None else delta.add_(term)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    up_new = U[:, :out_rank] * S[:out_rank]
    down_new = Vh[:out_rank]
    return delta, S, up_new, down_new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (lorahub and the dense method)")
    ap.add_argument("--rank", type=int, default=64, help="rank of each input adapter (default 64)")
    ap.add_argument("--out-rank", type=int, default=64, help="rank of the blend (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="lorahub repetitions (median reported)")
    ap.add_argument("--dense-samples", type=int, default=1,
                    help="densely timed layers per shape (0 = skip the dense method)")
    ap.add_argument("--dense-all", action="store_true", help="time the dense method on all 224 layers")
    ap.add_argument("--thin", action="store_true",
                    help="dense method with full_matrices=False (default True, as PEFT and kohya call it)")
    ap.add_argument("--no-io", action="store_true", help="skip the end-to-end (read, blend, write) timing")
    ap.add_argument("--blocks", type=int, default=BLOCKS, help="transformer blocks (default 32; fewer for a smoke run)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    record: dict = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "rank": args.rank, "out_rank": args.out_rank}
    print("== lorahub blend benchmark: two Llama-2-7B-shaped all-linear r64 adapters, svd to r64 ==")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"cpu_count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    record["cpu"] = print_cpu_model()
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
        print(f"device {record['gpu']}, CUDA {torch.version.cuda}")
    t0 = time.perf_counter()
    a = make_adapter(args.rank, 0, alpha=2.0 * args.rank, use_rslora=False, blocks=args.blocks)
    b = make_adapter(args.rank, 1, alpha=2.0 * math.sqrt(args.rank), use_rslora=True, blocks=args.blocks)
    n_layers = len(a.layers)
    nbytes = sum(layer.A.nbytes + layer.B.nbytes for ad in (a, b) for layer in ad.layers.values())
    print(f"adapters: 2 × {n_layers} layers, rank {args.rank}, fp32, {nbytes / 1e6:.0f} MB of factors "
          f"(generated in {time.perf_counter() - t0:.1f} s, not timed); weights {WEIGHTS}; "
          f"output rank {args.out_rank}; SVDs in fp32 on {device}")

    # -- lorahub, in memory
    subset = lambda ad: Adapter(path=None, format="peft", layers=dict(list(ad.layers.items())[:7]))
    blend([subset(a), subset(b)], WEIGHTS, method="svd", rank=args.out_rank, device=str(device))  # warm-up
    times = []
    for _ in range(max(1, args.repeats)):
        dt, result = timed(lambda: blend([a, b], WEIGHTS, method="svd", rank=args.out_rank, device=str(device)),
                           device)
        times.append(dt)
    lh = statistics.median(times)
    summary = result.report.summary()
    print(f"\nlorahub blend svd (in memory, {n_layers} layers): median {fmt_s(lh)} "
          f"(min {fmt_s(min(times))}, max {fmt_s(max(times))}, {len(times)} runs); "
          f"{lh / n_layers * 1e3:.2f} ms/layer")
    print(f"  energy kept: mean {summary['energy_retained_mean']:.6f}, min {summary['energy_retained_min']:.6f}")
    record.update(lorahub_s=lh, lorahub_min_s=min(times), lorahub_max_s=max(times), lorahub_runs=len(times),
                  energy_mean=summary["energy_retained_mean"], energy_min=summary["energy_retained_min"])

    # -- lorahub, end to end with files
    if not args.no_io:
        with tempfile.TemporaryDirectory(prefix="lorahub-bench-") as tmp:
            srcs = [Path(tmp) / "a", Path(tmp) / "b"]
            for ad, src in zip((a, b), srcs):
                save_adapter(ad, src, format="peft")
            size = sum(p.stat().st_size for src in srcs for p in src.iterdir())
            e2e = []
            for i in range(max(1, min(args.repeats, 3))):
                def run():
                    loaded = [load_adapter(src) for src in srcs]
                    out = blend(loaded, WEIGHTS, method="svd", rank=args.out_rank, device=str(device))
                    return save_adapter(out.adapter, Path(tmp) / f"out{i}", format="peft")
                dt, dst = timed(run, device)
                e2e.append(dt)
            out_size = sum(p.stat().st_size for p in dst.iterdir())
            print(f"lorahub end to end (read 2 PEFT dirs, {size / 1e6:.0f} MB; blend; write {out_size / 1e6:.0f} MB): "
                  f"median {fmt_s(statistics.median(e2e))} (min {fmt_s(min(e2e))}, max {fmt_s(max(e2e))}, "
                  f"{len(e2e)} runs; page cache warm)")
            record.update(end_to_end_s=statistics.median(e2e), end_to_end_runs=len(e2e))

    # -- the dense method
    if args.dense_samples <= 0 and not args.dense_all:
        _write(args.json_out, record)
        return 0
    groups: dict[tuple[int, int], list[str]] = {}
    for target, layer in a.layers.items():
        groups.setdefault((layer.out_features, layer.in_features), []).append(target)
    torch.linalg.svd(torch.randn(256, 256, device=device), full_matrices=True)  # LAPACK/cuSOLVER init
    sync(device)
    total_dense = 0.0
    timed_layers = 0
    worst = dict.fromkeys(("lorahub_vs_dense", "lorahub_vs_ref", "dense_vs_ref", "lorahub_each_kept",
                           "dense_each_kept", "recon"), 0.0)
    full = not args.thin
    print(f"\ndense method (ΔW = Σ cᵢ·Bᵢ·Aᵢ dense; torch.linalg.svd(ΔW, full_matrices={full}), fp32, {device}):")
    record["dense"] = {}
    for shape, targets in groups.items():
        picks = targets if args.dense_all else targets[:args.dense_samples]
        per = []
        for target in picks:
            pair = [a.layers[target], b.layers[target]]
            dt, (delta, S, _, _) = timed(lambda: dense_blend(pair, device, args.out_rank, full), device)
            per.append(dt)
            # correctness: lorahub and the dense fp32 SVD against the factored SVD in float64
            # (exact to ~1e-15: it is the same algebra without forming ΔW)
            terms = [(w * l.scale, *l.factors(device=device)) for w, l in zip(WEIGHTS, pair)]
            ours = factored_svd_sum(terms, device=device).S.double()
            ref = factored_svd_sum(terms, device=device, compute_dtype=torch.float64).S
            q, kept = ours.shape[0], args.out_rank
            S = S.double()
            worst["lorahub_vs_dense"] = max(worst["lorahub_vs_dense"], float((ours - S[:q]).abs().max() / S[0]))
            worst["lorahub_vs_ref"] = max(worst["lorahub_vs_ref"], float((ours - ref).abs().max() / ref[0]))
            worst["dense_vs_ref"] = max(worst["dense_vs_ref"], float((S[:q] - ref).abs().max() / ref[0]))
            worst["lorahub_each_kept"] = max(worst["lorahub_each_kept"],
                                             float(((ours[:kept] - ref[:kept]).abs() / ref[:kept]).max()))
            worst["dense_each_kept"] = max(worst["dense_each_kept"],
                                           float(((S[:kept] - ref[:kept]).abs() / ref[:kept]).max()))
            written = result.adapter.layers[target]
            nu, nd = written.factors(device=device, dtype=torch.float64)
            exact = sum(c * (u.double() @ d.double()) for c, u, d in terms)
            err = float(torch.linalg.matrix_norm(exact - (nu * written.scale) @ nd))
            optimum = float(torch.sqrt((ref[kept:] ** 2).sum()))
            worst["recon"] = max(worst["recon"], abs(err - optimum) / max(optimum, 1e-30))
            del exact
            del delta, S
        mean = statistics.mean(per)
        total_dense += mean * len(targets)
        timed_layers += len(picks)
        record["dense"][f"{shape[0]}x{shape[1]}"] = {"layers": len(targets), "timed": len(picks), "mean_s": mean,
                                                    "min_s": min(per), "max_s": max(per)}
        print(f"  {shape[0]}×{shape[1]}: {len(targets)} layers, timed {len(picks)}: mean {fmt_s(mean)}/layer "
              f"(min {fmt_s(min(per))}, max {fmt_s(max(per))}) → {fmt_s(mean * len(targets))} for the group")
    measured = timed_layers == n_layers
    how = "measured on all layers" if measured else \
        f"ESTIMATED: {timed_layers} of {n_layers} layers timed, per-shape means scaled to the layer counts"
    print(f"dense method, whole blend: {fmt_s(total_dense)} ({how})")
    print(f"correctness (σ: all {2 * args.rank} non-zero singular values; ref: factored SVD in float64):")
    print(f"  max |σ_lorahub − σ_dense|/σ₀ = {worst['lorahub_vs_dense']:.2e}")
    print(f"  max |σ_lorahub − σ_ref|/σ₀ = {worst['lorahub_vs_ref']:.2e}; max |σ_dense − σ_ref|/σ₀ = "
          f"{worst['dense_vs_ref']:.2e}")
    print(f"  over the {args.out_rank} kept, max |Δσᵢ|/σᵢ: lorahub {worst['lorahub_each_kept']:.2e}, "
          f"dense {worst['dense_each_kept']:.2e}")
    print(f"  rank-{args.out_rank} reconstruction error (float64) vs the Eckart–Young optimum √(Σ dropped σ²): "
          f"max relative deviation {worst['recon']:.2e}")
    ratio = total_dense / lh
    print(f"\nRATIO dense / lorahub (in memory): {ratio:,.0f}×")
    record.update(dense_total_s=total_dense, dense_measured_all=measured, dense_timed_layers=timed_layers,
                  full_matrices=full, correctness=worst, ratio=ratio)
    _write(args.json_out, record)
    return 0


def _write(path: str | None, record: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
