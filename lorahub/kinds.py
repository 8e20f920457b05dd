"""Layer kinds: each kind owns its geometry, so merge, validate, names, resize and blend ask the kind.

The *math view* of every layer is ΔW = s · B₂ · A₂, with A₂ = A.flatten(1) of shape (r, k) and
B₂ = B.flatten(1) of shape (n, r). A kind says how that (n, k) matrix lies in the base weight:

| kind        | A (native)        | B (native)      | base weight       | ΔW in base layout          |
| ----------- | ----------------- | --------------- | ----------------- | -------------------------- |
| linear      | (r, in)           | (out, r)        | (out, in)         | s·B·A                      |
| conv1d      | (r, in)           | (out, r)        | (in, out)         | (s·B·A)ᵀ  (GPT-2 Conv1D)    |
| conv        | (r, in, kh, kw)   | (out, r, 1, 1)  | (out, in, kh, kw) | (s·B₂·A₂).reshape          |
| embedding   | (r, num)          | (dim, r)        | (num, dim)        | (s·B·A)ᵀ                   |

A new kind (LyCORIS LoHa, LoKr, ...) is one `LayerKind` subclass and one `register_kind` line.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from .adapter import LoraLayer

Shape = tuple[int, ...]

# transformers' Conv1D layers (weight stored (in, out)): the module leaf names, and the model types
# whose layers with those names are Conv1D (PEFT decides by `isinstance(layer, Conv1D)`)
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn", "c_attn_q"})
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


class LayerKind:
    """The geometry of one kind of adapted layer. Stateless: one instance per kind."""

    name: ClassVar[str] = ""
    # the base stores the math view transposed: (k, n) instead of (n, k)
    transposed: ClassVar[bool] = False
    # DoRA magnitude layout, for messages
    magnitude_layout: ClassVar[str] = "shape (out,)"

    # -- shapes -----------------------------------------------------------------------------
    def base_shape(self, a_shape: Shape, b_shape: Shape) -> Shape:
        """The shape of the base weight a layer with these factor shapes adapts."""
        return (b_shape[0], math.prod(a_shape[1:]))

    def base_dims(self, base_shape: Shape) -> tuple[list[int], int]:
        """(A's expected trailing dims, B's expected rows) for a base weight of this shape."""
        if len(base_shape) > 2:
            return list(base_shape[1:]), base_shape[0]
        out, inp = (base_shape[1], base_shape[0]) if self.transposed else base_shape
        return [inp], out

    def fits(self, a_shape: Shape, b_shape: Shape, base_shape: Shape | None) -> bool:
        """Whether factors of these shapes fit a base weight of `base_shape`."""
        if base_shape is None or len(base_shape) < 2 or len(b_shape) < 1:
            return False
        want_in, out = tuple(a_shape[1:]), b_shape[0]
        if len(base_shape) == 2:
            rows, cols = (base_shape[1], base_shape[0]) if self.transposed else base_shape
            return out == rows and math.prod(want_in) == cols and all(d == 1 for d in want_in[1:])
        # a conv weight (out, in, kh, kw): a linear adapter fits a 1×1 kernel
        if want_in == tuple(base_shape[1:]) or (
                len(want_in) == 1 and all(d == 1 for d in base_shape[2:]) and want_in[0] == base_shape[1]):
            return out == base_shape[0]
        return False

    def out_features(self, base_shape: Shape) -> int:
        """Rows of the math view (one DoRA magnitude each) of a base weight of this shape."""
        return self.base_dims(base_shape)[1]

    def expected_text(self, base_shape: Shape) -> str:
        """The factor shapes a base weight wants, for validation reports."""
        want_in, out = self.base_dims(base_shape)
        if len(base_shape) > 2:
            return f"A [r, {', '.join(map(str, want_in))}], B [{out}, r, 1, 1] (W {list(base_shape)})"
        suffix = " Conv1D" if self.transposed and self.name == "conv1d" else ""
        return f"A [r, {want_in[0]}], B [{out}, r] (W {list(base_shape)}{suffix})"

    def kernel_size(self, a_shape: Shape) -> Shape:
        return ()

    def is_spatial(self, a_shape: Shape) -> bool:
        """A k×k kernel (any dimension > 1): its ΔW is a convolution of the factors, and resize gives
        it its own rank (1×1 kernels count as linear)."""
        return False

    # -- tensors ----------------------------------------------------------------------------
    def math_view(self, weight: torch.Tensor, n: int) -> torch.Tensor:
        """The (n, k) view of a base-layout tensor: rows are the layer's output features."""
        return weight.view(-1, n).T if self.transposed else weight.view(n, -1)

    def to_base_layout(self, delta_math: torch.Tensor, base_shape: Shape) -> torch.Tensor:
        """An (n, k) math-view matrix in the base weight's layout."""
        return delta_math.T if self.transposed else delta_math.reshape(base_shape)

    def native_factors(self, up: torch.Tensor, down: torch.Tensor, a_shape: Shape,
                       b_shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Math-view factors (n×r', r'×k) reshaped to the kind's stored shapes."""
        return up, down


class Linear(LayerKind):
    name = "linear"


class Conv1D(LayerKind):
    """transformers' Conv1D (GPT-2 `c_attn`...): a linear layer whose weight is stored (in, out)."""

    name = "conv1d"
    transposed = True

    def base_shape(self, a_shape: Shape, b_shape: Shape) -> Shape:
        return (math.prod(a_shape[1:]), b_shape[0])


class Embedding(LayerKind):
    """nn.Embedding: weight (num, dim); A is (r, num), B (dim, r), so ΔW lies transposed."""

    name = "embedding"
    transposed = True
    magnitude_layout = "embedding dim"

    def base_shape(self, a_shape: Shape, b_shape: Shape) -> Shape:
        return (a_shape[1], b_shape[0])

    def fits(self, a_shape: Shape, b_shape: Shape, base_shape: Shape | None) -> bool:
        if base_shape is None or len(base_shape) != 2 or len(b_shape) < 1:
            return False
        return tuple(a_shape[1:]) == (base_shape[0],) and b_shape[0] == base_shape[1]


class Conv(LayerKind):
    """nn.Conv1d/2d/3d: A is (r, in, *kernel), B (out, r, 1, 1)."""

    name = "conv"
    magnitude_layout = "shape (1, out, 1, 1)"

    def base_shape(self, a_shape: Shape, b_shape: Shape) -> Shape:
        return (b_shape[0], *a_shape[1:])

    def kernel_size(self, a_shape: Shape) -> Shape:
        return tuple(a_shape[2:])

    def is_spatial(self, a_shape: Shape) -> bool:
        return any(d != 1 for d in a_shape[2:])

    def native_factors(self, up: torch.Tensor, down: torch.Tensor, a_shape: Shape,
                       b_shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        rank = down.shape[0]
        return (up.reshape(up.shape[0], rank, *([1] * (len(b_shape) - 2))),
                down.reshape(rank, *a_shape[1:]))


KINDS: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind) -> LayerKind:
    KINDS[kind.name] = kind
    return kind


LINEAR = register_kind(Linear())
CONV1D = register_kind(Conv1D())
EMBEDDING = register_kind(Embedding())
CONV = register_kind(Conv())


def get_kind(name: str) -> LayerKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown layer kind '{name}' (known: {', '.join(KINDS)})") from None


def kind_of(layer: "LoraLayer", conv1d: bool | None = None) -> LayerKind:
    """The geometry of a layer. A linear layer is a Conv1D when its adapter says fan_in_fan_out, or,
    when `conv1d` is given, when the base layer is one (the base decides, as PEFT does)."""
    kind = get_kind(layer.kind)
    if kind.name in ("linear", "conv1d"):
        transposed = (layer.fan_in_fan_out or kind is CONV1D) if conv1d is None else conv1d
        return CONV1D if transposed else LINEAR
    return kind


def conv1d_by_name(target: str, component: bool = False) -> bool:
    """Offline (no base at hand): whether a module may be a transformers Conv1D, by its name alone: its
    leaf is a Conv1D leaf name (`c_attn`, ...) and it is not in a diffusers component (`component`).
    Any other module is an ordinary layer whatever an adapter's `fan_in_fan_out` says (PEFT ignores the
    flag for `nn.Linear`); with a base, the base decides (`lorahub.names.base_conv1d`)."""
    return not component and target.rsplit(".", 1)[-1] in CONV1D_LEAVES


def factor_kind(a_shape: Shape, embedding: bool = False) -> str:
    """The kind a pair of factors describes by their shapes alone (format readers)."""
    if embedding:
        return EMBEDDING.name
    return CONV.name if len(a_shape) > 2 else LINEAR.name
