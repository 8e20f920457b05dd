"""`lorahub blend A B [C …] --weights … --out DST` and `lorahub interpolate A B --t T --out DST`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click
from rich.markup import escape

from ..errors import LorahubError
from ..options import (
    adapter_input_options,
    device_option,
    dtype_option,
    json_option,
    open_adapter,
    out_option,
    output_format_option,
    rank_method_option,
    rank_option,
    rank_param_option,
)
from ..ui import console, print_json, step_progress, table

METHOD_CHOICES = ["svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
# `--method sv_fro --param 0.99` is short for `--method svd --rank-method sv_fro --param 0.99`
DYNAMIC_RANK_METHODS = ["sv_ratio", "sv_fro", "sv_cumulative"]
TABLE_LIMIT = 40  # layers printed in full; beyond that the worst ones (all with --all-layers)


def blend_options(default_method: str) -> Callable:
    """The options blend and interpolate share (method, rank rules, element-wise parameters, output)."""
    def decorate(func: Callable) -> Callable:
        options = [
            out_option(),
            click.option("--method", type=click.Choice(METHOD_CHOICES + DYNAMIC_RANK_METHODS),
                         default=default_method,
                         show_default=True,
                         help="How to combine: cat (exact, rank Σrᵢ), svd (exact sum truncated to "
                              "--rank by the factored SVD), linear (PEFT's factor-space sum: approximate, "
                              "has cross terms BᵢAⱼ, equal ranks only), ties / dare_linear / dare_ties / "
                              "magnitude_prune (PEFT merge_utils on the dense per-layer deltas, then "
                              "truncated SVD to --rank). sv_ratio / sv_fro / sv_cumulative: svd with "
                              "that --rank-method."),
            rank_option(help="Rank of svd and element-wise results (default: the largest input rank). "
                             "With --rank-method, the cap."),
            rank_method_option(help="Per-layer dynamic rank for svd/element-wise (same rules as resize): "
                                    "sv_ratio keeps σ > σ₀/p; sv_fro the smallest k with ‖S_k‖/‖S‖ ≥ p; "
                                    "sv_cumulative the smallest k with ΣS_k/ΣS ≥ p."),
            rank_param_option(),
            click.option("--kohya-compat", is_flag=True,
                         help="Dynamic ranks by kohya's rule (one more than needed, at least 2)."),
            click.option("--density", type=float, default=None,
                         help="Element-wise methods: fraction of entries kept per delta (0–1)."),
            click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total",
                         show_default=True, help="ties / dare_ties sign election."),
            click.option("--seed", type=int, default=0, show_default=True,
                         help="DARE random masks (seeded per module; same device → same result)."),
            click.option("--split", type=click.Choice(["balanced", "up"]), default="balanced",
                         show_default=True,
                         help="After an SVD: B = U√S, A = √S·Vᵀ (balanced) or B = U·S, A = Vᵀ (up, kohya/PEFT)."),
            output_format_option(help="Output format (default: the first input's)."),
            dtype_option(["float32", "float16", "bfloat16"], help="Output factor dtype (default: the first input's)."),
            device_option(),
            click.option("--allow-base-mismatch", is_flag=True,
                         help="Accept different base model *names* (shapes are still checked)."),
            click.option("--drop-full-tensors", is_flag=True,
                         help="Leave out modules_to_save / saved embedding copies that differ between "
                              "the inputs (they cannot be weighted) instead of refusing."),
            click.option("--all-layers", is_flag=True, help=f"Print every layer (default: all up to "
                                                            f"{TABLE_LIMIT}, else the worst)."),
        ]
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


@click.command("blend")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--weights", "-w", "weights_text", required=True,
              help="One weight per adapter, comma-separated (any real numbers; negative subtracts): 0.7,0.3")
@blend_options("svd")
@adapter_input_options
@json_option
def blend_command(adapters, weights_text, **kwargs):
    """Combine LoRA adapters into one: ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ per module, written with scale 1.

    Ranks, alphas, rsLoRA and target modules may differ (a module missing from an adapter
    contributes zero). Adapters for different bases, different layer kinds on one module, DoRA and
    LyCORIS adapters are refused. --method linear reproduces PEFT's add_weighted_adapter 'linear',
    which sums the factors, (Σ√|cᵢ|Bᵢ)(Σ±√|cᵢ|Aᵢ): it is NOT the weighted sum (cross terms BᵢAⱼ) and
    is kept for compatibility only; cat is exact, svd is the best rank-r approximation of the exact sum.

    \b
    Examples:
      lorahub blend style/ subject/ --weights 0.7,0.3 --out mix/
      lorahub blend a.safetensors b.safetensors -w 1,1 --method cat --out sum.safetensors
      lorahub blend a/ b/ -w 1,-1 --rank 16 --out diff/            # A minus B, rank 16
      lorahub blend a/ b/ -w 1,1 --rank-method sv_fro --param 0.99 --out mix/
      lorahub blend a/ b/ c/ -w 2,1,1 --method ties --density 0.2 --rank 32 --out ties/
    """
    from ..blend import parse_weights

    _run(adapters, parse_weights(weights_text), **kwargs)


@click.command("interpolate")
@click.argument("adapter_a")
@click.argument("adapter_b")
@click.option("--t", "t", type=float, required=True, help="Position between A (t = 0) and B (t = 1).")
@blend_options("cat")
@adapter_input_options
@json_option
def interpolate_command(adapter_a, adapter_b, t, **kwargs):
    """Interpolate two adapters: (1 − t)·A + t·B, exactly (method cat, rank r_A + r_B).

    The same as `lorahub blend A B --weights 1-t,t --method cat`. Use --method svd --rank R for a
    compact best rank-R approximation; t outside [0, 1] extrapolates.

    \b
    Examples:
      lorahub interpolate base-style/ new-style/ --t 0.25 --out quarter/
      lorahub interpolate a/ b/ --t 0.5 --method svd --rank 16 --out half-r16/
    """
    _run([adapter_a, adapter_b], [1.0 - t, t], **kwargs)


def _run(adapter_args, weights, *, out, method, rank, rank_method, param, kohya_compat, density,
         majority_sign, seed, split, to_format, dtype, device, allow_base_mismatch, drop_full_tensors, all_layers,
         input_format, allow_pickle, as_json):
    from ..blend import BlendOptions, blend
    from ..formats import save_adapter

    if len(adapter_args) != len(weights):
        raise LorahubError(f"{len(adapter_args)} adapters but {len(weights)} weights; give one weight per "
                           f"adapter")
    if method in DYNAMIC_RANK_METHODS:
        if rank_method not in ("fixed", method):
            raise click.UsageError(f"--method {method} already sets the rank rule; drop --rank-method {rank_method}")
        method, rank_method = "svd", method
    adapters = [open_adapter(arg, input_format, allow_pickle) for arg in adapter_args]
    options = BlendOptions(method=method, rank=rank, rank_method=rank_method, param=param,
                           kohya_compat=kohya_compat, density=density, majority_sign=majority_sign,
                           seed=seed, split=split, device=device, dtype=dtype,
                           allow_base_mismatch=allow_base_mismatch, drop_full_tensors=drop_full_tensors)
    total = len({t for a in adapters for t in a.layers})
    with step_progress("blending layers", total) as advance:
        result = blend(adapters, weights, options, to=to_format, progress=advance)
    written = save_adapter(result.adapter, Path(out), to_format)
    report = result.report.to_dict()
    report["out"] = str(written)
    report["format"] = to_format or result.adapter.format
    report["params"] = result.adapter.num_params
    if as_json:
        print_json(report)
        return
    _render(report, all_layers)


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _render(report: dict, all_layers: bool) -> None:
    summary = report["summary"]
    weights = ", ".join(f"{w:g}" for w in report["weights"])
    console.print(f"blended {len(report['sources'])} adapters ({weights}) with {report['method']} on "
                  f"{report['device']}: {summary['layers']} modules, rank "
                  f"{summary['rank_min']}" + (f"–{summary['rank_max']}" if summary['rank_max'] != summary['rank_min']
                                              else "") + f", {report['params']:,} parameters")
    if summary["energy_retained_min"] is not None:
        console.print(f"energy kept by truncation: mean {summary['energy_retained_mean']:.6f}, "
                      f"min {summary['energy_retained_min']:.6f}")
    if summary["rel_error_max"] is not None:
        console.print(f"largest relative error against the exact weighted sum: {summary['rel_error_max']:.3g}")
    if report["dropped_full_tensors"]:
        console.print(f"[yellow]left out full tensors:[/] {escape(', '.join(report['dropped_full_tensors']))}")
    if summary["dropped"]:
        console.print(f"[yellow]{len(summary['dropped'])} modules left out (their sum is zero):[/] "
                      + ", ".join(summary["dropped"][:5]) + (" …" if len(summary["dropped"]) > 5 else ""))
    layers = report["layers"]
    title = "layers"
    if len(layers) > TABLE_LIMIT and not all_layers:
        layers = sorted(layers, key=lambda l: (l["energy_retained"] if l["energy_retained"] is not None
                                               else 1.0, -l["rel_error"]))[:10]
        title = f"10 of {len(report['layers'])} layers, least energy kept first (--all-layers, --json for all)"
    rows = [[layer["target"], "+".join(str(r) for r in layer["input_ranks"]), layer["rank"],
             _fmt(layer["energy_retained"]), f"{layer['rel_error']:.3g}", layer["note"]] for layer in layers]
    console.print(table(title, ["module", "input ranks", "rank", "energy kept", "rel. error", "note"], rows))
    console.print(f"wrote {escape(str(report['out']))} ({report['format']})")
