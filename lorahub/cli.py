"""The `lorahub` command: a thin Click skin over the library.

Commands live one module each in `lorahub/commands/`; every module-level `click.Command` there is
added to the group, so adding a command never means editing this file.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback

import click

from . import __version__
from .errors import LorahubError
from .ui import error_line

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class LorahubGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LorahubError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            error_line(str(exc))
            ctx.exit(exc.exit_code)
        except OSError as exc:  # the disk, not our code: unwritable --out, disk full, permissions
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            where = f"{exc.filename}: " if exc.filename else ""
            error_line(f"{where}{exc.strerror or exc}; nothing was written")
            ctx.exit(1)
        except KeyboardInterrupt:
            error_line("interrupted; no output was written")
            ctx.exit(130)


@click.group(cls=LorahubGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="lorahub")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Manage LoRA adapters the way git manages commits.

    \b
    Examples:
      lorahub inspect adapter_dir/
      lorahub validate adapter.safetensors --base llama-3-8b
      lorahub merge --base ./Llama-3-8B ./adapter --out ./merged
      lorahub resize adapter_dir --rank 4 --out small/
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register_commands() -> None:
    from . import commands

    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, click.Command) and value is not cli and value.name not in cli.commands:
                cli.add_command(value)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="lorahub", standalone_mode=True)
    except SystemExit:
        raise
    except LorahubError as exc:  # raised outside a command (e.g. during option callbacks)
        error_line(str(exc))
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
