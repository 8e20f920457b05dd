"""Readers and writers, one module per on-disk format; nothing outside this package knows a key name.

    load_adapter(path, format=None, allow_pickle=False) -> Adapter
    save_adapter(adapter, out, format=None, overwrite=False, inputs=()) -> Path   (lorahub.output's policy)
    output_target(out, format) -> (path, "dir" | "file")

The registry: each format module declares its `FORMATS` records (`lorahub.formats.spec.Format`);
`_MODULES` lists the modules. Adding a format is one module and one line here.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager, Iterable, Literal

from ..adapter import Adapter
from ..errors import LorahubError
from ..storage import as_os_error, check_regular, is_pickle_path
from .common import ADAPTER_KEY_MARKERS, TensorSource
from .naming import in_readers_naming
from .spec import Format

if TYPE_CHECKING:
    from ..output import InputSpec, OutputPlan

# the format modules, in the order the CLI lists their formats: adding a format adds its name here
_MODULES = ("peft", "kohya", "diffusers", "xlabs")

_REGISTRY: dict[str, Format] = {fmt.name: fmt for module in _MODULES
                                for fmt in importlib.import_module(f"{__name__}.{module}").FORMATS}
# the names the CLI offers: the writable ones for --to; every format, read-only ones last, for reading
FORMATS = tuple(name for name, fmt in _REGISTRY.items() if fmt.writable)
READ_FORMATS = FORMATS + tuple(name for name, fmt in _REGISTRY.items() if not fmt.writable)


def all_formats() -> list[Format]:
    return list(_REGISTRY.values())


def get_format(name: str) -> Format:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LorahubError(f"unknown format '{name}' (choose from {', '.join(READ_FORMATS)})") from None


def marker_files() -> tuple[str, ...]:
    """File names that mark an adapter in a repository listing (the Hub's adapter-file detection)."""
    return tuple(name for fmt in _REGISTRY.values() for name in fmt.marker_files)


def is_adapter_state(names: list[str]) -> bool:
    """Every tensor name is an adapter key (a LoRA/LyCORIS factor, alpha or DoRA scale): an adapter
    file, not a model's weights."""
    return bool(names) and all(any(marker in name for marker in ADAPTER_KEY_MARKERS) for name in names)


def _by_priority() -> list[Format]:
    return sorted(_REGISTRY.values(), key=lambda fmt: fmt.detect_priority)


def detect_by_keys(file: Path, keys: list[str]) -> Format:
    """The format of a single weights file, from its tensor names."""
    for fmt in _by_priority():
        if fmt.detect_keys is not None and fmt.detect_keys(keys):
            return fmt
    if not keys:
        raise LorahubError("no tensors in file", path=file)
    sample = ", ".join(keys[:3])
    raise LorahubError(f"unknown adapter format: no LoRA tensors (lora_A/lora_B, lora_down/lora_up, "
                       f"hada_*, lokr_*) among {len(keys)} keys (e.g. {sample})", path=file)


def _single_file(path: Path) -> Path:
    if not path.exists():
        raise LorahubError("no such file or directory", path=path)
    if path.is_file():
        return path
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if not candidates:
        pickles = sorted(p.name for p in path.iterdir() if p.is_file() and is_pickle_path(p))
        if pickles:  # reading it says whether --allow-pickle is needed
            return path / pickles[0]
        raise LorahubError("no adapter here: no adapter_config.json and no .safetensors file", path=path)
    if len(candidates) > 1:
        defaults = {fmt.default_file for fmt in _REGISTRY.values() if fmt.marker_files}
        preferred = [p for p in candidates if p.name in defaults]
        if preferred:
            return preferred[0]
        raise LorahubError(f"several .safetensors files ({', '.join(p.name for p in candidates)}); "
                           f"name the one to use", path=path)
    return candidates[0]


def load_adapter(path: Path | str, format: str | None = None, *, allow_pickle: bool = False) -> Adapter:
    """Read an adapter from a PEFT directory or a kohya/diffusers/LyCORIS file (format auto-detected)."""
    path = Path(path)
    if not path.exists():
        raise LorahubError("no such file or directory", path=path)
    check_regular(path)  # a FIFO or a device: refused at once (reading one would block or never end)
    if format in (None, "auto"):
        for fmt in _by_priority():
            if fmt.detect_path is not None and fmt.detect_path(path):
                return require_modules(fmt.read(path, allow_pickle=allow_pickle), fmt.name)
        file = _single_file(path)
        source = TensorSource(file, allow_pickle=allow_pickle)
        fmt = detect_by_keys(file, source.keys())
        return require_modules(fmt.read(file, allow_pickle=allow_pickle, source=source), fmt.name)
    fmt = get_format(format)
    if fmt.directory:
        if fmt.detect_path is not None and not fmt.detect_path(path):
            raise LorahubError(f"not a {fmt.name} adapter: no {' or '.join(fmt.marker_files[:1])} here", path=path)
        return require_modules(fmt.read(path, allow_pickle=allow_pickle), fmt.name, forced=True)
    return require_modules(fmt.read(_single_file(path), allow_pickle=allow_pickle), fmt.name, forced=True)


def require_modules(adapter: Adapter, format: str, *, forced: bool = False) -> Adapter:
    """The adapter, if it holds anything to apply: LoRA layers, full tensors or LyCORIS modules. An adapter
    of zero modules (a `--format` that does not match the files reads nothing) is an error, never
    "✓ … 0 modules"."""
    if adapter.layers or adapter.full_tensors or adapter.other_modules or adapter.delta_tensors:
        return adapter
    where = adapter.files[0] if adapter.files else adapter.path
    keys = adapter.extra_keys
    hint = ""
    if forced and keys and where is not None:
        try:
            detected = detect_by_keys(Path(where), keys).name
        except LorahubError:
            detected = None
        if detected and detected != format:
            hint = f"; its keys look like {detected}: drop --format or pass --format {detected}"
    what = f"among {len(keys)} tensors (e.g. '{keys[0]}')" if keys else "(no tensors)"
    raise LorahubError(f"no LoRA modules found {what} (format {format}){hint}", path=where)


def output_target(out: Path | str, format: str) -> tuple[Path, Literal["dir", "file"]]:
    """Where an adapter of `format` written at `out` goes, and whether that output is a directory
    (PEFT) or a file (kohya, diffusers: `out` itself, or the format's default file name inside an
    existing directory). Refuses a path that cannot hold that format, before any work is done."""
    if format not in FORMATS:
        raise LorahubError(f"cannot write format '{format}' (choose from {', '.join(FORMATS)})")
    fmt = _REGISTRY[format]
    out = Path(out)
    if fmt.directory:
        if out.suffix == ".safetensors" and not out.is_dir():
            raise LorahubError(f"{fmt.name} output is a directory; give a directory for --out or pass "
                               "--to kohya/diffusers", path=out)
        return out, "dir"
    if out.suffix != ".safetensors":
        if out.is_dir() and not out.is_symlink():
            return out / (fmt.default_file or "adapter.safetensors"), "file"
        raise LorahubError("output file name must end in .safetensors", path=out)
    return out, "file"


def adapter_sources(adapter: Adapter) -> list[Path]:
    """The files and directory an adapter was read from: an output must never replace them."""
    paths = [adapter.path] if adapter.path is not None else []
    return paths + list(adapter.files)


def reserve_output(out: Path | str, format: str, *, overwrite: bool = False,
                   sources: Iterable[Adapter] = ()) -> ContextManager[OutputPlan]:
    """Check and lock the output an adapter of `format` will be written to, before the work that makes
    it (resize, blend): a refusal or a second writer is reported at once, not after the work."""
    from .. import output

    path, kind = output_target(out, format)
    return output.reserve(path, kind=kind, overwrite=overwrite,
                          inputs=[("adapter", p) for adapter in sources for p in adapter_sources(adapter)])


def save_adapter(adapter: Adapter, out: Path | str, format: str | None = None, *, overwrite: bool = False,
                 inputs: Iterable[InputSpec] = (), notes: list[str] | None = None, named: bool = False) -> Path:
    """Write `adapter` at `out` (a directory for PEFT, a file otherwise) under the output policy
    (`lorahub.output`): an existing `out` is refused unless `overwrite`, never one holding files
    lorahub did not write, never one that is or holds an input (the adapter's own files included). Module
    names are first put in the names the format's readers load (`naming.in_readers_naming`; what it
    renamed is appended to `notes`)."""
    from .. import output

    name = format or (adapter.format if adapter.format in FORMATS else "peft")
    path, kind = output_target(out, name)
    if not named:  # `named`: the caller took `in_readers_naming` itself
        adapter, lines = in_readers_naming(adapter, name)
        if notes is not None:
            notes.extend(lines)
    fmt = _REGISTRY[name]
    assert fmt.write is not None
    sources = [("adapter", p) for p in adapter_sources(adapter)]
    with output.write(path, kind=kind, overwrite=overwrite, inputs=[*inputs, *sources],
                      command=f"save {name}") as tmp:
        try:
            fmt.write(adapter, tmp)
        except Exception as exc:  # a full disk or a file-size limit inside a writer library: an OSError
            error = as_os_error(exc, path)
            if error is None or error is exc:
                raise
            raise error from None
    return path


__all__ = ["FORMATS", "READ_FORMATS", "Format", "adapter_sources", "all_formats", "detect_by_keys", "get_format",
           "in_readers_naming", "is_adapter_state", "load_adapter", "marker_files", "output_target", "require_modules",
           "reserve_output", "save_adapter"]
