"""Finding adapters on the Hub: `HfApi.list_models` with the base-model adapter filter, and one found
adapter's headers read with Range requests (never its weights).

    search_models("anime", base="stabilityai/sdxl", sort="downloads", limit=20) -> [HubModel]
    fetch_adapter_headers(repo_id, sha, files, dest)                             -> local header-only copy

The Hub links an adapter to its base model with the tag `base_model:adapter:<base id>` (from the card's
`base_model` and `base_model_relation: adapter`, which `lorahub push` writes); without a base, the search
keeps models tagged `lora`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import LorahubError, OptionError
from ..storage import build_header
from .client import Token, hub_errors, is_offline, read_header, read_range
from .files import adapter_local_path
from .refs import check_repo_id

# --sort value -> list_models' sort (always descending on the Hub)
SORTS = {"downloads": "downloads", "likes": "likes", "modified": "last_modified"}
ADAPTER_TAG = "lora"  # what an adapter search keeps when no base model is given
ADAPTER_OF = "base_model:adapter:"  # the Hub's tag linking an adapter to its base model
# the properties asked for (only these come back: a listing of 1000 models stays small)
EXPAND = ["author", "downloads", "likes", "lastModified", "library_name", "tags", "sha", "private", "gated"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_LIMIT = 1000


@dataclass
class HubModel:
    repo_id: str
    author: str | None = None
    downloads: int | None = None
    likes: int | None = None
    modified: str | None = None  # ISO 8601, UTC
    library: str | None = None
    tags: list[str] = field(default_factory=list)
    sha: str | None = None
    private: bool | None = None
    files: list[str] | None = None  # repo paths, when asked for

    @property
    def base_models(self) -> list[str]:
        """The base models the Hub says this repo is an adapter of."""
        return list(dict.fromkeys(t[len(ADAPTER_OF):] for t in self.tags if t.startswith(ADAPTER_OF)))

    @classmethod
    def from_info(cls, info: Any) -> "HubModel":
        modified = getattr(info, "last_modified", None)
        siblings = getattr(info, "siblings", None)
        return cls(repo_id=str(info.id), author=getattr(info, "author", None),
                   downloads=getattr(info, "downloads", None), likes=getattr(info, "likes", None),
                   modified=modified.strftime("%Y-%m-%dT%H:%M:%SZ") if modified is not None else None,
                   library=getattr(info, "library_name", None), tags=[str(t) for t in (info.tags or [])],
                   sha=getattr(info, "sha", None), private=getattr(info, "private", None),
                   files=None if siblings is None else sorted(s.rfilename for s in siblings))


def adapter_filter(base: str | None) -> list[str]:
    """The `filter` values of an adapter search: the base's adapter tag, or `lora`."""
    return [ADAPTER_OF + base] if base else [ADAPTER_TAG]


def search_models(query: str | None = None, *, base: str | None = None, author: str | None = None,
                  sort: str = "downloads", limit: int = 20, files: bool = False,
                  token: Token = None) -> list[HubModel]:
    """Adapters on the Hub (`HfApi.list_models`): those of `base` (or tagged `lora`), whose id contains
    `query`, by `author`, most downloaded/liked/recently modified first, at most `limit`; `files` adds each
    repo's file list (for checking headers)."""
    if sort not in SORTS:
        raise OptionError(f"unknown sort '{sort}' (choose from {', '.join(SORTS)})")
    if not 1 <= limit <= MAX_LIMIT:
        raise OptionError(f"--limit must be between 1 and {MAX_LIMIT}, not {limit}")
    if base is not None:
        check_repo_id(base)
    if author is not None and not NAME_RE.match(author):
        raise OptionError(f"not a Hub user or organisation name: '{author}'")
    if is_offline():
        raise LorahubError("HF_HUB_OFFLINE=1: searching the Hub needs the network "
                           "(`lorahub list` shows the adapters in the local cache)")
    from .client import client

    api = client().HfApi()
    with hub_errors("api/models", token=token):
        found = api.list_models(filter=adapter_filter(base), search=query or None, author=author,
                                sort=SORTS[sort], limit=limit, expand=[*EXPAND, *(["siblings"] if files else [])],
                                token=token)
        return [HubModel.from_info(info) for info in found]


# ---------------------------------------------------------------------------------------------
# one adapter's headers, for checking it against a base without downloading it


def _safe_repo_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(part in ("", ".", "..") for part in path.parts):
        raise LorahubError(f"refusing a Hub file name that is not a plain relative path: '{name}'")
    return path


def fetch_adapter_headers(repo_id: str, revision: str | None, files: list[str], dest: Path,
                          token: Token = None) -> Path:
    """Recreate one adapter of a Hub repo (`files`: a PEFT config + weights, or one LoRA file) under `dest`
    from headers only: JSON files whole (a config is a few hundred bytes), each `.safetensors` file as its
    header (two Range requests) followed by a hole the size of its data (a sparse file: nothing of the
    weights is downloaded or written). Returns the adapter's local path, for `load_adapter`."""
    check_repo_id(repo_id)
    for name in files:
        rel = _safe_repo_path(name)
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.suffix == ".safetensors":
            header = read_header(repo_id, name, revision, token)
            raw = build_header([(info.name, info.dtype, info.shape, info.begin, info.end)
                                for info in header.tensors.values()], header.metadata or None)
            data = max((info.end for info in header.tensors.values()), default=0)
            with open(target, "wb") as handle:
                handle.write(raw)
                handle.truncate(len(raw) + data)
        elif rel.suffix == ".json":
            body, _ = read_range(repo_id, name, revision, token)
            try:
                json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise LorahubError(f"invalid JSON ({exc})", path=f"{repo_id}/{name}") from None
            target.write_bytes(body)
        else:
            raise LorahubError(f"cannot check '{name}' from its header (only .safetensors weights can be read "
                               f"without downloading them)", path=repo_id)
    return adapter_local_path(dest, files) if files else dest


def hub_repo_paths(model: HubModel) -> list[str]:
    """The repo's files, hidden ones (`.gitattributes`) left out."""
    return [f for f in (model.files or []) if not any(part.startswith(".") for part in f.split("/"))]


__all__ = ["ADAPTER_OF", "ADAPTER_TAG", "SORTS", "HubModel", "adapter_filter", "fetch_adapter_headers",
           "hub_repo_paths", "search_models"]
