"""Benchmark: `lorahub inspect` of an adapter whose safetensors header has 300,000 entries.

The adapter is generated (not timed): tiny factors (rank 1, 8 wide, fp16, random finite values) under
realistic names, written straight as safetensors bytes (JSON header + data; safetensors' own writer
takes ~30 s for 300,000 tensors):
  --format peft   (default) a PEFT directory: 150,000 Llama-style modules
                  (`base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A/B.weight`)
  --format kohya  one kohya file: 100,000 SDXL-style modules (`lora_unet_…` / `lora_te*_…`), each with
                  lora_down, lora_up and an fp16 `.alpha` scalar
The header is ~30–40 MB of JSON.

Timed, in one run:
  lorahub inspect (in process)  `inspect_adapter(path)`: read the adapter, describe it, hashes, the
                                NaN/Inf scan of every tensor — with the number of header parses
                                (every parse goes through `storage.parse_header_bytes`, counted
                                here) and of safetensors `safe_open` calls, the open-file cache
                                emptied before each run; then the same stages timed one by one
  CLI                           `python -m lorahub.cli inspect PATH` in a fresh process
  legacy loader (baseline)      the loader lorahub had before the file cache: one `safe_open` per
                                tensor, i.e. one header parse per tensor. At ~0.1 s per parse of this
                                header only --legacy-samples tensors are read and the per-tensor cost
                                is scaled to the tensors inspect reads (an ESTIMATE, marked so)

    python bench/bench_header.py                    # PEFT, 300,000 entries
    python bench/bench_header.py --format kohya     # kohya names (the reader guesses dotted names)
    python bench/bench_header.py --entries 3000     # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import print_cpu_model, sdxl_kohya_modules

from lorahub import storage
from lorahub.formats import load_adapter
from lorahub.inspect import describe, inspect_adapter, scan_nonfinite

REPO = Path(__file__).resolve().parents[1]
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_safetensors(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str],
                      seed: int = 0) -> int:
    """Write (name, dtype, shape) entries with random finite values; returns the header length."""
    itemsize = {"F16": 2, "F32": 4}
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = int(np.prod(shape)) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = (np.random.default_rng(seed).standard_normal(offset // 2) * 0.1).astype(np.float16).tobytes()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.write(data)
    return len(raw)


def make_peft(root: Path, entries: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    modules = entries // 2
    rows = []
    for i in range(modules):
        target = f"base_model.model.model.layers.{i // len(PROJ)}.{PROJ[i % len(PROJ)]}"
        rows.append((f"{target}.lora_A.weight", "F16", (1, 8)))
        rows.append((f"{target}.lora_B.weight", "F16", (8, 1)))
    header_len = write_safetensors(root / "adapter_model.safetensors", rows, {"format": "pt"})
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": sorted({p.split(".")[1] for p in PROJ}),
              "base_model_name_or_path": "synthetic/header-stress", "task_type": "CAUSAL_LM"}
    (root / "adapter_config.json").write_text(json.dumps(config))
    return header_len


def make_kohya(path: Path, entries: int) -> int:
    names = [name for name, _, _ in sdxl_kohya_modules()]
    rows = []
    for i in range(entries // 3):
        name = names[i % len(names)] + (f"_{i // len(names)}" if i >= len(names) else "")
        rows.append((f"{name}.lora_down.weight", "F16", (1, 8)))
        rows.append((f"{name}.lora_up.weight", "F16", (8, 1)))
        rows.append((f"{name}.alpha", "F16", ()))
    return write_safetensors(path, rows, {"ss_network_module": "networks.lora", "ss_network_dim": "1"})


class Counters:
    """Counts header parses and safetensors safe_open calls while active."""

    def __init__(self):
        self.parses = 0
        self.safe_opens = 0

    def __enter__(self):
        import safetensors

        self._parse, self._safe_open = storage.parse_header_bytes, safetensors.safe_open

        def parse(*args, **kwargs):
            self.parses += 1
            return self._parse(*args, **kwargs)

        def safe_open(*args, **kwargs):
            self.safe_opens += 1
            return self._safe_open(*args, **kwargs)

        storage.parse_header_bytes, safetensors.safe_open = parse, safe_open
        return self

    def __exit__(self, *exc):
        import safetensors

        storage.parse_header_bytes, safetensors.safe_open = self._parse, self._safe_open


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=300_000, help="header entries (default 300,000)")
    ap.add_argument("--format", choices=["peft", "kohya"], default="peft", help="adapter format (default peft)")
    ap.add_argument("--repeats", type=int, default=3, help="in-process inspect runs (best and median)")
    ap.add_argument("--cli-repeats", type=int, default=2, help="fresh-process CLI runs (0 = skip)")
    ap.add_argument("--legacy-samples", type=int, default=10, help="tensors read with the legacy loader (0 = skip)")
    ap.add_argument("--workdir", default=None, help="where the generated files go (default: a temporary dir)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    print("== lorahub inspect benchmark: a safetensors header with many entries ==")
    print(f"python {platform.python_version()}, torch {torch.__version__}, cpu_count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f} (at start)")
    cpu = print_cpu_model()
    with tempfile.TemporaryDirectory(prefix="lorahub-bench-", dir=args.workdir) as tmp:
        t = time.perf_counter()
        if args.format == "peft":
            target = Path(tmp) / "peft"
            header_len = make_peft(target, args.entries)
            weights = target / "adapter_model.safetensors"
        else:
            target = weights = Path(tmp) / "kohya.safetensors"
            header_len = make_kohya(weights, args.entries)
        print(f"adapter: {args.format}, {args.entries:,} header entries, header {header_len / 1e6:.1f} MB, file "
              f"{weights.stat().st_size / 1e6:.1f} MB (written in {time.perf_counter() - t:.1f} s, not timed)")

        totals, counts = [], []
        for _ in range(max(1, args.repeats)):
            storage.close_open_files()  # every run starts cold: the header is read and parsed again
            with Counters() as counter:
                t = time.perf_counter()
                info = inspect_adapter(target)
                totals.append(time.perf_counter() - t)
            counts.append((counter.parses, counter.safe_opens))
        assert info["nonfinite"] == [] and info["modules"] == args.entries // (2 if args.format == "peft" else 3)
        tensors_read = sum(2 for _ in info["layers"])

        del info
        storage.close_open_files()
        stages = {}
        paused = storage.gc_paused()  # as inspect_adapter does
        paused.__enter__()
        t = time.perf_counter()
        adapter = load_adapter(target)
        stages["read adapter (header parse + names + alphas)"] = time.perf_counter() - t
        t = time.perf_counter()
        header = storage.cached_header(weights)
        stages["  of which: a second cached_header() lookup"] = time.perf_counter() - t
        t = time.perf_counter()
        describe(adapter, read_data=False)
        stages["describe"] = time.perf_counter() - t
        t = time.perf_counter()
        storage.file_hashes(weights)
        stages["hashes (sha256, sshs data hash)"] = time.perf_counter() - t
        t = time.perf_counter()
        scan_nonfinite(adapter)
        stages[f"NaN/Inf scan ({tensors_read:,} tensors read)"] = time.perf_counter() - t
        paused.__exit__(None, None, None)
        del adapter
        storage.close_open_files()
        raw = weights.read_bytes()[8:8 + header_len]
        t = time.perf_counter()
        storage.parse_header_bytes(raw, weights, None)
        parse_s = time.perf_counter() - t
        assert len(header.tensors) == args.entries

        cli = []
        for _ in range(args.cli_repeats):
            env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lorahub.cli", "inspect", str(target)], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cli.append(time.perf_counter() - t)

        legacy_per_tensor = None
        if args.legacy_samples > 0:
            from safetensors import safe_open

            keys = list(header.tensors)[:: max(1, len(header.tensors) // args.legacy_samples)][:args.legacy_samples]
            t = time.perf_counter()
            for key in keys:
                with safe_open(str(weights), framework="pt") as handle:
                    handle.get_tensor(key)
            legacy_per_tensor = (time.perf_counter() - t) / len(keys)

        loads = args.entries  # the factors in the scan, plus the alphas (kohya) read at load
        print(f"\n{'':<46} {'best':>9} {'median':>9}")
        print(f"{'lorahub inspect, in process':<46} {min(totals):>8.2f}s {statistics.median(totals):>8.2f}s   "
              f"header parses {counts[0][0]} (every run: {sorted({c[0] for c in counts})}), "
              f"safe_open calls {counts[0][1]}")
        for name, seconds in stages.items():
            print(f"  {name:<44} {seconds:>8.2f}s")
        print(f"  {'(one parse_header_bytes of this header)':<44} {parse_s:>8.2f}s")
        if cli:
            print(f"{'lorahub inspect, CLI (fresh process)':<46} {min(cli):>8.2f}s {statistics.median(cli):>8.2f}s")
        if legacy_per_tensor is not None:
            estimate = legacy_per_tensor * loads
            print(f"{'legacy loader (safe_open per tensor)':<46} {estimate:>8.0f}s {'':>9}   ESTIMATED: "
                  f"{legacy_per_tensor * 1e3:.0f} ms per tensor (header parsed each time) × {loads:,} tensor "
                  f"reads; {estimate / min(totals):,.0f}× lorahub")
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({
                "machine": cpu, "format": args.format, "entries": args.entries, "header_bytes": header_len,
                "inspect_best_s": min(totals), "inspect_median_s": statistics.median(totals),
                "header_parses": counts[0][0], "safe_open_calls": counts[0][1], "stages_s": stages,
                "parse_s": parse_s, "cli_best_s": min(cli) if cli else None,
                "legacy_estimate_s": legacy_per_tensor * loads if legacy_per_tensor else None}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
