"""The blend operation: check the inputs, run the registered method on every module, build the adapter.

Every output layer has scale 1 (alpha = rank, use_rslora = False): the combined coefficients are
folded into the factors, so formats and loaders that disagree on rsLoRA or patterns cannot rescale it.
A module missing from an adapter contributes zero. Adapters for different bases, different layer
kinds on one module, DoRA and LyCORIS are refused; full replacement tensors (modules_to_save) pass
through only when every adapter carries the identical tensor (else refused, or left out on request).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Sequence

from ..adapter import ST_DTYPES, Adapter, LazyTensor, LoraLayer
from ..devices import map_layers, resolve_device
from ..errors import LorahubError, OptionError, UnsupportedError
from ..lazy import LazyDict, torch
from ..lycoris import require_resolved
from ..names import different_models, model_evidence, renamed_modules
from .registry import (
    DEFAULT_METHOD,
    BlendMethod,
    LayerContext,
    Term,
    check_method_options,
    declarations,
    get_method,
    param_default,
    recorded_options,
)

BASE_METADATA = ("ss_base_model_version", "ss_v2", "ss_network_module", "ss_sd_model_name", "ss_sd_model_hash",
                 "ss_new_sd_model_hash", "modelspec.sai_model_spec", "modelspec.architecture",
                 "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type",
                 "lorahub.component")
# built (and torch imported) on first use
OUTPUT_DTYPES: LazyDict[str, torch.dtype] = LazyDict(
    lambda: {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16})


@dataclass
class BlendOptions:
    method: str = DEFAULT_METHOD
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
    # parameters of registered methods that have no field above (a new method's own), by name
    extra: dict[str, Any] = field(default_factory=dict)

    def value(self, name: str) -> Any:
        """A method parameter's value: `extra`, else the field, else the registered default."""
        if name in self.extra:
            return self.extra[name]
        if name in _FIELDS:
            return getattr(self, name)
        return param_default(name)

    def with_values(self, **values: Any) -> BlendOptions:
        """A copy with these fields and method parameters set (names no method declares are a TypeError)."""
        known = {k: v for k, v in values.items() if k in _FIELDS}
        other = {k: v for k, v in values.items() if k not in _FIELDS}
        unknown = sorted(set(other) - set(declarations()))
        if unknown:
            raise TypeError(f"unknown blend option(s): {', '.join(unknown)}")
        out = replace(self, **known)
        return replace(out, extra={**out.extra, **other}) if other else out


_FIELDS = frozenset(f.name for f in fields(BlendOptions))


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
        require_resolved(adapter.layers, "blend", adapter.path)
        if adapter.delta_tensors:
            raise UnsupportedError(f"blend does not weight diff/diff_b deltas on vectors (e.g. "
                                   f"{next(iter(adapter.delta_tensors.values())).key}); merge the adapters instead",
                                   path=adapter.path)
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
            if first.geometry is not layer.geometry:
                raise LorahubError(f"module '{target}' is a {first.geometry.name} layer in {first_adapter.name} "
                                   f"but a {layer.geometry.name} layer in {adapter.name}; blend refuses "
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
    check_same_model(adapters, allow_base_mismatch=allow_base_mismatch)


def check_same_model(adapters: Sequence[Adapter], *, allow_base_mismatch: bool = False) -> None:
    """Refuse adapters whose module names say they belong to different models (a Llama LoRA and an SD UNet
    LoRA, a UNet and a DiT, GPT-2 and Llama paths), or name the same modules differently: their union
    would be an adapter of no model. Adapters of one base with different target subsets pass. The family
    named in kohya/modelspec metadata counts as a name (--allow-base-mismatch overrides it); module names
    and shapes are always checked."""
    evidence = [model_evidence(adapter) for adapter in adapters]
    for i, (first, a) in enumerate(zip(adapters, evidence)):
        for second, b in zip(adapters[i + 1:], evidence[i + 1:]):
            named = _base_key(first.base_model)
            why = different_models(a, b, same_base=named is not None and named == _base_key(second.base_model))
            if why is None and not allow_base_mismatch and a.family and b.family and a.family != b.family:
                why = f"{a.family} vs {b.family} in their metadata; pass --allow-base-mismatch if that is wrong"
            if why is not None:
                raise LorahubError(f"{first.name} and {second.name} are adapters of different models ({why}); "
                                   "blend refuses to combine them", path=second.path)
            renamed = renamed_modules(a, b)
            if renamed is not None:
                raise LorahubError(f"{first.name} and {second.name} name the same module differently "
                                   f"('{renamed[0]}' vs '{renamed[1]}'): blending would keep both as two "
                                   "modules; convert both to one format first", path=second.path)


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


def _check_options(opts: BlendOptions, n_adapters: int, n_weights: int) -> BlendMethod:
    method = get_method(opts.method)
    if n_adapters < 1:
        raise OptionError("blend needs at least one adapter")
    if n_weights != n_adapters:
        raise OptionError(f"{n_adapters} adapters but {n_weights} weights; give one weight per adapter")
    check_method_options(opts)
    if opts.dtype is not None and opts.dtype not in OUTPUT_DTYPES:
        raise OptionError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {opts.dtype!r}")
    return method


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
    opts = (options or BlendOptions()).with_values(**kwargs)
    weights = [float(w) for w in weights]
    method = _check_options(opts, len(adapters), len(weights))
    if not all(math.isfinite(w) for w in weights):
        raise OptionError(f"weights must be finite numbers, got {weights}")
    from ..families import common_naming

    adapters = common_naming(adapters)  # one diffusion transformer's two namings: the first adapter's, exactly
    check_compatible(adapters, allow_base_mismatch=opts.allow_base_mismatch)
    full_tensors, dropped_full = shared_full_tensors(adapters, drop=opts.drop_full_tensors)
    device = resolve_device(opts.device)
    out_dtype = _output_dtype(adapters, opts)
    default_rank = max(layer.rank for adapter in adapters for layer in adapter.layers.values())

    # the union of modules, in first-seen order (the first adapter's order, then new ones)
    targets = list(dict.fromkeys(t for adapter in adapters for t in adapter.layers))
    report = BlendReport(method=opts.method, weights=weights,
                         sources=[str(a.path) if a.path else a.name for a in adapters], device=str(device),
                         options=recorded_options(opts), dropped_full_tensors=dropped_full)
    def one_layer(target: str) -> tuple[LayerReport, LoraLayer | None]:
        present = [(i, a.layers[target]) for i, a in enumerate(adapters) if target in a.layers]
        template = present[0][1]
        terms: list[Term] = []
        for i, layer in present:
            up, down = layer.factors(device=device, dtype=torch.float32)
            bias = layer.bias.load().to(device=device, dtype=torch.float32) if layer.bias is not None else None
            if bias is not None and layer.bias_unscaled and layer.scale not in (0, 1):
                bias = bias / layer.scale  # a diff_b bias delta is added as it is; terms scale their bias
            terms.append(Term(index=i, weight=weights[i], scale=layer.scale, up=up, down=down, bias=bias))
        ctx = LayerContext(target=target, options=opts, device=device, default_rank=default_rank)
        result = method.fn(terms, ctx)
        new_up, new_down = result.up, result.down
        rank = 0 if new_up is None or new_down is None else int(new_down.shape[0])
        entry = LayerReport(
            target=target, kind=template.kind, shape=(template.out_features, template.in_features),
            sources=[i for i, _ in present], input_ranks=[layer.rank for _, layer in present], rank=rank,
            energy_retained=result.energy_retained, fro_retained=result.fro_retained,
            rel_error=result.rel_error, note=result.note)
        if new_up is None or new_down is None:
            return entry, None
        new = template.with_factors(new_up.to(device="cpu", dtype=out_dtype),
                                    new_down.to(device="cpu", dtype=out_dtype), alpha=float(rank), use_rslora=False)
        out_bias = None if result.bias is None else LazyTensor.of(result.bias.to(device="cpu", dtype=out_dtype))
        return entry, replace(new, magnitude=None, bias=out_bias)

    layers: dict[str, LoraLayer] = {}
    for entry, layer in map_layers(one_layer, targets, device=device, workers=opts.workers,
                                   parallel=method.parallel, name="lorahub-blend"):
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
                  base_model=first.base_model, config=config, metadata=metadata, files=[],
                  has_components=any(adapter.has_components for adapter in adapters))
    return BlendResult(adapter=out, report=report)


def interpolate(a: Adapter, b: Adapter, t: float, options: BlendOptions | None = None, **kwargs: Any) -> BlendResult:
    """(1 − t)·A + t·B, exactly with the default method `cat` (any other method via options)."""
    if not math.isfinite(float(t)):
        raise OptionError(f"t must be a finite number, got {t}")
    opts = options or BlendOptions(method="cat")
    return blend([a, b], [1.0 - float(t), float(t)], opts, **kwargs)


def _provenance(report: BlendReport) -> str:
    return json.dumps({"method": report.method, "weights": report.weights, "options": report.options,
                       "sources": report.sources}, sort_keys=True)


def parse_weights(text: str) -> list[float]:
    """'0.7,0.3' → [0.7, 0.3]; negatives allowed ('1,-0.5')."""
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise OptionError(f"--weights must be comma-separated numbers like 0.7,0.3, got {text!r}") from None
    if not values:
        raise OptionError("--weights is empty")
    return values
