"""A small Hugging Face Hub server for tests, written with the standard library only.

It implements the subset of the Hub HTTP API that the real `huggingface_hub` client uses for
create/delete repo, upload (preupload, LFS batch/PUT/verify, NDJSON commit), listing, model info,
refs/branches/tags/commits and downloads through `/resolve` (HEAD, GET, Range). Xet is not
implemented (clients must run with HF_HUB_DISABLE_XET=1).

State lives in memory; file contents are stored content-addressed (by sha256) under `data_dir`.
`HubServer.stats` counts requests per (method, kind), records Range requests and the bytes served
per file, so tests can prove that only a header was read.

    server = HubServer(tokens={"tok-alice": {"user": "alice", "role": "write"}})
    server.start()          # serves on server.url until server.stop()
"""
from __future__ import annotations

import base64
import collections
import datetime as _dt
import fnmatch
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:  # the card parser; the test environment has pyyaml
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
PLURAL = {"model": "models", "dataset": "datasets", "space": "spaces"}
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.h5", "*.npz",
                "*.zip", "*.msgpack", "*.tar", "*.gz", "*.pkl", "*.npy")
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
HEX40 = re.compile(r"^[0-9a-f]{40}$")
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def front_matter(text: str) -> tuple[bool, Any, str | None]:
    """(has_front_matter, parsed, error) for a README text."""
    lines = text.replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != "---":
        return False, None, None
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            block = "\n".join(lines[1:i])
            if yaml is None:
                return True, {}, None
            try:
                data = yaml.safe_load(block)
            except yaml.YAMLError as exc:
                return True, None, f"Invalid YAML in front matter: {exc}"
            if data is None:
                data = {}
            if not isinstance(data, dict):
                return True, None, "YAML front matter must be a mapping (key: value)"
            return True, data, None
    return False, None, None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: Any = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    blob_id: str  # git blob sha1 (of the content, or of the LFS pointer)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    id: str
    parents: list[str]
    files: dict[str, FileEntry]
    title: str
    message: str
    date: str
    author: str


@dataclass
class Repo:
    type: str
    repo_id: str
    owner: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    gated: Any = False
    uid: str = field(default_factory=lambda: secrets.token_hex(12))
    # what /api/models sorts by; set with HubServer.set_repo_stats (the real Hub counts them itself)
    downloads: int = 0
    likes: int = 0
    trending: float = 0.0


class Stats:
    """What the server saw. `counts[(method, kind)]`, `ranges` (one dict per Range request),
    `bytes_served[(repo_id, path)]`, `requests` (method, kind, path, status)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.counts: collections.Counter = collections.Counter()
            self.ranges: list[dict] = []
            self.bytes_served: collections.Counter = collections.Counter()
            self.requests: list[tuple[str, str, str, int]] = []

    def record(self, method: str, kind: str, path: str, status: int) -> None:
        with self._lock:
            self.counts[(method, kind)] += 1
            self.requests.append((method, kind, path, status))

    def served(self, repo_id: str, path: str, nbytes: int, range_header: str | None, status: int) -> None:
        with self._lock:
            self.bytes_served[(repo_id, path)] += nbytes
            if range_header:
                self.ranges.append({"repo": repo_id, "path": path, "range": range_header, "status": status,
                                    "bytes": nbytes})

    def count(self, method: str | None = None, kind: str | None = None) -> int:
        with self._lock:
            return sum(n for (m, k), n in self.counts.items()
                       if (method is None or m == method) and (kind is None or k == kind))

    def snapshot(self) -> dict:
        with self._lock:
            return {"counts": {f"{m} {k}": n for (m, k), n in sorted(self.counts.items())},
                    "ranges": list(self.ranges),
                    "bytes_served": {f"{r}:{p}": n for (r, p), n in self.bytes_served.items()}}


class HubState:
    def __init__(self, data_dir: Path, tokens: dict[str, dict]):
        self.data_dir = Path(data_dir)
        (self.data_dir / "objects").mkdir(parents=True, exist_ok=True)
        self.tokens = tokens
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tickets: dict[str, tuple[str, int]] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()

    # ---- blobs
    def blob_path(self, sha256: str) -> Path:
        return self.data_dir / "objects" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        p = self.blob_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.blob_path(sha)
        if not p.is_file():
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{sha}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return sha

    def read_blob(self, entry: FileEntry, start: int = 0, end: int | None = None) -> bytes:
        with open(self.blob_path(entry.sha256), "rb") as fh:
            fh.seek(start)
            return fh.read((entry.size if end is None else end) - start)

    def entry_for(self, data: bytes, lfs: bool) -> FileEntry:
        sha = self.put_blob(data)
        blob_id = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return FileEntry(sha, len(data), lfs, blob_id)

    # ---- repos and commits
    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str,
                   message: str, author: str) -> Commit:
        seed = f"{repo.uid}{parent}{title}{next(self._counter)}{time.time_ns()}{sorted(files.items())}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), [parent] if parent else [], files, title,
                        message, now_iso(), author)
        repo.commits[commit.id] = commit
        return commit

    def create_repo(self, repo_type: str, repo_id: str, owner: str, private: bool = False) -> Repo:
        repo = Repo(repo_type, repo_id, owner, private, now_iso())
        files = {".gitattributes": self.entry_for(GITATTRIBUTES, lfs=False)}
        commit = self.new_commit(repo, None, files, "initial commit", "", owner)
        repo.branches["main"] = commit.id
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def resolve_rev(self, repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        for prefix, table in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if rev.startswith(prefix) and rev[len(prefix):] in table:
                return table[rev[len(prefix):]]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in repo.prs:
            return repo.prs[int(m.group(1))]
        if HEX40.match(rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


# GET /api/models: as the real Hub answers huggingface_hub's `list_models`
# the properties of a listed model without `expand`/`full` (the real Hub's default projection)
LIST_DEFAULT = ("_id", "id", "likes", "trendingScore", "private", "downloads", "tags", "pipeline_tag",
                "library_name", "createdAt", "modelId")
# `full=true` adds these (the files as `siblings` with `rfilename` only)
LIST_FULL = LIST_DEFAULT + ("author", "sha", "lastModified", "gated", "disabled", "siblings")
# what `expand` may name (huggingface_hub's ExpandModelProperty_T); the ones this server has no data for
# are answered as absent, an unknown name is a 400 as on the Hub
EXPAND_PROPERTIES = {
    "author", "baseModels", "cardData", "childrenModelCount", "config", "createdAt", "disabled", "downloads",
    "downloadsAllTime", "evalResults", "gated", "gguf", "inference", "inferenceProviderMapping", "lastModified",
    "library_name", "likes", "mask_token", "model-index", "pipeline_tag", "private", "resourceGroup", "safetensors",
    "sha", "siblings", "spaces", "tags", "transformersInfo", "trendingScore", "usedStorage", "widgetData",
}
# `sort` values (huggingface_hub maps last_modified -> lastModified, created_at -> createdAt, ...)
LIST_SORTS = {"downloads": "downloads", "likes": "likes", "lastModified": "lastModified", "createdAt": "createdAt",
              "trendingScore": "trendingScore", "id": "id", "modelId": "id"}
LIST_PAGE_MAX = 1000  # the most models one page holds; more are behind a `Link: <…>; rel="next"` header


def base_model_tags(card: Any, files: dict[str, "FileEntry"] | None = None, tags: list[str] | None = None) -> list[str]:
    """The tags the Hub derives from a card's `base_model`: `base_model:ID` and `base_model:RELATION:ID`, the
    relation being `base_model_relation` or, when the card has none, inferred as the Hub does: `adapter` for a
    repo with adapter files (adapter_config.json), a `peft` library or a `lora` tag, `quantized` for GGUF
    files, else `finetune`."""
    if not isinstance(card, dict):
        return []
    raw = card.get("base_model")
    ids = [str(b) for b in (raw if isinstance(raw, list) else [raw]) if isinstance(b, str) and b.strip()]
    if not ids:
        return []
    relation = card.get("base_model_relation")
    if relation not in ("adapter", "merge", "quantized", "finetune"):
        names = [p.rsplit("/", 1)[-1] for p in (files or {})]
        if "adapter_config.json" in names or card.get("library_name") == "peft" or "lora" in (tags or []):
            relation = "adapter"
        elif any(n.endswith(".gguf") for n in names):
            relation = "quantized"
        else:
            relation = "finetune"
    out = []
    for base in ids:
        out += [f"base_model:{base}", f"base_model:{relation}:{base}"]
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    hub: "HubServer"


class HubServer:
    """The server object tests use: `.url`, `.tokens`, `.data_dir`, `.stats`, `.state`.

    Failure injection for network-error tests: `fail(mode, count=None, kinds=None)` with mode
    "500" (answer 500 Internal Error) or "close" (drop the connection without answering);
    `count=None` means until `heal()`.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", tokens: dict[str, dict] | None = None,
                 data_dir: str | Path | None = None):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="lorahub-hub-"))
        self.tokens: dict[str, dict] = tokens if tokens is not None else {}
        self.state = HubState(self.data_dir, self.tokens)
        self.stats = Stats()
        self.host = host
        self._requested_port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._fail_lock = threading.Lock()
        self._fail: dict | None = None
        self.list_page_max = LIST_PAGE_MAX  # tests lower it to see pagination

    # ---- lifecycle
    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._requested_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HubServer":
        if self._httpd is None:
            self._httpd = _Server((self.host, self._requested_port), _Handler)
            self._httpd.hub = self
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="hubserver", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- helpers for tests
    def reset_stats(self) -> None:
        self.stats.reset()

    def fail(self, mode: str = "500", count: int | None = None, kinds: set[str] | None = None) -> None:
        assert mode in ("500", "close")
        with self._fail_lock:
            self._fail = {"mode": mode, "count": count, "kinds": set(kinds) if kinds else None}

    def heal(self) -> None:
        with self._fail_lock:
            self._fail = None

    def _should_fail(self, kind: str) -> str | None:
        with self._fail_lock:
            f = self._fail
            if not f or (f["kinds"] and kind not in f["kinds"]):
                return None
            if f["count"] is not None:
                f["count"] -= 1
                if f["count"] <= 0:
                    self._fail = None
            return f["mode"]

    def add_token(self, token: str, user: str, role: str = "write", orgs: list[str] | None = None) -> str:
        self.tokens[token] = {"user": user, "role": role, "orgs": list(orgs or [])}
        return token

    def seed_repo(self, repo_id: str, files: dict[str, bytes | str | Path], *, owner: str | None = None,
                  private: bool = False, repo_type: str = "model", branch: str = "main",
                  message: str = "seed", tag: str | None = None) -> str:
        """Create (if needed) a repo and commit `files` to `branch` directly; returns the commit id."""
        owner = owner or repo_id.split("/")[0]
        st = self.state
        with st.lock:
            repo = st.repos.get((repo_type, repo_id)) or st.create_repo(repo_type, repo_id, owner, private)
            parent = repo.branches.get(branch) or repo.branches["main"]
            tree = dict(repo.commits[parent].files)
            for path, content in files.items():
                data = Path(content).read_bytes() if isinstance(content, Path) else \
                    content.encode() if isinstance(content, str) else bytes(content)
                tree[path] = st.entry_for(data, lfs=_wants_lfs(path, data))
            commit = st.new_commit(repo, parent, tree, message, "", owner)
            repo.branches[branch] = commit.id
            if tag:
                repo.tags[tag] = commit.id
            return commit.id

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.state.repos.get((repo_type, repo_id))

    def set_repo_stats(self, repo_id: str, *, downloads: int | None = None, likes: int | None = None,
                       trending: float | None = None, repo_type: str = "model") -> None:
        """Set the counters `GET /api/models` reports and sorts by (`downloads`, `likes`, `trendingScore`)."""
        with self.state.lock:
            repo = self.state.repos[(repo_type, repo_id)]
            if downloads is not None:
                repo.downloads = int(downloads)
            if likes is not None:
                repo.likes = int(likes)
            if trending is not None:
                repo.trending = float(trending)


def _wants_lfs(path: str, data: bytes) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or len(data) >= LFS_THRESHOLD or b"\0" in data[:512]


class _DropConnection(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lorahub-testhub/1.0"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ---- plumbing
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    break
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after the chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        # record before answering: a test reading stats right after the client returns sees this request
        if not self._recorded:
            self._recorded = True
            self.hub.stats.record(self.command, self._kind, self._req_path, status)
        # headers and body in one write (send_response/send_header buffer the headers)
        self._headers_buffer.append(b"\r\n")
        data = b"".join(self._headers_buffer)
        self._headers_buffer = []
        if self.command != "HEAD":
            data += body
        self.wfile.write(data)
        self._status = status

    def _json(self, status: int, obj: Any, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(err.headers)
        body = err.body if err.body is not None else {"error": err.message}
        self._json(err.status, body, headers)

    @property
    def base(self) -> str:
        host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        return f"http://{host}"

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def st(self) -> HubState:
        return self.server.hub.state

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._status = 0
        body = self._read_body()  # always, before answering: keep-alive depends on it
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        segs = split.path.split("/")[1:]
        route = self._route(self.command, segs)
        kind = route[0] if route else "unknown"
        self._kind, self._req_path, self._recorded = kind, split.path, False
        try:
            mode = self.hub._should_fail(kind)
            if mode == "close":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise _DropConnection
            if mode == "500":
                raise HubError(500, "Internal Error (injected)")
            if route is None:
                raise HubError(404, f"Not found: {self.command} {split.path}")
            self.user = self._auth()
            kind, func, args = route
            func(body, *args)
        except _DropConnection:
            pass
        except HubError as err:
            self._error(err)
        except Exception as exc:  # a server bug: answer 500 so the test sees it
            import traceback
            traceback.print_exc()
            self._error(HubError(500, f"server error: {exc.__class__.__name__}: {exc}"))
        finally:
            if not self._recorded:  # dropped connection
                self._recorded = True
                self.hub.stats.record(self.command, kind, split.path, self._status)

    def _route(self, method: str, segs: list[str]):
        u = [unquote(s) for s in segs]
        n = len(segs)
        if n >= 1 and segs[0] == "api":
            if u[1:] == ["whoami-v2"] and method == "GET":
                return "whoami", self.h_whoami, ()
            if u[1:] == ["repos", "create"] and method == "POST":
                return "create", self.h_create, ()
            if u[1:] == ["repos", "delete"] and method == "DELETE":
                return "delete", self.h_delete, ()
            if u[1:] == ["validate-yaml"] and method == "POST":
                return "validate-yaml", self.h_validate_yaml, ()
            if n == 2 and u[1] in TYPES and method == "GET":
                return "list", self.h_list, (TYPES[u[1]],)
            if n >= 4 and u[1] in TYPES:
                rtype, repo_id, rest = TYPES[u[1]], f"{u[2]}/{u[3]}", segs[4:]
                r = [unquote(s) for s in rest]
                if not rest and method == "GET":
                    return "info", self.h_info, (rtype, repo_id, None)
                if not rest:
                    return None
                op = r[0]
                if op == "revision" and len(r) >= 2 and method == "GET":
                    return "revision", self.h_info, (rtype, repo_id, "/".join(r[1:]))
                if op == "settings" and method == "PUT":
                    return "settings", self.h_settings, (rtype, repo_id)
                if op == "tree" and len(r) >= 2 and method == "GET":
                    return "tree", self.h_tree, (rtype, repo_id, r[1], "/".join(r[2:]))
                if op == "paths-info" and len(r) == 2 and method == "POST":
                    return "paths-info", self.h_paths_info, (rtype, repo_id, r[1])
                if op == "refs" and method == "GET":
                    return "refs", self.h_refs, (rtype, repo_id)
                if op == "branch" and len(r) >= 2 and method in ("POST", "DELETE"):
                    return "branch", self.h_branch, (rtype, repo_id, "/".join(r[1:]))
                if op == "tag" and len(r) >= 2 and method in ("POST", "DELETE"):
                    return "tag", self.h_tag, (rtype, repo_id, "/".join(r[1:]))
                if op == "commits" and len(r) == 2 and method == "GET":
                    return "commits", self.h_commits, (rtype, repo_id, r[1])
                if op == "preupload" and len(r) == 2 and method == "POST":
                    return "preupload", self.h_preupload, (rtype, repo_id, r[1])
                if op == "commit" and len(r) == 2 and method == "POST":
                    return "commit", self.h_commit, (rtype, repo_id, r[1])
                if op in ("xet-read-token", "xet-write-token"):
                    return "xet", self.h_xet, ()
            return None
        if n == 2 and segs[0] == "lfs-upload" and method == "PUT":
            return "lfs-upload", self.h_lfs_upload, (u[1],)
        if n == 5 and segs[0] == "lfs-verify" and method == "POST":
            return "lfs-verify", self.h_lfs_verify, (u[1], f"{u[2]}/{u[3]}", u[4])
        # git/LFS and resolve paths: /{pfx}{ns}/{name}...
        rtype, off = "model", 0
        if n >= 1 and segs[0] in ("datasets", "spaces"):
            rtype, off = TYPES[segs[0]], 1
        rest = segs[off:]
        if len(rest) == 5 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects"]:
            return None
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"] \
                and method == "POST":
            return "lfs-batch", self.h_lfs_batch, (rtype, f"{unquote(rest[0])}/{unquote(rest[1][:-4])}")
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return "resolve", self.h_resolve, (rtype, f"{unquote(rest[0])}/{unquote(rest[1])}", unquote(rest[3]),
                                               "/".join(unquote(s) for s in rest[4:]))
        return None

    # ---- auth
    def _auth(self) -> dict | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        token = header.split(" ", 1)[1].strip() if " " in header else header.strip()
        info = self.st.tokens.get(token)
        if info is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return {"user": info["user"], "role": info.get("role", "write"), "orgs": list(info.get("orgs", []))}

    def _namespaces(self) -> set[str]:
        return {self.user["user"], *self.user["orgs"]} if self.user else set()

    def _repo(self, rtype: str, repo_id: str, write: bool = False) -> Repo:
        with self.st.lock:
            repo = self.st.repos.get((rtype, repo_id))
        visible = repo is not None and (not repo.private or repo.owner in self._namespaces())
        if not visible:
            raise HubError(401 if self.user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            self._require_write(repo.owner, repo_id)
        return repo

    def _require_write(self, namespace: str, what: str) -> None:
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        if self.user["role"] != "write":
            raise HubError(403, f"You don't have the rights to write to {what}: your token is read-only")
        if namespace not in self._namespaces():
            raise HubError(403, f"You don't have the rights to write to {what}")

    def _json_body(self, body: bytes) -> Any:
        try:
            return json.loads(body.decode() or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HubError(400, "Malformed JSON body") from None

    # ---- account and repos
    def h_whoami(self, body: bytes) -> None:
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        name = self.user["user"]
        self._json(200, {"type": "user", "id": hashlib.md5(name.encode()).hexdigest()[:24], "name": name,
                         "fullname": name, "email": f"{name}@example.test", "emailVerified": True,
                         "isPro": False, "orgs": [{"type": "org", "name": o} for o in self.user["orgs"]],
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "test", "role": self.user["role"]}}})

    def _repo_url(self, rtype: str, repo_id: str) -> str:
        return f"{self.base}/{PREFIX[rtype]}{repo_id}"

    def h_create(self, body: bytes) -> None:
        req = self._json_body(body)
        name = req.get("name")
        if not name or "/" in name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        ns = req.get("organization") or self.user["user"]
        rtype = req.get("type") or "model"
        if rtype not in PREFIX:
            raise HubError(400, f"Invalid repo type: {rtype}")
        repo_id = f"{ns}/{name}"
        self._require_write(ns, repo_id)
        private = req.get("visibility") == "private" if "visibility" in req else bool(req.get("private"))
        with self.st.lock:
            if (rtype, repo_id) in self.st.repos:
                msg = f"You already created this {rtype} repo: {repo_id}"
                raise HubError(409, msg, body={"error": msg, "url": self._repo_url(rtype, repo_id)})
            repo = self.st.create_repo(rtype, repo_id, ns, private)
        self._json(200, {"url": self._repo_url(rtype, repo_id), "name": repo_id, "id": repo.uid})

    def h_delete(self, body: bytes) -> None:
        req = self._json_body(body)
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        ns = req.get("organization") or self.user["user"]
        rtype = req.get("type") or "model"
        repo_id = f"{ns}/{req.get('name')}"
        self._repo(rtype, repo_id, write=True)
        with self.st.lock:
            self.st.repos.pop((rtype, repo_id), None)
        self._json(200, {})

    def h_settings(self, body: bytes, rtype: str, repo_id: str) -> None:
        repo = self._repo(rtype, repo_id, write=True)
        req = self._json_body(body)
        with self.st.lock:
            if "visibility" in req:
                repo.private = req["visibility"] == "private"
            elif "private" in req and req["private"] is not None:
                repo.private = bool(req["private"])
            if "gated" in req:
                repo.gated = req["gated"]
        self._json(200, {"private": repo.private, "gated": repo.gated})

    def _card_data(self, repo: Repo, commit: Commit) -> Any:
        entry = commit.files.get("README.md")
        if entry is None:
            return None
        _, data, err = front_matter(self.st.read_blob(entry).decode("utf-8", "replace"))
        return data if err is None else None

    def _info_obj(self, repo: Repo, sha: str, blobs: bool = False) -> dict:
        commit = repo.commits[sha]
        card = self._card_data(repo, commit)
        tags: list[str] = []
        if isinstance(card, dict):
            raw = card.get("tags") or []
            tags = [str(t) for t in (raw if isinstance(raw, list) else [raw])]
            if card.get("library_name"):
                tags.append(str(card["library_name"]))
            tags += base_model_tags(card, commit.files, tags)
            tags = list(dict.fromkeys(tags))  # the Hub lists a tag once
        siblings = []
        for path in sorted(commit.files):
            e = commit.files[path]
            s: dict = {"rfilename": path}
            if blobs:
                s.update(size=e.size, blobId=e.blob_id)
                if e.lfs:
                    s["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
            siblings.append(s)
        return {"_id": repo.uid, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.owner, "sha": sha,
                "private": repo.private, "gated": repo.gated, "disabled": False, "lastModified": commit.date,
                "createdAt": repo.created, "downloads": repo.downloads, "likes": repo.likes,
                "trendingScore": repo.trending, "tags": tags,
                "library_name": card.get("library_name") if isinstance(card, dict) else None,
                "pipeline_tag": card.get("pipeline_tag") if isinstance(card, dict) else None,
                "cardData": card, "siblings": siblings}

    def h_info(self, body: bytes, rtype: str, repo_id: str, rev: str | None) -> None:
        repo = self._repo(rtype, repo_id)
        with self.st.lock:
            sha = self.st.resolve_rev(repo, rev or "main")
            blobs = (self.query.get("blobs", ["false"])[0]).lower() == "true"
            self._json(200, self._info_obj(repo, sha, blobs))

    def _flag(self, name: str) -> bool:
        return (self.query.get(name) or ["false"])[0].lower() in ("1", "true")

    def h_list(self, body: bytes, rtype: str) -> None:
        """`GET /api/models` (and datasets/spaces) as the Hub answers `list_models`: `filter` (repeated: every
        value must be among the repo's tags, the card's `base_model:adapter:ID` ones included), `search`
        (a case-insensitive substring of the repo id), `author` (the owner, case-insensitive), `sort`
        (downloads, likes, lastModified, createdAt, trendingScore, id) with `direction` (-1 or absent:
        descending, anything else ascending), `limit` (the page size, at most `list_page_max`; more results
        are behind a `Link: <…>; rel="next"` header, as on the Hub), and the projection: `expand` (repeated:
        only those properties, plus `_id`/`id`), `full`, `cardData`; private repos only for their owners."""
        q = self.query
        filters = [f for f in q.get("filter", []) + q.get("filter[]", []) if f]
        author = (q.get("author") or [None])[0]
        search = (q.get("search") or [None])[0]
        sort = (q.get("sort") or [None])[0]
        direction = (q.get("direction") or ["-1"])[0]
        expand = q.get("expand", []) + q.get("expand[]", [])
        full, card_data = self._flag("full"), self._flag("cardData")
        if sort is not None and sort not in LIST_SORTS:
            raise HubError(400, f"Invalid sort parameter: {sort}")
        unknown = [e for e in expand if e not in EXPAND_PROPERTIES]
        if unknown:
            raise HubError(400, f"Invalid expand parameter: {', '.join(unknown)}")
        if expand and (full or card_data or self._flag("config")):
            raise HubError(400, "expand cannot be combined with full, cardData or config")
        try:
            limit = int((q.get("limit") or [self.hub.list_page_max])[0])
            offset = int((q.get("cursor") or ["0"])[0])
        except ValueError:
            raise HubError(400, "limit and cursor must be integers") from None
        if limit < 1 or offset < 0:
            raise HubError(400, "limit must be positive")
        page = min(limit, self.hub.list_page_max)
        with self.st.lock:
            found = []
            for (t, rid), repo in sorted(self.st.repos.items()):
                if t != rtype or (repo.private and repo.owner not in self._namespaces()):
                    continue
                if author and repo.owner.lower() != author.lower() or search and search.lower() not in rid.lower():
                    continue
                info = self._info_obj(repo, repo.branches["main"])
                if all(f in info["tags"] for f in filters):
                    found.append(info)
        if sort is not None:  # stable: ties keep the repo id order; models without the value come last
            key = LIST_SORTS[sort]
            present = [info for info in found if info.get(key) is not None]
            present.sort(key=lambda info: info[key], reverse=direction == "-1")
            found = present + [info for info in found if info.get(key) is None]
        chunk = found[offset:offset + page]
        if expand:
            keep = ("_id", "id", *expand)
        else:
            keep = LIST_FULL if full else LIST_DEFAULT
            if card_data:
                keep = (*keep, "cardData")
        out = []
        for info in chunk:
            item = {k: info[k] for k in keep if k in info}
            if "siblings" in item:
                item["siblings"] = [{"rfilename": s["rfilename"]} for s in item["siblings"]]
            out.append(item)
        headers = {}
        if offset + page < len(found):
            params = [(k, v) for k, values in q.items() if k != "cursor" for v in values]
            params.append(("cursor", str(offset + page)))
            query = "&".join(f"{quote(k, safe='[]')}={quote(v, safe='')}" for k, v in params)
            headers["Link"] = f'<{self.base}/api/{PLURAL[rtype]}?{query}>; rel="next"'
        self._json(200, out, headers)

    # ---- trees
    @staticmethod
    def _tree_entries(files: dict[str, FileEntry], path: str, recursive: bool) -> list[dict] | None:
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        if path and path in files:
            return [_file_obj(path, files[path])]
        under = {p: e for p, e in files.items() if p.startswith(prefix)}
        if path and not under:
            return None
        out, dirs = [], set()
        for p in sorted(under):
            rel = p[len(prefix):]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if d not in dirs and (recursive or i == 1):
                    dirs.add(d)
            if recursive or len(parts) == 1:
                out.append(_file_obj(p, under[p]))
        out += [_dir_obj(d, files) for d in sorted(dirs)]
        out.sort(key=lambda e: e["path"])
        return out

    def h_tree(self, body: bytes, rtype: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(rtype, repo_id)
        recursive = (self.query.get("recursive", ["false"])[0]).lower() in ("true", "1")
        with self.st.lock:
            sha = self.st.resolve_rev(repo, rev)
            entries = self._tree_entries(repo.commits[sha].files, path, recursive)
        if entries is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        self._json(200, entries)

    def h_paths_info(self, body: bytes, rtype: str, repo_id: str, rev: str) -> None:
        repo = self._repo(rtype, repo_id)
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            paths = self._json_body(body).get("paths", [])
        else:
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        with self.st.lock:
            files = repo.commits[self.st.resolve_rev(repo, rev)].files
            out = []
            for p in paths:
                p = p.strip("/")
                if p in files:
                    out.append(_file_obj(p, files[p]))
                elif any(f.startswith(p + "/") for f in files):
                    out.append(_dir_obj(p, files))
        self._json(200, out)

    # ---- refs
    def h_refs(self, body: bytes, rtype: str, repo_id: str) -> None:
        repo = self._repo(rtype, repo_id)
        with self.st.lock:
            out: dict = {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                      for b, s in repo.branches.items()],
                         "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s}
                                  for t, s in repo.tags.items()],
                         "converts": []}
            if (self.query.get("include_prs", ["0"])[0]).lower() in ("1", "true"):
                out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                                       for n, s in repo.prs.items()]
        self._json(200, out)

    def h_branch(self, body: bytes, rtype: str, repo_id: str, branch: str) -> None:
        repo = self._repo(rtype, repo_id, write=True)
        with self.st.lock:
            if self.command == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "You cannot delete the default branch")
                del repo.branches[branch]
            else:
                if branch in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{branch}")
                start = self._json_body(body).get("startingPoint") or "main"
                repo.branches[branch] = self.st.resolve_rev(repo, start)
        self._json(200, {})

    def h_tag(self, body: bytes, rtype: str, repo_id: str, name: str) -> None:
        repo = self._repo(rtype, repo_id, write=True)
        with self.st.lock:
            if self.command == "DELETE":
                if name not in repo.tags:
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                del repo.tags[name]
            else:
                req = self._json_body(body)
                tag = req.get("tag")
                if not tag:
                    raise HubError(400, "Missing tag name")
                if tag in repo.tags:
                    raise HubError(409, f"Tag already exists: {tag}")
                repo.tags[tag] = self.st.resolve_rev(repo, name)
        self._json(200, {})

    def h_commits(self, body: bytes, rtype: str, repo_id: str, rev: str) -> None:
        repo = self._repo(rtype, repo_id)
        out = []
        with self.st.lock:
            sha: str | None = self.st.resolve_rev(repo, rev)
            while sha:
                c = repo.commits[sha]
                out.append({"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                            "authors": [{"user": c.author}]})
                sha = c.parents[0] if c.parents else None
        self._json(200, out)

    # ---- README validation
    def h_validate_yaml(self, body: bytes) -> None:
        req = self._json_body(body)
        content = req.get("content")
        if not isinstance(content, str):
            raise HubError(400, "Missing content", body={"errors": [{"message": "Missing content"}], "warnings": []})
        has, data, err = front_matter(content)
        if err:
            self._json(400, {"errors": [{"message": err}], "warnings": []})
            return
        self._json(200, {"errors": [], "warnings": []})

    # ---- upload
    def _branch_for_write(self, repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return rev
        if rev.startswith("refs/heads/") and rev[11:] in repo.branches:
            return rev[11:]
        if rev in repo.tags or (HEX40.match(rev) and rev in repo.commits) or rev.startswith("refs/pr/"):
            raise HubError(400, f"Invalid rev id: {rev} is not a branch")
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def h_preupload(self, body: bytes, rtype: str, repo_id: str, rev: str) -> None:
        repo = self._repo(rtype, repo_id, write=True)
        req = self._json_body(body)
        with self.st.lock:
            sha = self.st.resolve_rev(repo, rev)
            files = repo.commits[sha].files
            out = []
            for f in req.get("files", []):
                path, size = f.get("path"), int(f.get("size") or 0)
                try:
                    sample = base64.b64decode(f.get("sample") or "")
                except ValueError:
                    sample = b""
                name = path.rsplit("/", 1)[-1]
                lfs = any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or size >= LFS_THRESHOLD or b"\0" in sample
                cur = files.get(path)
                oid = None
                if cur is not None:
                    oid = cur.sha256 if lfs else (cur.blob_id if not cur.lfs else None)
                out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        self._json(200, {"files": out, "commitOid": sha})

    def h_lfs_batch(self, body: bytes, rtype: str, repo_id: str) -> None:
        repo = self._repo(rtype, repo_id, write=True)
        req = self._json_body(body)
        if req.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for obj in req.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size") or 0)
            entry: dict = {"oid": oid, "size": size}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                entry["error"] = {"code": 422, "message": f"invalid oid {oid}"}
            elif not self.st.has_blob(oid, size):
                ticket = secrets.token_urlsafe(16)
                with self.st.lock:
                    self.st.tickets[ticket] = (oid, size)
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-upload/{oid}?ticket={ticket}", "header": {}},
                    "verify": {"href": f"{self.base}/lfs-verify/{PLURAL[rtype]}/{repo.repo_id}/{oid}", "header": {}},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "hash_algo": "sha256", "objects": objects},
                   content_type="application/vnd.git-lfs+json")

    def h_lfs_upload(self, body: bytes, oid: str) -> None:
        ticket = (self.query.get("ticket") or [""])[0]
        with self.st.lock:
            expected = self.st.tickets.pop(ticket, None)
        if expected is None or expected[0] != oid:
            raise HubError(403, "Invalid or expired upload ticket")
        if len(body) != expected[1] or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match oid/size")
        self.st.put_blob(body)
        self._send(200, b"", content_type="text/plain")

    def h_lfs_verify(self, body: bytes, rtype_plural: str, repo_id: str, oid: str) -> None:
        self._repo(TYPES.get(rtype_plural, "model"), repo_id, write=True)
        req = self._json_body(body)
        if req.get("oid") != oid or not self.st.has_blob(oid, int(req.get("size") or -1)):
            raise HubError(422, f"Object {oid} is missing or has the wrong size")
        self._json(200, {"success": True})

    def h_commit(self, body: bytes, rtype: str, repo_id: str, rev: str) -> None:
        repo = self._repo(rtype, repo_id, write=True)
        create_pr = (self.query.get("create_pr", ["0"])[0]).lower() in ("1", "true")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line must be the commit header")
        header = lines[0].get("value") or {}
        with self.st.lock:
            branch = self._branch_for_write(repo, rev)
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, val = line.get("key"), line.get("value") or {}
                path = str(val.get("path", "")).strip("/")
                if key == "file":
                    if val.get("encoding", "base64") != "base64":
                        raise HubError(400, "Only base64 encoding is supported")
                    files[path] = self.st.entry_for(base64.b64decode(val.get("content", "")), lfs=False)
                elif key == "lfsFile":
                    oid, size = val.get("oid"), int(val.get("size") or 0)
                    if not oid or not self.st.has_blob(oid, size):
                        raise HubError(422, f"LFS object {oid} for {path} was not uploaded")
                    files[path] = FileEntry(oid, size, True, git_blob_sha1(lfs_pointer(oid, size)))
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    gone = [p for p in files if p.startswith(path + "/")]
                    if not gone:
                        raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
                    for p in gone:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            commit = self.st.new_commit(repo, head, files, header.get("summary") or "commit",
                                        header.get("description") or "", self.user["user"])
            pr_url = None
            if create_pr:
                num = max(repo.prs, default=0) + 1
                repo.prs[num] = commit.id
                pr_url = f"{self._repo_url(rtype, repo_id)}/discussions/{num}"
            else:
                repo.branches[branch] = commit.id
        self._json(200, {"success": True, "commitOid": commit.id,
                         "commitUrl": f"{self._repo_url(rtype, repo_id)}/commit/{commit.id}",
                         "pullRequestUrl": pr_url})

    def h_xet(self, body: bytes) -> None:
        raise HubError(501, "Xet storage is not implemented by this test server: set HF_HUB_DISABLE_XET=1")

    # ---- download
    def h_resolve(self, body: bytes, rtype: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(rtype, repo_id)
        with self.st.lock:
            sha = self.st.resolve_rev(repo, rev)
            entry = repo.commits[sha].files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"'}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        total = entry.size
        rng = self.headers.get("Range")
        if self.command == "HEAD":
            self.hub.stats.served(repo_id, path, 0, rng, 200)
            self._send(200, b"", headers, "application/octet-stream", length=total)
            return
        status, start, end = 200, 0, total
        if rng:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if not m or (not m.group(1) and not m.group(2)):
                raise HubError(400, f"Malformed Range header: {rng}")
            a, b = m.group(1), m.group(2)
            if a:
                start = int(a)
                end = min(int(b) + 1, total) if b else total
            else:  # suffix: the last n bytes
                start, end = max(0, total - int(b)), total
            if start >= total or end <= start:
                if total == 0 and start == 0:
                    start, end = 0, 0
                else:
                    self.hub.stats.served(repo_id, path, 0, rng, 416)
                    raise HubError(416, "Requested Range Not Satisfiable",
                                   headers={**headers, "Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{max(end - 1, start)}/{total}"
        data = self.st.read_blob(entry, start, end)
        self.hub.stats.served(repo_id, path, len(data), rng, status)
        self._send(status, data, headers, "application/octet-stream")


def _file_obj(path: str, e: FileEntry) -> dict:
    out: dict = {"type": "file", "oid": e.blob_id, "size": e.size, "path": path}
    if e.lfs:
        out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
    return out


def _dir_obj(path: str, files: dict[str, FileEntry]) -> dict:
    ids = "".join(f"{p}:{e.blob_id}" for p, e in sorted(files.items()) if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(ids.encode()).hexdigest(), "size": 0, "path": path}


if __name__ == "__main__":  # manual use: python tests/hubserver.py [port]
    import sys

    srv = HubServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0,
                    tokens={"hf_alice": {"user": "alice", "role": "write"}})
    srv.start()
    print(f"serving on {srv.url} (token hf_alice)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
