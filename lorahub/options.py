"""The CLI's shared options: one decorator per option that more than one command spells, and the
helpers that turn an adapter argument into an `Adapter`.

Each decorator fixes an option's spelling (long name, short alias, parameter name), its values and
its default, so one concept is one flag with one value set in every command (docs/cli.md): `--dtype
auto|fp32|fp16|bf16`, `--device auto|cpu|cuda[:N]` (default auto), `--rank/-r` (≥ 1), `--rank-method`
with `--param`, `--split`, `--all-layers`, `--json`. Choices come from the library's constants
(`lorahub.formats`, `lorahub.lowrank`), never from lists kept here; a command passes only its own
help text. A value outside an option's set is a usage error (exit 2).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import click

from .devices import DEVICE_HELP
from .formats import FORMATS, READ_FORMATS
from .lowrank import METHODS as RANK_METHODS
from .lowrank import SPLIT_HELP, SPLITS
from .ui import JSON_META

if TYPE_CHECKING:
    from .adapter import Adapter

F = TypeVar("F", bound=Callable)
Decorator = Callable[[F], F]

__all__ = [
    "ADAPTER_OUT_HELP", "DEVICES", "DTYPES", "INPUT_FORMAT_CHOICES", "OUTPUT_FORMAT_CHOICES", "OVERWRITE_HELP",
    "RANK_METHODS", "SPLITS", "DeviceType", "DtypeType", "adapter_input_options", "all_layers_option",
    "allow_pickle_option", "alpha_option", "device_option", "dtype_option", "given_alpha", "input_format_option",
    "json_option", "open_adapter",
    "out_option", "output_format_option", "overwrite_option", "rank_method_option", "rank_option",
    "rank_param_option", "resolve_path", "split_option", "torch_dtype_name",
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


ALPHA_META = "lorahub.alpha"


def _remember_alpha(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        beyond = " (beyond ±1.8e308, the largest float)" if math.isinf(value) else ""
        raise click.BadParameter(f"{value} is not a finite number{beyond}", ctx=ctx, param=param)
    if value is not None and value <= 0:  # PEFT's lora_alpha of a trained adapter: 0 erases ΔW, < 0 flips it
        raise click.BadParameter(f"{value:g} is not a lora_alpha (> 0): 0 would merge nothing and a negative "
                                 "alpha flips the adapter's delta", ctx=ctx, param=param)
    ctx.meta[ALPHA_META] = value


def alpha_option() -> Decorator:
    """`--alpha`: the lora_alpha of adapters whose file does not give their scale (PEFT weights without
    adapter_config.json). Kept in the context (no command parameter): `open_adapter` applies it."""
    return click.option("--alpha", type=float, default=None, expose_value=False, callback=_remember_alpha,
                        metavar="LORA_ALPHA",
                        help="lora_alpha of an adapter whose file does not give its scale (PEFT weights "
                             "without adapter_config.json); refused for adapters whose file gives it.")


def given_alpha(ctx: click.Context | None = None) -> float | None:
    """The --alpha of the running command, if any."""
    ctx = ctx or click.get_current_context(silent=True)
    return ctx.meta.get(ALPHA_META) if ctx is not None else None


def adapter_input_options(func: F) -> F:
    """`--format`, `--allow-pickle` and `--alpha`, for commands that read adapters."""
    return input_format_option()(allow_pickle_option()(alpha_option()(func)))


def resolve_path(arg: str) -> Path:
    """A local path, or an `hf://owner/name[@rev][/file]` reference pulled into the HF cache first."""
    if arg.startswith("hf://"):
        from .hub import resolve_adapter_path

        return Path(resolve_adapter_path(arg))
    return Path(arg)


def open_adapter(arg: str, input_format: str | None = "auto", allow_pickle: bool = False) -> Adapter:
    """The adapter an argument names (a local path or `hf://…`), read as `--format` says."""
    from .formats import load_adapter

    adapter = load_adapter(resolve_path(arg), None if input_format in (None, "auto") else input_format,
                           allow_pickle=allow_pickle)
    alpha = given_alpha()
    if alpha is not None:
        adapter.assume_alpha(alpha)
    return adapter


LYCORIS_BASE_HELP = ("The base model (any layout validate takes, or a registry name; headers only): tells apart "
                     "what a LyCORIS LoHa/LoKr module's flattened factors adapt (a Linear or a k×k convolution). "
                     "Needed only for LyCORIS inputs.")


def lycoris_base_option(func: F) -> F:
    """`--base` on commands that write LyCORIS inputs as plain LoRA files (convert, resize, blend)."""
    return click.option("--base", "lycoris_base", default=None, metavar="SRC", help=LYCORIS_BASE_HELP)(func)


def resolve_lycoris(adapters: list[Adapter], base_spec: str | None) -> None:
    """Give flattened LyCORIS layers their base layer's shape (`lorahub.lycoris.resolve_with_base`)."""
    if base_spec is None or not any(layer.lycoris is not None for a in adapters for layer in a.layers.values()):
        return
    from .base import load_base
    from .lycoris import resolve_with_base

    base = load_base(base_spec)
    for adapter in adapters:
        resolve_with_base(adapter, base)


# ---- outputs -----------------------------------------------------------------------------------

def out_option(*, help: str = ADAPTER_OUT_HELP, required: bool = True, metavar: str | None = None,
               file_okay: bool = True, path_type: type | None = None) -> Decorator:
    """`--out/-o`, on every command that writes: an adapter path (convert, resize, blend, interpolate), a
    model directory (merge, unmerge: `metavar="DIR"`), an optional folder (pull: `required=False,
    file_okay=False`), a manifest file (registry add). What may be written there is `lorahub.output`'s
    policy, applied by the library; it goes with `overwrite_option`."""
    # no `default=None` when required: Click ≥ 8.3 counts an explicit None as given
    extra = {} if required else {"default": None}
    return click.option("--out", "-o", "out", required=required, metavar=metavar,
                        type=click.Path(file_okay=file_okay, path_type=path_type), help=help, **extra)


OVERWRITE_HELP = ("Replace an existing --out: a file, or a directory written by an earlier run (one holding any "
                  "other file is refused). The new output is swapped in only once it is complete.")


def overwrite_option(*, help: str = OVERWRITE_HELP) -> Decorator:
    """`--overwrite`: the one spelling on every writing command (there is no `--force`)."""
    return click.option("--overwrite", "overwrite", is_flag=True, help=help)


def output_format_option(*, required: bool = False, help: str = "Output format.") -> Decorator:
    """`--to`: the format written. Required for convert; resize and blend default to the input's."""
    # no `default=None` when required: Click ≥ 8.3 counts an explicit None as given, and `convert` without
    # --to then ran (and wrote a PEFT folder) instead of being a usage error
    extra = {} if required else {"default": None}
    return click.option("--to", "to_format", type=click.Choice(OUTPUT_FORMAT_CHOICES), required=required,
                        help=help, **extra)


# `--dtype`: one value set everywhere; the library spellings are accepted as aliases (not listed in --help)
DTYPES = ("auto", "fp32", "fp16", "bf16")
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_TORCH_DTYPE_NAMES = {"auto": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class DtypeType(click.Choice):
    """auto|fp32|fp16|bf16; float32, float16 and bfloat16 are read as fp32, fp16 and bf16."""

    def __init__(self) -> None:
        super().__init__(list(DTYPES), case_sensitive=False)

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, str):
            value = DTYPE_ALIASES.get(value.strip().lower(), value)
        return super().convert(value, param, ctx)


def torch_dtype_name(dtype: str | None) -> str | None:
    """'fp16' → 'float16' (the name on `torch`); 'auto'/None → None (keep the input's dtype)."""
    return _TORCH_DTYPE_NAMES[DTYPE_ALIASES.get(dtype or "auto", dtype or "auto")]


def dtype_option(*, help: str) -> Decorator:
    """`--dtype auto|fp32|fp16|bf16`, default auto: keep the input's dtype (what "the input's" is — each
    tensor's, each layer's, the first adapter's — the command's help says). Map the value with
    `torch_dtype_name` (blend, resize) or pass it as is (merge, unmerge)."""
    return click.option("--dtype", "dtype", type=DtypeType(), default="auto", show_default=True, help=help)


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    # eager, so it is known before any other option fails to parse: errors come back as JSON too
    ctx.meta[JSON_META] = bool(value)
    return value


json_option = click.option("--json", "as_json", is_flag=True, is_eager=True, callback=_remember_json,
                           help="Print machine-readable JSON on stdout (errors too; docs/json.md).")


# ---- compute -----------------------------------------------------------------------------------

DEVICES = "auto|cpu|cuda|cuda:N"


class DeviceType(click.ParamType):
    """auto, cpu, cuda or cuda:N, checked when parsed (anything else is a usage error); whether this
    machine has that device is checked when the command runs (`lorahub.devices.resolve_device`, exit 1)."""

    name = "device"

    def get_metavar(self, param, ctx=None):  # type: ignore[no-untyped-def,override]
        return f"[{DEVICES}]"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        text = str(value).strip().lower()
        if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
            return text
        self.fail(f"'{value}' is not a device (use auto, cpu, cuda or cuda:N)", param, ctx)


def device_option() -> Decorator:
    """`--device auto|cpu|cuda[:N]`, default auto (CUDA when available), in every command that computes
    (merge, unmerge, resize, blend, interpolate)."""
    return click.option("--device", "device", type=DeviceType(), default="auto", show_default=True,
                        help=DEVICE_HELP)


def rank_option(*, help: str) -> Decorator:
    """`--rank/-r N` (N ≥ 1, else a usage error): the target rank, or the cap of a dynamic rank rule."""
    return click.option("--rank", "-r", "rank", type=click.IntRange(min=1), default=None, help=help)


def rank_method_option(*, help: str) -> Decorator:
    """`--rank-method fixed|sv_ratio|sv_fro|sv_cumulative` (default fixed), with `--param` (resize,
    blend, interpolate)."""
    return click.option("--rank-method", "rank_method", type=click.Choice(RANK_METHODS), default="fixed",
                        show_default=True, help=help)


def rank_param_option(*, help: str = "The --rank-method parameter (e.g. 0.99).") -> Decorator:
    """`--param`: the dynamic rank rule's parameter."""
    return click.option("--param", "param", type=float, default=None, help=help)


def split_option(*, help: str = SPLIT_HELP + ".") -> Decorator:
    """`--split balanced|up|down`: where the singular values go after an SVD (resize; blend's comes from
    its method registry with the same values)."""
    return click.option("--split", "split", type=click.Choice(list(SPLITS)), default="balanced",
                        show_default=True, help=help)


# ---- reports -----------------------------------------------------------------------------------

def all_layers_option(*, help: str) -> Decorator:
    """`--all-layers`: print every layer where the report would otherwise stop at a limit or leave the
    per-layer table out (inspect, validate, resize, blend, interpolate)."""
    return click.option("--all-layers", "all_layers", is_flag=True, help=help)
