"""`lorahub convert SRC --to FORMAT --out DST`."""
from __future__ import annotations

import click

from ..convert import convert_adapter
from ..options import (
    adapter_input_options,
    json_option,
    open_adapter,
    out_option,
    output_format_option,
    overwrite_option,
)
from ..ui import console, ok_payload, plain, print_json, warn


@click.command("convert")
@click.argument("src")
@output_format_option(required=True)
@out_option()
@overwrite_option()
@click.option("--drop-full-tensors", is_flag=True,
              help="Leave out modules_to_save / saved embedding weights (kohya and diffusers files "
                   "cannot carry them).")
@adapter_input_options
@json_option
def convert_command(src, to_format, out, overwrite, drop_full_tensors, input_format, allow_pickle, as_json):
    """Convert an adapter between PEFT, kohya/A1111 and diffusers formats, keeping every layer's
    effective scale exactly (alpha is re-expressed where a format has no rsLoRA).

    \b
    Examples:
      lorahub convert ./peft-lora --to kohya --out lora.safetensors
      lorahub convert lora.safetensors --to peft --out ./peft-lora
    """
    import time

    start = time.perf_counter()
    adapter = open_adapter(src, input_format, allow_pickle)
    result = convert_adapter(adapter, out, to_format, drop_full_tensors=drop_full_tensors, overwrite=overwrite)
    if as_json:
        print_json(ok_payload({"path": str(adapter.path), "out": result["out"], "from": result["from"],
                               "format": result["to"], "modules": result["modules"],
                               "seconds": round(time.perf_counter() - start, 3), "warnings": result["warnings"]}))
    else:
        console.print(plain(f"converted {result['modules']} modules from {result['from']} to {result['to']}: "
                            f"{result['out']}"))
        for warning in result["warnings"]:
            warn(warning)
