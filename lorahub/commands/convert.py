"""`lorahub convert SRC --to FORMAT --out DST`."""
from __future__ import annotations

import click

from ..convert import convert_adapter
from ..options import (
    adapter_input_options,
    json_option,
    lycoris_base_option,
    open_adapter,
    out_option,
    output_format_option,
    overwrite_option,
    resolve_lycoris,
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
@lycoris_base_option
@adapter_input_options
@json_option
def convert_command(src, to_format, out, overwrite, drop_full_tensors, lycoris_base, input_format, allow_pickle,
                    as_json):
    """Convert an adapter between PEFT, kohya/A1111 and diffusers formats, keeping every layer's
    effective scale exactly (alpha is re-expressed where a format has no rsLoRA). LyCORIS files
    (LoHa, LoKr, LoCon, full) are written as plain LoRA layers of exactly the same delta
    (docs/lycoris.md); LoHa/LoKr files need --base. Flux, SD3, Wan, HunyuanVideo, LTX-Video and
    Qwen-Image modules are written in the names the target format's readers load (diffusers names
    for diffusers/PEFT, kohya's for kohya; fused q/k/v split or joined exactly).

    \b
    Examples:
      lorahub convert ./peft-lora --to kohya --out lora.safetensors
      lorahub convert lora.safetensors --to peft --out ./peft-lora
      lorahub convert loha.safetensors --base sdxl-base --to kohya --out lora.safetensors
      lorahub convert flux_kohya.safetensors --to diffusers --out flux_diffusers.safetensors
    """
    import time

    start = time.perf_counter()
    adapter = open_adapter(src, input_format, allow_pickle)
    resolve_lycoris([adapter], lycoris_base)
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
