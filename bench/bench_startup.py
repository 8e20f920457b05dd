"""Benchmark: how long the light `lorahub` commands take to start and finish, in fresh processes.

Each command runs as the `lorahub` console script does (`from lorahub.cli import main; main()`) in a
new interpreter started in the checkout (so the checkout's `lorahub` is imported, not an installed
one), `--repeats` times; the best and median wall times are printed next to the baselines timed in
the same run: `python -c pass` (the interpreter alone) and `python -c "import torch"` (what every
command paid while lorahub imported torch at startup). One extra run of each command, untimed,
records which heavy modules it imported (torch, numpy, safetensors.torch, huggingface_hub).

The light commands:

  lorahub --help
  lorahub validate tiny-lora --base tiny-llama        the bundled example, headers only (exit 0)
  lorahub validate tiny-lora --base llama-3-8b        a registry manifest (the tiny adapter does not
                                                      fit it: exit 1, the full report is still built)
  lorahub inspect --headers-only tiny-lora
  lorahub registry list / registry show llama-3-8b
  lorahub pull --help / push --help

and `lorahub inspect tiny-lora`, whose hashes and NaN/Inf scan read the tensor data (without torch,
which it imports only to count NaN/Inf values where there are some).

    python bench/bench_startup.py                 # 10 runs of each
    python bench/bench_startup.py --repeats 3     # quicker
    python bench/bench_startup.py --repeats 1 --commands help --no-torch-reference   # smoke test
    python bench/bench_startup.py --repo ../other-checkout   # time another checkout's lorahub (before/after)

Bytecode: an installed lorahub has its `.pyc` files; a checkout run with PYTHONDONTWRITEBYTECODE=1
compiles every lorahub module at every start. By default (`--bytecode cached`) the processes write and
read their bytecode under a temporary PYTHONPYCACHEPREFIX (nothing is written into the checkout), and
the untimed first run of each command fills it; `--bytecode as-is` keeps the environment's settings.

Timings on a shared machine are noisy: the best of several runs is the figure to compare; the
median shows the noise.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "safetensors.torch", "huggingface_hub")

# the console script's code (pyproject: lorahub = "lorahub.cli:main")
ENTRY = "import sys; from lorahub.cli import main; sys.exit(main())"
# the same, recording the heavy modules in sys.modules when the process exits (to $LORAHUB_BENCH_MODULES)
PROBE = ("import atexit, json, os, sys\n"
         "def _record():\n"
         "    with open(os.environ['LORAHUB_BENCH_MODULES'], 'w') as f:\n"
         f"        json.dump([m for m in {HEAVY!r} if m in sys.modules], f)\n"
         "atexit.register(_record)\n" + ENTRY)



def commands(repo: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (arguments, the exit status expected)."""
    adapter, base = str(repo / "lorahub/examples/tiny-lora"), str(repo / "lorahub/examples/tiny-llama")
    return {
        "help": (["--help"], 0),
        "validate-dir": (["validate", adapter, "--base", base], 0),
        "validate-registry": (["validate", adapter, "--base", "llama-3-8b"], 1),
        "inspect-headers": (["inspect", "--headers-only", adapter], 0),
        "registry-list": (["registry", "list"], 0),
        "registry-show": (["registry", "show", "llama-3-8b"], 0),
        "pull-help": (["pull", "--help"], 0),
        "push-help": (["push", "--help"], 0),
        "inspect-data": (["inspect", adapter], 0),  # hashes and the NaN/Inf scan: reads all tensor data
    }


def environment(repo: Path, pycache: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
    env["NO_COLOR"] = "1"
    return env


def run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.stderr.write(done.stderr.decode(errors="replace"))
    return elapsed, done.returncode


def time_command(argv: list[str], env: dict[str, str], cwd: Path, repeats: int) -> tuple[list[float], set[int]]:
    times, codes = [], set()
    run(argv, env, cwd)  # warm the page cache (the .pyc files of whatever it imports)
    for _ in range(repeats):
        elapsed, code = run(argv, env, cwd)
        times.append(elapsed)
        codes.add(code)
    return times, codes


def imported_modules(args: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "modules.json"
        subprocess.run([sys.executable, "-c", PROBE, *args], env={**env, "LORAHUB_BENCH_MODULES": str(record)},
                       cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(record.read_text()) if record.exists() else ["?"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per command (default 10)")
    names = list(commands(REPO))
    parser.add_argument("--commands", default=",".join(names), help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="the checkout whose lorahub is timed (default: this one)")
    parser.add_argument("--bytecode", choices=("cached", "as-is"), default="cached",
                        help="cached: .pyc files under a temporary PYTHONPYCACHEPREFIX, as an installed package "
                             "has them (default); as-is: the environment's settings")
    parser.add_argument("--no-torch-reference", action="store_true", help="leave out the `import torch` row")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    table = commands(repo)
    chosen = [name.strip() for name in args.commands.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in table]
    if unknown:
        parser.error(f"unknown command(s): {', '.join(unknown)}")
    if not (repo / "lorahub" / "cli.py").is_file():
        parser.error(f"no lorahub checkout at {repo}")
    with tempfile.TemporaryDirectory(prefix="lorahub-bench-pycache-") as pycache:
        env = environment(repo, pycache if args.bytecode == "cached" else None)
        bytecode = ("cached (PYTHONPYCACHEPREFIX)" if args.bytecode == "cached" else
                    "as the environment has it" + (" (PYTHONDONTWRITEBYTECODE=1: lorahub compiled at every start)"
                                                   if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""))
        print(f"lorahub from {repo}; bytecode {bytecode}")
        report(repo, table, chosen, env, args.repeats, torch_reference=not args.no_torch_reference)
    return 0


def report(repo: Path, table: dict[str, tuple[list[str], int]], chosen: list[str], env: dict[str, str],
           repeats: int, *, torch_reference: bool = True) -> None:
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; {repeats} runs each, "
          f"after one untimed run")
    rows: list[tuple[str, list[float], str, str]] = []
    baseline, _ = time_command([sys.executable, "-c", "pass"], env, repo, repeats)
    rows.append(("python -c pass", baseline, "", ""))
    if torch_reference:
        torch_times, _ = time_command([sys.executable, "-c", "import torch"], env, repo, repeats)
        rows.append(("python -c 'import torch'", torch_times, "", "torch"))
    for name in chosen:
        command, expected = table[name]
        times, codes = time_command([sys.executable, "-c", ENTRY, *command], env, repo, repeats)
        status = ",".join(map(str, sorted(codes)))
        if codes != {expected}:
            status += f" (expected {expected})"
        shown = " ".join(Path(a).name if a.startswith(str(repo)) else a for a in command)
        rows.append((f"lorahub {shown}", times, status, ", ".join(imported_modules(command, env, repo)) or "none"))
    floor = min(baseline)
    width = max(len(row[0]) for row in rows)
    print(f"{'command':<{width}}  {'best':>7}  {'median':>7}  {'best − python':>13}  exit  heavy modules imported")
    for label, times, status, heavy in rows:
        print(f"{label:<{width}}  {min(times):6.3f}s  {statistics.median(times):6.3f}s  "
              f"{min(times) - floor:12.3f}s  {status:>4}  {heavy}")


if __name__ == "__main__":
    sys.exit(main())
