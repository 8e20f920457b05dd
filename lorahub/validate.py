"""Does an adapter fit a base model? Shapes only, from headers: no tensor data is read.

For every adapted module: the target exists in the base; A's input dimension equals the base's (conv:
in·kh·kw); B's output dimension equals the base's; the orientation is right (GPT-2 Conv1D weights are
stored (in, out), embeddings (num, dim)); a DoRA magnitude has one entry per output feature; a LoRA
bias has a base bias to go to. Also: modules the base does not have, full tensors (`modules_to_save`)
whose shapes differ (resized vocabularies), a base name in the adapter that differs from the base
given (warning), and an optional serving rank limit (`max_rank`, e.g. vLLM's `--max-lora-rank`).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .kinds import CONV1D, kind_of
from .names import NameMatch, base_conv1d, layer_fits, match_layers, ref_shape

if TYPE_CHECKING:
    from .adapter import Adapter, LoraLayer
    from .base import BaseModel

SEVERITIES = ("error", "warning")
# config keys that name a dimension, for hints ("adapter was trained for hidden size 96")
_DIM_NAMES = (("hidden_size", "hidden size"), ("n_embd", "hidden size"), ("d_model", "hidden size"),
              ("intermediate_size", "intermediate size"), ("n_inner", "intermediate size"),
              ("vocab_size", "vocabulary size"), ("cross_attention_dim", "cross-attention dim"),
              ("joint_attention_dim", "joint attention dim"))


@dataclass
class Problem:
    module: str
    expected: str
    found: str
    hint: str = ""
    severity: str = "error"  # "error" | "warning"
    kind: str = "shape"  # missing|shape|orientation|rank|magnitude|bias|full_tensor|max_rank|empty|no_modules

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ValidationReport:
    adapter: str
    base: str
    ok: bool
    modules: int  # adapted modules in the adapter (layers + full tensors)
    matched: int  # modules whose target exists and fits
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)  # registry bases the adapter fits
    max_rank: int | None = None
    name_rule: str | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def summary(self) -> str:
        """The headline: what passed, or what failed — shapes that do not fit, ranks over --max-rank, or both."""
        if self.ok:
            text = f"fits: {self.matched}/{self.modules} modules of {self.adapter} match {self.base}"
        elif any(p.kind == "no_modules" for p in self.errors):
            text = f"{self.adapter} has no LoRA modules: nothing to apply to {self.base}"
        else:
            misfits = {p.module for p in self.errors if p.kind != "max_rank"}
            over = {p.module for p in self.errors if p.kind == "max_rank"}
            parts = []
            if misfits:
                # in the file's own modules (a family's other naming is checked as more, or fewer, modules)
                count = self.modules - self.matched if self.modules > self.matched else len(misfits)
                parts.append(f"does not fit: {count} of {self.modules} modules of {self.adapter} do not "
                             f"match {self.base}")
            if over:
                limit = f"{len(over)} of {self.modules} modules of {self.adapter} have a rank over --max-rank " \
                        f"{self.max_rank}"
                parts.append(f"{len(over)} modules have a rank over --max-rank {self.max_rank}" if misfits else
                             f"rank limit exceeded: {limit} (their shapes fit {self.base})")
            text = "; ".join(parts)
        if self.suggestions:
            text += f" (fits: {', '.join(self.suggestions)})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary, "adapter": self.adapter, "base": self.base,
                "modules": self.modules, "matched": self.matched, "max_rank": self.max_rank,
                "name_rule": self.name_rule,
                "problems": [p.to_dict() for p in self.problems], "warnings": list(self.warnings),
                "suggestions": list(self.suggestions)}


def validate(adapter: "Adapter", base: "BaseModel", *, max_rank: int | None = None,
             suggest: bool = True) -> ValidationReport:
    """Check every module of `adapter` against the shapes of `base` (headers only)."""
    from .families import align_to_base
    from .lycoris import delta_base_names

    given = adapter
    adapter = align_to_base(adapter, base)  # a family's other naming (kohya Flux vs a diffusers folder)
    match = match_layers(adapter, base)
    problems: list[Problem] = []
    warnings: list[str] = list(adapter.warnings)  # what the reader said (e.g. an unknown scale)
    matched = 0
    if not (adapter.layers or adapter.full_tensors or adapter.other_modules or adapter.delta_tensors):
        problems.append(Problem(adapter.name, "at least one LoRA module", "no modules",
                                "an adapter of zero modules changes nothing", kind="no_modules"))

    missing = set(match.missing)  # a set: 150,000 modules against a list was quadratic (86 s)
    for target, layer in adapter.layers.items():
        if target in missing:
            continue
        found = _check_layer(target, layer, match, base, max_rank)
        problems.extend(found)
        if not any(p.severity == "error" and p.kind != "max_rank" for p in found):
            matched += 1
    problems.extend(_missing_problems(match.missing, adapter, base))
    if match.ambiguous:
        for target, candidates in sorted(match.ambiguous.items())[:5]:
            warnings.append(f"{target}: several base modules flatten to the same kohya name "
                            f"({', '.join(candidates[:3])}); chose {match.refs[target].module}")

    full_matched = 0
    for name, tensor in adapter.full_tensors.items():
        problem = _check_full_tensor(name, tensor.shape, match, base)
        if problem is None:
            matched += 1
            full_matched += 1
        else:
            problems.append(problem)

    deltas = delta_base_names(adapter, base) if adapter.delta_tensors else {}
    delta_matched = 0
    for name, tensor in adapter.delta_tensors.items():
        base_name = deltas[name]
        base_shape = base.shape(base_name) if base_name else None
        if base_shape is None:
            problems.append(Problem(tensor.key or name, f"a base tensor {name}", f"{list(tensor.shape)}",
                                    "a diff/diff_b delta adds to a base tensor; the base has none here",
                                    kind="missing"))
        elif tuple(base_shape) != tuple(tensor.shape):
            problems.append(Problem(tensor.key or name, f"{list(base_shape)} ({base_name})", f"{list(tensor.shape)}",
                                    "a diff/diff_b delta has the shape of the tensor it adds to", kind="shape"))
        else:
            matched += 1
            delta_matched += 1

    for target in match.other_missing:
        problems.append(Problem(target, "a module of that name in the base", "no such module",
                                "LyCORIS module has no target in the base", kind="missing"))
    if match.other:
        algos = sorted(set(adapter.other_modules.values()))
        warnings.append(f"{len(match.other)} LyCORIS {'/'.join(algos)} modules: targets exist; their shapes "
                        "are not checked")

    mismatch = _base_name_mismatch(adapter, base)
    if mismatch:
        warnings.append(mismatch)
    if not base.complete:
        warnings.append("base files hold less tensor data than their headers describe (header-only or "
                        "partly downloaded): fine for validation, not for merging")
    if match.rule and match.targets:
        warnings.append(f"adapter names differ from the base's by a prefix ({match.rule})")

    problems.sort(key=lambda p: (SEVERITIES.index(p.severity), _natural_key(p.module)))
    ok = not any(p.severity == "error" for p in problems)
    total = len(adapter.layers) + len(adapter.full_tensors) + len(adapter.delta_tensors)
    if given is not adapter:  # counted as the file's modules, whatever they became in the base's naming
        from .families import alignment_note

        matched, total = _given_counts(given, adapter, problems, full_matched + delta_matched)
        warnings.append(alignment_note(given, adapter, base))
    report = ValidationReport(adapter=adapter.name, base=base.display_name, ok=ok, modules=total,
                              matched=matched, problems=problems, warnings=warnings, max_rank=max_rank,
                              name_rule=match.rule)
    shape_errors = any(p.severity == "error" and p.kind in ("shape", "missing", "full_tensor", "magnitude")
                       for p in problems)
    if not ok and shape_errors and suggest:
        report.suggestions = suggest_bases(adapter, exclude=base.name)
    return report


def _given_counts(given: "Adapter", aligned: "Adapter", problems: list[Problem], full_matched: int) -> tuple[int, int]:
    # full_matched: the full and delta tensors that fit (kept as they are by the alignment)
    """(matched, total) in the adapter file's own modules when it was checked in another naming."""
    origin = {target: layer.source_key.split("|") for target, layer in aligned.layers.items()}
    bad = {key for p in problems if p.severity == "error" and p.kind != "max_rank" for key in origin.get(p.module, ())}
    keys = [layer.source_key for layer in given.layers.values()]
    matched = sum(1 for key in keys if key not in bad) + full_matched
    return matched, len(given.layers) + len(given.full_tensors) + len(given.delta_tensors)


# ---------------------------------------------------------------------------------------------
# one layer


def _check_layer(target: str, layer: "LoraLayer", match: NameMatch, base: "BaseModel",
                 max_rank: int | None) -> list[Problem]:
    ref = match.refs[target]
    shape = ref_shape(base, ref)
    problems: list[Problem] = []
    a_shape, b_shape = tuple(layer.A.shape), tuple(layer.B.shape)
    factors = f"A {list(a_shape)}, B {list(b_shape)}"
    if layer.A.numel == 0 or layer.B.numel == 0:
        problems.append(Problem(target, "non-empty factors", factors,
                                "empty tensor: was it saved under DeepSpeed ZeRO-3?", kind="empty"))
        return problems
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1]:
        problems.append(Problem(target, "A (r, …) and B (…, r) with the same r", factors,
                                "factors disagree on the rank", kind="rank"))
        return problems
    if max_rank is not None and layer.rank > max_rank:
        problems.append(Problem(target, f"rank ≤ {max_rank}", f"rank {layer.rank}",
                                f"over the serving limit (--max-rank {max_rank}; vLLM: --max-lora-rank)",
                                kind="max_rank"))
    if shape is None or len(shape) < 2:
        problems.append(Problem(target, "a matrix (2-D or conv) weight", f"base tensor {ref.weight} "
                                f"{list(shape) if shape else '?'}", "LoRA adapts matrices; this base "
                                "tensor is a vector", kind="shape"))
        return problems

    if layer.lycoris is not None:
        return _check_lycoris(target, layer, shape, ref, base)
    linear = layer.geometry.name in ("linear", "conv1d")
    # the base decides the orientation (as PEFT does by the layer's type), never the adapter's flag
    decided = base_conv1d(layer, base, ref)
    conv1d = bool(decided)
    if not layer_fits(layer, shape, conv1d):
        hint = _shape_hint(layer, shape, conv1d, base, target)
        if linear and len(shape) == 2 and shape[0] != shape[1] and layer_fits(layer, shape, not conv1d):
            hint = ("the adapter's factors fit this weight transposed: it was made for a "
                    + ("Linear (out, in) layer; the base's is a Conv1D (in, out)" if conv1d else
                       "Conv1D (in, out) layer; the base's is a Linear (out, in)"))
        problems.append(Problem(target, _expected(layer, shape, conv1d), _found(layer, conv1d), hint,
                                kind="shape"))
        return problems
    if decided is not None and decided != (layer.geometry is CONV1D):
        # PEFT decides the orientation by the layer type, not by the flag; merging does too
        if conv1d:
            hint = (f"base {ref.weight} is stored (in, out) like GPT-2's Conv1D but the adapter says "
                    f"fan_in_fan_out=false; merge transposes ΔW, as PEFT does")
        else:
            hint = (f"base {ref.weight} is an ordinary (out, in) layer but the adapter says fan_in_fan_out=true; "
                    f"merge ignores the flag, as PEFT does")
        problems.append(Problem(target, _expected(layer, shape, conv1d), _found(layer, conv1d), hint,
                                severity="warning", kind="orientation"))

    out_features = _out_features(layer, shape, conv1d)
    if layer.magnitude is not None:
        mag = tuple(layer.magnitude.shape)
        if math.prod(mag) != out_features or (mag and max(mag) != out_features):
            problems.append(Problem(target, f"DoRA magnitude with {out_features} entries ({_mag_layout(layer)})",
                                    f"magnitude {list(mag)}", "one magnitude per output feature of the base weight",
                                    kind="magnitude"))
    if layer.bias is not None:
        if ref.bias is None:
            problems.append(Problem(target, "a bias in the base layer", "a LoRA bias",
                                    "lora_bias=True needs a base layer with a bias", kind="bias"))
        else:
            bias_shape = base.shape(ref.bias) or ()
            n_bias = (ref.rows[1] - ref.rows[0]) if ref.rows else math.prod(bias_shape)
            if layer.bias.numel != n_bias:
                problems.append(Problem(target, f"bias [{n_bias}]", f"LoRA bias {list(layer.bias.shape)}",
                                        "bias length must equal the output features", kind="bias"))
    return problems


def _check_lycoris(target: str, layer: "LoraLayer", shape: tuple[int, ...], ref, base: "BaseModel") -> list[Problem]:
    """A LyCORIS layer: the base shape its factor structure implies (Kronecker shapes for LoKr)."""
    from .lycoris import fit_problem, magnitude_count

    mod = layer.lycoris
    assert mod is not None
    problems: list[Problem] = []
    problem = fit_problem(mod, shape)
    if problem is not None:
        return [Problem(layer.source_name or target, *problem, kind="shape")]
    if layer.magnitude is not None and layer.magnitude.numel != magnitude_count(mod, shape):
        axis = "output row" if mod.dora_on_out else "input channel"
        problems.append(Problem(layer.source_name or target, f"DoRA scale with {magnitude_count(mod, shape)} entries "
                                f"(one per {axis})", f"dora_scale {list(layer.magnitude.shape)}",
                                "LyCORIS weight decomposition", kind="magnitude"))
    if layer.bias is not None:
        bias_shape = base.shape(ref.bias) if ref.bias is not None else None
        if bias_shape is None or math.prod(bias_shape) != layer.bias.numel:
            problems.append(Problem(layer.source_name or target, f"a bias of {mod.out_features} in the base layer",
                                    f"bias delta {list(layer.bias.shape)}", "diff_b adds to the base bias",
                                    kind="bias"))
    return problems


def _out_features(layer: "LoraLayer", shape: tuple[int, ...], conv1d: bool) -> int:
    return kind_of(layer, conv1d).out_features(shape)


def _mag_layout(layer: "LoraLayer") -> str:
    return layer.geometry.magnitude_layout


def _expected(layer: "LoraLayer", shape: tuple[int, ...], conv1d: bool) -> str:
    """The factor shapes the base wants, with the base weight's shape."""
    return kind_of(layer, conv1d).expected_text(shape)


def _found(layer: "LoraLayer", conv1d: bool) -> str:
    return f"A {list(layer.A.shape)}, B {list(layer.B.shape)}"


def _shape_hint(layer: "LoraLayer", shape: tuple[int, ...], conv1d: bool, base: "BaseModel", target: str) -> str:
    """What the found shape suggests: 'adapter was trained for hidden size 96'."""
    a_in = list(layer.A.shape[1:])
    b_out = layer.B.shape[0]
    want_in, want_out = kind_of(layer, conv1d).base_dims(shape)
    named = _dimension_names(base, target)
    parts = []
    if a_in != want_in and not (len(a_in) == 1 and len(want_in) > 1 and a_in[0] == want_in[0]):
        got, want = a_in[0], want_in[0]
        if len(a_in) > 1 and a_in[0] == want_in[0]:
            parts.append(f"kernel {a_in[1:]} vs base {want_in[1:]}")
        elif want in named:
            parts.append(f"adapter was trained for {named[want]} {got} (base: {want})")
        else:
            parts.append(f"A has {got} input features, the base {want}")
    if b_out != want_out:
        if want_out in named and not any(named[want_out] in p for p in parts):
            parts.append(f"adapter was trained for {named[want_out]} {b_out} (base: {want_out})")
        elif not parts or want_out not in named:
            parts.append(f"B has {b_out} output features, the base {want_out}")
    return "; ".join(parts) or "shapes differ"


def _dimension_names(base: "BaseModel", target: str) -> dict[int, str]:
    config = base.component_config(target) or {}
    if isinstance(config, dict) and "text_config" in config and isinstance(config["text_config"], dict):
        config = {**config["text_config"], **{k: v for k, v in config.items() if k != "text_config"}}
    names: dict[int, str] = {}
    for key, label in _DIM_NAMES:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value not in names:
            names[value] = label
    return names


# ---------------------------------------------------------------------------------------------
# modules with no target, full tensors, base names


def _missing_problems(missing: list[str], adapter: "Adapter", base: "BaseModel") -> list[Problem]:
    if not missing:
        return []
    from .names import base_index

    index = base_index(base)
    everything = len(missing) == len(adapter.layers)
    parents: dict[str, set[str]] = {}
    for module in index.modules:
        parent, _, leaf = module.rpartition(".")
        parents.setdefault(parent, set()).add(leaf)
    problems = []
    for target in missing:
        layer = adapter.layers[target]
        label = layer.source_name or target
        parent, _, leaf = target.rpartition(".")
        siblings = sorted(parents.get(parent, ()))
        if siblings:
            hint = f"the base has {', '.join(siblings[:8])} here"
            if leaf.endswith("qkv_proj") or leaf in ("query_key_value", "c_attn", "Wqkv"):
                hint = f"packed q/k/v module; {hint} (split or packed attention differs)"
        elif everything:
            hint = "no adapter module exists in this base: a different architecture?"
        else:
            hint = "no module of that name in the base"
        problems.append(Problem(label, "a module of that name in the base", "no such module", hint, kind="missing"))
    return problems


def _check_full_tensor(name: str, shape: tuple[int, ...], match: NameMatch, base: "BaseModel") -> Problem | None:
    target = match.full_tensors.get(name)
    note = ""
    if target is None:
        tied = _tied_embedding(name, base)
        if tied is None:
            return Problem(name, "a tensor of that name in the base", f"{list(shape)}",
                           "modules_to_save / full tensor has no counterpart in the base", kind="full_tensor")
        target, note = tied, f" (tied to {tied})"
    base_shape = base.shape(target)
    if tuple(shape) == tuple(base_shape or ()):
        return None
    hint = "full tensors replace the base tensor: shapes must be equal"
    if base_shape and len(shape) == len(base_shape) == 2 and shape[1] == base_shape[1] and shape[0] != base_shape[0] \
            and re.search(r"(embed|lm_head|wte|shared|word_embeddings|score)", name):
        hint = (f"resized vocabulary: adapter has {shape[0]} rows, base {base_shape[0]} "
                f"(resize the base's token embeddings first)")
    return Problem(name, f"{list(base_shape or [])}{note}", f"{list(shape)}", hint, kind="full_tensor")


def _tied_embedding(name: str, base: "BaseModel") -> str | None:
    """lm_head.weight of a base with tied embeddings (absent from its files) -> the embedding."""
    if not name.endswith("lm_head.weight"):
        return None
    for candidate in sorted(base.tensors):
        if candidate.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")):
            return candidate
    return None


def _normalise_name(name: str) -> str:
    name = name.rstrip("/").replace("\\", "/")
    if name.startswith("hf://"):
        name = name[len("hf://"):]
    name = name.split("@", 1)[0]
    return name.rsplit("/", 1)[-1].lower()


def _base_name_mismatch(adapter: "Adapter", base: "BaseModel") -> str | None:
    claimed = adapter.base_model
    if not claimed:
        return None
    known = [n for n in (base.name, base.repo_id, base.source,
                         *(base.metadata.get("aliases") or [])) if n]
    if base.root is not None:
        known.append(str(base.root))
    if any(_normalise_name(claimed) == _normalise_name(n) for n in known):
        return None
    return f"adapter says it was trained on '{claimed}', validating against '{base.display_name}'"


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------------------------------------
# registry suggestions


_PROBE_MODULES = 16


def suggest_bases(adapter: "Adapter", exclude: str | None = None, limit: int = 3) -> list[str]:
    """Registry manifests whose shapes fit every module of the adapter ("fits: llama-2-7b")."""
    from . import registry
    from .errors import LorahubError

    fits: list[str] = []
    for ref in registry.list_manifests():
        if exclude and ref.name == exclude:
            continue
        try:
            candidate = registry.load_manifest(ref)
        except LorahubError:
            continue
        # a few modules first: most manifests are rejected by them at once, not after checking (and
        # listing the problems of) every module of a large adapter
        probe = replace(adapter, layers=dict(itertools.islice(adapter.layers.items(), _PROBE_MODULES)),
                        full_tensors={})
        if len(adapter.layers) > _PROBE_MODULES and not validate(probe, candidate, suggest=False).ok:
            continue
        report = validate(adapter, candidate, suggest=False)
        if report.ok and report.matched:
            fits.append(ref.name)
        if len(fits) >= limit:
            break
    return fits
