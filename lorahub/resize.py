"""Re-rank a LoRA adapter: the best rank-r' approximation of every layer's delta, exactly.

For each layer ΔW = s·B·A (math view, conv flattened to (out, in·kh·kw)) the exact SVD of B·A comes
from QR of the factors (`lorahub.lowrank.factored_svd`, O((n + k)·r²), no dense n×k matrix). Keeping
the first r' singular triplets is the Eckart–Young optimum: no rank-r' matrix is closer to ΔW in
Frobenius (or spectral) norm.

Conventions (documented in docs/resize.md):

- **Scale kept, factors unscaled.** The SVD is of the unscaled B·A and the layer's scale s is kept by
  rescaling alpha: alpha' = s·r' (alpha·r'/r), rsLoRA alpha' = s·√r' (alpha·√(r'/r)). This is
  kohya's and PEFT's rule, so tools that read alpha/r keep working.
- **Balanced split** by default: B' = U·√Σ, A' = √Σ·Vᵀ (`split="up"`: B' = U·Σ, A' = Vᵀ, kohya).
- **Layers at or under the requested rank are kept exactly** (original tensors and alpha, no
  zero-padding).
- **Rank rules** are exact and minimal (`lorahub.lowrank.choose_rank`); `kohya_compat=True`
  reproduces kohya's one-too-many rule.
- **k×k convolutions** use `conv_rank` (default: `rank`); 1×1 convolutions count as linear layers.
- **Zero layers** (B·A = 0) become rank 1 with zero factors (ΔW stays exactly 0), reported as such.
- **DoRA** layers are refused: the delta is m·(W + sBA)/‖W + sBA‖ − W, so truncating BA is not an
  Eckart–Young problem and its error depends on the base weights.
- **LyCORIS** modules (LoHa, LoKr, ...) are refused.
- New factors are cast to each layer's stored dtype (or `out_dtype`); the SVD runs in `compute_dtype`
  (fp32 default; fp64 available) on `device`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .adapter import ST_DTYPES, Adapter, LoraLayer
from .devices import map_layers
from .errors import LorahubError, OptionError, UnsupportedError
from .formats import all_formats
from .lowrank import METHODS, SPLITS, _FactoredSVD, choose_rank, retention, split_factors


@dataclass
class LayerResize:
    """What happened to one layer."""

    target: str
    kind: str
    kernel: str  # "" for linear/embedding, "3x3" etc. for conv
    old_rank: int
    new_rank: int
    kept: bool  # original tensors kept unchanged (requested rank ≥ layer rank)
    zero: bool  # the layer's delta is exactly zero
    fro_retained: float
    energy_retained: float
    sum_retained: float
    max_dropped_ratio: float
    old_alpha: float
    new_alpha: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResizeReport:
    method: str
    param: float | None
    rank: int | None
    conv_rank: int | None
    kohya_compat: bool
    split: str
    layers: list[LayerResize] = field(default_factory=list)
    seconds: float = 0.0
    old_params: int = 0
    new_params: int = 0

    @property
    def mean_energy_retained(self) -> float:
        if not self.layers:
            return 1.0
        return sum(layer.energy_retained for layer in self.layers) / len(self.layers)

    @property
    def worst(self) -> LayerResize | None:
        return min(self.layers, key=lambda layer: layer.energy_retained, default=None)

    def summary(self) -> dict:
        worst = self.worst
        return {
            "layers": len(self.layers),
            "resized": sum(not layer.kept for layer in self.layers),
            "kept": sum(layer.kept for layer in self.layers),
            "zero": sum(layer.zero for layer in self.layers),
            "mean_energy_retained": self.mean_energy_retained,
            "mean_fro_retained": (sum(layer.fro_retained for layer in self.layers) / len(self.layers))
            if self.layers else 1.0,
            "worst_energy_retained": worst.energy_retained if worst else 1.0,
            "worst_layer": worst.target if worst else None,
            "old_params": self.old_params,
            "new_params": self.new_params,
            "seconds": self.seconds,
        }

    def as_dict(self) -> dict:
        return {
            "method": self.method, "param": self.param, "rank": self.rank, "conv_rank": self.conv_rank,
            "kohya_compat": self.kohya_compat, "split": self.split,
            "summary": self.summary(),
            "layers": [layer.as_dict() for layer in self.layers],
        }


def is_spatial_conv(layer: LoraLayer) -> bool:
    """A k×k convolution (any kernel dimension > 1); 1×1 convolutions count as linear layers."""
    return layer.is_spatial


def _kernel(layer: LoraLayer) -> str:
    return "x".join(str(d) for d in layer.kernel_size)


def _new_alpha(layer: LoraLayer, new_rank: int) -> float:
    scale = layer.scale
    return scale * math.sqrt(new_rank) if layer.use_rslora else scale * new_rank


def _stored_dtype(layer: LoraLayer, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    dtype = ST_DTYPES.get(layer.A.dtype, torch.float32)
    return dtype if dtype.is_floating_point else torch.float32


def _check_supported(adapter: Adapter) -> None:
    adapter.require_lora("resize")
    dora = [layer.target for layer in adapter.layers.values() if layer.is_dora]
    if dora:
        raise UnsupportedError(
            f"resize refuses DoRA layers ({len(dora)}, e.g. {dora[0]}): the DoRA delta "
            f"m·(W+sBA)/‖W+sBA‖ − W is not a low-rank product, so truncating BA is not optimal and "
            f"its error depends on the base weights", path=adapter.path)
    if not adapter.layers:
        raise LorahubError("adapter has no LoRA layers to resize", path=adapter.path)


def check_options(rank: int | None, method: str, param: float | None, conv_rank: int | None = None,
                  split: str = "balanced") -> None:
    """The options' own checks, before any layer is read: OptionError (a usage error, exit 2)."""
    if method not in METHODS:
        raise OptionError(f"unknown rank method '{method}' (choose from {', '.join(METHODS)})")
    if split not in SPLITS:
        raise OptionError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if method == "fixed" and param is not None:
        raise OptionError("--param goes with --rank-method sv_ratio|sv_fro|sv_cumulative")
    if method == "fixed" and rank is None:
        raise OptionError("give --rank (the new rank), or --rank-method with --param for dynamic ranks")
    if method != "fixed" and param is None:
        raise OptionError(f"--rank-method {method} needs --param")
    for name, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise OptionError(f"{name} must be at least 1, got {value}")
    if param is not None:
        # the rule's own parameter checks (sv_ratio: p ≥ 1; sv_fro, sv_cumulative: 0 < p ≤ 1)
        choose_rank(torch.ones(1), rank=rank or 1, method=method, param=param)


def resize_adapter(adapter: Adapter, *, rank: int | None = None, method: str = "fixed",
                   param: float | None = None, conv_rank: int | None = None, kohya_compat: bool = False,
                   split: str = "balanced", device: torch.device | str | None = None,
                   compute_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None,
                   progress: Callable[[int], None] | None = None,
                   workers: int | None = None) -> tuple[Adapter, ResizeReport]:
    """A resized copy of `adapter` and the per-layer report.

    `rank`: the new rank (method "fixed") or the cap (dynamic methods; None = no cap beyond the
    layer's own rank). `conv_rank`: the same for k×k convolutions (default: `rank`). `param`: the
    dynamic rule's parameter (sv_ratio: p ≥ 1; sv_fro, sv_cumulative: 0 < p ≤ 1).

    On the CPU, layers are processed by `workers` threads (default: torch's intra-op thread count)
    with torch's own intra-op threading set to 1 for the duration (restored afterwards): the
    per-layer operations are small (QR of n×r, an r×r SVD) and gain little from intra-op threads,
    while OpenMP's barriers made them 10–100× slower when the CPU was shared with other processes.
    `workers=0` leaves torch's threading alone and runs the layers one by one.
    """
    check_options(rank, method, param, conv_rank, split)
    _check_supported(adapter)
    conv_cap = conv_rank if conv_rank is not None else rank
    report = ResizeReport(method=method, param=param, rank=rank, conv_rank=conv_cap,
                          kohya_compat=kohya_compat, split=split)
    start = time.perf_counter()

    def one(item: tuple[str, LoraLayer]) -> tuple[LoraLayer, LayerResize]:
        target, layer = item
        cap = conv_cap if is_spatial_conv(layer) else rank
        if method == "fixed" and not kohya_compat and cap >= layer.rank:
            # nothing to truncate: keep the tensors untouched, skip the SVD
            return layer, LayerResize(
                target=target, kind=layer.kind, kernel=_kernel(layer), old_rank=layer.rank,
                new_rank=layer.rank, kept=True, zero=False, fro_retained=1.0, energy_retained=1.0,
                sum_retained=1.0, max_dropped_ratio=0.0, old_alpha=layer.alpha, new_alpha=layer.alpha)
        up, down = layer.factors(device=device, dtype=compute_dtype)
        decomposition = _FactoredSVD(up, down, compute_dtype, device)  # S now, vectors on demand
        S = decomposition.S
        if kohya_compat:
            # kohya clamps against the full spectrum of the dense matrix, length min(n, k)
            full = min(layer.out_features, layer.in_features)
            S_rule = torch.cat([S.cpu(), S.new_zeros(full - S.shape[0], device="cpu")])
        else:
            S_rule = S
        chosen = choose_rank(S_rule, rank=cap, method=method, param=param, kohya_compat=kohya_compat)
        zero = not bool((S > 0).any())
        if chosen >= layer.rank and not zero:
            new_layer = layer
            entry = dict(new_rank=layer.rank, kept=True, new_alpha=layer.alpha, stats=retention(S, layer.rank))
        else:
            new_rank = max(1, chosen)
            # chosen ≤ q = min(r, n, k) (choose_rank never exceeds len(S)), so no zero-padding
            new_up, new_down = split_factors(decomposition.svd(keep=new_rank), new_rank, split)
            dtype = _stored_dtype(layer, out_dtype)
            alpha = _new_alpha(layer, new_rank)
            new_layer = layer.with_factors(new_up.to(device="cpu", dtype=dtype),
                                           new_down.to(device="cpu", dtype=dtype), alpha=alpha)
            entry = dict(new_rank=new_rank, kept=False, new_alpha=alpha, stats=retention(S, new_rank))
        stats = entry.pop("stats")
        return new_layer, LayerResize(target=target, kind=layer.kind, kernel=_kernel(layer),
                                      old_rank=layer.rank, zero=zero, old_alpha=layer.alpha, **entry, **stats)

    new_layers: dict[str, LoraLayer] = {}
    for new_layer, entry in map_layers(one, list(adapter.layers.items()), device=device, workers=workers,
                                             name="lorahub-resize"):
        new_layers[entry.target] = new_layer
        report.layers.append(entry)
        if progress:
            progress(1)
    report.seconds = time.perf_counter() - start
    out = Adapter(path=adapter.path, format=adapter.format, layers=new_layers,
                  full_tensors=dict(adapter.full_tensors), base_model=adapter.base_model,
                  config=dict(adapter.config), metadata=_resized_metadata(adapter, report),
                  files=list(adapter.files), other_modules=dict(adapter.other_modules),
                  extra_keys=list(adapter.extra_keys))
    report.old_params = adapter.num_params
    report.new_params = out.num_params
    return out, report


def _resized_metadata(adapter: Adapter, report: ResizeReport) -> dict[str, str]:
    """Each format edits the metadata keys it owns (kohya's training comment and network args)."""
    metadata = dict(adapter.metadata)
    for fmt in all_formats():
        if fmt.on_resize is not None:
            metadata = fmt.on_resize(metadata, report)
    return metadata


def layer_spectra(adapter: Adapter, *, device: torch.device | str | None = None,
                  compute_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """target → singular values (descending, float32 on the CPU) of the layer's scaled delta s·B·A.

    Length min(r, n, k) per layer (the rest of the spectrum is exactly zero). For DoRA layers this is
    the spectrum of s·B·A only (the magnitude rescaling is not included). LyCORIS modules are skipped
    (they are not in `adapter.layers`).
    """
    out: dict[str, torch.Tensor] = {}
    for target, layer in adapter.layers.items():
        up, down = layer.factors(device=device, dtype=compute_dtype)
        S = _FactoredSVD(up, down, compute_dtype, device).S
        out[target] = (S * abs(layer.scale)).to(device="cpu", dtype=torch.float32)
    return out
