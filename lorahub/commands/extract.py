"""`lorahub extract`: a LoRA adapter from a base model and its fine-tune."""
from __future__ import annotations

import click

from ..options import (
    all_layers_option,
    device_option,
    dtype_option,
    json_option,
    out_option,
    output_format_option,
    overwrite_option,
    rank_method_option,
    rank_option,
    rank_param_option,
    split_option,
    torch_dtype_name,
)
from ..ui import byte_progress, console, err_console, human_bytes, ok_payload, print_json, safe, table, warn

TABLE_LIMIT = 40  # layers listed in full; beyond that the lowest retained energy first (--all-layers for all)
SHOWN = 8  # unchanged / changed tensors named in the text report


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


@click.command("extract")
@click.option("--base", "base", required=True, metavar="BASE",
              help="The model that was fine-tuned: a model directory (single file or shards + index), a diffusers "
                   "pipeline directory, or a single .safetensors checkpoint, on local disk.")
@click.option("--tuned", "tuned", required=True, metavar="TUNED",
              help="The fine-tuned model, in any layout --base takes; tensors are paired with the base's by name.")
@rank_option(help="Rank of every layer (--rank-method fixed), or the cap of a dynamic rank rule, ≥ 1.")
@rank_method_option(help="Rank rule: fixed (--rank for every layer) or a dynamic per-layer rule with --param, the "
                         "rules of `lorahub resize`: sv_ratio keeps σ > σ₀/p; sv_fro the smallest k with "
                         "‖S_k‖/‖ΔW‖ ≥ p; sv_cumulative the smallest k with ΣS_k/ΣS ≥ p (exact SVD).")
@rank_param_option(help="The --rank-method parameter p: sv_ratio p ≥ 1; sv_fro, sv_cumulative 0 < p ≤ 1 "
                        "(e.g. 0.9).")
@click.option("--conv-rank", type=click.IntRange(min=1), default=None,
              help="Rank (or cap) of k×k convolutions, ≥ 1; default --rank. 1×1 convs count as linear.")
@out_option()
@output_format_option(help="Output format (default peft; kohya and diffusers write one .safetensors file).")
@split_option()
@click.option("--include", "include", multiple=True, metavar="GLOB",
              help="Only tensors whose name (or module) matches; repeatable. Default: all.")
@click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
              help="Leave out tensors whose name (or module) matches; repeatable.")
@click.option("--keep-full", "keep_full", multiple=True, metavar="GLOB",
              help="Carry matching tensors whole when they changed (PEFT modules_to_save: norms, embeddings, "
                   "lm_head); repeatable; --to peft only.")
@click.option("--lora-embeddings", is_flag=True,
              help="Extract changed embeddings as LoRA embedding layers (default: report them; --keep-full "
                   "carries them).")
@click.option("--exact", is_flag=True,
              help="The exact SVD for every layer (default: randomized SVD, exact for small layers).")
@click.option("--power-iters", type=click.IntRange(min=0), default=2, show_default=True,
              help="Power iterations of the randomized SVD (more: closer to the exact optimum, slower).")
@click.option("--oversample", type=click.IntRange(min=0), default=8, show_default=True,
              help="Extra sketch columns of the randomized SVD beyond the rank.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized sketches.")
@device_option()
@dtype_option(help="dtype of the factors: auto keeps each tuned tensor's dtype; or fp32, fp16, bf16.")
@overwrite_option()
@all_layers_option(help=f"List every layer in the report (default: at most {TABLE_LIMIT}, the lowest retained "
                        f"energy first).")
@json_option
def extract_command(base: str, tuned: str, rank: int | None, rank_method: str, param: float | None,
                    conv_rank: int | None, out: str, to_format: str | None, split: str, include: tuple[str, ...],
                    exclude: tuple[str, ...], keep_full: tuple[str, ...], lora_embeddings: bool, exact: bool,
                    power_iters: int, oversample: int, seed: int, device: str, dtype: str, overwrite: bool,
                    all_layers: bool, as_json: bool) -> None:
    """Extract a LoRA adapter from a fine-tuned model: ΔW = TUNED − BASE, factored per layer.

    Both models are streamed tensor by tensor (two reader threads; memory bounded by the largest
    layer, not the models). Each changed linear or conv layer's ΔW is formed in fp32 on the device
    and factored by randomized SVD with power iterations (exact SVD for small layers or --exact);
    the report gives each layer's retained energy and error, and against the Eckart–Young optimum
    where the exact SVD ran. Unchanged tensors are skipped and listed; changed norms, biases and
    embeddings are reported (--keep-full carries them). alpha = rank: the factors hold ΔW itself.

    \b
    Examples:
      lorahub extract --base ./Llama-3-8B --tuned ./Llama-3-8B-ft --rank 64 -o ./ft-lora
      lorahub extract --base sd15.safetensors --tuned ft.safetensors -r 32 --to kohya -o ft-lora.safetensors
      lorahub extract --base ./base --tuned ./ft --rank-method sv_fro --param 0.9 --rank 128 -o ./lora --json
    """
    from ..extract import check_options, extract

    fmt = to_format or "peft"
    check_options(rank, rank_method, param, conv_rank=conv_rank, split=split, power_iters=power_iters,
                  oversample=oversample, to_format=fmt, keep_full=keep_full)  # usage errors before any read
    dtype_name = torch_dtype_name(dtype)
    out_dtype = None
    if dtype_name:
        import torch

        out_dtype = getattr(torch, dtype_name)
    result = extract(base, tuned, out, rank=rank, method=rank_method, param=param, conv_rank=conv_rank,
                     to_format=fmt, device=device, dtype=out_dtype, split=split, include=include, exclude=exclude,
                     keep_full=keep_full, lora_embeddings=lora_embeddings, exact=exact, power_iters=power_iters,
                     oversample=oversample, seed=seed, overwrite=overwrite,
                     progress=lambda total: byte_progress("extract → read", total))
    if as_json:
        print_json(ok_payload(extract_payload(result, base, tuned, dtype)))
        return
    _render(result, all_layers)


def extract_payload(result, base: str, tuned: str, dtype: str = "auto") -> dict:
    """The `--json` payload (docs/json.md): the keys every command uses, plus extract's own."""
    from ..payloads import adapter_fields, number

    report = result.report
    seconds = report.seconds
    options = {**report.options, "dtype": dtype}
    return {
        "base": str(base), "tuned": str(tuned), "out": str(result.out), "format": result.format,
        **adapter_fields(result.adapter),
        "device": report.device, "seconds": round(seconds, 3), "bytes_read": report.bytes_read,
        "gb_per_s": round(report.bytes_read / seconds / 1e9, 3) if seconds > 0 else 0.0,
        "options": options, "summary": report.summary(), "unchanged": report.unchanged, "changed": report.changed,
        "stage_seconds": report.stage_seconds, "warnings": result.warnings,
        "layers": [{**layer.as_dict(), "alpha": number(layer.alpha)} for layer in report.layers],
    }


def _render(result, all_layers: bool) -> None:
    report = result.report
    layers = report.layers
    shown = layers if all_layers or len(layers) <= TABLE_LIMIT else \
        sorted(layers, key=lambda layer: layer.energy_retained)[:TABLE_LIMIT]
    rows = []
    for layer in shown:
        kind = layer.kind + (f" {layer.kernel}" if layer.kernel else "")
        rows.append([layer.target, kind, "×".join(map(str, layer.shape)), layer.rank, layer.svd,
                     _pct(layer.energy_retained), _sci(layer.rel_error),
                     "-" if layer.error_ratio is None else f"{layer.error_ratio:.4f}"])
    title = None if len(shown) == len(layers) else \
        f"{len(shown)} of {len(layers)} layers with the lowest retained energy (--all-layers for all)"
    console.print(table(title, ["layer", "kind", "shape", "rank", "svd", "energy retained", "rel. error",
                                "error / optimum"], rows))
    summary = report.summary()
    worst = report.worst
    console.print(
        f"{summary['extracted']} layers extracted ({summary['randomized']} randomized, {summary['exact']} exact); "
        f"energy retained: mean {_pct(summary['energy_retained_mean'])}, worst "
        f"{_pct(summary['energy_retained_min'])}" + (f" ({safe(worst.target)})" if worst else "") +
        f"; {result.adapter.num_params:,} parameters")
    if report.unchanged:
        names = ", ".join(report.unchanged[:SHOWN]) + (f", … ({len(report.unchanged) - SHOWN} more)"
                                                      if len(report.unchanged) > SHOWN else "")
        console.print(safe(f"unchanged, skipped: {len(report.unchanged)} tensor(s): {names}"))
    kept = [entry["tensor"] for entry in report.changed if entry["kept"]]
    if kept:
        console.print(safe(f"carried whole (--keep-full): {', '.join(kept)}"))
    rate = report.bytes_read / report.seconds / 1e9 if report.seconds > 0 else 0.0
    console.print(f"read {human_bytes(report.bytes_read)} in {report.seconds:.2f} s ({rate:.2f} GB/s) on "
                  f"{report.device}")
    for line in result.warnings:
        warn(line)
    err_console.print(safe(f"wrote {result.format} adapter to {result.out}"))
