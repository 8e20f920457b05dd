"""`lorahub merge` and `lorahub unmerge`."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import click

from ..errors import OptionError
from ..options import adapter_input_options, device_option, dtype_option, json_option, out_option, overwrite_option
from ..ui import byte_progress, console, error_line, error_payload, human_bytes, ok_payload, print_json, safe, warn

if TYPE_CHECKING:
    from ..merge import AdapterInput


def _common_options(func):
    func = adapter_input_options(func)
    func = overwrite_option()(func)
    func = device_option()(func)
    func = dtype_option(help="Output dtype of floating-point tensors: auto keeps each tensor's dtype; fp32, "
                             "fp16 or bf16 rewrites every file.")(func)
    func = out_option(metavar="DIR",
                      help="Output directory (written beside it first, renamed into place when complete).")(func)
    return func


def parse_adapter_arg(arg: str) -> tuple[str, float | None]:
    """`PATH[:WEIGHT]`: split on the last ':' only when what follows parses as a number.

    Paths and hub ids may hold ':' (`hf://org/repo`, `C:\\x`), so `hf://org/repo` stays whole and
    `hf://org/repo:0.5` is the repo with weight 0.5.
    """
    head, sep, tail = arg.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        try:
            weight = float(tail)
        except ValueError:
            return arg, None
        if not math.isfinite(weight):
            raise OptionError(f"adapter weight must be a finite number, got '{tail}'", path=head)
        return head, weight
    return arg, None


def load_inputs(args: Sequence[str], *, input_format: str | None = None,
                allow_pickle: bool = False) -> list[AdapterInput]:
    """Adapters from `PATH[:WEIGHT]` arguments (local paths or `hf://` references, pulled first)."""
    from ..merge import AdapterInput
    from ..options import open_adapter

    inputs = []
    for arg in args:
        spec, weight = parse_adapter_arg(arg)
        adapter = open_adapter(spec, input_format or "auto", allow_pickle)
        inputs.append(AdapterInput(adapter, 1.0 if weight is None else weight, spec, weight is not None))
    return inputs


def _run(ctx, operation, base, inputs, as_json, call):
    from ..errors import CheckFailed

    try:
        result = call(lambda total: byte_progress(f"{operation} → write", total))
    except CheckFailed as exc:
        report = exc.report
        message = f"{operation} refused: {exc}"
        if not as_json and report is not None:
            from .validate import render

            render(report)
        error_line(message)
        if as_json:
            from .validate import validation_payload

            print_json(error_payload(message, 1, validation=validation_payload(report)
                                     if hasattr(report, "to_dict") else None))
        ctx.exit(1)
    if as_json:
        print_json(ok_payload(merge_payload(result, base, inputs)))
        return
    for line in result.warnings:
        warn(line)
    _summary(result)


def merge_payload(result, base, inputs: Sequence[AdapterInput]) -> dict:
    """The merge result as JSON, with the keys every command uses (docs/json.md): `base`, `out`, and per
    adapter `name`, `path`, `format`, `weight`, `sha256` and `modules` (merge and unmerge alike)."""
    payload = result.to_dict()
    operation, out = payload.pop("operation"), payload.pop("out")
    adapters = []
    for entry, item in zip(payload.pop("adapters"), inputs):
        entry = {("modules" if key == "layers" else key): value for key, value in entry.items()}
        entry.setdefault("path", None if item.adapter.path is None else str(item.adapter.path))
        entry.setdefault("format", item.adapter.format)
        entry.setdefault("modules", len(item.adapter.layers))
        adapters.append(entry)
    return {"operation": operation, "base": str(base), "out": out, "adapters": adapters, **payload}


def _summary(result) -> None:
    rate = f"{result.gb_per_s:.2f} GB/s" if result.seconds > 0 else "-"
    what = "merged" if result.operation == "merge" else "unmerged"
    names = ", ".join(f"{a['name']}:{a['weight']:g}" for a in result.adapters)
    console.print(f"[green]✓[/] {safe(f'{what} {names} → {result.out}')}")
    how = " (exact: recorded originals restored)" if result.exact else ""
    console.print(f"  tensors changed {result.tensors_changed}{how}, copied unchanged {result.tensors_copied}; "
                  f"files rewritten {result.files_rewritten}, copied {result.files_copied}")
    console.print(f"  wrote {human_bytes(result.bytes_written)} in {result.seconds:.2f} s ({rate}) on {result.device}")


@click.command("merge")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("--base", "base", required=True, metavar="SRC",
              help="Local base model: a model directory (single file or shards + index), a diffusers "
                   "pipeline directory, or a single .safetensors checkpoint.")
@_common_options
@click.option("--save-originals", is_flag=True,
              help="Also record the original bytes of every changed tensor, so `lorahub unmerge` restores "
                   "the base bit for bit (costs the size of the changed tensors).")
@click.option("--no-validate", "no_validate", is_flag=True, hidden=True)
@json_option
@click.pass_context
def merge_command(ctx, adapters, base, out, dtype, device, overwrite, input_format, allow_pickle, save_originals,
                  no_validate, as_json):
    """Merge adapters into a base model, streaming: W' = W + Σ wᵢ·ΔWᵢ.

    Each ADAPTER is a PEFT directory, a kohya/diffusers .safetensors file or hf://owner/name[@rev],
    optionally followed by :WEIGHT (default 1; negative subtracts). Every adapter is validated against
    the base first. ΔW is computed in fp32 from the factors, added to the fp32 upcast of W and rounded
    once. The output keeps the base's layout (files, shards, index, tensor order, dtypes) and its other
    files; tensors no adapter touches are copied byte for byte. What was merged (names, weights,
    sha256) is recorded in the safetensors metadata and in lorahub_merge.json; DoRA row norms and
    replaced tensors go to lorahub_merge_undo.N.safetensors so `lorahub unmerge` can undo them.

    \b
    Examples:
      lorahub merge --base ./Llama-3-8B ./my-lora --out ./merged
      lorahub merge --base ./Llama-3-8B ./style:0.7 ./fix:-0.3 --out ./merged --device cuda
      lorahub merge --base ./sd15.safetensors ./detail.safetensors:0.8 --out ./sd15-detail
      lorahub merge --base ./Llama-3-8B hf://alice/llama-lora --out ./merged --save-originals
    """
    from ..merge import merge

    inputs = load_inputs(adapters, input_format=input_format, allow_pickle=allow_pickle)
    _run(ctx, "merge", base, inputs, as_json, lambda progress: merge(
        base, inputs, out, dtype=dtype, device=device, save_originals=save_originals, overwrite=overwrite,
        progress=progress, check=not no_validate))


@click.command("unmerge")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("--base", "base", required=True, metavar="MERGED",
              help="The merged model (a directory or .safetensors file written by `lorahub merge`, or any "
                   "model the adapters were merged into).")
@_common_options
@click.option("--exact/--no-exact", default=None,
              help="--exact: require the originals recorded by `merge --save-originals` and restore them bit "
                   "for bit (default: use them when present); --no-exact: subtract even if they are there.")
@click.option("--no-validate", "no_validate", is_flag=True, hidden=True)
@json_option
@click.pass_context
def unmerge_command(ctx, adapters, base, out, dtype, device, overwrite, input_format, allow_pickle, exact,
                    no_validate, as_json):
    """Undo a merge: subtract the adapters' deltas, W = W' − Σ wᵢ·ΔWᵢ (fp32, rounded once).

    A weight omitted after an adapter is taken from the merge record (else 1). In bf16, subtraction
    returns each weight to within one bf16 ulp of max(|W|, |W'|), not bit for bit: merging rounded
    W + ΔW once. Bit-exact restores need `merge --save-originals`. DoRA layers and replaced tensors
    (modules_to_save) cannot be undone from the merged weights alone; they are undone from the
    lorahub_merge_undo file that `lorahub merge` wrote, when the adapters and weights given are the
    ones of the last recorded merge, and refused otherwise.

    \b
    Examples:
      lorahub unmerge --base ./merged ./my-lora --out ./restored
      lorahub unmerge --base ./merged ./style:0.7 ./fix:-0.3 --out ./restored --exact
    """
    from ..merge import unmerge

    inputs = load_inputs(adapters, input_format=input_format, allow_pickle=allow_pickle)
    _run(ctx, "unmerge", base, inputs, as_json, lambda progress: unmerge(
        base, inputs, out, dtype=dtype, device=device, overwrite=overwrite, progress=progress,
        check=not no_validate, exact=exact))
