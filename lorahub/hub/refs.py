"""Hub references: `hf://owner/name[@revision][/path]` and bare `owner/name[@revision]` repo ids.

One parser and one repo-id pattern for every caller (pull, push, base models, model cards).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..errors import LorahubError

SCHEME = "hf://"
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class HubRef:
    repo_id: str
    revision: str | None = None
    path: str | None = None  # a file or folder inside the repo

    def __str__(self) -> str:
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "") + \
            (f"/{self.path}" if self.path else "")


def is_hub_ref(arg: str | os.PathLike) -> bool:
    return isinstance(arg, str) and arg.startswith(SCHEME)


def is_repo_id(value: str) -> bool:
    return bool(REPO_ID_RE.match(value)) and ".." not in value


def check_repo_id(repo_id: str) -> str:
    if not is_repo_id(repo_id):
        raise LorahubError(f"not a valid Hub repo id: '{repo_id}' (expected owner/name)")
    return repo_id


def _split(arg: str) -> tuple[str, str | None, str | None, bool]:
    """(repo id, revision, path, the revision was given but empty); LorahubError when not a reference."""
    text = arg[len(SCHEME):] if is_hub_ref(arg) else arg
    parts = text.strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise LorahubError(f"not a Hub reference: '{arg}' (expected hf://owner/name[@revision][/file])")
    owner, name = parts[0], parts[1]
    rest = parts[2:]
    rev = None
    if "@" in name:
        name, rev = name.split("@", 1)
        if rev == "refs" and len(rest) >= 2:  # @refs/pr/1, @refs/heads/x
            rev = "/".join([rev, rest[0], rest[1]])
            rest = rest[2:]
    repo_id = check_repo_id(f"{owner}/{name}")
    return repo_id, unquote(rev) if rev else None, "/".join(rest) or None, rev == ""


def parse_ref(arg: str, *, revision: str | None = None) -> HubRef:
    """Parse `hf://owner/name[@rev][/path]` (or `owner/name[@rev][/path]` without the scheme).

    A revision containing slashes must be `refs/pr/N`, `refs/heads/B`, `refs/tags/T` or URL-quoted
    (`@feature%2Fx`). An explicit `revision` overrides the one in the reference.
    """
    repo_id, rev, path, _ = _split(arg)
    return HubRef(repo_id, revision or rev, path)


def parse_repo_spec(text: str) -> tuple[str | None, str | None, str | None]:
    """(repo_id, revision, path in repo) of `hf://owner/name[@rev][/path]` or `owner/name[@rev]`;
    (None, None, None) when `text` is not one (a bare `a/b/c` is a relative path, not a repo)."""
    try:
        repo_id, rev, path, empty_rev = _split(text)
    except LorahubError:
        return None, None, None
    if empty_rev or (path is not None and not is_hub_ref(text)):
        return None, None, None
    return repo_id, rev, path


def looks_like_repo_id(value: str | None) -> bool:
    """A Hub repo id rather than a local path (PEFT configs often name the base by a local path)."""
    if not value or not isinstance(value, str):
        return False
    if value.startswith((SCHEME, "/", ".", "~")) or "\\" in value or Path(value).exists():
        return False
    return bool(REPO_ID_RE.match(value))
