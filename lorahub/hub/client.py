"""The Hub client: settings, error translation, repo listings and ranged reads of single files.

Everything goes through the real `huggingface_hub` client, so HF_ENDPOINT, HF_TOKEN, the token stored
by `hf auth login`, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE=1 behave exactly as in the `hf` CLI.
Client errors become one-line `LorahubError`s (one translator, `translate_error`); tokens never
appear in messages.

    list_files("org/base", "main")                      -> (commit sha, sorted repo paths)
    read_header("org/base", "model.safetensors", sha)   -> SafetensorsHeader (8 bytes, then N bytes)
    read_json("org/base", "config.json", sha)           -> the parsed file
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from ..errors import LorahubError
from ..storage import MAX_HEADER_BYTES, SafetensorsHeader, parse_header_bytes, parse_json

Token = str | bool | None  # huggingface_hub's convention: a token, True (the stored one) or False (none)


def client():
    """The huggingface_hub module (imported late: it reads HF_* variables once, at import)."""
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


def current_token(token: Token = None) -> str | None:
    """The token the client would use: explicit, HF_TOKEN, or the one `hf auth login` stored."""
    if isinstance(token, str) and token:
        return token
    if token is False:
        return None
    return client().get_token()


def _token_source() -> str:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the token in HF_TOKEN"
    return "the token stored by 'hf auth login'"


# ---------------------------------------------------------------------------------------------
# errors


class HubUnreachable(LorahubError):
    """The Hub could not answer (network down, HF_HUB_OFFLINE=1, a 5xx): callers may fall back to a cache."""

    def __init__(self, message: str, *, reason: str, network: bool = False):
        super().__init__(message)
        self.reason = reason  # short: `HTTP 500`, `ConnectError: [Errno 111] Connection refused`
        self.network = network  # a transport failure (not an HTTP answer, not offline mode)


def is_network_error(exc: BaseException) -> bool:
    """A connection/transport problem (not an HTTP answer)."""
    mod = type(exc).__module__ or ""
    if mod.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "httpcore", "httpcore2"):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__


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
    return (message or _first_line(exc)).strip()


def file_not_found(repo_id: str, filename: str, revision: str | None = None) -> LorahubError:
    at = f" at revision '{revision}'" if revision else ""
    return LorahubError(f"file '{filename}' not found in Hub repository '{repo_id}'{at}")


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
    local_missing = getattr(hfe, "LocalEntryNotFoundError", ())
    if isinstance(exc, hfu.RevisionNotFoundError):
        return LorahubError(f"revision '{rev}' not found in Hub repository '{ctx.repo_id}'")
    if isinstance(exc, getattr(hfe, "GatedRepoError", ())):
        return LorahubError(f"Hub repository '{ctx.repo_id}' is gated: accept its terms on the Hub and set "
                            f"HF_TOKEN or run 'hf auth login'")
    if isinstance(exc, hfu.RepositoryNotFoundError):
        if ctx.token:
            return LorahubError(f"Hub repository '{ctx.repo_id}' not found, or it is private and "
                                f"{_token_source()} has no access to it")
        return LorahubError(f"Hub repository '{ctx.repo_id}' not found (if it is private, set HF_TOKEN "
                            f"or run 'hf auth login')")
    if offline_cls and isinstance(exc, offline_cls) or isinstance(exc, local_missing) and is_offline():
        return HubUnreachable(f"HF_HUB_OFFLINE=1 and '{ctx.repo_id}' (revision {rev}) is not in the local "
                              f"cache; run the pull once while online", reason="HF_HUB_OFFLINE=1")
    if isinstance(exc, local_missing):
        return HubUnreachable(f"cannot reach the Hugging Face Hub at {where} and '{ctx.repo_id}' "
                              f"(revision {rev}) is not in the local cache", reason=_reason(exc), network=True)
    if isinstance(exc, hfu.EntryNotFoundError):
        return file_not_found(ctx.repo_id, ctx.filename or "file", rev)
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
            return HubUnreachable(f"the Hugging Face Hub at {where} failed ({status}): {message}; try again later",
                                  reason=f"HTTP {status}")
        return LorahubError(f"the Hub refused the request for '{ctx.repo_id}' ({status}): {message}")
    if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
        return LorahubError("the Hub rejected the model card metadata: " + " ".join(str(exc).split()))
    if is_network_error(exc):
        return HubUnreachable(f"cannot reach the Hugging Face Hub at {where}: {_first_line(exc)}",
                              reason=_reason(exc), network=True)
    return None


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, filename: str | None = None, *, write: bool = False,
               token: Token = None) -> Iterator[_Ctx]:
    """Turn huggingface_hub exceptions raised inside the block into one-line LorahubErrors."""
    ctx = _Ctx(repo_id, revision, filename, write, _safe_token(token))
    try:
        yield ctx
    except LorahubError:
        raise
    except Exception as exc:
        translated = translate_error(exc, ctx)
        if translated is None:
            raise
        raise translated from exc


def _safe_token(token: Token) -> str | None:
    try:
        return current_token(token)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# listing and ranged reads (a base model is never downloaded to read its shapes)


def list_files(repo_id: str, revision: str | None = None, token: Token = None) -> tuple[str | None, list[str]]:
    """(commit sha, sorted file paths) of a repo at a revision (default: main)."""
    with hub_errors(repo_id, revision, token=token):
        info = client().HfApi().model_info(repo_id, revision=revision, token=token)
    return info.sha, sorted(s.rfilename for s in (info.siblings or []))


def read_range(repo_id: str, filename: str, revision: str | None = None, token: Token = None,
               start: int | None = None, end: int | None = None) -> tuple[bytes, int | None]:
    """(bytes start..end inclusive, or the whole file; the file's total size when the server says it)."""
    hf = client()
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    with hub_errors(repo_id, revision, filename, token=token):
        url = hf.hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint())
        headers = build_hf_headers(token=token)
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        response = get_session().get(url, headers=headers, timeout=30)
        hf_raise_for_status(response)
    data = response.content
    m = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range") or "")
    total = int(m.group(1)) if m else None
    if response.status_code == 200:  # the whole file: no Range asked, or the server ignored it
        total = len(data)
        if start is not None:
            data = data[start:None if end is None else end + 1]
    return data, total


def read_json(repo_id: str, filename: str, revision: str | None = None, token: Token = None) -> Any:
    raw, _ = read_range(repo_id, filename, revision, token)
    return parse_json(raw, f"{repo_id}/{filename}")


def read_header(repo_id: str, filename: str, revision: str | None = None, token: Token = None) -> SafetensorsHeader:
    """A safetensors header on the Hub: two Range requests, the 8-byte length and then the N-byte JSON."""
    label = f"{repo_id}/{filename}"
    head, total = read_range(repo_id, filename, revision, token, 0, 7)
    if len(head) < 8:
        raise LorahubError("not a safetensors file (shorter than 8 bytes)", path=label)
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len < 2 or header_len > MAX_HEADER_BYTES or (total is not None and header_len > total - 8):
        raise LorahubError(f"not a safetensors file or corrupt header (header length {header_len})", path=label)
    raw, _ = read_range(repo_id, filename, revision, token, 8, 8 + header_len - 1)
    if len(raw) < header_len or raw[:1] != b"{":
        raise LorahubError("not a safetensors file (header does not start with '{')", path=label)
    return parse_header_bytes(raw[:header_len], label, None)


def read_headers(repo_id: str, filenames: Iterable[str], revision: str | None = None,
                 token: Token = None) -> dict[str, SafetensorsHeader]:
    """Several headers at once: the shards of a large model are fetched in parallel."""
    names = list(filenames)
    if len(names) <= 1:
        return {name: read_header(repo_id, name, revision, token) for name in names}
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        return dict(zip(names, pool.map(lambda name: read_header(repo_id, name, revision, token), names)))
