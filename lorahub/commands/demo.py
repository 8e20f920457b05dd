"""`lorahub demo`."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from ..demo import run_demo
from ..options import json_option
from ..ui import console, print_json


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the demo's files here (default: a temporary directory, removed afterwards).")
@json_option
def demo_command(workdir, as_json):
    """Walk the bundled tiny Llama-shaped base model and PEFT LoRA through inspect, validate, convert,
    merge, unmerge, resize and interpolate, printing what each step did.

    \b
    Example:
      lorahub demo --workdir ./lorahub-demo
    """
    steps = []

    def say(title: str, text: str) -> None:
        steps.append({"step": title, "text": text})
        if not as_json:
            console.print(f"[bold cyan]▶ {title}[/]")
            console.print(text, markup=False)

    if workdir:
        numbers = run_demo(Path(workdir), say)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="lorahub-demo-"))
        try:
            numbers = run_demo(tmp, say)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        print_json({"steps": steps, "numbers": numbers})
    else:
        console.print("[bold green]demo finished[/]: every step above ran the same library call as its command.")
