"""LyCORIS algorithms as lorahub layers: LoHa, LoKr, LoCon with a Tucker mid, full diffs, DoRA.

A LyCORIS module becomes a `LoraLayer` whose `lycoris` field holds a `LycorisModule`: the algorithm,
its factor tensors (by role, see `ROLES`), the scale LyCORIS's forward pass applies and the DoRA
orientation. The layer's A and B are `ComputedTensor`s: the factors of an EXACT plain-LoRA
factorisation of the same ΔW (docs/lycoris.md states and proves each identity), computed on demand and
never the dense ΔW, so validate, convert, resize and blend work on LyCORIS layers unchanged:

- loha: ΔW = s·(W1a·W1b) ⊙ (W2a·W2b) = s·B·A with B = W1a ⊙ᵣ W2a (row-wise Khatri–Rao, "face-splitting")
  and A = W1b ⊙꜀ W2b (column-wise Khatri–Rao); R = r1·r2. With Tucker cores (k×k convs), each half is
  Bᵢ·Aᵢ with Bᵢ = wᵢaᵀ and Aᵢ[a, (n, x)] = Σ_b tᵢ[a, b, x]·wᵢb[b, n], then as above.
- lokr: ΔW = s·kron(W1, W2) = s·kron(U1, U2)·kron(V1, V2) for any exact splits Wᵢ = Uᵢ·Vᵢ (the stored
  w_a/w_b pair; (I, W) or (W, I) for a full side, no rounding); R = ρ1·ρ2. A conv's W2 is flattened
  to (b, d·kh·kw), which is exactly the base's column order.
- locon with a Tucker mid: ΔW = s·Σ mid[a, b, x]·up[o, a]·down[b, n]: B = up, A[a, (n, x)] =
  Σ_b mid[a, b, x]·down[b, n]; R = r.
- full: ΔW = diff: B = diff, A = I (or B = I, A = diff); R = min(n, k).

Merging does not use these factors: it forms ΔW in LyCORIS's own order of operations (`dense_delta`)
and adds it, so a merge equals what LyCORIS's forward pass applies. Nothing here knows file key names
(the reader, `lorahub.formats.lycoris_read`, maps keys to roles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .adapter import LazyTensor
from .errors import LorahubError
from .lazy import torch

if TYPE_CHECKING:
    from .adapter import LoraLayer

Shape = tuple[int, ...]

ALGORITHMS = ("loha", "lokr", "locon", "full")
# the roles each algorithm's tensors play (the reader maps file keys to these)
ROLES = {
    "loha": ("w1a", "w1b", "w2a", "w2b", "t1", "t2"),
    "lokr": ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"),
    "locon": ("up", "down", "mid"),
    "full": ("diff",),
}


class ComputedTensor(LazyTensor):
    """A tensor of known shape computed on demand (never cached: the caller keeps what it needs)."""

    __slots__ = ("_compute",)

    def __init__(self, compute: Callable[[], torch.Tensor], shape: Shape, dtype: str = "F32", key: str | None = None):
        super().__init__(shape=shape, dtype=dtype, key=key)
        self._compute = compute

    def load(self) -> torch.Tensor:
        value = self._compute()
        assert tuple(value.shape) == tuple(self.shape), (value.shape, self.shape)
        return value

    def __repr__(self) -> str:
        return f"ComputedTensor({self.dtype}{list(self.shape)} @ {self.key})"


@dataclass
class LycorisModule:
    """One LyCORIS module: its algorithm, factor tensors by role, and what LyCORIS's forward applies."""

    algo: str
    tensors: dict[str, LazyTensor]
    out_features: int  # n: rows of ΔW
    in_shape: Shape  # the trailing dims of ΔW as the factors give them: (k,) when flattened, (in, *kernel) else
    scale: float  # the factor LyCORIS's forward multiplies the rebuilt ΔW by (alpha/dim, 1 for full)
    rank: int  # R: the rank of the exact LoRA factorisation
    dora_on_out: bool | None = None  # DoRA: norm per output row (True) or per input channel (False)
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key, for messages
    resolved: bool = False  # flattened factors matched against a base layer (`resolve_with_base`)
    # A and B split the unscaled dense ΔW (rank min(n, k)): the identity's rank (r1·r2, ρ1·ρ2, r) is
    # larger than that, so its factors would be larger than ΔW itself (`dense_when_smaller`)
    dense: bool = False

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def flattened(self) -> bool:
        """The factors give ΔW as (n, k) only: the base decides whether k is `in` or `in·kh·kw`
        (LoHa and LoKr store a k×k convolution's factors flattened unless they use Tucker)."""
        return len(self.in_shape) == 1 and self.algo in ("loha", "lokr")

    @property
    def kernel(self) -> Shape:
        return tuple(self.in_shape[1:])

    def factor_shapes(self) -> dict[str, list[int]]:
        return {role: list(t.shape) for role, t in self.tensors.items()}

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def describe(self) -> str:
        shapes = ", ".join(f"{role} {list(t.shape)}" for role, t in self.tensors.items())
        return f"{self.algo}: {shapes}"

    def load(self, role: str, device=None) -> torch.Tensor:
        return self.tensors[role].load().to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# shapes only (torch-free): what the factors describe, checked


def _fail(module: str, message: str) -> LorahubError:
    return LorahubError(f"LyCORIS module '{module}': {message}")


def plan(algo: str, shapes: dict[str, Shape], alpha: float | None, module: str) -> tuple[int, Shape, float, int]:
    """(n, trailing dims of ΔW, scale, R) of a module from its factor shapes and alpha; a one-line error
    naming the module when the factors do not fit together."""
    def need(*roles: str) -> None:
        missing = [r for r in roles if r not in shapes]
        if missing:
            raise _fail(module, f"{algo} factor(s) {', '.join(missing)} missing")

    def dims(role: str, count: int | None = None) -> Shape:
        shape = shapes[role]
        if count is not None and len(shape) != count or len(shape) < 2:
            raise _fail(module, f"{algo} factor {role} has shape {list(shape)}")
        return shape

    def scale_of(dim: int) -> float:
        if alpha is None:
            return 1.0
        if alpha == 0:  # LyCORIS: alpha 0 means alpha = dim (scale 1); ComfyUI: scale 0 — they disagree
            raise _fail(module, "alpha is 0, which LyCORIS applies as alpha = dim (scale 1) and ComfyUI as scale 0; "
                        "set alpha to the scale·dim you mean")
        return alpha / dim

    if algo == "loha":
        need("w1a", "w1b", "w2a", "w2b")
        tucker = "t1" in shapes or "t2" in shapes
        if tucker:
            need("t1", "t2")
            (r1, n), (r1b, inp) = dims("w1a", 2), dims("w1b", 2)
            (r2, n2), (r2b, inp2) = dims("w2a", 2), dims("w2b", 2)
            t1, t2 = dims("t1"), dims("t2")
            kernel = tuple(t1[2:])
            if not (r1 == r1b == t1[0] == t1[1] and r2 == r2b == t2[0] == t2[1] and n == n2 and inp == inp2
                    and tuple(t2[2:]) == kernel):
                raise _fail(module, "Tucker LoHa factors do not fit together: " + _shapes(shapes))
            in_shape: Shape = (inp, *kernel)
        else:
            (n, r1), (r1b, k) = dims("w1a", 2), dims("w1b", 2)
            (n2, r2), (r2b, k2) = dims("w2a", 2), dims("w2b", 2)
            if not (r1 == r1b and r2 == r2b and n == n2 and k == k2):
                raise _fail(module, "LoHa factors do not fit together: " + _shapes(shapes))
            in_shape = (k,)
        return n, in_shape, scale_of(shapes["w1b"][0]), r1 * r2
    if algo == "lokr":
        for side, parts in (("w1", ("w1a", "w1b")), ("w2", ("w2a", "w2b", "t2"))):
            both = [r for r in parts if r in shapes]
            if side in shapes and both:  # LyCORIS would apply the full one and ignore the others
                raise _fail(module, f"LoKr has both a full {side} and its factors {', '.join(both)}; a file "
                            "holds one or the other")
        if "w1" in shapes:
            a, c = dims("w1", 2)
            rho1 = min(a, c)
        else:
            need("w1a", "w1b")
            (a, rho1), (rho1b, c) = dims("w1a", 2), dims("w1b", 2)
            if rho1 != rho1b:
                raise _fail(module, "LoKr w1 factors do not fit together: " + _shapes(shapes))
        if "w2" in shapes:
            w2 = dims("w2")
            b, d, kernel = w2[0], w2[1], tuple(w2[2:])
            rho2 = min(b, math.prod(w2[1:]))
        elif "t2" in shapes:
            need("w2a", "w2b")
            (r, b), (rb, d) = dims("w2a", 2), dims("w2b", 2)
            t2 = dims("t2")
            kernel = tuple(t2[2:])
            if not (r == rb == t2[0] == t2[1]):
                raise _fail(module, "Tucker LoKr factors do not fit together: " + _shapes(shapes))
            rho2 = r
        else:
            need("w2a", "w2b")
            (b, r), w2b = dims("w2a", 2), dims("w2b")
            if w2b[0] != r:
                raise _fail(module, "LoKr w2 factors do not fit together: " + _shapes(shapes))
            d, kernel = w2b[1], tuple(w2b[2:])
            rho2 = r
        # LyCORIS: scale = alpha / dim of the decomposed side; both sides full: scale 1, alpha ignored
        decomposed = shapes["w1b"][0] if "w1b" in shapes else shapes["w2b"][0] if "w2b" in shapes else None
        scale = 1.0 if decomposed is None else scale_of(decomposed)
        in_shape = (c * d, *kernel) if kernel else (c * d,)
        return a * b, in_shape, scale, rho1 * rho2
    if algo == "locon":
        need("up", "down")
        up, down = dims("up"), dims("down")
        r = down[0]
        if "mid" in shapes:
            mid = dims("mid")
            ok = up[1] == r == mid[0] == mid[1] and all(x == 1 for x in (*up[2:], *down[2:]))
            in_shape = (down[1], *mid[2:])
        else:
            ok, in_shape = up[1] == r and all(x == 1 for x in up[2:]), tuple(down[1:])
        if not ok:
            raise _fail(module, "LoCon factors do not fit together: " + _shapes(shapes))
        return up[0], in_shape, scale_of(r), r
    if algo == "full":
        need("diff")
        diff = dims("diff")
        return diff[0], tuple(diff[1:]), 1.0, min(diff[0], math.prod(diff[1:]))
    raise _fail(module, f"unknown LyCORIS algorithm {algo}")


def _shapes(shapes: dict[str, Shape]) -> str:
    return ", ".join(f"{role} {list(s)}" for role, s in shapes.items())


# ---------------------------------------------------------------------------------------------
# ΔW as LyCORIS's forward pass forms it (merge)


def dense_delta(mod: LycorisModule, device=None) -> torch.Tensor:
    """ΔW in fp32, in LyCORIS's forward order of operations (scale included, multiplier not), shape
    (n, *in_shape). The caller reshapes it to the base weight (flattened factors)."""
    g = mod.load
    if mod.algo == "loha":
        if "t1" in mod.tensors:
            rebuild1 = torch.einsum("i j ..., j r, i p -> p r ...", g("t1", device), g("w1b", device), g("w1a", device))
            rebuild2 = torch.einsum("i j ..., j r, i p -> p r ...", g("t2", device), g("w2b", device), g("w2a", device))
            delta = rebuild1 * rebuild2 * torch.tensor(mod.scale, dtype=torch.float32)
        else:
            delta = ((g("w1a", device) @ g("w1b", device)) * (g("w2a", device) @ g("w2b", device))) * \
                torch.tensor(mod.scale, dtype=torch.float32)
    elif mod.algo == "lokr":
        w1 = g("w1", device) if "w1" in mod.tensors else g("w1a", device) @ g("w1b", device)
        if "w2" in mod.tensors:
            w2 = g("w2", device)
        elif "t2" in mod.tensors:
            w2 = torch.einsum("i j ..., i p, j r -> p r ...", g("t2", device), g("w2a", device), g("w2b", device))
        else:
            w2b = g("w2b", device)
            r, o, *k = w2b.shape
            w2 = (g("w2a", device) @ w2b.view(r, -1)).view(-1, o, *k)
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        delta = torch.kron(w1, w2.contiguous())
        if mod.scale != 1:
            delta = delta * mod.scale
    elif mod.algo == "locon":
        up, down = g("up", device), g("down", device)
        if "mid" in mod.tensors:
            delta = torch.einsum("i j ..., i p, j r -> p r ...", g("mid", device), up.reshape(up.shape[0], -1).T,
                                 down.reshape(down.shape[0], -1)) * mod.scale
        else:
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * mod.scale
    elif mod.algo == "full":
        delta = g("diff", device)
    else:  # pragma: no cover - plan() refuses other algorithms
        raise ValueError(mod.algo)
    return delta.reshape(mod.out_features, *mod.in_shape)


# ---------------------------------------------------------------------------------------------
# the exact plain-LoRA factorisation (convert, resize, blend, inspect's spectra)


def _face_split(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri–Rao: (n×p) and (n×q) → (n × p·q), row i = x[i] ⊗ y[i]."""
    return (x[:, :, None] * y[:, None, :]).reshape(x.shape[0], -1)


def _khatri_rao(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Column-wise Khatri–Rao: (p×k) and (q×k) → (p·q × k), column j = x[:, j] ⊗ y[:, j]."""
    return (x[:, None, :] * y[None, :, :]).reshape(-1, x.shape[1])


def _split_full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (a×c) = U·V exactly, rank min(a, c): (I, W) or (W, I) — no rounding."""
    a, c = w.shape
    if a <= c:
        return torch.eye(a, dtype=w.dtype, device=w.device), w
    return w, torch.eye(c, dtype=w.dtype, device=w.device)


def _tucker_down(t: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(r, in·K): row a = Σ_b t[a, b, x]·wb[b, n], flattened over (n, x)."""
    return torch.einsum("i j ..., j r -> i r ...", t, wb).reshape(t.shape[0], -1)


def dense_when_smaller(mod: LycorisModule) -> LycorisModule:
    """The module with `dense` set when its factorisation's rank R exceeds min(n, k): R = r1·r2 of a LoHa
    (or ρ1·ρ2 of a LoKr) grows with the product of the stored ranks, so a small file could claim factors
    of terabytes; splitting ΔW itself (`_split_full`, exact, no rounding) is then smaller."""
    import dataclasses

    bound = min(mod.out_features, mod.in_features)
    if mod.rank <= bound or mod.algo == "full":
        return mod
    return dataclasses.replace(mod, rank=bound, dense=True)


def _unscaled_delta(mod: LycorisModule, device=None) -> torch.Tensor:
    """ΔW / scale as an (n × k) matrix, in LyCORIS's order of operations (the layer applies the scale)."""
    import dataclasses

    return dense_delta(dataclasses.replace(mod, scale=1.0), device).reshape(mod.out_features, -1)


def lora_up(mod: LycorisModule, device=None) -> torch.Tensor:
    """B (n×R), unscaled, fp32."""
    if mod.dense:
        return _split_full(_unscaled_delta(mod, device))[0]
    g = mod.load
    if mod.algo == "loha":
        if "t1" in mod.tensors:
            return _face_split(g("w1a", device).T, g("w2a", device).T)
        return _face_split(g("w1a", device), g("w2a", device))
    if mod.algo == "lokr":
        u1 = g("w1a", device) if "w1a" in mod.tensors else _split_full(g("w1", device))[0]
        return torch.kron(u1, _lokr_u2(mod, device))
    if mod.algo == "locon":
        up = g("up", device)
        return up.reshape(up.shape[0], -1)
    diff = g("diff", device)
    flat = diff.reshape(diff.shape[0], -1)
    return _split_full(flat)[0]


def lora_down(mod: LycorisModule, device=None) -> torch.Tensor:
    """A (R×k), fp32, k = in·kh·kw (columns in the base weight's flattening order)."""
    if mod.dense:
        return _split_full(_unscaled_delta(mod, device))[1]
    g = mod.load
    if mod.algo == "loha":
        if "t1" in mod.tensors:
            return _khatri_rao(_tucker_down(g("t1", device), g("w1b", device)),
                               _tucker_down(g("t2", device), g("w2b", device)))
        return _khatri_rao(g("w1b", device), g("w2b", device))
    if mod.algo == "lokr":
        v1 = g("w1b", device) if "w1b" in mod.tensors else _split_full(g("w1", device))[1]
        return torch.kron(v1, _lokr_v2(mod, device))
    if mod.algo == "locon":
        down = g("down", device).reshape(mod.tensors["down"].shape[0], -1)
        return _tucker_down(g("mid", device), down) if "mid" in mod.tensors else down
    diff = g("diff", device)
    return _split_full(diff.reshape(diff.shape[0], -1))[1]


def _lokr_w2_full(mod: LycorisModule, device) -> torch.Tensor:
    w2 = mod.load("w2", device)
    return w2.reshape(w2.shape[0], -1)


def _lokr_u2(mod: LycorisModule, device) -> torch.Tensor:
    if "w2" in mod.tensors:
        return _split_full(_lokr_w2_full(mod, device))[0]
    if "t2" in mod.tensors:
        return mod.load("w2a", device).T.contiguous()
    return mod.load("w2a", device)


def _lokr_v2(mod: LycorisModule, device) -> torch.Tensor:
    if "w2" in mod.tensors:
        return _split_full(_lokr_w2_full(mod, device))[1]
    w2b = mod.load("w2b", device)
    if "t2" in mod.tensors:
        return _tucker_down(mod.load("t2", device), w2b)
    return w2b.reshape(w2b.shape[0], -1)


def factor_tensors(mod: LycorisModule, conv: bool) -> tuple[ComputedTensor, ComputedTensor]:
    """(A, B) as computed tensors in the layer kind's native shapes: linear (R, k), (n, R); conv
    (R, in, *kernel), (n, R, 1, ...)."""
    n, R = mod.out_features, mod.rank
    a_shape: Shape = (R, *mod.in_shape) if conv else (R, mod.in_features)
    b_shape: Shape = (n, R, *([1] * len(mod.kernel))) if conv else (n, R)
    return (ComputedTensor(lambda: lora_down(mod).reshape(a_shape), a_shape, key=f"{mod.algo} A"),
            ComputedTensor(lambda: lora_up(mod).reshape(b_shape), b_shape, key=f"{mod.algo} B"))


# ---------------------------------------------------------------------------------------------
# resolving flattened factors against a base (convert/resize/blend write plain LoRA files)


def require_resolved(layers: dict[str, "LoraLayer"], operation: str, path=None) -> None:
    """Refuse flattened LyCORIS layers whose base layer is unknown: a LoHa/LoKr on a k×k convolution
    stores its factors flattened to (n, in·kh·kw), so only the base says whether A is (R, k) or
    (R, in, kh, kw). `resolve_with_base` settles it."""
    for target, layer in layers.items():
        mod = layer.lycoris
        if mod is not None and mod.flattened and not mod.resolved:
            raise LorahubError(
                f"{operation}: LyCORIS {mod.algo} module '{layer.source_name or target}' stores its factors "
                f"flattened ({mod.out_features}×{mod.in_features}); whether it adapts a Linear layer or a "
                "k×k convolution is known only from the base: pass --base", path=path)


def resolve_with_base(adapter, base) -> list[str]:
    """Give every flattened LyCORIS layer its base layer's shape (in place): a k×k convolution's layer
    becomes a conv layer with A (R, in, kh, kw); a Linear's stays linear. Returns the targets changed
    to conv. Layers with no base weight (or one that does not fit) are left for validate to report."""
    import dataclasses

    from .names import match_layers

    match = match_layers(adapter, base)
    changed = []
    for target, layer in list(adapter.layers.items()):
        mod = layer.lycoris
        if mod is None or not mod.flattened or mod.resolved or target not in match.refs:
            continue
        shape: Shape = tuple(base.shape(match.refs[target].weight) or ())
        if len(shape) < 2 or shape[0] != mod.out_features or math.prod(shape[1:]) != mod.in_features:
            continue
        conv = len(shape) > 2  # a 1×1 convolution too: kohya and diffusers want 4-D conv factors there
        new = dataclasses.replace(mod, in_shape=tuple(shape[1:]) if conv else mod.in_shape, resolved=True)
        a, b = factor_tensors(new, conv)
        adapter.layers[target] = dataclasses.replace(layer, kind="conv" if conv else layer.kind, A=a, B=b,
                                                     lycoris=new)
        if conv:
            changed.append(target)
    return changed


def fit_problem(mod: LycorisModule, base_shape: Shape) -> tuple[str, str, str] | None:
    """None when the module's ΔW fits a base weight of `base_shape`, else (expected, found, hint) for
    validate's report: the base shape the factor structure implies, the factors, and why."""
    shape = tuple(base_shape)
    n, k = mod.out_features, mod.in_features
    fits = len(shape) >= 2 and shape[0] == n and math.prod(shape[1:]) == k
    if fits and not mod.flattened:
        fits = tuple(shape[1:]) == tuple(mod.in_shape) or all(d == 1 for d in (*shape[2:], *mod.kernel))
    if fits:
        return None
    implied = [n, *mod.in_shape]
    hint = f"{mod.algo} ΔW is {implied[0]}×{'·'.join(map(str, implied[1:]))}"
    if mod.algo == "lokr":
        w1 = mod.tensors.get("w1")
        a, c = (w1.shape if w1 is not None else (mod.tensors["w1a"].shape[0], mod.tensors["w1b"].shape[1]))
        hint += f" = kron: out {a}·{n // a}, in {c}·{k // c}"
    if len(shape) >= 2 and math.prod(shape[1:]) != k:
        hint += f"; the base has {math.prod(shape[1:])} input features per output"
    if shape and shape[0] != n:
        hint += f"; the base has {shape[0]} outputs"
    wants = f"ΔW {shape[0]}×{math.prod(shape[1:])} (W {list(shape)})" if len(shape) >= 2 else f"W {list(shape)}"
    return wants, f"{mod.describe()} → ΔW {implied}", hint


def magnitude_count(mod: LycorisModule, base_shape: Shape) -> int:
    """How many DoRA magnitudes the base weight wants: one per output row, or per input channel."""
    return base_shape[0] if mod.dora_on_out else base_shape[1]


def lycoris_for_writing(adapter, operation: str) -> list[str]:
    """Checks before LyCORIS layers are written as plain LoRA layers; returns the warnings to show.
    Refused: flattened factors without a base (kernel unknown), DoRA per input channel (PEFT, kohya and
    diffusers DoRA norm per output row)."""
    require_resolved(adapter.layers, operation, adapter.path)
    lyco = [layer for layer in adapter.layers.values() if layer.lycoris is not None]
    for layer in lyco:
        mod = layer.lycoris
        if layer.magnitude is not None and not mod.dora_on_out:
            raise LorahubError(f"{operation}: LyCORIS module '{layer.source_name or layer.target}' uses DoRA per "
                               "input channel (wd_on_out=False); PEFT, kohya and diffusers DoRA norm per output "
                               "row, so no plain LoRA file carries it", path=adapter.path)
    if not lyco:
        return []
    algos = sorted({layer.lycoris.algo for layer in lyco})
    warnings = [f"{len(lyco)} LyCORIS {'/'.join(algos)} module(s) written as plain LoRA factors of exactly the "
                f"same ΔW (fp32, rank up to {max(layer.rank for layer in lyco)})"]
    if any(layer.magnitude is not None for layer in lyco):
        warnings.append("LyCORIS DoRA (wd_on_out) kept as DoRA magnitudes: PEFT's norm has no eps and a "
                        "weight c ≠ 1 rescales differently than LyCORIS's multiplier")
    return warnings


def delta_base_names(adapter, base) -> dict[str, str | None]:
    """The base tensor each `diff`/`diff_b` delta on a vector adds to (`adapter.delta_tensors`, keyed
    `<module target>.weight|bias`), or None: the module is found as `names.match_layers` finds LyCORIS
    modules, its bias beside its weight."""
    from .adapter import Adapter
    from .names import match_layers

    targets = {name.rpartition(".")[0] for name in adapter.delta_tensors}
    probe = Adapter(path=adapter.path, format=adapter.format, other_modules=dict.fromkeys(targets, "full"),
                    has_components=adapter.has_components)
    match = match_layers(probe, base)
    found: dict[str, str | None] = {}
    for name in adapter.delta_tensors:
        target, _, role = name.rpartition(".")
        weight = match.other.get(target)
        tensor = weight if role == "weight" or weight is None else weight.removesuffix("weight") + "bias"
        found[name] = tensor if tensor is not None and base.shape(tensor) is not None else None
    return found
