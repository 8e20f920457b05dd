"""Benchmark: lorahub resize vs the dense full-SVD method (kohya resize_lora.py) on a 7B-shaped adapter.

The adapter is generated: Llama-2-7B shapes (hidden 4096, intermediate 11008, 32 blocks), all seven
linear projections per block (224 layers), rank 64, random factors with a decaying spectrum
σᵢ = e^(−i/8) (never zeros: zeros take fast paths). Factors start on the CPU, as after reading a file.

Timed, in one run:
  1. lorahub, in memory: `resize_adapter(adapter, rank=R)` over all 224 layers, same-shape layers
     batched (warm-up on 7 layers first, then the median of --repeats runs; the first run is printed
     too), and the baseline in the same run: `batch_size=1`, one layer at a time (the path before
     batching), median of --per-layer-repeats runs. On CUDA every timing is bracketed by
     torch.cuda.synchronize().
  2. lorahub, end to end: read the PEFT adapter from disk, resize, write it (median of --repeats;
     page cache warm after the first write).
  3. The dense method kohya uses per layer: W = up @ down, torch.linalg.svd(W, full_matrices=True)
     (fp32, on --device). On a CPU a full SVD of 11008×4096 takes minutes, so by default only
     --dense-samples layers of each of the three shapes are timed (one call each, after a small
     warm-up SVD) and the per-shape mean is scaled to the layer counts; --dense-all times all 224.
     The output says which.
Correctness in the same run: for every densely timed layer, max |σ_lorahub − σ_dense| / σ₀ and the
rank-R reconstruction error of lorahub's factors against the Eckart–Young optimum √(Σ dropped σ²).

    python bench/bench_resize.py                      # CPU
    python bench/bench_resize.py --device cuda         # GPU (H200: also times the dense method on GPU)
    python bench/bench_resize.py --device cuda --dense-samples 0 --no-io   # GPU, in-memory resize only
    python bench/bench_resize.py --tiny --device cpu   # smoke test
    python bench/bench_resize.py --dense-samples 0     # lorahub only
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

# bench/common.py (bench/ is on sys.path when this runs as a script); it puts the repository root there too
from common import BLOCKS, PROJ, fmt_s, make_adapter, print_cpu_model, proj_shapes, sync, timed

from lorahub.adapter import Adapter, LoraLayer
from lorahub.formats import load_adapter, save_adapter
from lorahub.lowrank import factored_svd
from lorahub.resize import resize_adapter


def dense_svd(layer: LoraLayer, device: torch.device):
    up, down = layer.factors(device=device, dtype=torch.float32)
    W = up @ down
    return torch.linalg.svd(W, full_matrices=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (lorahub and the dense method)")
    ap.add_argument("--rank", type=int, default=64, help="adapter rank (default 64)")
    ap.add_argument("--new-rank", type=int, default=16, help="target rank (default 16)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="stored factor dtype")
    ap.add_argument("--repeats", type=int, default=5, help="lorahub repetitions (median reported)")
    ap.add_argument("--dense-samples", type=int, default=1,
                    help="densely timed layers per shape (0 = skip the dense method)")
    ap.add_argument("--dense-all", action="store_true", help="time the dense method on all 224 layers")
    ap.add_argument("--no-io", action="store_true", help="skip the end-to-end (read, resize, write) timing")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="layers per batched SVD (default: lowrank.plan_batches' sizes; 1 = one at a time)")
    ap.add_argument("--per-layer-repeats", type=int, default=3,
                    help="runs of the one-layer-at-a-time baseline (0 = skip)")
    ap.add_argument("--tiny", action="store_true", help="smoke test: hidden 512, 2 blocks (times nothing useful)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # --tiny: smoke-test shapes (hidden 512, intermediate 1376, 2 blocks): checks the script, times nothing useful
    blocks, proj = (2, proj_shapes(512, 1376)) if args.tiny else (BLOCKS, PROJ)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print("== lorahub resize benchmark: " + ("TINY smoke-test shapes ==" if args.tiny else
                                            "Llama-2-7B-shaped all-linear adapter =="))
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"cpu_count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    print_cpu_model()
    t0 = time.perf_counter()
    adapter = make_adapter(args.rank, alpha=2.0 * args.rank, dtype=dtype, blocks=blocks, proj=proj)
    n_layers = len(adapter.layers)
    nbytes = sum(layer.A.nbytes + layer.B.nbytes for layer in adapter.layers.values())
    print(f"adapter: {n_layers} layers, rank {args.rank}, {args.dtype}, {nbytes / 1e6:.0f} MB of factors "
          f"(generated in {time.perf_counter() - t0:.1f} s, not timed); target rank {args.new_rank}; "
          f"SVDs in fp32 on {device}")

    # -- lorahub, in memory: batched (the default) and, as the baseline, one layer at a time
    small = Adapter(path=None, format="peft", layers=dict(list(adapter.layers.items())[:7]))
    for batch_size in (args.batch_size, 1):  # warm-up (threads, CUDA context, cuSOLVER/cuBLAS, both paths)
        resize_adapter(small, rank=args.new_rank, device=device, batch_size=batch_size)
    times = []
    for _ in range(max(1, args.repeats)):
        dt, (resized, report) = timed(lambda: resize_adapter(adapter, rank=args.new_rank, device=device,
                                                             batch_size=args.batch_size), device)
        times.append(dt)
    lh = statistics.median(times)
    print(f"\nlorahub resize (in memory, {n_layers} layers, same-shape layers batched): median {fmt_s(lh)} "
          f"(first {fmt_s(times[0])}, min {fmt_s(min(times))}, max {fmt_s(max(times))}, {len(times)} runs); "
          f"{lh / n_layers * 1e3:.2f} ms/layer")
    summary = report.summary()
    print(f"  mean energy retained {summary['mean_energy_retained']:.4f}, worst {summary['worst_energy_retained']:.4f}")
    if args.per_layer_repeats > 0:
        per_layer = []
        for _ in range(args.per_layer_repeats):
            dt, (single, _) = timed(lambda: resize_adapter(adapter, rank=args.new_rank, device=device, batch_size=1),
                                    device)
            per_layer.append(dt)
        pl = statistics.median(per_layer)
        worst = max(float((single.layers[t].delta_math() - resized.layers[t].delta_math()).abs().max()
                          / layer.delta_math().abs().max()) for t, layer in list(single.layers.items())[::16])
        print(f"baseline, one layer at a time (batch_size=1): median {fmt_s(pl)} (min {fmt_s(min(per_layer))}, "
              f"max {fmt_s(max(per_layer))}, {len(per_layer)} runs); {pl / n_layers * 1e3:.2f} ms/layer; "
              f"RATIO per-layer / batched {pl / lh:.2f}×; max |ΔW difference| / max |ΔW| on every 16th layer "
              f"{worst:.1e}")

    # -- lorahub, end to end with files
    if not args.no_io:
        with tempfile.TemporaryDirectory(prefix="lorahub-bench-") as tmp:
            src = Path(tmp) / "src"
            t = time.perf_counter()
            save_adapter(adapter, src, format="peft")
            write_src = time.perf_counter() - t
            size = sum(p.stat().st_size for p in src.iterdir())
            e2e = []
            for i in range(max(1, min(args.repeats, 3))):
                def run():
                    loaded = load_adapter(src)
                    out, _ = resize_adapter(loaded, rank=args.new_rank, device=device, batch_size=args.batch_size)
                    return save_adapter(out, Path(tmp) / f"out{i}", format="peft")
                dt, dst = timed(run, device)
                e2e.append(dt)
            out_size = sum(p.stat().st_size for p in dst.iterdir())
            print(f"lorahub end to end (read {size / 1e6:.0f} MB PEFT dir, resize, write {out_size / 1e6:.0f} MB): "
                  f"median {fmt_s(statistics.median(e2e))} (min {fmt_s(min(e2e))}, max {fmt_s(max(e2e))}, "
                  f"{len(e2e)} runs; page cache warm; writing the source took {fmt_s(write_src)}, not timed)")

    # -- dense full SVD (kohya's method)
    if args.dense_samples <= 0 and not args.dense_all:
        return 0
    groups: dict[tuple[int, int], list[str]] = {}
    for target, layer in adapter.layers.items():
        groups.setdefault((layer.out_features, layer.in_features), []).append(target)
    # warm-up on a small matrix (LAPACK/cuSOLVER initialisation)
    torch.linalg.svd(torch.randn(256, 256, device=device), full_matrices=True)
    sync(device)
    total_dense = 0.0
    timed_layers = 0
    worst_sigma = worst_dense_sigma = worst_recon = 0.0
    print(f"\ndense method (W = up @ down; torch.linalg.svd(W, full_matrices=True), fp32, {device}):")
    for shape, targets in groups.items():
        picks = targets if args.dense_all else targets[:args.dense_samples]
        per = []
        for target in picks:
            layer = adapter.layers[target]
            dt, (U, S, Vh) = timed(lambda: dense_svd(layer, device), device)
            per.append(dt)
            # correctness, against an fp64 reference (exact factored SVD in float64 on the CPU)
            entry = next(e for e in report.layers if e.target == target)
            up64, down64 = layer.factors(dtype=torch.float64)
            ref = factored_svd(up64, down64, compute_dtype=torch.float64).S
            ours = factored_svd(*layer.factors(device=device), device=device).S.double().cpu()
            q = ref.shape[0]
            worst_sigma = max(worst_sigma, float((ours - ref).abs().max() / ref[0]))
            worst_dense_sigma = max(worst_dense_sigma, float((S[:q].double().cpu() - ref).abs().max() / ref[0]))
            new = resized.layers[target]
            nu, nd = new.factors(dtype=torch.float64)
            err = float(torch.linalg.matrix_norm((up64 @ down64) * layer.scale - (nu @ nd) * new.scale))
            opt = float(torch.sqrt((ref[args.new_rank:] ** 2).sum())) * layer.scale
            worst_recon = max(worst_recon, abs(err - opt) / max(opt, 1e-30))
            del U, S, Vh
            assert entry.new_rank == args.new_rank
        mean = statistics.mean(per)
        total_dense += mean * len(targets)
        timed_layers += len(picks)
        print(f"  {shape[0]}×{shape[1]}: {len(targets)} layers, timed {len(picks)}: mean {fmt_s(mean)}/layer "
              f"(min {fmt_s(min(per))}, max {fmt_s(max(per))}) → {fmt_s(mean * len(targets))} for the group")
    how = "measured on all layers" if timed_layers == n_layers else \
        f"ESTIMATED: {timed_layers} of {n_layers} layers timed, per-shape means scaled to the layer counts"
    print(f"dense full SVD, whole adapter: {fmt_s(total_dense)} ({how})")
    print(f"correctness on the {timed_layers} densely timed layers, against fp64 singular values: "
          f"max |Δσ|/σ₀ lorahub {worst_sigma:.2e}, dense {worst_dense_sigma:.2e}; lorahub's rank-{args.new_rank} "
          f"error ‖ΔW − ΔW'‖_F vs the Eckart–Young optimum √(Σ dropped σ²): max relative deviation {worst_recon:.2e}")
    print(f"\nRATIO dense / lorahub (in memory): {total_dense / lh:,.0f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
