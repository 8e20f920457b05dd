"""Start fast (issue 11 §5): the light commands never import torch (nor numpy, which torch brings).

`lorahub --help`, `validate`, `inspect` (`--headers-only`, and safetensors adapters without NaN/Inf),
`registry list/show/add/remove` and `pull`/`push` read JSON and safetensors headers (and, for the NaN/Inf
scan, raw bytes): each runs here in a fresh interpreter, as the `lorahub` console script runs it, and
the heavy modules in `sys.modules` when it exits are checked. Speed itself is measured by
`bench/bench_startup.py` (docs/performance.md), not asserted here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "lorahub" / "examples"
ADAPTER, BASE = EXAMPLES / "tiny-lora", EXAMPLES / "tiny-llama"
HEAVY = ("torch", "numpy", "safetensors.torch")

# the console script (pyproject: lorahub = "lorahub.cli:main"), writing the heavy modules imported by the
# time the process exits to $LORAHUB_TEST_MODULES
PROBE = f"""
import atexit, json, os, sys

def _record():
    with open(os.environ["LORAHUB_TEST_MODULES"], "w") as f:
        json.dump({{"heavy": [m for m in {HEAVY!r} if m in sys.modules], "cli": "lorahub.cli" in sys.modules}}, f)

atexit.register(_record)
from lorahub.cli import main
sys.exit(main())
"""


def run_probed(tmp_path: Path, *args, env: dict | None = None, cwd: Path | None = None,
               expect: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `lorahub ARGS` in a fresh interpreter; returns the process and the heavy modules it imported."""
    record = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    full = dict(os.environ if env is None else env)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [full.get("PYTHONPATH")])])
    full["LORAHUB_TEST_MODULES"] = str(record)
    full.setdefault("LORAHUB_HOME", str(tmp_path / "lorahub-home"))
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], env=full, cwd=cwd or tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    seen = json.loads(record.read_text())
    assert seen["cli"]
    return done, seen["heavy"]


LIGHT = [
    pytest.param(["--help"], 0, id="help"),
    pytest.param(["--version"], 0, id="version"),
    pytest.param(["validate", ADAPTER, "--base", BASE], 0, id="validate-dir"),
    pytest.param(["validate", ADAPTER, "--base", BASE / "model.safetensors", "--json"], 0, id="validate-file-json"),
    # a registry manifest: the tiny adapter does not fit Llama-3-8B (exit 1), the full report is built
    pytest.param(["validate", ADAPTER, "--base", "llama-3-8b"], 1, id="validate-registry"),
    pytest.param(["inspect", "--headers-only", ADAPTER], 0, id="inspect-headers-only"),
    pytest.param(["inspect", "--headers-only", "--json", "--all-layers", ADAPTER], 0, id="inspect-headers-only-json"),
    # hashes and the NaN/Inf scan read the data, still without torch (it counts NaN/Inf only when there are some)
    pytest.param(["inspect", ADAPTER], 0, id="inspect"),
    pytest.param(["registry", "list"], 0, id="registry-list"),
    pytest.param(["registry", "list", "--json"], 0, id="registry-list-json"),
    pytest.param(["registry", "show", "llama-3-8b"], 0, id="registry-show"),
    pytest.param(["pull", "--help"], 0, id="pull-help"),
    pytest.param(["push", "--help"], 0, id="push-help"),
    # every other command's --help: the CLI imports every command module, and none may pull torch in
    *[pytest.param([name, "--help"], 0, id=f"{name}-help")
      for name in ("convert", "merge", "unmerge", "resize", "blend", "interpolate", "demo", "list", "search", "rm")],
    # the adapter library: listing reads headers only (issue 15)
    pytest.param(["list", EXAMPLES], 0, id="list"),
    pytest.param(["list", EXAMPLES, "--json", "--fits", BASE], 0, id="list-fits"),
    # errors leave through the same light path
    pytest.param(["validate", ADAPTER, "--base", "no-such-model-anywhere"], 1, id="validate-error"),
    pytest.param(["inspect", "--headers-only", "no/such/adapter"], 1, id="inspect-error"),
]


@pytest.mark.parametrize("args, expect", LIGHT)
def test_light_command_imports_no_torch(tmp_path, args, expect):
    _, heavy = run_probed(tmp_path, *args, expect=expect, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert heavy == [], f"lorahub {' '.join(map(str, args))} imported {heavy}"


def test_registry_add_show_remove_import_no_torch(tmp_path):
    env = {**os.environ, "LORAHUB_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    for args in (["registry", "add", BASE, "--name", "tiny-llama"], ["registry", "show", "tiny-llama"],
                 ["validate", ADAPTER, "--base", "tiny-llama"], ["registry", "remove", "tiny-llama"]):
        _, heavy = run_probed(tmp_path, *args, env=env)
        assert heavy == [], f"lorahub {' '.join(map(str, args))} imported {heavy}"
    assert not (tmp_path / "home" / "registry" / "tiny-llama.json").exists()


def test_pull_and_push_import_no_torch(tmp_path, hub_server, hub_env):
    """A real pull (with its inspect report) and push (inspect, validate against a base, upload)
    against the test Hub."""
    repo_id = hub_server.new_repo_id(prefix="start-fast")
    hub_server.seed_repo(repo_id, {name: ADAPTER / name for name in ("adapter_config.json",
                                                                      "adapter_model.safetensors")})
    done, heavy = run_probed(tmp_path, "pull", repo_id, "--out", tmp_path / "pulled", env=dict(hub_env),
                             cwd=hub_env.cwd)
    assert heavy == [], f"pull imported {heavy}"
    assert "NaN/Inf" in done.stdout and (tmp_path / "pulled" / "adapter_model.safetensors").is_file()

    target = hub_server.new_repo_id(prefix="start-fast-push")
    done, heavy = run_probed(tmp_path, "push", ADAPTER, target, "--base", BASE,
                             env=dict(hub_env.with_token(hub_server.alice)), cwd=hub_env.cwd)
    assert heavy == [], f"push imported {heavy}"
    assert target in done.stdout


def test_nonfinite_values_are_still_found_and_counted(tmp_path, tiny_adapter_with_nan):
    """The scan's first pass runs without torch; a hit is counted with torch (which it then imports)."""
    done, heavy = run_probed(tmp_path, "inspect", "--json", tiny_adapter_with_nan, expect=1)
    payload = json.loads(done.stdout)
    assert payload["ok"] is False and payload["nonfinite"] == [
        {"key": "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "nan": 1, "inf": 2}]
    assert "torch" in heavy  # the probe sees torch when a command does import it


@pytest.fixture
def tiny_adapter_with_nan(tmp_path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "nan-lora"
    out.mkdir()
    (out / "adapter_config.json").write_bytes((ADAPTER / "adapter_config.json").read_bytes())
    tensors = load_file(ADAPTER / "adapter_model.safetensors")
    bad = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    bad.view(-1)[[3, 10, 11]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def test_library_imports_no_torch(tmp_path):
    """Importing lorahub's modules (the CLI's, the formats, blend's method registry, lowrank) and reading
    an adapter's headers imports no torch; torch arrives with the first tensor."""
    code = f"""
import sys
import lorahub, lorahub.cli, lorahub.formats, lorahub.blend, lorahub.lowrank, lorahub.devices, lorahub.inspect
from lorahub.formats import load_adapter
from lorahub.base import load_base
from lorahub.validate import validate
adapter = load_adapter({str(ADAPTER)!r})
assert validate(adapter, load_base({str(BASE)!r})).ok
assert lorahub.blend.method_names() and lorahub.formats.FORMATS
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
layer = next(iter(adapter.layers.values()))
layer.A.load()
print("torch" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True"]


def test_lazy_module_and_dict():
    from lorahub.lazy import LazyDict, LazyModule

    module = LazyModule("json")
    assert module.dumps([1]) == "[1]" and "dumps" in vars(module)  # imported, then a plain attribute
    built = []
    table = LazyDict(lambda: built.append(1) or {"a": 1})
    assert built == []
    assert table["a"] == 1 and table.get("b") is None and "a" in table and dict(table) == {"a": 1}
    assert len(table) == 1 and built == [1]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"])
def test_has_nonfinite_matches_torch(dtype):
    """The torch-free first pass of the NaN/Inf scan agrees with torch.isfinite on every bit pattern of
    the 8- and 16-bit float dtypes and on special and random values of the wider ones."""
    import torch

    from lorahub.adapter import TORCH_TO_ST
    from lorahub.inspect import has_nonfinite

    torch_dtype = getattr(torch, dtype)
    size = torch.empty((), dtype=torch_dtype).element_size()
    if size <= 2:
        bits = torch.arange(1 << (8 * size), dtype=torch.int32).to(torch.int16 if size == 2 else torch.uint8)
    else:
        generator = torch.Generator().manual_seed(0)
        bits = torch.randint(-(1 << 62), 1 << 62, (4096,), generator=generator, dtype=torch.int64)
        bits = bits.view(torch.int32) if size == 4 else bits
        specials = torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf"), float("nan"),
                                 torch.finfo(torch_dtype).max, torch.finfo(torch_dtype).tiny], dtype=torch_dtype)
        bits = torch.cat([bits, specials.view(bits.dtype)])
    values = bits.view(torch_dtype)
    expected = ~torch.isfinite(values.float() if size == 1 else values)
    name = TORCH_TO_ST[torch_dtype]
    raw = bytearray(bits.numpy().tobytes())
    got = [has_nonfinite(raw[i * size:(i + 1) * size], name) for i in range(len(values))]
    assert got == expected.tolist()
    assert has_nonfinite(raw, name) == bool(expected.any())
