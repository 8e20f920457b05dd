"""`lorahub inspect PATH`."""
from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from ..inspect import inspect_adapter, nonfinite_error
from ..options import adapter_input_options, all_layers_option, given_alpha, json_option, resolve_path
from ..ui import console, error_line, error_payload, human_bytes, ok_payload, plain, print_json, table


@click.command("inspect")
@click.argument("path")
@adapter_input_options
@all_layers_option(help="Print the per-layer table (every layer).")
@click.option("--spectrum", is_flag=True,
              help="Singular values of every layer (exact, from the factors) and its effective rank "
                   "(how many singular values carry 99% of the energy).")
@click.option("--headers-only", is_flag=True, help="Read safetensors headers only: no hashes, no NaN/Inf scan.")
@json_option
@click.pass_context
def inspect_command(ctx, path, input_format, allow_pickle, all_layers, spectrum, headers_only, as_json):
    """Describe an adapter: format, base model, ranks, alphas, scales, targets, hashes, NaN/Inf.

    PATH is a PEFT directory, a kohya/A1111, diffusers or LyCORIS .safetensors file, or
    hf://owner/name[@revision][/file].

    \b
    Examples:
      lorahub inspect ./my-lora/
      lorahub inspect style.safetensors --all-layers
      lorahub inspect hf://alice/llama-lora@v1 --json
    """
    info = inspect_adapter(resolve_path(path), format=None if input_format == "auto" else input_format,
                           allow_pickle=allow_pickle, read_data=not headers_only, spectrum=spectrum,
                           alpha=given_alpha(ctx))
    problem = nonfinite_error(info)
    if as_json:
        print_json(inspect_payload(info, problem))
    else:
        render(info, show_layers=all_layers or spectrum)
    if problem is not None:
        error_line(str(problem))
        ctx.exit(1)


def inspect_payload(info: dict, problem: Exception | None = None) -> dict:
    """inspect's dict as JSON (docs/json.md): `ok` first, `params` for the parameter count; NaN/Inf
    values make it a failed check (`ok` false, `error`, `exit_code` 1) that still carries the report."""
    body = {("params" if key == "trainable_parameters" else key): value for key, value in info.items()}
    body.setdefault("warnings", [])
    if problem is None:
        return ok_payload(body)
    return error_payload(str(problem), 1, **body)


def _dist(info, key) -> str:
    single = info[key.removesuffix("_distribution")]
    if single is not None:
        return str(single)
    return ", ".join(f"{value} ×{count}" for value, count in info[key].items())


def render(info: dict, show_layers: bool = False) -> None:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    flags = [name for name, on in (("DoRA", info["dora"]), ("rsLoRA", info["rslora"]),
                                   ("fan-in-fan-out", info["fan_in_fan_out"])) if on]
    rows = [
        ("path", info["path"]),
        ("format", info["format"] + (f" ({', '.join(flags)})" if flags else "")),
        ("base model", info["base_model"] or "(not named in the file)"),
        ("modules", f"{info['modules']}" + (f"  ({', '.join(f'{k} ×{v}' for k, v in info['components'].items())})"
                                            if info["components"] else "")),
        *([("model", f"{info['family']['label']} ({info['family']['naming']} names)")] if info.get("family") else []),
        ("rank", _dist(info, "rank_distribution")),
        ("alpha", _dist(info, "alpha_distribution")),
        ("scale", _dist(info, "scale_distribution")),
        ("kinds", ", ".join(f"{k} ×{v}" for k, v in info["kinds"].items())),
        ("targets", ", ".join(f"{k} ×{v}" for k, v in info["targets"].items())),
        ("parameters", f"{info['trainable_parameters']:,}"),
        ("size", human_bytes(info["file_size"])),
        ("dtypes", ", ".join(f"{k} ×{v}" for k, v in info["dtypes"].items())),
    ]
    if info["modules_to_save"]:
        rows.append(("full tensors", ", ".join(info["modules_to_save"])))
    if info["delta_tensors"]:
        rows.append(("diff deltas", f"{len(info['delta_tensors'])} added to base tensors as they are (e.g. "
                     f"{info['delta_tensors'][0]})"))
    if info["lycoris"]:
        bounds = [entry["rank_bound"] for entry in info["layers"] if "rank_bound" in entry]
        supported = {entry["algorithm"] for entry in info["layers"] if "algorithm" in entry}
        other = sorted(set(info["lycoris"]) - supported)
        note = f"  (rank/alpha above: their exact LoRA form, rank ≤ {max(bounds)}; --json lists each layer's " \
               "factors)" if bounds else ""
        if other:
            note += f"  ({'/'.join(other)}: recognised; merge/resize/blend/convert not supported)"
        rows.append(("LyCORIS", ", ".join(f"{k} ×{v}" for k, v in info["lycoris"].items()) + note))
    if info["unclaimed_keys"]:
        rows.append(("other keys", f"{len(info['unclaimed_keys'])} (e.g. {info['unclaimed_keys'][0]})"))
    for entry in info["files"]:
        for name, value in entry.get("hashes", {}).items():
            rows.append((name, value))
        if "embedded_sshs_model_hash_matches" in entry:
            rows.append(("embedded sshs", "matches the data" if entry["embedded_sshs_model_hash_matches"]
                         else "STALE: differs from the data (A1111/civitai will show a wrong hash)"))
    if "nonfinite" in info:
        rows.append(("NaN/Inf", "none" if not info["nonfinite"] else
                     f"{len(info['nonfinite'])} tensors: " + ", ".join(e["key"] for e in info["nonfinite"][:3])))
    for warning in info.get("warnings", []):
        rows.append(("warning", warning))
    meta = {k: v for k, v in info["metadata"].items() if k != "format"}
    if meta:
        shown = list(meta.items())[:12]
        rows.append(("metadata", "; ".join(f"{k}={v if len(v) < 60 else v[:57] + '...'}" for k, v in shown)
                     + (f"; … {len(meta) - 12} more (--json)" if len(meta) > 12 else "")))
    for name, value in rows:
        summary.add_row(name, plain(value))
    console.print(summary)
    if show_layers:
        columns = ["module", "kind", "rank", "alpha", "scale", "A", "B"]
        spectrum = any("effective_rank_99" in e for e in info["layers"])
        if spectrum:
            columns += ["eff. rank (99%)", "σ₀"]
        layer_rows: list[list[Any]] = []
        for e in info["layers"]:
            row = [e["target"], e["kind"], e["rank"], e["alpha"], e["scale"], "×".join(map(str, e["A"])),
                   "×".join(map(str, e["B"]))]
            if spectrum:
                values = e.get("singular_values") or [0.0]
                row += [e.get("effective_rank_99", ""), f"{values[0]:.4g}"]
            layer_rows.append(row)
        console.print(table(None, columns, layer_rows))
