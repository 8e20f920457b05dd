"""The math on one base tensor: every op in fp32 on the upcast `W`, rounded once by the caller.

| op       | effect on the fp32 upcast `W` of the base tensor (base layout)                          |
| -------- | ---------------------------------------------------------------------------------------- |
| add      | `W += c·s·B₂A₂` in the base layout (Conv1D / embedding: transposed; conv: reshaped)       |
| dora     | `W ← (m / ‖W₀ + c·ΔW‖_row) ⊙ (W + c·ΔW)`; the row norm is recorded for unmerge             |
| bias     | `b += c·s·bias` (lora_bias), or `b += c·bias` for an unscaled `diff_b` bias delta        |
| add_tensor | `W += c·T`: a LyCORIS/Wan `diff`/`diff_b` delta on a vector (norm weight, bias)         |
| replace  | `W ← T` (modules_to_save), or `W + c·(T − W)` for a weight c ≠ 1                          |
| undora   | `W ← W / (m / n_recorded) − c·ΔW`                                                       |
| restore  | the recorded original bytes, bit-exact                                                   |

`c` is the user's weight (negated by unmerge for `add`/`bias`), `s` the layer's scale, `W₀` the base
tensor before this merge (PEFT computes the DoRA norm from the unmerged base weight too).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..adapter import LazyTensor, LoraLayer
from ..errors import LorahubError
from .lycoris_ops import lycoris_add, lycoris_check_shape, lycoris_dora, lycoris_undora

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass
class Op:
    """One change to one base tensor (see the module docstring)."""

    kind: str  # add | dora | bias | add_tensor | replace | undora | restore
    coeff: float = 1.0
    layer: LoraLayer | None = None
    tensor: LazyTensor | None = None  # replace: the new value
    norm: torch.Tensor | None = None  # undora: the row norms recorded at merge time
    norm_key: str | None = None  # dora: the undo-file key to record the row norms under
    adapter_index: int = 0
    # replace: the base's storage dtype; a replacement becomes the new weight as the model would hold it
    # (PEFT loads modules_to_save / saved embeddings into the model's dtype before merging the rest)
    storage_dtype: torch.dtype | None = None
    rows: tuple[int, int] | None = None  # add/bias: the row block of a fused weight (OpenCLIP in_proj)

    @property
    def lora_layer(self) -> LoraLayer:
        """The layer of an add/bias/dora/undora op (the planner gives each of them one)."""
        assert self.layer is not None, f"a '{self.kind}' op without a layer"
        return self.layer


class Workspace:
    """Reusable scratch tensors: a fresh allocation per tensor page-faults, which on a 7B merge costs
    more than the arithmetic."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self._buffers[name] = buffer
        return buffer[:numel].view(tuple(shape))


# ---------------------------------------------------------------------------------------------
# orientation: the layer's kind (lorahub.kinds) knows how a base weight stores its (n, k) matrix


def _math_view(weight: torch.Tensor, layer: LoraLayer) -> tuple[torch.Tensor, bool]:
    """The (n, k) view of a base-layout tensor (rows: the layer's output features), and whether it is
    the transpose of the stored matrix (Conv1D and embedding weights store (k, n))."""
    kind = layer.geometry
    return kind.math_view(weight, layer.out_features), kind.transposed


def _check_shape(weight: torch.Tensor, layer: LoraLayer, name: str) -> None:
    if layer.lycoris is not None:
        lycoris_check_shape(weight, layer, name)
        return
    n, k = layer.out_features, layer.in_features
    expected = tuple(layer.base_shape)
    squeezed = tuple(d for d in weight.shape if d != 1) == tuple(d for d in expected if d != 1)
    if weight.numel() != n * k or not (tuple(weight.shape) == expected or squeezed):
        raise LorahubError(f"adapter layer '{layer.target}' has ΔW of shape {list(expected)} but the base "
                           f"tensor is {list(weight.shape)}", key=name)


# ---------------------------------------------------------------------------------------------
# the arithmetic


def _is_power_of_two(value: float) -> bool:
    return value != 0 and math.isfinite(value) and math.frexp(abs(value))[0] == 0.5


@functools.cache
def _fused_matches_peft() -> bool:
    """Whether this machine's CPU BLAS gives `W.addmm_(B·s, A)` the bits of PEFT's `W + (B @ A) * s`
    (power-of-two s) on a few shapes of 16+ rows and columns, both orientations; once per process."""
    gen = torch.Generator().manual_seed(0)
    for n, k, r in ((64, 48, 8), (16, 96, 4), (128, 16, 16), (40, 24, 1)):
        W, up, down = (torch.randn(shape, generator=gen) for shape in ((n, k), (n, r), (r, k)))
        expected = W + torch.mm(up, down).mul_(0.5)
        fused = W.clone().addmm_(up * 0.5, down)
        stored = W.T.contiguous().addmm_(down.T, (up * 0.5).T)
        if not (torch.equal(fused, expected) and torch.equal(stored.T, expected)):
            return False
    return True


def _add_delta(weight: torch.Tensor, layer: LoraLayer, coeff: float, device: torch.device,
               workspace: Workspace | None = None) -> None:
    """weight += coeff·s·ΔW in place, fp32, in the base layout, in PEFT's own order of operations.

    PEFT computes `(B @ A) * s` and then adds. When `coeff·s` is a power of two the scaling is exact, so
    one GEMM with beta=1 (`addmm_`) gives the same bits with one pass over the weight instead of three;
    otherwise the product is formed in a scratch buffer, scaled and added, exactly as PEFT does.
    """
    if layer.lycoris is not None:
        lycoris_add(weight, layer, coeff, device)
        return
    scale = coeff * layer.scale
    if scale == 0:
        return
    if layer.is_spatial:
        # k×k kernels: PEFT (and diffusers' fuse_lora) form ΔW as a convolution of the factors
        down = layer.A.load().to(device=device, dtype=torch.float32)
        up = layer.B.load().to(device=device, dtype=torch.float32)
        conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d,
                5: torch.nn.functional.conv3d}[down.dim()]
        delta = conv(down.transpose(0, 1), up).transpose(0, 1) * scale
        weight.add_(delta.reshape(weight.shape))
        return
    up, down = layer.factors(device, torch.float32)
    view, transposed = _math_view(weight, layer)
    # cuBLAS's addmm accumulates the product onto W, so a merge and its unmerge would round differently:
    # the fused form is used on CPU only, where the BLAS gives the same bits as forming the product first
    # for matrices of 16+ rows and columns (smaller ones take another kernel that accumulates onto W:
    # 1-2 ulps off PEFT) — checked once per process on this machine's BLAS (`_fused_matches_peft`)
    if _is_power_of_two(scale) and weight.device.type == "cpu" and min(view.shape) >= 16 and _fused_matches_peft():
        if transposed:
            view.T.addmm_(down.T, (up * scale).T)  # the stored (k, n) += (B·A)ᵀ
        else:
            view.addmm_(up * scale, down)
        return
    shape = (up.shape[0], down.shape[1])
    delta = workspace.get("delta", shape) if workspace is not None else \
        torch.empty(shape, dtype=torch.float32, device=device)
    torch.mm(up, down, out=delta)
    delta.mul_(scale)
    view.add_(delta)


def fits_dtype(work: torch.Tensor, dtype: torch.dtype) -> bool:
    """No NaN/inf in the fp32 `work`, and none after rounding it to `dtype`.

    ‖work‖₂ is finite only if every element is, and bounds every |element|; if it is ≤ the dtype's
    largest finite value no element rounds to inf. One fast reduction instead of `isfinite().all()`,
    which is ten times slower than the whole merge arithmetic on CPU; that exact check runs only when
    the norm test is inconclusive.
    """
    norm = float(torch.linalg.vector_norm(work))
    if math.isfinite(norm) and norm <= torch.finfo(dtype).max:
        return True
    return bool(torch.isfinite(work.to(dtype)).all())


def _magnitude(layer: LoraLayer, device: torch.device, name: str) -> torch.Tensor:
    assert layer.magnitude is not None  # dora/undora ops are planned only for DoRA layers (layer.is_dora)
    magnitude = layer.magnitude.load().to(device=device, dtype=torch.float32).reshape(-1)
    if magnitude.numel() != layer.out_features:
        raise LorahubError(f"DoRA magnitude has {magnitude.numel()} values but the layer has "
                           f"{layer.out_features} output features", key=name)
    return magnitude


def _row_norms(weight: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    return torch.linalg.vector_norm(_math_view(weight, layer)[0], dim=1)


def apply_ops(weight: torch.Tensor, ops: Sequence[Op], *, name: str = "",
              device: torch.device | str | None = None,
              workspace: Workspace | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply `ops` in order to an fp32 tensor in the base layout (modified in place).

    Returns it and the DoRA row norms to record ({norm_key: (n,) fp32}).
    """
    device = torch.device(device) if device is not None else weight.device
    norms: dict[str, torch.Tensor] = {}
    original: torch.Tensor | None = None
    if any(op.kind == "dora" for op in ops[1:]):  # a later DoRA op takes its norm from the unmerged W₀
        original = workspace.get("original", weight.shape) if workspace is not None else torch.empty_like(weight)
        original.copy_(weight)
    for index, op in enumerate(ops):
        if op.kind == "add":
            layer = op.lora_layer
            target = weight[op.rows[0]:op.rows[1]] if op.rows else weight
            _check_shape(target, layer, name)
            _add_delta(target, layer, op.coeff, device, workspace)
        elif op.kind == "bias":
            layer = op.lora_layer
            assert layer.bias is not None  # bias ops are planned only for layers with a LoRA bias
            target = weight[op.rows[0]:op.rows[1]] if op.rows else weight
            bias = layer.bias.load().to(device=device, dtype=torch.float32).reshape(target.shape)
            target.add_(bias * (op.coeff * layer.bias_scale))
        elif op.kind == "dora" and op.lora_layer.lycoris is not None:
            if index > 0:
                raise LorahubError("a LyCORIS DoRA module must be the only change to its base tensor in one merge",
                                   key=name)
            _check_shape(weight, op.lora_layer, name)
            norm = lycoris_dora(weight, op.lora_layer, op.coeff, device)
            if op.norm_key:
                norms[op.norm_key] = norm
        elif op.kind == "undora" and op.lora_layer.lycoris is not None:
            assert op.norm is not None
            _check_shape(weight, op.lora_layer, name)
            lycoris_undora(weight, op.lora_layer, op.coeff, op.norm, device)
        elif op.kind == "dora":
            layer = op.lora_layer
            _check_shape(weight, layer, name)
            magnitude = _magnitude(layer, device, name)
            if index == 0 or original is None:
                _add_delta(weight, layer, op.coeff, device, workspace)
                norm = _row_norms(weight, layer)
            else:
                unmerged = original.clone()
                _add_delta(unmerged, layer, op.coeff, device, workspace)
                norm = _row_norms(unmerged, layer)
                del unmerged
                _add_delta(weight, layer, op.coeff, device, workspace)
            _math_view(weight, layer)[0].mul_((magnitude / norm).unsqueeze(1))
            if op.norm_key:
                norms[op.norm_key] = norm
        elif op.kind == "undora":
            layer = op.lora_layer
            assert op.norm is not None  # undora ops are built with the norms read from the undo file
            _check_shape(weight, layer, name)
            magnitude = _magnitude(layer, device, name)
            norm = op.norm.to(device=device, dtype=torch.float32).reshape(-1)
            _math_view(weight, layer)[0].div_((magnitude / norm).unsqueeze(1))
            _add_delta(weight, layer, -op.coeff, device, workspace)
        elif op.kind == "add_tensor":  # a diff/diff_b delta added as it is (times the weight)
            assert op.tensor is not None
            value = op.tensor.load().to(device=device, dtype=torch.float32)
            if value.numel() != weight.numel():
                raise LorahubError(f"delta has shape {list(value.shape)} but the base tensor is {list(weight.shape)}",
                                   key=name)
            weight.add_(value.reshape(weight.shape) if op.coeff == 1 else value.reshape(weight.shape) * op.coeff)
        elif op.kind in ("replace", "restore"):
            assert op.tensor is not None  # replace/restore ops are always built with their new value
            value = op.tensor.load().to(device=device)
            if op.storage_dtype is not None:
                value = value.to(op.storage_dtype)
            value = value.to(torch.float32)
            if value.numel() != weight.numel():
                raise LorahubError(f"replacement has shape {list(value.shape)} but the base tensor is "
                                   f"{list(weight.shape)}", key=name)
            value = value.reshape(weight.shape)
            if op.kind == "restore" or op.coeff == 1.0:
                weight.copy_(value)
            else:
                weight.add_(value - weight, alpha=op.coeff)
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown op {op.kind}")
    return weight, norms
