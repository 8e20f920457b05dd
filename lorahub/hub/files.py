"""Which files of a Hub repo make one adapter: a PEFT folder (config + weights) or one LoRA file.

The file names come from the format modules and storage, so a new format is known here too.
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path, PurePosixPath
from typing import Callable

from ..errors import LorahubError
from ..formats import all_formats
from ..storage import PICKLE_SUFFIXES
from .client import file_not_found

SAFETENSORS = ".safetensors"
# a full model's weights (model.safetensors, model-00001-of-00002.safetensors, ...), never an adapter
_BASE_WEIGHT = re.compile(r"(model|diffusion_pytorch_model|pytorch_model)(-\d+-of-\d+)?\.safetensors")


def _directory_layouts() -> list[tuple[str, tuple[str, ...]]]:
    """(config file, weight files in order of preference) of each directory format in the registry."""
    return [(fmt.marker_files[0], fmt.marker_files[1:]) for fmt in all_formats()
            if fmt.directory and len(fmt.marker_files) > 1]


def _config_names() -> set[str]:
    return {config for config, _ in _directory_layouts()}


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _folder(path: PurePosixPath) -> str:
    return str(path.parent) if str(path.parent) != "." else ""


def adapter_candidates(files: list[str]) -> list[list[str]]:
    """Groups of files that each make one adapter: a PEFT folder (config + weights) or one file."""
    groups: list[list[str]] = []
    peft_dirs = set()
    layouts = _directory_layouts()
    directory_weights = {name for _, weights in layouts for name in weights}
    for f in sorted(files):
        p = PurePosixPath(f)
        for config, weight_names in layouts:
            if p.name != config:
                continue
            folder = _folder(p)
            weights = [w for w in weight_names if _join(folder, w) in files]
            if weights:
                peft_dirs.add(folder)
                # safetensors preferred; a pickle only when that is all there is
                groups.append([f, _join(folder, weights[0])])
    for f in sorted(files):
        p = PurePosixPath(f)
        if _folder(p) in peft_dirs or p.name in directory_weights:
            continue
        if p.suffix == SAFETENSORS and not _BASE_WEIGHT.fullmatch(p.name):
            groups.append([f])
    return groups


def peft_folder(chosen: list[str]) -> PurePosixPath | None:
    """The repo folder of a PEFT adapter group (`.` at the root); None for a single-file adapter."""
    first = PurePosixPath(chosen[0])
    return first.parent if first.name in _config_names() else None


def _label(group: list[str]) -> str:
    folder = peft_folder(group)
    if folder is not None:
        return "(PEFT adapter at the repo root)" if str(folder) == "." else f"{folder}/ (PEFT adapter)"
    return group[0]


def unsafe_name(name: str) -> str | None:
    """Why a repo file name cannot become a local file name (None: it can): an absolute path, a `..`
    or empty segment, a backslash, control characters. A Hub listing is not trusted."""
    if not name:
        return "an empty name"
    if name.startswith("/") or PurePosixPath(name).is_absolute() or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if "\\" in name:
        return "a backslash"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "a '..', '.' or empty path segment"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "control characters"
    return None


def _refuse_unsafe(repo_id: str, names: list[str]) -> None:
    for name in names:
        why = unsafe_name(name)
        if why:
            raise LorahubError(f"Hub repository '{repo_id}' lists a file whose name has {why} "
                               f"({name!r}); refusing to download it")


def choose_adapter_files(files: list[str], *, repo_id: str, include: str | None = None, path: str | None = None,
                         prompt: Callable[[list[str]], int] | None = None) -> list[str]:
    """The repo files to download for one adapter; fails (or prompts) when several are candidates.
    File names that cannot be local file names (`unsafe_name`) are never candidates; asking for one,
    or a repo whose only adapter has one, is refused."""
    if path:
        _refuse_unsafe(repo_id, [path.strip("/")])
    safe = [f for f in files if not unsafe_name(f)]
    try:
        chosen = _choose(safe, repo_id=repo_id, include=include, path=path, prompt=prompt)
    except LorahubError as exc:
        unsafe = [f for f in files if unsafe_name(f)]
        if not unsafe:
            raise
        try:  # would an unsafe name have been the adapter? then say so
            group = _choose(files, repo_id=repo_id, include=include, path=path, prompt=None)
        except LorahubError:
            group = []
        _refuse_unsafe(repo_id, group)
        raise LorahubError(f"{exc} (ignored: {len(unsafe)} files whose names cannot be local file names, e.g. "
                           f"{unsafe[0]!r})") from None
    _refuse_unsafe(repo_id, chosen)
    return chosen


def _choose(files: list[str], *, repo_id: str, include: str | None, path: str | None,
            prompt: Callable[[list[str]], int] | None) -> list[str]:
    files = [f for f in files if not f.startswith(".")]
    scope = files
    if path:
        path = path.strip("/")
        if path in files:
            if PurePosixPath(path).name in _config_names():
                return next((g for g in adapter_candidates(files) if g[0] == path), [path])
            return [path]
        scope = [f for f in files if f.startswith(path + "/")]
        if not scope:
            raise file_not_found(repo_id, path)
    if include:
        matched = [f for f in scope if fnmatch.fnmatch(f, include) or fnmatch.fnmatch(PurePosixPath(f).name, include)]
        if not matched:
            raise LorahubError(f"no file in Hub repository '{repo_id}' matches --include '{include}'")
        # a PEFT config matched with its weights (or a weights file whose config sits beside it) stays a group
        groups = [g for g in adapter_candidates(scope) if any(f in matched for f in g)]
        if not groups:
            groups = [[f] for f in matched if PurePosixPath(f).suffix in (SAFETENSORS, *PICKLE_SUFFIXES)]
        if not groups:
            raise LorahubError(f"the files matching --include '{include}' in '{repo_id}' hold no adapter "
                               f"({', '.join(matched[:5])})")
    else:
        groups = adapter_candidates(scope)
        if not groups:
            pickles = [f for f in scope if PurePosixPath(f).suffix in PICKLE_SUFFIXES]
            hint = f" (pickle files: {', '.join(pickles[:5])}; pass --include to pull one)" if pickles else ""
            configs = " or ".join(sorted(_config_names()))
            raise LorahubError(f"no adapter in Hub repository '{repo_id}': no {configs} with "
                               f"weights and no LoRA {SAFETENSORS} file{hint}")
    if len(groups) == 1:
        return groups[0]
    labels = [_label(g) for g in groups]
    if prompt is not None:
        return groups[prompt(labels)]
    shown = ", ".join(labels[:10]) + (f", … {len(labels) - 10} more" if len(labels) > 10 else "")
    raise LorahubError(f"Hub repository '{repo_id}' holds several adapters ({shown}); "
                       f"pass --include PATTERN (or hf://{repo_id}/FILE) to pick one")


def adapter_local_path(root: Path, chosen: list[str]) -> Path:
    """Where the chosen files make an adapter under `root` (a snapshot): the PEFT folder or the file."""
    folder = peft_folder(chosen)
    if folder is not None:
        return root / str(folder) if str(folder) != "." else root
    if len(chosen) == 1:
        return root / chosen[0]
    return root
