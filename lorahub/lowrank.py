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

import torch
from torch import Tensor

from .devices import device_of
from .errors import LorahubError, OptionError

__all__ = [
    "LowRankSVD",
    "factored_svd",
    "stack_terms",
    "factored_svd_sum",
    "choose_rank",
    "split_factors",
    "retention",
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


def factored_svd(up: Tensor, down: Tensor, *, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> LowRankSVD:
    """Exact thin SVD of `up @ down` (up n×r, down r×k) without forming the n×k product.

    Returns tensors in `compute_dtype` on `device` (default: `up`'s device), q = min(r, n, k)
    singular triplets, S descending. Works for r > n or r > k, zero factors and r = 0 (q = 0).
    """
    return _FactoredSVD(up, down, compute_dtype, device).svd()


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
                     compute_dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> LowRankSVD:
    """Exact thin SVD of Σ c_i·up_i@down_i, in O((n + k)·R²) with R = Σ r_i."""
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
        return min(int(rank), length)
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
        new_rank = int(rank)
    elif method == "sv_ratio":
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


def effective_rank(S: Tensor, energy: float = 0.99) -> int:
    """Minimal k with ΣS[:k]² ≥ energy·ΣS² (0 for an all-zero spectrum)."""
    S64 = _as_f64_cpu(S)
    if S64.numel() == 0 or float(S64[0]) <= 0.0:
        return 0
    sq = S64 * S64
    k = _first_reaching(torch.cumsum(sq, 0) / sq.sum(), float(energy))
    return max(1, min(k, int((S64 > 0).sum())))
