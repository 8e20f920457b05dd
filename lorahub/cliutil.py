"""Options and argument handling shared by the CLI commands."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from .adapter import Adapter

FORMAT_CHOICES = ["auto", "peft", "kohya", "diffusers", "lycoris"]


def adapter_input_options(func: Callable) -> Callable:
    """--format and --allow-pickle, for commands that read adapters."""
    func = click.option("--allow-pickle", is_flag=True,
                        help="Load .bin/.pt pickle files (with torch.load(weights_only=True)).")(func)
    func = click.option("--format", "input_format", type=click.Choice(FORMAT_CHOICES), default="auto",
                        show_default=True, help="Input format (auto-detected from files and keys).")(func)
    return func


def resolve_path(arg: str) -> Path:
    """A local path, or an `hf://owner/name[@rev][/file]` reference pulled into the HF cache first."""
    if arg.startswith("hf://"):
        from .hub import resolve_adapter_path

        return Path(resolve_adapter_path(arg))
    return Path(arg)


def open_adapter(arg: str, input_format: str | None = "auto", allow_pickle: bool = False) -> Adapter:
    from .formats import load_adapter

    return load_adapter(resolve_path(arg), None if input_format in (None, "auto") else input_format,
                        allow_pickle=allow_pickle)
