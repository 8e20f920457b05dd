"""Files: safetensors headers without reading data, positioned I/O, hashes people look adapters up by.

Outputs (where and how lorahub may write) are `lorahub.output`'s."""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import re
import stat
import struct
import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import LorahubError

# a safetensors header larger than this is corrupt, not big (the format caps it at 100 MB)
MAX_HEADER_BYTES = 100_000_000
# a data section (one file's tensors) larger than this is corrupt, not big: 1 PiB. Header-only skeletons
# and Hub headers are parsed without their data, so this is what keeps a hostile shape from becoming a
# multi-terabyte allocation anywhere downstream
MAX_DATA_BYTES = 1 << 50
# a JSON file lorahub reads (configs, indexes, manifests, merge records) larger than this is not one
MAX_JSON_BYTES = 512_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# every dtype of the safetensors format, with its size in bits (F4/F6 pack several elements per byte)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


@dataclass(slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset of the data, relative to the start of the data section
    end: int


@dataclass
class SafetensorsHeader:
    path: Path
    header_len: int  # N: the JSON length
    tensors: dict[str, TensorInfo]  # in header order
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def absolute_range(self, name: str) -> tuple[int, int]:
        info = self.tensors[name]
        return self.data_start + info.begin, self.data_start + info.end


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (for phases that build many objects and no cycles): a header
    of 300,000 entries allocates millions of objects, and the collections they trigger traverse all of
    them (1.2 s of a 2.1 s parse). Reference counting still frees everything as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_header_bytes(raw: bytes, path: Path | str, file_size: int | None) -> SafetensorsHeader:
    """Parse the JSON header (the bytes after the 8-byte length) and check it against the file size."""
    with gc_paused():
        return _parse_header_json(raw, path, file_size)


def _parse_header_json(raw: bytes, path: Path | str, file_size: int | None) -> SafetensorsHeader:
    header = parse_json(raw, path, invalid="corrupt safetensors header")
    if not isinstance(header, dict):
        raise LorahubError("corrupt safetensors header (not a JSON object)", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LorahubError("corrupt safetensors header (__metadata__ is not an object)", path=path)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise LorahubError(f"corrupt safetensors header (__metadata__ value of '{key}' is "
                               f"{json_type(value)}, not a string)", path=path)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(name, entry, path)
    _check_layout(tensors, path, None if file_size is None else file_size - 8 - len(raw))
    data_len = max((info.end for info in tensors.values()), default=0)
    return SafetensorsHeader(Path(str(path)), len(raw), tensors, metadata,
                             file_size if file_size is not None else 8 + len(raw) + data_len)


def _tensor_info(name: str, entry: Any, path: Path | str) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative integers, data offsets
    `[begin, end]` with `end - begin` exactly the bytes that dtype × shape take."""
    try:  # the common case, quickly (300,000 entries); anything odd is described by _entry_problem
        shape, (begin, end) = entry["shape"], entry["data_offsets"]
        bits = DTYPE_BITS[entry["dtype"]]
        if type(shape) is list and type(begin) is int and type(end) is int and 0 <= begin <= end <= MAX_DATA_BYTES:
            for dim in shape:
                if type(dim) is not int or dim < 0:
                    break
                bits *= dim
            else:
                if bits == (end - begin) * 8:
                    return TensorInfo(name, entry["dtype"], tuple(shape), begin, end)
    except (TypeError, KeyError, ValueError):
        pass
    why = _entry_problem(entry) or "invalid entry"
    raise LorahubError(f"corrupt safetensors header ({why})", path=path, key=name)


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"the entry is {json_type(entry)}, not an object"
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        return f"no '{missing[0]}'"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        return f"data_offsets {offsets!r} are not two non-negative integers"
    begin, end = offsets
    if end < begin:
        return f"data_offsets [{begin}, {end}] end before they begin"
    if end > MAX_DATA_BYTES:
        return f"data_offsets end at byte {end:,}, beyond any real file"
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != (end - begin) * 8:
        return f"{dtype}{shape} takes {bits / 8:,g} bytes but data_offsets [{begin}, {end}] hold {end - begin:,}"
    return None


def _check_layout(tensors: dict[str, TensorInfo], path: Path | str, data_size: int | None) -> None:
    """No two tensors share bytes, and (when the file's size is known) every tensor lies inside it."""
    spans = [(info.begin, info.end, name) for name, info in tensors.items() if info.end > info.begin]
    end = 0
    for span in spans:  # writers lay tensors out in header order: then no sort is needed
        if span[0] < end:
            spans.sort()
            break
        end = span[1]
    previous_end, previous = 0, ""
    for begin, end, name in spans:
        if begin < previous_end:
            raise LorahubError(f"corrupt safetensors header (data_offsets [{begin}, {end}] overlap those of "
                               f"tensor '{previous}', which end at {previous_end})", path=path, key=name)
        previous_end, previous = end, name
    if data_size is not None and previous_end > data_size:
        name = next(name for _, end, name in spans if end > data_size)
        raise LorahubError(f"truncated safetensors file (this tensor's data ends at byte {tensors[name].end:,} of "
                           f"the data section, the file holds {data_size:,}; {previous_end - data_size:,} bytes "
                           "of tensor data missing)", path=path, key=name)


def json_type(value: Any) -> str:
    """How a JSON value's type reads in a message: `an object`, `an array`, `a string`, `a number`..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse_json(data: bytes | str, path: Path | str | None, *, what: str = "JSON", invalid: str | None = None) -> Any:
    """JSON text (bytes: UTF-8, a UTF-8 byte-order mark allowed) parsed, or a one-line error naming
    `path` and `what` it is: invalid UTF-8 (UTF-16 named as such), invalid JSON, nesting too deep for
    the parser. `invalid` starts the message (default `invalid <what>`)."""
    invalid = invalid or f"invalid {what}"
    if isinstance(data, bytes):
        if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) > 1 and b"\x00" in data[:4]):
            raise LorahubError(f"{invalid}: not UTF-8 (it looks like UTF-16/32); save it as UTF-8", path=path)
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LorahubError(f"{invalid}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                               path=path) from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise LorahubError(f"{invalid} ({exc.msg} at line {exc.lineno} column {exc.colno})", path=path) from None
    except RecursionError:
        raise LorahubError(f"{invalid} (nested too deeply for its parser)", path=path) from None


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def open_regular(path: Path | str) -> int:
    """A read-only descriptor of `path`, which must be a regular file (symlinks followed): a FIFO, a
    device or a socket is refused without blocking on it (a FIFO's open waits for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise LorahubError(f"cannot read: {exc.strerror}", path=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise LorahubError(f"not a regular file ({_kind_of(mode)})", path=path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: Path | str) -> None:
    """Refuse a path that exists but is not a regular file or a directory (a FIFO, a device, a socket)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise LorahubError(f"not a regular file ({_kind_of(mode)})", path=path)


def read_regular(path: Path | str, *, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file (refused: FIFOs, devices, sockets, anything over `limit` bytes)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise LorahubError(f"file too large ({size:,} bytes; at most {limit:,} expected here)", path=path)
        return _pread_exact(fd, size, 0)
    except OSError as exc:
        raise LorahubError(f"cannot read: {exc.strerror}", path=path) from None
    finally:
        os.close(fd)


def read_json_file(path: Path | str, *, what: str = "JSON") -> Any:
    """A JSON file (configs, indexes, registry manifests, merge records): a regular file, UTF-8, valid
    JSON, or a one-line error naming it."""
    return parse_json(read_regular(path), path, what=what)


def read_header(path: Path | str, *, check_size: bool = True) -> SafetensorsHeader:
    """Read a safetensors header: 8 bytes + N bytes, never the tensor data.

    `check_size=False` accepts a file whose data section is shorter than the header says (a header-only
    skeleton of a base model, or an interrupted download): the header is all a shape check needs.
    Each call reads and parses the header again; `cached_header(path)` parses it once per file.
    """
    path = Path(path)
    fd = open_regular(path)
    try:
        return _header_from_fd(fd, path, check_size=check_size)
    finally:
        os.close(fd)


def _header_length(head: bytes, file_size: int, path: Path) -> int:
    if len(head) < 8:
        raise LorahubError("not a safetensors file (shorter than 8 bytes)", path=path)
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
        raise LorahubError(
            f"not a safetensors file or corrupt header (header length {header_len} > file size {file_size})",
            path=path)
    return header_len


def _parse_raw_header(raw: bytes, path: Path, file_size: int | None) -> SafetensorsHeader:
    if raw[:1] != b"{":
        raise LorahubError("not a safetensors file (header does not start with '{')", path=path)
    return parse_header_bytes(raw, path, file_size)


def _header_from_fd(fd: int, path: Path, *, check_size: bool = True) -> SafetensorsHeader:
    """`read_header` of an open descriptor (positioned reads: the descriptor has no shared offset)."""
    try:
        file_size = os.fstat(fd).st_size
        header_len = _header_length(os.pread(fd, 8, 0), file_size, path)
        raw = _pread_exact(fd, header_len, 8)
    except OSError as exc:
        raise LorahubError(f"cannot read: {exc.strerror}", path=path) from None
    return _parse_raw_header(raw, path, file_size if check_size else None)


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset` (fewer only at the end of the file)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# open safetensors files: one descriptor and one parsed header per file, shared by all readers
#
# `LazyTensor.load`, `TensorSource` and the hashes ask `open_safetensors(path)`; the header of a file
# is parsed once however many tensors are read from it (a kohya file of 700 modules used to parse its
# header 2100 times, a 94 MB header once per tensor). Reads are positioned (`os.preadv`), so threads
# read side by side without a lock. The cache holds the `OPEN_FILES_MAX` most recently used files;
# an entry is reopened when the path's (device, inode, size, mtime, ctime) change. A file leaves the
# cache on eviction or `close_open_files()` and its descriptor closes as soon as no reader holds it
# (readers keep a reference while they read); whatever is left closes at exit.

OPEN_FILES_MAX = 64

# safetensors dtype -> struct format for reading scalars without torch (BF16 is widened by hand)
_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
                   "U8": "<B", "BOOL": "<?", "BF16": "<H"}


class SafetensorsFile:
    """An open safetensors file: its parsed `header` and positioned reads of its tensors' bytes."""

    __slots__ = ("path", "header", "identity", "_fd", "_finalizer", "__weakref__")

    def __init__(self, path: Path, fd: int, header: SafetensorsHeader, identity: tuple) -> None:
        self.path = path
        self.header = header
        self.identity = identity
        self._fd = fd
        # closes the descriptor when the last reference goes (eviction while a read is in flight is safe)
        self._finalizer = weakref.finalize(self, os.close, fd)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise LorahubError("cannot read tensor: no tensor of this name in the file", path=self.path,
                               key=name) from None

    def read_into(self, name: str, buffer, info: TensorInfo | None = None) -> None:
        """Fill `buffer` (a writable buffer of exactly the tensor's byte length) with its bytes
        (`info`: the tensor's header entry, when the caller has it already)."""
        info = info or self.info(name)
        self.read_range(info.begin, info.end, buffer, key=name)

    def read_range(self, begin: int, end: int, buffer, *, key: str | None = None) -> None:
        """Fill `buffer` with the bytes [begin, end) of the data section (offsets as in the header;
        several neighbouring tensors at once, for scans)."""
        size = end - begin
        view = memoryview(buffer)
        if view.nbytes != size:
            raise LorahubError(f"cannot read tensor: {size} bytes in the file, {view.nbytes} expected",
                               path=self.path, key=key)
        start = self.header.data_start + begin
        try:
            got = os.preadv(self._fd, [view], start)
            if got < size:  # a short read: the rest, or the end of a truncated file
                view = view.cast("B")
                while got < size:
                    count = os.preadv(self._fd, [view[got:]], start + got)
                    if count == 0:
                        raise LorahubError(f"cannot read tensor: truncated safetensors file (read {got} of "
                                           f"{size} bytes)", path=self.path, key=key)
                    got += count
        except OSError as exc:
            raise LorahubError(f"cannot read tensor: {exc.strerror}", path=self.path, key=key) from None

    def read_bytes(self, name: str) -> bytes:
        info = self.info(name)
        buffer = bytearray(info.end - info.begin)
        self.read_into(name, buffer)
        return bytes(buffer)

    def scalar(self, name: str) -> float | None:
        """A one-element tensor's value, read without torch; None for dtypes struct cannot decode (FP8)."""
        info = self.info(name)
        fmt = _SCALAR_FORMATS.get(info.dtype)
        if fmt is None or info.end - info.begin != struct.calcsize(fmt):
            return None
        (value,) = struct.unpack(fmt, self.read_bytes(name))
        if info.dtype == "BF16":  # bf16 is the top half of an fp32
            (value,) = struct.unpack("<f", struct.pack("<I", value << 16))
        return float(value)

    def close(self) -> None:
        """Close now (only when no other thread reads this file; eviction never needs this)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.header.tensors)} tensors)"


_open_files: OrderedDict[str, SafetensorsFile] = OrderedDict()
_open_files_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_safetensors(path: Path | str) -> SafetensorsFile:
    """The cached open file at `path` (opened and its header parsed on first use; the file's size is
    checked against the header: a truncated file is refused as by `read_header`)."""
    key = os.fspath(path)  # no Path() here: this runs once per tensor read
    if not os.path.isabs(key):
        key = os.path.abspath(key)
    try:
        identity = _identity(os.stat(key))
    except OSError as exc:
        raise LorahubError(f"cannot read: {exc.strerror}", path=path) from None
    with _open_files_lock:
        cached = _open_files.get(key)
        if cached is not None and cached.identity == identity:
            _open_files.move_to_end(key)
            return cached
        # opened and parsed under the lock: threads asking for the same file at once parse it once
        path = Path(path)
        fd = open_regular(path)
        try:
            header = _header_from_fd(fd, path)
            identity = _identity(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        opened = SafetensorsFile(path, fd, header, identity)
        _open_files[key] = opened
        _open_files.move_to_end(key)
        while len(_open_files) > OPEN_FILES_MAX:
            _open_files.popitem(last=False)
        return opened


def cached_header(path: Path | str) -> SafetensorsHeader:
    """`read_header(path)`, parsed once per file version (see `open_safetensors`)."""
    return open_safetensors(path).header


def close_open_files() -> None:
    """Forget every cached file; each closes once no reader holds it."""
    with _open_files_lock:
        _open_files.clear()


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(exc: BaseException, path: Path | str) -> OSError | None:
    """The OSError inside another library's write error (safetensors' `SafetensorError: Error while
    serializing: I/O error: No space left on device (os error 28)`), about `path`; None if it is not one."""
    if isinstance(exc, OSError):
        return exc
    found = _OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def is_pickle_path(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def load_pickle_state_dict(path: Path, allow_pickle: bool) -> dict:
    """Load a pickled state dict only when the user asked for it, and then with weights_only=True."""
    if not allow_pickle:
        raise LorahubError(
            "pickle file refused (it can run code when loaded); convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)", path=path)
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise LorahubError(f"cannot load pickle with weights_only=True: {str(exc).splitlines()[0]}",
                           path=path) from None
    if not isinstance(state, dict):
        raise LorahubError("pickle file does not hold a state dict", path=path)
    return state


# ---------------------------------------------------------------------------------------------
# hashes

def _sha256_range(path: Path, start: int, length: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = length
        while True:
            size = 1 << 22 if remaining is None else min(1 << 22, remaining)
            if size == 0:
                break
            chunk = handle.read(size)
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    return _sha256_range(Path(path), 0)


def file_hashes(path: Path | str) -> dict[str, str]:
    """sha256 (whole file), AutoV2 (its first 10 hex), and for safetensors the data-only hash that
    kohya writes as `sshs_model_hash` (= civitai AutoV3; A1111 shows its first 12 hex)."""
    path = Path(path)
    whole = file_sha256(path)
    hashes = {"sha256": whole, "autov2": whole[:10].upper()}
    if path.suffix == ".safetensors":
        header = cached_header(path)
        data_hash = _sha256_range(path, header.data_start)
        hashes["sshs_model_hash"] = data_hash
        hashes["autov3"] = data_hash[:12].upper()
        hashes["a1111_shorthash"] = data_hash[:12]
    return hashes


def legacy_hash_of_bytes(data: bytes) -> str:
    """kohya `sshs_legacy_hash`: sha256 of the 0x10000 bytes at offset 0x100000, first 8 hex."""
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------
# positioned I/O: reading and writing tensor bytes at known offsets without a file object

_COPY_CHUNK = 64 << 20  # copy_file_range per call: its speed does not depend on it; progress does
# pwrite per call. Measured on Linux 6.18 / ext4: buffered writes of ≥ 512 KB per call ran at 0.4–1.5 GB/s
# of kernel CPU time (large page-cache folios to allocate), ≤ 256 KB at ~5 GB/s; syscalls are cheap.
_WRITE_CHUNK = 256 << 10


def pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from `fd` at `offset`."""
    view = buffer
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise LorahubError("unexpected end of file while reading tensor data")
        view = view[got:]
        offset += got


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of `data` to `fd` at `offset`."""
    view = memoryview(data).cast("B")
    while len(view):
        done = os.pwrite(fd, view[:_WRITE_CHUNK], offset)
        view = view[done:]
        offset += done


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int,
               advance: Callable[[int], None] | None = None) -> None:
    """Kernel-side copy (copy_file_range, reflinks where the filesystem has them), else pread/pwrite."""
    use_kernel = hasattr(os, "copy_file_range")
    while count > 0:
        step = min(count, _COPY_CHUNK)
        done = 0
        if use_kernel:
            try:
                done = os.copy_file_range(src_fd, dst_fd, step, src_off, dst_off)
            except OSError:
                use_kernel = False
        if not use_kernel:
            step = min(step, 8 << 20)
            chunk = os.pread(src_fd, step, src_off)
            if not chunk:
                raise LorahubError("unexpected end of file while copying")
            pwrite_all(dst_fd, chunk, dst_off)
            done = len(chunk)
        if done <= 0:
            raise LorahubError("unexpected end of file while copying")
        src_off += done
        dst_off += done
        count -= done
        if advance:
            advance(done)


def _load_sync_file_range():
    """libc's sync_file_range, to start writeback of what we just wrote (Linux only)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
        func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return func
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2
# benchmarks compare with and without the hint
_NO_WRITEBACK_HINT = os.environ.get("LORAHUB_NO_WRITEBACK_HINT") == "1"


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing a finished range to disk now (non-blocking), so the disk works
    while we compute the next tensors instead of all at the final flush. A hint: errors are ignored."""
    if _SYNC_FILE_RANGE is not None and count > 0 and not _NO_WRITEBACK_HINT:
        _SYNC_FILE_RANGE(fd, offset, count, _SYNC_FILE_RANGE_WRITE)


def build_header(entries: Iterable[tuple[str, str, tuple[int, ...], int, int]],
                 metadata: dict[str, str] | None) -> bytes:
    """8-byte length + JSON (space-padded to a multiple of 8), entries in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
