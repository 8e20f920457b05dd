"""`lorahub convert SRC --to FORMAT --out DST`."""
from __future__ import annotations

import click

from ..cliutil import adapter_input_options, open_adapter
from ..convert import convert_adapter
from ..ui import console, json_option, print_json, warn


@click.command("convert")
@click.argument("src")
@click.option("--to", "to_format", type=click.Choice(["peft", "kohya", "diffusers"]), required=True,
              help="Output format.")
@click.option("--out", "out", required=True, type=click.Path(), help="Output path (a directory for peft).")
@click.option("--drop-full-tensors", is_flag=True,
              help="Leave out modules_to_save / saved embedding weights (kohya and diffusers files "
                   "cannot carry them).")
@adapter_input_options
@json_option
def convert_command(src, to_format, out, drop_full_tensors, input_format, allow_pickle, as_json):
    """Convert an adapter between PEFT, kohya/A1111 and diffusers formats, keeping every layer's
    effective scale exactly (alpha is re-expressed where a format has no rsLoRA).

    \b
    Examples:
      lorahub convert ./peft-lora --to kohya --out lora.safetensors
      lorahub convert lora.safetensors --to peft --out ./peft-lora
    """
    adapter = open_adapter(src, input_format, allow_pickle)
    result = convert_adapter(adapter, out, to_format, drop_full_tensors=drop_full_tensors)
    if as_json:
        print_json(result)
    else:
        console.print(f"converted {result['modules']} modules from {result['from']} to {result['to']}: "
                      f"{result['out']}", markup=False)
        for warning in result["warnings"]:
            warn(warning)
