"""Exact SVD of low-rank products and the rank rules built on it.

A LoRA delta is ΔW = B·A with B (n×r) and A (r×k), r ≪ min(n, k). Its SVD never needs the dense
n×k matrix:

1. B = Q_B R_B            (thin QR, Q_B n×p, R_B p×r, p = min(n, r))
2. Aᵀ = Q_A R_A           (thin QR, Q_A k×p', R_A p'×r, p' = min(k, r))
3. R_B R_Aᵀ = U_m Σ V_mᵀ  (SVD of a p×p' matrix)
4. U = Q_B U_m, Vᵀ = V_mᵀ Q_Aᵀ, and B·A = U Σ Vᵀ exactly (up to rounding).

Cost O((n + k)·r² + r³) instead of O(n·k·min(n, k)) for a dense SVD. Rank-deficient factors are
fine: QR then has zero (or tiny) diagonal entries in R and the small SVD returns the matching zero
singular values. Weighted sums Σ cᵢ·Bᵢ·Aᵢ reduce to one product by stacking the factors
(`stack_terms`), so the same route gives their exact SVD (`factored_svd_sum`).

Products of one shape are decomposed side by side by `BatchedFactoredSVD` (`factored_svd_batched`,
`factored_svd_sum_batched`): one batched call per step. On a GPU its QRs are CholeskyQR2 in float64
(batched matrix products; cuSOLVER's Householder QR runs one matrix at a time, ~0.4 ms each on an
H200), falling back to Householder QR for factors that are rank-deficient or too ill-conditioned for
it; singular values agree with `factored_svd` to float32 precision (and are closer to float64's).

Rank rules (`choose_rank`), exact and minimal, for a descending spectrum S with S[0] > 0:

| method          | param p  | rank                                                   |
| fixed           | —        | min(rank, len(S))                                      |
| sv_ratio        | p ≥ 1    | #{σ > σ₀/p}                                            |
| sv_fro          | 0 < p ≤ 1| minimal k with ‖S[:k]‖₂ / ‖S‖₂ ≥ p                     |
| sv_cumulative   | 0 < p ≤ 1| minimal k with Σ S[:k] / Σ S ≥ p                       |

never below 1 for a non-zero spectrum (σ₀ is always kept, also for sv_ratio with p = 1), then
capped by `rank` when given. An all-zero spectrum gives 0 (the layer contributes nothing; the
caller decides whether to drop it or keep a rank-1 zero layer). `kohya_compat=True` reproduces
kohya-ss `networks/resize_lora.py`, which keeps one singular value more than the rule asks for and
never fewer than 2 (see `choose_rank`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .devices import device_of
from .errors import LorahubError, OptionError
from .lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "LowRankSVD",
    "factored_svd",
    "stack_terms",
    "factored_svd_sum",
    "BatchedFactoredSVD",
    "factored_svd_batched",
    "factored_svd_sum_batched",
    "split_factors_batched",
    "choose_rank",
    "split_factors",
    "retention",
    "retention_batched",
    "effective_rank",
    "METHODS",
]

METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")

# cores up to this many elements (e.g. 512×512) are decomposed on the CPU when working on a GPU
_SMALL_CORE = 512 * 512

# kohya's `MIN_SV`: a spectrum whose first value is at most this is treated as a zero matrix
_KOHYA_MIN_SV = 1e-6


@dataclass
class LowRankSVD:
    """Thin SVD U·diag(S)·Vh of an n×k matrix of rank ≤ q. U (n×q), S (q,) descending, Vh (q×k)."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def rank_bound(self) -> int:
        """q: the number of singular triplets held (U/Vh may hold fewer vectors, see `_FactoredSVD`)."""
        return min(int(self.S.shape[0]), int(self.U.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[0]), int(self.Vh.shape[1]))

    def dense(self, rank: int | None = None) -> Tensor:
        """U[:, :rank]·diag(S[:rank])·Vh[:rank] as a dense n×k matrix (for tests and small layers)."""
        r = self.rank_bound if rank is None else min(rank, self.rank_bound)
        return (self.U[:, :r] * self.S[:r]) @ self.Vh[:r]


class _FactoredSVD:
    """The exact SVD of up @ down kept in factored form: Householder QRs of both factors + core SVD.

    `torch.geqrf` gives R (r×r) and the Householder reflectors; Q is formed only when singular
    vectors are asked for, and callers can expand only the vectors they keep (`svd(keep)`), so
    ranking a layer (S alone) costs two geqrf and an r×r SVD.
    """

    def __init__(self, up: Tensor, down: Tensor, compute_dtype: torch.dtype, device) -> None:
        if up.ndim != 2 or down.ndim != 2:
            raise ValueError(f"factored_svd wants 2-D factors, got {tuple(up.shape)} and {tuple(down.shape)}")
        n, r = up.shape
        r2, k = down.shape
        if r != r2:
            raise ValueError(f"inner dimensions differ: up {tuple(up.shape)} @ down {tuple(down.shape)}")
        dev = device_of(device, up)
        B = up.to(device=dev, dtype=compute_dtype)
        A = down.to(device=dev, dtype=compute_dtype)
        self.n, self.r, self.k = n, r, k
        self.q = min(r, n, k)
        self.dtype, self.device = compute_dtype, dev
        if self.q == 0:
            self.S = B.new_zeros((0,))
            self.U_m = B.new_zeros((n, 0))
            self.Vh_m = B.new_zeros((0, k))
            self.qr_B = self.qr_A = None
            return
        # QR only where it shrinks the problem (r < n, r < k); otherwise the basis is the identity
        if r < n:
            a_B, tau_B = torch.geqrf(B)  # reflectors below the diagonal, R on and above it
            R_B = torch.triu(a_B[:r])  # r×r
            self.qr_B = (a_B, tau_B)
        else:
            R_B, self.qr_B = B, None  # n×r
        At = A.T
        if r < k:
            a_A, tau_A = torch.geqrf(At.contiguous())
            R_A = torch.triu(a_A[:r])
            self.qr_A = (a_A, tau_A)
        else:
            R_A, self.qr_A = At, None  # k×r
        core = R_B @ R_A.T  # p×p' with p = min(n, r), p' = min(k, r)
        if dev.type != "cpu" and core.shape[0] * core.shape[1] <= _SMALL_CORE:
            # a small SVD is latency-bound on a GPU (ms per call); on the CPU it takes µs
            core = core.cpu()
        # NaN/Inf in a factor propagates into `core` (checked here: r×r, not the n×r factors)
        if not bool(torch.isfinite(core).all()):
            raise LorahubError("factors contain NaN or Inf; cannot compute their SVD")
        U_m, S, Vh_m = torch.linalg.svd(core, full_matrices=False)
        self.U_m, self.S, self.Vh_m = U_m.to(dev), S.to(dev), Vh_m.to(dev)

    @staticmethod
    def _apply_q(qr, X: Tensor, rows: int) -> Tensor:
        """Q_thin @ X for X (r×m): `ormqr` on X zero-padded to all rows. Q is never formed; on a
        2-core CPU this is 2–5× cheaper than forming Q (orgqr) and 5× cheaper than
        `torch.linalg.qr(mode="reduced")` for n×64 factors."""
        if qr is None:
            return X
        a, tau = qr
        padded = X.new_zeros((rows, X.shape[1]))
        padded[: X.shape[0]] = X
        return torch.ormqr(a, tau, padded, left=True, transpose=False)

    def svd(self, keep: int | None = None) -> LowRankSVD:
        """U (n×m), S (all q values), Vh (m×k) with m = min(keep, q) singular vectors expanded."""
        m = self.q if keep is None else max(0, min(int(keep), self.q))
        if self.q == 0:
            return LowRankSVD(U=self.U_m, S=self.S, Vh=self.Vh_m)
        U = self._apply_q(self.qr_B, self.U_m[:, :m], self.n)
        V = self._apply_q(self.qr_A, self.Vh_m[:m].T, self.k)
        return LowRankSVD(U=U, S=self.S, Vh=V.T)


def factored_svd(up: Tensor, down: Tensor, *, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> LowRankSVD:
    """Exact thin SVD of `up @ down` (up n×r, down r×k) without forming the n×k product.

    Returns tensors in `compute_dtype` on `device` (default: `up`'s device), q = min(r, n, k)
    singular triplets, S descending. Works for r > n or r > k, zero factors and r = 0 (q = 0).
    """
    compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
    return _FactoredSVD(up, down, compute_dtype, device).svd()


# ---------------------------------------------------------------------------------------------
# many same-shape products at once

# the Cholesky route accepts a basis only if it is this close to orthonormal and reproduces its factor
# this closely (float64; the float32 Householder route is good to ~1e-7)
_CHOLESKY_TOL = 1e-10


def _stacked(factors: Tensor | Sequence[Tensor], dev: torch.device, dtype: torch.dtype, what: str) -> Tensor:
    if isinstance(factors, torch.Tensor):
        if factors.ndim != 3:
            raise ValueError(f"batched {what} must be (b, rows, cols), got {tuple(factors.shape)}")
        return factors.to(device=dev, dtype=dtype)
    factors = list(factors)
    if not factors:
        raise ValueError(f"no {what} given")
    shape = factors[0].shape
    if any(f.ndim != 2 or f.shape != shape for f in factors):
        raise ValueError(f"batched {what} must all be 2-D of one shape, got "
                         f"{sorted({tuple(f.shape) for f in factors})}")
    out = torch.empty((len(factors), *shape), dtype=dtype, device=dev)
    for i, factor in enumerate(factors):
        out[i].copy_(factor, non_blocking=True)
    return out


def _parallel_svd(core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched thin SVD of small CPU matrices, the batch split over torch's threads (LAPACK runs the
    matrices of one call one after the other; on a GPU host the cores are the slowest step)."""
    from concurrent.futures import ThreadPoolExecutor

    from .devices import torch_threads

    count = min(torch.get_num_threads(), max(1, core.shape[0] // 8))
    if count <= 1:
        return torch.linalg.svd(core, full_matrices=False)
    bounds = [(core.shape[0] * i) // count for i in range(count + 1)]
    with torch_threads(1), ThreadPoolExecutor(max_workers=count, thread_name_prefix="lorahub-svd") as pool:
        parts = list(pool.map(lambda i: torch.linalg.svd(core[bounds[i]:bounds[i + 1]], full_matrices=False),
                              range(count)))
    U, S, Vh = (torch.cat([part[j] for part in parts]) for j in range(3))
    return U, S, Vh


class _Basis:
    """Thin QR X = Q·R of a batch of tall matrices X (b, m, r), r < m: `R` (b, r, r) and Q on demand.

    "householder": `torch.geqrf` (reflectors kept, Q applied with `ormqr`; matrix by matrix on the CPU,
    where one call over a batch is slower than a loop), as `factored_svd`. "cholesky": CholeskyQR2 in
    float64 — two rounds of R = chol(XᵀX)ᵀ, Q = X·R⁻¹ — all batched matrix products, ~1000× faster than
    cuSOLVER's one-matrix-at-a-time geqrf on a GPU; a matrix whose Q comes out less orthonormal than
    `_CHOLESKY_TOL` or does not reproduce X to it (rank-deficient or ill-conditioned factors) is redone
    with Householder QR in float64.
    """

    def __init__(self, X: Tensor, method: str) -> None:
        self.method, self.rows = method, X.shape[1]
        self.pairs: list[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor]
        if method == "householder":
            r = X.shape[2]
            if X.device.type == "cpu":  # matrix by matrix; kept apart (stacking them costs a copy)
                self.pairs = [(a, tau) for a, tau in (torch.geqrf(x) for x in X)]
                self.R = torch.stack([torch.triu(a[:r]) for a, _ in self.pairs])
            else:
                a, tau = torch.geqrf(X)
                self.pairs = (a, tau)
                self.R = torch.triu(a[:, :r])
            return
        X = X.to(torch.float64)
        L1, info1 = torch.linalg.cholesky_ex(X.mT @ X)
        Q = torch.linalg.solve_triangular(L1.mT, X, upper=True, left=False)
        L2, info2 = torch.linalg.cholesky_ex(Q.mT @ Q)
        Q = torch.linalg.solve_triangular(L2.mT, Q, upper=True, left=False)
        R = L2.mT @ L1.mT
        eye = torch.eye(X.shape[2], dtype=X.dtype, device=X.device)
        orth = (Q.mT @ Q - eye).abs().amax(dim=(1, 2))
        scale = X.abs().amax(dim=(1, 2))
        resid = (Q @ R - X).abs().amax(dim=(1, 2))
        good = (info1 == 0) & (info2 == 0) & (orth <= _CHOLESKY_TOL) & (resid <= _CHOLESKY_TOL * scale)
        bad = torch.nonzero(~good).flatten().tolist()  # one sync
        for i in bad:  # exact zeros, repeated columns, κ beyond ~1e7: Householder for these few
            q_i, r_i = torch.linalg.qr(X[i])
            Q[i], R[i] = q_i, r_i
        self.Q, self.R = Q, R
        self.fallbacks = len(bad)

    def apply(self, Y: Tensor) -> Tensor:
        """Q @ Y for Y (b, r, m)."""
        if self.method == "cholesky":
            return self.Q @ Y.to(self.Q.dtype)
        padded = Y.new_zeros((Y.shape[0], self.rows, Y.shape[2]))
        padded[:, : Y.shape[1]] = Y
        if isinstance(self.pairs, list):
            return torch.stack([torch.ormqr(a, tau, y) for (a, tau), y in zip(self.pairs, padded)])
        return torch.ormqr(*self.pairs, padded)


class BatchedFactoredSVD:
    """Exact thin SVDs of b products ups[i] @ downs[i] of one shape (n×r @ r×k), side by side.

    The same mathematics as `factored_svd` (QR of both factors, SVD of the r×r core, kept singular
    vectors applied back), with one batched call per step instead of one per layer. `S` (b, q) is ready
    on construction; singular vectors are expanded on demand, only as many as kept (`expand`, `svds`).

    `method`: "householder" (Householder QR in `compute_dtype`; per matrix on the CPU), "cholesky"
    (CholeskyQR2 in float64, the cores' SVD in float64 on the CPU; only for `compute_dtype` float32,
    where it is at least as exact), or "auto": cholesky on CUDA for float32, else householder. Singular
    values agree with `factored_svd` to `compute_dtype` precision either way. Factors with NaN/Inf raise
    `LorahubError` naming `names[i]` when names are given.
    """

    def __init__(self, ups: Tensor | Sequence[Tensor], downs: Tensor | Sequence[Tensor], *,
                 compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 method: str = "auto", names: Sequence[str] | None = None) -> None:
        compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
        first = ups if isinstance(ups, torch.Tensor) else next(iter(ups), None)
        dev = device_of(device, *([first] if isinstance(first, torch.Tensor) else []))
        B = _stacked(ups, dev, compute_dtype, "ups")
        A = _stacked(downs, dev, compute_dtype, "downs")
        b, n, r = B.shape
        if A.shape[0] != b or A.shape[1] != r:
            raise ValueError(f"batched factors do not multiply: ups {tuple(B.shape)}, downs {tuple(A.shape)}")
        k = A.shape[2]
        if method == "auto":
            method = "cholesky" if dev.type == "cuda" and compute_dtype == torch.float32 else "householder"
        if method not in ("householder", "cholesky"):
            raise ValueError(f"unknown method {method!r} (auto|householder|cholesky)")
        if method == "cholesky" and compute_dtype != torch.float32:
            method = "householder"  # float64 Householder is the more exact one for float64 work
        self.b, self.n, self.r, self.k, self.q = b, n, r, k, min(r, n, k)
        self.dtype, self.device, self.method = compute_dtype, dev, method
        self.names = list(names) if names is not None else None
        if self.q == 0:
            self.S = B.new_zeros((b, 0))
            self._left = self._right = None
            self.U_m, self.Vh_m = B.new_zeros((b, n, 0)), B.new_zeros((b, 0, k))
            return
        # QR only where it shrinks the problem (r < n, r < k); otherwise the basis is the identity
        self._left = _Basis(B, method) if r < n else None
        R_B = self._left.R if self._left is not None else B  # (b, p, r)
        self._right = _Basis(A.mT, method) if r < k else None
        R_A = self._right.R if self._right is not None else A.mT  # (b, p', r)
        core_dtype = torch.float64 if method == "cholesky" else compute_dtype
        core = R_B.to(core_dtype) @ R_A.to(core_dtype).mT
        if dev.type != "cpu" and core.shape[1] * core.shape[2] <= _SMALL_CORE:
            core = core.cpu()  # small SVDs are latency-bound on a GPU (about 1 ms each for 64×64)
        finite = torch.isfinite(core).flatten(1).all(dim=1)
        if not bool(finite.all()):
            index = int(torch.nonzero(~finite)[0, 0])
            raise LorahubError("factors contain NaN or Inf; cannot compute their SVD",
                               key=self.names[index] if self.names else None)
        U_m, S, Vh_m = _parallel_svd(core) if core.device.type == "cpu" and dev.type != "cpu" else \
            torch.linalg.svd(core, full_matrices=False)
        self.U_m, self.Vh_m = U_m.to(dev), Vh_m.to(dev)
        self.S = S.to(device=dev, dtype=compute_dtype)

    @property
    def fallbacks(self) -> int:
        """How many factors the Cholesky route handed to Householder QR (0 for householder)."""
        return sum(getattr(side, "fallbacks", 0) for side in (self._left, self._right) if side is not None)

    def expand(self, keep: int | None = None) -> tuple[Tensor, Tensor]:
        """(U (b, n, m), Vh (b, m, k)) in `compute_dtype` with m = min(keep, q) singular vectors."""
        m = self.q if keep is None else max(0, min(int(keep), self.q))
        if self.q == 0:
            return self.U_m, self.Vh_m
        U_m, V_m = self.U_m[:, :, :m], self.Vh_m[:, :m].mT
        U = self._left.apply(U_m) if self._left is not None else U_m
        V = self._right.apply(V_m) if self._right is not None else V_m
        return U.to(self.dtype), V.to(self.dtype).mT

    def svds(self, keep: int | Sequence[int] | None = None) -> list[LowRankSVD]:
        """One `LowRankSVD` per product: all q singular values, `keep` (one for all, or one each)
        singular vectors expanded (default all q)."""
        keeps = [keep] * self.b if keep is None or isinstance(keep, int) else [int(x) for x in keep]
        if len(keeps) != self.b:
            raise ValueError(f"{len(keeps)} keep values for {self.b} products")
        widest = None if any(x is None for x in keeps) else max((x for x in keeps if x is not None), default=0)
        U, Vh = self.expand(widest)
        out = []
        for i, m in enumerate(keeps):
            m = U.shape[2] if m is None else max(0, min(m, self.q))
            out.append(LowRankSVD(U=U[i, :, :m], S=self.S[i], Vh=Vh[i, :m]))
        return out


def factored_svd_batched(ups: Tensor | Sequence[Tensor], downs: Tensor | Sequence[Tensor], *,
                         compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                         keep: int | Sequence[int] | None = None, method: str = "auto") -> list[LowRankSVD]:
    """`[factored_svd(up, down) for up, down in zip(ups, downs)]`, computed side by side.

    `ups`: b tensors n×r (or one (b, n, r) tensor), `downs`: b tensors r×k (or (b, r, k)); all products
    of one shape. Each result holds all q = min(r, n, k) singular values and `keep` singular vectors (an
    int, one int per product, or None for all). See `BatchedFactoredSVD` for `method`.
    """
    compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
    return BatchedFactoredSVD(ups, downs, compute_dtype=compute_dtype, device=device, method=method).svds(keep)


def factored_svd_sum_batched(term_lists: Sequence[list[tuple[float, Tensor, Tensor]]], *,
                             compute_dtype: torch.dtype | None = None,
                             device: torch.device | str | None = None,
                             keep: int | Sequence[int] | None = None, method: str = "auto") -> list[LowRankSVD]:
    """`[factored_svd_sum(terms) for terms in term_lists]`, side by side: every sum must stack to the
    same shape (n×R @ R×k, R = Σ rᵢ), e.g. the same module of each blended adapter."""
    compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
    stacked = []
    for terms in term_lists:
        dev = device_of(device, terms[0][1]) if terms else None
        stacked.append(stack_terms([(c, u.to(dev), d.to(dev)) for c, u, d in terms], dtype=compute_dtype))
    return factored_svd_batched([u for u, _ in stacked], [d for _, d in stacked], compute_dtype=compute_dtype,
                                device=device, keep=keep, method=method)


def split_factors_batched(U: Tensor, S: Tensor, Vh: Tensor, mode: str = "balanced") -> tuple[Tensor, Tensor]:
    """`split_factors` for a batch: U (b, n, m), S (b, ≥ m), Vh (b, m, k) → (up (b, n, m), down (b, m, k)).
    Column j of a product's result depends only on its j-th triplet, so slicing the first r' ≤ m
    columns/rows per product gives exactly `split_factors(svd, r')`."""
    m = U.shape[2]
    S = S[:, :m].to(U.dtype)
    if mode == "balanced":
        root = torch.sqrt(S)
        return U * root[:, None, :], root[:, :, None] * Vh
    if mode == "up":
        return U * S[:, None, :], Vh.clone()
    if mode == "down":
        return U.clone(), S[:, :, None] * Vh
    raise ValueError(f"unknown split mode {mode!r} (balanced|up|down)")


def stack_terms(terms: list[tuple[float, Tensor, Tensor]], *,
                dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """[(c_i, up_i n×r_i, down_i r_i×k)] → (up n×R, down R×k) with Σ c_i·up_i@down_i == up@down.

    Each coefficient is split as √|c| into up and sign(c)·√|c| into down (balanced magnitudes).
    Terms with c = 0 are kept (as zero columns) so R = Σ r_i always. The result is on the first
    term's device, in `dtype` (default: float64 if any factor is float64, else float32).
    """
    if not terms:
        raise ValueError("stack_terms needs at least one term")
    n = terms[0][1].shape[0]
    k = terms[0][2].shape[1]
    dev = terms[0][1].device
    if dtype is None:
        dtype = torch.float64 if any(t[1].dtype == torch.float64 or t[2].dtype == torch.float64
                                     for t in terms) else torch.float32
    ups, downs = [], []
    for i, (coeff, up, down) in enumerate(terms):
        if up.ndim != 2 or down.ndim != 2 or up.shape[0] != n or down.shape[1] != k \
                or up.shape[1] != down.shape[0]:
            raise ValueError(f"term {i}: shapes {tuple(up.shape)} @ {tuple(down.shape)} do not give "
                             f"{n}×{k}")
        c = float(coeff)
        root = math.sqrt(abs(c))
        sign = -1.0 if c < 0 else 1.0
        ups.append(up.to(device=dev, dtype=dtype) * root)
        downs.append(down.to(device=dev, dtype=dtype) * (sign * root))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def factored_svd_sum(terms: list[tuple[float, Tensor, Tensor]], *,
                     compute_dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> LowRankSVD:
    """Exact thin SVD of Σ c_i·up_i@down_i, in O((n + k)·R²) with R = Σ r_i."""
    compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
    dev = device_of(device, terms[0][1]) if terms else None
    up, down = stack_terms([(c, u.to(dev), d.to(dev)) for c, u, d in terms], dtype=compute_dtype)
    return factored_svd(up, down, compute_dtype=compute_dtype, device=dev)


def _as_f64_cpu(S: Tensor) -> Tensor:
    """S as float64 on the CPU, divided by S[0] (the rules are scale-free; avoids under/overflow)."""
    S = S.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if not torch.isfinite(S).all():
        raise LorahubError("singular values contain NaN or Inf (the layer's factors are not finite)")
    if S.numel() and float(S[0]) > 0.0:
        S = S / S[0]
    return S


def _first_reaching(curve: Tensor, target: float) -> int:
    """1-based k: the minimal k with curve[k-1] ≥ target (len(curve) if none reaches it)."""
    hits = torch.nonzero(curve >= target)
    return int(hits[0, 0]) + 1 if hits.numel() else int(curve.shape[0])


def choose_rank(S: Tensor, *, rank: int | None = None, method: str = "fixed",
                param: float | None = None, kohya_compat: bool = False) -> int:
    """The rank to keep for a descending spectrum `S`.

    `method="fixed"`: `rank` (required) clamped to len(S). Dynamic methods: the minimal rank meeting
    the rule in the module docstring, at most the number of non-zero singular values, then capped by
    `rank` if given (if rounding keeps a cumulative curve just below p = 1, the number of non-zero
    singular values is returned). An all-zero spectrum gives 0.

    `kohya_compat=True` reproduces kohya-ss `resize_lora.py` exactly (formats.md §6.3): the dynamic
    index is `#{σ > σ₀/p}` (sv_ratio) or `searchsorted(cumulative curve, target) + 1` (sv_fro on
    S², target p²; sv_cumulative on S), clamped to [1, len(S) − 1], plus one; σ₀ ≤ 1e-6 gives 1;
    then capped by `rank`. kohya applies this to the full spectrum of the dense matrix
    (length min(n, k)); pass S zero-padded to that length to reproduce its upper clamp too.
    """
    if method not in METHODS:
        raise OptionError(f"unknown rank method {method!r}; choose one of {', '.join(METHODS)}")
    if rank is not None and rank < 0:
        raise OptionError(f"rank must be ≥ 0, got {rank}")
    if method == "fixed":
        if rank is None:
            raise OptionError("method 'fixed' needs a rank")
    else:
        if param is None:
            raise OptionError(f"method {method!r} needs a parameter (--param)")
        param = float(param)
        if method == "sv_ratio" and not param >= 1.0:
            raise OptionError(f"sv_ratio keeps σ > σ₀/p and needs p ≥ 1, got {param}")
        if method in ("sv_fro", "sv_cumulative") and not 0.0 < param <= 1.0:
            raise OptionError(f"{method} needs a fraction 0 < p ≤ 1, got {param}")
    if kohya_compat:
        return _choose_rank_kohya(S, rank=rank, method=method, param=param)

    S64 = _as_f64_cpu(S)
    length = int(S64.shape[0])
    if length == 0 or float(S64[0]) <= 0.0:
        return 0
    if method == "fixed":
        assert rank is not None  # checked above
        return min(int(rank), length)
    assert param is not None  # checked above
    nonzero = int((S64 > 0).sum())
    if method == "sv_ratio":
        k = int((S64 > S64[0] / param).sum())
    elif method == "sv_fro":
        k = _first_reaching(torch.sqrt(torch.cumsum(S64 * S64, 0)) / torch.linalg.vector_norm(S64), param)
    else:  # sv_cumulative
        k = _first_reaching(torch.cumsum(S64, 0) / S64.sum(), param)
    k = max(1, min(k, nonzero))
    if rank is not None:
        k = min(k, int(rank))
    return k


def _choose_rank_kohya(S: Tensor, *, rank: int | None, method: str, param: float | None) -> int:
    S = S.detach().to("cpu").reshape(-1)
    if S.dtype not in (torch.float32, torch.float64):
        S = S.float()
    length = int(S.shape[0])
    if length == 0:
        return 0

    def clamp(index: int) -> int:
        return max(1, min(index, length - 1))

    if method == "fixed":
        assert rank is not None  # choose_rank checked it
        new_rank = int(rank)
    else:
        assert param is not None  # choose_rank checked it
        if method == "sv_ratio":
            new_rank = clamp(int((S > S[0] / param).sum())) + 1
        elif method == "sv_fro":
            sq = S.pow(2)
            curve = torch.cumsum(sq, 0) / float(sq.sum())
            new_rank = clamp(int(torch.searchsorted(curve, torch.tensor(param ** 2, dtype=S.dtype))) + 1) + 1
        else:
            curve = torch.cumsum(S, 0) / float(S.sum())
            new_rank = clamp(int(torch.searchsorted(curve, torch.tensor(param, dtype=S.dtype))) + 1) + 1
    if float(S[0]) <= _KOHYA_MIN_SV:
        new_rank = 1
    elif rank is not None and new_rank > rank:
        new_rank = int(rank)
    return new_rank


# where the singular values go when factors are rebuilt from an SVD (resize --split, blend --split)
SPLITS = ("balanced", "up", "down")
SPLIT_HELP = ("How S is split after an SVD: B = U√S, A = √S·Vᵀ (balanced); B = U·S, A = Vᵀ (up, kohya/PEFT); "
              "B = U, A = S·Vᵀ (down)")


def split_factors(svd: LowRankSVD, rank: int, mode: str = "balanced") -> tuple[Tensor, Tensor]:
    """(up n×r', down r'×k) from the first r' = min(rank, q) triplets.

    mode "balanced": up = U·√S, down = √S·Vh (default; equal magnitudes, best for fp16 range and
    later factor-space work). "up": up = U·S, down = Vh (kohya). "down": up = U, down = S·Vh.
    """
    r = max(0, min(int(rank), svd.rank_bound))
    U, S, Vh = svd.U[:, :r], svd.S[:r], svd.Vh[:r]
    if mode == "balanced":
        root = torch.sqrt(S)
        return U * root, root[:, None] * Vh
    if mode == "up":
        return U * S, Vh.clone()
    if mode == "down":
        return U.clone(), S[:, None] * Vh
    raise ValueError(f"unknown split mode {mode!r} (balanced|up|down)")


def retention(S: Tensor, rank: int) -> dict:
    """What keeping the first `rank` singular values retains, as plain floats.

    fro_retained ‖S[:r]‖/‖S‖, energy_retained its square, sum_retained ΣS[:r]/ΣS,
    max_dropped_ratio S[r]/S[0] (0.0 if nothing is dropped). An all-zero spectrum retains 1.0.
    """
    S64 = _as_f64_cpu(S)
    r = max(0, min(int(rank), int(S64.shape[0])))
    total_sq = float((S64 * S64).sum())
    total = float(S64.sum())
    if total_sq <= 0.0:
        return {"fro_retained": 1.0, "energy_retained": 1.0, "sum_retained": 1.0, "max_dropped_ratio": 0.0}
    kept_sq = float((S64[:r] * S64[:r]).sum())
    energy = kept_sq / total_sq
    dropped = float(S64[r] / S64[0]) if r < S64.shape[0] else 0.0
    return {
        "fro_retained": math.sqrt(energy),
        "energy_retained": energy,
        "sum_retained": float(S64[:r].sum()) / total,
        "max_dropped_ratio": dropped,
    }


def retention_batched(S: Tensor, ranks: Sequence[int]) -> list[dict]:
    """`[retention(S[i], ranks[i]) for i in range(b)]` for spectra S (b, q), computed at once (the
    same formulas; sums may differ from the per-row ones in the last bit)."""
    S64 = S.detach().to(device="cpu", dtype=torch.float64).reshape(S.shape[0], -1)
    if not bool(torch.isfinite(S64).all()):
        raise LorahubError("singular values contain NaN or Inf (the layer's factors are not finite)")
    b, q = S64.shape
    if q == 0:
        return [retention(S64[i], ranks[i]) for i in range(b)]
    first = S64[:, :1]
    S64 = torch.where(first > 0, S64 / torch.where(first > 0, first, torch.ones_like(first)), S64)
    r = torch.tensor([max(0, min(int(rank), q)) for rank in ranks], dtype=torch.long)
    kept = torch.arange(q)[None, :] < r[:, None]
    sq = S64 * S64
    total_sq, total = sq.sum(dim=1), S64.sum(dim=1)
    kept_sq, kept_sum = (sq * kept).sum(dim=1), (S64 * kept).sum(dim=1)
    next_value = S64.gather(1, r.clamp(max=q - 1)[:, None])[:, 0]  # S[r]: the largest dropped value
    dropped = torch.where(r < q, next_value / S64[:, 0], torch.zeros(b, dtype=torch.float64))
    out = []
    for total_sq_i, total_i, kept_sq_i, kept_sum_i, dropped_i in zip(
            total_sq.tolist(), total.tolist(), kept_sq.tolist(), kept_sum.tolist(), dropped.tolist()):
        if total_sq_i <= 0.0:
            out.append({"fro_retained": 1.0, "energy_retained": 1.0, "sum_retained": 1.0, "max_dropped_ratio": 0.0})
            continue
        energy = kept_sq_i / total_sq_i
        out.append({"fro_retained": math.sqrt(energy), "energy_retained": energy,
                    "sum_retained": kept_sum_i / total_i, "max_dropped_ratio": dropped_i})
    return out


def effective_rank(S: Tensor, energy: float = 0.99) -> int:
    """Minimal k with ΣS[:k]² ≥ energy·ΣS² (0 for an all-zero spectrum)."""
    S64 = _as_f64_cpu(S)
    if S64.numel() == 0 or float(S64[0]) <= 0.0:
        return 0
    sq = S64 * S64
    k = _first_reaching(torch.cumsum(sq, 0) / sq.sum(), float(energy))
    return max(1, min(k, int((S64 > 0).sum())))
