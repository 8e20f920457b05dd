"""A model family's two namings: the original checkpoint's module names and the diffusers folder's.

A `Family` is a table of `Entry`s. Each entry names one module of the original checkpoint (a pattern,
`{i}` standing for a block index) and the diffusers modules its weight becomes, as row blocks:

- `rename("img_in", "x_embedder")`: the same weight under another name;
- `fused("double_blocks.{i}.img_attn.qkv", "transformer_blocks.{i}.attn.to_q", "…to_k", "…to_v")`: the
  original weight is the diffusers weights stacked by rows (`units` gives the relative row counts, e.g.
  Flux's `single_blocks.{i}.linear1` = to_q | to_k | to_v | proj_mlp = 1 : 1 : 1 : 4);
- `swapped("final_layer.adaLN_modulation.1", "norm_out.linear")`: one weight whose two row halves are
  in the other order (shift|scale in the original, scale|shift in diffusers' AdaLayerNormContinuous).

`Family.modules` lists module patterns that have the same name in both namings (Qwen-Image is published
in diffusers naming only). Names are matched without the component prefix (`transformer.`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

ORIGINAL = "original"
DIFFUSERS = "diffusers"
NAMINGS = (ORIGINAL, DIFFUSERS)


@dataclass(frozen=True)
class Part:
    """One row chunk of an original module: which diffusers module holds it and where."""

    module: str  # diffusers module pattern
    units: int = 1  # the chunk's rows, in units (unit = the original's rows / the entry's total units)
    at: int = 0  # the chunk's first row inside the diffusers module, in units


@dataclass(frozen=True)
class Entry:
    original: str
    parts: tuple[Part, ...]
    # the halves are swapped only when the weight has two chunks' worth of rows for one input width
    # (SD3's last block: its context adaLN has shift|scale only, the others six chunks, not swapped)
    swap_if_two: bool = False

    @property
    def total_units(self) -> int:
        return sum(part.units for part in self.parts)

    @property
    def diffusers_modules(self) -> tuple[str, ...]:
        seen: list[str] = []
        for part in self.parts:
            if part.module not in seen:
                seen.append(part.module)
        return tuple(seen)

    @property
    def is_rename(self) -> bool:
        return len(self.parts) == 1 and not self.swap_if_two

    def units_of(self, module: str) -> int:
        return sum(part.units for part in self.parts if part.module == module)


def rename(original: str, diffusers: str) -> Entry:
    return Entry(original, (Part(diffusers),))


def fused(original: str, *diffusers: str, units: tuple[int, ...] | None = None) -> Entry:
    units = units or (1,) * len(diffusers)
    return Entry(original, tuple(Part(module, u) for module, u in zip(diffusers, units)))


def swapped(original: str, diffusers: str, *, only_if_two: bool = False) -> Entry:
    return Entry(original, (Part(diffusers, 1, 1), Part(diffusers, 1, 0)), swap_if_two=only_if_two)


def _regex(pattern: str, sep: str) -> re.Pattern:
    parts = [re.escape(p) for p in pattern.split("{i}")]
    body = r"(\d+)".join(parts)
    if sep != ".":
        body = body.replace(r"\.", sep)
    return re.compile(body)


@dataclass(frozen=True)
class Match:
    """Where a module name sits in a family's table."""

    naming: str  # ORIGINAL | DIFFUSERS
    entry: Entry | None  # None: a module named alike in both namings (`Family.modules`)
    index: str | None  # the block index, if the pattern has one
    name: str  # the dotted module name (what a flattened kohya name resolves to)


@dataclass(frozen=True)
class Family:
    name: str  # "flux"
    label: str  # "Flux"
    entries: tuple[Entry, ...] = ()
    modules: tuple[str, ...] = ()  # named alike in both namings
    kohya_naming: str = ORIGINAL  # the naming kohya / musubi-tuner / ComfyUI files use for this model
    # module patterns whose presence (in either naming) says "this family" more than the shared ones
    markers: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)  # naming -> how to call it ("BFL", "diffusers")
    registry: tuple[str, ...] = ()  # registry manifests of this family (diffusers folders)

    def naming_label(self, naming: str) -> str:
        return self.labels.get(naming, naming)

    @cached_property
    def _tables(self) -> dict[str, list[tuple[re.Pattern, re.Pattern, str, Entry | None]]]:
        """naming -> [(dotted regex, flattened regex, pattern, entry)]."""
        tables: dict[str, list] = {ORIGINAL: [], DIFFUSERS: []}
        for entry in self.entries:
            tables[ORIGINAL].append((_regex(entry.original, "."), _regex(entry.original, "_"), entry.original,
                                     entry))
            for module in entry.diffusers_modules:
                tables[DIFFUSERS].append((_regex(module, "."), _regex(module, "_"), module, entry))
        for module in self.modules:
            for naming in NAMINGS:
                tables[naming].append((_regex(module, "."), _regex(module, "_"), module, None))
        return tables

    @cached_property
    def heads(self) -> dict[str, frozenset[str]]:
        """naming -> the first segments of its module patterns (a name with another head cannot match)."""
        return {naming: frozenset(pattern.split(".", 1)[0] for _, _, pattern, _ in rows)
                for naming, rows in self._tables.items()}

    @cached_property
    def flat_heads(self) -> dict[str, tuple[str, ...]]:
        """naming -> the literal beginnings of its flattened patterns (up to the first block index)."""
        return {naming: tuple({pattern.split("{i}", 1)[0].replace(".", "_") for _, _, pattern, _ in rows})
                for naming, rows in self._tables.items()}

    @cached_property
    def _markers(self) -> list[re.Pattern]:
        return [_regex(m, ".") for m in self.markers]

    def lookup(self, name: str, naming: str) -> Match | None:
        """The table row of a dotted module name in `naming`, or None."""
        if name.split(".", 1)[0] not in self.heads[naming]:
            return None
        for dotted, _, _, entry in self._tables[naming]:
            m = dotted.fullmatch(name)
            if m:
                return Match(naming, entry, m.group(1) if m.groups() else None, name)
        return None

    def lookup_flat(self, flat: str, naming: str) -> Match | None:
        """A kohya-flattened module path (`double_blocks_0_img_attn_qkv`) resolved to its dotted name."""
        if not flat.startswith(self.flat_heads[naming]):
            return None
        for _, flattened, pattern, entry in self._tables[naming]:
            m = flattened.fullmatch(flat)
            if m:
                index = m.group(1) if m.groups() else None
                name = pattern.replace("{i}", index) if index is not None else pattern
                return Match(naming, entry, index, name)
        return None

    def marked(self, name: str) -> bool:
        return any(regex.fullmatch(name) for regex in self._markers)

    def has_two_namings(self) -> bool:
        return bool(self.entries)


def fill(pattern: str, index: str | None) -> str:
    return pattern.replace("{i}", index) if index is not None else pattern
