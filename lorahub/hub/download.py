"""`pull`: one adapter's files from a Hub repo into the HF cache (or a folder), offline from the cache.

    pull("alice/my-lora", revision="v1", out="dir/")     -> PullResult
    resolve_adapter_path("hf://alice/my-lora@v1")        -> Path in the HF cache
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from .. import output
from ..errors import LorahubError
from .client import HubUnreachable, client, current_token, hub_errors, is_offline, list_files
from .files import adapter_local_path, choose_adapter_files, peft_folder
from .refs import HubRef, is_hub_ref, parse_ref


@dataclass
class PullResult:
    path: Path  # the adapter: a PEFT folder or a single file
    repo_id: str
    revision: str  # what was asked for (main by default)
    commit: str | None  # the commit it resolved to
    files: list[str]  # repo paths downloaded
    snapshot: Path  # the snapshot (or --out) root
    offline: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "files": self.files, "snapshot": str(self.snapshot), "from_cache_only": self.offline}


def _cached_snapshot(repo_id: str, revision: str) -> Path:
    """The cached snapshot folder for a revision (a branch/tag the cache recorded, or a commit sha).
    Raises the client's LocalEntryNotFoundError when the cache does not hold it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    sha = revision
    ref = folder / "refs" / revision
    if ref.is_file():
        sha = ref.read_text().strip()
    snapshot = folder / "snapshots" / sha
    if not snapshot.is_dir():
        raise LocalEntryNotFoundError(f"{repo_id}@{revision} is not in the cache")
    return snapshot


def _local_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*")
                  if (p.is_file() or p.is_symlink()) and ".cache" not in p.relative_to(root).parts)


def pull(ref: str | HubRef, *, revision: str | None = None, include: str | None = None,
         out: str | Path | None = None, token: str | None = None,
         prompt: Callable[[list[str]], int] | None = None, overwrite: bool = False) -> PullResult:
    """Download one adapter's files from a Hub repo into the HF cache (or copy them to `out`, a folder
    written under lorahub.output's policy: an existing one is replaced only with `overwrite`, and only
    if lorahub wrote it)."""
    if out is None:
        return _pull(ref, revision=revision, include=include, out=None, token=token, prompt=prompt)
    # refused, or locked against a second writer, before anything is downloaded
    with output.reserve(out, kind="dir", overwrite=overwrite):
        return _pull(ref, revision=revision, include=include, out=out, token=token, prompt=prompt,
                     overwrite=overwrite)


def _pull(ref: str | HubRef, *, revision: str | None, include: str | None, out: str | Path | None,
          token: str | None, prompt: Callable[[list[str]], int] | None, overwrite: bool = False) -> PullResult:
    hf = client()
    if not isinstance(ref, HubRef):
        ref = parse_ref(ref, revision=revision)
    elif revision:
        ref = HubRef(ref.repo_id, revision, ref.path)
    rev = ref.revision or "main"
    token = current_token(token)
    offline = is_offline()
    commit: str | None = None
    snapshot: Path | None = None
    with hub_errors(ref.repo_id, rev, ref.path, token=token):
        files: list[str] | None = None
        if not offline:
            try:
                commit, files = list_files(ref.repo_id, rev, token)
            except HubUnreachable as exc:
                if not exc.network:
                    raise
                # like the hf CLI: with the network down, fall back to what the cache holds
                try:
                    snapshot = _cached_snapshot(ref.repo_id, rev)
                except Exception:
                    raise exc from None
                offline = True
        else:
            snapshot = _cached_snapshot(ref.repo_id, rev)
        if files is None:
            assert snapshot is not None
            files = _local_files(snapshot)
            commit = snapshot.name
        chosen = choose_adapter_files(files, repo_id=ref.repo_id, include=include, path=ref.path, prompt=prompt)
        if snapshot is None or any(not (snapshot / f).exists() for f in chosen):
            if offline:
                missing = [f for f in chosen if snapshot is None or not (snapshot / f).exists()]
                raise LorahubError(f"HF_HUB_OFFLINE=1 and '{ref.repo_id}' (revision {rev}) is not fully in the "
                                   f"local cache (missing {', '.join(missing)}); run the pull once while online")
            # the branch/tag name (not the sha) so that the cache records the ref for offline use
            # allow_patterns are fnmatch patterns: each file name is escaped to match itself only ('[v2]')
            patterns = [glob_escape(f) for f in chosen]
            snapshot = Path(hf.snapshot_download(ref.repo_id, revision=rev, allow_patterns=patterns, token=token))
            commit = snapshot.name
    local = adapter_local_path(snapshot, chosen)
    root = snapshot
    if out is not None:
        root = Path(out)
        folder = peft_folder(chosen)
        # the folder lands complete or not at all (never the cache snapshot it is copied from)
        with output.write(root, kind="dir", overwrite=overwrite, inputs=[("Hub cache snapshot", snapshot)],
                          command="pull") as tmp:
            for f in chosen:
                rel = PurePosixPath(f).relative_to(folder) if folder is not None and str(folder) != "." else \
                    PurePosixPath(f).name if folder is None else PurePosixPath(f)
                dest = tmp / str(rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(snapshot / f, dest)  # follows the cache's symlinks
        local = root if folder is not None else root / PurePosixPath(chosen[0]).name
    return PullResult(local, ref.repo_id, rev, commit, chosen, root, offline)


def glob_escape(name: str) -> str:
    """A file name as an fnmatch pattern that matches only that name (`[`, `]`, `*`, `?` bracketed)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def resolve_adapter_path(arg: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local path unchanged; `hf://owner/name[@rev][/file]` pulled into the HF cache first."""
    if not is_hub_ref(arg):
        return Path(arg)
    return pull(str(arg), revision=revision).path


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
