"""The CLI's JSON contract (docs/json.md): the keys every command spells the same way.

Every `--json` payload is one JSON object on stdout (`registry list`: an array) with `"ok"` first:
`true` when the command succeeded (exit 0), `false` with `"error"` (the one-line message) and
`"exit_code"` when it did not. The same quantity has the same key everywhere: `path` (the adapter read),
`out` (what was written), `format` (of `out` when the command writes an adapter, else of `path`),
`modules`, `rank`, `alpha`, `scale` (a number when every module agrees, else null, with
`*_distribution`), `params`, `device`, `seconds`, `warnings`, `layers` (per-layer rows keyed by
`target`, with `rank`/`alpha` of the layer written or described).
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import Adapter


def number(value: float) -> float | int:
    """16.0 → 16, 0.3333333333 → 0.33333333: how alphas and scales appear in every payload."""
    return int(value) if float(value).is_integer() else round(float(value), 8)


def _distribution(values: list[Any]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _one_or_none(values: list[Any]) -> Any:
    return values[0] if values and len(set(values)) == 1 else None


def adapter_fields(adapter: Adapter) -> dict[str, Any]:
    """`modules`, `rank`, `alpha`, `scale` (+ `*_distribution`) and `params` of an adapter, as inspect
    reports them (what resize, blend, interpolate and convert wrote)."""
    layers = list(adapter.layers.values())
    ranks = [layer.rank for layer in layers]
    alphas = [number(layer.alpha) for layer in layers]
    scales = [number(layer.scale) for layer in layers]
    return {
        "modules": len(layers),
        "rank": _one_or_none(ranks), "rank_distribution": _distribution(ranks),
        "alpha": _one_or_none(alphas), "alpha_distribution": _distribution(alphas),
        "scale": _one_or_none(scales), "scale_distribution": _distribution(scales),
        "params": adapter.num_params,
    }
