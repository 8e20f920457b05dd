"""Same-shape layers factored side by side: the GPU route of `extract`.

One layer's randomized SVD on a GPU is a few dozen small kernels and a dozen host round trips (the
CholeskyQR2 checks, the core SVD on the host, the factors' copies back): ~5 ms in isolation, and several
times that while two reader threads and the host's OpenMP pool share the cores — latency, not arithmetic
(the seven panel products of a 4096×11008 layer take ~1.7 ms). So on a GPU, ΔW of a LoRA layer is
assembled into a slot of a **group** buffer holding layers of one shape, orientation, rank and output
dtype; a full group (or the end of the stream) is factored at once with batched products:

    Ω_i ~ N(0, 1) (each layer's own seeded generator: the sketches of the one-layer route)
    Q = orth(M·Ω);  q times Q = orth(M·orth(Mᵀ·Q));  Mᵀ·Q = Q₂·R₂;  SVD(R₂ᵀ) = U_s Σ V_sᵀ
    U = Q·U_s,  Vᵀ = V_sᵀ·Q₂ᵀ                          (svd.py's algorithm, b matrices per call)

orth is `lowrank._Basis` ("cholesky": CholeskyQR2 in float64, batched, with a per-matrix Householder
fallback for rank-deficient panels), the b cores' SVDs run in float64 on the host in one batched call,
the residuals ‖ΔW − B·A‖ in one batched update: one host round trip per step for the whole group.
Fixed-rank and `sv_fro`/`sv_ratio` layers batch (a dynamic rule decides each layer's rank on its own
sketch; a layer whose sketch is too small to decide takes the one-layer route, which grows it); exact,
`sv_cumulative` (it needs every singular value) and small layers keep the one-layer route.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..lowrank import _Basis, _parallel_svd, split_factors_batched
from .plan import Pair
from .svd import RankRule, _decide

# a group's ΔW slots: at most this many bytes and `MAX_BATCH` layers (a smaller share on a small GPU)
GROUP_BYTES = 2 << 30
MAX_BATCH = 16
# all groups' slots together; beyond it every pending group is factored and its buffer freed
TOTAL_BYTES = 8 << 30


def layer_generator(pair: Pair, seed: int, device: torch.device) -> torch.Generator:
    """The seeded generator of one layer's sketch (the same whichever route or order factors it)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(pair.name.encode())) % (1 << 63))
    return generator


def randomized_svd_batched(M: Tensor, omegas: Tensor, *, power_iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """U (b, n, l), S (b, l) float64 on the CPU, Vh (b, l, k) of the randomized SVDs of the b matrices
    M (b, n, k), float32, transposed views fine) with sketches `omegas` (b, k, l)."""

    def orth(Y: Tensor) -> Tensor:
        return _Basis(Y, "cholesky").Q.to(M.dtype)

    Q = orth(M @ omegas)
    for _ in range(power_iters):
        Q = orth(M @ orth(M.mT @ Q))
    basis = _Basis(M.mT @ Q, "cholesky")  # Mᵀ·Q = Q₂·R₂, so Qᵀ·M = R₂ᵀ·Q₂ᵀ
    U_s, S, Vh_s = _parallel_svd(basis.R.mT.to(device="cpu", dtype=torch.float64))
    U = Q @ U_s.to(device=M.device, dtype=M.dtype)
    Vh = Vh_s.to(device=M.device, dtype=M.dtype) @ basis.Q.to(M.dtype).mT
    return U, S, Vh


@dataclass(frozen=True)
class GroupKey:
    n: int
    k: int
    transposed: bool  # the math view is the stored (k, n) matrix transposed (Conv1D, embeddings)
    rank: int  # the fixed rank, or a dynamic rule's cap (≤ width)
    width: int  # the sketch size l = rank (or the first sketch of a dynamic rule) + oversample
    dtype: torch.dtype  # the factors' output dtype
    rule: RankRule = RankRule()  # fixed (`rank`) or sv_fro / sv_ratio, decided per layer on its sketch
    oversample: int = 0


@dataclass
class Group:
    key: GroupKey
    buffer: Tensor  # (capacity, n·k) float32 slots
    pairs: list[Pair] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.pairs) == self.buffer.shape[0]

    def slot(self) -> Tensor:
        return self.buffer[len(self.pairs)]

    def matrices(self) -> Tensor:
        """The filled slots as (b, n, k) math-view matrices (views of the buffer)."""
        b, key = len(self.pairs), self.key
        flat = self.buffer[:b]
        return flat.view(b, key.k, key.n).mT if key.transposed else flat.view(b, key.n, key.k)


@dataclass
class Factored:
    """One layer of a factored group: math-view factors on the CPU in the output dtype, and its numbers."""

    pair: Pair
    up: Tensor
    down: Tensor
    norm: float
    residual: float
    S: Tensor  # float64, CPU: the sketch's singular values


def factor_group(group: Group, *, power_iters: int, split: str, seed: int,
                 one_layer: Callable[[Pair, Tensor, float], None] | None = None) -> tuple[list[Factored], list[Pair],
                                                                                      list[Pair]]:
    """Factor a group's layers: (factored, unchanged (ΔW = 0), not finite), and empty the group (its slots
    are overwritten with the residuals). A dynamic rule's rank is decided per layer on its sketch's values
    (`svd._decide`); a layer whose sketch is too small to decide goes to `one_layer(pair, matrix, norm)`
    (the one-layer route, which grows the sketch) before the slots are overwritten."""
    key = group.key
    M = group.matrices()
    norms = torch.linalg.vector_norm(M, dim=(1, 2)).tolist()  # one round trip
    pairs = [group.pairs[i] for i in range(len(norms)) if norms[i] != 0.0 and math.isfinite(norms[i])]
    bad = [pair for pair, norm in zip(group.pairs, norms) if not math.isfinite(norm)]
    unchanged = [pair for pair, norm in zip(group.pairs, norms) if norm == 0.0]
    keep = [i for i, norm in enumerate(norms) if norm != 0.0 and math.isfinite(norm)]
    group.pairs = []
    if bad or not keep:
        return [], unchanged, bad
    if len(keep) < len(norms):
        M = M[keep]  # a copy; rare (an unchanged layer among changed ones of its shape)
    dev = M.device
    omegas = torch.stack([torch.randn((key.k, key.width), generator=layer_generator(pair, seed, dev), device=dev,
                                      dtype=M.dtype) for pair in pairs])
    U, S, Vh = randomized_svd_batched(M, omegas, power_iters=power_iters)
    kept_norms = [norms[i] for i in keep]
    if key.rule.method == "fixed":
        ranks: list[int | None] = [key.rank] * len(pairs)
    else:
        full = min(key.n, key.k)
        ranks = [_decide(S[i], kept_norms[i] ** 2, full, key.rule, key.oversample) for i in range(len(pairs))]
        ranks = [None if r is None else max(1, min(r, key.width)) for r in ranks]
    for i, r in enumerate(ranks):
        if r is None:  # the sketch cannot tell: the one-layer route, on the slot as it still is
            assert one_layer is not None, "a dynamic rule needs the one-layer route for undecided layers"
            one_layer(pairs[i], M[i], kept_norms[i])
    live = [i for i, r in enumerate(ranks) if r is not None]
    if not live:
        return [], unchanged, []
    top = max(r for r in ranks if r is not None)
    ups, downs = split_factors_batched(U[:, :, :top], S[:, :top].to(device=dev), Vh[:, :top], split)
    if top != min(r for r in ranks if r is not None):  # ranks differ: zero each layer's columns beyond its rank
        mask = torch.tensor([[j < (r or 0) for j in range(top)] for r in ranks], dtype=ups.dtype, device=dev)
        ups, downs = ups * mask[:, None, :], downs * mask[:, :, None]
    if key.transposed and len(keep) == len(norms):  # update the stored (k, n) slots in place
        M.mT.baddbmm_(downs.mT, ups.mT, alpha=-1.0)
    else:
        M.baddbmm_(ups, downs, alpha=-1.0)
    residuals = torch.linalg.vector_norm(M, dim=(1, 2)).tolist()
    ups_out, downs_out = ups.to(key.dtype).cpu(), downs.to(key.dtype).cpu()
    done = []
    for i in live:
        r = ranks[i]
        assert r is not None
        done.append(Factored(pairs[i], ups_out[i][:, :r], downs_out[i][:r], kept_norms[i], residuals[i], S[i]))
    return done, unchanged, []


class Groups:
    """Open groups by key, their slots allocated on first use within the byte budgets; `flush(group)`
    factors a group's layers and empties it (its slots are reused)."""

    def __init__(self, device: torch.device, flush: Callable[[Group], None]):
        self.device = device
        self.flush = flush
        self.open: dict[GroupKey, Group] = {}
        group_bytes, total = GROUP_BYTES, TOTAL_BYTES
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            group_bytes, total = min(group_bytes, free // 8), min(total, free // 3)
        self.group_bytes, self.total_bytes = group_bytes, total

    def slot(self, key: GroupKey, pair: Pair) -> Tensor:
        """A free slot of the group of `key`, now holding `pair` (fill it before the next call)."""
        group = self.open.get(key)
        if group is None:
            layer_bytes = key.n * key.k * 4
            capacity = max(1, min(MAX_BATCH, self.group_bytes // layer_bytes))
            allocated = sum(g.buffer.numel() * 4 for g in self.open.values())
            if self.open and allocated + capacity * layer_bytes > self.total_bytes:
                self.finish()  # factor what is pending and free its buffers first
            group = Group(key, torch.empty((capacity, key.n * key.k), dtype=torch.float32, device=self.device))
            self.open[key] = group
        slot = group.slot()
        group.pairs.append(pair)
        return slot

    def filled(self, key: GroupKey) -> None:
        """The slot `slot(key, …)` gave is filled: factor its group once the group is full."""
        group = self.open[key]
        if group.full:
            self.flush(group)

    def finish(self) -> None:
        """Factor every pending layer; free the buffers."""
        groups, self.open = list(self.open.values()), {}
        for group in groups:
            if group.pairs:
                self.flush(group)
