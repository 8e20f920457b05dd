"""The merge math of LyCORIS layers (`LoraLayer.lycoris`), as LyCORIS's forward pass applies it.

| op      | effect on the fp32 upcast `W` (base layout; flattened factors reshaped to it)                   |
| ------- | --------------------------------------------------------------------------------------------- |
| add     | `W += ΔW` (c = 1) or `W += ΔW·c`: LyCORIS's `base + diff_weight * multiplier`                 |
| dora    | `V = W₀ + ΔW`, `N = ‖V‖ + eps` per output row (wd_on_out) or per input channel (over out and   |
|         | the kernel), `W ← V·f` with `f = m/N`, or `c·(m/N − 1) + 1` for a weight c ≠ 1 (LyCORIS's     |
|         | `weight_decompose`; ΔW is not multiplied by c). `N` is recorded for unmerge                  |
| undora  | `W ← W / f − ΔW` with `f` from the recorded `N`                                               |

ΔW comes from `lorahub.lycoris.dense_delta` (LyCORIS's own order of operations, scale included).
"""
from __future__ import annotations

import math

import torch

from ..adapter import LoraLayer
from ..errors import LorahubError
from ..lycoris import LycorisModule, dense_delta


def _module(layer: LoraLayer) -> LycorisModule:
    assert layer.lycoris is not None
    return layer.lycoris


def lycoris_check_shape(weight: torch.Tensor, layer: LoraLayer, name: str) -> None:
    """ΔW's rows and (flattened) columns must be the base weight's; the base decides the kernel."""
    mod = _module(layer)
    shape = tuple(weight.shape)
    fits = len(shape) >= 2 and shape[0] == mod.out_features and math.prod(shape[1:]) == mod.in_features
    if fits and not mod.flattened:
        fits = tuple(shape[1:]) == tuple(mod.in_shape) or all(d == 1 for d in (*shape[2:], *mod.kernel))
    if not fits:
        raise LorahubError(f"LyCORIS {mod.algo} layer '{layer.target}' has ΔW of shape "
                           f"{[mod.out_features, *mod.in_shape]} but the base tensor is {list(shape)}", key=name)


def lycoris_add(weight: torch.Tensor, layer: LoraLayer, coeff: float, device: torch.device) -> None:
    """weight += coeff·ΔW in place (LyCORIS: `base + diff * multiplier`; for c = 1 the plain sum)."""
    if coeff == 0:
        return
    delta = dense_delta(_module(layer), device).reshape(weight.shape)
    if coeff != 1:
        delta = delta * coeff
    weight.add_(delta)


def _norm(weight: torch.Tensor, on_out: bool) -> torch.Tensor:
    """LyCORIS's weight norm (+ float32 eps), shaped to broadcast against the weight."""
    eps = torch.finfo(torch.float32).eps
    if on_out:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1)) + eps
    return (weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)) + eps


def _factor(layer: LoraLayer, norm: torch.Tensor, coeff: float, device: torch.device) -> torch.Tensor:
    assert layer.magnitude is not None
    mod = _module(layer)
    magnitude = layer.magnitude.load().to(device=device, dtype=torch.float32)
    if magnitude.numel() != norm.numel():
        axis = "output rows" if mod.dora_on_out else "input channels"
        raise LorahubError(f"LyCORIS DoRA scale of '{layer.target}' has {magnitude.numel()} values but the base "
                           f"weight has {norm.numel()} {axis}")
    factor = magnitude.reshape(norm.shape) / norm
    if coeff != 1:
        factor = coeff * (factor - 1) + 1
    return factor


def lycoris_dora(weight: torch.Tensor, layer: LoraLayer, coeff: float, device: torch.device) -> torch.Tensor:
    """W ← (W + ΔW)·f in place (see the module docstring); returns N (flattened) for the undo record."""
    mod = _module(layer)
    weight.add_(dense_delta(mod, device).reshape(weight.shape))
    norm = _norm(weight, bool(mod.dora_on_out))
    weight.mul_(_factor(layer, norm, coeff, device))
    return norm.reshape(-1)


def lycoris_undora(weight: torch.Tensor, layer: LoraLayer, coeff: float, norm: torch.Tensor,
                   device: torch.device) -> None:
    """The inverse of `lycoris_dora` from the recorded N."""
    mod = _module(layer)
    shape = _norm(weight, bool(mod.dora_on_out)).shape
    recorded = norm.to(device=device, dtype=torch.float32).reshape(shape)
    weight.div_(_factor(layer, recorded, coeff, device))
    weight.sub_(dense_delta(mod, device).reshape(weight.shape))
