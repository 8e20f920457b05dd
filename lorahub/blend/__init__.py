"""Combining adapters: weighted sums of LoRA deltas, exact where the math allows.

For adapters i = 1…N with weights wᵢ and per-layer scales sᵢ (alpha/r, or alpha/√r with rsLoRA), the
exact combination of one layer is the sum of products

    ΔW = Σᵢ cᵢ·Bᵢ·Aᵢ,    cᵢ = wᵢ·sᵢ,

which is what applying the adapters together does at inference. Each method is one registered
function per layer (`registry.py`); the factored ones (cat, svd, linear) live in `exact.py`, the
element-wise ones (ties, dare_*, magnitude_prune) in `elementwise.py`, and the operation that runs
them over an adapter (`blend`, `interpolate`, the checks and the report) in `api.py`.
docs/blend.md has the formulas; its methods table is rendered by `methods_markdown()`.
"""
from __future__ import annotations

# the method modules register their methods on import
from . import elementwise, exact  # noqa: F401
from .api import (
    BASE_METADATA,
    OUTPUT_DTYPES,
    BlendOptions,
    BlendReport,
    BlendResult,
    LayerReport,
    blend,
    check_compatible,
    interpolate,
    parse_weights,
    shared_full_tensors,
)
from .common import CANCEL_TOLERANCE, RANK_METHODS, factored_fro_norm
from .elementwise import (
    disjoint_merge,
    magnitude_based_pruning,
    majority_sign_mask,
    merge_elementwise,
    prune,
    random_pruning,
)
from .exact import blend_cat, blend_linear, blend_svd
from .registry import (
    DEFAULT_METHOD,
    BlendMethod,
    LayerContext,
    LayerResult,
    Param,
    Term,
    get_method,
    method_names,
    methods,
    methods_markdown,
    register,
)

# the built-in methods, in the registry's order (factored first); `methods()` also sees later registrations
METHODS = method_names()
LAYER_METHODS = {method.name: method.fn for method in methods()}

__all__ = [
    "BASE_METADATA", "CANCEL_TOLERANCE", "DEFAULT_METHOD", "LAYER_METHODS", "METHODS", "OUTPUT_DTYPES",
    "RANK_METHODS", "BlendMethod", "BlendOptions", "BlendReport", "BlendResult", "LayerContext", "LayerReport",
    "LayerResult", "Param", "Term", "blend", "blend_cat", "blend_linear", "blend_svd", "check_compatible",
    "disjoint_merge", "factored_fro_norm", "get_method", "interpolate", "magnitude_based_pruning",
    "majority_sign_mask", "merge_elementwise", "method_names", "methods", "methods_markdown", "parse_weights",
    "prune", "random_pruning", "register", "shared_full_tensors",
]
