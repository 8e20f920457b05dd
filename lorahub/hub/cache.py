"""The local Hugging Face cache: where it is, which repo and revision a cached path belongs to, and
removing cached revisions through `huggingface_hub`'s own cache API.

    hub_cache_dir()                       -> Path ($HF_HUB_CACHE, or $HF_HOME/hub)
    cache_location(path, cache)           -> CacheLocation(repo_id, commit, refs, subpath) | None
    cached_repo(repo_id)                  -> CachedRepo (revisions, refs, files, sizes) via scan_cache_dir
    delete_revisions(repo_id, commits)    -> bytes freed (HFCacheInfo.delete_revisions(...).execute())

The layout is the one `huggingface_hub` documents and writes: `<cache>/models--<owner>--<name>/` holding
`snapshots/<commit>/<repo path>` (symlinks into `blobs/`) and `refs/<ref>` (a file holding a commit).
Listing only reads that layout (no client import beyond its constants: a listing stays fast); removal goes
through `scan_cache_dir()` and `delete_revisions()`, so the cache stays consistent (blobs shared by other
revisions are kept, refs to removed commits are dropped).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorahubError
from .refs import check_repo_id

MODEL_FOLDER_PREFIX = "models--"
SNAPSHOTS = "snapshots"
REFS = "refs"


def hub_cache_dir() -> Path:
    """The cache folder the client uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def repo_id_of_folder(name: str) -> str | None:
    """`alice/lora` for the cache folder `models--alice--lora`; None for anything else (datasets, spaces,
    `.locks`)."""
    if not name.startswith(MODEL_FOLDER_PREFIX):
        return None
    parts = name[len(MODEL_FOLDER_PREFIX):].split("--")
    return "/".join(parts) if all(parts) else None


@dataclass(frozen=True)
class CacheLocation:
    repo_id: str
    commit: str
    refs: tuple[str, ...]  # the refs (branches, tags, refs/pr/N) that point at this commit
    subpath: str  # the path inside the repo ("" for the snapshot root)
    snapshot: Path  # the snapshot folder

    @property
    def revision(self) -> str:
        """The name to show: a ref pointing at the commit (main first), else the commit's first 12 hex."""
        if "main" in self.refs:
            return "main"
        return self.refs[0] if self.refs else self.commit[:12]

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision}" + (f"/{self.subpath}" if self.subpath else "")


def snapshot_refs(repo_folder: Path, memo: dict[str, dict[str, tuple[str, ...]]] | None = None
                  ) -> dict[str, tuple[str, ...]]:
    """commit -> the refs pointing at it, from the repo folder's `refs/` files (read once per folder and
    `memo`: a walk passes one)."""
    key = os.fspath(repo_folder)
    cached = memo.get(key) if memo is not None else None
    if cached is not None:
        return cached
    found: dict[str, list[str]] = {}
    refs_dir = repo_folder / REFS
    for dirpath, _, filenames in os.walk(refs_dir):
        for filename in filenames:
            ref_file = Path(dirpath) / filename
            try:
                commit = ref_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            found.setdefault(commit, []).append(ref_file.relative_to(refs_dir).as_posix())
    out = {commit: tuple(sorted(refs, key=lambda r: (r != "main", r))) for commit, refs in found.items()}
    if memo is not None:
        memo[key] = out
    return out


def cache_location(path: str | os.PathLike, cache: Path | None = None,
                   memo: dict[str, dict[str, tuple[str, ...]]] | None = None) -> CacheLocation | None:
    """Which cached repo, commit and repo path `path` is, when it lies in a snapshot of the cache
    (`<cache>/models--o--n/snapshots/<commit>/<subpath>`); None otherwise. `path` is taken as written
    (absolute), not resolved: snapshot files are symlinks into `blobs/`."""
    cache = cache if cache is not None else hub_cache_dir()
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(cache))
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) < 3 or parts[1] != SNAPSHOTS:
        return None
    repo_id = repo_id_of_folder(parts[0])
    if repo_id is None:
        return None
    folder = Path(os.path.abspath(cache)) / parts[0]
    commit = parts[2]
    return CacheLocation(repo_id, commit, snapshot_refs(folder, memo).get(commit, ()), "/".join(parts[3:]),
                         folder / SNAPSHOTS / commit)


# ---------------------------------------------------------------------------------------------
# removal, through huggingface_hub's cache API


@dataclass
class CachedRevision:
    commit: str
    refs: tuple[str, ...]
    snapshot: Path
    files: list[str]  # repo paths in the snapshot
    size: int  # bytes on disk of its files


@dataclass
class CachedRepo:
    repo_id: str
    path: Path  # the repo folder in the cache
    size: int  # bytes on disk (blobs shared between revisions counted once)
    revisions: list[CachedRevision] = field(default_factory=list)


def cached_repo(repo_id: str) -> CachedRepo | None:
    """What the cache holds of a model repo (`huggingface_hub.scan_cache_dir`), or None."""
    check_repo_id(repo_id)
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = hub_cache_dir()
    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return None
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id:
            revisions = [CachedRevision(rev.commit_hash, tuple(sorted(rev.refs, key=lambda r: (r != "main", r))),
                                        Path(rev.snapshot_path),
                                        sorted(str(f.file_path.relative_to(rev.snapshot_path).as_posix())
                                               for f in rev.files),
                                        rev.size_on_disk)
                         for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)]
            return CachedRepo(repo.repo_id, Path(repo.repo_path), repo.size_on_disk, revisions)
    return None


def delete_revisions(repo_id: str, commits: list[str]) -> int:
    """Remove these cached revisions of `repo_id` with the client's cache API (snapshots, the blobs no
    other revision uses, the refs pointing at them; the whole repo folder when no revision is left).
    Returns the bytes freed."""
    from huggingface_hub import scan_cache_dir

    cache = hub_cache_dir()
    info = scan_cache_dir(cache)
    repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == repo_id), None)
    if repo is None:
        raise LorahubError(f"'{repo_id}' is not in the Hugging Face cache ({cache})")
    known = {rev.commit_hash for rev in repo.revisions}
    missing = [c for c in commits if c not in known]
    if missing:
        raise LorahubError(f"revision {missing[0]} of '{repo_id}' is not in the Hugging Face cache")
    strategy = info.delete_revisions(*commits)
    # the strategy is computed from commit hashes across the whole cache: never let it touch another repo
    # (paths as the cache names them: a blob may be a link into the client's shared store, its business)
    root = os.path.abspath(repo.repo_path)
    for path in [*strategy.blobs, *strategy.refs, *strategy.repos, *strategy.snapshots, *strategy.files]:
        if os.path.commonpath([root, os.path.abspath(path)]) != root:
            raise LorahubError(f"refusing to remove {path}: it is not part of '{repo_id}' in the cache")
    freed = strategy.expected_freed_size
    strategy.execute()
    return freed
