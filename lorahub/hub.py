"""The Hugging Face Hub: pull adapters, push them with a model card, read remote safetensors headers.

Everything goes through the real `huggingface_hub` client, so HF_ENDPOINT, HF_TOKEN, the token stored
by `hf auth login`, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE=1 behave exactly as in the `hf` CLI.
Client errors become one-line `LorahubError`s; tokens never appear in messages.

    resolve_adapter_path("hf://alice/my-lora@v1")        -> Path in the HF cache
    pull("alice/my-lora", revision="v1", out="dir/")     -> PullResult
    push(Path("adapter/"), "alice/my-lora")              -> PushResult
    read_remote_safetensors_header("org/base", "model.safetensors") -> (header_len, header dict)
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from .errors import LorahubError
from .storage import atomic_path

SCHEME = "hf://"
MARK_START = "<!-- lorahub:start -->"
MARK_END = "<!-- lorahub:end -->"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HEADER_PROBE = 64 * 1024  # first ranged read: the 8-byte length and (usually) the whole header


# ---------------------------------------------------------------------------------------------
# references


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


def parse_ref(arg: str, *, revision: str | None = None) -> HubRef:
    """Parse `hf://owner/name[@rev][/path]` (or `owner/name[@rev][/path]` without the scheme).

    A revision containing slashes must be `refs/pr/N`, `refs/heads/B`, `refs/tags/T` or URL-quoted
    (`@feature%2Fx`). An explicit `revision` overrides the one in the reference.
    """
    from urllib.parse import unquote

    text = arg[len(SCHEME):] if arg.startswith(SCHEME) else arg
    text = text.strip("/")
    parts = text.split("/")
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
        rev = unquote(rev) or None
    repo_id = f"{owner}/{name}"
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id:
        raise LorahubError(f"not a valid Hub repo id: '{repo_id}' (expected owner/name)")
    path = "/".join(rest) or None
    return HubRef(repo_id, revision or rev, path)


# ---------------------------------------------------------------------------------------------
# client plumbing and errors


def _client():
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a declared dependency
        raise LorahubError("the Hub needs the huggingface_hub package: pip install huggingface_hub") from None
    return huggingface_hub


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def current_token(token: str | None = None) -> str | None:
    """The token the client would use: explicit, HF_TOKEN, or the one `hf auth login` stored."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def _token_source() -> str:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the token in HF_TOKEN"
    return "the token stored by 'hf auth login'"


def _is_network_error(exc: BaseException) -> bool:
    """A connection/transport problem (not an HTTP answer)."""
    mod = type(exc).__module__ or ""
    if mod.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "httpcore", "httpcore2"):
        return True
    import socket

    return isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror))


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    message = ""
    if response is not None:
        message = response.headers.get("X-Error-Message") or ""
        if not message:
            with contextlib.suppress(Exception):
                body = response.json()
                err = body.get("error") if isinstance(body, dict) else None
                message = "; ".join(map(str, err)) if isinstance(err, list) else str(err or "")
    if not message:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return message.strip()


@dataclass
class _Ctx:
    repo_id: str
    revision: str | None = None
    filename: str | None = None
    write: bool = False
    token: str | None = None  # only whether one is set matters; never printed


def translate_error(exc: BaseException, ctx: _Ctx) -> LorahubError | None:
    """One clear line for a huggingface_hub / transport exception, or None if it is not one."""
    from huggingface_hub import errors as hfe
    from huggingface_hub import utils as hfu

    rev = ctx.revision or "main"
    where = endpoint()
    offline_cls = getattr(hfe, "OfflineModeIsEnabled", ())
    if isinstance(exc, hfu.RevisionNotFoundError):
        return LorahubError(f"revision '{rev}' not found in Hub repository '{ctx.repo_id}'")
    if isinstance(exc, hfu.RepositoryNotFoundError):
        if ctx.token:
            return LorahubError(f"Hub repository '{ctx.repo_id}' not found, or it is private and "
                                f"{_token_source()} has no access to it")
        return LorahubError(f"Hub repository '{ctx.repo_id}' not found (if it is private, set HF_TOKEN "
                            f"or run 'hf auth login')")
    if offline_cls and isinstance(exc, offline_cls) or \
            isinstance(exc, getattr(hfe, "LocalEntryNotFoundError", ())) and is_offline():
        return LorahubError(f"HF_HUB_OFFLINE=1 and '{ctx.repo_id}' (revision {rev}) is not in the local "
                            f"cache; run the pull once while online")
    if isinstance(exc, getattr(hfe, "LocalEntryNotFoundError", ())):
        return LorahubError(f"cannot reach the Hugging Face Hub at {where} and '{ctx.repo_id}' "
                            f"(revision {rev}) is not in the local cache")
    if isinstance(exc, hfu.EntryNotFoundError):
        name = ctx.filename or "file"
        return LorahubError(f"file '{name}' not found in Hub repository '{ctx.repo_id}' at revision '{rev}'")
    if isinstance(exc, hfu.HfHubHTTPError):
        status = _status(exc)
        message = _server_message(exc)
        if status == 401 and "Invalid credentials" in message or "Invalid user token" in message:
            return LorahubError(f"the Hub rejected {_token_source()} as invalid; set a valid HF_TOKEN "
                                f"or run 'hf auth login'")
        if status == 401:
            if ctx.write:
                return LorahubError("pushing needs a Hugging Face token with write access: set HF_TOKEN "
                                    "or run 'hf auth login'")
            return LorahubError(f"the Hub refused access to '{ctx.repo_id}' (401): {message}")
        if status == 403:
            return LorahubError(f"permission denied on Hub repository '{ctx.repo_id}': {message}")
        if status is not None and status >= 500:
            return LorahubError(f"the Hugging Face Hub at {where} failed ({status}): {message}; try again later")
        return LorahubError(f"the Hub refused the request for '{ctx.repo_id}' ({status}): {message}")
    if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        return LorahubError("the Hub rejected the model card metadata: " + " ".join(str(exc).split()))
    if _is_network_error(exc):
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return LorahubError(f"cannot reach the Hugging Face Hub at {where}: {reason}")
    return None


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, filename: str | None = None, *, write: bool = False,
               token: str | None = None) -> Iterator[_Ctx]:
    """Turn huggingface_hub exceptions raised inside the block into one-line LorahubErrors."""
    ctx = _Ctx(repo_id, revision, filename, write, token if token is not None else _safe_token())
    try:
        yield ctx
    except LorahubError:
        raise
    except Exception as exc:
        translated = translate_error(exc, ctx)
        if translated is None:
            raise
        raise translated from exc


def _safe_token() -> str | None:
    try:
        return current_token()
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# choosing the adapter files of a repo


def _adapter_candidates(files: list[str]) -> list[list[str]]:
    """Groups of files that each make one adapter: a PEFT folder (config + weights) or one file."""
    groups: list[list[str]] = []
    peft_dirs = set()
    for f in sorted(files):
        p = PurePosixPath(f)
        if p.name == PEFT_CONFIG:
            folder = str(p.parent) if str(p.parent) != "." else ""
            weights = [w for w in PEFT_WEIGHTS if _join(folder, w) in files]
            if weights:
                peft_dirs.add(folder)
                # safetensors preferred; a pickle only when that is all there is
                groups.append([f, _join(folder, weights[0])])
    for f in sorted(files):
        p = PurePosixPath(f)
        folder = str(p.parent) if str(p.parent) != "." else ""
        if folder in peft_dirs or p.name in PEFT_WEIGHTS:
            continue
        if p.suffix in WEIGHT_SUFFIXES and not _is_base_weight(p.name):
            groups.append([f])
    return groups


def _is_base_weight(name: str) -> bool:
    """Files of a full model, not an adapter (model.safetensors, model-00001-of-00002.safetensors...)."""
    return bool(re.fullmatch(r"(model|diffusion_pytorch_model|pytorch_model)(-\d+-of-\d+)?\.safetensors", name))


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _label(group: list[str]) -> str:
    if PurePosixPath(group[0]).name == PEFT_CONFIG:
        folder = str(PurePosixPath(group[0]).parent)
        return "(PEFT adapter at the repo root)" if folder == "." else f"{folder}/ (PEFT adapter)"
    return group[0]


def choose_adapter_files(files: list[str], *, repo_id: str, include: str | None = None, path: str | None = None,
                         prompt: Callable[[list[str]], int] | None = None) -> list[str]:
    """The repo files to download for one adapter; fails (or prompts) when several are candidates."""
    files = [f for f in files if not f.startswith(".")]
    scope = files
    if path:
        path = path.strip("/")
        if path in files:
            if PurePosixPath(path).name == PEFT_CONFIG:
                return [g for g in _adapter_candidates(files) if g[0] == path][0] if \
                    any(g[0] == path for g in _adapter_candidates(files)) else [path]
            return [path]
        scope = [f for f in files if f.startswith(path + "/")]
        if not scope:
            raise LorahubError(f"file '{path}' not found in Hub repository '{repo_id}'")
    if include:
        matched = [f for f in scope if fnmatch.fnmatch(f, include) or fnmatch.fnmatch(PurePosixPath(f).name, include)]
        if not matched:
            raise LorahubError(f"no file in Hub repository '{repo_id}' matches --include '{include}'")
        # a PEFT config matched with its weights (or a weights file whose config sits beside it) stays a group
        groups = [g for g in _adapter_candidates(scope) if any(f in matched for f in g)]
        if not groups:
            groups = [[f] for f in matched if PurePosixPath(f).suffix in WEIGHT_SUFFIXES + PICKLE_WEIGHT_SUFFIXES]
        if not groups:
            raise LorahubError(f"the files matching --include '{include}' in '{repo_id}' hold no adapter "
                               f"({', '.join(matched[:5])})")
    else:
        groups = _adapter_candidates(scope)
        if not groups:
            pickles = [f for f in scope if PurePosixPath(f).suffix in PICKLE_WEIGHT_SUFFIXES]
            hint = f" (pickle files: {', '.join(pickles[:5])}; pass --include to pull one)" if pickles else ""
            raise LorahubError(f"no adapter in Hub repository '{repo_id}': no adapter_config.json with "
                               f"weights and no LoRA .safetensors file{hint}")
    if len(groups) == 1:
        return groups[0]
    labels = [_label(g) for g in groups]
    if prompt is not None:
        return groups[prompt(labels)]
    shown = ", ".join(labels[:10]) + (f", … {len(labels) - 10} more" if len(labels) > 10 else "")
    raise LorahubError(f"Hub repository '{repo_id}' holds several adapters ({shown}); "
                       f"pass --include PATTERN (or hf://{repo_id}/FILE) to pick one")


def _adapter_local_path(root: Path, chosen: list[str]) -> Path:
    first = PurePosixPath(chosen[0])
    if first.name == PEFT_CONFIG:
        return root / str(first.parent) if str(first.parent) != "." else root
    if len(chosen) == 1:
        return root / chosen[0]
    return root


# ---------------------------------------------------------------------------------------------
# pull


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


def _list_remote(repo_id: str, revision: str, token: str | None) -> tuple[str | None, list[str]]:
    api = _client().HfApi()
    info = api.model_info(repo_id, revision=revision, token=token)
    return info.sha, [s.rfilename for s in (info.siblings or [])]


def _cached_snapshot(repo_id: str, revision: str, token: str | None = None) -> Path:
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
         prompt: Callable[[list[str]], int] | None = None) -> PullResult:
    """Download one adapter's files from a Hub repo into the HF cache (or copy them to `out`)."""
    hf = _client()
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
                commit, files = _list_remote(ref.repo_id, rev, token)
            except Exception as exc:
                if not _is_network_error(exc):
                    raise
                # like the hf CLI: with the network down, fall back to what the cache holds
                try:
                    snapshot = _cached_snapshot(ref.repo_id, rev, token)
                except Exception:
                    raise exc from None
                offline = True
        else:
            snapshot = _cached_snapshot(ref.repo_id, rev, token)
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
            snapshot = Path(hf.snapshot_download(ref.repo_id, revision=rev, allow_patterns=chosen, token=token))
            commit = snapshot.name
    local = _adapter_local_path(snapshot, chosen)
    root = snapshot
    if out is not None:
        root = Path(out)
        root.mkdir(parents=True, exist_ok=True)
        base = PurePosixPath(chosen[0]).parent if PurePosixPath(chosen[0]).name == PEFT_CONFIG else None
        # each file lands complete or not at all; the PEFT config (chosen[0]) last, so an
        # interrupted copy never looks like an adapter
        for f in reversed(chosen):
            rel = PurePosixPath(f).relative_to(base) if base is not None and str(base) != "." else \
                PurePosixPath(f).name if base is None else PurePosixPath(f)
            with atomic_path(root / str(rel)) as tmp:
                shutil.copyfile(snapshot / f, tmp)  # follows the cache's symlinks
        local = root if base is not None else root / PurePosixPath(chosen[0]).name
    return PullResult(local, ref.repo_id, rev, commit, chosen, root, offline)


def resolve_adapter_path(arg: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local path unchanged; `hf://owner/name[@rev][/file]` pulled into the HF cache first."""
    if not is_hub_ref(arg):
        return Path(arg)
    return pull(str(arg), revision=revision).path


# ---------------------------------------------------------------------------------------------
# remote safetensors headers (Range requests: a base model is never downloaded to check shapes)


def _ranged_get(url: str, start: int, end: int, headers: dict) -> tuple[bytes, int | None]:
    from huggingface_hub.utils import get_session, hf_raise_for_status

    response = get_session().get(url, headers={**headers, "Range": f"bytes={start}-{end}"}, follow_redirects=True)
    hf_raise_for_status(response)
    total = None
    content_range = response.headers.get("Content-Range") or ""
    m = re.match(r"bytes \d+-\d+/(\d+)", content_range)
    if m:
        total = int(m.group(1))
    data = response.content
    if response.status_code == 200:  # the server ignored Range
        total = len(data)
        data = data[start:end + 1]
    return data, total


def read_remote_safetensors_header(repo_id: str, filename: str, revision: str | None = None,
                                   token: str | None = None) -> tuple[int, dict]:
    """(header length N, the parsed JSON header incl. __metadata__) of a safetensors file on the Hub,
    read with HTTP Range requests: 64 KiB first, then the rest of the header if it is longer."""
    header_len, raw, _ = _remote_header_bytes(repo_id, filename, revision, token)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LorahubError(f"corrupt safetensors header ({exc.__class__.__name__})",
                           path=f"hf://{repo_id}/{filename}") from None
    return header_len, header


def _remote_header_bytes(repo_id: str, filename: str, revision: str | None, token: str | None
                         ) -> tuple[int, bytes, int | None]:
    hf = _client()
    from .storage import MAX_HEADER_BYTES

    where = f"hf://{repo_id}/{filename}"
    token = current_token(token)
    with hub_errors(repo_id, revision, filename, token=token):
        if is_offline():
            raise LorahubError(f"HF_HUB_OFFLINE=1: cannot read the header of {where} (it needs the network)")
        url = hf.hf_hub_url(repo_id, filename, revision=revision)
        headers = hf.utils.build_hf_headers(token=token)
        head, total = _ranged_get(url, 0, HEADER_PROBE - 1, headers)
        if len(head) < 8:
            raise LorahubError("not a safetensors file (shorter than 8 bytes)", path=where)
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > MAX_HEADER_BYTES or (total is not None and header_len > total - 8):
            raise LorahubError(f"not a safetensors file or corrupt header (header length {header_len})", path=where)
        raw = head[8:8 + header_len]
        if len(raw) < header_len:
            more, _ = _ranged_get(url, 8 + len(raw), 8 + header_len - 1, headers)
            raw += more
    if raw[:1] != b"{":
        raise LorahubError("not a safetensors file (header does not start with '{')", path=where)
    return header_len, raw, total


def list_repo_files(repo_id: str, revision: str | None = None, token: str | None = None) -> tuple[str | None, list[str]]:
    """(commit sha, files) of a repo at a revision, with lorahub's error messages."""
    token = current_token(token)
    with hub_errors(repo_id, revision, token=token):
        if is_offline():
            snapshot = _cached_snapshot(repo_id, revision or "main", token)
            return snapshot.name, _local_files(snapshot)
        return _list_remote(repo_id, revision or "main", token)


# ---------------------------------------------------------------------------------------------
# model card


def split_front_matter(text: str) -> tuple[dict, str, bool]:
    """(metadata, body, had_front_matter). Invalid front matter is an error (we will not drop it)."""
    import yaml

    text = text.replace("\r\n", "\n")
    if not text.startswith("---\n") and text.strip() != "---":
        return {}, text, False
    end = re.search(r"^---[ \t]*$", text[4:], flags=re.M)
    if end is None:
        return {}, text, False
    block = text[4:4 + end.start()]
    body = text[4 + end.end():].lstrip("\n")
    try:
        data = yaml.safe_load(block) or {}
    except yaml.YAMLError as exc:
        raise LorahubError(f"README.md front matter is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LorahubError("README.md front matter is not a YAML mapping (key: value)")
    return data, body, True


def looks_like_repo_id(value: str | None) -> bool:
    if not value or not isinstance(value, str):
        return False
    if value.startswith((SCHEME, "/", ".", "~")) or "\\" in value or Path(value).exists():
        return False
    return bool(REPO_ID_RE.match(value))


def card_metadata(meta: dict, info: dict, base_model: str | None) -> dict:
    """`meta` (kept as is, unknown keys included) updated with lorahub's adapter keys."""
    out = dict(meta)
    fmt = info.get("format")
    # PEFT's own card names the base by whatever path training used; the Hub only takes repo ids
    old = out.get("base_model")
    olds = old if isinstance(old, list) else [old] if old else []
    stale = {str(b) for b in olds if not looks_like_repo_id(str(b))}
    if stale:
        kept = [b for b in olds if str(b) not in stale]
        if kept:
            out["base_model"] = kept if isinstance(old, list) else kept[0]
        else:
            out.pop("base_model", None)
            out.pop("base_model_relation", None)
    if isinstance(out.get("tags"), list):
        out["tags"] = [t for t in out["tags"] if not (isinstance(t, str) and t.startswith("base_model:")
                                                      and t.split(":", 2)[-1] in stale)]
    if fmt == "peft":
        out["library_name"] = out.get("library_name") or "peft"
    elif fmt == "diffusers":
        out.setdefault("library_name", "diffusers")
    if base_model:
        out["base_model"] = base_model
        out["base_model_relation"] = "adapter"
    tags = out.get("tags") or []
    if isinstance(tags, str):
        tags = [tags]
    wanted = ["lora"]
    if fmt == "peft":
        wanted.append("peft")
    if info.get("dora"):
        wanted.append("dora")
    if info.get("components"):
        wanted.append("text-to-image")
    if base_model:
        wanted.append(f"base_model:adapter:{base_model}")
    out["tags"] = list(tags) + [t for t in wanted if t not in tags]
    return out


def card_summary(info: dict, *, repo_id: str, base_model: str | None) -> str:
    from . import __version__

    def dist(key: str) -> str:
        single = info.get(key.removesuffix("_distribution"))
        if single is not None:
            return str(single)
        return ", ".join(f"{v} ×{n}" for v, n in (info.get(key) or {}).items())

    lines = [MARK_START, "## Adapter summary", "",
             "_Generated by [lorahub](https://github.com/lorahub/lorahub) "
             f"{__version__}; edit outside the lorahub markers, this block is rewritten on every push._", "",
             "| | |", "|---|---|",
             f"| format | {info.get('format')} |"]
    if base_model:
        lines.append(f"| base model | [{base_model}](https://huggingface.co/{base_model}) |")
    lines += [f"| modules | {info.get('modules')} |",
              f"| rank | {dist('rank_distribution')} |",
              f"| alpha | {dist('alpha_distribution')} |",
              f"| scale | {dist('scale_distribution')} |",
              f"| targets | {', '.join(f'{k} ×{v}' for k, v in (info.get('targets') or {}).items())} |",
              f"| parameters | {info.get('trainable_parameters', 0):,} |",
              f"| dtypes | {', '.join(f'{k} ×{v}' for k, v in (info.get('dtypes') or {}).items())} |"]
    flags = [n for n, k in (("DoRA", "dora"), ("rsLoRA", "rslora"), ("fan-in-fan-out", "fan_in_fan_out"))
             if info.get(k)]
    if flags:
        lines.append(f"| variants | {', '.join(flags)} |")
    if info.get("modules_to_save"):
        lines.append(f"| full tensors | {', '.join(info['modules_to_save'])} |")
    lines.append("")
    for entry in info.get("files") or []:
        hashes = entry.get("hashes") or {}
        if not hashes:
            continue
        lines.append(f"**{Path(entry['path']).name}** ({entry.get('size', 0):,} bytes)")
        lines.append("")
        for name in ("sha256", "autov2", "sshs_model_hash", "autov3"):
            if name in hashes:
                lines.append(f"- {name}: `{hashes[name]}`")
        lines.append("")
    if info.get("format") == "peft":
        lines += ["```python", "from peft import PeftModel",
                  f"model = PeftModel.from_pretrained(base_model, \"{repo_id}\")", "```", ""]
    lines.append(MARK_END)
    return "\n".join(lines)


def render_card(existing: str | None, info: dict, *, repo_id: str, base_model: str | None) -> str:
    """README.md text: existing front matter and prose kept, adapter keys and summary block updated."""
    import yaml

    meta, body, _ = split_front_matter(existing or "")
    meta = card_metadata(meta, info, base_model)
    if not base_model and isinstance(meta.get("base_model"), str):  # named by the user's card: keep it
        base_model = meta["base_model"]
        meta = card_metadata(meta, info, base_model)
    block = card_summary(info, repo_id=repo_id, base_model=base_model)
    if MARK_START in body and MARK_END in body.split(MARK_START, 1)[1]:
        before, rest = body.split(MARK_START, 1)
        after = rest.split(MARK_END, 1)[1]
        body = before + block + after
    else:
        if not body.strip():
            body = f"# {repo_id.split('/')[-1]}\n\n"
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{front}---\n\n{body.lstrip(chr(10)).rstrip(chr(10))}\n"


# ---------------------------------------------------------------------------------------------
# push


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit: str | None
    commit_url: str | None
    pr_url: str | None
    revision: str
    files: list[str] = field(default_factory=list)
    created: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "repo_url": self.repo_url, "commit": self.commit,
                "commit_url": self.commit_url, "pr_url": self.pr_url, "revision": self.revision,
                "files": self.files, "created_repo": self.created}


def _upload_files(path: Path, info: dict) -> list[tuple[str, Path]]:
    """(path in repo, local file) for the adapter: PEFT config + weights, or the single file."""
    if path.is_dir():
        out = []
        config = path / PEFT_CONFIG
        if config.is_file():
            out.append((PEFT_CONFIG, config))
        for entry in info.get("files") or []:
            file = Path(entry["path"]).resolve()
            root = path.resolve()
            rel = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
            if rel not in [r for r, _ in out]:
                out.append((rel, file))
        return out
    return [(path.name, path)]


def _existing_card(api, repo_id: str, revision: str, token: str | None) -> str | None:
    from huggingface_hub.utils import EntryNotFoundError, RevisionNotFoundError

    try:
        file = _client().hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return Path(file).read_text(encoding="utf-8", errors="replace")


def push(path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, create_pr: bool = False, base: str | None = None,
         token: str | None = None, info: dict | None = None,
         on_progress: Callable[[str], None] | None = None) -> PushResult:
    """Inspect (and with `base`, validate) an adapter, then upload it with a generated model card.

    The user's files are never modified: the card is generated in memory and committed together
    with the adapter files in one commit.
    """
    hf = _client()
    say = on_progress or (lambda text: None)
    path = Path(path)
    if is_hub_ref(repo_id):
        repo_id = parse_ref(repo_id).repo_id
    if not REPO_ID_RE.match(repo_id):
        raise LorahubError(f"not a valid Hub repo id: '{repo_id}' (expected owner/name)")
    if not path.exists():
        raise LorahubError("no such file or directory", path=path)
    if is_offline():
        raise LorahubError("HF_HUB_OFFLINE=1: pushing needs the network")
    token = current_token(token)
    if not token:
        raise LorahubError("pushing needs a Hugging Face token with write access: set HF_TOKEN or run "
                           "'hf auth login'")

    # 1. the adapter must load and be finite; with a base, it must fit it
    from .inspect import inspect_adapter, nonfinite_error

    say("inspecting the adapter")
    if info is None:
        info = inspect_adapter(path)
    problem = nonfinite_error(info)
    if problem is not None:
        raise LorahubError(f"refusing to push: {problem}")
    base_model = None
    if base:
        say("validating against the base model")
        _validate_against_base(path, base)
        base_model = parse_ref(base).repo_id if is_hub_ref(base) else base if looks_like_repo_id(base) else None
    if base_model is None and looks_like_repo_id(info.get("base_model")):
        base_model = info["base_model"]

    branch = revision or "main"
    api = hf.HfApi(token=token)
    with hub_errors(repo_id, branch, write=True, token=token):
        # 2. the repo (and branch)
        created = False
        if not api.repo_exists(repo_id):
            say(f"creating {repo_id}")
            api.create_repo(repo_id, private=private, exist_ok=True)
            created = True
        if revision and revision != "main":
            refs = api.list_repo_refs(repo_id)
            if revision in {t.name for t in refs.tags} or re.fullmatch(r"[0-9a-f]{40}", revision):
                raise LorahubError(f"cannot push to '{revision}': it is a tag or a commit, not a branch")
            if revision not in {b.name for b in refs.branches}:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        # 3. the card: the user's local README wins over the Hub's; either way their text is kept
        local_readme = (path / "README.md") if path.is_dir() else None
        if local_readme is not None and local_readme.is_file():
            existing = local_readme.read_text(encoding="utf-8", errors="replace")
        else:
            existing = _existing_card(api, repo_id, branch, token)
        card = render_card(existing, info, repo_id=repo_id, base_model=base_model)
        # 4. one commit: adapter files from where they are, the card from memory
        uploads = _upload_files(path, info)
        operations = [hf.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local)) for rel, local in uploads]
        operations.append(hf.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        say(f"uploading {len(uploads)} files")
        commit = api.create_commit(repo_id, operations, commit_message=message or "Upload LoRA adapter with lorahub",
                                   revision=revision, create_pr=create_pr)
    return PushResult(repo_id, str(commit.repo_url), commit.oid, commit.commit_url, commit.pr_url, branch,
                      [rel for rel, _ in uploads] + ["README.md"], created)


def _validate_against_base(path: Path, base: str) -> None:
    """Run lorahub.validate against `base`; raise CheckFailed when it reports problems."""
    from .base import load_base
    from .errors import CheckFailed
    from .formats import load_adapter
    from .validate import validate

    report = validate(load_adapter(path), load_base(base), suggest=False)
    if not report.ok:
        first = report.errors[0] if report.errors else None
        detail = f": {first.module}: expected {first.expected}, found {first.found}" if first else ""
        raise CheckFailed(f"refusing to push: {report.summary}{detail}", report)


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
