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
- **LyCORIS** layers (LoHa, LoKr, LoCon-Tucker, full) are resized through their exact LoRA
  factorisation (`lorahub.lycoris`): the result is the Eckart–Young optimum of their true ΔW.
  Flattened LoHa/LoKr factors need the base (`lycoris.resolve_with_base`) to know their kernel.
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
from .batches import plan_batches, prefetched, stack_factors, to_cpu
from .devices import default_workers, map_layers
from .errors import LorahubError, OptionError, UnsupportedError
from .formats import all_formats
from .lowrank import (
    METHODS,
    SPLITS,
    BatchedFactoredSVD,
    _FactoredSVD,
    choose_rank,
    retention,
    retention_batched,
    split_factors,
    split_factors_batched,
)
from .lycoris import require_resolved


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
    require_resolved(adapter.layers, "resize", adapter.path)
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
                   workers: int | None = None, batch_size: int | None = None) -> tuple[Adapter, ResizeReport]:
    """A resized copy of `adapter` and the per-layer report.

    `rank`: the new rank (method "fixed") or the cap (dynamic methods; None = no cap beyond the
    layer's own rank). `conv_rank`: the same for k×k convolutions (default: `rank`). `param`: the
    dynamic rule's parameter (sv_ratio: p ≥ 1; sv_fro, sv_cumulative: 0 < p ≤ 1).

    Layers of one shape (n, k, r) and dtype are decomposed together, `batch_size` at a time
    (`lowrank.BatchedFactoredSVD`; default `plan_batches`' sizes; 1 = one layer at a time through
    `factored_svd`'s code path). On a GPU a batch is one chain of batched kernels, the next batch's
    factors copied in while the current one computes. On the CPU, batches are processed by `workers`
    threads (default: torch's intra-op thread count) with torch's own intra-op threading set to 1 for
    the duration (restored afterwards): the per-layer operations are small (QR of n×r, an r×r SVD)
    and gain little from intra-op threads, while OpenMP's barriers made them 10–100× slower when the
    CPU was shared with other processes. `workers=0` leaves torch's threading alone and runs the
    batches one by one.
    """
    check_options(rank, method, param, conv_rank, split)
    _check_supported(adapter)
    conv_cap = conv_rank if conv_rank is not None else rank
    report = ResizeReport(method=method, param=param, rank=rank, conv_rank=conv_cap,
                          kohya_compat=kohya_compat, split=split)
    start = time.perf_counter()
    on_cpu = device is None or torch.device(device).type == "cpu"

    def decide(layer: LoraLayer, chosen: int, zero: bool) -> int | None:
        """The new rank, or None to keep the layer as it is."""
        if chosen >= layer.rank and not zero:
            return None
        # chosen ≤ q = min(r, n, k) (choose_rank never exceeds len(S)), so no zero-padding
        return max(1, chosen)

    def chosen_rank(layer: LoraLayer, S: torch.Tensor, cap: int | None) -> int:
        if kohya_compat:
            # kohya clamps against the full spectrum of the dense matrix, length min(n, k)
            full = min(layer.out_features, layer.in_features)
            S = torch.cat([S.cpu(), S.new_zeros(full - S.shape[0], device="cpu")])
        return choose_rank(S, rank=cap, method=method, param=param, kohya_compat=kohya_compat)

    def entry(target: str, layer: LoraLayer, new_rank: int | None, zero: bool, stats: dict,
              up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> tuple[LoraLayer, LayerResize]:
        """The resized layer (from its new factors, already on the CPU in the stored dtype) and its report."""
        if new_rank is None or up is None or down is None:
            new_layer, new_alpha, kept_rank = layer, layer.alpha, layer.rank
        else:
            new_alpha, kept_rank = _new_alpha(layer, new_rank), new_rank
            new_layer = layer.with_factors(up, down, alpha=new_alpha)
        return new_layer, LayerResize(
            target=target, kind=layer.kind, kernel=_kernel(layer), old_rank=layer.rank, new_rank=kept_rank,
            kept=new_rank is None, zero=zero, old_alpha=layer.alpha, new_alpha=new_alpha, **stats)

    def one(item: tuple[str, LoraLayer, int | None]) -> list[tuple[LoraLayer, LayerResize]]:
        """One layer on its own (batch_size=1): `factored_svd`'s code path."""
        target, layer, cap = item
        up, down = layer.factors(device=device, dtype=compute_dtype)
        decomposition = _FactoredSVD(up, down, compute_dtype, device)  # S now, vectors on demand
        S = decomposition.S
        zero = not bool((S > 0).any())
        new_rank = decide(layer, chosen_rank(layer, S, cap), zero)
        if new_rank is None:
            return [entry(target, layer, None, zero, retention(S, layer.rank))]
        new_up, new_down = split_factors(decomposition.svd(keep=new_rank), new_rank, split)
        dtype = _stored_dtype(layer, out_dtype)
        return [entry(target, layer, new_rank, zero, retention(S, new_rank), new_up.to(device="cpu", dtype=dtype),
                      new_down.to(device="cpu", dtype=dtype))]

    def load(batch: list[tuple[str, LoraLayer, int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        layers = [layer for _, layer, _ in batch]
        n, k, r = layers[0].out_features, layers[0].in_features, layers[0].rank
        return (stack_factors([layer.B for layer in layers], (n, r), device=device, dtype=compute_dtype),
                stack_factors([layer.A for layer in layers], (r, k), device=device, dtype=compute_dtype))

    def compute(batch: list[tuple[str, LoraLayer, int | None]], ups: torch.Tensor,
                downs: torch.Tensor) -> list[tuple[LoraLayer, LayerResize]]:
        decomposition = BatchedFactoredSVD(ups, downs, compute_dtype=compute_dtype, device=device,
                                           names=[target for target, _, _ in batch])
        spectra = decomposition.S.cpu()  # the rank rules run on the CPU: one copy for the batch
        q = spectra.shape[1]
        zeros = (~(spectra > 0).any(dim=1)).tolist()
        if method == "fixed" and not kohya_compat:  # choose_rank's fixed rule, for the whole batch at once
            firsts = spectra[:, 0].tolist() if q else [0.0] * len(batch)
            chosen = [min(int(cap or 0), q) if first > 0 else 0 for (_, _, cap), first in zip(batch, firsts)]
        else:
            chosen = [chosen_rank(layer, spectra[i], cap) for i, (_, layer, cap) in enumerate(batch)]
        decisions = [decide(layer, c, zero) for (_, layer, _), c, zero in zip(batch, chosen, zeros)]
        stats = retention_batched(spectra, [layer.rank if new_rank is None else new_rank
                                            for (_, layer, _), new_rank in zip(batch, decisions)])
        widest = max((new_rank for new_rank in decisions if new_rank is not None), default=0)
        if not widest:
            return [entry(target, layer, None, zero, stat)
                    for (target, layer, _), zero, stat in zip(batch, zeros, stats)]
        U, Vh = decomposition.expand(widest)
        new_ups, new_downs = split_factors_batched(U, decomposition.S, Vh, split)
        dtype = _stored_dtype(batch[0][1], out_dtype)  # one per batch: the stored dtypes are in its key
        new_ups, new_downs = to_cpu(new_ups.to(dtype)), to_cpu(new_downs.to(dtype))
        results = []
        for i, ((target, layer, _), new_rank, zero, stat) in enumerate(zip(batch, decisions, zeros, stats)):
            if new_rank is None:
                results.append(entry(target, layer, None, zero, stat))
            else:  # views of the batch (non-overlapping: safetensors saves them as separate tensors)
                results.append(entry(target, layer, new_rank, zero, stat, new_ups[i, :, :new_rank],
                                     new_downs[i, :new_rank]))
        return results

    done: dict[str, tuple[LoraLayer, LayerResize]] = {}
    todo: list[tuple[str, LoraLayer, int | None]] = []
    for target, layer in adapter.layers.items():
        cap = conv_cap if is_spatial_conv(layer) else rank
        if method == "fixed" and not kohya_compat and cap is not None and cap >= layer.rank:
            # nothing to truncate: keep the tensors untouched, skip the SVD
            done[target] = (layer, LayerResize(
                target=target, kind=layer.kind, kernel=_kernel(layer), old_rank=layer.rank,
                new_rank=layer.rank, kept=True, zero=False, fro_retained=1.0, energy_retained=1.0,
                sum_retained=1.0, max_dropped_ratio=0.0, old_alpha=layer.alpha, new_alpha=layer.alpha))
        else:
            todo.append((target, layer, cap))
    if progress and done:
        progress(len(done))

    if batch_size == 1:
        results = map_layers(one, todo, device=device, workers=workers, name="lorahub-resize")
    else:
        workers_count = default_workers(device) if workers is None else max(1, workers)
        batches = [[todo[i] for i in indices] for indices in plan_batches(
            [(layer.out_features, layer.in_features, layer.rank, layer.A.dtype, layer.B.dtype, cap)
             for _, layer, cap in todo],
            [(layer.out_features + layer.in_features) * layer.rank * compute_dtype.itemsize
             for _, layer, _ in todo],
            device=device, max_layers=batch_size, workers=workers_count)]
        if on_cpu:
            results = map_layers(lambda batch: compute(batch, *load(batch)), batches, device=device,
                                 workers=workers, name="lorahub-resize")
        else:
            results = prefetched(load, compute, batches, device=device)
    for batch_results in results:
        for new_layer, layer_entry in batch_results:
            done[layer_entry.target] = (new_layer, layer_entry)
        if progress:
            progress(len(batch_results))

    new_layers: dict[str, LoraLayer] = {}
    for target in adapter.layers:
        new_layer, layer_entry = done[target]
        new_layers[target] = new_layer
        report.layers.append(layer_entry)
    report.seconds = time.perf_counter() - start
    out = Adapter(path=adapter.path, format=adapter.format, layers=new_layers,
                  full_tensors=dict(adapter.full_tensors), delta_tensors=dict(adapter.delta_tensors),
                  base_model=adapter.base_model, has_components=adapter.has_components,
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
    (they are not in `adapter.layers`). Layers of one shape are decomposed together.
    """
    items = list(adapter.layers.items())
    spectra: dict[str, torch.Tensor] = {}
    for indices in plan_batches([(layer.out_features, layer.in_features, layer.rank, layer.A.dtype, layer.B.dtype)
                                 for _, layer in items],
                                [(layer.out_features + layer.in_features) * layer.rank * compute_dtype.itemsize
                                 for _, layer in items], device=device):
        layers = [items[i][1] for i in indices]
        n, k, r = layers[0].out_features, layers[0].in_features, layers[0].rank
        ups = stack_factors([layer.B for layer in layers], (n, r), device=device, dtype=compute_dtype)
        downs = stack_factors([layer.A for layer in layers], (r, k), device=device, dtype=compute_dtype)
        S = BatchedFactoredSVD(ups, downs, compute_dtype=compute_dtype, device=device,
                               names=[items[i][0] for i in indices]).S.cpu()
        for row, i in enumerate(indices):
            target, layer = items[i]
            spectra[target] = (S[row] * abs(layer.scale)).to(dtype=torch.float32)
    return {target: spectra[target] for target, _ in items}
