"""The one in-memory representation of a LoRA adapter.

Every format reader produces an `Adapter`; every writer consumes one. Factors are `LazyTensor`s:
a file-backed reference that reads its bytes only when asked (through the file's one cached handle,
`storage.open_safetensors`), or a tensor already in memory (results of resize/blend/convert).

Each layer's geometry (base weight shape, orientation, how ΔW lies in the base weight) belongs to
its kind: see `lorahub.kinds`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LorahubError
from .kinds import LayerKind, kind_of
from .lazy import LazyDict, torch

if TYPE_CHECKING:
    from .lycoris import LycorisModule


def _st_dtypes() -> dict[str, torch.dtype]:
    dtypes = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    if hasattr(torch, "float8_e4m3fn"):
        dtypes["F8_E4M3"] = torch.float8_e4m3fn
        dtypes["F8_E5M2"] = torch.float8_e5m2
    return dtypes


# safetensors dtype names <-> torch dtypes (built, and torch imported, on first use)
ST_DTYPES: LazyDict[str, torch.dtype] = LazyDict(_st_dtypes)
TORCH_TO_ST: LazyDict[torch.dtype, str] = LazyDict(lambda: {v: k for k, v in ST_DTYPES.items()})
# the dtypes LoRA factors can have: floating point that torch computes with (FP8 is widened first);
# integer, boolean, unsigned, exponent-only (F8_E8M0) and packed 4/6-bit factors are refused by operations
FACTOR_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class TensorSize:
    """`numel` and `nbytes` of a tensor described by `shape` and a safetensors `dtype` name
    (an unknown dtype counts 4 bytes an element). Mixed into `LazyTensor` and `base.BaseTensor`."""

    __slots__ = ()
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ST_ITEMSIZE.get(self.dtype, 4)


class LazyTensor(TensorSize):
    """A tensor that is either in memory or read on demand from a safetensors file."""

    __slots__ = ("path", "key", "shape", "dtype", "_value")

    def __init__(self, *, path: Path | None = None, key: str | None = None,
                 shape: tuple[int, ...] | None = None, dtype: str | None = None,
                 value: torch.Tensor | None = None):
        if value is not None:
            shape = tuple(value.shape)
            dtype = TORCH_TO_ST.get(value.dtype, str(value.dtype))
        self.path = path if path is None or isinstance(path, Path) else Path(path)  # Path(Path) re-parses
        self.key = key
        self.shape: tuple[int, ...] = tuple(shape or ())
        self.dtype: str = dtype or "F32"
        self._value = value

    @classmethod
    def of(cls, value: torch.Tensor, key: str | None = None) -> "LazyTensor":
        return cls(value=value, key=key)

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def load(self) -> torch.Tensor:
        """The tensor in its stored dtype (not cached: adapters can be larger than we want to keep).

        File-backed tensors are read from the file's one cached handle (`storage.open_safetensors`:
        the header is parsed once per file, the bytes read at the offsets it gives)."""
        if self._value is not None:
            return self._value
        if self.path is None:
            raise LorahubError("cannot read tensor: it has neither a value nor a file", key=self.key)
        from .storage import open_safetensors

        file = open_safetensors(self.path)  # a missing, corrupt or truncated file: its own error, naming it
        info = file.info(str(self.key))
        dtype = ST_DTYPES.get(info.dtype)
        if dtype is None:
            raise LorahubError(f"cannot read tensor: unsupported dtype {info.dtype}", path=self.path, key=self.key)
        nbytes = math.prod(info.shape) * ST_ITEMSIZE[info.dtype]
        if nbytes != info.end - info.begin:
            raise LorahubError(f"cannot read tensor: corrupt safetensors header ({info.end - info.begin} bytes "
                               f"for {info.dtype}{list(info.shape)})", path=self.path, key=self.key)
        if nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        raw = torch.empty(nbytes, dtype=torch.uint8)
        file.read_into(str(self.key), raw.numpy(), info)  # straight into the tensor's memory: one copy
        return raw.view(dtype).reshape(info.shape)

    def load_into(self, out: torch.Tensor) -> torch.Tensor:
        """Read this tensor into `out` (same number of elements, any shape) and return `out`. A
        file-backed tensor whose stored dtype is `out`'s goes straight from the file into `out`'s
        memory (a contiguous CPU tensor, e.g. a slot of a batch or a pinned staging buffer); otherwise
        it is loaded and copied (converting the dtype)."""
        if (self._value is None and self.path is not None and self.key is not None and out.device.type == "cpu"
                and out.is_contiguous() and ST_DTYPES.get(self.dtype) == out.dtype and out.numel() == self.numel
                and out.numel() > 0):
            from .storage import open_safetensors

            file = open_safetensors(self.path)
            info = file.info(self.key)
            if info.dtype == self.dtype and tuple(info.shape) == tuple(self.shape):  # else: changed on disk
                file.read_into(self.key, out.reshape(-1).view(torch.uint8).numpy(), info)
                return out
        return out.copy_(self.load().reshape(out.shape))

    def float(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self.load().to(device=device, dtype=torch.float32)

    def __repr__(self) -> str:
        where = "memory" if self._value is not None else f"{self.path}:{self.key}"
        return f"LazyTensor({self.dtype}{list(self.shape)} @ {where})"


@dataclass
class LoraLayer:
    """One adapted module.

    `target` is the module's dotted path as the base model names it, with a diffusers component
    prefix where the adapter has components (`unet.`, `text_encoder.`, `text_encoder_2.`,
    `transformer.`). For PEFT adapters of transformers models it is the path inside the model
    (`model.layers.0.self_attn.q_proj`), without PEFT's wrapper prefix.
    """

    target: str
    kind: str  # a name in lorahub.kinds.KINDS: "linear" | "conv" | "embedding"
    A: LazyTensor
    B: LazyTensor
    alpha: float
    rank: int
    use_rslora: bool = False
    fan_in_fan_out: bool = False  # GPT-2 Conv1D: base weight is (in, out)
    magnitude: LazyTensor | None = None  # DoRA magnitude vector (native shape)
    bias: LazyTensor | None = None  # the LoRA bias (PEFT lora_bias=True): added to the base bias as s·b
    source_key: str = ""  # the module prefix in the file, for messages
    # original target name if the file's name had to be guessed (kohya underscore names)
    source_name: str | None = None
    # a LyCORIS module (LoHa, LoKr, LoCon-Tucker, full): A and B are then its exact LoRA factors,
    # computed on demand; merge forms ΔW as LyCORIS does (lorahub.lycoris)
    lycoris: LycorisModule | None = None
    # the bias is added as it is, not times the scale (a `.diff_b` bias delta; PEFT's lora_bias is scaled)
    bias_unscaled: bool = False

    @property
    def bias_scale(self) -> float:
        """What the layer's bias is multiplied by when it is added to the base bias."""
        return 1.0 if self.bias_unscaled else self.scale

    @property
    def scale(self) -> float:
        if self.rank == 0:
            return 0.0
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def in_features(self) -> int:
        """k: columns of the math view (conv: in·kh·kw; embedding: num_embeddings)."""
        return math.prod(self.A.shape[1:])

    @property
    def out_features(self) -> int:
        """n: rows of the math view (embedding: embedding_dim)."""
        return self.B.shape[0]

    @property
    def geometry(self) -> LayerKind:
        """The layer's kind object (Conv1D when fan_in_fan_out): shapes and orientation live there."""
        return kind_of(self)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.geometry.kernel_size(self.A.shape)

    @property
    def is_spatial(self) -> bool:
        """A k×k convolution (1×1 convolutions count as linear layers)."""
        return self.geometry.is_spatial(self.A.shape)

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this layer adapts."""
        return self.geometry.base_shape(self.A.shape, self.B.shape)

    @property
    def num_params(self) -> int:
        total = self.lycoris.num_params if self.lycoris is not None else self.A.numel + self.B.numel
        if self.magnitude is not None:
            total += self.magnitude.numel
        if self.bias is not None:
            total += self.bias.numel
        return total

    def factors(self, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B₂ (n×r), A₂ (r×k)) in the math view, unscaled, in `dtype` (default float32)."""
        dtype = torch.float32 if dtype is None else dtype
        down = self.A.load().to(device=device, dtype=dtype).reshape(self.A.shape[0], -1)
        up = self.B.load().to(device=device, dtype=dtype).reshape(self.B.shape[0], -1)
        return up, down

    def delta_math(self, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """s·B₂·A₂, shape (n, k). Dense: use only where a dense delta is the point."""
        up, down = self.factors(device, dtype)
        return (up * self.scale) @ down

    def to_base_layout(self, delta_math: torch.Tensor) -> torch.Tensor:
        """Turn an (n, k) math-view matrix into the base weight's layout."""
        return self.geometry.to_base_layout(delta_math, self.base_shape)

    def delta_weight(self, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW in the base weight's layout (see the module docstring)."""
        return self.to_base_layout(self.delta_math(device, dtype))

    def with_factors(self, up: torch.Tensor, down: torch.Tensor, *, alpha: float | None = None,
                     use_rslora: bool | None = None) -> "LoraLayer":
        """A copy of this layer with new math-view factors (n×r', r'×k), reshaped to native shapes."""
        rank = down.shape[0]
        up, down = self.geometry.native_factors(up, down, self.A.shape, self.B.shape)
        return LoraLayer(
            target=self.target, kind=self.kind, A=LazyTensor.of(down.contiguous()),
            B=LazyTensor.of(up.contiguous()), alpha=float(rank if alpha is None else alpha), rank=rank,
            use_rslora=self.use_rslora if use_rslora is None else use_rslora,
            fan_in_fan_out=self.fan_in_fan_out, magnitude=self.magnitude, bias=self.bias,
            source_key=self.source_key, source_name=self.source_name, bias_unscaled=self.bias_unscaled)


@dataclass
class Adapter:
    """A LoRA adapter: its layers, the full tensors it replaces, and what its file says about it."""

    path: Path | None
    format: str  # "peft" | "kohya" | "diffusers" | "lycoris"
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    # full tensors that replace base tensors (PEFT modules_to_save, bias="all"), keyed by the base
    # tensor name (e.g. "lm_head.weight", "score.weight")
    full_tensors: dict[str, LazyTensor] = field(default_factory=dict)
    # tensors ADDED to base tensors (LyCORIS/Wan `diff`/`diff_b` on norm weights and biases), keyed
    # `<module target>.weight` / `.bias`; `LazyTensor.key` is the file's key
    delta_tensors: dict[str, LazyTensor] = field(default_factory=dict)
    base_model: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # PEFT config as read (unknown keys kept)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    files: list[Path] = field(default_factory=list)  # weight files the adapter was read from
    # LyCORIS and other non-LoRA modules: target -> algorithm name ("loha", "lokr", ...)
    other_modules: dict[str, str] = field(default_factory=dict)
    # a PEFT variant whose delta is not s·B·A (KaSA, aLoRA, ...): readable, not mergeable
    unsupported_variant: str | None = None
    # every target starts with a diffusers component name (`unet.`, `text_encoder.`...). Decided by
    # the reader from the format, never from names: GPT-2's own modules start with `transformer.`
    has_components: bool = False
    # extra keys in the file that no layer claims (reported by inspect, kept by writers where possible)
    extra_keys: list[str] = field(default_factory=list)
    # what the reader ignored or corrected, one line each (e.g. fan_in_fan_out on Linear layers): every
    # command that reads the adapter reports them
    warnings: list[str] = field(default_factory=list)
    # why the file does not give the adapter's scale (a PEFT weights file without adapter_config.json), or
    # None: operations that need the scale refuse until `assume_alpha` gives it (CLI: --alpha)
    scale_unknown: str | None = None
    # kohya `.alpha` tensors that are 0, which the peers read apart (kohya: alpha = rank; diffusers and
    # ComfyUI: scale 0): listed by inspect, refused by every operation that needs the scale
    zero_alphas: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers.values()]

    @property
    def is_dora(self) -> bool:
        return any(layer.is_dora for layer in self.layers.values())

    @property
    def use_rslora(self) -> bool:
        return any(layer.use_rslora for layer in self.layers.values())

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers.values()) + sum(
            t.numel for t in self.full_tensors.values()) + sum(t.numel for t in self.delta_tensors.values())

    @property
    def name(self) -> str:
        if self.path is None:
            return "<memory>"
        return self.path.name

    def nonfinite_alphas(self) -> list[LoraLayer]:
        """Layers whose alpha is NaN or ±Inf (a kohya `.alpha` tensor, `lora_alpha`/`alpha_pattern`): their
        scale, and so their delta, is not a number."""
        return [layer for layer in self.layers.values() if not math.isfinite(layer.alpha)]

    def require_finite_alphas(self, operation: str) -> None:
        """Refuse an adapter whose alpha is NaN/Inf somewhere, naming the first such module."""
        if self.zero_alphas:
            more = f" (and {len(self.zero_alphas) - 1} more)" if len(self.zero_alphas) > 1 else ""
            raise LorahubError(f"alpha is 0{more}, which kohya's scripts apply as alpha = rank (scale 1) and diffusers "
                               f"and ComfyUI as scale 0; {operation} refuses to guess: set alpha to the scale·rank "
                               "you mean", path=self.files[0] if len(self.files) == 1 else self.path,
                               key=self.zero_alphas[0])
        bad = self.nonfinite_alphas()
        if bad:
            layer = bad[0]
            name = f" ({layer.source_name})" if layer.source_name and layer.source_name != layer.target else ""
            more = f" (and {len(bad) - 1} more modules)" if len(bad) > 1 else ""
            raise LorahubError(f"alpha of module '{layer.target}'{name} is {layer.alpha} (not a finite number)"
                               f"{more}; {operation} refuses it", path=self.path)

    def odd_factor_dtypes(self) -> list[tuple[str, str]]:
        """(key, dtype) of every factor tensor (A, B, DoRA magnitude, LoRA bias, a LyCORIS module's own
        factors: its A and B are computed in fp32 from them) whose dtype is not a
        floating-point type lorahub computes with (`FACTOR_DTYPES`)."""
        return [(tensor.key or layer.target, tensor.dtype) for layer in self.layers.values()
                for tensor in (layer.A, layer.B, layer.magnitude, layer.bias,
                               *(layer.lycoris.tensors.values() if layer.lycoris is not None else ()))
                if tensor is not None and tensor.dtype not in FACTOR_DTYPES]

    def assume_alpha(self, alpha: float) -> None:
        """Give an adapter whose file does not say its scale (`scale_unknown`) its `lora_alpha`: every layer
        gets alpha (scale alpha / rank, no rsLoRA), and the warning says where the scale came from."""
        if self.scale_unknown is None:
            raise LorahubError("--alpha is for adapters whose file does not give their scale; this one gives it: "
                               "drop --alpha", path=self.path)
        for layer in self.layers.values():
            layer.alpha, layer.use_rslora = float(alpha), False
        self.warnings = [line for line in self.warnings if not line.startswith("scale unknown")]
        self.warnings.append(f"scale from --alpha {alpha:g}: {self.scale_unknown}")
        self.scale_unknown = None

    def require_lora(self, operation: str) -> None:
        """Refuse operations that need math lorahub does not have (LyCORIS, exotic PEFT variants),
        adapters whose scale is not a number (NaN/Inf alpha) or not known, factors that are not floating
        point."""
        if self.scale_unknown is not None:
            raise LorahubError(f"{operation} needs the adapter's scale, which its file does not give "
                               f"({self.scale_unknown}): pass --alpha LORA_ALPHA", path=self.path)
        self.require_finite_alphas(operation)
        odd = self.odd_factor_dtypes()
        if odd:
            key, dtype = odd[0]
            more = f" (and {len(odd) - 1} more tensor{'s' if len(odd) > 2 else ''})" if len(odd) > 1 else ""
            raise LorahubError(f"{operation} needs floating-point factors ({', '.join(FACTOR_DTYPES)}); this one "
                               f"is {dtype}{more}", path=self.files[0] if len(self.files) == 1 else self.path,
                               key=key)
        if self.unsupported_variant:
            raise LorahubError(f"{operation} is not supported for {self.unsupported_variant} adapters: their "
                               f"delta is not s·B·A", path=self.path)
        if self.other_modules:
            algos = sorted(set(self.other_modules.values()))
            raise LorahubError(
                f"{operation} is not supported yet for LyCORIS {'/'.join(algos)} modules "
                f"({len(self.other_modules)} in this file); LoRA/LoCon, LoHa, LoKr and full modules are",
                path=self.path)
