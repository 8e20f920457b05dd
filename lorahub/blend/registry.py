"""Blend methods as registered units, after mergekit's `MergeMethod`.

A method is one function of a module's terms, `(terms, ctx) -> LayerResult`, registered with its name,
a one-line description, its kind (factored or element-wise), its parameters (type, default, range or
choices, help) and the reference it reproduces:

    @register("mean", kind=FACTORED, description="exact mean, rank Σrᵢ", reference="…",
              formula="…", rank="`Σ rᵢ`", exact="**yes**", params=(Param("gamma", float, 0.5, "…", min=0),))
    def blend_mean(terms: Sequence[Term], ctx: LayerContext) -> LayerResult: ...

Everything else is derived from these records: `METHODS`, the CLI's `--method` choices and
method-specific options, the option checks (ranges and choices; rules across parameters are `checks`)
and the methods table of docs/blend.md (`methods_markdown`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import OptionError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .api import BlendOptions

FACTORED = "factored"  # works on the factors, never forms the dense ΔW
ELEMENTWISE = "elementwise"  # acts on the entries of each dense ΔWᵢ
_KINDS = (FACTORED, ELEMENTWISE)
DEFAULT_METHOD = "svd"


# ----------------------------------------------------------------------------------------------
# what a method function receives and returns

@dataclass
class Term:
    """One adapter's contribution to one layer: ΔWᵢ = scale·up·down, weighted by `weight`."""

    index: int  # which adapter
    weight: float
    scale: float
    up: Tensor  # n×r, unscaled, fp32 on the compute device
    down: Tensor  # r×k
    bias: Tensor | None  # the LoRA bias (added to the base bias as scale·bias)

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

    def value(self, name: str) -> Any:
        """The value of a method parameter (a BlendOptions field or a registered parameter's default)."""
        return self.options.value(name)


LayerFunction = Callable[[Sequence[Term], LayerContext], LayerResult]


# ----------------------------------------------------------------------------------------------
# parameters

def _num(x: float) -> str:
    return f"{x:g}"


def _either(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


@dataclass(frozen=True)
class Param:
    """A method parameter: the BlendOptions field (or `extra` key) `name`, the CLI flag `--name-with-dashes`."""

    name: str
    type: type  # int, float, str or bool
    default: Any = None
    help: str = ""  # a phrase: the CLI help, the docs and "needs --x (…)" messages start from it
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # (min, …] rather than [min, …]
    required: bool = False
    why: str = ""  # appended to the out-of-range message
    # True: refused when given to a method without it; False: ignored there, as blend always did for it
    strict: bool = True
    recorded: Callable[[BlendOptions], bool] | None = None  # in the report's options only when this holds

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """'in [0, 1]', '≥ 1', … ('' without a range)."""
        if self.min is not None and self.max is not None:
            return f"in {'(' if self.min_open else '['}{_num(self.min)}, {_num(self.max)}]"
        if self.min is not None:
            return f"{'>' if self.min_open else '≥'} {_num(self.min)}"
        return f"≤ {_num(self.max)}" if self.max is not None else ""

    def in_range(self, value: float) -> bool:
        low = self.min is None or (value > self.min if self.min_open else value >= self.min)
        return low and (self.max is None or value <= self.max)

    def check(self, value: Any, method: str) -> None:
        """Raise OptionError (a usage error, exit 2) when `value` is missing, not a choice or out of range."""
        if value is None:
            if self.required:
                detail = ", ".join(part for part in (self.help, self.range_text()) if part)
                raise OptionError(f"method {method} needs {self.flag} ({detail})")
            return
        if self.choices is not None:
            if value not in self.choices:
                raise OptionError(f"{self.flag} must be {_either(self.choices)}, got {value!r}")
            return
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OptionError(f"{self.flag} must be a number, got {value!r}")
            if self.type is int and not float(value).is_integer():
                raise OptionError(f"{self.flag} must be an integer, got {value!r}")
            if not self.in_range(value):
                raise OptionError(f"{self.flag} must be {self.range_text()}, got {_num(value)}"
                                   + (f": {self.why}" if self.why else ""))


# ----------------------------------------------------------------------------------------------
# methods

@dataclass(frozen=True)
class BlendMethod:
    name: str
    description: str  # one line: the CLI's --method help
    kind: str  # FACTORED or ELEMENTWISE
    fn: LayerFunction
    params: tuple[Param, ...] = ()
    reference: str = ""  # the paper or PEFT function it reproduces (markdown)
    formula: str = ""  # docs table: the result per module (markdown)
    rank: str = ""  # docs table: the rank written (markdown)
    exact: str = ""  # docs table: how exact it is (markdown)
    checks: tuple[Callable[[BlendOptions], None], ...] = ()  # rules across parameters, after the range checks

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def parallel(self) -> bool:
        """Layers side by side on CPU threads: factored methods are small per layer; dense ones are not."""
        return self.kind == FACTORED


_REGISTRY: dict[str, BlendMethod] = {}


def register(name: str, *, description: str, kind: str, params: Sequence[Param] = (), reference: str = "",
             formula: str = "", rank: str = "", exact: str = "",
             checks: Sequence[Callable[[BlendOptions], None]] = ()) -> Callable[[LayerFunction], LayerFunction]:
    """Decorator: register the decorated layer function as blend method `name`."""
    if kind not in _KINDS:
        raise ValueError(f"blend method {name!r}: kind must be {FACTORED!r} or {ELEMENTWISE!r}, got {kind!r}")

    def decorate(fn: LayerFunction) -> LayerFunction:
        add(BlendMethod(name=name, description=description, kind=kind, fn=fn, params=tuple(params),
                        reference=reference, formula=formula, rank=rank, exact=exact, checks=tuple(checks)))
        return fn
    return decorate


def add(method: BlendMethod) -> None:
    if method.name in _REGISTRY:
        raise ValueError(f"blend method {method.name!r} is registered twice")
    for param in method.params:
        # one CLI option serves every method with this parameter: they must agree on what it is
        for other in declarations().get(param.name, []):
            if (other.type, other.default, other.choices) != (param.type, param.default, param.choices):
                raise ValueError(f"blend method {method.name!r}: parameter {param.name!r} differs in type, "
                                 f"default or choices from its declaration elsewhere")
    _REGISTRY[method.name] = method


def methods() -> list[BlendMethod]:
    """Every registered method: factored ones first, each kind in registration order (so the order of
    the CLI choices and the docs table does not depend on which method module is imported first)."""
    return sorted(_REGISTRY.values(), key=lambda m: _KINDS.index(m.kind))


def method_names() -> tuple[str, ...]:
    return tuple(m.name for m in methods())


def get_method(name: str) -> BlendMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(method_names())}") from None


def declarations() -> dict[str, list[Param]]:
    """Parameter name → its declarations (one per method declaring it), in first-declared order."""
    out: dict[str, list[Param]] = {}
    for method in methods():
        for param in method.params:
            out.setdefault(param.name, []).append(param)
    return out


def users(name: str) -> list[BlendMethod]:
    return [m for m in methods() if m.param(name) is not None]


def who(owners: Sequence[BlendMethod]) -> str:
    """'svd and the element-wise methods': method names for messages and help, element-wise ones grouped."""
    grouped = [m.name for m in methods() if m.kind == ELEMENTWISE]
    names = [m.name for m in owners]
    if len(grouped) > 1 and set(grouped) <= set(names):
        names = [n for n in names if n not in grouped] + ["the element-wise methods"]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def param_default(name: str) -> Any:
    found = declarations().get(name)
    if not found:
        raise KeyError(name)
    return found[0].default


def shared_range(name: str) -> Param | None:
    """The declaration when every method agrees on the parameter's range (a CLI type can check it)."""
    found = declarations()[name]
    ranges = {(p.min, p.max, p.min_open) for p in found}
    return found[0] if len(ranges) == 1 else None


def check_method_options(opts: BlendOptions) -> BlendMethod:
    """The method's own parameters against their declarations; others' only when given. One-line errors."""
    method = get_method(opts.method)
    for name, declared in declarations().items():
        value = opts.value(name)
        own = method.param(name)
        if own is not None:
            own.check(value, method.name)
            continue
        first = declared[0]
        if value is None or value == first.default:
            continue
        if not first.strict:
            first.check(value, method.name)
            continue
        note = f" ({method.name}'s rank: {method.rank.replace('`', '')})" if name == "rank" and method.rank else ""
        raise OptionError(f"{first.flag} applies to {who(users(name))}, not {method.name}{note}")
    for check in method.checks:
        check(opts)
    return method


def recorded_options(opts: BlendOptions) -> dict[str, Any]:
    """The options that shaped the result, for the report and the output's provenance metadata."""
    method = get_method(opts.method)
    out: dict[str, Any] = {"method": method.name}
    for param in method.params:
        if param.recorded is None or param.recorded(opts):
            out[param.name] = opts.value(param.name)
    return out


# ----------------------------------------------------------------------------------------------
# descriptions for the CLI and the docs

def describe_param(name: str) -> str:
    """One paragraph: what the parameter is, its range per method, and which methods take it."""
    declared = declarations()[name]
    owners = users(name)
    text = declared[0].help[:1].upper() + declared[0].help[1:]
    ranges: dict[str, list[str]] = {}
    for method, param in zip(owners, declared):
        ranges.setdefault(param.range_text(), []).append(method.name)
    if len(ranges) == 1:
        only = next(iter(ranges))
        text += f", {only}" if only else ""
    else:
        text += ", " + "; ".join(f"{r} for {', '.join(ms)}" for r, ms in ranges.items())
    whys = sorted({p.why for p in declared if p.why})
    text += "".join(f" ({why})" for why in whys)
    if all(p.required for p in declared):
        return f"{text}. Required by {who(owners)}."
    return f"{text}. For {who(owners)}."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _values(name: str) -> str:
    declared = declarations()[name]
    first = declared[0]
    if first.type is bool:
        return "flag"
    if first.choices:
        return " \\| ".join(f"`{c}`" for c in first.choices)
    kind = {int: "integer", float: "number", str: "text"}.get(first.type, first.type.__name__)
    ranges = list(dict.fromkeys(p.range_text() for p in declared if p.range_text()))
    if not ranges:
        return kind
    if len(ranges) == 1:
        return f"{kind} {ranges[0]}"
    by_range = {r: [m.name for m, p in zip(users(name), declared) if p.range_text() == r] for r in ranges}
    return f"{kind}: " + "; ".join(f"{r} ({', '.join(ms)})" for r, ms in by_range.items())


def methods_markdown(default: str | None = DEFAULT_METHOD) -> str:
    """The methods table and the parameters table of docs/blend.md, rendered from the registry."""
    lines = ["| `--method` | result per module | rank | exact? | matches |", "| --- | --- | --- | --- | --- |"]
    for m in methods():
        name = f"`{m.name}`" + (" (blend's default)" if m.name == default else "")
        lines.append(f"| {name} | {m.formula} | {m.rank} | {m.exact} | {m.reference} |")
    lines += ["", "| option | methods | values | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, declared in declarations().items():
        first = declared[0]
        if all(p.required for p in declared):
            default_text = "required"
        elif first.default is None or first.type is bool:
            default_text = "—"
        else:
            default_text = f"`{first.default}`"
        meaning = first.help[:1].upper() + first.help[1:] + "".join(f" ({w})" for w in sorted({p.why for p in declared
                                                                                                if p.why}))
        lines.append(f"| `{first.flag}` | {', '.join(m.name for m in users(name))} | {_values(name)} | "
                     f"{default_text} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def method_help() -> str:
    """The CLI's --method help: each method with its one-line description."""
    return "How to combine: " + "; ".join(f"{m.name} ({m.description})" for m in methods()) + "."
