"""The README's first command: `lorahub demo` on the bundled example."""
from __future__ import annotations

import json

from cli_runner import run_cli


def test_demo_runs_every_step(tmp_path):
    result = run_cli("demo", "--workdir", tmp_path / "demo", "--json", check=True)
    payload = json.loads(result.stdout)
    steps = [step["step"] for step in payload["steps"]]
    assert steps == ["inspect", "validate", "validate (wrong base)", "convert", "merge", "unmerge", "resize",
                     "interpolate"]
    numbers = payload["numbers"]
    assert numbers["validate_ok"] is True
    assert numbers["convert_max_error"] == 0.0
    assert numbers["merge_tensors_changed"] == 14
    assert numbers["unmerge_max_error"] < 1e-6
    assert 0.0 < numbers["resize_mean_energy"] < 1.0
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()


def test_bundled_example_is_packaged():
    from lorahub.demo import example_paths

    base, adapter = example_paths()
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
