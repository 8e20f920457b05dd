"""The element-wise methods: `magnitude_prune`, `ties`, `dare_linear`, `dare_ties`.

TIES, DARE and magnitude pruning are defined on the entries of a task vector, and the entries of a LoRA
delta are those of ΔWᵢ = sᵢBᵢAᵢ, so these methods form the dense per-layer deltas (the only dense path
of blend), merge them as PEFT's merge_utils does, and factor the result back by a truncated SVD.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import LorahubError
from ..lazy import torch
from ..lowrank import LowRankSVD
from .common import RANK_PARAMS, cancel_bound, check_rank_rule, total, truncate
from .registry import ELEMENTWISE, LayerContext, LayerResult, Param, Term, register

if TYPE_CHECKING:
    from torch import Tensor

DENSITY = Param("density", float, None, "fraction of entries kept per delta", min=0, max=1, required=True)
DARE_DENSITY = replace(DENSITY, min_open=True, why="DARE divides by it")
MAJORITY_SIGN = Param("majority_sign", str, "total", "TIES sign election: by the sum of the entries (total) or "
                      "by the count of their signs (frequency)", choices=("total", "frequency"), strict=False)
SEED = Param("seed", int, 0, "seed of the DARE random masks (seeded per module; same device, same result)",
             strict=False)

# ----------------------------------------------------------------------------------------------
# PEFT merge_utils, reimplemented exactly (peft is not a runtime dependency), on dense tensors
# stacked on dim 0; `weights` is a 1-D tensor of the same length


def magnitude_based_pruning(tensor: Tensor, density: float) -> Tensor:
    """Keep the top int(density·numel) entries by absolute value, zero the rest."""
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> Tensor:
    """Bernoulli(density) keep mask; divided by density when rescaling (DARE)."""
    mask = torch.rand(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype) < density
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: Tensor, density: float, method: str, rescale: bool = False,
          generator: torch.Generator | None = None) -> Tensor:
    if density >= 1:
        return tensor
    if density < 0:
        raise LorahubError(f"density must be ≥ 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale, generator)


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise LorahubError(f"unknown majority sign method {method!r} (total|frequency)")
    majority = torch.where(magnitude >= 0, 1, -1).to(stacked.dtype)
    return sign == majority


def disjoint_merge(weighted: Tensor, mask: Tensor) -> Tensor:
    mixed = (weighted * mask).sum(dim=0)
    preserved = mask.sum(dim=0)
    return mixed / torch.clamp(preserved, min=1.0)


def _weighted(stacked: Tensor, weights: Tensor) -> Tensor:
    return stacked * weights.reshape(weights.shape + (1,) * (stacked.dim() - 1))


def _magnitude_pruned(tensors: list[Tensor], density: float) -> Tensor:
    return torch.stack([prune(t, density, "magnitude") for t in tensors], dim=0)


def _dare_pruned(tensors: list[Tensor], density: float, generator: torch.Generator | None) -> Tensor:
    return torch.stack([prune(t, density, "random", rescale=True, generator=generator) for t in tensors], dim=0)


def _sign_elected(pruned: Tensor, weights: Tensor, majority_sign: str) -> Tensor:
    mask = majority_sign_mask(pruned, majority_sign)  # elected from the unweighted tensors
    return disjoint_merge(_weighted(pruned, weights), mask)


def magnitude_prune(tensors: list[Tensor], weights: Tensor, density: float) -> Tensor:
    return _weighted(_magnitude_pruned(tensors, density), weights).sum(dim=0)


def ties(tensors: list[Tensor], weights: Tensor, density: float, majority_sign: str = "total") -> Tensor:
    return _sign_elected(_magnitude_pruned(tensors, density), weights, majority_sign)


def dare_linear(tensors: list[Tensor], weights: Tensor, density: float,
                generator: torch.Generator | None = None) -> Tensor:
    return _weighted(_dare_pruned(tensors, density, generator), weights).sum(dim=0)


def dare_ties(tensors: list[Tensor], weights: Tensor, density: float, majority_sign: str = "total",
              generator: torch.Generator | None = None) -> Tensor:
    return _sign_elected(_dare_pruned(tensors, density, generator), weights, majority_sign)


def merge_elementwise(method: str, tensors: list[Tensor], weights: Tensor, *, density: float,
                      majority_sign: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """PEFT's `magnitude_prune`, `ties`, `dare_linear`, `dare_ties` (peft.utils.merge_utils) by name."""
    if method == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if method == "ties":
        return ties(tensors, weights, density, majority_sign)
    if method == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if method == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign, generator)
    raise LorahubError(f"unknown element-wise method {method!r}")


def layer_generator(seed: int, target: str, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, module name): masks do not depend on layer order."""
    digest = hashlib.sha256(f"{seed}:{target}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


Merge = Callable[[list["Tensor"], "Tensor"], "Tensor"]


def dense_then_svd(terms: Sequence[Term], ctx: LayerContext, merge: Merge) -> LayerResult:
    """`merge` on the dense ΔWᵢ = sᵢBᵢAᵢ (and on the LoRA biases), then the truncated SVD of the result."""
    deltas = [(t.up * t.scale) @ t.down for t in terms]
    weights = torch.tensor([t.weight for t in terms], dtype=torch.float32, device=ctx.device)
    merged = merge(deltas, weights)
    bias = None
    if any(t.bias is not None for t in terms):
        biases = [t.scale * t.bias if t.bias is not None else torch.zeros_like(merged[:, 0]) for t in terms]
        bias = merge(biases, weights)
    del deltas
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    up, down, kept, note = truncate(LowRankSVD(U, S, Vh), ctx, cancel_bound(terms))
    if up is None and float(merged.abs().max()) == 0.0:
        note = "pruned to zero"
    exact = total([t.coeff * (t.up @ t.down) for t in terms])
    exact_norm = float(torch.linalg.matrix_norm(exact))
    written = (up @ down) if up is not None and down is not None else torch.zeros_like(exact)
    rel_error = float(torch.linalg.matrix_norm(written - exact)) / exact_norm if exact_norm else 0.0
    return LayerResult(up, down, bias, kept["energy_retained"], kept["fro_retained"], rel_error, note)


# ----------------------------------------------------------------------------------------------
# the methods

_TRUNCATED = "as `svd`"


@register(
    "magnitude_prune", kind=ELEMENTWISE, params=RANK_PARAMS + (DENSITY,), checks=(check_rank_rule,),
    description="the largest entries of each dense delta, summed, then truncated SVD",
    formula="`Σ wᵢ·P_d(ΔWᵢ)`, then truncated SVD", rank=_TRUNCATED, exact="no (by design)",
    reference="PEFT `magnitude_prune_svd`")
def blend_magnitude_prune(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    density = ctx.value("density")
    return dense_then_svd(terms, ctx, lambda tensors, weights: magnitude_prune(tensors, weights, density))


@register(
    "ties", kind=ELEMENTWISE, params=RANK_PARAMS + (DENSITY, MAJORITY_SIGN), checks=(check_rank_rule,),
    description="TIES on the dense deltas, then truncated SVD",
    formula="`P_d` on each `ΔWᵢ`; sign mask `mᵢ = [sgn(P_d ΔWᵢ) = ε]` with `ε = sgn(Σᵢ P_d ΔWᵢ)` (`total`) or "
            "`sgn(Σᵢ sgn P_d ΔWᵢ)` (`frequency`), ties → +1; `Σᵢ wᵢ·mᵢ·P_dΔWᵢ / max(Σᵢ mᵢ, 1)` entry-wise; "
            "then truncated SVD",
    rank=_TRUNCATED, exact="no (by design)",
    reference="TIES-Merging (Yadav et al. 2023, arXiv:2306.01708); PEFT `ties_svd`")
def blend_ties(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    density, sign = ctx.value("density"), ctx.value("majority_sign")
    return dense_then_svd(terms, ctx, lambda tensors, weights: ties(tensors, weights, density, sign))


@register(
    "dare_linear", kind=ELEMENTWISE, params=RANK_PARAMS + (DARE_DENSITY, SEED), checks=(check_rank_rule,),
    description="DARE random drop and rescale of the dense deltas, summed, then truncated SVD",
    formula="`Σ wᵢ·(Mᵢ ⊙ ΔWᵢ)/d`, `Mᵢ ~ Bernoulli(d)` entry-wise; then truncated SVD",
    rank=_TRUNCATED, exact="no (random)",
    reference="DARE (Yu et al. 2023, arXiv:2311.03099); PEFT `dare_linear_svd`")
def blend_dare_linear(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    density, generator = ctx.value("density"), layer_generator(ctx.value("seed"), ctx.target, ctx.device)
    return dense_then_svd(terms, ctx, lambda tensors, weights: dare_linear(tensors, weights, density, generator))


@register(
    "dare_ties", kind=ELEMENTWISE, params=RANK_PARAMS + (DARE_DENSITY, MAJORITY_SIGN, SEED),
    checks=(check_rank_rule,), description="DARE, then the TIES sign election, then truncated SVD",
    formula="the DARE pruning above, then the TIES sign election and disjoint mean; then truncated SVD",
    rank=_TRUNCATED, exact="no (random)", reference="DARE + TIES; PEFT `dare_ties_svd`")
def blend_dare_ties(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    density, sign = ctx.value("density"), ctx.value("majority_sign")
    generator = layer_generator(ctx.value("seed"), ctx.target, ctx.device)
    return dense_then_svd(terms, ctx, lambda tensors, weights: dare_ties(tensors, weights, density, sign, generator))
