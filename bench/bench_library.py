"""Benchmark: `lorahub list` of a generated library of 1,000 adapters, cold and warm, in fresh processes.

The library (`bench/make_library.py`, not timed): 35% PEFT folders (Llama-2-7B shapes, 64–224 modules),
30% kohya SD 1.5 files (264 modules), 15% kohya SDXL UNet files (722 modules), 10% diffusers SDXL files,
5% LyCORIS LoHa, 5% PEFT checkpoints one folder deeper; in nested folders, with base-model shards,
corrupt files, hard links and symlinks beside them. Headers are real-sized (kohya SDXL: 2,166 entries);
data sections are holes (sparse files).

Timed, each in a fresh `python` process:
  cold            `lorahub list ROOT --json` with an empty LORAHUB_HOME: every header read and indexed
  warm            the same again: the index answers, no header is read
  touched         after changing one file's mtime: one header read
Baselines measured in the same run:
  python start-up `python -c pass`
  find            `find ROOT -printf '%s %T@ %p'`: walking and stat-ing the same tree
  import          `python -c "import lorahub.cli"`: what the CLI costs before any work
The CLI is run through a wrapper that reports whether torch was imported in that process; the listing's
own time (`seconds` in its JSON: walk, index, headers, sort) is reported beside the process's.

    python bench/bench_library.py                       # 1,000 adapters, 3 cold and 5 warm runs
    python bench/bench_library.py --adapters 40 --small --cold-repeats 1 --repeats 1   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_library import make_library  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLD_TARGET, WARM_TARGET = 5.0, 0.5
# runs the real CLI, then says on stderr whether torch was imported in this process
WRAPPER = ("import sys, runpy\n"
           "sys.argv = ['lorahub'] + sys.argv[1:]\n"
           "try:\n"
           "    runpy.run_module('lorahub.cli', run_name='__main__', alter_sys=True)\n"
           "finally:\n"
           "    sys.stderr.write('\\nBENCH torch=%d\\n' % ('torch' in sys.modules))\n")


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["LORAHUB_HOME"] = str(home)
    env["LORAHUB_NO_PROGRESS"] = "1"
    env.pop("LORAHUB_LIBRARY", None)
    return env


def timed(cmd: list[str], env: dict[str, str] | None = None, stdout=subprocess.DEVNULL) -> tuple[float, str, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if stdout is None else stdout,
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout or "", proc.stderr


def run_list(root: Path, home: Path) -> tuple[float, dict, bool]:
    """(wall seconds, the JSON payload, torch imported) of one `lorahub list ROOT --json` process."""
    elapsed, out, err = timed([sys.executable, "-c", WRAPPER, "list", str(root), "--json"], _env(home), stdout=None)
    return elapsed, json.loads(out), "BENCH torch=1" in err


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--small", action="store_true", help="few modules per adapter (smoke test)")
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="warm runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp dir)")
    args = parser.parse_args(argv)

    print(f"python {platform.python_version()}, {platform.platform()}")
    try:
        print(f"cpus usable: {len(os.sched_getaffinity(0))} (machine: {os.cpu_count()})")
    except AttributeError:
        print(f"cpus: {os.cpu_count()}")
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as handle:
        load = handle.read().strip()
    print(f"load average before: {load or '?'}")

    work = Path(tempfile.mkdtemp(prefix="lorahub-bench-library-", dir=args.workdir))
    try:
        root = work / "library"
        t0 = time.perf_counter()
        manifest = make_library(root, args.adapters, small=args.small)
        gen = time.perf_counter() - t0
        files = sum(1 for _ in root.rglob("*") if _.is_file())
        header_bytes = sum(min(p.stat().st_blocks * 512, p.stat().st_size) for p in root.rglob("*.safetensors")
                           if p.is_file() and not p.is_symlink())
        print(f"library: {len(manifest['adapters'])} adapters ({files} files, {header_bytes / 1e6:.0f} MB on disk: "
              f"headers; data sections are holes), {len(manifest['aliases'])} links, {len(manifest['problems'])} "
              f"corrupt, {len(manifest['others'])} base shards; generated in {gen:.1f} s")

        # baselines
        start = statistics.median(timed([sys.executable, "-c", "pass"])[0] for _ in range(5))
        find = statistics.median(timed(["find", str(root), "-printf", "%s %T@ %p\\n"])[0] for _ in range(5))
        imports = statistics.median(timed([sys.executable, "-c", "import lorahub.cli"], _env(work / "h0"))[0]
                                    for _ in range(3))
        print(f"baseline python start-up {fmt(start)}, find+stat of the tree {fmt(find)}, "
              f"`import lorahub.cli` {fmt(imports)}")

        colds, cold_inside, torch_seen = [], [], False
        payload: dict = {}
        for i in range(args.cold_repeats):
            home = work / f"home-cold-{i}"
            elapsed, payload, torch = run_list(root, home)
            colds.append(elapsed)
            cold_inside.append(payload["seconds"])
            torch_seen |= torch
            assert payload["index"]["reused"] == 0, payload["index"]
        listed = len(payload["adapters"])
        ok = listed == len(manifest["adapters"]) and len(payload["problems"]) == len(manifest["problems"])
        print(f"listed {listed} adapters, {len(payload['problems'])} problems, "
              f"{payload['index']['read']} headers read: {'as generated' if ok else 'MISMATCH'}")

        home = work / "home-cold-0"
        warms, warm_inside = [], []
        for _ in range(args.repeats):
            elapsed, warm, torch = run_list(root, home)
            warms.append(elapsed)
            warm_inside.append(warm["seconds"])
            torch_seen |= torch
            assert warm["index"]["read"] == 0 and len(warm["adapters"]) == listed, warm["index"]
        touched_file = next(iter(sorted(root.rglob("*.safetensors"))))
        os.utime(touched_file, None)
        touched, after, _ = run_list(root, home)

        cold, warm_s = statistics.median(colds), statistics.median(warms)
        print(f"cold  (empty index)  {fmt(cold)} per process (median of {len(colds)}: "
              f"{', '.join(fmt(x) for x in colds)}); the listing itself {fmt(statistics.median(cold_inside))}")
        print(f"warm  (index)        {fmt(warm_s)} per process (median of {len(warms)}: "
              f"{', '.join(fmt(x) for x in warms)}); the listing itself {fmt(statistics.median(warm_inside))}")
        print(f"touched one file     {fmt(touched)} per process; headers read: {after['index']['read']}")
        print(f"torch imported by the listing process: {'YES' if torch_seen else 'no'}")
        print(f"RATIO cold / find {cold / find:.1f}x, warm / find {warm_s / find:.1f}x, "
              f"warm / python start-up {warm_s / start:.1f}x, cold / warm {cold / warm_s:.1f}x")
        print(f"TARGET cold <= {COLD_TARGET:.0f} s: {'met' if cold <= COLD_TARGET else 'NOT met'} ({fmt(cold)}); "
              f"warm <= {WARM_TARGET} s: {'met' if warm_s <= WARM_TARGET else 'NOT met'} ({fmt(warm_s)})")
        with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as handle:
            print(f"load average after: {handle.read().strip() or '?'}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
