"""The rank-R factors of one dense ΔW: randomized SVD with power iterations, or the exact SVD.

Randomized SVD (Halko, Martinsson, Tropp 2011, Algorithms 4.4 and 5.1) of M (n×k), sketch size
l = R + oversample:

    Ω ~ N(0, 1)^(k×l);   Q = orth(M·Ω)
    q times:  Q = orth(M·orth(Mᵀ·Q))          (subspace iteration, re-orthonormalised each half step;
                                               orth: Householder QR; on a GPU CholeskyQR2 in float64)
    Mᵀ·Q = Q₂·R₂  ⇒  Qᵀ·M = R₂ᵀ·Q₂ᵀ = (U_s Σ V_sᵀ)·Q₂ᵀ   (SVD of the l×l R₂ᵀ, float64, on the CPU)
    U = Q·U_s,  Vᵀ = V_sᵀ·Q₂ᵀ

2q + 2 products of M with an n×l or k×l panel and 2q + 2 thin QRs, instead of a dense SVD
(O(n·k·min(n, k))). The result is Q·(QᵀM)_R, whose error is *measured*, not estimated: with L the
rank-R factors, ΔW − L = (I − QQᵀ)·ΔW + Q·(C − C_R) with orthogonal terms, so ‖ΔW − L‖ is computed
directly (one more product) and reported beside ‖ΔW‖.

The exact route (`torch.linalg.svd`, thin) is taken for `exact=True`, for small layers (min(n, k) ≤
`EXACT_BELOW`, or a sketch that would cover half the spectrum or more), and for `sv_cumulative`, whose
rule needs every singular value (Σσ). The dynamic rules `sv_fro` and `sv_ratio` are decided on the
sketch's values with `lowrank.choose_rank` (the rules resize uses): `sv_fro` knows ‖ΔW‖²_F exactly, so
its curve is exact up to the sketch's values; a sketch too small to decide grows (×2) until it can, or
falls back to the exact SVD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import OptionError
from ..lowrank import METHODS, LowRankSVD, choose_rank, split_factors

# layers this small (min(n, k)) always take the exact SVD: a sketch would save nothing
EXACT_BELOW = 128
# the first sketch of a dynamic rule without a --rank cap
DEFAULT_SKETCH = 64
# matrices up to this many elements are decomposed on the CPU in float64 when exact (a small SVD is
# latency-bound on a GPU: milliseconds per call)
_SMALL_ON_CPU = 1 << 20


@dataclass(frozen=True)
class RankRule:
    """How many singular triplets a layer keeps: `method` fixed (`rank`) or a dynamic rule with `param`
    capped by `rank` (None: no cap)."""

    method: str = "fixed"
    param: float | None = None
    rank: int | None = None

    def check(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"unknown rank method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.method == "fixed" and self.param is not None:
            raise OptionError("--param goes with --rank-method sv_ratio|sv_fro|sv_cumulative")
        if self.method == "fixed" and self.rank is None:
            raise OptionError("give --rank (the extracted rank), or --rank-method with --param for dynamic ranks")
        if self.method != "fixed" and self.param is None:
            raise OptionError(f"--rank-method {self.method} needs --param")
        if self.rank is not None and self.rank < 1:
            raise OptionError(f"--rank must be at least 1, got {self.rank}")
        if self.param is not None:
            choose_rank(torch.ones(1), rank=self.rank or 1, method=self.method, param=self.param)

    def with_cap(self, rank: int | None) -> "RankRule":
        return RankRule(self.method, self.param, rank)


@dataclass
class Decomposition:
    """Rank-r factors of M (up n×r, down r×k, on M's device, float32) and what they cost."""

    up: Tensor
    down: Tensor
    rank: int
    S: Tensor  # float64, CPU: the singular values computed (all of them when `exact`)
    exact: bool  # S is the whole spectrum (the exact SVD ran)
    sketch: int  # l, the sketch size (0 for the exact SVD)


def _qr(x: Tensor) -> Tensor:
    return torch.linalg.qr(x, mode="reduced")[0]


# CholeskyQR2's basis is taken when this close to orthonormal (float64); else Householder QR
_ORTHO_TOL = 1e-8


def _orthonormal(Y: Tensor, cholesky: bool) -> Tensor:
    """An orthonormal basis of Y's columns (n×l, n ≥ l). Householder QR (LAPACK; on the CPU the
    faster one), or with `cholesky` CholeskyQR2 in float64 — two rounds of G = XᵀX, X ← X·chol(G)⁻ᵀ,
    matrix products and an l×l factorisation, where cuSOLVER's Householder QR of an n×l panel runs
    ~0.4 ms (lowrank's measurements on an H200) — falling back to Householder where Cholesky fails or
    the basis is not orthonormal to `_ORTHO_TOL` (rank-deficient or too ill-conditioned panels, e.g. a
    ΔW of lower rank than the sketch)."""
    if not cholesky:
        return _qr(Y)
    X = Y.to(torch.float64)
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(X.T @ X)
        if int(info) != 0:
            return _qr(Y)
        X = torch.linalg.solve_triangular(L.T, X, upper=True, left=False)
    eye = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    if float((X.T @ X - eye).abs().max()) > _ORTHO_TOL:
        return _qr(Y)
    return X.to(Y.dtype)


def randomized_svd(M: Tensor, width: int, *, power_iters: int = 2, generator: torch.Generator | None = None,
                   orth: str = "auto") -> LowRankSVD:
    """U (n×l), S (l,) float64 on the CPU, Vh (l×k) of the rank-l randomized SVD of M (see the module
    docstring), l = `width` ≤ min(n, k). M is any float32 matrix view (transposed views are fine).
    `orth`: how the power iterations re-orthonormalise, "householder", "cholesky" (CholeskyQR2 in
    float64 with a Householder fallback), or "auto": cholesky on a GPU, householder on the CPU."""
    n, k = M.shape
    cholesky = orth == "cholesky" or (orth == "auto" and M.device.type != "cpu")
    omega = torch.randn((k, width), generator=generator, device=M.device, dtype=M.dtype)
    Q = _orthonormal(M @ omega, cholesky)
    del omega
    for _ in range(power_iters):
        Q = _orthonormal(M @ _orthonormal(M.T @ Q, cholesky), cholesky)
    Q2, R2 = torch.linalg.qr(M.T @ Q, mode="reduced")  # Mᵀ·Q = Q₂·R₂, so Qᵀ·M = R₂ᵀ·Q₂ᵀ
    U_s, S, Vh_s = torch.linalg.svd(R2.T.to(device="cpu", dtype=torch.float64), full_matrices=False)
    U = Q @ U_s.to(device=M.device, dtype=M.dtype)
    Vh = Vh_s.to(device=M.device, dtype=M.dtype) @ Q2.T
    return LowRankSVD(U=U, S=S, Vh=Vh)


def exact_svd(M: Tensor) -> LowRankSVD:
    """Thin SVD of M (U, Vh on M's device, float32; S float64 on the CPU). Small matrices go to the CPU
    in float64."""
    if M.device.type != "cpu" and M.numel() <= _SMALL_ON_CPU:
        U, S, Vh = torch.linalg.svd(M.to(device="cpu", dtype=torch.float64), full_matrices=False)
    else:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return LowRankSVD(U=U.to(device=M.device, dtype=M.dtype), S=S.to(device="cpu", dtype=torch.float64),
                      Vh=Vh.to(device=M.device, dtype=M.dtype))


def _decide(S: Tensor, energy: float, full: int, rule: RankRule, oversample: int) -> int | None:
    """The rank a sketch's values S (descending, float64) give under `rule`, or None when the sketch is
    too small to tell (the rule's boundary lies beyond its last `oversample` values)."""
    length = int(S.shape[0])
    usable = length - oversample if length < full else length  # the trailing values are the least accurate
    cap = rule.rank
    if rule.method == "fixed":
        assert cap is not None
        return min(cap, full)
    if rule.method == "sv_ratio":
        chosen = choose_rank(S, method="sv_ratio", param=rule.param)
    else:  # sv_fro: the rest of the energy, exact, as one last value of the curve
        tail = max(energy - float((S * S).sum()), 0.0) ** 0.5
        chosen = choose_rank(torch.cat([S, S.new_tensor([tail])]), method="sv_fro", param=rule.param)
    if chosen <= usable:
        return min(chosen, cap) if cap is not None else chosen
    if cap is not None and cap <= usable:
        return cap
    return None


def decompose(M: Tensor, rule: RankRule, *, energy: float, exact: bool = False, power_iters: int = 2,
              oversample: int = 8, generator: torch.Generator | None = None, split: str = "balanced") -> Decomposition:
    """Factors of M (n×k, float32, any device) at the rank `rule` gives. `energy` = ‖M‖²_F (> 0)."""
    n, k = M.shape
    full = min(n, k)

    def exact_route() -> Decomposition:
        svd = exact_svd(M)
        cap = rule.rank if rule.method != "fixed" else min(int(rule.rank or full), full)
        rank = max(1, choose_rank(svd.S, rank=cap, method=rule.method, param=rule.param))
        up, down = _split(svd, rank, split)
        return Decomposition(up, down, rank, svd.S, exact=True, sketch=0)

    if exact or rule.method == "sv_cumulative" or full <= EXACT_BELOW:
        return exact_route()
    width = (rule.rank if rule.rank is not None else DEFAULT_SKETCH) + oversample
    while True:
        width = min(width, full)
        if 2 * width > full:
            return exact_route()
        svd = randomized_svd(M, width, power_iters=power_iters, generator=generator)
        rank = _decide(svd.S, energy, full, rule, oversample)
        if rank is not None:
            rank = max(1, min(rank, width))
            up, down = _split(svd, rank, split)
            return Decomposition(up, down, rank, svd.S, exact=False, sketch=width)
        width *= 2


def _split(svd: LowRankSVD, rank: int, split: str) -> tuple[Tensor, Tensor]:
    """`lowrank.split_factors` of the first `rank` triplets (S moved to the vectors' device and dtype)."""
    on_device = LowRankSVD(U=svd.U[:, :rank], S=svd.S[:rank].to(device=svd.U.device, dtype=svd.U.dtype),
                           Vh=svd.Vh[:rank])
    return split_factors(on_device, rank, split)


def residual_norm(M: Tensor, up: Tensor, down: Tensor) -> float:
    """‖M − up·down‖_F, computed in place: M is overwritten with the residual."""
    if M.is_contiguous() or not M.T.is_contiguous():
        M.addmm_(up, down, alpha=-1.0)
    else:  # a transposed view (Conv1D, embedding): update the stored matrix
        M.T.addmm_(down.T, up.T, alpha=-1.0)
    return float(torch.linalg.vector_norm(M))
