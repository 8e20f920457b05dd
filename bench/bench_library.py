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
  import          `python -c "import lorahub.cli"`: what the CLI costs before any work (with torch, if the
                  package still imports it)
The CLI is run through a wrapper that reports whether torch was imported in that process; the listing's
own time (`seconds` in its JSON: walk, index, headers, sort) is reported beside the process's. While the
package still imports torch when loaded (issue 11 §5), the same runs are repeated with `torch` replaced by
an inert stub module: what the process costs once it no longer does (faithful: the listing calls no torch
function, which tests/test_library.py checks; the output is checked identical).

    python bench/bench_library.py                       # 1,000 adapters, 3 cold and 5 warm runs
    python bench/bench_library.py --adapters 60 --small --cold-repeats 1 --repeats 1   # smoke test
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
           "    sys.stderr.write('\\nBENCH torch=%d\\n' % isinstance(sys.modules.get('torch'), type(sys)))\n")
# the same, with `torch` (and safetensors.torch) replaced by inert stub modules: what the process costs once
# nothing imports torch at the top (issue 11 §5). Faithful because the listing calls no torch function
# (tests/test_library.py::test_listing_runs_no_torch_code); the benchmark checks the output is identical.
STUB = """
import importlib.abc, importlib.machinery, sys, types

class _Anything:
    def __init__(self, name): self._name = name
    def __getattr__(self, name):
        if name.startswith('__') and name.endswith('__'): raise AttributeError(name)
        return _Anything(self._name + '.' + name)
    def __call__(self, *args, **kwargs): return _Anything(self._name + '()')
    def __mro_entries__(self, bases): return (object,)
    def __iter__(self): return iter(())
    def __bool__(self): return False

class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith('__') and name.endswith('__'): raise AttributeError(name)
        return _Anything(self.__name__ + '.' + name)

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == 'torch' or name.startswith('torch.') or name == 'safetensors.torch':
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        module = _Stub(spec.name)
        module.__path__ = []
        return module
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Finder())
"""


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


def run_list(root: Path, home: Path, stub: bool = False) -> tuple[float, dict, bool]:
    """(wall seconds, the JSON payload, torch imported) of one `lorahub list ROOT --json` process."""
    code = (STUB if stub else "") + WRAPPER
    elapsed, out, err = timed([sys.executable, "-c", code, "list", str(root), "--json"], _env(home), stdout=None)
    return elapsed, json.loads(out), "BENCH torch=1" in err


def _rows(payload: dict) -> tuple:
    return payload["adapters"], payload["problems"]


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

        # the same processes with torch stubbed out (issue 11 §5 emulated)
        stub_colds, stub_warms, same = [], [], True
        for i in range(args.cold_repeats):
            elapsed, stubbed, torch = run_list(root, work / f"home-stub-{i}", stub=True)
            stub_colds.append(elapsed)
            same &= _rows(stubbed) == _rows(after) and not torch
        for _ in range(args.repeats):
            elapsed, stubbed, torch = run_list(root, work / "home-stub-0", stub=True)
            stub_warms.append(elapsed)
            same &= _rows(stubbed) == _rows(after) and stubbed["index"]["read"] == 0 and not torch

        cold, warm_s = statistics.median(colds), statistics.median(warms)
        stub_cold, stub_warm = statistics.median(stub_colds), statistics.median(stub_warms)
        print(f"cold  (empty index)  {fmt(cold)} per process (median of {len(colds)}: "
              f"{', '.join(fmt(x) for x in colds)}); the listing itself {fmt(statistics.median(cold_inside))}")
        print(f"warm  (index)        {fmt(warm_s)} per process (median of {len(warms)}: "
              f"{', '.join(fmt(x) for x in warms)}); the listing itself {fmt(statistics.median(warm_inside))}")
        print(f"touched one file     {fmt(touched)} per process; headers read: {after['index']['read']}")
        print(f"torch imported by the listing process: {'YES (by the package, before the listing runs)' if torch_seen else 'no'}")
        print(f"torch stubbed out    cold {fmt(stub_cold)} ({', '.join(fmt(x) for x in stub_colds)}), warm "
              f"{fmt(stub_warm)} ({', '.join(fmt(x) for x in stub_warms)}); output identical: {'yes' if same else 'NO'}")
        print(f"RATIO cold / find {cold / find:.1f}x, warm / find {warm_s / find:.1f}x, "
              f"warm / python start-up {warm_s / start:.1f}x, cold / warm {cold / warm_s:.1f}x; without torch: "
              f"warm / python start-up {stub_warm / start:.1f}x, cold / warm {stub_cold / stub_warm:.1f}x")

        def verdict(value: float, target: float) -> str:
            return "met" if value <= target else "NOT met"

        print(f"TARGET cold <= {COLD_TARGET:.0f} s: {verdict(cold, COLD_TARGET)} ({fmt(cold)}), without torch "
              f"{verdict(stub_cold, COLD_TARGET)} ({fmt(stub_cold)}); warm <= {WARM_TARGET} s: "
              f"{verdict(warm_s, WARM_TARGET)} ({fmt(warm_s)}), without torch {verdict(stub_warm, WARM_TARGET)} "
              f"({fmt(stub_warm)})")
        ok = ok and same
        with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as handle:
            print(f"load average after: {handle.read().strip() or '?'}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
