"""Shape manifests of base models, so `--base llama-3-8b` works offline.

A manifest is one JSON file: the model's name, the Hub repo it describes, the published config it was
built from (`source`), its layout, its config, and every tensor's shape and dtype:

    {"name": "llama-3-8b", "repo_id": "meta-llama/Meta-Llama-3-8B", "source": "https://…/config.json",
     "layout": "transformers", "dtype": "BF16", "params": 8030261248, "config": {…},
     "tensors": {"model.embed_tokens.weight": [[128256, 4096], "BF16"], …}}

Built-in manifests live in the repository's `registry/` folder (installed as the package data
`lorahub.registry_data`) and are produced by `registry/build_manifests.py`, which builds each
architecture on PyTorch's meta device from its published config. `lorahub registry add` writes
user manifests to `$LORAHUB_HOME/registry` (default `~/.cache/lorahub/registry`); a user manifest
with the name of a built-in one takes its place.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import output
from .base import LAYOUTS, BaseModel, load_base
from .errors import LorahubError
from .storage import DTYPE_BITS, json_type, read_json_file

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


@dataclass
class ManifestRef:
    name: str
    path: Path
    builtin: bool
    repo_id: str | None = None
    layout: str | None = None
    params: int | None = None
    dtype: str | None = None
    source: Any = None
    aliases: tuple[str, ...] = ()
    tensors: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "repo_id": self.repo_id, "layout": self.layout, "params": self.params,
                "dtype": self.dtype, "tensors": self.tensors, "aliases": list(self.aliases),
                "source": self.source, "builtin": self.builtin, "path": str(self.path)}


def builtin_dir() -> Path:
    """Where the shipped manifests are: `lorahub/registry_data/` when installed from a wheel (the
    repository's `registry/` folder, mapped there by pyproject's package-dir), `registry/` in a checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "registry_data"
    if installed.is_dir():
        return installed
    return package.parent / "registry"


def user_dir() -> Path:
    home = os.environ.get("LORAHUB_HOME")
    if home:
        return Path(home).expanduser() / "registry"
    return Path("~/.cache/lorahub/registry").expanduser()


def _manifest_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


def _read(path: Path) -> dict:
    manifest = read_json_file(path, what="registry manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), dict):
        raise LorahubError("corrupt registry manifest (no tensors)", path=path)
    problem = _manifest_problem(manifest)
    if problem:
        raise LorahubError(f"corrupt registry manifest ({problem})", path=path)
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's fields (their JSON types, each tensor's [shape, dtype]), or None."""
    for key, types, label in (("name", (str,), "a string"), ("repo_id", (str,), "a string"),
                              ("layout", (str,), "a string"), ("dtype", (str,), "a string"),
                              ("revision", (str,), "a string"), ("params", (int,), "an integer"),
                              ("config", (dict,), "an object"), ("aliases", (list,), "an array of names"),
                              ("source", (str, dict), "a string or an object")):
        value = manifest.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            return f"'{key}' must be {label}, found {json_type(value)}"
    if not all(isinstance(alias, str) for alias in manifest.get("aliases") or ()):
        return "'aliases' must be an array of names"
    if manifest.get("layout") is not None and manifest["layout"] not in LAYOUTS:
        return f"'layout' is '{manifest['layout']}', not one of {', '.join(LAYOUTS)}"
    for name, entry in manifest["tensors"].items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and all(type(d) is int and d >= 0 for d in entry[0]) and entry[1] in DTYPE_BITS):
            return f"tensor '{name}': expected [shape of non-negative integers, safetensors dtype], found {entry!r:.60}"
    return None


def _ref(path: Path, builtin: bool, manifest: dict | None = None) -> ManifestRef:
    manifest = manifest if manifest is not None else _read(path)
    return ManifestRef(name=str(manifest.get("name") or path.stem), path=path, builtin=builtin,
                       repo_id=manifest.get("repo_id"), layout=manifest.get("layout"),
                       params=manifest.get("params"), dtype=manifest.get("dtype"), source=manifest.get("source"),
                       aliases=tuple(manifest.get("aliases") or ()), tensors=len(manifest["tensors"]))


def list_manifests() -> list[ManifestRef]:
    """Every manifest, user manifests shadowing built-in ones of the same name; sorted by name."""
    found: dict[str, ManifestRef] = {}
    for builtin, folder in ((True, builtin_dir()), (False, user_dir())):
        for path in _manifest_files(folder):
            try:
                ref = _ref(path, builtin)
            except LorahubError:
                if builtin:
                    raise
                continue  # a broken user manifest must not break `registry list`
            found[ref.name] = ref
    return sorted(found.values(), key=lambda r: r.name)


def find_manifest(name: str, *, by_repo_id: bool = True) -> ManifestRef | None:
    """A manifest by name or alias (case-insensitive), or by the Hub repo it describes."""
    wanted = name.strip().lower()
    if wanted.startswith("registry:"):
        wanted = wanted[len("registry:"):]
    for folder, builtin in ((user_dir(), False), (builtin_dir(), True)):  # user first: it shadows
        path = folder / f"{wanted}.json"
        if NAME_RE.match(wanted) and path.exists():  # not a regular file: refused by _read, not skipped
            return _ref(path, builtin)
    if "/" in wanted and not by_repo_id:
        return None
    for ref in list_manifests():
        if wanted == ref.name.lower() or wanted in (a.lower() for a in ref.aliases):
            return ref
        if by_repo_id and ref.repo_id and wanted == ref.repo_id.lower():
            return ref
    return None


def load_manifest(ref: ManifestRef | str) -> BaseModel:
    if isinstance(ref, str):
        found = find_manifest(ref)
        if found is None:
            raise LorahubError(f"no registry manifest named '{ref}' (see `lorahub registry list`)")
        ref = found
    return BaseModel.from_manifest(_read(ref.path), source=f"registry:{ref.name}")


def dump_manifest(manifest: dict) -> str:
    """JSON text of a manifest: header fields indented, one tensor per line (small diffs in git)."""
    head = {k: v for k, v in manifest.items() if k != "tensors"}
    lines = ["{"]
    for key, value in head.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True, ensure_ascii=False)},")
    lines.append('  "tensors": {')
    items = list(manifest["tensors"].items())
    for i, (name, entry) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        lines.append(f"    {json.dumps(name)}: {json.dumps(entry, separators=(', ', ': '))}{comma}")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_manifest(manifest: dict, path: Path, *, overwrite: bool = False,
                   inputs: Iterable[output.InputSpec] = ()) -> Path:
    """Write a manifest file under lorahub.output's policy (an existing file only with `overwrite`)."""
    with output.write(path, kind="file", overwrite=overwrite, inputs=inputs, command="registry add") as tmp:
        tmp.write_text(dump_manifest(manifest), encoding="utf-8")
    return path


def add(spec: str, name: str, *, revision: str | None = None, token: str | bool | None = None,
        overwrite: bool = False, out: str | Path | None = None) -> tuple[Path, BaseModel]:
    """Write a manifest from a local model's headers or a Hub repo's headers: a user manifest in
    `user_dir()`, or the file `out`. An existing manifest (or a built-in of that name) is replaced
    (shadowed) only with `overwrite`."""
    name = name.strip().lower()
    if not NAME_RE.match(name):
        raise LorahubError(f"invalid registry name '{name}' (lower-case letters, digits, '.', '_', '-')")
    target = Path(out) if out is not None else user_dir() / f"{name}.json"
    local = Path(spec).expanduser()
    inputs: list[output.InputSpec] = [("model", local)] if local.exists() else []
    output.prepare(target, kind="file", overwrite=overwrite, inputs=inputs)  # before reading the model
    if out is None and not overwrite and (builtin_dir() / f"{name}.json").exists():
        raise LorahubError(f"'{name}' is a built-in manifest; pass --overwrite to shadow it with your own")
    base = load_base(spec, revision=revision, token=token, offline_fallback=False)
    if not base.tensors:
        raise LorahubError("no tensors found", path=spec)
    extra: dict[str, Any] = {"source": spec if base.repo_id is None else
                             f"https://huggingface.co/{base.repo_id}"
                             + (f"/tree/{base.revision}" if base.revision else "")}
    if base.revision:
        extra["revision"] = base.revision
    manifest = base.to_manifest(name, **extra)
    manifest["name"] = name
    return write_manifest(manifest, target, overwrite=overwrite, inputs=inputs), base


def remove(name: str) -> Path:
    """Delete the user manifest `name` (a name, never a path: `../x` is refused)."""
    if not NAME_RE.match(name.strip().lower()):
        raise LorahubError(f"invalid registry name '{name}' (lower-case letters, digits, '.', '_', '-')")
    path = user_dir() / f"{name.strip().lower()}.json"
    if not path.is_file():
        if (builtin_dir() / f"{name.strip().lower()}.json").is_file():
            raise LorahubError(f"'{name}' is built in; only manifests you added can be removed")
        raise LorahubError(f"no user registry manifest named '{name}'", path=path)
    path.unlink()
    return path
