"""`lorahub validate ADAPTER --base SRC`."""
from __future__ import annotations

import click

from ..options import adapter_input_options, all_layers_option, json_option, open_adapter
from ..ui import console, error_line, print_json, safe, table, warn

LIMIT = 200  # problems listed (all with --all-layers or --json)


@click.command("validate")
@click.argument("adapter")
@click.option("--base", "base_spec", metavar="SRC",
              help="Base model: a local model directory or .safetensors file, a registry name "
                   "(`lorahub registry list`), or a Hub repo owner/name[@revision]. "
                   "Default: the base model named in the adapter.")
@click.option("--revision", help="Hub revision of the base (branch, tag or commit).")
@click.option("--max-rank", type=click.IntRange(min=1), metavar="N",
              help="Serving limit: fail if any module's rank exceeds N (vLLM: --max-lora-rank).")
@all_layers_option(help=f"List every mismatching module (default: the first {LIMIT}).")
@adapter_input_options
@json_option
@click.pass_context
def validate_command(ctx, adapter, base_spec, revision, max_rank, all_layers, input_format, allow_pickle, as_json):
    """Check that an adapter fits a base model, from shapes alone (headers only, no weights read).

    For every adapted module: the target exists in the base, A's input and B's output dimensions
    equal the base weight's (conv: in·kh·kw), the orientation is right (GPT-2 Conv1D, embeddings),
    DoRA magnitudes have one entry per output feature. Also reports adapter modules the base does
    not have, modules_to_save whose shapes differ (resized vocabularies), a different base name in
    the adapter (warning), and ranks over --max-rank. Exit status 0 when the adapter fits (and
    keeps to --max-rank), 1 when it does not; the first line says which check failed.

    \b
    Examples:
      lorahub validate ./my-lora --base ./Llama-3-8B
      lorahub validate ./my-lora --base llama-3-8b --max-rank 16
      lorahub validate style.safetensors --base ./sd15.safetensors
      lorahub validate hf://alice/llama-lora --base meta-llama/Meta-Llama-3-8B --json
    """
    from ..base import load_base
    from ..errors import LorahubError
    from ..validate import validate

    loaded = open_adapter(adapter, input_format, allow_pickle)
    spec = base_spec or loaded.base_model
    if not spec:
        raise click.UsageError("the adapter does not name its base model; pass --base SRC")
    if not base_spec and not as_json:
        console.print(safe(f"base: {spec} (named in the adapter)"))
    try:
        base = load_base(spec, revision=revision)
    except LorahubError:
        if base_spec:
            raise
        raise LorahubError(f"cannot load the base the adapter names ('{spec}'); pass --base SRC") from None
    report = validate(loaded, base, max_rank=max_rank)
    if as_json:
        print_json(validation_payload(report, loaded.path))
    else:
        render(report, all_layers=all_layers)
    if not report.ok:
        error_line(report.summary)
    ctx.exit(0 if report.ok else 1)


def validation_payload(report, path=None) -> dict:
    """The report as JSON (docs/json.md): `ok` first, `headline` (the first line of the text output), the
    adapter's `path` and `name`; a failed check adds `error` (the headline) and `exit_code` 1."""
    data = report.to_dict()
    payload = {"ok": data.pop("ok")}
    if not payload["ok"]:
        payload.update(error=report.summary, exit_code=1)
    payload.update(path=None if path is None else str(path), name=data.pop("adapter"), base=data.pop("base"),
                   headline=data.pop("summary"))
    payload.update(data)
    return payload


def render(report, all_layers: bool = False) -> None:
    mark = "[green]✓[/]" if report.ok else "[red]✗[/]"
    console.print(f"{mark} {safe(report.summary)}")
    shown = report.problems if all_layers else report.problems[:LIMIT]
    if shown:
        rows = [[("(warning) " if p.severity == "warning" else "") + p.module, p.expected, p.found, p.hint]
                for p in shown]
        console.print(table(None, ["module", "expected", "found", "hint"], rows))
        if len(report.problems) > len(shown):
            console.print(f"… and {len(report.problems) - len(shown)} more (--all-layers or --json lists all)")
    for line in report.warnings:
        warn(line)
