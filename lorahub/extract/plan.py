"""What an extraction reads and what each tensor becomes, from the two models' headers alone.

Both models are opened with `lorahub.base.load_base` (any local layout `merge` takes: a transformers
directory, shards + index, a diffusers pipeline, a single `.safetensors` file) and their tensors are
paired **by name**. A tensor on one side only, or of another shape on the other side, refuses the
extraction before any data is read (`--include`/`--exclude` decide which names take part).

Each pair is one of:

| role    | which tensors                                                      | what happens                    |
| ------- | ------------------------------------------------------------------ | ------------------------------- |
| `lora`  | a module's `.weight` of 2+ dims in a float dtype: linear, GPT-2     | ΔW factored at the layer's rank |
|         | Conv1D, conv (any kernel); embeddings only with `lora_embeddings`  |                                 |
| `full`  | any tensor matching `--keep-full`                                  | carried whole when it changed   |
| `other` | norms, biases, embeddings, bare parameters, integer/FP8 tensors     | compared; reported when changed |

A pair whose two tensors are equal is *unchanged* whatever its role; that is known only once both are
read. Targets are the base's module paths (`model.layers.0.self_attn.q_proj`; diffusers components
prefixed, `unet.down_blocks.0…`); SD single-file checkpoints get their diffusers names
(`model.diffusion_model.input_blocks.1.1.proj_in` → `unet.down_blocks.0.attentions.0.proj_in`), so
kohya files come out with kohya's own names.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..adapter import ST_ITEMSIZE
from ..base import BaseModel, load_base
from ..errors import LorahubError
from ..kinds import CONV, CONV1D, EMBEDDING, LINEAR, LayerKind
from ..storage import cached_header

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# module leaf names of embedding layers (nn.Embedding): weight (num, dim), not a linear map of its input
EMBEDDING_LEAVES = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "token_embedding", "position_embedding", "embed_positions", "embed_in", "tok_embeddings", "shared",
    "embedding", "embeddings", "relative_attention_bias",
})
# LDM/SGM UNet block names: an alias starting with one of these is not a diffusers name
_LDM_HEADS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
SHOWN = 5  # names listed in a refusal; the rest are counted


@dataclass(frozen=True)
class Side:
    """One model's copy of a tensor: where its bytes are."""

    path: Path
    offset: int  # absolute offset of the data in the file
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return ST_ITEMSIZE.get(self.dtype, 1)


@dataclass
class Pair:
    """A tensor of both models, and what the extraction does with it."""

    name: str  # the tensor name (the same in both models)
    base: Side
    tuned: Side
    role: str  # "lora" | "full" | "other"
    target: str | None = None  # the adapter's name for it: module target (lora), tensor name (full)
    kind: LayerKind | None = None  # lora: the layer's geometry
    reason: str = ""  # other: why it is not a LoRA layer

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def numel(self) -> int:
        return math.prod(self.base.shape)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.tuned.nbytes

    @property
    def out_features(self) -> int:
        """n: rows of the layer's math view."""
        assert self.kind is not None
        return self.kind.out_features(self.shape)

    @property
    def in_features(self) -> int:
        return self.numel // self.out_features

    @property
    def kernel(self) -> str:
        """"3x3" for a conv, "" otherwise."""
        return "x".join(str(d) for d in self.shape[2:]) if self.kind is CONV else ""

    @property
    def spatial(self) -> bool:
        """A k×k convolution (its rank is `conv_rank`); 1×1 convolutions count as linear layers."""
        return self.kind is CONV and any(d != 1 for d in self.shape[2:])


@dataclass
class ExtractPlan:
    base: BaseModel
    tuned: BaseModel
    pairs: list[Pair]  # in read order (the base's files, by offset)
    has_components: bool  # targets start with a diffusers component (`unet.`, `text_encoder.`)
    excluded: int = 0  # tensors left out by --include/--exclude
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(pair.nbytes for pair in self.pairs)

    @property
    def lora_pairs(self) -> list[Pair]:
        return [pair for pair in self.pairs if pair.role == "lora"]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A glob matches the tensor name or its module (the name without `.weight`/`.bias`)."""
    module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p) for p in patterns)


def _open_local(spec: str | Path, role: str) -> BaseModel:
    model = load_base(str(spec))
    if model.root is None:
        raise LorahubError(f"extract reads the {role} model's weights from local disk; download them first "
                           "(e.g. `hf download REPO --local-dir DIR`) and pass the directory", path=spec)
    if not model.complete:
        raise LorahubError(f"the {role} model's weight files hold less data than their headers describe "
                           "(a header-only skeleton or an interrupted download)", path=spec)
    return model


def _side(model: BaseModel, name: str) -> Side:
    tensor = model.tensors[name]
    assert model.root is not None and tensor.file is not None and tensor.key is not None
    path = Path(model.root) / tensor.file
    header = cached_header(path)
    info = header.tensors[tensor.key]
    nbytes = info.end - info.begin
    if tensor.dtype in ST_ITEMSIZE and nbytes != math.prod(info.shape) * ST_ITEMSIZE[tensor.dtype]:
        raise LorahubError(f"corrupt safetensors header ({nbytes} bytes for {info.dtype}{list(info.shape)})",
                           path=path, key=tensor.key)
    return Side(path, header.data_start + info.begin, nbytes, info.dtype, tuple(info.shape))


def _sd_aliases(base: BaseModel) -> dict[str, str]:
    """SD single-file checkpoints: real module path → its diffusers-named alias (`unet.…`,
    `text_encoder.text_model.…`), from `lorahub.names`' alias tables; modules without one are absent."""
    from ..names import base_index

    aliases: dict[str, str] = {}
    for alias, ref in base_index(base).modules.items():
        real = ref.weight.rsplit(".", 1)[0]
        if ref.rows is not None or alias == real or not ref.weight.endswith(".weight"):
            continue
        component, _, rest = alias.partition(".")
        if component == "unet" and rest.startswith(_LDM_HEADS):
            continue  # the LDM name under `unet.`: not what kohya or diffusers call it
        if component in ("unet", "text_encoder", "text_encoder_2") and real not in aliases:
            aliases[real] = alias
    return aliases


def _refuse(message: str, names: list[str], path: object) -> LorahubError:
    shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
    return LorahubError(f"{message}: {shown}", path=path)


def plan_extract(base_spec: str | Path, tuned_spec: str | Path, *, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), keep_full: Sequence[str] = (),
                 lora_embeddings: bool = False) -> ExtractPlan:
    """Pair the two models' tensors by name and decide what each becomes (headers only).

    Refuses (LorahubError, exit 1) models that do not pair: a name on one side only, or a shape that
    differs, each named. `include` (default: everything) and `exclude` are globs on tensor or module
    names; `keep_full` globs pick tensors carried whole (PEFT `modules_to_save`) when they changed."""
    base = _open_local(base_spec, "base")
    tuned = _open_local(tuned_spec, "tuned")

    def selected(name: str) -> bool:
        return (not include or _matches(name, include)) and not _matches(name, exclude)

    names = [name for name in base.tensors if selected(name)]
    excluded = len(base.tensors) - len(names)
    tuned_names = {name for name in tuned.tensors if selected(name)}
    missing = [name for name in names if name not in tuned.tensors]
    if missing:
        raise _refuse(f"the models do not pair: {len(missing)} tensor(s) of the base are not in the tuned model "
                      "(--exclude them to extract the rest)", missing, tuned_spec)
    extra = sorted(tuned_names - set(names))
    if extra:
        raise _refuse(f"the models do not pair: {len(extra)} tensor(s) of the tuned model are not in the base "
                      "(--exclude them to extract the rest)", extra, base_spec)
    mismatched = [f"{name} (base {list(base.tensors[name].shape)}, tuned {list(tuned.tensors[name].shape)})"
                  for name in names if tuple(base.tensors[name].shape) != tuple(tuned.tensors[name].shape)]
    if mismatched:
        raise _refuse("the models do not pair: shapes differ", mismatched, tuned_spec)
    if not names:
        raise LorahubError("no tensors to compare (--include/--exclude left none)", path=base_spec)

    sd_single = base.layout == "sd-single-file"
    aliases = _sd_aliases(base) if sd_single else {}
    has_components = base.layout == "diffusers" or sd_single

    def alias(name: str) -> str | None:
        """The adapter's name of a tensor (None: an SD single-file tensor without a diffusers name)."""
        if not sd_single:
            return name
        module, _, leaf = name.rpartition(".")
        mapped = aliases.get(module)
        return f"{mapped}.{leaf}" if mapped else None

    from ..names import is_conv1d

    pairs = []
    for name in names:
        pair = Pair(name, _side(base, name), _side(tuned, name), role="other")
        ndim = len(pair.shape)
        floats = pair.base.dtype in FLOAT_DTYPES and pair.tuned.dtype in FLOAT_DTYPES
        module, _, leaf = name.rpartition(".")
        module_leaf = module.rsplit(".", 1)[-1]
        kind: LayerKind | None = None
        if _matches(name, keep_full):
            pair.role, pair.target = "full", alias(name)
            if pair.target is None:
                pair.role, pair.reason = "other", "no diffusers name for this module (SD single file)"
        elif not floats:
            pair.reason = f"{pair.base.dtype}/{pair.tuned.dtype} tensor (not a float weight)"
        elif leaf != "weight" or not module:
            pair.reason = "not a module weight"
        elif ndim < 2:
            pair.reason = "1-D (norm or scale)"
        elif module_leaf in EMBEDDING_LEAVES:
            if lora_embeddings and ndim == 2:
                kind = EMBEDDING
            else:
                pair.reason = "embedding (--lora-embeddings extracts it, --keep-full carries it)"
        elif ndim == 2:
            kind = CONV1D if is_conv1d(base, name) else LINEAR
        else:
            kind = CONV
        if kind is not None:
            target = alias(name)
            if target is None:
                pair.reason = "no diffusers name for this module (SD single file)"
            else:
                pair.role, pair.kind, pair.target = "lora", kind, target.rsplit(".", 1)[0]
        if pair.numel == 0:
            pair.role, pair.kind, pair.reason = "other", None, "empty tensor"
        pairs.append(pair)
    order = {path: i for i, path in enumerate(dict.fromkeys(pair.base.path for pair in pairs))}
    pairs.sort(key=lambda pair: (order[pair.base.path], pair.base.offset))
    return ExtractPlan(base, tuned, pairs, has_components, excluded)
