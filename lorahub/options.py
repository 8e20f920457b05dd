"""The CLI's shared options: one decorator per option that more than one command spells, and the
helpers that turn an adapter argument into an `Adapter`.

Each decorator fixes an option's spelling (long name, short alias, parameter name) and its choices,
which come from the library's constants (`lorahub.formats`, `lorahub.lowrank`, `lorahub.devices`),
never from lists kept here. Where commands still differ in a default, a help text or an older
spelling, the command passes it (and the older spelling stays as an alias); those differences are
named at each decorator.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import click

from .devices import DEVICE_HELP
from .formats import FORMATS, READ_FORMATS
from .lowrank import METHODS as RANK_METHODS

if TYPE_CHECKING:
    from .adapter import Adapter

F = TypeVar("F", bound=Callable)
Decorator = Callable[[F], F]

__all__ = [
    "ADAPTER_OUT_HELP", "INPUT_FORMAT_CHOICES", "OVERWRITE_HELP", "OUTPUT_FORMAT_CHOICES", "RANK_METHODS",
    "adapter_input_options", "allow_pickle_option", "device_option", "dtype_option", "input_format_option",
    "json_option", "open_adapter", "out_option", "output_format_option", "overwrite_option", "rank_method_option",
    "rank_option", "rank_param_option", "resolve_path",
]

INPUT_FORMAT_CHOICES = ["auto", *READ_FORMATS]
OUTPUT_FORMAT_CHOICES = list(FORMATS)
ADAPTER_OUT_HELP = "Output path: a directory for PEFT, a .safetensors file for kohya/diffusers."


# ---- inputs ------------------------------------------------------------------------------------

def input_format_option() -> Decorator:
    """`--format`: the adapter's on-disk format, or auto-detection."""
    return click.option("--format", "input_format", type=click.Choice(INPUT_FORMAT_CHOICES), default="auto",
                        show_default=True, help="Adapter format (auto-detected from files and keys).")


def allow_pickle_option() -> Decorator:
    """`--allow-pickle`: pickles are refused unless asked for, and then loaded weights-only."""
    return click.option("--allow-pickle", is_flag=True,
                        help="Load .bin/.pt adapter pickles (with torch.load(weights_only=True)).")


def adapter_input_options(func: F) -> F:
    """`--format` and `--allow-pickle`, for commands that read adapters."""
    return input_format_option()(allow_pickle_option()(func))


def resolve_path(arg: str) -> Path:
    """A local path, or an `hf://owner/name[@rev][/file]` reference pulled into the HF cache first."""
    if arg.startswith("hf://"):
        from .hub import resolve_adapter_path

        return Path(resolve_adapter_path(arg))
    return Path(arg)


def open_adapter(arg: str, input_format: str | None = "auto", allow_pickle: bool = False) -> Adapter:
    """The adapter an argument names (a local path or `hf://…`), read as `--format` says."""
    from .formats import load_adapter

    return load_adapter(resolve_path(arg), None if input_format in (None, "auto") else input_format,
                        allow_pickle=allow_pickle)


# ---- outputs -----------------------------------------------------------------------------------

def out_option(*, help: str = ADAPTER_OUT_HELP, required: bool = True, metavar: str | None = None,
               file_okay: bool = True, path_type: type | None = None) -> Decorator:
    """`--out/-o`, on every command that writes: an adapter path (convert, resize, blend, interpolate), a
    model directory (merge, unmerge: `metavar="DIR"`), an optional folder (pull: `required=False,
    file_okay=False`), a manifest file (registry add). What may be written there is `lorahub.output`'s
    policy, applied by the library; it goes with `overwrite_option`."""
    return click.option("--out", "-o", "out", required=required, default=None, metavar=metavar,
                        type=click.Path(file_okay=file_okay, path_type=path_type), help=help)


OVERWRITE_HELP = ("Replace an existing --out: a file, or a directory written by an earlier run (one holding any "
                  "other file is refused). The new output is swapped in only once it is complete.")


def overwrite_option(*, help: str = OVERWRITE_HELP) -> Decorator:
    """`--overwrite`: the one spelling on every writing command (there is no `--force`)."""
    return click.option("--overwrite", "overwrite", is_flag=True, help=help)


def output_format_option(*, required: bool = False, help: str = "Output format.") -> Decorator:
    """`--to`: the format written. Required for convert; resize and blend default to the input's."""
    return click.option("--to", "to_format", type=click.Choice(OUTPUT_FORMAT_CHOICES), required=required,
                        default=None, help=help)


def dtype_option(choices: Sequence[str], *aliases: str, default: str | None = None, help: str) -> Decorator:
    """`--dtype`: the output dtype. The value spellings still differ by command (merge, unmerge:
    auto|fp32|fp16|bf16; resize, spelled `--save-dtype` (kept as an alias): keep|fp32|fp16|bf16;
    blend, interpolate: float32|float16|bfloat16), so each passes its choices."""
    return click.option("--dtype", *aliases, "dtype", type=click.Choice(list(choices)), default=default,
                        show_default=default is not None, help=help)


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


# ---- compute -----------------------------------------------------------------------------------

def device_option(*, default: str = "auto") -> Decorator:
    """`--device`, resolved by `lorahub.devices.resolve_device`. Default auto, except resize (cpu)."""
    return click.option("--device", "device", default=default, show_default=True, metavar="DEVICE",
                        help=DEVICE_HELP)


def rank_option(*, help: str, value_type: click.ParamType | type = click.IntRange(min=1)) -> Decorator:
    """`--rank/-r`: the target rank, or the cap of a dynamic rank rule. resize checks the value
    itself (`value_type=int`: a rank below 1 exits 1 there, 2 in blend)."""
    return click.option("--rank", "-r", "rank", type=value_type, default=None, help=help)


def rank_method_option(*aliases: str, default: str | None = "fixed", help: str) -> Decorator:
    """`--rank-method`: fixed or a dynamic per-layer rank rule. resize spells it `--method` (kept as
    an alias; blend's `--method` is the blend method) and defaults to none (fixed unless --param)."""
    return click.option("--rank-method", *aliases, "rank_method", type=click.Choice(RANK_METHODS),
                        default=default, show_default=default is not None, help=help)


def rank_param_option(*, help: str = "The --rank-method parameter (e.g. 0.99).") -> Decorator:
    """`--param`: the dynamic rank rule's parameter."""
    return click.option("--param", "param", type=float, default=None, help=help)
