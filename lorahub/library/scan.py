"""Walking a library: which files and folders under some paths are adapter candidates.

A candidate is a folder of a directory format (PEFT: `adapter_config.json` + its weights, the names
from the formats registry) or a `.safetensors` file. Whether a file is an adapter at all (not a base
model's shard) is `describe`'s business: it needs the header. The walk only lists and stats:

- hidden entries (`.git`, `.cache`, the client's `.locks`) are skipped;
- symlinked folders are followed once (a folder reached twice, or a loop, is walked once);
- in the Hugging Face cache only `models--*/snapshots/` is walked (the blobs are the same files under
  hash names), and each candidate there carries its repo, commit and refs (`hub.cache.cache_location`);
- a file reached under several names (hard links, symlinks, the same blob in two cached revisions,
  overlapping paths) is one candidate with its other names in `also`.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorahubError
from ..formats import all_formats
from ..hub.cache import SNAPSHOTS, CacheLocation, cache_location, hub_cache_dir, repo_id_of_folder

SAFETENSORS = ".safetensors"
LIBRARY_ENV = "LORAHUB_LIBRARY"


def directory_layouts() -> list[tuple[str, tuple[str, ...]]]:
    """(config file, weight files in order of preference) of each directory format in the registry."""
    return [(fmt.marker_files[0], tuple(fmt.marker_files[1:])) for fmt in all_formats()
            if fmt.directory and len(fmt.marker_files) > 1]


def library_folders() -> list[Path]:
    """The folders in LORAHUB_LIBRARY (separated by ':' — os.pathsep), in order."""
    raw = os.environ.get(LIBRARY_ENV, "")
    return [Path(part).expanduser() for part in raw.split(os.pathsep) if part.strip()]


def default_roots() -> list[Path]:
    """What `lorahub list` walks without paths: the Hugging Face cache, then the LORAHUB_LIBRARY folders."""
    return [hub_cache_dir(), *library_folders()]


@dataclass
class Candidate:
    path: str  # as the user reads it: the root as given joined with the path below it
    key: str  # the absolute path (not resolved): the index key
    kind: str  # "dir" (a directory-format adapter) or "file"
    files: list[tuple[str, os.stat_result]]  # absolute paths and stats: a folder's config first, then weights
    location: CacheLocation | None = None  # where in the Hugging Face cache, if there
    also: list[str] = field(default_factory=list)  # other names of the same files

    @property
    def stamp(self) -> str:
        """What the index compares: size, mtime (ns) and inode of every file of the candidate."""
        return "|".join(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" for _, st in self.files)

    @property
    def identity(self) -> tuple:
        return tuple((st.st_dev, st.st_ino) for _, st in self.files)

    @property
    def size(self) -> int:
        return sum(st.st_size for _, st in self.files)

    @property
    def modified_ns(self) -> int:
        return max((st.st_mtime_ns for _, st in self.files), default=0)

    @property
    def name(self) -> str:
        """The repo (`owner/name@revision[/path]`) for a cached adapter, else the path."""
        return self.location.label if self.location is not None else self.path


@dataclass
class Scan:
    roots: list[str]  # absolute
    candidates: list[Candidate]
    errors: list[tuple[str, str]]  # (path, message): folders that could not be read
    walked: list[str]  # absolute folders whose whole subtree was walked (the index prunes below them)


def _regular(path: str) -> os.stat_result | None:
    """The stat of a regular file (links followed); None for anything else — a FIFO or a device is never
    opened (reading one would hang or never end)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _join(display: str, name: str) -> str:
    return os.path.join(display, name)


class _Walker:
    def __init__(self) -> None:
        self.cache = os.path.abspath(hub_cache_dir())
        self.layouts = directory_layouts()
        self.candidates: list[Candidate] = []
        self.errors: list[tuple[str, str]] = []
        self.seen_dirs: set[tuple[int, int]] = set()
        self.refs: dict[str, dict[str, tuple[str, ...]]] = {}  # the cache's refs, read once per repo

    def _candidate(self, display: str, key: str, kind: str, files: list[tuple[str, os.stat_result]]) -> None:
        location = cache_location(key, Path(self.cache), self.refs) if key.startswith(self.cache + os.sep) else None
        self.candidates.append(Candidate(display, key, kind, files, location))

    def add_file(self, display: str, key: str, st: os.stat_result) -> None:
        """A file given as a root: a directory format's file makes its folder the candidate."""
        parent, name = os.path.split(key)
        for config, weights in self.layouts:
            if name == config or name in weights:
                folder = self._directory(parent)
                if folder is not None:
                    self._candidate(os.path.dirname(display) or ".", parent, "dir", folder)
                    return
        if name.lower().endswith(SAFETENSORS):
            self._candidate(display, key, "file", [(key, st)])

    def _directory(self, folder: str) -> list[tuple[str, os.stat_result]] | None:
        """The files of a directory-format adapter in `folder` (config, weights), or None."""
        for config, weights in self.layouts:
            config_st = _regular(os.path.join(folder, config))
            if config_st is None:
                continue
            files = [(os.path.join(folder, config), config_st)]
            for weight in weights:
                weight_st = _regular(os.path.join(folder, weight))
                if weight_st is not None:
                    files.append((os.path.join(folder, weight), weight_st))
                    break
            return files
        return None

    def walk(self, display: str, key: str) -> None:
        stack = [(display, key)]
        while stack:
            here_display, here = stack.pop()
            try:
                st = os.stat(here)
            except OSError as exc:
                self.errors.append((here_display, f"cannot read: {exc.strerror}"))
                continue
            if (st.st_dev, st.st_ino) in self.seen_dirs:
                continue
            self.seen_dirs.add((st.st_dev, st.st_ino))
            try:
                with os.scandir(here) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                self.errors.append((here_display, f"cannot read: {exc.strerror}"))
                continue
            parent = os.path.dirname(here)
            if here == self.cache:  # the cache: model repos only
                entries = [e for e in entries if repo_id_of_folder(e.name) is not None]
            elif parent == self.cache and repo_id_of_folder(os.path.basename(here)) is not None:
                entries = [e for e in entries if e.name == SNAPSHOTS]  # never the blobs
            dirs, files = [], {}
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir():  # follows symlinks, as the walk does
                        dirs.append(entry)
                    elif entry.is_file():
                        files[entry.name] = entry
                except OSError:
                    continue
            taken: set[str] = set()
            for config, weights in self.layouts:
                if config in files:
                    members = [config] + [w for w in weights if w in files][:1]
                    stats = self._stats(here, files, members)
                    if stats is not None:
                        self._candidate(here_display, here, "dir", stats)
                    taken.update((config, *weights))
                    break
            for name, entry in files.items():
                if name in taken or not name.lower().endswith(SAFETENSORS):
                    continue
                try:
                    file_st = entry.stat()
                except OSError:
                    continue  # a dangling link
                self._candidate(_join(here_display, name), os.path.join(here, name), "file",
                                [(os.path.join(here, name), file_st)])
            for entry in reversed(dirs):
                stack.append((_join(here_display, entry.name), os.path.join(here, entry.name)))

    def _stats(self, here: str, files: dict[str, os.DirEntry], members: list[str]
               ) -> list[tuple[str, os.stat_result]] | None:
        out = []
        for name in members:
            try:
                out.append((os.path.join(here, name), files[name].stat()))
            except OSError:
                return None
        return out


def _dedupe(candidates: list[Candidate]) -> list[Candidate]:
    """One candidate per set of files; its other names in `also` (a cached one named by a ref first)."""
    groups: dict[tuple, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.identity, []).append(candidate)
    out = []
    for group in groups.values():
        primary = next((c for c in group if c.location is not None and c.location.refs), group[0])
        primary.also = [c.name for c in group if c is not primary and c.name != primary.name]
        out.append(primary)
    return out


def scan(paths: list[str | os.PathLike] | None = None) -> Scan:
    """Adapter candidates under `paths` (files or folders; default: `default_roots()`). An explicit path
    that does not exist is an error; a default one (no cache yet, a stale LORAHUB_LIBRARY entry) is skipped."""
    explicit = paths is not None and len(paths) > 0
    roots = [Path(p) for p in paths] if explicit and paths is not None else default_roots()
    walker = _Walker()
    absolute: list[str] = []
    walked: list[str] = []
    for root in roots:
        display = os.fspath(root)
        key = os.path.abspath(os.path.expanduser(display))
        try:
            st = os.stat(key)
        except OSError as exc:
            if explicit:
                raise LorahubError("no such file or directory" if isinstance(exc, FileNotFoundError)
                                   else f"cannot read: {exc.strerror}", path=display) from None
            continue
        absolute.append(key)
        if os.path.isdir(key):
            walker.walk(display, key)
            walked.append(key)
        elif stat.S_ISREG(st.st_mode):
            walker.add_file(display, key, st)
        elif explicit:
            raise LorahubError("not a regular file or a folder", path=display)
    return Scan(absolute, _dedupe(walker.candidates), walker.errors, walked)
