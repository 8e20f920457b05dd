"""Rendering: one rich console, `--json` output, progress bars, one-line errors."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text


# rich honours NO_COLOR itself; stderr carries progress and errors so stdout stays parseable
def _make_console(stderr: bool) -> Console:
    probe = Console(stderr=stderr)
    # piped output (CI logs, `| less`) gets a wide page instead of rich's 80 columns
    width = None if probe.is_terminal or os.environ.get("COLUMNS") else 200
    # NO_COLOR (no-color.org): no colour and no other styling escapes either
    plain = bool(os.environ.get("NO_COLOR"))
    # emoji=False: "file:abc:" in a message is a path, not the emoji code :abc:
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width, emoji=False,
                   color_system=None if plain else "auto", no_color=plain)


# terminal escape sequences (CSI `ESC [ … final`, OSC `ESC ] … BEL|ESC \\`, DCS/SOS/PM/APC strings, and
# two-byte `ESC x`), then any other C0/C1 control character, DEL, and Unicode bidi/line-separator controls
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]?|\x9b[0-?]*[ -/]*[@-~]?"
                      r"|[\x1b\x9d\x90\x98\x9e\x9f][\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
                      r"|[\x9d\x90\x98\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?|\x1b[ -~]?")
_WHITESPACE = re.compile(r"[\t\n\r\v\f\x85\u2028\u2029]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: object) -> str:
    """Text from a file or the Hub (names, metadata, config values, messages quoting them), safe to print:
    terminal escape sequences and control characters removed, line breaks and tabs made spaces (a
    message stays one line). Print it as plain text (`plain`, `escape`), never as markup."""
    text = str(text)
    if text.isprintable():  # the common case: nothing to do
        return text
    return _CONTROLS.sub("", _WHITESPACE.sub(" ", _ESCAPES.sub("", text)))


def plain(text: object) -> Text:
    """`clean` text as a rich `Text`: printed literally (`[bold]`, `[/]` are characters, not markup)."""
    return Text(clean(text))


def safe(text: object) -> str:
    """`clean` text escaped for a rich markup string: `console.print(f"[bold]{safe(name)}[/]")`."""
    return escape(clean(text))


JSON_META = "lorahub.json"  # click ctx.meta key: the command line has --json (set by options.json_option)

console = _make_console(False)
err_console = _make_console(True)



def print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def table(title: str | None, columns: list[str], rows: list[list[Any]], **kwargs: Any) -> Table:
    out = Table(title=title, title_justify="left", **kwargs)
    for column in columns:
        out.add_column(column)
    for row in rows:
        # cells hold module and file names: plain text, never markup, no control characters
        out.add_row(*[plain(cell) for cell in row])
    return out


def progress_enabled() -> bool:
    # a live bar redraws with cursor escapes: none under NO_COLOR, none when not a terminal
    return err_console.is_terminal and not os.environ.get("LORAHUB_NO_PROGRESS") and \
        not os.environ.get("NO_COLOR")


@contextmanager
def byte_progress(description: str, total: int) -> Iterator[Any]:
    """A progress bar in bytes on stderr; yields `advance(nbytes)`. Silent when not a terminal."""
    if not progress_enabled():
        yield lambda nbytes: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda nbytes: progress.advance(task, nbytes)


@contextmanager
def step_progress(description: str, total: int) -> Iterator[Any]:
    """A progress bar in items (layers, files) on stderr; yields `advance(n=1)`."""
    if not progress_enabled():
        yield lambda n=1: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def error_line(message: str) -> None:
    # messages carry file names and keys, which may contain '[...]' or control characters
    err_console.print(f"[bold red]error:[/] {safe(message)}", markup=True, highlight=False)


def ok_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A successful command's JSON object: `"ok": true` first, then the command's keys (docs/json.md)."""
    return {"ok": True, **{k: v for k, v in payload.items() if k != "ok"}}


def error_payload(message: str, exit_code: int, **extra: Any) -> dict[str, Any]:
    """A failed command's JSON object: `{"ok": false, "error": ..., "exit_code": N}` (docs/json.md)."""
    return {"ok": False, "error": message, "exit_code": exit_code, **extra}


def report_error(message: str, exit_code: int = 1, *, as_json: bool = False, hint: str = "") -> None:
    """The one error style: `error: …` on one line on stderr (`hint` appended there only); with --json
    also the error object on stdout."""
    message = clean(message)
    error_line(message + hint)
    if as_json:
        print_json(error_payload(message, exit_code))


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {safe(message)}", markup=True, highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


