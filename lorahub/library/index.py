"""The library index: one SQLite file in LORAHUB_HOME holding each described candidate's summary,
keyed by its path and stamped with the size, mtime (ns) and inode of its files, so listing a library
again reads only the headers of what changed.

- WAL journal and a busy timeout: concurrent `lorahub list` runs read while another writes, and
  writers wait for each other instead of failing; every write is one transaction.
- A file that is not a database, a damaged one, or one written by another index version is rebuilt
  (under a lock file, so two runs that find it damaged rebuild it once): the index is a cache.
- When the index cannot be used at all (a read-only or full LORAHUB_HOME, a lock held too long), the
  listing goes on without it and says so (`Index.warning`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .describe import DESCRIBE_VERSION

HOME_ENV = "LORAHUB_HOME"
INDEX_FILE = "library.sqlite"
SCHEMA_VERSION = 1
# PRAGMA user_version holds both: a summary written by another describe version is described again
USER_VERSION = SCHEMA_VERSION * 1000 + DESCRIBE_VERSION
BUSY_TIMEOUT_MS = 10_000
_CHUNK = 500  # variables per IN (...) query (SQLite allows 999 in old builds)
_RETRY_S = 0.02  # the pause between tries of an operation SQLite answered "locked" without waiting


def lorahub_home() -> Path:
    """$LORAHUB_HOME, default ~/.cache/lorahub (the registry's user manifests live there too)."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path("~/.cache/lorahub").expanduser()


def default_index_path() -> Path:
    return lorahub_home() / INDEX_FILE


def _is_lock_error(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _is_unusable(exc: sqlite3.Error) -> bool:
    """The file cannot be opened or written at all (permissions, a full disk): no index this run."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and any(
        s in text for s in ("unable to open", "readonly", "read-only", "disk i/o", "full", "permission"))


class Index:
    """`lookup(keys)` -> {key: (stamp, summary)}, `store(rows)`, `prune(folders, seen)`. An Index whose
    file cannot be used works in memory (nothing is kept between runs)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.warning: str | None = None
        self.rebuilt = False
        self._conn: sqlite3.Connection | None = None
        if path is not None:
            self._open()

    # ---- opening, checking, rebuilding

    def _connect(self) -> sqlite3.Connection:
        assert self.path is not None
        conn = sqlite3.connect(os.fspath(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != USER_VERSION:
                with self._transaction(conn):
                    version = conn.execute("PRAGMA user_version").fetchone()[0]  # another run may have done it
                    if version != USER_VERSION:
                        conn.execute("DROP TABLE IF EXISTS entries")
                        conn.execute("CREATE TABLE entries (path TEXT PRIMARY KEY, stamp TEXT NOT NULL, "
                                     "summary TEXT NOT NULL) WITHOUT ROWID")
                        conn.execute(f"PRAGMA user_version = {USER_VERSION}")
            conn.execute("SELECT count(*) FROM entries WHERE path = ''").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _open(self) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._give_up(f"cannot create {self.path.parent}: {exc.strerror}")
            return
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._conn = self._connect()
                return
            except sqlite3.Error as exc:
                # switching a new file to WAL while another connection does can answer "locked" at once
                # (SQLite's deadlock avoidance skips the busy handler): wait and try again, within the timeout
                if _is_lock_error(exc) and time.monotonic() < deadline:
                    time.sleep(_RETRY_S)
                    continue
                if _is_lock_error(exc) or _is_unusable(exc):
                    self._give_up(f"cannot use the index {self.path}: {exc}")
                else:
                    self._rebuild()
                return

    def _give_up(self, why: str) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None
        self.warning = f"{why}; listing without the index"

    @contextlib.contextmanager
    def _rebuild_lock(self) -> Iterator[None]:
        assert self.path is not None
        lock = os.open(os.fspath(self.path) + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)

    def _rebuild(self) -> None:
        """Replace a damaged index file with an empty one (once, whoever else found it damaged too)."""
        assert self.path is not None
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        try:
            with self._rebuild_lock():
                try:  # another run may have rebuilt it while this one waited
                    self._conn = self._connect()
                    self._conn.execute("PRAGMA quick_check").fetchone()
                    return
                except sqlite3.Error:
                    if self._conn is not None:
                        with contextlib.suppress(sqlite3.Error):
                            self._conn.close()
                    self._conn = None
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.fspath(self.path) + suffix)
                self._conn = self._connect()
                self.rebuilt = True
        except (OSError, sqlite3.Error) as exc:
            self._give_up(f"cannot rebuild the index {self.path}: {exc}")

    @staticmethod
    @contextlib.contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _run(self, op: Any, default: Any) -> Any:
        """`op(conn)`, rebuilding a damaged index once; `default` when there is no index."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        attempt = 0
        while attempt < 2:
            if self._conn is None:
                return default
            try:
                return op(self._conn)
            except sqlite3.Error as exc:
                if _is_lock_error(exc) and time.monotonic() < deadline:
                    time.sleep(_RETRY_S)  # "locked" at once (no busy handler for it): again, within the timeout
                    continue
                if _is_lock_error(exc) or _is_unusable(exc):
                    self._give_up(f"cannot use the index {self.path}: {exc}")
                    return default
                if attempt == 0:
                    self._rebuild()
                attempt += 1
        return default

    # ---- the operations

    def lookup(self, keys: Iterable[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """The stored (stamp, summary) of each key that has one."""
        keys = list(keys)

        def op(conn: sqlite3.Connection) -> dict[str, tuple[str, dict[str, Any]]]:
            found: dict[str, tuple[str, dict[str, Any]]] = {}
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for path, stamp, summary in conn.execute(
                        f"SELECT path, stamp, summary FROM entries WHERE path IN ({marks})", chunk):
                    try:
                        found[path] = (stamp, json.loads(summary))
                    except ValueError:
                        continue  # a damaged row: described again
            return found

        return self._run(op, {})

    def store(self, rows: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Record (key, stamp, summary) rows, in one transaction."""
        if not rows:
            return
        data = [(key, stamp, json.dumps(summary, separators=(",", ":"))) for key, stamp, summary in rows]

        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                conn.executemany("INSERT OR REPLACE INTO entries (path, stamp, summary) VALUES (?, ?, ?)", data)

        self._run(op, None)

    def prune(self, folders: Iterable[str], seen: set[str]) -> int:
        """Forget the entries below `folders` (walked whole) that this walk did not find; returns how many."""
        folders = list(folders)

        def op(conn: sqlite3.Connection) -> int:
            gone: list[str] = []
            for folder in folders:
                low = folder.rstrip(os.sep) + os.sep
                high = low[:-1] + chr(ord(os.sep) + 1)
                gone += [path for (path,) in conn.execute(
                    "SELECT path FROM entries WHERE path >= ? AND path < ?", (low, high)) if path not in seen]
            if gone:
                with self._transaction(conn):
                    conn.executemany("DELETE FROM entries WHERE path = ?", [(p,) for p in gone])
            return len(gone)

        return self._run(op, 0)

    def forget(self, keys: Iterable[str]) -> None:
        """Drop these entries and everything below them (after `lorahub rm`)."""
        keys = [k.rstrip(os.sep) for k in keys]

        def op(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                for key in keys:
                    conn.execute("DELETE FROM entries WHERE path = ? OR (path >= ? AND path < ?)",
                                 (key, key + os.sep, key + chr(ord(os.sep) + 1)))

        self._run(op, None)

    @property
    def usable(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
