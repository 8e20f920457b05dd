"""`lorahub resize`: re-rank an adapter with the exact truncated SVD of each layer."""
from __future__ import annotations

from pathlib import Path

import click

from ..options import (
    adapter_input_options,
    all_layers_option,
    device_option,
    dtype_option,
    json_option,
    lycoris_base_option,
    open_adapter,
    out_option,
    output_format_option,
    overwrite_option,
    rank_method_option,
    rank_option,
    rank_param_option,
    resolve_lycoris,
    split_option,
    torch_dtype_name,
)
from ..ui import console, err_console, ok_payload, print_json, safe, step_progress, table, warn

TABLE_LIMIT = 40  # layers listed in full; beyond that the lowest retained energy first (--all-layers for all)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


@click.command("resize")
@click.argument("adapter")
@rank_option(help="New rank (--rank-method fixed) or the cap of a dynamic rank rule, ≥ 1.")
@rank_method_option(help="Rank rule: fixed (--rank for every layer) or a dynamic per-layer rule with --param: "
                         "sv_ratio keeps σ > σ₀/p; sv_fro the smallest k with ‖S_k‖/‖S‖ ≥ p; sv_cumulative "
                         "the smallest k with ΣS_k/ΣS ≥ p.")
@rank_param_option(help="The --rank-method parameter p: sv_ratio p ≥ 1; sv_fro, sv_cumulative 0 < p ≤ 1 "
                        "(e.g. 0.99).")
@click.option("--conv-rank", type=click.IntRange(min=1), default=None,
              help="Rank (or cap) for k×k convolutions, ≥ 1; default --rank. 1×1 convs count as linear.")
@out_option(path_type=Path)
@output_format_option(help="Output format (default: the input's).")
@split_option()
@click.option("--kohya-compat", is_flag=True,
              help="Dynamic ranks by kohya resize_lora.py's rule (one more than needed, at least 2).")
@device_option()
@click.option("--fp64", "use_fp64", is_flag=True, help="Compute the SVDs in float64 (default float32).")
@dtype_option(help="dtype of the new factors: auto keeps each layer's stored dtype; or fp32, fp16, bf16.")
@overwrite_option()
@all_layers_option(help=f"List every layer in the report (default: at most {TABLE_LIMIT}, the lowest "
                        f"retained energy first).")
@lycoris_base_option
@adapter_input_options
@json_option
def resize(adapter: str, rank: int | None, rank_method: str, param: float | None, conv_rank: int | None,
           out: Path, to_format: str | None, split: str, kohya_compat: bool, device: str, use_fp64: bool,
           dtype: str, overwrite: bool, all_layers: bool, lycoris_base: str | None, input_format: str,
           allow_pickle: bool, as_json: bool) -> None:
    """Resize (re-rank) ADAPTER: the best rank-R approximation of every layer, exactly.

    The SVD of each layer comes from QR of its factors (no dense matrix), so a 7B adapter takes
    seconds. The scale is kept (alpha' = alpha·R'/R; rsLoRA alpha·√(R'/R)), layers already at or
    below the requested rank are kept unchanged, and k×k convs use --conv-rank. LyCORIS inputs
    (LoHa, LoKr, ...) are resized through their exact LoRA factorisation (docs/lycoris.md) and
    written as plain LoRA (kohya by default); LoHa/LoKr inputs need --base.

    \b
    Examples:
      lorahub resize adapter_dir --rank 8 --out adapter_r8/
      lorahub resize lora.safetensors --rank 32 --rank-method sv_fro --param 0.9 --out small.safetensors
      lorahub resize lora.safetensors --rank 16 --conv-rank 8 --to peft --out peft_dir/ --json
    """
    import time

    import torch

    from ..devices import resolve_device
    from ..formats import FORMATS, reserve_output, save_adapter
    from ..payloads import adapter_fields
    from ..resize import check_options, resize_adapter

    check_options(rank, rank_method, param, conv_rank, split)  # usage errors before any file is read
    start = time.perf_counter()
    source = open_adapter(adapter, input_format, allow_pickle)
    resolve_lycoris([source], lycoris_base)
    fmt = to_format or (source.format if source.format in FORMATS else "kohya" if source.format == "lycoris"
                        else "peft")
    dtype_name = torch_dtype_name(dtype)
    out_dtype = getattr(torch, dtype_name) if dtype_name else None
    torch_device = resolve_device(device)
    # --out is checked and locked before the work, not after it
    with reserve_output(out, fmt, overwrite=overwrite, sources=[source]):
        with step_progress("resizing", len(source.layers)) as advance:
            resized, report = resize_adapter(
                source, rank=rank, method=rank_method, param=param, conv_rank=conv_rank, kohya_compat=kohya_compat,
                split=split, device=torch_device, compute_dtype=torch.float64 if use_fp64 else torch.float32,
                out_dtype=out_dtype, progress=advance)
        renamed: list[str] = []
        written = save_adapter(resized, out, format=fmt, overwrite=overwrite, notes=renamed)
    seconds = time.perf_counter() - start
    summary = report.summary()
    warnings = list(source.warnings) + renamed
    if summary["zero"]:
        warnings.append(f"{summary['zero']} layer(s) have an all-zero delta; written as rank-1 zero factors")
    if as_json:
        print_json(ok_payload({
            "path": str(source.path), "out": str(written), "from": source.format, "format": fmt,
            **adapter_fields(resized), "input_params": summary["old_params"],
            "device": str(torch_device), "seconds": round(seconds, 3),
            "options": {"rank": report.rank, "rank_method": report.method, "param": report.param,
                        "conv_rank": report.conv_rank, "kohya_compat": report.kohya_compat, "split": report.split,
                        "dtype": dtype, "fp64": use_fp64},
            "summary": {"resized": summary["resized"], "kept": summary["kept"], "zero": summary["zero"],
                        "energy_retained_mean": summary["mean_energy_retained"],
                        "energy_retained_min": summary["worst_energy_retained"],
                        "fro_retained_mean": summary["mean_fro_retained"], "worst_layer": summary["worst_layer"]},
            "warnings": warnings,
            "layers": [_layer_json(layer) for layer in report.layers],
        }))
        return
    rows = []
    shown = report.layers if all_layers or len(report.layers) <= TABLE_LIMIT else \
        sorted(report.layers, key=lambda layer: layer.energy_retained)[:TABLE_LIMIT]
    for layer in shown:
        kind = layer.kind + (f" {layer.kernel}" if layer.kernel else "")
        new = f"{layer.new_rank}" + (" (kept)" if layer.kept else "") + (" (zero)" if layer.zero else "")
        rows.append([layer.target, kind, layer.old_rank, new, _pct(layer.fro_retained),
                     _pct(layer.energy_retained), _pct(layer.sum_retained), f"{layer.max_dropped_ratio:.4f}"])
    title = None if len(shown) == len(report.layers) else \
        f"{len(shown)} of {len(report.layers)} layers with the lowest retained energy (--all-layers for all)"
    console.print(table(title, ["layer", "kind", "old rank", "new rank", "fro retained", "energy retained",
                                "sum retained", "max dropped σ/σ₀"], rows))
    worst = report.worst
    console.print(
        f"{summary['resized']} of {summary['layers']} layers resized, {summary['kept']} kept; "
        f"energy retained: mean {_pct(summary['mean_energy_retained'])}, worst "
        f"{_pct(summary['worst_energy_retained'])}" + (f" ({safe(worst.target)})" if worst else "") +
        f"; parameters {summary['old_params']:,} → {summary['new_params']:,}; "
        f"{seconds:.2f} s")
    for line in warnings:
        warn(line)
    err_console.print(safe(f"wrote {fmt} adapter to {written}"))


def _layer_json(layer) -> dict:
    """One layer of the report with the keys every command uses: `rank`/`alpha` are the written
    layer's, `input_rank`/`input_alpha` the input's."""
    from ..payloads import number

    return {"target": layer.target, "kind": layer.kind, "kernel": layer.kernel, "rank": layer.new_rank,
            "input_rank": layer.old_rank, "alpha": number(layer.new_alpha), "input_alpha": number(layer.old_alpha),
            "kept": layer.kept, "zero": layer.zero, "energy_retained": layer.energy_retained,
            "fro_retained": layer.fro_retained, "sum_retained": layer.sum_retained,
            "max_dropped_ratio": layer.max_dropped_ratio}
