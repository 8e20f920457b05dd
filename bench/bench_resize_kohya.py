"""Benchmark: `lorahub resize` of a kohya SDXL LoCon, end to end (read the file, resize, write it).

The adapter is generated (`common.make_kohya_sdxl_adapter`): 700 modules picked evenly from the 1052
a kohya SDXL LoCon adapts (CLIP-L and OpenCLIP-bigG text encoders, the UNet's attention linears,
ResnetBlock2D 3×3 convs, 1×1 shortcuts, time embeddings, up/down-sampler convs: 25 shapes), rank 32,
alpha 16, fp16 (as kohya saves), random factors with a decaying spectrum. It is written once as a
kohya .safetensors (not timed) and resized to rank 8 (convs too).

Timed, in one run, repetitions interleaved (best and median reported; a shared machine is noisy):
  lorahub      load_adapter(file) → resize_adapter(rank=8, conv_rank=8) → save_adapter(kohya), each
               stage timed; layers of one shape decomposed together (lowrank.BatchedFactoredSVD)
  per-layer    the same, resize_adapter(batch_size=1): one factored SVD per layer (the path before
               batching)
  legacy I/O   the per-layer path with the loader lorahub had before the file cache: every tensor
               (and every .alpha scalar) read through its own safetensors `safe_open`, which opens the
               file and parses its header again (emulated here by patching `LazyTensor.load` and
               `TensorSource.scalar`; the rest is today's code)
  CLI          `python -m lorahub.cli resize FILE --rank 8 --conv-rank 8 --out OUT` in a fresh
               process: what a user waits for, `import torch` included (--cli-repeats, 0 = skip)
  dense        optional (--dense-samples N): kohya resize_lora.py's method per layer, W = up @ down
               and torch.linalg.svd(W, full_matrices=True), N layers of each shape timed and scaled to
               the layer counts (an estimate, marked so)
Correctness in the same run: the batched and per-layer results have the same ranks and the same
deltas (max |ΔW_batched − ΔW_per-layer| over all layers, relative to max |ΔW|).

    python bench/bench_resize_kohya.py                    # CPU, 5 repetitions
    python bench/bench_resize_kohya.py --dense-samples 1  # plus the dense route's estimate
    python bench/bench_resize_kohya.py --tiny             # smoke test (70 modules, rank 8 → 2)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from common import fmt_s, make_kohya_sdxl_adapter, print_cpu_model, sync

from lorahub.adapter import LazyTensor
from lorahub.errors import LorahubError
from lorahub.formats import load_adapter, save_adapter
from lorahub.formats.common import TensorSource
from lorahub.resize import resize_adapter

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def legacy_loader():
    """LazyTensor.load and TensorSource.scalar as they were: one safetensors `safe_open` per tensor."""
    from safetensors import safe_open

    def load(self):
        if self._value is not None:
            return self._value
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return handle.get_tensor(self.key)
        except Exception as exc:  # as the old code: file + key in the message
            raise LorahubError(f"cannot read tensor: {exc}", path=self.path, key=self.key) from None

    def scalar(self, key):
        value = self.lazy(key).load()
        return float(value.reshape(()).to(torch.float64))

    saved = LazyTensor.load, TensorSource.scalar
    LazyTensor.load, TensorSource.scalar = load, scalar
    try:
        yield
    finally:
        LazyTensor.load, TensorSource.scalar = saved


def pipeline(src: Path, out: Path, device: torch.device, rank: int, batch_size: int | None):
    stages = {}
    t = time.perf_counter()
    adapter = load_adapter(src)
    stages["load"] = time.perf_counter() - t
    sync(device)
    t = time.perf_counter()
    resized, report = resize_adapter(adapter, rank=rank, conv_rank=rank, device=device, batch_size=batch_size)
    sync(device)
    stages["resize"] = time.perf_counter() - t
    t = time.perf_counter()
    save_adapter(resized, out, format="kohya", overwrite=True)  # the same path every repetition
    stages["save"] = time.perf_counter() - t
    stages["total"] = sum(stages.values())
    return stages, resized, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] for the SVDs")
    ap.add_argument("--modules", type=int, default=700, help="modules in the generated adapter (default 700)")
    ap.add_argument("--rank", type=int, default=32, help="adapter rank (default 32)")
    ap.add_argument("--new-rank", type=int, default=8, help="target rank, convs included (default 8)")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored factor dtype")
    ap.add_argument("--repeats", type=int, default=5, help="repetitions of each in-process variant")
    ap.add_argument("--cli-repeats", type=int, default=3, help="fresh-process CLI runs (0 = skip)")
    ap.add_argument("--legacy-repeats", type=int, default=2, help="runs with the legacy loader (0 = skip)")
    ap.add_argument("--dense-samples", type=int, default=0, help="densely timed layers per shape (0 = skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--workdir", default=None, help="where the generated files go (default: a temporary dir)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--tiny", action="store_true", help="smoke test: 70 modules, rank 8 → 2, at most 2 repetitions")
    args = ap.parse_args(argv)
    if args.tiny:
        args.modules, args.rank, args.new_rank = 70, 8, 2
        args.repeats, args.cli_repeats, args.legacy_repeats = min(args.repeats, 2), min(args.cli_repeats, 1), min(args.legacy_repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print("== lorahub resize benchmark: kohya SDXL LoCon, end to end ==")
    print(f"python {platform.python_version()}, torch {torch.__version__}, cpu_count {os.cpu_count()}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (at start)")
    cpu = print_cpu_model()
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")

    with tempfile.TemporaryDirectory(prefix="lorahub-bench-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        src = tmp / "sdxl_locon.safetensors"
        t = time.perf_counter()
        adapter = make_kohya_sdxl_adapter(args.rank, args.modules, dtype=dtype)
        save_adapter(adapter, src, format="kohya")
        kinds = {}
        for layer in adapter.layers.values():
            kind = layer.kind + ("" if layer.kind != "conv" else " " + "x".join(map(str, layer.kernel_size)))
            kinds[kind] = kinds.get(kind, 0) + 1
        shapes = {(layer.out_features, layer.in_features) for layer in adapter.layers.values()}
        print(f"adapter: {len(adapter.layers)} modules ({', '.join(f'{v} {k}' for k, v in kinds.items())}), "
              f"{len(shapes)} shapes, rank {args.rank}, {args.dtype}, file {src.stat().st_size / 1e6:.0f} MB "
              f"(generated and written in {time.perf_counter() - t:.1f} s, not timed); rank {args.rank} → "
              f"{args.new_rank} on {device}")
        del adapter

        variants = {"lorahub": None, "per-layer": 1}
        pipeline(src, tmp / "warm.safetensors", device, args.new_rank, None)  # warm-up: page cache, threads
        times: dict[str, list[dict]] = {name: [] for name in variants}
        results = {}
        for rep in range(max(1, args.repeats)):
            for name, batch_size in variants.items():
                stages, resized, report = pipeline(src, tmp / f"{name}.safetensors", device, args.new_rank,
                                                   batch_size)
                times[name].append(stages)
                results[name] = (resized, report)
        if args.legacy_repeats > 0:
            times["legacy I/O"] = []
            with legacy_loader():
                for _ in range(args.legacy_repeats):
                    stages, _, _ = pipeline(src, tmp / "legacy.safetensors", device, args.new_rank, 1)
                    times["legacy I/O"].append(stages)
        cli_times = []
        for i in range(args.cli_repeats):
            out = tmp / f"cli{i}.safetensors"
            env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lorahub.cli", "resize", str(src), "--rank", str(args.new_rank),
                            "--conv-rank", str(args.new_rank), "--device", str(device), "--out", str(out)],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cli_times.append(time.perf_counter() - t)

        # correctness: batched vs per-layer
        (batched, report_b), (single, report_s) = results["lorahub"], results["per-layer"]
        assert [e.new_rank for e in report_b.layers] == [e.new_rank for e in report_s.layers]
        worst = 0.0
        for target, layer in single.layers.items():
            want = layer.delta_math()
            got = batched.layers[target].delta_math()
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))

        print(f"\n{'variant':<12} {'load':>9} {'resize':>9} {'save':>9} {'total best':>11} {'median':>9} "
              f"{'÷ lorahub':>10}   (seconds; best of {args.repeats} unless noted)")
        best_lorahub = min(s["total"] for s in times["lorahub"])
        record = {"machine": cpu, "device": str(device), "modules": args.modules, "rank": args.rank,
                  "new_rank": args.new_rank, "dtype": args.dtype, "variants": {}}
        for name, runs in times.items():
            best = {stage: min(s[stage] for s in runs) for stage in runs[0]}
            median = statistics.median(s["total"] for s in runs)
            note = "" if len(runs) == args.repeats else f"  ({len(runs)} runs)"
            print(f"{name:<12} {best['load']:>9.3f} {best['resize']:>9.3f} {best['save']:>9.3f} {best['total']:>11.3f} "
                  f"{median:>9.3f} {best['total'] / best_lorahub:>9.2f}×{note}")
            record["variants"][name] = {"best": best, "median_total": median, "runs": len(runs)}
        if cli_times:
            print(f"{'CLI':<12} {'':>9} {'':>9} {'':>9} {min(cli_times):>11.3f} {statistics.median(cli_times):>9.3f} "
                  f"{min(cli_times) / best_lorahub:>9.2f}×  (fresh process, import torch included; "
                  f"{len(cli_times)} runs)")
            record["variants"]["CLI"] = {"best_total": min(cli_times), "median_total": statistics.median(cli_times)}
        print(f"\nbatched vs per-layer: same ranks; max |ΔW difference| / max |ΔW| = {worst:.1e}")
        summary = report_b.summary()
        print(f"mean energy retained {summary['mean_energy_retained']:.4f}, worst {summary['worst_energy_retained']:.4f}; "
              f"parameters {summary['old_params']:,} → {summary['new_params']:,}")
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")

        if args.dense_samples > 0:
            dense_total, timed_layers = 0.0, 0
            groups: dict[tuple[int, int], list] = {}
            for layer in load_adapter(src).layers.values():
                groups.setdefault((layer.out_features, layer.in_features), []).append(layer)
            torch.linalg.svd(torch.randn(256, 256, device=device), full_matrices=True)  # LAPACK warm-up
            for (n, k), layers in groups.items():
                per = []
                for layer in layers[:args.dense_samples]:
                    up, down = layer.factors(device=device)
                    sync(device)
                    t = time.perf_counter()
                    torch.linalg.svd(up @ down, full_matrices=True)
                    sync(device)
                    per.append(time.perf_counter() - t)
                dense_total += statistics.mean(per) * len(layers)
                timed_layers += len(per)
            best_resize = min(s["resize"] for s in times["lorahub"])
            print(f"dense full SVD (kohya's method), all layers: {fmt_s(dense_total)} ESTIMATED from {timed_layers} "
                  f"timed layers ({args.dense_samples} per shape, scaled to the counts) = "
                  f"{dense_total / best_resize:,.0f}× lorahub's resize")
            record["dense_estimate_s"] = dense_total
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
