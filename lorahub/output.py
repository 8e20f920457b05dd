"""The one output policy: every command that writes an `--out` goes through this module.

    check(out, kind="dir", overwrite=False, inputs=())  -> OutputPlan   the refusals; no side effects
    prepare(out, ...)                                    -> OutputPlan   the same under the lock, after
                                                                         cleaning up a killed run's leftovers
    with reserve(out, ...) as plan:                      prepare, and keep the lock across the work, so
        ...                                              that a second writer fails at once
    with write(out, ..., command="merge") as tmp:        write into `tmp`; when the block completes the
        ...                                              output is marked and swapped into place

`inputs` are paths, or (role, path) pairs ("adapter", "base", ...) that name them in messages.

The rules (docs/outputs.md):

1. An `--out` that exists is refused unless `overwrite` (an empty directory too).
2. `overwrite` replaces a regular file, or a directory that lorahub wrote: lorahub's output directories
   hold a manifest (`.lorahub-output.json`) naming each file it wrote with its size and mtime. A
   directory holding any other file (or a file changed since) is refused, naming those files.
3. `--out` may never be, contain, or lie inside an input (real paths, symlinks resolved), nor be or
   contain the current directory; `--out` itself may not be a symlink.
4. A lock file beside the output (`.<name>.lorahub-lock`, `flock`) makes a second writer fail at once.
5. The new output is written into a temporary sibling (`.<name>.lorahub-tmp-*`) and swapped in:
   a file by `rename`, a directory by one `renameat2(RENAME_EXCHANGE)`, so a kill at any point leaves
   the old output or the new one. Where the filesystem cannot exchange, two renames are used, and the
   next run puts the old output back if a kill fell between them. Leftovers (`.<name>.lorahub-tmp-*`,
   `.<name>.lorahub-old-*`) are removed by the next run on that output, recognised by their name and by
   the marker inside them.
6. Outputs are created with the usual modes (directories 0777, files 0666, less the umask).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Tuple, Union

from .errors import LorahubError
from .storage import read_json_file

Kind = Literal["dir", "file"]
# an input: a path, or (role, path) where the role names it in messages ("base", "adapter", ...)
PathArg = Union[str, "os.PathLike[str]"]
InputSpec = Union[PathArg, Tuple[str, PathArg]]

MANIFEST = ".lorahub-output.json"  # inside every output directory lorahub writes
MANIFEST_KIND = "lorahub-output"
TMP_TAG = ".lorahub-tmp-"
OLD_TAG = ".lorahub-old-"
LOCK_SUFFIX = ".lorahub-lock"
SHOWN = 5  # foreign files named in a refusal; the rest are counted
SCAN_LIMIT = 10_000  # stop listing foreign files after this many (a refusal needs only a few)

__all__ = ["MANIFEST", "InputSpec", "Kind", "OutputPlan", "check", "foreign_files", "lock_path", "prepare", "reserve",
           "write"]


# ---------------------------------------------------------------------------------------------
# checks (no side effects)


@dataclass
class OutputPlan:
    """What `check` found: where the output goes and whether something is there to replace."""

    path: Path  # absolute, the last component not resolved (it may be a name to create)
    kind: Kind
    replaces: bool  # an existing (non-empty) output will be swapped out


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(Path(path).expanduser())))


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inputs(inputs: Iterable[InputSpec]) -> list[tuple[str, Path]]:
    found = []
    for item in inputs:
        if isinstance(item, tuple):
            role, path = item
        else:
            role, path = "input", item
        if path is not None and str(path) != "":
            found.append((role, Path(path)))
    return found


def _check_inputs(out: Path, kind: Kind, inputs: Iterable[InputSpec]) -> None:
    real_out = _real(out)
    for role, path in _inputs(inputs):
        real_in = _real(_absolute(path))
        what = f"the {role} {real_in}"
        if real_in == real_out:
            raise LorahubError(f"--out is {what}; write to a new path (lorahub never writes over its inputs)",
                               path=out)
        if real_out in real_in.parents:
            raise LorahubError(f"--out contains {what}; replacing it would delete that input — write to a "
                               "new path", path=out)
        if real_in in real_out.parents:
            raise LorahubError(f"--out lies inside {what}; write outside the inputs", path=out)
    if kind == "dir":
        try:
            cwd = _real(Path(os.getcwd()))
        except FileNotFoundError:  # the current directory was deleted: nothing to protect there
            return
        if real_out == cwd or real_out in cwd.parents:
            raise LorahubError("--out is (or contains) the current directory; give a new directory", path=out)


def _read_marker(folder: Path) -> Any:
    """The marker's JSON, or None when there is none or it is not lorahub's (unreadable, not a regular
    file, not JSON)."""
    try:
        return read_json_file(folder / MANIFEST)
    except LorahubError:
        return None


def _manifest_files(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The files a lorahub output directory's manifest lists, or None when it has no valid one."""
    data = _read_marker(folder)
    if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND or not isinstance(data.get("files"), dict):
        return None
    return {str(k): v for k, v in data["files"].items() if isinstance(v, dict)}


def _is_marked(folder: Path) -> bool:
    """A directory lorahub created: it holds lorahub's marker (complete or still being written)."""
    data = _read_marker(folder)
    return isinstance(data, dict) and data.get("kind") == MANIFEST_KIND


def foreign_files(folder: Path, *, limit: int = SCAN_LIMIT) -> list[str]:
    """Files under `folder` that lorahub did not write (or that changed since it wrote them): every
    file when the directory has no manifest. Relative POSIX paths; an empty directory is listed with a
    trailing '/', a symlink as itself (never followed). At most `limit`."""
    listed = _manifest_files(folder) or {}
    found: list[str] = []
    for root, dirs, files in os.walk(folder, onerror=_unreadable):  # an unreadable folder is not "empty"
        base = Path(root)
        for name in list(dirs):
            if (base / name).is_symlink():  # not followed: an entry of its own
                dirs.remove(name)
                files.append(name)
        if not dirs and not files and base != folder:
            found.append(base.relative_to(folder).as_posix() + "/")
        for name in sorted(files):
            entry = base / name
            rel = entry.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            record = listed.get(rel)
            try:
                info = os.lstat(entry)
            except FileNotFoundError:
                continue
            if record is None or not stat.S_ISREG(info.st_mode) or record.get("size") != info.st_size \
                    or record.get("mtime_ns") != info.st_mtime_ns:
                found.append(rel)
                if len(found) >= limit:
                    return found
        dirs.sort()
    return found


def _is_empty(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return not any(entries)


def _unreadable(exc: OSError) -> None:
    raise LorahubError(f"cannot read what --out holds: {exc.strerror}", path=exc.filename) from None


def _describe(names: list[str], limit: int) -> str:
    shown = ", ".join(names[:SHOWN])
    rest = len(names) - SHOWN
    if rest > 0:
        shown += f" and {'at least ' if len(names) >= limit else ''}{rest} more"
    return shown


def check(out: str | os.PathLike[str], *, kind: Kind = "dir", overwrite: bool = False,
          inputs: Iterable[InputSpec] = ()) -> OutputPlan:
    """Apply the policy to `out` without touching anything; raise LorahubError on a refusal."""
    path = _absolute(out)
    _check_inputs(path, kind, inputs)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return OutputPlan(path, kind, False)
    except NotADirectoryError:
        raise LorahubError("a parent of --out is not a directory", path=path) from None
    if stat.S_ISLNK(info.st_mode):
        raise LorahubError("--out is a symbolic link; give the real path (lorahub would replace the link, not "
                           "what it points to)", path=path)
    if kind == "file":
        if not stat.S_ISREG(info.st_mode):
            what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise LorahubError(f"--out exists and is {what}; this output is a file", path=path)
        if not overwrite:
            raise LorahubError("--out exists; pass --overwrite to replace it", path=path)
        return OutputPlan(path, kind, True)
    if not stat.S_ISDIR(info.st_mode):
        raise LorahubError("--out exists and is not a directory; this output is a directory", path=path)
    if _is_empty(path):  # nothing to lose, but it exists: the user named it, maybe by mistake
        if not overwrite:
            raise LorahubError("--out exists (an empty directory); pass --overwrite to replace it", path=path)
        return OutputPlan(path, kind, True)
    foreign = foreign_files(path)
    if foreign:
        how = "--overwrite replaces only what lorahub wrote, and it" if overwrite else "--out exists and"
        raise LorahubError(f"{how} holds {len(foreign)}{'+' if len(foreign) >= SCAN_LIMIT else ''} "
                           f"file(s) lorahub did not write (or that changed since): "
                           f"{_describe(foreign, SCAN_LIMIT)}; move them away or choose another --out", path=path)
    if not overwrite:
        raise LorahubError("--out exists (an earlier lorahub output); pass --overwrite to replace it", path=path)
    return OutputPlan(path, kind, True)


# ---------------------------------------------------------------------------------------------
# the lock


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of an output: `.<name>.lorahub-lock` beside it."""
    path = _absolute(out)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


_HELD: dict[Path, tuple[int, int, int]] = {}  # out -> (thread id, depth, fd): re-entrant within a thread
_HELD_GUARD = threading.Lock()


def _busy(out: Path, lock: Path) -> LorahubError:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    who = f"another lorahub (pid {pid})" if pid.isdigit() else "another lorahub"
    return LorahubError(f"{who} is writing this output (lock {lock.name}); wait for it to finish or choose "
                        "another --out", path=out)


def _acquire(out: Path) -> int:
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(out, lock) from None
        except BaseException:
            os.close(fd)
            raise
        # the holder before us removes the lock file when done: make sure ours is still the file there
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release(out: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(out))  # while still holding it: see _acquire
    os.close(fd)


# ---------------------------------------------------------------------------------------------
# leftovers of killed runs


def _leftovers(out: Path) -> list[Path]:
    prefixes = (f".{out.name}{TMP_TAG}", f".{out.name}{OLD_TAG}")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.name.startswith(prefixes) and not entry.is_symlink() and entry.is_dir():
            if _is_marked(entry) or _is_empty(entry):
                found.append(entry)
    return found


def _recover(out: Path) -> None:
    """Under the lock: put an old output back if a kill fell between the two renames of a swap
    (no exchange), then remove lorahub's leftovers beside `out`."""
    leftovers = _leftovers(out)
    if not leftovers:
        return
    if not os.path.lexists(out):
        olds = [p for p in leftovers if OLD_TAG in p.name and _manifest_files(p) is not None]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
            _rename(newest, out)
            leftovers.remove(newest)
    for entry in leftovers:
        shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reserve: check + lock, held across the work


@contextlib.contextmanager
def reserve(out: str | os.PathLike[str], *, kind: Kind = "dir", overwrite: bool = False,
            inputs: Iterable[InputSpec] = ()) -> Iterator[OutputPlan]:
    """Check `out`, take its lock (a second writer fails at once) and clean up leftovers of killed runs.

    Re-entrant within one thread: a `write` inside a `reserve` of the same output takes the lock once.
    """
    inputs = list(inputs)
    path = _absolute(out)
    _check_inputs(path, kind, inputs)  # before creating anything (the lock's folder)
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None and held[0] != me:
            raise _busy(path, lock_path(path))
        if held is not None:
            _HELD[path] = (me, held[1] + 1, held[2])
    if held is None:
        fd = _acquire(path)
        with _HELD_GUARD:
            _HELD[path] = (me, 1, fd)
    try:
        if held is None:
            _recover(path)  # a killed run's leftovers go, even when this run is refused below
        plan = check(path, kind=kind, overwrite=overwrite, inputs=inputs)
        yield plan
    finally:
        with _HELD_GUARD:
            tid, depth, fd = _HELD[path]
            if depth > 1:
                _HELD[path] = (tid, depth - 1, fd)
            else:
                del _HELD[path]
                _release(path, fd)


def prepare(out: str | os.PathLike[str], *, kind: Kind = "dir", overwrite: bool = False,
            inputs: Iterable[InputSpec] = ()) -> OutputPlan:
    """`check` under the lock, after cleaning up a killed run's leftovers; the lock is released again.
    For callers that refuse early but write only later (through `write`, which locks again)."""
    with reserve(out, kind=kind, overwrite=overwrite, inputs=inputs) as plan:
        return plan


# ---------------------------------------------------------------------------------------------
# write: a temporary sibling, swapped into place


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    if _RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(src))
    if _RENAMEAT2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) != 0:  # AT_FDCWD
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _load_renameat2() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return func


_RENAMEAT2 = _load_renameat2()
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


# the swap's steps, one function each (tests replace them to kill the process between two steps)
def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux ≥ 3.15 on ext4, xfs, btrfs, tmpfs...)."""
    _renameat2(a, b, _RENAME_EXCHANGE)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move `src` to a `dst` that must not exist (a file appearing meanwhile is not clobbered)."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise LorahubError("--out appeared while lorahub was writing it; nothing was replaced",
                               path=dst) from None
        if exc.errno not in _UNSUPPORTED:
            raise
        if os.path.lexists(dst) and not os.path.isdir(dst):
            raise LorahubError("--out appeared while lorahub was writing it; nothing was replaced",
                               path=dst) from None
        os.rename(src, dst)  # a directory is not replaced unless empty


def _temp_name(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


def _marker(state: str, command: str | None, files: dict[str, Any] | None = None) -> str:
    from . import __version__

    data: dict[str, Any] = {"kind": MANIFEST_KIND, "state": state, "lorahub": __version__, "command": command,
                            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if files is not None:
        data["files"] = files
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _new_temp(out: Path, command: str | None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(out, TMP_TAG)
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, as for any new directory
        except FileExistsError:
            continue
        (tmp / MANIFEST).write_text(_marker("writing", command), encoding="utf-8")
        return tmp


def _umask_of(tmp: Path) -> int:
    """The process umask, read without changing it (os.umask would, for every thread): the temporary
    directory was created with mode 0777, less the umask."""
    return ~os.stat(tmp).st_mode & 0o777


def _set_mode(path: Path, umask: int, *, directory: bool = False) -> None:
    """The mode `cp` gives a new file or directory: 0666 / 0777 less the umask. Writers differ
    (safetensors creates its files 0600, tempfile 0600/0700); the output does not."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _seal(folder: Path, command: str | None) -> None:
    """Give every file and directory the usual mode, then write the manifest: every file in `folder`,
    with size and mtime, so a later --overwrite knows what lorahub wrote."""
    umask = _umask_of(folder)
    files: dict[str, Any] = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            if not (Path(root) / name).is_symlink():
                _set_mode(Path(root) / name, umask, directory=True)
        for name in names:
            entry = Path(root) / name
            rel = entry.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            info = os.lstat(entry)
            if stat.S_ISREG(info.st_mode):
                _set_mode(entry, umask)
            files[rel] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    manifest = folder / MANIFEST
    manifest.write_text(_marker("complete", command, dict(sorted(files.items()))), encoding="utf-8")


def _swap_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out`; an existing `out` ends up beside it, then removed."""
    if not os.path.lexists(out):
        _rename_noreplace(tmp, out)
        return
    try:
        _exchange(tmp, out)  # one step: `out` is the old output, then the new one
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        old = _temp_name(out, OLD_TAG)
        _rename(out, old)  # a kill from here to the next rename: the next run puts `old` back
        try:
            _rename(tmp, out)
        except BaseException:
            _rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    shutil.rmtree(tmp, ignore_errors=True)  # now the old output


@contextlib.contextmanager
def write(out: str | os.PathLike[str], *, kind: Kind = "dir", overwrite: bool = False,
          inputs: Iterable[InputSpec] = (), command: str | None = None) -> Iterator[Path]:
    """Yield the path to write the new output at (a fresh directory for `kind="dir"`, a file path
    inside a fresh temporary directory for `kind="file"`); when the block completes, the output is
    put in place (replacing the old one as `reserve` allowed). On any error or interrupt nothing
    changes at `out` and the temporary is removed."""
    with reserve(out, kind=kind, overwrite=overwrite, inputs=inputs) as plan:
        final = plan.path
        tmp = _new_temp(final, command)
        try:
            if kind == "dir":
                yield tmp
                _seal(tmp, command)
                _swap_dir(tmp, final)
            else:
                target = tmp / final.name
                yield target
                if not target.is_file():
                    raise LorahubError("nothing was written", path=final)
                _set_mode(target, _umask_of(tmp))
                if os.path.lexists(final):
                    os.replace(target, final)  # atomic: the old file or the new one
                else:
                    _rename_noreplace(target, final)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
