"""Combining adapters: weighted sums of LoRA deltas, exact where the math allows.

For adapters i = 1…N with weights wᵢ and per-layer scales sᵢ (alpha/r, or alpha/√r with rsLoRA), the
exact combination of one layer is the sum of products

    ΔW = Σᵢ cᵢ·Bᵢ·Aᵢ,    cᵢ = wᵢ·sᵢ,

which is what applying the adapters together does at inference. Methods (a registry: name → one
function per layer; docs/blend.md has the formulas):

| method          | result                                                              | dense?  |
| cat             | B = [√|c₁|B₁ | …], A = [sgn(c₁)√|c₁|A₁; …]: exact, rank Σrᵢ           | never   |
| svd (default)   | best rank-r approximation of the exact sum, by the factored SVD     | never   |
| linear          | PEFT's factor-space sum (Σ√|cᵢ|Bᵢ)(Σ sgn(cᵢ)√|cᵢ|Aᵢ): approximate   | never   |
| ties, dare_*, magnitude_prune | PEFT merge_utils on the dense ΔWᵢ = sᵢBᵢAᵢ, then truncated SVD | per layer |

Every output layer has scale 1 (alpha = rank, use_rslora = False): the combined coefficients are
folded into the factors, so formats and loaders that disagree on rsLoRA or patterns cannot rescale it.
A module missing from an adapter contributes zero. Adapters for different bases, different layer
kinds on one module, DoRA and LyCORIS are refused; full replacement tensors (modules_to_save) pass through only when every
adapter carries the identical tensor (else refused, or left out on request).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .adapter import ST_DTYPES, Adapter, LazyTensor, LoraLayer
from .devices import map_layers, resolve_device
from .errors import LorahubError, UnsupportedError
from .lowrank import LowRankSVD, choose_rank, factored_svd_sum, retention, split_factors

METHODS = ("svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ELEMENTWISE = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
RANK_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
MAJORITY_SIGN = ("total", "frequency")
# a layer whose exact sum is below this fraction of Σ|cᵢ|·‖Bᵢ‖·‖Aᵢ‖ cancelled out (A − A): fp32 SVD
# of such a sum is rounding noise, so the layer is dropped instead of written as noise
CANCEL_TOLERANCE = 1e-5
BASE_METADATA = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_sd_model_name", "ss_sd_model_hash",
                 "ss_new_sd_model_hash", "modelspec.sai_model_spec", "modelspec.architecture",
                 "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type",
                 "lorahub.component")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BlendOptions:
    method: str = "svd"
    rank: int | None = None  # svd / element-wise: target rank (cap for dynamic rank methods)
    rank_method: str = "fixed"  # fixed | sv_ratio | sv_fro | sv_cumulative
    param: float | None = None  # parameter of the dynamic rank method
    kohya_compat: bool = False  # kohya's +1 dynamic-rank rule
    density: float | None = None  # element-wise methods: fraction of entries kept
    majority_sign: str = "total"  # ties / dare_ties sign election
    seed: int = 0  # DARE masks
    split: str = "balanced"  # how S is split between the factors after an SVD (balanced | up | down)
    device: str | None = None  # None: CUDA when available, else CPU
    dtype: str | None = None  # output factor dtype; None: the first adapter's stored dtype
    allow_base_mismatch: bool = False  # base *names* differ (shapes are always checked)
    drop_full_tensors: bool = False  # leave out modules_to_save copies instead of refusing
    workers: int | None = None  # layers processed side by side (None: CPU threads for factored methods)


@dataclass
class LayerReport:
    target: str
    kind: str
    shape: tuple[int, int]  # (n, k) of the math view
    sources: list[int]  # indices of the adapters that have this module
    input_ranks: list[int]
    rank: int  # written rank (0: dropped)
    energy_retained: float | None  # ‖kept S‖²/‖S‖² of the spectrum that was truncated (None: no SVD)
    fro_retained: float | None
    rel_error: float  # ‖written − exact weighted sum‖_F / ‖exact weighted sum‖_F
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "kind": self.kind, "shape": list(self.shape), "sources": self.sources,
            "input_ranks": self.input_ranks, "rank": self.rank, "energy_retained": self.energy_retained,
            "fro_retained": self.fro_retained, "rel_error": self.rel_error, "note": self.note,
        }


@dataclass
class BlendReport:
    method: str
    weights: list[float]
    sources: list[str]
    device: str
    layers: list[LayerReport] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    dropped_full_tensors: list[str] = field(default_factory=list)

    @property
    def written(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank > 0]

    def summary(self) -> dict[str, Any]:
        written = self.written
        energies = [layer.energy_retained for layer in written if layer.energy_retained is not None]
        errors = [layer.rel_error for layer in written if not math.isnan(layer.rel_error)]
        ranks = [layer.rank for layer in written]
        return {
            "layers": len(written),
            "dropped": [layer.target for layer in self.layers if layer.rank == 0],
            "rank_min": min(ranks) if ranks else 0,
            "rank_max": max(ranks) if ranks else 0,
            "energy_retained_min": min(energies) if energies else None,
            "energy_retained_mean": sum(energies) / len(energies) if energies else None,
            "rel_error_max": max(errors) if errors else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "weights": self.weights, "sources": self.sources,
                "device": self.device, "options": self.options, "summary": self.summary(),
                "dropped_full_tensors": self.dropped_full_tensors,
                "layers": [layer.to_dict() for layer in self.layers]}


@dataclass
class BlendResult:
    adapter: Adapter
    report: BlendReport


@dataclass
class Term:
    """One adapter's contribution to one layer: ΔWᵢ = scale·up·down, weighted by `weight`."""

    index: int  # which adapter
    weight: float
    scale: float
    up: Tensor  # n×r, unscaled, fp32 on the compute device
    down: Tensor  # r×k
    bias: Tensor | None  # lora_B bias (added to the base bias as scale·bias)

    @property
    def coeff(self) -> float:
        return self.weight * self.scale

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LayerResult:
    up: Tensor | None  # None: nothing to write (cancelled / all-zero)
    down: Tensor | None
    bias: Tensor | None
    energy_retained: float | None = None
    fro_retained: float | None = None
    rel_error: float = 0.0
    note: str = ""


@dataclass
class LayerContext:
    target: str
    options: BlendOptions
    device: torch.device
    default_rank: int  # the largest input rank over all adapters and layers


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


def _relative_error(exact: Sequence[Term], up: Tensor | None, down: Tensor | None) -> float:
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


def _exact_bias(terms: Sequence[Term]) -> Tensor | None:
    present = [t for t in terms if t.bias is not None]
    if not present:
        return None
    return sum(t.coeff * t.bias for t in present)


def _cancel_bound(terms: Sequence[Term]) -> float:
    """Σ|cᵢ|·‖Bᵢ‖·‖Aᵢ‖ ≥ ‖Σ cᵢBᵢAᵢ‖: the size a sum could have had."""
    return sum(abs(t.coeff) * float(torch.linalg.matrix_norm(t.up)) * float(torch.linalg.matrix_norm(t.down))
               for t in terms)


def _target_rank(ctx: LayerContext) -> int | None:
    """The rank cap: --rank, else the largest input rank for a fixed rank (None: no cap, dynamic)."""
    if ctx.options.rank is not None:
        return ctx.options.rank
    return ctx.default_rank if ctx.options.rank_method == "fixed" else None


def _truncate(svd: LowRankSVD, ctx: LayerContext, bound: float) -> tuple[Tensor | None, Tensor | None, dict, str]:
    """Pick the rank by the options' rule and split S between the factors."""
    total = float(torch.linalg.vector_norm(svd.S.double())) if svd.S.numel() else 0.0
    if total <= CANCEL_TOLERANCE * bound or total == 0.0:
        return None, None, {"energy_retained": 1.0, "fro_retained": 1.0}, "cancelled (sum is zero)"
    opts = ctx.options
    cap = _target_rank(ctx)
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


# ----------------------------------------------------------------------------------------------
# methods, one function per layer

def _nonzero(terms: Sequence[Term]) -> list[Term]:
    return [t for t in terms if t.coeff != 0.0]


def blend_cat(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    """Exact: B = [√|c₁|B₁ | √|c₂|B₂ | …], A = [sgn(c₁)√|c₁|A₁; …], rank Σrᵢ (zero weights omitted)."""
    live = _nonzero(terms)
    bias = _exact_bias(terms)
    if not live:
        return LayerResult(None, None, bias, 1.0, 1.0, 0.0, "all weights zero")
    ups, downs = [], []
    for term in live:
        root = math.sqrt(abs(term.coeff))
        ups.append(term.up * root)
        downs.append(term.down * (math.copysign(root, term.coeff)))
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    return LayerResult(up, down, bias, 1.0, 1.0, _relative_error(terms, up, down))


def blend_svd(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    """The best rank-r approximation of Σ cᵢBᵢAᵢ through the exact factored SVD (never dense)."""
    live = _nonzero(terms)
    bias = _exact_bias(terms)
    if not live:
        return LayerResult(None, None, bias, 1.0, 1.0, 0.0, "all weights zero")
    svd = factored_svd_sum([(t.coeff, t.up, t.down) for t in live], compute_dtype=torch.float32,
                           device=ctx.device)
    up, down, kept, note = _truncate(svd, ctx, _cancel_bound(live))
    # Eckart–Young: the error of the optimal truncation is the dropped part of the spectrum
    rel_error = math.sqrt(max(0.0, 1.0 - kept["energy_retained"])) if up is not None else (
        0.0 if note.startswith("cancelled") else 1.0)
    return LayerResult(up, down, bias, kept["energy_retained"], kept["fro_retained"], rel_error, note)


def blend_linear(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    """PEFT `linear`: B = Σ√|cᵢ|Bᵢ, A = Σ sgn(cᵢ)√|cᵢ|Aᵢ — a product of sums, with cross terms BᵢAⱼ."""
    ranks = sorted({t.rank for t in terms})
    if len(ranks) > 1:
        raise LorahubError(
            f"method 'linear' (PEFT's factor-space sum) needs equal ranks on each module, "
            f"'{ctx.target}' has ranks {', '.join(str(t.rank) for t in terms)}; use --method svd or cat "
            f"(exact for any ranks)")
    up = sum(math.sqrt(abs(t.coeff)) * t.up for t in terms)
    down = sum(math.copysign(math.sqrt(abs(t.coeff)), t.coeff) * t.down for t in terms)
    bias = _exact_bias(terms)
    if all(t.coeff == 0.0 for t in terms):
        return LayerResult(None, None, bias, None, None, 0.0, "all weights zero")
    return LayerResult(up, down, bias, None, None, _relative_error(terms, up, down),
                       "approximate: factor-space sum" if len(terms) > 1 else "")


# PEFT merge_utils, reimplemented exactly (peft is not a runtime dependency), on dense tensors
# stacked on dim 0; `weights` is a 1-D tensor of the same length

def magnitude_based_pruning(tensor: Tensor, density: float) -> Tensor:
    """Keep the top int(density·numel) entries by absolute value, zero the rest."""
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: Tensor, density: float, rescale: bool, generator: torch.Generator) -> Tensor:
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


def merge_elementwise(method: str, tensors: list[Tensor], weights: Tensor, *, density: float,
                      majority_sign: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """PEFT's `magnitude_prune`, `ties`, `dare_linear`, `dare_ties` (peft.utils.merge_utils)."""
    if method in ("ties", "magnitude_prune"):
        pruned = torch.stack([prune(t, density, "magnitude") for t in tensors], dim=0)
    elif method in ("dare_linear", "dare_ties"):
        pruned = torch.stack([prune(t, density, "random", rescale=True, generator=generator)
                              for t in tensors], dim=0)
    else:
        raise LorahubError(f"unknown element-wise method {method!r}")
    if method in ("ties", "dare_ties"):
        mask = majority_sign_mask(pruned, majority_sign)  # elected from the unweighted tensors
        return disjoint_merge(_weighted(pruned, weights), mask)
    return _weighted(pruned, weights).sum(dim=0)


def _layer_generator(seed: int, target: str, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, module name): masks do not depend on layer order."""
    digest = hashlib.sha256(f"{seed}:{target}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def blend_elementwise(terms: Sequence[Term], ctx: LayerContext) -> LayerResult:
    """Element-wise merge of the dense ΔWᵢ = sᵢBᵢAᵢ (the only dense path), then truncated SVD."""
    opts = ctx.options
    deltas = [(t.up * t.scale) @ t.down for t in terms]
    weights = torch.tensor([t.weight for t in terms], dtype=torch.float32, device=ctx.device)
    generator = _layer_generator(opts.seed, ctx.target, ctx.device) if opts.method.startswith("dare") else None
    merged = merge_elementwise(opts.method, deltas, weights, density=opts.density,
                               majority_sign=opts.majority_sign, generator=generator)
    bias = None
    if any(t.bias is not None for t in terms):
        biases = [t.scale * t.bias if t.bias is not None else torch.zeros_like(merged[:, 0]) for t in terms]
        bias = merge_elementwise(opts.method, biases, weights, density=opts.density,
                                 majority_sign=opts.majority_sign, generator=generator)
    del deltas
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    up, down, kept, note = _truncate(LowRankSVD(U, S, Vh), ctx, _cancel_bound(terms))
    if up is None and float(merged.abs().max()) == 0.0:
        note = "pruned to zero"
    exact = sum(t.coeff * (t.up @ t.down) for t in terms)
    exact_norm = float(torch.linalg.matrix_norm(exact))
    written = (up @ down) if up is not None else torch.zeros_like(exact)
    rel_error = float(torch.linalg.matrix_norm(written - exact)) / exact_norm if exact_norm else 0.0
    return LayerResult(up, down, bias, kept["energy_retained"], kept["fro_retained"], rel_error, note)


LAYER_METHODS: dict[str, Callable[[Sequence[Term], LayerContext], LayerResult]] = {
    "cat": blend_cat,
    "svd": blend_svd,
    "linear": blend_linear,
    "ties": blend_elementwise,
    "dare_linear": blend_elementwise,
    "dare_ties": blend_elementwise,
    "magnitude_prune": blend_elementwise,
}


# ----------------------------------------------------------------------------------------------
# checks

def _base_key(name: str | None) -> str | None:
    """A base model name compared loosely: the last two path parts, lower case ('org/model')."""
    if not name:
        return None
    parts = [p for p in str(name).replace("\\", "/").rstrip("/").split("/") if p]
    return "/".join(parts[-2:]).lower() if parts else None


def check_compatible(adapters: Sequence[Adapter], *, allow_base_mismatch: bool = False) -> None:
    """Refuse inputs whose deltas cannot be added: raise LorahubError naming the file and module."""
    for adapter in adapters:
        adapter.require_lora("blend")
        dora = [t for t, layer in adapter.layers.items() if layer.is_dora]
        if dora:
            raise UnsupportedError(
                f"DoRA adapter ({len(dora)} modules with a magnitude vector, e.g. '{dora[0]}'): a DoRA delta "
                f"is m·(W+sBA)/‖W+sBA‖ − W, which depends on the base and is not additive, so a weighted "
                f"sum of DoRA adapters is not a DoRA adapter; blend refuses it", path=adapter.path)
        if not adapter.layers:
            raise LorahubError("adapter has no LoRA layers", path=adapter.path)
    seen: dict[str, tuple[Adapter, LoraLayer]] = {}
    for adapter in adapters:
        for target, layer in adapter.layers.items():
            if target not in seen:
                seen[target] = (adapter, layer)
                continue
            first_adapter, first = seen[target]
            if (first.kind, first.fan_in_fan_out) != (layer.kind, layer.fan_in_fan_out):
                def describe(x: LoraLayer) -> str:
                    return x.kind + (" (Conv1D, fan_in_fan_out)" if x.fan_in_fan_out else "")
                raise LorahubError(f"module '{target}' is a {describe(first)} layer in {first_adapter.name} "
                                   f"but a {describe(layer)} layer in {adapter.name}; blend refuses "
                                   f"different layer kinds on one module", path=adapter.path)
            if first.base_shape != layer.base_shape:
                raise LorahubError(
                    f"module '{target}' adapts a {list(first.base_shape)} weight in {first_adapter.name} but a "
                    f"{list(layer.base_shape)} weight in {adapter.name}: the adapters are for different base "
                    f"models", path=adapter.path)
    if not allow_base_mismatch:
        named = [(a, _base_key(a.base_model)) for a in adapters if _base_key(a.base_model)]
        if len({key for _, key in named}) > 1:
            listing = ", ".join(f"{a.name}: {a.base_model}" for a, _ in named)
            raise LorahubError(f"adapters are for different base models ({listing}); pass "
                               f"--allow-base-mismatch if these names are the same weights")


def shared_full_tensors(adapters: Sequence[Adapter], *, drop: bool = False) -> tuple[dict[str, LazyTensor], list[str]]:
    """Full replacement tensors (modules_to_save, saved embeddings) the output can carry: (kept, dropped).

    A replacement cannot be weighted without the base weights. Identical copies in every adapter
    (PEFT saves the unchanged base embedding of a targeted embedding layer) pass through; anything
    else is refused unless `drop`.
    """
    names = sorted({name for adapter in adapters for name in adapter.full_tensors})
    if not names:
        return {}, []
    if drop:
        return {}, names
    first = adapters[0]
    for name in names:
        holders = [a for a in adapters if name in a.full_tensors]
        if len(holders) != len(adapters):
            missing = next(a for a in adapters if name not in a.full_tensors)
            raise UnsupportedError(
                f"'{name}' is a full replacement tensor (modules_to_save) in {holders[0].name} but not in "
                f"{missing.name}; a replacement cannot be weighted without the base weights. Pass "
                f"--drop-full-tensors to leave it out")
        reference = first.full_tensors[name].load()
        for other in adapters[1:]:
            if not torch.equal(reference, other.full_tensors[name].load()):
                raise UnsupportedError(
                    f"'{name}' is a full replacement tensor (modules_to_save) that differs between "
                    f"{first.name} and {other.name}; replacements cannot be weighted without the base "
                    f"weights. Pass --drop-full-tensors to leave it out")
    return {name: first.full_tensors[name] for name in names}, []


def _check_options(opts: BlendOptions, n_adapters: int, n_weights: int) -> None:
    if opts.method not in LAYER_METHODS:
        raise LorahubError(f"unknown method {opts.method!r}; choose one of {', '.join(METHODS)}")
    if n_adapters < 1:
        raise LorahubError("blend needs at least one adapter")
    if n_weights != n_adapters:
        raise LorahubError(f"{n_adapters} adapters but {n_weights} weights; give one weight per adapter")
    if opts.rank is not None and opts.rank < 1:
        raise LorahubError(f"--rank must be ≥ 1, got {opts.rank}")
    if opts.rank_method not in RANK_METHODS:
        raise LorahubError(f"unknown rank method {opts.rank_method!r}; choose one of {', '.join(RANK_METHODS)}")
    truncating = opts.method == "svd" or opts.method in ELEMENTWISE
    if opts.rank_method != "fixed" and not truncating:
        raise LorahubError(f"--rank-method applies to svd and the element-wise methods, not {opts.method}")
    if opts.rank is not None and not truncating:
        raise LorahubError(f"--rank applies to svd and the element-wise methods; {opts.method} has rank "
                           f"{'Σrᵢ' if opts.method == 'cat' else 'r (the inputs’ rank)'}")
    if opts.rank_method != "fixed":
        if opts.param is None:
            raise LorahubError(f"--rank-method {opts.rank_method} needs --param")
        # the rule's own parameter checks, once, before any layer is read
        choose_rank(torch.ones(1), rank=opts.rank or 1, method=opts.rank_method, param=opts.param)
    elif opts.param is not None:
        raise LorahubError("--param goes with --rank-method sv_ratio|sv_fro|sv_cumulative")
    if opts.method in ELEMENTWISE:
        if opts.density is None:
            raise LorahubError(f"method {opts.method} needs --density (fraction of entries kept, 0–1)")
        if not 0.0 <= opts.density <= 1.0:
            raise LorahubError(f"--density must be in [0, 1], got {opts.density}")
        if opts.method.startswith("dare") and opts.density == 0.0:
            raise LorahubError("DARE divides by --density; it must be > 0")
    elif opts.density is not None:
        raise LorahubError(f"--density applies to ties, dare_linear, dare_ties, magnitude_prune, not {opts.method}")
    if opts.majority_sign not in MAJORITY_SIGN:
        raise LorahubError(f"--majority-sign must be total or frequency, got {opts.majority_sign!r}")
    if opts.split not in ("balanced", "up", "down"):
        raise LorahubError(f"--split must be balanced, up or down, got {opts.split!r}")
    if opts.dtype is not None and opts.dtype not in OUTPUT_DTYPES:
        raise LorahubError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {opts.dtype!r}")


def _output_dtype(adapters: Sequence[Adapter], opts: BlendOptions) -> torch.dtype:
    if opts.dtype is not None:
        return OUTPUT_DTYPES[opts.dtype]
    first = next(iter(adapters[0].layers.values()))
    dtype = ST_DTYPES.get(first.B.dtype, torch.float32)
    return dtype if dtype in OUTPUT_DTYPES.values() or dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# the operation

def blend(adapters: Sequence[Adapter], weights: Sequence[float], options: BlendOptions | None = None, *,
          to: str | None = None, progress: Callable[[], None] | None = None,
          **kwargs: Any) -> BlendResult:
    """Combine adapters with weights; return the new in-memory adapter and a per-layer report.

    `options` (or keyword arguments with the same names) choose the method and its parameters.
    The output follows the first adapter's format unless `to` names another.
    """
    opts = replace(options or BlendOptions(), **kwargs)
    weights = [float(w) for w in weights]
    _check_options(opts, len(adapters), len(weights))
    if not all(math.isfinite(w) for w in weights):
        raise LorahubError(f"weights must be finite numbers, got {weights}")
    check_compatible(adapters, allow_base_mismatch=opts.allow_base_mismatch)
    full_tensors, dropped_full = shared_full_tensors(adapters, drop=opts.drop_full_tensors)
    device = resolve_device(opts.device)
    out_dtype = _output_dtype(adapters, opts)
    default_rank = max(layer.rank for adapter in adapters for layer in adapter.layers.values())
    layer_method = LAYER_METHODS[opts.method]

    # the union of modules, in first-seen order (the first adapter's order, then new ones)
    targets = list(dict.fromkeys(t for adapter in adapters for t in adapter.layers))
    report = BlendReport(method=opts.method, weights=weights,
                         sources=[str(a.path) if a.path else a.name for a in adapters], device=str(device),
                         options=_options_dict(opts), dropped_full_tensors=dropped_full)
    def one_layer(target: str) -> tuple[LayerReport, LoraLayer | None]:
        present = [(i, a.layers[target]) for i, a in enumerate(adapters) if target in a.layers]
        template = present[0][1]
        terms = []
        for i, layer in present:
            up, down = layer.factors(device=device, dtype=torch.float32)
            bias = layer.bias.load().to(device=device, dtype=torch.float32) if layer.bias is not None else None
            terms.append(Term(index=i, weight=weights[i], scale=layer.scale, up=up, down=down, bias=bias))
        ctx = LayerContext(target=target, options=opts, device=device, default_rank=default_rank)
        result = layer_method(terms, ctx)
        rank = 0 if result.up is None else int(result.down.shape[0])
        entry = LayerReport(
            target=target, kind=template.kind, shape=(template.out_features, template.in_features),
            sources=[i for i, _ in present], input_ranks=[layer.rank for _, layer in present], rank=rank,
            energy_retained=result.energy_retained, fro_retained=result.fro_retained,
            rel_error=result.rel_error, note=result.note)
        if not rank:
            return entry, None
        new = template.with_factors(result.up.to(device="cpu", dtype=out_dtype),
                                    result.down.to(device="cpu", dtype=out_dtype),
                                    alpha=float(rank), use_rslora=False)
        bias = None if result.bias is None else LazyTensor.of(result.bias.to(device="cpu", dtype=out_dtype))
        return entry, replace(new, magnitude=None, bias=bias)

    layers: dict[str, LoraLayer] = {}
    for entry, layer in map_layers(one_layer, targets, device=device, workers=opts.workers,
                                   parallel=opts.method not in ELEMENTWISE, name="lorahub-blend"):
        report.layers.append(entry)
        if layer is not None:
            layers[entry.target] = layer
        if progress is not None:
            progress()
    if not layers:
        raise LorahubError("the blend is zero on every module (weights cancel or are all zero); nothing to write")

    first = adapters[0]
    config = dict(first.config)
    for key in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora"):
        config.pop(key, None)
    # keep what describes the base; the training metadata of one input does not describe the blend
    metadata = {k: v for k, v in first.metadata.items() if k in BASE_METADATA}
    metadata["lorahub.blend"] = _provenance(report)
    out = Adapter(path=None, format=to or first.format, layers=layers, full_tensors=full_tensors,
                  base_model=first.base_model, config=config, metadata=metadata, files=[])
    return BlendResult(adapter=out, report=report)


def interpolate(a: Adapter, b: Adapter, t: float, options: BlendOptions | None = None, **kwargs: Any) -> BlendResult:
    """(1 − t)·A + t·B, exactly with the default method `cat` (any other method via options)."""
    if not math.isfinite(float(t)):
        raise LorahubError(f"t must be a finite number, got {t}")
    opts = options or BlendOptions(method="cat")
    return blend([a, b], [1.0 - float(t), float(t)], opts, **kwargs)


def _options_dict(opts: BlendOptions) -> dict[str, Any]:
    out: dict[str, Any] = {"method": opts.method}
    if opts.method == "svd" or opts.method in ELEMENTWISE:
        out.update(rank=opts.rank, rank_method=opts.rank_method, split=opts.split)
        if opts.rank_method != "fixed":
            out.update(param=opts.param, kohya_compat=opts.kohya_compat)
    if opts.method in ELEMENTWISE:
        out.update(density=opts.density)
        if opts.method in ("ties", "dare_ties"):
            out.update(majority_sign=opts.majority_sign)
        if opts.method.startswith("dare"):
            out.update(seed=opts.seed)
    return out


def _provenance(report: BlendReport) -> str:
    import json

    return json.dumps({"method": report.method, "weights": report.weights, "options": report.options,
                       "sources": report.sources}, sort_keys=True)


def parse_weights(text: str) -> list[float]:
    """'0.7,0.3' → [0.7, 0.3]; negatives allowed ('1,-0.5')."""
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise LorahubError(f"--weights must be comma-separated numbers like 0.7,0.3, got {text!r}") from None
    if not values:
        raise LorahubError("--weights is empty")
    return values
