"""`lorahub demo`: the bundled tiny base model and adapter walked through every command."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file

EXAMPLES = Path(__file__).parent / "examples"


def example_paths() -> tuple[Path, Path]:
    return EXAMPLES / "tiny-llama", EXAMPLES / "tiny-lora"


Say = Callable[[str, Sequence[str], str], None]


def run_demo(workdir: Path, say: Say) -> dict:
    """Run every step in `workdir`; `say(title, argv, text)` reports each one: the command line the step
    stands for (`["lorahub", …]`, real paths: the bundled example, read where it is installed, and the
    outputs in `workdir`), then what it found. Run in order, those command lines redo the demo.
    Returns the key numbers."""
    from .base import load_base
    from .blend import interpolate
    from .convert import convert_adapter
    from .formats import load_adapter, save_adapter
    from .inspect import describe
    from .merge import AdapterInput, merge, unmerge
    from .resize import resize_adapter
    from .validate import validate

    base_dir, adapter_dir = (path.resolve() for path in example_paths())
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    numbers: dict = {}

    adapter = load_adapter(adapter_dir)
    info = describe(adapter)
    say("inspect", ["lorahub", "inspect", str(adapter_dir)],
        f"  {info['format']} adapter for {info['base_model']}: {info['modules']} modules, rank {info['rank']}, "
        f"alpha {info['alpha']}, scale {info['scale']}, targets "
        + ", ".join(f"{k} ×{v}" for k, v in info["targets"].items())
        + f"\n  sha256 {info['files'][0]['hashes']['sha256'][:16]}…, NaN/Inf: "
        + ("none" if not info["nonfinite"] else str(len(info["nonfinite"]))))

    report = validate(adapter, load_base(str(base_dir)))
    numbers["validate_ok"] = report.ok
    say("validate", ["lorahub", "validate", str(adapter_dir), "--base", str(base_dir)], f"  {report.summary}")
    wrong = validate(adapter, load_base("llama-2-7b"))
    first = wrong.errors[0] if wrong.errors else None
    say("validate (wrong base)", ["lorahub", "validate", str(adapter_dir), "--base", "llama-2-7b"],
        f"  {wrong.summary}\n"
        + (f"  e.g. {first.module}: expected {first.expected}, found {first.found}\n" if first else "")
        + "  (llama-2-7b is an offline registry manifest; this check exits 1)")

    kohya_file = workdir / "tiny-lora.safetensors"
    convert_adapter(load_adapter(adapter_dir), kohya_file, "kohya", overwrite=True)
    back = load_adapter(kohya_file)
    worst = max(float((back.layers[t].delta_weight() - layer.delta_weight()).abs().max())
                for t, layer in adapter.layers.items())
    numbers["convert_max_error"] = worst
    say("convert", ["lorahub", "convert", str(adapter_dir), "--to", "kohya", "--out", str(kohya_file)],
        f"  {len(back.layers)} modules in kohya's layout; largest |ΔW| difference after the round "
        f"trip: {worst:.1e}")

    merged_dir = workdir / "merged"
    result = merge(base_dir, [AdapterInput(adapter, 1.0, adapter_dir.name)], merged_dir, device="cpu",
                   overwrite=True)
    base_state = load_file(str(base_dir / "model.safetensors"))
    merged_state = load_file(str(merged_dir / "model.safetensors"))
    changed = sum(not torch.equal(base_state[k], merged_state[k]) for k in base_state)
    numbers["merge_tensors_changed"] = result.tensors_changed
    say("merge", ["lorahub", "merge", "--base", str(base_dir), str(adapter_dir), "--out", str(merged_dir),
                  "--device", "cpu"],
        f"  {result.tensors_changed} tensors changed ({changed} differ from the base on disk), "
        f"{result.tensors_copied} copied byte for byte; ΔW in fp32, rounded once")

    restored_dir = workdir / "restored"
    undo = unmerge(merged_dir, [AdapterInput(load_adapter(adapter_dir), 1.0, adapter_dir.name)], restored_dir,
                   device="cpu", overwrite=True)
    restored = load_file(str(restored_dir / "model.safetensors"))
    drift = max(float((restored[k].float() - base_state[k].float()).abs().max()) for k in base_state)
    numbers["unmerge_max_error"] = drift
    say("unmerge", ["lorahub", "unmerge", "--base", str(merged_dir), str(adapter_dir), "--out", str(restored_dir),
                    "--device", "cpu"],
        f"  largest difference from the original base: {drift:.1e}" + (" (exact restore)" if undo.exact else ""))

    small, resize_report = resize_adapter(load_adapter(adapter_dir), rank=4, device="cpu")
    small_dir = save_adapter(small, workdir / "tiny-lora-r4", "peft", overwrite=True)
    summary = resize_report.summary()
    numbers["resize_mean_energy"] = summary["mean_energy_retained"]
    say("resize", ["lorahub", "resize", str(adapter_dir), "--rank", "4", "--out", str(small_dir), "--device", "cpu"],
        f"  {summary['resized']} layers 8 → 4 by exact SVD of the factors; energy kept: mean "
        f"{summary['mean_energy_retained']:.1%}, worst {summary['worst_energy_retained']:.1%}; "
        f"{summary['old_params']:,} → {summary['new_params']:,} parameters")

    blended = interpolate(load_adapter(adapter_dir), load_adapter(small_dir), 0.5, method="cat", device="cpu")
    blend_dir = save_adapter(blended.adapter, workdir / "tiny-lora-mix", "peft", overwrite=True)
    ranks = sorted({layer.rank for layer in blended.adapter.layers.values()})
    say("interpolate", ["lorahub", "interpolate", str(adapter_dir), str(small_dir), "-t", "0.5", "--method", "cat",
                        "--out", str(blend_dir), "--device", "cpu"],
        f"  exact 0.5·A + 0.5·B: rank {ranks[0]} per layer (8 + 4)")
    return numbers
