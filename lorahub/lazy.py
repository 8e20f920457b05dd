"""torch, imported the first time lorahub computes with it, not when lorahub is imported.

`import torch` costs seconds; `lorahub --help`, `validate`, `inspect --headers-only`, `registry` and
`pull`/`push` read JSON and safetensors headers only and never need it. Modules that compute write

    from .lazy import torch                  # instead of `import torch`
    if TYPE_CHECKING:
        from torch import Tensor             # names used only in annotations

and use `torch.…` as before: the first attribute looked up imports torch (type checkers see the real
module). Nothing at module level may look up an attribute of `torch` (a default argument
`dtype=torch.float32`, a table of dtypes, a decorator): that would import it with lorahub. Tables of
torch objects are `LazyDict`s, built on first use. `tests/test_start_fast.py` runs the light commands
in fresh interpreters and fails if torch (or numpy, which torch brings) was imported.
"""
from __future__ import annotations

import importlib
import os
import threading
import types
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar, overload

__all__ = ["LazyDict", "LazyModule", "save_file", "torch", "unshare"]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class LazyModule(types.ModuleType):
    """A stand-in for module `name` that imports it on the first attribute lookup. Each attribute is
    then copied onto the stand-in, so later lookups cost what a real module's do."""

    def __init__(self, name: str) -> None:
        super().__init__(name)

    def _module(self) -> types.ModuleType:
        return importlib.import_module(self.__name__)

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._module(), attr)
        setattr(self, attr, value)
        return value

    def __dir__(self) -> list[str]:
        return dir(self._module())

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


class LazyDict(Mapping[K, V]):
    """A read-only mapping built by `build()` the first time it is read (e.g. safetensors dtype names
    to torch dtypes, which needs torch)."""

    def __init__(self, build: Callable[[], dict[K, V]]) -> None:
        self._build = build
        self._data: dict[K, V] | None = None
        self._lock = threading.Lock()

    @property
    def data(self) -> dict[K, V]:
        if self._data is None:
            with self._lock:
                if self._data is None:
                    self._data = self._build()
        return self._data

    def __getitem__(self, key: K) -> V:
        return self.data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | T, /) -> V | T: ...

    def get(self, key: K, default: Any = None, /) -> Any:  # the dict's own get: per-tensor lookups stay cheap
        return self.data.get(key, default)

    def __repr__(self) -> str:
        return f"LazyDict({self.data!r})" if self._data is not None else "LazyDict(<not built yet>)"


if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")


def save_file(tensors: dict[str, torch.Tensor], filename: str | os.PathLike[str],
              metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, imported (and torch with it) when a file is written; tensors that share
    storage are written as copies (`unshare`)."""
    from safetensors.torch import save_file as save

    save(unshare(tensors), filename, metadata=metadata)


def unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every tensor that shares storage with an earlier one copied (one factor of several
    layers: a fused module split by rows shares its A), which safetensors refuses to write."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen:
                tensor = tensor.clone()
            else:
                seen.add(storage)
        out[name] = tensor
    return out
