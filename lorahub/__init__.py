"""lorahub: manage LoRA adapters the way git manages commits."""
from __future__ import annotations

__version__ = "0.1.0"

from .adapter import Adapter, LazyTensor, LoraLayer  # noqa: E402
from .errors import LorahubError  # noqa: E402

__all__ = ["Adapter", "LazyTensor", "LoraLayer", "LorahubError", "__version__"]
