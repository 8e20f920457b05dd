"""`lorahub resize`: re-rank an adapter with the exact truncated SVD of each layer."""
from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ..options import (
    adapter_input_options,
    device_option,
    dtype_option,
    json_option,
    open_adapter,
    out_option,
    output_format_option,
    overwrite_option,
    rank_method_option,
    rank_option,
    rank_param_option,
)
from ..ui import console, err_console, print_json, step_progress, table, warn

SAVE_DTYPES = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


@click.command("resize")
@click.argument("adapter")
@rank_option(value_type=int, help="New rank (fixed method) or the cap for dynamic methods.")
@rank_method_option("--method", default=None,
                    help="Rank rule: fixed (default with --rank), or a dynamic per-layer rule (needs --param).")
@rank_param_option(help="Dynamic rule parameter: sv_ratio keeps σ > σ₀/X (X ≥ 1); sv_fro: minimal rank with "
                        "‖S_k‖/‖S‖ ≥ X; sv_cumulative: minimal rank with ΣS_k/ΣS ≥ X (0 < X ≤ 1).")
@click.option("--conv-rank", type=int, default=None,
              help="Rank (or cap) for k×k convolutions; default --rank. 1×1 convs count as linear.")
@out_option(path_type=Path)
@output_format_option(help="Output format (default: the input's).")
@click.option("--split", type=click.Choice(["balanced", "up"]), default="balanced", show_default=True,
              help="Where the singular values go: √S to each factor, or all in up (kohya).")
@click.option("--kohya-compat", is_flag=True,
              help="Use kohya resize_lora.py's dynamic rule (keeps one rank more than needed, at least 2).")
@device_option(default="cpu")
@click.option("--fp64", "use_fp64", is_flag=True, help="Compute the SVDs in float64 (default float32).")
@dtype_option(list(SAVE_DTYPES), "--save-dtype", default="keep",
              help="dtype of the new factors (keep = each layer's stored dtype).")
@overwrite_option()
@click.option("--all-layers", is_flag=True, help="List every layer in the report (default: at most 40).")
@adapter_input_options
@json_option
def resize(adapter: str, rank: int | None, rank_method: str | None, param: float | None, conv_rank: int | None,
           out: Path, to_format: str | None, split: str, kohya_compat: bool, device: str, use_fp64: bool,
           dtype: str, overwrite: bool, all_layers: bool, input_format: str, allow_pickle: bool,
           as_json: bool) -> None:
    """Resize (re-rank) ADAPTER: the best rank-R approximation of every layer, exactly.

    The SVD of each layer comes from QR of its factors (no dense matrix), so a 7B adapter takes
    seconds. The scale is kept (alpha' = alpha·R'/R; rsLoRA alpha·√(R'/R)), layers already at or
    below the requested rank are kept unchanged, and k×k convs use --conv-rank.

    \b
    Examples:
      lorahub resize adapter_dir --rank 8 --out adapter_r8/
      lorahub resize lora.safetensors --rank 32 --method sv_fro --param 0.9 --out small.safetensors
      lorahub resize lora.safetensors --rank 16 --conv-rank 8 --to peft --out peft_dir/ --json
    """
    import torch

    from ..devices import resolve_device
    from ..formats import FORMATS, reserve_output, save_adapter
    from ..resize import resize_adapter

    method = rank_method or ("fixed" if param is None else None)
    if method is None:
        raise click.UsageError("--param needs --method (sv_ratio, sv_fro or sv_cumulative)")
    if method == "fixed" and param is not None:
        raise click.UsageError("--param only applies to --method sv_ratio, sv_fro or sv_cumulative")
    source = open_adapter(adapter, input_format, allow_pickle)
    fmt = to_format or (source.format if source.format in FORMATS else "peft")
    dtype_name = SAVE_DTYPES[dtype]
    out_dtype = getattr(torch, dtype_name) if dtype_name else None
    torch_device = resolve_device(device)
    # --out is checked and locked before the work, not after it
    with reserve_output(out, fmt, overwrite=overwrite, sources=[source]):
        with step_progress("resizing", len(source.layers)) as advance:
            resized, report = resize_adapter(
                source, rank=rank, method=method, param=param, conv_rank=conv_rank, kohya_compat=kohya_compat,
                split=split, device=torch_device, compute_dtype=torch.float64 if use_fp64 else torch.float32,
                out_dtype=out_dtype, progress=advance)
        written = save_adapter(resized, out, format=fmt, overwrite=overwrite)
    summary = report.summary()
    if as_json:
        payload = {"input": str(source.path), "output": str(written), "format": fmt, **report.as_dict()}
        print_json(payload)
        return
    rows = []
    shown = report.layers if all_layers or len(report.layers) <= 40 else \
        sorted(report.layers, key=lambda layer: layer.energy_retained)[:40]
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
        f"{_pct(summary['worst_energy_retained'])}" + (f" ({escape(worst.target)})" if worst else "") +
        f"; parameters {summary['old_params']:,} → {summary['new_params']:,}; "
        f"{summary['seconds']:.2f} s")
    if summary["zero"]:
        warn(f"{summary['zero']} layer(s) have an all-zero delta; written as rank-1 zero factors")
    err_console.print(escape(f"wrote {fmt} adapter to {written}"))
