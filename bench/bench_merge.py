#!/usr/bin/env python
"""Benchmark `lorahub merge` against a plain copy of the base and against PEFT, in one run.

Builds (once, reused from --workdir) a synthetic Llama-shaped base of random bf16 weights written as
safetensors shards with an index and a config.json, and a PEFT r16 all-linear adapter (random factors
with a decaying spectrum: orthonormal U, V from QR, σᵢ = e^(−i/8)). Then times, interleaved per
repetition:

  copy     `cp -r BASE COPY && sync`                      (the I/O floor: same bytes in and out)
  lorahub  `lorahub merge --base BASE ADAPTER --out OUT && sync`
  peft     `from_pretrained + PeftModel + merge_and_unload + save_pretrained && sync`
           (skipped when the model does not fit in RAM)

each under `/usr/bin/time -v` for the peak RSS, and checks the merged tensors against PEFT's (or, when
PEFT is skipped, against a direct torch computation) in the same run.

    python bench/bench_merge.py                      # Llama-2-7B shape, 13.5 GB (check `df -h` first)
    python bench/bench_merge.py --scale 0.125        # 4 of the 32 layers (~2.5 GB)
    python bench/bench_merge.py --device cuda        # on a GPU host
    python bench/bench_merge.py --layers 2 --hidden 256 --intermediate 512 --vocab 1000 --repeat 3

The base data is random-normal (std 0.02) taken at random offsets from a 512 MB pool of random
values, so no tensor is zero, constant or a copy of another at the same offset; the filesystem
(ext4, no compression or dedup) stores every byte.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32, vocab=32000, heads=32, kv_heads=32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# synthetic inputs


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    kv = h * cfg["kv_heads"] // cfg["heads"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["layers"]):
        p = f"model.layers.{layer}."
        specs += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                  (p + "post_attention_layernorm.weight", (h,))]
    specs.append(("model.norm.weight", (h,)))
    if not cfg.get("tied", False):  # tied embeddings: no lm_head tensor
        specs.append(("lm_head.weight", (v, h)))
    return specs


def build_base(root: Path, cfg: dict, shard_bytes: int, seed: int = 0) -> Path:
    """Shards written tensor by tensor (never a whole shard in memory), HF-style names and index."""
    import torch
    from transformers import LlamaConfig

    from lorahub.storage import build_header

    marker = root / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == {**cfg, "shard_bytes": shard_bytes}:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
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
    pool = (torch.randn(256 << 20, generator=g) * 0.02).to(torch.bfloat16)
    pool_bytes = memoryview(pool.view(torch.uint8).numpy())
    ones = memoryview((pool[: 1 << 20].float() + 1).to(torch.bfloat16).view(torch.uint8).numpy())
    weight_map = {}
    total = 0
    started = time.perf_counter()
    for index, shard in enumerate(shards):
        fname = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        entries, offset = [], 0
        for name, shape in sorted(shard):  # the reference writer sorts by name within a dtype
            nbytes = math.prod(shape) * 2
            entries.append((name, "BF16", shape, offset, offset + nbytes))
            offset += nbytes
            weight_map[name] = fname
        with open(root / fname, "wb") as handle:
            handle.write(build_header(entries, {"format": "pt"}))
            for name, _, shape, begin, end in entries:
                total += end - begin
                if name.endswith("norm.weight"):  # RMSNorm weights ≈ 1
                    handle.write(ones[: end - begin])
                    continue
                # random values from a random offset of the pool, wrapping around
                position = int(torch.randint(0, pool.numel(), (1,), generator=g)) * 2
                remaining = end - begin
                while remaining:
                    step = min(remaining, len(pool_bytes) - position, 256 << 10)  # see lorahub.storage
                    handle.write(pool_bytes[position: position + step])
                    remaining -= step
                    position = 0
        print(f"  wrote {fname} ({(root / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
                num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"], vocab_size=cfg["vocab"],
                max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16",
                architectures=["LlamaForCausalLM"]).to_json_file(str(root / "config.json"))
    (root / "tokenizer_config.json").write_text("{}\n")
    subprocess.run(["sync"], check=False)
    print(f"  base generated in {time.perf_counter() - started:.0f} s", flush=True)
    marker.write_text(json.dumps({**cfg, "shard_bytes": shard_bytes}))
    return root


def build_adapter(root: Path, base: Path, cfg: dict, rank: int, alpha: float, seed: int = 1) -> Path:
    import torch
    from safetensors.torch import save_file

    marker = root / ".complete"
    key = {**cfg, "rank": rank, "alpha": alpha}
    if marker.exists() and json.loads(marker.read_text()) == key:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(-torch.arange(rank, dtype=torch.float32) / 8)
    state = {}
    for name, shape in tensor_specs(cfg):
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_f, in_f = shape
        u, _ = torch.linalg.qr(torch.randn(out_f, rank, generator=g))
        v, _ = torch.linalg.qr(torch.randn(in_f, rank, generator=g))
        state[f"base_model.model.{module}.lora_A.weight"] = v.T.contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = (u * sigma).contiguous()
    save_file(state, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": TARGETS, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "lora_dropout": 0.0, "base_model_name_or_path": str(base), "inference_mode": True}, indent=2) + "\n")
    marker.write_text(json.dumps(key))
    return root


# ---------------------------------------------------------------------------------------------
# timing


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time of `cmd && sync`, and the command's peak RSS from /usr/bin/time -v."""
    have_time = os.path.exists("/usr/bin/time")
    started = time.perf_counter()
    if have_time:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    else:  # machines without GNU time (some GPU images): the peak RSS of the child via a wrapper
        wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                   "print(f'Maximum resident set size (kbytes): "
                   "{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); sys.exit(rc)")
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    subprocess.run(["sync"], check=False)
    wall = time.perf_counter() - started
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"wall": wall, "rss": int(match.group(1)) * 1024 if match else None, "rc": proc.returncode,
            "stdout": proc.stdout, "stderr": proc.stderr[-3000:]}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peft_worker(base: str, adapter: str, out: str, device: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)


def check_against(out: Path, reference: Path | None, base: Path, adapter: Path, cfg: dict, alpha: float,
                  rank: int) -> str:
    """Bitwise comparison of sampled tensors with PEFT's output, or with a direct torch merge."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    last = cfg["layers"] - 1
    names = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight",
             f"model.layers.{last // 2}.self_attn.k_proj.weight", "model.embed_tokens.weight", "lm_head.weight"]
    lines, worst = [], 0
    for name in names:
        with safe_open(str(out / index[name]), "pt") as f:
            got = f.get_tensor(name)
        if reference is not None:
            ref_index = reference / "model.safetensors.index.json"
            ref_file = reference / json.loads(ref_index.read_text())["weight_map"][name] if ref_index.exists() \
                else reference / "model.safetensors"
            with safe_open(str(ref_file), "pt") as f:
                ref = f.get_tensor(name)
        else:
            with safe_open(str(base / index[name]), "pt") as f:
                ref = f.get_tensor(name).float()
            module = name[: -len(".weight")]
            if module.rsplit(".", 1)[-1] in TARGETS:
                with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
                    a = f.get_tensor(f"base_model.model.{module}.lora_A.weight")
                    b = f.get_tensor(f"base_model.model.{module}.lora_B.weight")
                ref = ref + (b @ a) * (alpha / rank)
            ref = ref.to(got.dtype)
        diff = int((got != ref).sum())
        worst = max(worst, diff)
        lines.append(f"{name}: {diff} of {got.numel()} elements differ")
    what = "PEFT's merge_and_unload" if reference is not None else "torch round(W + (B@A)·s)"
    return f"vs {what}: " + ("bit-identical" if worst == 0 else "DIFFERENT") + " (" + "; ".join(lines) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=_default_workdir(), type=Path,
                        help="where the base, adapter and outputs go (a real disk, not tmpfs; default "
                             "$LORAHUB_BENCH_DIR, else /work/bench_merge when /work exists, else "
                             "<tmp>/lorahub_bench_merge)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 32 layers (default 1 = 7B)")
    for key in ("hidden", "intermediate", "layers", "vocab", "heads", "kv_heads"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="max shard size in GB (default 5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions (medians reported)")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--peft-repeat", type=int, default=1,
                        help="repetitions that also run PEFT (it is the slow baseline; default 1)")
    parser.add_argument("--peft-device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the last merged output")
    parser.add_argument("--peft-worker", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_worker:
        peft_worker(*args.peft_worker, args.peft_device)
        return

    sys.path.insert(0, str(REPO))
    import torch

    cfg = dict(LLAMA2_7B)
    cfg["layers"] = max(1, round(cfg["layers"] * args.scale))
    for key in cfg:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_bytes = sum(math.prod(s) * 2 for _, s in tensor_specs(cfg))
    free = shutil.disk_usage(work).free
    need = model_bytes * (3 if args.no_peft else 4) - (dir_bytes(work / "base") if (work / "base").exists() else 0)
    print(f"model: Llama-shaped {cfg}, bf16, {model_bytes / 1e9:.2f} GB; free disk {free / 1e9:.1f} GB", flush=True)
    if need > free:
        sys.exit(f"not enough disk: need ~{need / 1e9:.1f} GB under {work}; use --scale or --workdir")
    base = build_base(work / "base", cfg, int(args.shard_gb * 1e9))
    adapter = build_adapter(work / "adapter", base, cfg, args.rank, args.alpha)
    largest = max(math.prod(s) * 2 for n, s in tensor_specs(cfg) if n[: -len(".weight")].rsplit(".", 1)[-1] in TARGETS)

    mem_available = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    run_peft = not args.no_peft and model_bytes * 1.3 + 2e9 < mem_available
    env = dict(os.environ, LORAHUB_NO_PROGRESS="1", PYTHONPATH=str(REPO))
    results: dict[str, list[dict]] = {"copy": [], "lorahub": [], "peft": []}
    check = ""
    checks = []
    for rep in range(args.repeat):
        for kind in ("copy", "lorahub", "peft"):
            if kind == "peft" and (not run_peft or rep >= args.peft_repeat):
                continue
            out = work / f"out-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            time.sleep(3)  # let the deletes settle (ext4 online discard) before the clock starts
            if kind == "copy":
                r = timed(["cp", "-r", str(base), str(out)])
            elif kind == "lorahub":
                r = timed([sys.executable, "-m", "lorahub.cli", "merge", "--base", str(base), str(adapter),
                           "--out", str(out), "--device", args.device, "--json"], env=env)
                if r["rc"] == 0:
                    r["json"] = json.loads(r["stdout"])
            else:
                r = timed([sys.executable, str(Path(__file__).resolve()), "--peft-device", args.peft_device,
                           "--peft-worker", str(base), str(adapter), str(out)], env=env)
            if r["rc"] != 0:
                print(f"{kind} failed (rc {r['rc']}):\n{r['stderr']}", flush=True)
            results[kind].append(r)
            print(f"  rep {rep + 1} {kind:8s} {r['wall']:8.2f} s  peak RSS {r['rss'] / 1e9 if r['rss'] else 0:.2f} GB",
                  flush=True)
        peft_out = work / "out-peft"
        ok_peft = peft_out.exists() and results["peft"] and results["peft"][-1]["rc"] == 0
        if (work / "out-lorahub").exists():
            checks.append(check_against(work / "out-lorahub", peft_out if ok_peft else None, base, adapter, cfg,
                                        args.alpha, args.rank))
        for kind in ("copy", "peft") + (() if args.keep and rep == args.repeat - 1 else ("lorahub",)):
            shutil.rmtree(work / f"out-{kind}", ignore_errors=True)
    check = " | ".join(dict.fromkeys(checks))

    def med(kind: str) -> float | None:
        walls = [r["wall"] for r in results[kind] if r["rc"] == 0]
        return statistics.median(walls) if walls else None

    def spread(kind: str) -> str:
        walls = [r["wall"] for r in results[kind] if r["rc"] == 0]
        return f"{min(walls):.1f}–{max(walls):.1f}" if len(walls) > 1 else "-"

    copy_t, merge_t, peft_t = med("copy"), med("lorahub"), med("peft")
    merge_rss = max(r["rss"] or 0 for r in results["lorahub"])
    summary = results["lorahub"][-1].get("json", {})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print()
    print("=== lorahub merge benchmark ===")
    print(f"machine: {platform.machine()} {_cpu_model()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, GPU {gpu}, torch {torch.__version__}, RAM {_ram_gb():.0f} GB")
    print(f"model: {cfg['layers']} layers, hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, vocab "
          f"{cfg['vocab']}, bf16, {model_bytes / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards; "
          f"adapter r{args.rank} alpha {args.alpha:g} on {', '.join(TARGETS)} "
          f"({dir_bytes(adapter) / 1e6:.0f} MB fp32); largest touched tensor {largest / 1e6:.0f} MB")
    print(f"workdir: {work} on {_filesystem(work)}")
    print(f"device: {summary.get('device', args.device)}; repetitions: {args.repeat} (median, min–max); "
          f"times include `sync`; page cache: warm where the base fits in RAM beside the output")
    print(f"cp -r          {copy_t:8.2f} s  ({spread('copy')})  {model_bytes / copy_t / 1e9:.2f} GB/s")
    if merge_t is not None:
        print(f"lorahub merge  {merge_t:8.2f} s  ({spread('lorahub')})  {model_bytes / merge_t / 1e9:.2f} GB/s; "
              f"engine {summary.get('seconds', 0):.2f} s, changed {summary.get('tensors_changed')} tensors "
              f"({summary.get('bytes_computed', 0) / 1e9:.2f} GB computed)")
        print(f"  engine stage busy seconds: {summary.get('stage_seconds')}")
        print(f"  merge / copy = {merge_t / copy_t:.2f}  (target ≤ 2 on CPU, ≤ 1.3 on a GPU host)")
        print(f"  peak RSS {merge_rss / 1e9:.2f} GB  (target < 1.5 GB + largest tensor = "
              f"{(1.5e9 + largest) / 1e9:.2f} GB)")
    if peft_t is not None:
        peft_rss = max(r["rss"] or 0 for r in results["peft"])
        print(f"PEFT merge_and_unload + save_pretrained ({args.peft_device}) {peft_t:8.2f} s  ({spread('peft')}), "
              f"peak RSS {peft_rss / 1e9:.2f} GB")
        if merge_t:
            print(f"  PEFT / lorahub = {peft_t / merge_t:.2f}×  (target ≥ 3)")
    elif not args.no_peft:
        print(f"PEFT skipped: the model ({model_bytes / 1e9:.1f} GB) does not fit in available RAM "
              f"({mem_available / 1e9:.1f} GB) with headroom")
    print(f"correctness: {check}")


def _default_workdir() -> Path:
    import tempfile

    if os.environ.get("LORAHUB_BENCH_DIR"):
        return Path(os.environ["LORAHUB_BENCH_DIR"])
    if Path("/work").is_dir() and os.access("/work", os.W_OK):
        return Path("/work/bench_merge")
    return Path(tempfile.gettempdir()) / "lorahub_bench_merge"


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True).stdout.splitlines()[-1].split()
        return f"{out[0]} ({out[1]}, {out[2]})"
    except (OSError, IndexError):
        return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _ram_gb() -> float:
    try:
        return int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1e6
    except (OSError, AttributeError):
        return 0.0


if __name__ == "__main__":
    main()
