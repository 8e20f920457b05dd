"""The record each on-disk format registers: how to recognise, read and write it.

A format module (`peft.py`, `kohya.py`, ...) defines `FORMATS = (Format(...), ...)`; the package's
registry (`lorahub/formats/__init__.py`) lists the modules. The CLI's `--format`/`--to` choices, the
Hub's adapter-file detection and resize's metadata edits all come from these records.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..adapter import Adapter


@dataclass(frozen=True)
class Format:
    name: str
    summary: str  # one line for docs and --help
    # read(path, *, allow_pickle=False, source=None) -> Adapter; `source` is an already opened TensorSource
    read: Callable[..., "Adapter"]
    write: Callable[["Adapter", Path], Path] | None = None  # write(adapter, path) -> path; None: read-only
    directory: bool = False  # written as a directory (else one .safetensors file)
    default_file: str | None = None  # the file name when the output path is a directory
    detect_path: Callable[[Path], bool] | None = None  # recognised by its files, before opening any
    detect_keys: Callable[[list[str]], bool] | None = None  # recognised by a file's tensor names
    detect_priority: int = 100  # lower is asked first (LyCORIS before kohya: same module names)
    marker_files: tuple[str, ...] = ()  # file names that mark this format in a repository
    # edits of the metadata keys this format owns when an adapter is resized: (metadata, report) -> metadata
    on_resize: Callable[[dict[str, str], Any], dict[str, str]] | None = None

    @property
    def writable(self) -> bool:
        return self.write is not None
