"""`lorahub demo`."""
from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import click

from ..options import json_option
from ..ui import console, ok_payload, print_json


def command_line(argv: Sequence[str]) -> str:
    """`lorahub …` as a shell reads it (every argument quoted where it must be), with `--overwrite` on
    commands that take it, so the line can be run again over the demo's own outputs."""
    from ..cli import cli

    args = list(argv)
    command = cli.commands.get(args[1]) if len(args) > 1 else None
    if command is not None and "--overwrite" in {opt for p in command.params for opt in p.opts}:
        args.append("--overwrite")
    return shlex.join(args)


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the demo's outputs here (default: a temporary directory, removed afterwards).")
@json_option
def demo_command(workdir, as_json):
    """Walk the bundled tiny Llama-shaped base model and PEFT LoRA through inspect, validate, convert,
    merge, unmerge, resize and interpolate, printing the command each step stands for (real, quoted
    paths: run in order, the commands redo the demo) and what it did.

    \b
    Example:
      lorahub demo --workdir ./lorahub-demo
    """
    from ..demo import run_demo

    steps = []

    def say(title: str, argv: Sequence[str], text: str) -> None:
        line = command_line(argv)
        steps.append({"step": title, "command": line, "text": f"{line}\n{text}"})
        if not as_json:
            console.print(f"[bold cyan]▶ {title}[/]")
            console.print(f"{line}\n{text}", markup=False)

    if workdir:
        numbers = run_demo(Path(workdir), say)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="lorahub-demo-"))
        try:
            numbers = run_demo(tmp, say)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        print_json(ok_payload({"workdir": str(Path(workdir).resolve()) if workdir else None, "steps": steps,
                               "numbers": numbers}))
        return
    console.print("[bold green]demo finished[/]: every step above ran the same library call as its command.")
    if not workdir:
        console.print("Its outputs were in a temporary directory, now removed: the commands above, run in "
                      "order, write them again (or keep them with `lorahub demo --workdir DIR`).", markup=False)
