"""`lorahub list [PATH...]`, `lorahub search [QUERY]`, `lorahub rm REPO_OR_PATH`: the adapter library.

The listing is plain text (a thousand rows print in milliseconds; a rich table takes half a second),
one row per adapter; problems follow, one line each; `--json` has everything (docs/json.md).
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Sequence

import click

from ..formats import READ_FORMATS
from ..options import json_option
from ..ui import clean, err_console, human_bytes, ok_payload, print_json

# file names, metadata and Hub-provided text: terminal escapes and control characters removed (ui.clean)
_plain = clean


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(columns: Sequence[str], rows: list[list[str]], right: Sequence[str] = ()) -> list[str]:
    """Aligned plain-text rows under a header (numbers right-aligned); the last column is not padded."""
    cells = [[_plain(c) for c in row] for row in rows]
    widths = [max([len(columns[i])] + [len(row[i]) for row in cells]) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        out = []
        for i, value in enumerate(values):
            if i == len(values) - 1:
                out.append(value)
            elif columns[i] in right:
                out.append(value.rjust(widths[i]))
            else:
                out.append(value.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return [line(list(columns))] + [line(row) for row in cells]


def _span(pairs: list[list[Any]] | None) -> str:
    """'16', '4–16', or '?' from a [[value, count], …] distribution."""
    values = [v for v, _ in pairs or [] if v is not None]
    if not values:
        return "?"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def _local_time(ns: int) -> str:
    return _dt.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M")


def _short_base(base: str | None) -> str:
    if not base:
        return ""
    parts = str(base).replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else str(base)


def _row(entry: Any) -> list[str]:
    s = entry.summary
    algorithm = s.get("algorithm")
    fmt = str(s.get("format") or "?") + (f"/{algorithm}" if algorithm and algorithm != "lora" else "")
    model = " ".join(x for x in (s.get("family") or "?", _cut(_short_base(s.get("base_model")), 40)) if x)
    alpha = "?" if s.get("alphas") is None else f"{_span(s.get('alphas'))} / {_span(s.get('scales'))}"
    targets = ", ".join(str(name) for name, _ in s.get("targets") or [])
    lycoris = ", ".join(f"{algo} {n}" for algo, n in (s.get("lycoris") or {}).items())
    modules = s.get("modules")
    what = f"{modules if modules is not None else '?'}: {targets}" if targets else (lycoris or "")
    if targets and lycoris:
        what += f"; {lycoris}"
    return [entry.name, fmt, model, _span(s.get("ranks")), alpha, human_bytes(entry.candidate.size),
            _local_time(entry.candidate.modified_ns), _cut(what, 60)]


@click.command("list")
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option("--fits", "fits", metavar="BASE",
              help="Keep the adapters that validate against BASE: a model folder or .safetensors file, a registry "
                   "name (`lorahub registry list`) or a Hub repo owner/name[@revision] (shapes from headers).")
@click.option("--format", "format_name", type=click.Choice(list(READ_FORMATS)), default=None,
              help="Keep the adapters of this format.")
@click.option("--sort", "sort", type=click.Choice(["name", "size", "rank", "modified"]), default="name",
              show_default=True, help="Order: name ascending; size, rank (the largest) and modified newest first.")
@json_option
def list_command(paths: tuple[str, ...], fits: str | None, format_name: str | None, sort: str,
                 as_json: bool) -> None:
    """List every adapter under PATHs: format, model family and base model, ranks, alpha/scale, targets,
    size, modified — from headers only (no tensor data is read).

    Without PATH: the Hugging Face cache (HF_HUB_CACHE / HF_HOME) and the folders in LORAHUB_LIBRARY
    (separated by ':'). PEFT folders, kohya/A1111, LyCORIS and diffusers files are found at any depth;
    base models' weights and other non-adapter files are not listed; corrupt adapters are listed as
    problems, one line each, and the listing goes on (exit 0). An index in LORAHUB_HOME (default
    ~/.cache/lorahub) remembers each file by path, size and mtime: listing again reads only what changed.

    \b
    Examples:
      lorahub list
      lorahub list ~/loras --sort modified
      lorahub list ~/loras --fits llama-3-8b
      lorahub list ~/loras --format kohya --json
    """
    from ..library import list_library

    listing = list_library(list(paths) or None, format=format_name, sort=sort, fits=fits)
    if as_json:
        print_json(ok_payload(listing.to_dict()))
        return
    for warning in listing.warnings:
        err_console.print(f"[yellow]warning:[/] {_plain(warning)}", markup=True, highlight=False)
    if listing.entries:
        columns = ["NAME", "FORMAT", "MODEL", "RANK", "ALPHA / SCALE", "SIZE", "MODIFIED", "TARGETS"]
        lines = render_table(columns, [_row(e) for e in listing.entries], right=("RANK", "SIZE"))
        click.echo("\n".join(lines))
    for problem in listing.problems:
        click.echo(_plain(f"problem: {problem.path}: {problem.error}"))
    where = f" in {', '.join(listing.roots)}" if listing.roots else \
        " (no Hugging Face cache yet, LORAHUB_LIBRARY not set)"
    count = f"{len(listing.entries)} adapter{'s' if len(listing.entries) != 1 else ''}"
    if listing.base is not None:
        count += f" fitting {listing.base} ({listing.excluded} other{'s' if listing.excluded != 1 else ''})"
    problems = f", {len(listing.problems)} problem{'s' if len(listing.problems) != 1 else ''}" \
        if listing.problems else ""
    err_console.print(_plain(f"{count}{problems}{where}; headers read: {listing.read}, "
                             f"from the index: {listing.reused} ({listing.seconds:.2f} s)"),
                      markup=False, highlight=False)


@click.command("search")
@click.argument("query", required=False)
@click.option("--base", "base", metavar="MODEL_ID",
              help="Adapters of this base model (the Hub's base_model:adapter:MODEL_ID tag); "
                   "default: models tagged lora.")
@click.option("--author", metavar="A", help="Only this user's or organisation's repos.")
@click.option("--sort", "sort", type=click.Choice(["downloads", "likes", "modified"]), default="downloads",
              show_default=True, help="Most downloaded, most liked or most recently modified first.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, metavar="N",
              help="At most N results (1–1000).")
@click.option("--check", is_flag=True,
              help="Check that each adapter fits --base, from its safetensors headers (Range requests; no weights "
                   "downloaded).")
@json_option
def search_command(query: str | None, base: str | None, author: str | None, sort: str, limit: int, check: bool,
                   as_json: bool) -> None:
    """Find adapters on the Hugging Face Hub: repo, downloads, likes, last modified, library, base model.

    QUERY matches repo ids (a substring). With --base MODEL_ID, the adapters the Hub links to that base
    (its model cards' base_model with base_model_relation: adapter, as `lorahub push` writes them); with
    --check, whether each one's shapes fit that base (validate, from headers only).

    \b
    Examples:
      lorahub search --base meta-llama/Llama-3.1-8B
      lorahub search anime --base stabilityai/stable-diffusion-xl-base-1.0 --sort likes --limit 10
      lorahub search --base meta-llama/Llama-3.1-8B --author alice --check --json
    """
    from ..errors import OptionError
    from ..hub.search import search_models

    if check and not base:
        raise OptionError("--check needs --base MODEL_ID (the base to check the adapters against)")
    models = search_models(query, base=base, author=author, sort=sort, limit=limit, files=check)
    checks: dict[str, Any] = {}
    base_label = base
    if check and base:
        from ..base import load_base
        from ..library.remote import check_hub_adapters

        base_model = load_base(base)
        base_label = base_model.display_name
        checks = check_hub_adapters(models, base_model)
    rows = []
    for model in models:
        row: dict[str, Any] = {"repo_id": model.repo_id, "author": model.author, "downloads": model.downloads,
                               "likes": model.likes, "modified": model.modified, "library": model.library,
                               "base_models": model.base_models}
        if check:
            row.update(checks[model.repo_id].to_dict())
        rows.append(row)
    if as_json:
        print_json(ok_payload({"query": query, "base": base, "author": author, "sort": sort, "limit": limit,
                               "results": rows}))
        return
    columns = ["REPO", "DOWNLOADS", "LIKES", "MODIFIED", "LIBRARY", "BASE"] + (["FITS"] if check else [])
    table_rows = []
    for row in rows:
        cells = [row["repo_id"], str(row["downloads"] if row["downloads"] is not None else "?"),
                 str(row["likes"] if row["likes"] is not None else "?"), (row["modified"] or "?")[:10],
                 row["library"] or "", _cut(", ".join(row["base_models"]), 50)]
        if check:
            cells.append({True: "yes", False: "no", None: "?"}[row["fits"]])
        table_rows.append(cells)
    if table_rows:
        click.echo("\n".join(render_table(columns, table_rows, right=("DOWNLOADS", "LIKES"))))
    for row in rows:
        if check and row["fits"] is not True:
            click.echo(_plain(f"{row['repo_id']}: {row['check']}"))
    what = f"adapters of {base}" if base else "models tagged lora"
    fitting = f", {sum(1 for r in rows if r.get('fits'))} fit {base_label}" if check else ""
    err_console.print(_plain(f"{len(rows)} {what}{fitting}"), markup=False, highlight=False)


@click.command("rm")
@click.argument("target", metavar="REPO_OR_PATH")
@click.option("--yes", "-y", "yes", is_flag=True, help="Remove without asking.")
@json_option
def rm_command(target: str, yes: bool, as_json: bool) -> None:
    """Remove an adapter from the Hugging Face cache or a LORAHUB_LIBRARY folder (asks first).

    REPO is owner/name[@revision] or hf://owner/name[@revision]: its cached revisions (all, or the one
    named) go through huggingface_hub's cache API, which keeps files other revisions share. PATH is an
    adapter in the cache or in a library folder: a file, or a PEFT folder that holds nothing but the
    adapter. Nothing outside the cache and the library folders is ever removed.

    \b
    Examples:
      lorahub rm alice/llama-lora
      lorahub rm alice/llama-lora@v1.0 --yes
      lorahub rm ~/loras/old-style.safetensors
    """
    from ..errors import OptionError
    from ..library.remove import execute, plan

    removal = plan(target)
    if not yes:
        if as_json:
            raise OptionError("--json does not ask: pass --yes to remove")
        err_console.print(_plain(f"remove {removal.summary}, {human_bytes(removal.size)}:"), markup=False,
                          highlight=False)
        for name in removal.files[:20]:
            err_console.print(_plain(f"  {name}"), markup=False, highlight=False)
        if len(removal.files) > 20:
            err_console.print(f"  … {len(removal.files) - 20} more", markup=False, highlight=False)
        try:
            confirmed = click.confirm("remove?", default=False, err=True)
        except click.Abort:  # no answer (end of input)
            confirmed = False
        if not confirmed:
            from ..errors import LorahubError

            raise LorahubError("nothing removed (answer y to remove, or pass --yes)")
    removed = execute(removal)
    if as_json:
        print_json(ok_payload({"target": target, **removed.to_dict()}))
        return
    click.echo(_plain(f"removed {removal.summary}; freed {human_bytes(removed.bytes_freed)}"))
