"""`extract`: a LoRA adapter from a base model and its fine-tune, streaming, on the CPU or a GPU.

    extract(base, tuned, out, rank=64)                 -> ExtractResult (adapter, report, out)

For every pair of tensors the plan calls a LoRA layer (`plan.py`), ΔW = tuned − base is formed in
float32 on the device from the two files' bytes (`stream.py`), factored at the rank the rule gives
(`svd.py`: randomized SVD, exact for small layers or `exact=True`) and its error measured. The
factors hold the scale: alpha = rank, so s = 1 and B·A ≈ ΔW. Every other pair is compared; unchanged
tensors are listed, changed ones reported, and those matching `keep_full` carried whole. The adapter
is written once, at the end, through the output policy (`lorahub.output`): an interrupted extraction
leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch

from ..adapter import ST_DTYPES, Adapter, LazyTensor, LoraLayer
from ..devices import default_workers, exact_fp32_matmul, resolve_device, torch_threads
from ..errors import LorahubError, OptionError
from ..kinds import CONV, CONV1D, EMBEDDING
from ..lowrank import SPLITS
from . import svd as _svd
from .batched import Factored, GroupKey, Groups, factor_group, layer_generator
from .plan import ExtractPlan, Pair, plan_extract
from .stream import PairStream
from .svd import RankRule, decompose, residual_norm

# hidden: seconds to sleep per tensor pair, so a test can interrupt an extraction in the middle
THROTTLE_ENV = "LORAHUB_EXTRACT_THROTTLE_S"
# hidden: "1" factors same-shape layers in groups (`batched.py`) on any device, "0" one at a time;
# unset: groups on a GPU, one at a time (on worker threads) on the CPU
BATCH_ENV = "LORAHUB_EXTRACT_BATCH"
# below this relative error a layer is exact to float32 precision (ΔW itself is rounded float32): an
# error ratio against an optimum that small compares rounding noise, and is not reported
NOISE_FLOOR = 1e-5
# CPU: the float32 ΔW buffers of the workers factoring layers side by side stay within this
WORK_BUDGET = 2 << 30
# progress(total_bytes) -> a context manager yielding advance(nbytes), e.g. lorahub.ui.byte_progress
ProgressFactory = Callable[[int], ContextManager[Callable[[int], None]]]


@dataclass
class LayerExtract:
    """One extracted layer: its rank and what that rank costs."""

    target: str
    tensor: str
    kind: str
    kernel: str
    shape: list[int]
    rank: int
    alpha: float
    svd: str  # "randomized" | "exact"
    sketch: int  # the randomized sketch's size l (0: exact)
    norm: float  # ‖ΔW‖_F
    rel_error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F, measured
    energy_retained: float  # 1 − rel_error²: the share of ‖ΔW‖² the factors hold
    fro_retained: float  # √energy_retained
    max_dropped_ratio: float  # σ_r/σ₀ (the largest dropped singular value, relative)
    optimal_rel_error: float | None  # the Eckart–Young optimum at this rank (known when exact)
    error_ratio: float | None  # rel_error / optimal_rel_error (exact only; None when the optimum is below
    # NOISE_FLOOR: the layer is exact to float32 precision)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExtractReport:
    layers: list[LayerExtract] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # tensors equal in both models
    changed: list[dict] = field(default_factory=list)  # changed tensors that are not LoRA layers
    excluded: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    options: dict = field(default_factory=dict)

    @property
    def worst(self) -> LayerExtract | None:
        return min(self.layers, key=lambda layer: layer.energy_retained, default=None)

    def summary(self) -> dict:
        layers = self.layers
        worst = self.worst
        mean = (lambda key: sum(getattr(x, key) for x in layers) / len(layers)) if layers else (lambda key: 1.0)
        ratios = [x.error_ratio for x in layers if x.error_ratio is not None]
        return {
            "extracted": len(layers),
            "randomized": sum(x.svd == "randomized" for x in layers),
            "exact": sum(x.svd == "exact" for x in layers),
            "unchanged": len(self.unchanged),
            "changed_not_extracted": sum(not entry["kept"] for entry in self.changed),
            "kept_full": sum(entry["kept"] for entry in self.changed),
            "energy_retained_mean": mean("energy_retained"),
            "energy_retained_min": worst.energy_retained if worst else 1.0,
            "fro_retained_mean": mean("fro_retained"),
            "rel_error_max": max((x.rel_error for x in layers), default=0.0),
            "error_ratio_max": max(ratios) if ratios else None,
            "worst_layer": worst.target if worst else None,
        }


@dataclass
class ExtractResult:
    adapter: Adapter
    report: ExtractReport
    plan: ExtractPlan
    out: Path | None = None
    format: str = "peft"
    warnings: list[str] = field(default_factory=list)


def check_options(rank: int | None = None, method: str = "fixed", param: float | None = None, *,
                  conv_rank: int | None = None, split: str = "balanced", power_iters: int = 2,
                  oversample: int = 8, to_format: str = "peft", keep_full: Sequence[str] = ()) -> RankRule:
    """The options' own checks, before any file is read: OptionError (a usage error, exit 2)."""
    from ..formats import FORMATS

    rule = RankRule(method, param, rank)
    rule.check()
    if conv_rank is not None and conv_rank < 1:
        raise OptionError(f"--conv-rank must be at least 1, got {conv_rank}")
    if split not in SPLITS:
        raise OptionError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if power_iters < 0:
        raise OptionError(f"--power-iters must be at least 0, got {power_iters}")
    if oversample < 0:
        raise OptionError(f"--oversample must be at least 0, got {oversample}")
    if to_format not in FORMATS:
        raise OptionError(f"cannot write format '{to_format}' (choose from {', '.join(FORMATS)})")
    if keep_full and to_format != "peft":
        raise OptionError(f"{to_format} files cannot carry full tensors: --keep-full goes with --to peft")
    return rule


class _Work:
    """One float32 buffer for ΔW, grown to the largest layer and reused (a fresh allocation per layer
    page-faults on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: torch.Tensor | None = None

    def get(self, numel: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < numel:
            self.buffer = None  # free the old one first
            self.buffer = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self.buffer[:numel]


def _layer(pair: Pair, up: torch.Tensor, down: torch.Tensor) -> LoraLayer:
    """The LoRA layer of factors up (n×r), down (r×k) in the math view, in the kind's native shapes."""
    kind = pair.kind
    assert kind is not None and pair.target is not None
    rank = down.shape[0]
    shape = pair.shape
    if kind is CONV:
        a_shape, b_shape = (rank, *shape[1:]), (shape[0], rank, *([1] * (len(shape) - 2)))
    else:
        a_shape, b_shape = (rank, down.shape[1]), (up.shape[0], rank)
    up, down = kind.native_factors(up, down, a_shape, b_shape)
    name = kind.name if kind in (CONV, EMBEDDING) else "linear"
    return LoraLayer(target=pair.target, kind=name, A=LazyTensor.of(down.contiguous()),
                     B=LazyTensor.of(up.contiguous()), alpha=float(rank), rank=rank,
                     fan_in_fan_out=kind is CONV1D, source_key=pair.name)


def extract(base: str | Path, tuned: str | Path, out: str | Path | None = None, *, rank: int | None = None,
            method: str = "fixed", param: float | None = None, conv_rank: int | None = None,
            to_format: str = "peft", device: str | torch.device | None = "auto", dtype: torch.dtype | None = None,
            split: str = "balanced", include: Sequence[str] = (), exclude: Sequence[str] = (),
            keep_full: Sequence[str] = (), lora_embeddings: bool = False, exact: bool = False,
            power_iters: int = 2, oversample: int = 8, seed: int = 0, overwrite: bool = False,
            base_name: str | None = None, progress: ProgressFactory | None = None,
            chunk_bytes: int | None = None) -> ExtractResult:
    """Extract a LoRA adapter with ΔW ≈ tuned − base and write it to `out` (None: return it unwritten).

    `rank`: the rank (method "fixed"), or the cap of a dynamic rule (`method` sv_fro, sv_ratio,
    sv_cumulative with `param`; see `lowrank.choose_rank`); `conv_rank` the same for k×k convs
    (default `rank`). `dtype`: of the factors (None: each tuned tensor's). `exact`: the exact SVD for
    every layer. `power_iters`, `oversample`: the randomized SVD's q and p. `seed` makes the random
    sketches reproducible (per layer, whatever the order). `progress(total_bytes)` gives a context
    manager yielding `advance(nbytes)`, called as bytes are read (`lorahub.ui.byte_progress`).
    """
    rule = check_options(rank, method, param, conv_rank=conv_rank, split=split, power_iters=power_iters,
                         oversample=oversample, to_format=to_format, keep_full=keep_full)
    start = time.perf_counter()
    plan = plan_extract(base, tuned, include=include, exclude=exclude, keep_full=keep_full,
                        lora_embeddings=lora_embeddings)
    if to_format == "peft" and plan.has_components:
        from ..formats.common import component_of

        components = sorted({component_of(pair.target or "") or "" for pair in plan.pairs
                             if pair.role in ("lora", "full")})
        if len(components) > 1:
            raise OptionError(f"a PEFT directory holds one model, and these layers span the components "
                              f"{', '.join(components)}: pass --to kohya or --to diffusers, or --include "
                              f"'{components[0]}.*'")
    dev = resolve_device(device)
    inputs = [("base", Path(str(base)).expanduser()), ("tuned", Path(str(tuned)).expanduser())]
    report = ExtractReport(excluded=plan.excluded, device=str(dev), options={
        "rank": rank, "rank_method": method, "param": param, "conv_rank": conv_rank, "split": split,
        "exact": exact, "power_iters": power_iters, "oversample": oversample, "seed": seed,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "include": list(include), "exclude": list(exclude), "keep_full": list(keep_full),
        "lora_embeddings": lora_embeddings})
    if out is None:
        layers, full = _run(plan, report, rule, dev, conv_rank=conv_rank, dtype=dtype, split=split, exact=exact,
                            power_iters=power_iters, oversample=oversample, seed=seed, progress=progress,
                            chunk_bytes=chunk_bytes)
        adapter = _adapter(plan, layers, full, base_name or str(base), to_format)
        report.seconds = time.perf_counter() - start
        return ExtractResult(adapter, report, plan, None, to_format, _warnings(report))

    from .. import output
    from ..formats import output_target, save_adapter

    path, kind = output_target(out, to_format)
    with output.reserve(path, kind=kind, overwrite=overwrite, inputs=inputs):  # refused before the work
        layers, full = _run(plan, report, rule, dev, conv_rank=conv_rank, dtype=dtype, split=split, exact=exact,
                            power_iters=power_iters, oversample=oversample, seed=seed, progress=progress,
                            chunk_bytes=chunk_bytes)
        adapter = _adapter(plan, layers, full, base_name or str(base), to_format)
        renamed: list[str] = []
        written = save_adapter(adapter, out, to_format, overwrite=overwrite, inputs=inputs, notes=renamed)
    report.seconds = time.perf_counter() - start
    return ExtractResult(adapter, report, plan, written, to_format, _warnings(report) + renamed)


def _warnings(report: ExtractReport) -> list[str]:
    lines = []
    dropped = [entry for entry in report.changed if not entry["kept"]]
    if dropped:
        names = ", ".join(entry["tensor"] for entry in dropped[:3])
        more = f" and {len(dropped) - 3} more" if len(dropped) > 3 else ""
        lines.append(f"{len(dropped)} changed tensor(s) are not LoRA layers and are not in the adapter: {names}{more} "
                     "(--keep-full GLOB carries them whole)")
    return lines


def _adapter(plan: ExtractPlan, layers: dict[str, LoraLayer], full: dict[str, LazyTensor], base_name: str,
             to_format: str) -> Adapter:
    if not layers:
        raise LorahubError("no LoRA layer changed between the two models; nothing to extract"
                           + (" (changed tensors were carried whole, but an adapter needs a LoRA layer)"
                              if full else ""), path=plan.tuned.source)
    config: dict = {}
    architectures = (plan.base.config or {}).get("architectures") if plan.base.layout == "transformers" else None
    if isinstance(architectures, list) and architectures and str(architectures[0]).endswith("ForCausalLM"):
        config["task_type"] = "CAUSAL_LM"
    if full:  # exact module paths: PEFT matches modules_to_save entries as name suffixes
        config["modules_to_save"] = sorted({name.rsplit(".", 1)[0].partition(".")[2] if plan.has_components
                                            else name.rsplit(".", 1)[0] for name in full})
    ranks = sorted({layer.rank for layer in layers.values()})
    what = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    metadata = {"ss_training_comment": f"extracted by lorahub ({what}) from {plan.tuned.source} against "
                                       f"{plan.base.source}"}
    conv = sorted({layer.rank for layer in layers.values() if layer.is_spatial})
    if conv:  # kohya LoCon: the conv ranks, as kohya's own extract writes them
        conv_dim = str(conv[0]) if len(conv) == 1 else "Dynamic"
        metadata["ss_network_args"] = json.dumps({"conv_dim": conv_dim, "conv_alpha": conv_dim})
    return Adapter(path=None, format="peft", layers=layers, full_tensors=full, base_model=base_name, config=config,
                   has_components=plan.has_components, metadata=metadata)


def _run(plan: ExtractPlan, report: ExtractReport, rule: RankRule, dev: torch.device, *, conv_rank: int | None,
         dtype: torch.dtype | None, split: str, exact: bool, power_iters: int, oversample: int, seed: int,
         progress: ProgressFactory | None, chunk_bytes: int | None) -> tuple[dict[str, LoraLayer],
                                                                             dict[str, LazyTensor]]:
    bar = progress(plan.total_bytes) if progress is not None else contextlib.nullcontext(None)
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with bar as advance, on_device:
        return _stream(plan, report, rule, dev, conv_rank=conv_rank, dtype=dtype, split=split, exact=exact,
                       power_iters=power_iters, oversample=oversample, seed=seed, advance=advance,
                       chunk_bytes=chunk_bytes)


def _stream(plan: ExtractPlan, report: ExtractReport, rule: RankRule, dev: torch.device, *, conv_rank: int | None,
            dtype: torch.dtype | None, split: str, exact: bool, power_iters: int, oversample: int, seed: int,
            advance: Callable[[int], None] | None, chunk_bytes: int | None) -> tuple[dict[str, LoraLayer],
                                                                                    dict[str, LazyTensor]]:
    """Read every pair in order; factor the LoRA layers. On a GPU the calling thread does both: ΔW goes
    into a slot of its shape's group and full groups are factored at once (`batched.py`; the device works
    asynchronously, one host round trip per step for the group). On the CPU the layers are factored one
    at a time by `workers` threads with one torch thread each while the calling thread reads and
    assembles the next ΔW (small QRs and SVDs under OpenMP ran 10–100× slower on a shared machine, the
    problem `devices.map_layers` avoids the same way)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    layers: dict[str, LoraLayer] = {}
    rows: dict[str, LayerExtract] = {}
    full: dict[str, LazyTensor] = {}
    throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)
    timings = {"delta": 0.0, "svd": 0.0, "compare": 0.0}
    conv_rule = rule.with_cap(conv_rank) if conv_rank is not None else rule
    kwargs = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
    batch = os.environ.get(BATCH_ENV, "1" if dev.type == "cuda" else "0") == "1"
    workers = default_workers(dev) if dev.type == "cpu" and not batch else 1
    largest = max((pair.numel * 4 for pair in plan.lora_pairs), default=1)
    workers = max(1, min(workers, WORK_BUDGET // largest))  # one float32 ΔW buffer per worker
    free: queue.Queue = queue.Queue()  # work buffers: one per worker, one more being filled
    for _ in range(workers + 1 if workers > 1 else 1):
        free.put(_Work(dev))

    def factor(pair: Pair, matrix: torch.Tensor, norm: float, work: _Work) -> None:
        began = time.perf_counter()
        try:
            name, row, layer = _factor(pair, matrix, norm, rule=conv_rule if pair.spatial else rule, dtype=dtype,
                                       split=split, exact=exact, power_iters=power_iters, oversample=oversample,
                                       seed=seed)
            rows[name], layers[name] = row, layer
        finally:
            free.put(work)
            timings["svd"] += time.perf_counter() - began

    def group_key(pair: Pair) -> GroupKey | None:
        """The group a layer is factored in (batched route), or None for the one-layer route."""
        layer_rule = conv_rule if pair.spatial else rule
        if exact or layer_rule.method not in ("fixed", "sv_fro", "sv_ratio"):
            return None
        if layer_rule.method == "fixed" and layer_rule.rank is None:
            return None
        assert pair.kind is not None
        n = pair.out_features
        k = pair.numel // n
        full_rank = min(n, k)
        first = layer_rule.rank if layer_rule.rank is not None else _svd.DEFAULT_SKETCH
        width = min(first + oversample, full_rank)
        if full_rank <= _svd.EXACT_BELOW or 2 * width > full_rank:  # decompose() takes the exact SVD for these
            return None
        return GroupKey(n, k, pair.kind.transposed, min(first, width), width, dtype or ST_DTYPES[pair.tuned.dtype],
                        layer_rule, oversample)

    def one_layer(pair: Pair, matrix: torch.Tensor, norm: float) -> None:
        layer_rule = conv_rule if pair.spatial else rule
        name, row, layer = _factor(pair, matrix, norm, rule=layer_rule, dtype=dtype, split=split, exact=exact,
                                   power_iters=power_iters, oversample=oversample, seed=seed)
        rows[name], layers[name] = row, layer

    def flush(group) -> None:
        t0 = time.perf_counter()
        done, unchanged, bad = factor_group(group, power_iters=power_iters, split=split, seed=seed,
                                            one_layer=one_layer)
        if bad:
            raise LorahubError("ΔW is not finite: the base or the tuned tensor holds NaN or Inf, or their "
                               "difference overflows float32", path=bad[0].tuned.path, key=bad[0].name)
        report.unchanged.extend(pair.name for pair in unchanged)
        for item in done:
            name, row, layer = _finish(item, exact=False, sketch=group.key.width)
            rows[name], layers[name] = row, layer
        timings["svd"] += time.perf_counter() - t0

    groups = Groups(dev, flush) if batch else None
    began = time.perf_counter()
    pending: list[Future] = []
    threads = torch_threads(1) if workers > 1 else contextlib.nullcontext()
    with exact_fp32_matmul(), torch.no_grad(), threads, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorahub-extract") as pool, \
            PairStream(plan.pairs, dev, advance=advance, **kwargs) as stream:
        try:
            for pair in plan.pairs:
                if throttle:
                    time.sleep(throttle)
                for future in [f for f in pending if f.done()]:
                    future.result()  # a failed layer stops the run now
                    pending.remove(future)
                if pair.role != "lora":
                    t0 = time.perf_counter()
                    changed, tensor = stream.compare(pair, keep=pair.role == "full")
                    timings["compare"] += time.perf_counter() - t0
                    if not changed:
                        report.unchanged.append(pair.name)
                    elif tensor is not None and pair.target is not None:
                        full[pair.target] = LazyTensor.of(tensor, key=pair.target)
                        report.changed.append({"tensor": pair.name, "reason": "--keep-full", "kept": True})
                    else:
                        report.changed.append({"tensor": pair.name, "reason": pair.reason, "kept": False})
                    continue
                key = group_key(pair) if groups is not None else None
                if groups is not None and key is not None:
                    t0 = time.perf_counter()
                    stream.delta(pair, groups.slot(key, pair))
                    timings["delta"] += time.perf_counter() - t0
                    groups.filled(key)
                    continue
                work = free.get()  # waits for a worker to finish with its buffer
                t0 = time.perf_counter()
                assert pair.kind is not None
                matrix = pair.kind.math_view(stream.delta(pair, work.get(pair.numel)), pair.out_features)
                norm = float(torch.linalg.vector_norm(matrix))  # waits for the chunks' copies on CUDA
                timings["delta"] += time.perf_counter() - t0
                if norm == 0.0:
                    report.unchanged.append(pair.name)
                    free.put(work)
                    continue
                if not math.isfinite(norm):
                    raise LorahubError("ΔW is not finite: the base or the tuned tensor holds NaN or Inf, or their "
                                       "difference overflows float32", path=pair.tuned.path, key=pair.name)
                if workers > 1:
                    pending.append(pool.submit(factor, pair, matrix, norm, work))
                else:
                    factor(pair, matrix, norm, work)
            for future in pending:
                future.result()
            if groups is not None:
                groups.finish()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        report.bytes_read = stream.bytes_read
        report.stage_seconds = {**{k: round(v, 3) for k, v in stream.read_seconds.items()},
                                **{k: round(v, 3) for k, v in timings.items()},
                                "wall": round(time.perf_counter() - began, 3)}
    order = [pair.target or pair.name for pair in plan.pairs if (pair.target or pair.name) in rows]
    report.layers = [rows[name] for name in order]
    position = {pair.name: i for i, pair in enumerate(plan.pairs)}
    report.unchanged.sort(key=lambda name: position.get(name, len(position)))
    return {name: layers[name] for name in order}, full


def _factor(pair: Pair, matrix: torch.Tensor, norm: float, *, rule: RankRule, dtype: torch.dtype | None,
            split: str, exact: bool, power_iters: int, oversample: int,
            seed: int) -> tuple[str, LayerExtract, LoraLayer]:
    """One layer: the factors of its ΔW (`matrix`, overwritten with the residual), their measured error."""
    assert pair.kind is not None
    decomposition = decompose(matrix, rule, energy=norm * norm, exact=exact, power_iters=power_iters,
                              oversample=oversample, generator=layer_generator(pair, seed, matrix.device),
                              split=split)
    up, down = decomposition.up, decomposition.down
    out_dtype = dtype or ST_DTYPES[pair.tuned.dtype]
    up_cpu, down_cpu = up.to(out_dtype).cpu(), down.to(out_dtype).cpu()
    residual = residual_norm(matrix, up, down)
    item = Factored(pair, up_cpu, down_cpu, norm, residual, decomposition.S)
    return _finish(item, exact=decomposition.exact, sketch=decomposition.sketch)


def _finish(item: Factored, *, exact: bool, sketch: int) -> tuple[str, LayerExtract, LoraLayer]:
    """The report row and the adapter layer of one factored layer."""
    pair, S, norm = item.pair, item.S, item.norm
    assert pair.kind is not None
    r = item.down.shape[0]
    rel = min(item.residual / norm, 1.0)
    optimal = ratio = None
    if exact:
        total = float((S * S).sum())
        optimal = math.sqrt(float((S[r:] * S[r:]).sum()) / total) if total > 0 else 0.0
        ratio = rel / optimal if optimal > NOISE_FLOOR else None
    dropped = float(S[r] / S[0]) if r < S.shape[0] and float(S[0]) > 0 else 0.0
    name = pair.target or pair.name
    energy = max(0.0, 1.0 - rel * rel)
    row = LayerExtract(
        target=name, tensor=pair.name, kind=pair.kind.name, kernel=pair.kernel, shape=list(pair.shape), rank=r,
        alpha=float(r), svd="exact" if exact else "randomized", sketch=sketch,
        norm=norm, rel_error=rel, energy_retained=energy, fro_retained=math.sqrt(energy),
        max_dropped_ratio=dropped, optimal_rel_error=optimal, error_ratio=ratio)
    return name, row, _layer(pair, item.up, item.down)
