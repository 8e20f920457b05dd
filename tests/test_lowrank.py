"""Property tests for lorahub.lowrank: the factored SVD against numpy's dense SVD, the rank rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorahub.errors import LorahubError
from lorahub.lowrank import (
    LowRankSVD,
    choose_rank,
    effective_rank,
    factored_svd,
    factored_svd_sum,
    retention,
    split_factors,
    stack_terms,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def factor_pairs(draw, max_n=64, max_k=96, max_r=16):
    """(up n×r, down r×k) float64 with a decaying spectrum; sometimes rank-deficient or zero."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    r = draw(st.integers(1, max_r))  # includes r > min(n, k)
    kind = draw(st.sampled_from(["gauss", "decay", "deficient", "zero"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(n, r, generator=g, dtype=torch.float64)
    down = torch.randn(r, k, generator=g, dtype=torch.float64)
    if kind == "decay":
        up = up * torch.exp(-torch.arange(r, dtype=torch.float64) / 3)
    elif kind == "deficient" and r > 1:
        # repeat columns of up: the product has rank < r, QR's R gets (near-)zero diagonals
        keep = draw(st.integers(1, r - 1))
        up[:, keep:] = up[:, :1].expand(-1, r - keep)
    elif kind == "zero":
        up = torch.zeros_like(up) if draw(st.booleans()) else up
        down = torch.zeros_like(down)
    return up, down


def dense_spectrum(up: torch.Tensor, down: torch.Tensor) -> np.ndarray:
    return np.linalg.svd((up.double() @ down.double()).numpy(), compute_uv=False)


# ---------------------------------------------------------------------------- factored SVD

@SETTINGS
@given(factor_pairs(), st.sampled_from([torch.float32, torch.float64]))
def test_singular_values_match_dense_svd(pair, dtype):
    up, down = pair
    svd = factored_svd(up, down, compute_dtype=dtype)
    n, r = up.shape
    k = down.shape[1]
    q = min(r, n, k)
    assert svd.U.shape == (n, q) and svd.S.shape == (q,) and svd.Vh.shape == (q, k)
    assert svd.S.dtype == dtype and svd.U.dtype == dtype and svd.Vh.dtype == dtype
    ref = dense_spectrum(up, down)
    S = svd.S.double().numpy()
    assert np.all(np.diff(S) <= 1e-12 * max(ref[0], 1.0))  # descending
    scale = max(ref[0], 1e-300)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(S, ref[:q], rtol=0, atol=tol * scale)
    # everything beyond q is zero in the dense spectrum
    assert np.all(ref[q:] <= 1e-10 * scale)


@SETTINGS
@given(factor_pairs(), st.integers(0, 20), st.sampled_from(["balanced", "up", "down"]))
def test_truncation_is_eckart_young_optimal(pair, rank, mode):
    up, down = pair
    svd = factored_svd(up, down, compute_dtype=torch.float64)
    new_up, new_down = split_factors(svd, rank, mode)
    r = min(rank, svd.rank_bound)
    assert new_up.shape == (up.shape[0], r) and new_down.shape == (r, down.shape[1])
    ref = dense_spectrum(up, down)
    optimum = math.sqrt(float(np.sum(ref[r:] ** 2)))
    err = float(torch.linalg.matrix_norm(up @ down - new_up @ new_down))
    assert abs(err - optimum) <= 1e-5 * max(ref[0], 1e-300) + 1e-12


@SETTINGS
@given(factor_pairs())
def test_rank_at_or_above_layer_rank_reproduces_product(pair):
    up, down = pair
    product = up @ down
    scale = max(float(product.abs().max()), 1e-300)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        svd = factored_svd(up, down, compute_dtype=dtype)
        for rank in (up.shape[1], up.shape[1] + 3):
            a, b = split_factors(svd, rank)
            assert float((a.double() @ b.double() - product).abs().max()) <= tol * scale * 10


def test_balanced_split_has_equal_factor_norms():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 8, generator=g) * 100, torch.randn(8, 50, generator=g) * 0.01
    a, b = split_factors(factored_svd(up, down), 8, "balanced")
    np.testing.assert_allclose(a.norm(dim=0).numpy(), b.norm(dim=1).numpy(), rtol=1e-4)
    a, b = split_factors(factored_svd(up, down), 8, "up")
    np.testing.assert_allclose(b.norm(dim=1).numpy(), np.ones(8), rtol=1e-5)


def test_edge_shapes_and_zero():
    svd = factored_svd(torch.zeros(5, 0), torch.zeros(0, 7))
    assert svd.S.shape == (0,) and svd.U.shape == (5, 0) and svd.Vh.shape == (0, 7)
    svd = factored_svd(torch.zeros(6, 3), torch.zeros(3, 4))
    assert torch.all(svd.S == 0)
    assert choose_rank(svd.S, rank=4) == 0
    assert choose_rank(svd.S, method="sv_fro", param=0.9) == 0
    assert choose_rank(svd.S, method="sv_fro", param=0.9, kohya_compat=True) == 1
    with pytest.raises(LorahubError):
        factored_svd(torch.full((3, 2), float("nan")), torch.ones(2, 3))
    with pytest.raises(ValueError):
        factored_svd(torch.ones(3, 2), torch.ones(3, 3))


def test_device_and_dtype_are_honoured():
    up, down = torch.randn(7, 3, dtype=torch.bfloat16), torch.randn(3, 9, dtype=torch.float16)
    svd = factored_svd(up, down, device="cpu")
    assert isinstance(svd, LowRankSVD) and svd.S.dtype == torch.float32 and svd.U.device.type == "cpu"


# ---------------------------------------------------------------------------- sums

@SETTINGS
@given(st.integers(1, 48), st.integers(1, 64), st.lists(
    st.tuples(st.floats(-3, 3, allow_nan=False), st.integers(1, 8)), min_size=1, max_size=4),
    st.integers(0, 2**31 - 1))
def test_factored_svd_sum_matches_dense_sum(n, k, spec, seed):
    g = torch.Generator().manual_seed(seed)
    terms = [(c, torch.randn(n, r, generator=g, dtype=torch.float64),
              torch.randn(r, k, generator=g, dtype=torch.float64)) for c, r in spec]
    dense = sum(c * (u @ d) for c, u, d in terms)
    up, down = stack_terms(terms)
    assert up.shape == (n, sum(r for _, r in spec)) and down.shape[0] == up.shape[1]
    assert float((up @ down - dense).abs().max()) <= 1e-10 * max(1.0, float(dense.abs().max()))
    svd = factored_svd_sum(terms, compute_dtype=torch.float64)
    ref = np.linalg.svd(dense.numpy(), compute_uv=False)
    q = svd.rank_bound
    np.testing.assert_allclose(svd.S.numpy(), ref[:q], rtol=0, atol=1e-10 * max(ref[0], 1e-300))
    assert float((svd.dense() - dense).abs().max()) <= 1e-10 * max(1.0, float(dense.abs().max()))


def test_stack_terms_sign_on_down():
    up, down = stack_terms([(-4.0, torch.ones(2, 1), torch.ones(1, 3))])
    assert torch.all(up == 2) and torch.all(down == -2)


# ---------------------------------------------------------------------------- rank rules

spectra = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 100)), min_size=1, max_size=40).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))


def fro_frac(S: np.ndarray, k: int) -> float:
    return float(np.linalg.norm(S[:k]) / np.linalg.norm(S))


def cum_frac(S: np.ndarray, k: int) -> float:
    return float(S[:k].sum() / S.sum())


@SETTINGS
@given(spectra, st.floats(0.01, 1.0), st.sampled_from(["sv_fro", "sv_cumulative"]))
def test_fraction_rules_are_minimal(S, p, method):
    k = choose_rank(S, method=method, param=p)
    s = S.numpy()
    if s[0] == 0:
        assert k == 0
        return
    frac = fro_frac if method == "sv_fro" else cum_frac
    nonzero = int((s > 0).sum())
    assert 1 <= k <= nonzero
    if k < nonzero or p < 1:
        assert frac(s, k) >= p - 1e-12
    assert k == 1 or frac(s, k - 1) < p
    # the cap
    for cap in (1, 2, 5):
        assert choose_rank(S, method=method, param=p, rank=cap) == min(k, cap)


@SETTINGS
@given(spectra, st.floats(1.0, 1e4))
def test_ratio_rule_keeps_exactly_the_large_values(S, p):
    k = choose_rank(S, method="sv_ratio", param=p)
    s = S.numpy()
    if s[0] == 0:
        assert k == 0
        return
    assert k >= 1
    assert np.all(s[1:k] > s[0] / p)  # σ₀ itself is always kept (a non-zero layer keeps ≥ 1)
    assert k == len(s) or not s[k] > s[0] / p


@SETTINGS
@given(spectra, st.integers(0, 50))
def test_fixed_rank_is_clamped(S, rank):
    k = choose_rank(S, rank=rank)
    assert k == (0 if float(S[0]) == 0 else min(rank, len(S)))


def test_kohya_off_by_one_example():
    S = torch.tensor([10, 5, 2, 1, 0.5] + [0.0] * 11)
    assert choose_rank(S, method="sv_fro", param=0.9) == 2
    assert choose_rank(S, method="sv_fro", param=0.9, kohya_compat=True) == 3
    assert choose_rank(S, method="sv_ratio", param=10) == 3
    assert choose_rank(S, method="sv_ratio", param=10, kohya_compat=True) == 4
    assert choose_rank(S, method="sv_cumulative", param=0.9) == 3
    assert choose_rank(S, method="sv_cumulative", param=0.9, kohya_compat=True) == 4
    # kohya's floor of 2 for non-zero layers, its cap, and its upper clamp to len(S) - 1
    assert choose_rank(S, method="sv_ratio", param=1.0) == 1
    assert choose_rank(S, method="sv_ratio", param=1.0, kohya_compat=True) == 2
    assert choose_rank(S, method="sv_cumulative", param=0.9, rank=2, kohya_compat=True) == 2
    short = torch.tensor([3.0, 2.0, 1.0])
    assert choose_rank(short, method="sv_fro", param=1.0, kohya_compat=True) == 3
    assert choose_rank(short, method="sv_fro", param=1.0) == 3


def test_bad_parameters_raise():
    S = torch.tensor([1.0, 0.5])
    for kwargs in ({"method": "sv_fro", "param": 1.5}, {"method": "sv_fro"}, {"method": "sv_ratio", "param": 0.5},
                   {"method": "nope", "param": 1}, {"method": "fixed"}, {"rank": -1}):
        with pytest.raises(LorahubError):
            choose_rank(S, **kwargs)


# ---------------------------------------------------------------------------- statistics

@SETTINGS
@given(spectra, st.integers(0, 45))
def test_retention(S, r):
    out = retention(S, r)
    assert set(out) == {"fro_retained", "energy_retained", "sum_retained", "max_dropped_ratio"}
    assert all(isinstance(v, float) for v in out.values())
    s = S.numpy()
    if s[0] == 0:
        assert out["fro_retained"] == 1.0
        return
    rr = min(r, len(s))
    assert out["fro_retained"] == pytest.approx(fro_frac(s, rr), abs=1e-12)
    assert out["energy_retained"] == pytest.approx(fro_frac(s, rr) ** 2, abs=1e-12)
    assert out["sum_retained"] == pytest.approx(cum_frac(s, rr), abs=1e-12)
    assert out["max_dropped_ratio"] == pytest.approx(s[rr] / s[0] if rr < len(s) else 0.0, abs=1e-12)


@SETTINGS
@given(spectra, st.floats(0.5, 0.999))
def test_effective_rank_is_minimal(S, energy):
    k = effective_rank(S, energy)
    s = S.numpy()
    if s[0] == 0:
        assert k == 0
        return
    assert fro_frac(s, k) ** 2 >= energy - 1e-12
    assert k == 1 or fro_frac(s, k - 1) ** 2 < energy
    assert effective_rank(torch.tensor([10, 5, 2, 1, 0.5, 0.0])) == 3
