"""`lorahub blend A B [C …] --weights … --out DST` and `lorahub interpolate A B --t T --out DST`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import click

from ..blend import DEFAULT_METHOD, RANK_METHODS, BlendOptions, blend, method_names, parse_weights
from ..blend.registry import check_method_options, declarations, describe_param, method_help, shared_range
from ..errors import OptionError
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
    torch_dtype_name,
)
from ..ui import console, ok_payload, print_json, safe, step_progress, table

# the methods and their options come from the blend method registry (lorahub/blend/registry.py)
METHOD_CHOICES = list(method_names())
# `--method sv_fro --param 0.99` is short for `--method svd --rank-method sv_fro --param 0.99`
DYNAMIC_RANK_METHODS = [rule for rule in RANK_METHODS if rule != "fixed"]
TABLE_LIMIT = 40  # layers printed in full; beyond that the worst ones (all with --all-layers)
# method parameters that other commands spell too take the shared decorator, with the registry's help
SHARED_OPTIONS: dict[str, Callable[..., Callable]] = {
    "rank": rank_option, "rank_method": rank_method_option, "param": rank_param_option}


def method_param_options() -> list[Callable]:
    """One option per method parameter declared in the registry: its type, choices, default and help.

    A range every method agrees on is checked by Click; one that depends on the method (DARE's density)
    is checked once the method is known, before any adapter is read. Both are usage errors (exit 2).
    """
    options = []
    for name, declared in declarations().items():
        if name in SHARED_OPTIONS:
            options.append(SHARED_OPTIONS[name](help=describe_param(name)))
            continue
        first = declared[0]
        kwargs: dict[str, Any] = {"default": first.default, "help": describe_param(name)}
        if first.type is bool:
            kwargs["is_flag"] = True
        elif first.choices:
            kwargs.update(type=click.Choice(list(first.choices)), show_default=True)
        else:
            shared = shared_range(name)
            if shared is not None and first.type is int and (shared.min is not None or shared.max is not None):
                low, high = (None if x is None else int(x) for x in (shared.min, shared.max))
                kwargs["type"] = click.IntRange(min=low, max=high, min_open=shared.min_open)
            elif shared is not None and (shared.min is not None or shared.max is not None):
                kwargs["type"] = click.FloatRange(min=shared.min, max=shared.max, min_open=shared.min_open)
            else:
                kwargs["type"] = first.type
            kwargs["show_default"] = first.default is not None
        options.append(click.option(first.flag, name, **kwargs))
    return options


def blend_options(default_method: str) -> Callable:
    """The options blend and interpolate share (method, its parameters, output)."""
    def decorate(func: Callable) -> Callable:
        options = [
            out_option(),
            overwrite_option(),
            click.option("--method", type=click.Choice(METHOD_CHOICES + DYNAMIC_RANK_METHODS),
                         default=default_method,
                         show_default=True,
                         help=method_help() + " sv_ratio / sv_fro / sv_cumulative: svd with that --rank-method."),
            *method_param_options(),
            output_format_option(help="Output format (default: the first input's)."),
            dtype_option(help="dtype of the written factors: auto keeps the first input's; or fp32, fp16, bf16."),
            device_option(),
            click.option("--allow-base-mismatch", is_flag=True,
                         help="Accept different base model *names* (shapes are still checked)."),
            click.option("--drop-full-tensors", is_flag=True,
                         help="Leave out modules_to_save / saved embedding copies that differ between "
                              "the inputs (they cannot be weighted) instead of refusing."),
            lycoris_base_option,
            all_layers_option(help=f"Print every layer (default: all up to {TABLE_LIMIT}, else the 10 with "
                                   f"the least energy kept)."),
        ]
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


@click.command("blend")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--weights", "-w", "weights_text", required=True,
              help="One weight per adapter, comma-separated (any real numbers; negative subtracts): 0.7,0.3")
@blend_options(DEFAULT_METHOD)
@adapter_input_options
@json_option
def blend_command(adapters, weights_text, **kwargs):
    """Combine LoRA adapters into one: ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ per module, written with scale 1.

    Ranks, alphas, rsLoRA and target modules may differ (a module missing from an adapter
    contributes zero). Adapters for different bases, different layer kinds on one module and DoRA
    are refused; LyCORIS LoHa/LoKr/full layers enter through their exact LoRA factorisation
    (LoHa/LoKr inputs need --base). --method linear reproduces PEFT's add_weighted_adapter 'linear',
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
    _run(adapters, parse_weights(weights_text), **kwargs)


@click.command("interpolate")
@click.argument("adapter_a")
@click.argument("adapter_b")
@click.option("-t", "--t", "t", type=float, required=True,
              help="Position between A (t = 0) and B (t = 1); outside [0, 1] extrapolates.")
@blend_options("cat")
@adapter_input_options
@json_option
def interpolate_command(adapter_a, adapter_b, t, **kwargs):
    """Interpolate two adapters: (1 − t)·A + t·B, exactly (method cat, rank r_A + r_B).

    The same as `lorahub blend A B --weights 1-t,t --method cat`. Use --method svd --rank R for a
    compact best rank-R approximation; t outside [0, 1] extrapolates.

    \b
    Examples:
      lorahub interpolate base-style/ new-style/ -t 0.25 --out quarter/
      lorahub interpolate a/ b/ -t 0.5 --method svd --rank 16 --out half-r16/
    """
    if not math.isfinite(t):
        raise OptionError(f"-t must be a finite number, got {t}")
    _run([adapter_a, adapter_b], [1.0 - t, t], **kwargs)


def _run(adapter_args, weights, *, out, overwrite, method, to_format, dtype, device, allow_base_mismatch,
         drop_full_tensors, all_layers, input_format, allow_pickle, as_json, lycoris_base=None, **method_params):
    import time

    from ..formats import FORMATS, adapter_sources, reserve_output, save_adapter
    from ..payloads import adapter_fields

    # every option check runs before any adapter is read: a usage error is a usage error (exit 2)
    if len(adapter_args) != len(weights):
        raise OptionError(f"{len(adapter_args)} adapters but {len(weights)} weights; give one weight per "
                          f"adapter")
    if method in DYNAMIC_RANK_METHODS:
        rank_method = method_params["rank_method"]
        if rank_method not in ("fixed", method):
            raise click.UsageError(f"--method {method} already sets the rank rule; drop --rank-method {rank_method}")
        method, method_params["rank_method"] = "svd", method
    options = BlendOptions(method=method, device=device, dtype=torch_dtype_name(dtype),
                           allow_base_mismatch=allow_base_mismatch,
                           drop_full_tensors=drop_full_tensors).with_values(**method_params)
    check_method_options(options)
    start = time.perf_counter()
    adapters = [open_adapter(arg, input_format, allow_pickle) for arg in adapter_args]
    resolve_lycoris(adapters, lycoris_base)
    total = len({t for a in adapters for t in a.layers})
    fmt = to_format or (adapters[0].format if adapters[0].format in FORMATS else
                        "kohya" if adapters[0].format == "lycoris" else "peft")
    # --out is checked and locked before the work, not after it
    with reserve_output(out, fmt, overwrite=overwrite, sources=adapters):
        with step_progress("blending layers", total) as advance:
            result = blend(adapters, weights, options, to=to_format, progress=advance)
        renamed: list[str] = []
        written = save_adapter(result.adapter, Path(out), fmt, overwrite=overwrite, notes=renamed,
                               inputs=[("adapter", p) for a in adapters for p in adapter_sources(a)])
    report = result.report.to_dict()
    summary = {k: v for k, v in report["summary"].items() if k != "layers"}
    warnings = [f"{adapter.name}: {line}" for adapter in adapters for line in adapter.warnings] + renamed
    if report["dropped_full_tensors"]:
        warnings.append(f"left out full tensors: {', '.join(report['dropped_full_tensors'])}")
    if summary["dropped"]:
        warnings.append(f"{len(summary['dropped'])} modules left out (their sum is zero): "
                        + ", ".join(summary["dropped"][:5]) + (" …" if len(summary["dropped"]) > 5 else ""))
    payload = {
        "adapters": [{"path": str(adapter.path), "weight": weight}
                     for adapter, weight in zip(adapters, report["weights"])],
        "out": str(written), "format": to_format or result.adapter.format, **adapter_fields(result.adapter),
        "method": report["method"], "options": report["options"], "device": report["device"],
        "seconds": round(time.perf_counter() - start, 3), "summary": summary,
        "dropped_full_tensors": report["dropped_full_tensors"], "warnings": warnings,
        "layers": report["layers"],
    }
    if as_json:
        print_json(ok_payload(payload))
        return
    _render(payload, all_layers)


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _render(report: dict, all_layers: bool) -> None:
    summary = report["summary"]
    weights = ", ".join(f"{a['weight']:g}" for a in report["adapters"])
    ranks = f"{summary['rank_min']}" + (f"–{summary['rank_max']}" if summary["rank_max"] != summary["rank_min"] else "")
    console.print(f"blended {len(report['adapters'])} adapters ({weights}) with {report['method']} on "
                  f"{report['device']}: {report['modules']} modules, rank {ranks}, {report['params']:,} parameters")
    if summary["energy_retained_min"] is not None:
        console.print(f"energy kept by truncation: mean {summary['energy_retained_mean']:.6f}, "
                      f"min {summary['energy_retained_min']:.6f}")
    if summary["rel_error_max"] is not None:
        console.print(f"largest relative error against the exact weighted sum: {summary['rel_error_max']:.3g}")
    for line in report["warnings"]:
        console.print(f"[yellow]{safe(line)}[/]")
    layers = report["layers"]
    title = "layers"
    if len(layers) > TABLE_LIMIT and not all_layers:
        layers = sorted(layers, key=lambda row: (row["energy_retained"] if row["energy_retained"] is not None
                                                 else 1.0, -row["rel_error"]))[:10]
        title = f"10 of {len(report['layers'])} layers, least energy kept first (--all-layers, --json for all)"
    rows = [[layer["target"], "+".join(str(r) for r in layer["input_ranks"]), layer["rank"],
             _fmt(layer["energy_retained"]), f"{layer['rel_error']:.3g}", layer["note"]] for layer in layers]
    console.print(table(title, ["module", "input ranks", "rank", "energy kept", "rel. error", "note"], rows))
    console.print(f"wrote {safe(report['out'])} ({report['format']})")
