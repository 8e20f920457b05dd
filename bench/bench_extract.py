#!/usr/bin/env python
"""Benchmark `lorahub extract` against the dense route and against reading both models, in one run.

Builds (once, reused from --workdir) a synthetic Llama-shaped pair of bf16 models written as
safetensors shards with an index and a config.json: a base of random weights, and a "fine-tune" whose
every linear layer is base + ΔW, ΔW = U·diag(σ)·Vᵀ (inner dimension 256, σᵢ = e^(−i/24): a slowly
decaying spectrum, as fine-tune deltas have) + dense noise, both at the scale of real fine-tunes (ΔW
≈ 1 % of W); its RMSNorm weights change slightly (reported, not extracted), its embeddings not at all.
Then, side by side on the same page-cache state:

  read     `cat BASE/* TUNED/* > /dev/null`                        (the I/O floor: both models once)
  lorahub  `extract(...)` in process (CUDA and BLAS initialised by a warm-up), and the CLI once
           (`lorahub extract … --json`, a fresh process: interpreter, torch and CUDA start included)
  dense    per layer, as kohya's extract_lora_from_models.py and mergekit do: read both tensors, ΔW in
           fp32, `torch.linalg.svd(ΔW)` (full matrices), U·S and Vh truncated to the rank; timed on
           `--dense-samples` layers of each shape and scaled to all layers (ESTIMATED; `--dense-all`
           times every layer)

and checks lorahub's per-layer error against the dense route's (the Eckart–Young optimum) on the
sampled layers.

    python bench/bench_extract.py --tiny                  # smoke test, seconds
    python bench/bench_extract.py                         # 1B-shaped pair (Llama-3.2-1B) on the CPU
    python bench/bench_extract.py --device cuda           # 7B-shaped pair (Llama-2-7B) on a GPU
    python bench/bench_extract.py --shape 7b --scale 0.25 # 8 of the 32 blocks
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import tensor_specs  # noqa: E402  (the same synthetic Llama layout as the merge bench)

SHAPES = {
    # Llama-3.2-1B: tied embeddings (no lm_head), GQA 32/8
    "1b": dict(hidden=2048, intermediate=8192, layers=16, vocab=128256, heads=32, kv_heads=8, tied=True),
    # Llama-2-7B
    "7b": dict(hidden=4096, intermediate=11008, layers=32, vocab=32000, heads=32, kv_heads=32, tied=False),
    "tiny": dict(hidden=256, intermediate=640, layers=2, vocab=1024, heads=8, kv_heads=4, tied=False),
}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")




def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name[: -len(".weight")].rsplit(".", 1)[-1] in LINEAR


# ---------------------------------------------------------------------------------------------
# the synthetic pair


def build_pair(root: Path, cfg: dict, shard_bytes: int, device: str, seed: int = 0) -> tuple[Path, Path]:
    """base/ and tuned/ under `root`, written tensor by tensor (never a shard in memory)."""
    import torch
    from transformers import LlamaConfig

    from lorahub.storage import build_header

    base, tuned = root / "base", root / "tuned"
    marker = root / ".complete"
    key = {**cfg, "shard_bytes": shard_bytes, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == key:
        return base, tuned
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    tuned.mkdir(parents=True)
    dev = torch.device("cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    specs = tensor_specs(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=dev).manual_seed(seed + 1)
    pool = (torch.randn(64 << 20, generator=g) * 0.02).to(torch.bfloat16)
    inner = 256
    sigma = torch.exp(-torch.arange(inner, dtype=torch.float32, device=dev) / 24)
    weight_map: dict[str, str] = {}
    total = 0
    started = time.perf_counter()
    for index, shard in enumerate(shards):
        fname = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        entries, offset = [], 0
        for name, shape in sorted(shard):
            nbytes = math.prod(shape) * 2
            entries.append((name, "BF16", shape, offset, offset + nbytes))
            offset += nbytes
            weight_map[name] = fname
        header = build_header(entries, {"format": "pt"})
        with open(base / fname, "wb") as fb, open(tuned / fname, "wb") as ft:
            fb.write(header)
            ft.write(header)
            for name, _, shape, begin, end in entries:
                numel = math.prod(shape)
                total += end - begin
                if name.endswith("norm.weight"):  # RMSNorm weights ≈ 1; the fine-tune moves them a little
                    w = torch.ones(numel, dtype=torch.bfloat16)
                    t = (w.float() * (1 + 0.01 * torch.rand(numel, generator=g))).to(torch.bfloat16)
                else:
                    start = int(torch.randint(0, pool.numel() - numel, (1,), generator=g)) \
                        if numel < pool.numel() else 0
                    w = pool[start:start + numel] if numel <= pool.numel() else \
                        pool.repeat(-(-numel // pool.numel()))[:numel]
                    t = w
                    if is_linear(name):
                        n, k = shape
                        u = torch.randn(n, inner, generator=gd, device=dev) * (sigma / n ** 0.5)
                        v = torch.randn(inner, k, generator=gd, device=dev) / k ** 0.5
                        delta = (u @ v) * (0.02 * 0.01 * math.sqrt(n * k) / float(sigma.norm()))
                        delta += torch.randn(n, k, generator=gd, device=dev) * 2e-5
                        t = (w.to(dev).view(n, k).float() + delta).to(torch.bfloat16).reshape(-1).cpu()
                fb.write(memoryview(w.contiguous().view(torch.uint8).numpy()))
                ft.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
        print(f"  wrote {fname} × 2 ({(base / fname).stat().st_size / 1e9:.2f} GB each)", flush=True)
    for folder in (base, tuned):
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                    num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                    num_key_value_heads=cfg["kv_heads"], vocab_size=cfg["vocab"], max_position_embeddings=4096,
                    tie_word_embeddings=cfg["tied"], torch_dtype="bfloat16",
                    architectures=["LlamaForCausalLM"]).to_json_file(str(folder / "config.json"))
    subprocess.run(["sync"], check=False)
    print(f"  pair generated in {time.perf_counter() - started:.0f} s", flush=True)
    marker.write_text(json.dumps(key))
    return base, tuned


# ---------------------------------------------------------------------------------------------
# the three routes


def time_read(base: Path, tuned: Path) -> float:
    started = time.perf_counter()
    subprocess.run(f"cat {base}/* {tuned}/* > /dev/null", shell=True, check=True)
    return time.perf_counter() - started


def run_cli(base: Path, tuned: Path, out: Path, rank: int, device: str, power_iters: int,
            pycache: Path | None = None) -> dict:
    """The CLI in a fresh process: wall time, peak RSS, its --json payload. `pycache`: where Python keeps
    the bytecode it compiles (a read-only site-packages otherwise recompiles torch in every process)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, LORAHUB_NO_PROGRESS="1", PYTHONPATH=str(REPO))
    if pycache is not None:
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    cmd = [sys.executable, "-m", "lorahub.cli", "extract", "--base", str(base), "--tuned", str(tuned), "--rank",
           str(rank), "-o", str(out), "--device", device, "--power-iters", str(power_iters), "--json"]
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(f'RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
               "sys.exit(rc)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"lorahub extract failed:\n{proc.stderr[-3000:]}\n{proc.stdout[-3000:]}")
    rss = re.search(r"RSS (\d+)", proc.stderr)
    return {"wall": wall, "rss": int(rss.group(1)) * 1024 if rss else None, "json": json.loads(proc.stdout)}


def dense_layer(base_file: Path, tuned_file: Path, name: str, rank: int, device):
    """kohya/mergekit's per-layer route: both tensors, ΔW fp32, full SVD, U·S | Vh truncated."""
    import torch
    from safetensors import safe_open

    with safe_open(str(base_file), "pt") as fb, safe_open(str(tuned_file), "pt") as ft:
        diff = ft.get_tensor(name).to(device).float() - fb.get_tensor(name).to(device).float()
    U, S, Vh = torch.linalg.svd(diff)
    up = U[:, :rank] @ torch.diag(S[:rank])
    down = Vh[:rank]
    return up.cpu(), down.cpu(), diff.cpu(), S.cpu()


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------


def _default_workdir() -> Path:
    if os.environ.get("LORAHUB_BENCH_DIR"):
        return Path(os.environ["LORAHUB_BENCH_DIR"]) / "extract"
    if Path("/work").is_dir() and os.access("/work", os.W_OK):
        return Path("/work/bench_extract")
    return Path(tempfile.gettempdir()) / "lorahub_bench_extract"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: 1b on the CPU, 7b on CUDA, tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: a tiny pair in a temporary directory")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the blocks (default 1)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--power-iters", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the read and of lorahub (median)")
    parser.add_argument("--cli-repeats", type=int, default=1, help="runs of the CLI in a fresh process")
    parser.add_argument("--dense-samples", type=int, default=None,
                        help="layers per shape timed by the dense route (default 1)")
    parser.add_argument("--dense-all", action="store_true", help="time the dense route on every layer")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--generate-only", action="store_true",
                        help="build the pair into --workdir and stop (a later run reuses it)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import torch

    from lorahub.extract import extract

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    shape = args.shape or ("tiny" if args.tiny else "7b" if device.type == "cuda" else "1b")
    cfg = dict(SHAPES[shape])
    cfg["layers"] = max(1, round(cfg["layers"] * args.scale))
    temp = tempfile.TemporaryDirectory(prefix="lorahub-bench-extract-") if args.tiny and args.workdir is None else None
    work = Path(temp.name) if temp else (args.workdir or _default_workdir()) / f"{shape}-{cfg['layers']}"
    work.mkdir(parents=True, exist_ok=True)
    model_bytes = sum(math.prod(s) * 2 for _, s in tensor_specs(cfg))
    specs = tensor_specs(cfg)
    linears = [(n, s) for n, s in specs if is_linear(n)]
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                print("cpu:", line.split(":", 1)[1].strip())
                break
    except OSError:
        pass
    print(f"pair: {shape}-shaped Llama, {cfg['layers']} blocks, {len(linears)} linear layers, bf16, "
          f"{model_bytes / 1e9:.2f} GB each; rank {args.rank}, power iterations {args.power_iters}", flush=True)
    need = 2 * model_bytes * 1.05
    if not (work / ".complete").exists() and shutil.disk_usage(work).free < need:
        raise SystemExit(f"not enough disk under {work}: need ~{need / 1e9:.1f} GB")
    base, tuned = build_pair(work, cfg, int(args.shard_gb * 1e9), str(device))
    if args.generate_only:
        print(f"pair ready under {work}")
        return 0
    mem = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    warm = 2 * model_bytes * 1.2 < mem
    print(f"page cache: {'warm (the pair fits in memory; read once before timing)' if warm else 'COLD-ish: the pair does not fit in memory'}",
          flush=True)
    if warm:
        time_read(base, tuned)

    # warm-up: BLAS/cuBLAS/cuSOLVER handles, CUDA context, pinned allocator (a tiny slice of the pair)
    extract(base, tuned, None, rank=min(args.rank, 8), device=device, include=["model.layers.0.self_attn.k_proj*"])
    reads, runs = [], []
    result = None
    for rep in range(args.repeats):
        reads.append(time_read(base, tuned))
        sync(device)
        t0 = time.perf_counter()
        result = extract(base, tuned, None, rank=args.rank, device=device, power_iters=args.power_iters)
        sync(device)
        runs.append(time.perf_counter() - t0)
        print(f"  rep {rep + 1}: read {reads[-1]:.2f} s, lorahub {runs[-1]:.2f} s "
              f"(stages {result.report.stage_seconds})", flush=True)
    assert result is not None
    read_t, lorahub_t = statistics.median(reads), statistics.median(runs)
    pycache = work / "pycache"
    first_cli = run_cli(base, tuned, work / "out-cli", args.rank, str(device), args.power_iters, pycache) \
        if args.cli_repeats else None
    cli = [run_cli(base, tuned, work / "out-cli", args.rank, str(device), args.power_iters, pycache)
           for _ in range(args.cli_repeats)]
    shutil.rmtree(work / "out-cli", ignore_errors=True)

    # dense route: sampled layers of each shape, scaled to all of them
    samples = args.dense_samples if args.dense_samples is not None else 1
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, s in linears:
        by_shape.setdefault(s, []).append(name)
    dense_total, dense_rows, checks = 0.0, [], []
    rows = {row.tensor: row for row in result.report.layers}
    for s, names in by_shape.items():
        picked = names if args.dense_all else [names[(i * len(names)) // max(1, samples)]
                                               for i in range(min(samples, len(names)))]
        times = []
        for name in picked:
            sync(device)
            t0 = time.perf_counter()
            up, down, diff, S = dense_layer(base / index[name], tuned / index[name], name, args.rank, device)
            sync(device)
            times.append(time.perf_counter() - t0)
            optimum = float(S[args.rank:].double().norm() / S.double().norm())
            ours = rows[name].rel_error
            checks.append(ours / optimum)
            dense_err = float((diff.double() - up.double() @ down.double()).norm() / diff.double().norm())
            print(f"  dense {name} {s}: {times[-1]:.2f} s; rel. error dense {dense_err:.5f}, lorahub {ours:.5f} "
                  f"(× {ours / optimum:.4f} of the optimum)", flush=True)
        mean = statistics.mean(times)
        dense_total += mean * len(names)
        dense_rows.append((s, len(names), len(picked), mean))
    estimated = not args.dense_all and any(count > picked for _, count, picked, _ in dense_rows)

    summary = result.report.summary()
    cli_wall = statistics.median(c["wall"] for c in cli) if cli else None
    cli_rss = max((c["rss"] or 0) for c in cli) if cli else None
    print()
    print(f"read both models (cat, median of {len(reads)}): {read_t:.2f} s "
          f"({2 * model_bytes / read_t / 1e9:.2f} GB/s)")
    print(f"lorahub extract, in process (median of {len(runs)}): {lorahub_t:.2f} s "
          f"({2 * model_bytes / lorahub_t / 1e9:.2f} GB/s); {summary['extracted']} layers "
          f"({summary['randomized']} randomized, {summary['exact']} exact), {summary['unchanged']} unchanged, "
          f"{summary['changed_not_extracted']} changed norms reported; energy retained mean "
          f"{summary['energy_retained_mean']:.4f}, min {summary['energy_retained_min']:.4f}")
    if cli_wall is not None:
        inside = statistics.median(c["json"]["seconds"] for c in cli)
        print(f"lorahub extract CLI, fresh process (median of {len(cli)}): {cli_wall:.2f} s, peak RSS "
              f"{(cli_rss or 0) / 1e9:.2f} GB (largest layer fp32 "
              f"{max(math.prod(s) for _, s in linears) * 4 / 1e9:.2f} GB); inside it, extraction + writing the "
              f"adapter {inside:.2f} s, the rest is interpreter, torch and CUDA start-up")
        if first_cli is not None:
            print(f"  (the first fresh process, compiling Python bytecode: {first_cli['wall']:.2f} s)")
    for s, count, picked, mean in dense_rows:
        print(f"dense full SVD per layer, {list(s)}: {mean:.2f} s × {count} layers ({picked} timed)")
    print(f"dense route, all {len(linears)} layers: {dense_total:.1f} s" + (" (ESTIMATED from the sampled layers)"
                                                                            if estimated else ""))
    print(f"lorahub error / Eckart–Young optimum on the sampled layers: max {max(checks):.4f}, "
          f"mean {statistics.mean(checks):.4f}")
    print(f"RATIO lorahub / read: {lorahub_t / read_t:.2f} (CLI: {cli_wall / read_t:.2f})" if cli_wall else
          f"RATIO lorahub / read: {lorahub_t / read_t:.2f}")
    print(f"RATIO dense / lorahub: {dense_total / lorahub_t:.1f}" + (" (dense estimated)" if estimated else ""))
    if temp is not None:
        temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
