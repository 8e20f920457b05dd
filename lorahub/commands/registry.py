"""`lorahub registry list | show NAME | add PATH_OR_REPO --name NAME | remove NAME`."""
from __future__ import annotations

from pathlib import Path

import click

from ..options import json_option, out_option, overwrite_option
from ..ui import console, human_bytes, ok_payload, print_json, safe, table


def _params(n: int | None) -> str:
    if not n:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _check_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A registry name is a name (checked when parsed: a usage error, exit 2)."""
    from ..registry import NAME_RE

    if value is not None and not NAME_RE.match(value):
        raise click.BadParameter(f"invalid registry name '{value}' (lower-case letters, digits, '.', '_', '-')")
    return value


@click.group("registry")
def registry_group() -> None:
    """Shape manifests of base models: validate against `--base llama-3-8b` offline.

    \b
    Examples:
      lorahub registry list
      lorahub registry show sdxl
      lorahub registry add ./my-finetune --name my-finetune
      lorahub registry add mistralai/Mistral-7B-Instruct-v0.3 --name mistral-7b-instruct
    """


@registry_group.command("list")
@json_option
def list_command(as_json: bool) -> None:
    """List built-in and user manifests.

    \b
    Example:
      lorahub registry list --json
    """
    from ..registry import list_manifests, user_dir

    refs = list_manifests()
    if as_json:
        print_json([ref.to_dict() for ref in refs])
        return
    rows = [[ref.name, ref.repo_id or "", ref.layout or "", _params(ref.params), ref.dtype or "",
             "built-in" if ref.builtin else "user"] for ref in refs]
    console.print(table(None, ["name", "repo", "layout", "params", "dtype", "origin"], rows))
    console.print(safe(f"user manifests: {user_dir()}"))


@registry_group.command("show")
@click.argument("name")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor with its shape.")
@json_option
def show_command(name: str, show_tensors: bool, as_json: bool) -> None:
    """Describe one manifest: source, layout, parameters, components.

    \b
    Examples:
      lorahub registry show llama-3-8b
      lorahub registry show sdxl --tensors
    """
    from ..errors import LorahubError
    from ..registry import find_manifest, load_manifest

    ref = find_manifest(name)
    if ref is None:
        raise LorahubError(f"no registry manifest named '{name}' (see `lorahub registry list`)")
    base = load_manifest(ref)
    if as_json:
        payload = ref.to_dict()
        payload["config"] = base.config
        payload["components"] = base.components
        if show_tensors:
            payload["tensor_shapes"] = {t.name: [list(t.shape), t.dtype] for t in base.tensors.values()}
        print_json(ok_payload(payload))
        return
    source = ref.source
    if isinstance(source, dict):
        source = ", ".join(f"{k}: {v}" for k, v in source.items())
    grid = [("name", ref.name), ("repo", ref.repo_id or ""), ("aliases", ", ".join(ref.aliases)),
            ("source", source or ""), ("layout", ref.layout or ""),
            ("parameters", f"{base.num_params:,} ({human_bytes(base.nbytes)} as {ref.dtype})"),
            ("tensors", str(len(base.tensors))), ("file", str(ref.path)),
            ("origin", "built-in" if ref.builtin else "user")]
    if base.components:
        counts = {c: sum(1 for t in base.tensors if t.startswith(c + ".")) for c in base.components}
        grid.append(("components", ", ".join(f"{c} ({n} tensors)" for c, n in counts.items())))
    for key, value in grid:
        if value:
            console.print(f"[bold]{key:<11}[/] {safe(value)}")
    if show_tensors:
        console.print(table(None, ["tensor", "shape", "dtype"],
                            [[t.name, list(t.shape), t.dtype] for t in base.tensors.values()]))


@registry_group.command("add")
@click.argument("spec", metavar="PATH_OR_REPO")
@click.option("--name", required=True, callback=_check_name,
              help="Registry name (lower-case letters, digits, '.', '_', '-').")
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@out_option(required=False, metavar="FILE", path_type=Path,
            help="Write the manifest to this file instead of $LORAHUB_HOME/registry/NAME.json.")
@overwrite_option(help="Replace an existing manifest of that name (or shadow a built-in), or an existing --out file.")
@json_option
def add_command(spec: str, name: str, revision: str | None, out: Path | None, overwrite: bool,
                as_json: bool) -> None:
    """Add a manifest from a local model's headers or a Hub repo's headers (no weights downloaded).

    Written to $LORAHUB_HOME/registry (default ~/.cache/lorahub/registry), or to --out.

    \b
    Examples:
      lorahub registry add ./Qwen2.5-14B --name qwen2.5-14b
      lorahub registry add Qwen/Qwen2.5-14B@main --name qwen2.5-14b
    """
    from ..registry import add

    path, base = add(spec, name, revision=revision, overwrite=overwrite, out=out)
    if as_json:
        print_json(ok_payload({"name": name, "out": str(path), "layout": base.layout, "tensors": len(base.tensors),
                               "params": base.num_params, "repo_id": base.repo_id, "revision": base.revision}))
        return
    console.print(safe(f"added {name}: {len(base.tensors)} tensors, {base.num_params:,} parameters "
                         f"({base.layout}) -> {path}"))


def _check_removable(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`registry remove NAME`: a name (any case, as the manifests are found), never a path like `../x`."""
    _check_name(ctx, param, value.strip().lower())
    return value


@registry_group.command("remove")
@click.argument("name", callback=_check_removable)
@json_option
def remove_command(name: str, as_json: bool) -> None:
    """Remove a manifest you added (built-in manifests stay).

    \b
    Example:
      lorahub registry remove qwen2.5-14b
    """
    from ..registry import remove

    path = remove(name)
    if as_json:
        print_json(ok_payload({"name": name, "path": str(path)}))
    else:
        console.print(safe(f"removed {name} ({path})"))


# lorahub.cli registers every module-level click.Command as a top-level command; the subcommands
# belong to the group only.
del list_command, show_command, add_command, remove_command
