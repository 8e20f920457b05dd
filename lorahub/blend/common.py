"""What the methods share: factored norms (never dense), the exact bias, and the rank truncation rule
with its parameters (`RANK_PARAMS`, declared once for svd and the element-wise methods)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

from ..errors import OptionError
from ..lazy import torch
from ..lowrank import METHODS as RANK_METHODS
from ..lowrank import SPLITS, LowRankSVD, choose_rank, retention, split_factors
from .registry import LayerContext, Param, Term

if TYPE_CHECKING:
    from torch import Tensor

    from .api import BlendOptions

# a layer whose exact sum is below this fraction of Σ|cᵢ|·‖Bᵢ‖·‖Aᵢ‖ cancelled out (A − A): fp32 SVD
# of such a sum is rounding noise, so the layer is dropped instead of written as noise
CANCEL_TOLERANCE = 1e-5


def _dynamic(opts: BlendOptions) -> bool:
    return opts.rank_method != "fixed"


RANK_PARAMS = (
    Param("rank", int, None, "rank of the result (default: the largest input rank; with --rank-method, the cap)",
          min=1),
    Param("rank_method", str, "fixed", "per-layer dynamic rank (the rules of resize): sv_ratio keeps σ > σ₀/p; "
          "sv_fro the smallest k with ‖S_k‖/‖S‖ ≥ p; sv_cumulative the smallest k with ΣS_k/ΣS ≥ p",
          choices=RANK_METHODS),
    Param("param", float, None, "the --rank-method parameter p (e.g. 0.99)", recorded=_dynamic),
    Param("kohya_compat", bool, False, "dynamic ranks by kohya's rule (one more than needed, at least 2)",
          strict=False, recorded=_dynamic),
    Param("split", str, "balanced", "how S is split after an SVD: B = U√S, A = √S·Vᵀ (balanced); B = U·S, "
          "A = Vᵀ (up, kohya/PEFT); B = U, A = S·Vᵀ (down)", choices=SPLITS, strict=False),
)


def check_rank_rule(opts: BlendOptions) -> None:
    """--rank-method and --param go together; the rule's own parameter checks run once, before any layer."""
    if opts.rank_method != "fixed":
        if opts.param is None:
            raise OptionError(f"--rank-method {opts.rank_method} needs --param")
        choose_rank(torch.ones(1), rank=opts.rank or 1, method=opts.rank_method, param=opts.param)
    elif opts.param is not None:
        raise OptionError("--param goes with --rank-method sv_ratio|sv_fro|sv_cumulative")


# ----------------------------------------------------------------------------------------------
# factored norms: ‖Σ cᵢ Bᵢ Aᵢ‖_F without the dense matrix (Gram matrices, float64)

def _stacked(terms: Iterable[tuple[float, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    ups, downs = [], []
    for coeff, up, down in terms:
        ups.append(up.to(torch.float64) * coeff)
        downs.append(down.to(torch.float64))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def factored_fro_norm(terms: Sequence[tuple[float, Tensor, Tensor]]) -> float:
    """‖Σ cᵢ·upᵢ·downᵢ‖_F = √tr((UᵀU)(DDᵀ)) for the stacked factors, in O((n + k)·R²)."""
    terms = [t for t in terms if t[1].shape[1] > 0]
    if not terms:
        return 0.0
    up, down = _stacked(terms)
    value = float(torch.sum((up.T @ up) * (down @ down.T)))
    return math.sqrt(max(value, 0.0))


def relative_error(exact: Sequence[Term], up: Tensor | None, down: Tensor | None) -> float:
    """‖up·down − Σ cᵢBᵢAᵢ‖_F / ‖Σ cᵢBᵢAᵢ‖_F, factored."""
    exact_terms = [(t.coeff, t.up, t.down) for t in exact]
    norm = factored_fro_norm(exact_terms)
    diff_terms = list(exact_terms)
    if up is not None and down is not None and up.shape[1]:
        diff_terms.append((-1.0, up, down))
    diff = factored_fro_norm(diff_terms)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def total(tensors: Sequence[Tensor]) -> Tensor:
    """Σ of a non-empty list, left to right."""
    out = tensors[0]
    for tensor in tensors[1:]:
        out = out + tensor
    return out


def exact_bias(terms: Sequence[Term]) -> Tensor | None:
    biases = [t.coeff * t.bias for t in terms if t.bias is not None]
    return total(biases) if biases else None


def cancel_bound(terms: Sequence[Term]) -> float:
    """Σ|cᵢ|·‖Bᵢ‖·‖Aᵢ‖ ≥ ‖Σ cᵢBᵢAᵢ‖: the size a sum could have had."""
    return sum(abs(t.coeff) * float(torch.linalg.matrix_norm(t.up)) * float(torch.linalg.matrix_norm(t.down))
               for t in terms)


def nonzero(terms: Sequence[Term]) -> list[Term]:
    return [t for t in terms if t.coeff != 0.0]


# ----------------------------------------------------------------------------------------------
# truncation

def target_rank(ctx: LayerContext) -> int | None:
    """The rank cap: --rank, else the largest input rank for a fixed rank (None: no cap, dynamic)."""
    if ctx.options.rank is not None:
        return ctx.options.rank
    return ctx.default_rank if ctx.options.rank_method == "fixed" else None


def truncate(svd: LowRankSVD, ctx: LayerContext, bound: float) -> tuple[Tensor | None, Tensor | None, dict, str]:
    """Pick the rank by the options' rule and split S between the factors."""
    total = float(torch.linalg.vector_norm(svd.S.double())) if svd.S.numel() else 0.0
    if total <= CANCEL_TOLERANCE * bound or total == 0.0:
        return None, None, {"energy_retained": 1.0, "fro_retained": 1.0}, "cancelled (sum is zero)"
    opts = ctx.options
    cap = target_rank(ctx)
    S_rule = svd.S
    if opts.kohya_compat:
        # kohya's rule clamps against the dense matrix's full spectrum, length min(n, k)
        full = min(svd.shape)
        S_rule = torch.cat([svd.S.cpu(), svd.S.new_zeros(full - svd.S.shape[0], device="cpu")])
    rank = choose_rank(S_rule, rank=cap, method=opts.rank_method, param=opts.param,
                       kohya_compat=opts.kohya_compat)
    rank = min(rank, svd.rank_bound)
    if rank == 0:
        return None, None, {"energy_retained": 0.0, "fro_retained": 0.0}, "rank 0"
    up, down = split_factors(svd, rank, mode=opts.split)
    return up, down, retention(svd.S, rank), ""
