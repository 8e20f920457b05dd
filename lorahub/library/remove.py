"""`lorahub rm REPO_OR_PATH`: remove an adapter from the Hugging Face cache or a library folder, and
nothing else.

- A repo (`owner/name`, `owner/name@revision`, `hf://…`) or a path inside a cached snapshot: the cached
  revisions (all of them, or the one named) are removed through `huggingface_hub`'s cache API
  (`lorahub.hub.cache.delete_revisions`), which keeps blobs other revisions share.
- A path inside a LORAHUB_LIBRARY folder: the adapter file, or the adapter's folder (PEFT) when it holds
  nothing but the adapter's files (config, weights, model card, lorahub's output marker); a folder
  holding anything else is refused, with the list.
- Anything else is refused: paths are resolved (`..`, symlinks) before the check, a symlink is never
  followed out of the library, a folder of the library itself is never removed, and repo ids are names
  (`check_repo_id` refuses `..`), never paths.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorahubError
from ..hub.cache import CachedRevision, cache_location, cached_repo, delete_revisions, hub_cache_dir
from ..hub.refs import is_hub_ref, looks_like_repo_id, parse_ref
from .describe import describe
from .index import Index, default_index_path
from .scan import library_folders, scan

# files a PEFT adapter folder may hold besides the format's own (README: the model card; the marker:
# lorahub's output policy)
FOLDER_EXTRAS = ("README.md", ".lorahub-output.json")


@dataclass
class Removal:
    target: str  # what the user named
    repo_id: str | None  # a cached repo, else None
    revisions: list[CachedRevision] = field(default_factory=list)  # cached revisions to remove
    paths: list[Path] = field(default_factory=list)  # a library file or folder to remove
    size: int = 0  # bytes
    files: list[str] = field(default_factory=list)  # what goes, for the confirmation

    @property
    def summary(self) -> str:
        if self.repo_id is not None:
            revs = ", ".join(f"{r.commit[:12]}" + (f" ({', '.join(r.refs)})" if r.refs else "")
                             for r in self.revisions)
            return (f"{self.repo_id} from the Hugging Face cache: {len(self.revisions)} revision"
                    f"{'s' if len(self.revisions) != 1 else ''} [{revs}], {len(self.files)} files")
        return f"{self.paths[0]} ({len(self.files)} file{'s' if len(self.files) != 1 else ''})"


@dataclass
class Removed:
    removed: list[str]
    repo_id: str | None
    revisions: list[str]
    bytes_freed: int

    def to_dict(self) -> dict:
        return {"removed": self.removed, "repo_id": self.repo_id, "revisions": self.revisions,
                "bytes_freed": self.bytes_freed}


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def _cache_plan(target: str, repo_id: str, revision: str | None) -> Removal:
    repo = cached_repo(repo_id)
    if repo is None or not repo.revisions:
        raise LorahubError(f"'{repo_id}' is not in the Hugging Face cache ({hub_cache_dir()})")
    revisions = repo.revisions
    if revision is not None:
        revisions = [r for r in repo.revisions if revision in r.refs or r.commit == revision
                     or (len(revision) >= 7 and r.commit.startswith(revision))]
        if not revisions:
            held = ", ".join(r.commit[:12] + (f" ({', '.join(r.refs)})" if r.refs else "") for r in repo.revisions)
            raise LorahubError(f"revision '{revision}' of '{repo_id}' is not in the Hugging Face cache "
                               f"(cached: {held})")
    files = sorted({f"{r.commit[:12]}/{f}" for r in revisions for f in r.files})
    return Removal(target, repo_id, revisions, [], sum(r.size for r in revisions), files)


def _library_plan(target: str, path: str) -> Removal:
    found = scan([path])
    candidate = next((c for c in found.candidates if c.key == path), None)
    if candidate is None:
        raise LorahubError("not an adapter (no adapter_config.json with weights, not a .safetensors file)",
                           path=target)
    summary = describe(candidate.kind, [p for p, _ in candidate.files])
    if summary.get("status") == "other":
        raise LorahubError("not an adapter (a model's weights?): lorahub rm removes adapters only", path=target)
    if candidate.kind == "file":
        return Removal(target, None, [], [Path(path)], candidate.size, [os.path.basename(path)])
    own = {os.path.basename(p) for p, _ in candidate.files}
    everything: list[str] = []  # every entry below the folder; sub-folders end with '/'
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        for name in filenames:
            everything.append(os.path.normpath(os.path.join(rel, name)))
        for name in dirnames:
            everything.append(os.path.normpath(os.path.join(rel, name)) + "/")
    others = sorted(f for f in everything if f not in own and f not in FOLDER_EXTRAS)
    if others:
        shown = ", ".join(others[:10]) + (f", … {len(others) - 10} more" if len(others) > 10 else "")
        raise LorahubError(f"the adapter's folder holds other files ({shown}); lorahub rm removes only a "
                           f"folder that holds nothing but the adapter", path=target)
    size = sum(os.lstat(os.path.join(path, f)).st_size for f in everything)
    return Removal(target, None, [], [Path(path)], size, sorted(everything))


def plan(target: str) -> Removal:
    """What `lorahub rm TARGET` would remove; refuses anything outside the cache and the library folders."""
    text = str(target)
    exists = os.path.lexists(os.path.expanduser(text))
    if is_hub_ref(text) or (not exists and looks_like_repo_id(text.split("@", 1)[0])):
        ref = parse_ref(text)
        return _cache_plan(text, ref.repo_id, ref.revision)
    if not exists:
        raise LorahubError("no such file or directory, and not a Hub repo id (owner/name[@revision])", path=text)
    path = os.path.abspath(os.path.expanduser(text))
    cache = os.path.abspath(hub_cache_dir())
    if _inside(path, cache) or _inside(os.path.realpath(path), os.path.realpath(cache)):
        location = cache_location(path, Path(cache))
        if location is None:
            raise LorahubError("not an adapter in a cached snapshot (models--OWNER--NAME/snapshots/COMMIT/…); "
                               "name the repo (owner/name[@revision]) to remove it from the cache", path=text)
        return _cache_plan(text, location.repo_id, location.commit)
    if os.path.islink(path):
        raise LorahubError(f"is a symbolic link (to {os.path.realpath(path)}): lorahub rm removes adapters, not "
                           f"links (remove the link with rm, or name the adapter it points to)", path=text)
    real = os.path.realpath(path)
    folders = [os.path.realpath(f) for f in library_folders()]
    if not any(_inside(real, folder) for folder in folders):
        where = ", ".join(map(str, library_folders())) or "none: LORAHUB_LIBRARY is not set"
        raise LorahubError(f"not in the Hugging Face cache or a library folder (cache: {cache}; LORAHUB_LIBRARY: "
                           f"{where}); lorahub rm removes nothing else", path=text)
    if real != path:  # a path through a symlinked folder: remove what it names, checked where it is
        path = real
    return _library_plan(text, path)


def execute(removal: Removal, *, index_path: str | os.PathLike | None = None) -> Removed:
    """Carry out a planned removal; the index forgets what went."""
    gone: list[str] = []
    freed = 0
    if removal.repo_id is not None:
        commits = [r.commit for r in removal.revisions]
        freed = delete_revisions(removal.repo_id, commits)
        gone = [str(r.snapshot) for r in removal.revisions]
    else:
        for path in removal.paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            gone.append(str(path))
        freed = removal.size
    with Index(Path(index_path) if index_path is not None else default_index_path()) as index:
        index.forget(gone)
    return Removed(gone, removal.repo_id, [r.commit for r in removal.revisions], freed)
