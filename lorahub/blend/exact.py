"""The factored methods: `cat` (exact), `svd` (exact sum, optimally truncated) and PEFT's `linear`.

None of them forms a dense ΔW: they work on the stacked factors of Σ cᵢ·Bᵢ·Aᵢ.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..errors import LorahubError
from ..lazy import torch
from ..lowrank import factored_svd_sum
from .common import (
    RANK_PARAMS,
    cancel_bound,
    check_rank_rule,
    exact_bias,
    nonzero,
    relative_error,
    total,
    truncate,
)
from .registry import FACTORED, LayerContext, LayerResult, Term, register


@register(
    "cat", kind=FACTORED, description="exact, rank Σrᵢ",
    formula=r"`B = [√\|c₁\|B₁ \| √\|c₂\|B₂ \| …]`, `A = [sgn(c₁)√\|c₁\|A₁; sgn(c₂)√\|c₂\|A₂; …]`, "
            r"so `B·A = Σ cᵢBᵢAᵢ`",
    rank="`Σ rᵢ` over the adapters with `wᵢ ≠ 0`", exact="**yes**",
    reference="PEFT `add_weighted_adapter` `cat` (same `B·A`)")
def blend_cat(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    """Exact: B = [√|c₁|B₁ | √|c₂|B₂ | …], A = [sgn(c₁)√|c₁|A₁; …], rank Σrᵢ (zero weights omitted)."""
    live = nonzero(terms)
    bias = exact_bias(terms)
    if not live:
        return LayerResult(None, None, bias, 1.0, 1.0, 0.0, "all weights zero")
    ups, downs = [], []
    for term in live:
        root = math.sqrt(abs(term.coeff))
        ups.append(term.up * root)
        downs.append(term.down * (math.copysign(root, term.coeff)))
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    return LayerResult(up, down, bias, 1.0, 1.0, relative_error(terms, up, down))


@register(
    "svd", kind=FACTORED, description="exact sum truncated to --rank by the factored SVD, never dense",
    params=RANK_PARAMS, checks=(check_rank_rule,),
    formula="the first `r` singular triplets of `Σ cᵢBᵢAᵢ`: `B = U_r√Σ_r`, `A = √Σ_r V_rᵀ`",
    rank="`--rank`, else the largest input rank; or per layer by `--rank-method`",
    exact="the best rank-`r` approximation (Eckart–Young); exact when `r ≥` the sum's rank",
    reference="Eckart–Young; PEFT `svd` (dense, same truncation)")
def blend_svd(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    """The best rank-r approximation of Σ cᵢBᵢAᵢ through the exact factored SVD (never dense).

    The whole per-layer path is this one function, so same-shape layers can later share one batched SVD.
    """
    live = nonzero(terms)
    bias = exact_bias(terms)
    if not live:
        return LayerResult(None, None, bias, 1.0, 1.0, 0.0, "all weights zero")
    svd = factored_svd_sum([(t.coeff, t.up, t.down) for t in live], compute_dtype=torch.float32,
                           device=ctx.device)
    up, down, kept, note = truncate(svd, ctx, cancel_bound(live))
    # Eckart–Young: the error of the optimal truncation is the dropped part of the spectrum
    rel_error = math.sqrt(max(0.0, 1.0 - kept["energy_retained"])) if up is not None else (
        0.0 if note.startswith("cancelled") else 1.0)
    return LayerResult(up, down, bias, kept["energy_retained"], kept["fro_retained"], rel_error, note)


@register(
    "linear", kind=FACTORED,
    description="PEFT's factor-space sum: approximate, has cross terms BᵢAⱼ, equal ranks only",
    formula=r"`B = Σ √\|cᵢ\|Bᵢ`, `A = Σ sgn(cᵢ)√\|cᵢ\|Aᵢ`", rank="the common rank `r`",
    exact=r"**no**: `B·A = Σ cᵢBᵢAᵢ + Σ_{i≠j} √\|cᵢ\|sgn(cⱼ)√\|cⱼ\| BᵢAⱼ`",
    reference="PEFT `add_weighted_adapter` `linear`")
def blend_linear(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    """PEFT `linear`: B = Σ√|cᵢ|Bᵢ, A = Σ sgn(cᵢ)√|cᵢ|Aᵢ — a product of sums, with cross terms BᵢAⱼ."""
    ranks = sorted({t.rank for t in terms})
    if len(ranks) > 1:
        raise LorahubError(
            f"method 'linear' (PEFT's factor-space sum) needs equal ranks on each module, "
            f"'{ctx.target}' has ranks {', '.join(str(t.rank) for t in terms)}; use --method svd or cat "
            f"(exact for any ranks)")
    up = total([math.sqrt(abs(t.coeff)) * t.up for t in terms])
    down = total([math.copysign(math.sqrt(abs(t.coeff)), t.coeff) * t.down for t in terms])
    bias = exact_bias(terms)
    if all(t.coeff == 0.0 for t in terms):
        return LayerResult(None, None, bias, None, None, 0.0, "all weights zero")
    return LayerResult(up, down, bias, None, None, relative_error(terms, up, down),
                       "approximate: factor-space sum" if len(terms) > 1 else "")
