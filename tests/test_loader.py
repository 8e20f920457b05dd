"""The loader (one handle and one parsed header per file) and the batched factored SVD.

- `storage.open_safetensors`: a file's header is parsed once however many tensors are read, reads
  go through one descriptor, every safetensors dtype comes back bit for bit as safetensors reads it,
  changed files are re-read, evicted files close, threads read side by side.
- `lowrank.BatchedFactoredSVD` / `factored_svd_batched`: the same singular values as the per-layer
  `factored_svd` (to fp32 precision; Householder batches bit for bit), for groups with zero,
  rank-deficient and wide factors; `resize_adapter` gives the same result batched and per layer.
"""
from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lorahub import storage
from lorahub.adapter import Adapter, LazyTensor, LoraLayer
from lorahub.batches import plan_batches, stack_factors
from lorahub.errors import LorahubError
from lorahub.formats import load_adapter, save_adapter
from lorahub.formats.common import TensorSource
from lorahub.inspect import inspect_adapter
from lorahub.lowrank import (
    BatchedFactoredSVD,
    factored_svd,
    factored_svd_batched,
    factored_svd_sum,
    factored_svd_sum_batched,
    split_factors,
    split_factors_batched,
)
from lorahub.resize import layer_spectra, resize_adapter


@pytest.fixture(autouse=True)
def fresh_cache():
    storage.close_open_files()
    yield
    storage.close_open_files()


@pytest.fixture
def parse_count(monkeypatch):
    """How many safetensors headers were parsed (every parse goes through parse_header_bytes)."""
    calls = []
    original = storage.parse_header_bytes

    def counting(raw, path, file_size):
        calls.append(str(path))
        return original(raw, path, file_size)

    monkeypatch.setattr(storage, "parse_header_bytes", counting)
    return calls


def kohya_file(path, modules=20, rank=4, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(modules):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{i}_attn1_to_q"
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, 32, generator=g).to(dtype)
        tensors[f"{name}.lora_up.weight"] = torch.randn(32, rank, generator=g).to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(i % 7 + 1), dtype=dtype)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    return tensors


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------------------------- loader

def test_header_parsed_once_for_load_factors_and_hashes(tmp_path, parse_count):
    path = tmp_path / "lora.safetensors"
    tensors = kohya_file(path, modules=30)
    adapter = load_adapter(path)
    for layer in adapter.layers.values():
        layer.factors()
        assert layer.alpha == float(tensors[f"{layer.source_name}.alpha"])
    info = inspect_adapter(path)  # hashes + NaN scan read everything again
    assert info["modules"] == 30 and not info["nonfinite"]
    assert parse_count == [str(path)]


def test_one_descriptor_per_file(tmp_path):
    paths = [tmp_path / f"f{i}.safetensors" for i in range(3)]
    for i, path in enumerate(paths):
        kohya_file(path, modules=10, seed=i)
    storage.close_open_files()  # handles cached by earlier tests would be closed below and skew the count
    gc.collect()
    before = open_fds()
    adapters = [load_adapter(path) for path in paths]
    for _ in range(3):
        for adapter in adapters:
            for layer in adapter.layers.values():
                layer.factors()
    assert open_fds() - before == 3
    assert storage.open_safetensors(paths[0]) is storage.open_safetensors(str(paths[0]))
    storage.close_open_files()
    gc.collect()
    assert open_fds() == before


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    values = {
        "f64": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "f32": torch.randn(7, generator=g),
        "f16": torch.randn(2, 3, 4, generator=g).half(),
        "bf16": torch.randn(5, 3, generator=g).bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (4,), generator=g),
        "i32": torch.randint(-2**30, 2**30, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**14, 2**14, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (6,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(9, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
        "scalar_f32": torch.tensor(3.25),
        "scalar_f16": torch.tensor(-0.5, dtype=torch.float16),
        "scalar_bf16": torch.tensor(16.0, dtype=torch.bfloat16),
        "scalar_f64": torch.tensor(1 / 3, dtype=torch.float64),
        "scalar_i64": torch.tensor(-12),
        "one_f32": torch.tensor([8.0]),
    }
    if hasattr(torch, "float8_e4m3fn"):
        values["f8_e4m3"] = torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)
        values["f8_e5m2"] = torch.randn(3, generator=g).to(torch.float8_e5m2)
        values["scalar_f8"] = torch.tensor(2.0).to(torch.float8_e4m3fn)
    return values


def test_every_dtype_reads_bit_for_bit(tmp_path):
    path = tmp_path / "dtypes.safetensors"
    save_file(_all_dtypes(), str(path))
    expected = load_file(str(path))
    header = storage.cached_header(path)
    source = TensorSource(path)
    for key, value in expected.items():
        info = header.tensors[key]
        got = LazyTensor(path=path, key=key, shape=info.shape, dtype=info.dtype).load()
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
        if value.numel() == 1:
            assert source.scalar(key) == float(value.reshape(()).to(torch.float64)), key
    with pytest.raises(LorahubError, match="expected a scalar"):
        source.scalar("f32")


def test_missing_key_and_missing_value():
    with pytest.raises(LorahubError, match="neither a value nor a file"):
        LazyTensor(shape=(2,), dtype="F32", key="x").load()


def test_missing_key(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.ones(2)}, str(path))
    with pytest.raises(LorahubError, match="tensor 'b'.*no tensor of this name"):
        LazyTensor(path=path, key="b").load()


def test_changed_file_is_read_again(tmp_path, parse_count):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(3), "y": torch.zeros(2)}, str(path))
    assert torch.equal(LazyTensor(path=path, key="x").load(), torch.ones(3))
    save_file({"x": torch.arange(5.0)}, str(path))  # other size: a new identity
    assert torch.equal(LazyTensor(path=path, key="x").load(), torch.arange(5.0))
    assert len(parse_count) == 2


def test_truncated_after_reading_the_header(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"x": torch.ones(1000), "y": torch.ones(1000)}, str(path))
    tensor = LazyTensor(path=path, key="y")
    storage.open_safetensors(path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(LorahubError, match="cut.safetensors.*truncated"):
        tensor.load()


def test_corrupt_entry_size(tmp_path):
    import json
    import struct

    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(LorahubError, match="bad.safetensors.*tensor 'x'.*corrupt"):
        LazyTensor(path=path, key="x").load()


def test_eviction_closes_the_files_no_reader_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "OPEN_FILES_MAX", 2)
    paths = [tmp_path / f"f{i}.safetensors" for i in range(4)]
    for i, path in enumerate(paths):
        save_file({"x": torch.full((4,), float(i))}, str(path))
    held = storage.open_safetensors(paths[0])
    before = open_fds()
    for path in paths[1:]:
        storage.open_safetensors(path)
    gc.collect()
    # paths[0] was evicted but is still held: open and readable; paths[1] was evicted and closed
    assert not held.closed
    assert held.read_bytes("x") == torch.full((4,), 0.0).numpy().tobytes()
    assert open_fds() == before + 2  # paths[2], paths[3] cached; paths[1] closed
    del held
    gc.collect()
    assert open_fds() == before + 1


def test_threads_read_side_by_side_while_the_cache_evicts(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "OPEN_FILES_MAX", 2)
    files = {}
    for i in range(5):
        path = tmp_path / f"f{i}.safetensors"
        g = torch.Generator().manual_seed(i)
        tensors = {f"t{j}": torch.randn(257, generator=g).to(torch.bfloat16 if j % 2 else torch.float32)
                   for j in range(20)}
        save_file(tensors, str(path))
        files[path] = tensors
    errors = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(300):
                path = list(files)[rng.integers(len(files))]
                key = f"t{rng.integers(20)}"
                value = LazyTensor(path=path, key=key).load()
                if not torch.equal(value, files[path][key]):
                    errors.append((path, key))
                if rng.random() < 0.02:
                    storage.close_open_files()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_same_file_opened_by_many_threads_is_parsed_once(tmp_path, parse_count):
    path = tmp_path / "a.safetensors"
    save_file({f"t{j}": torch.randn(10) for j in range(50)}, str(path))
    barrier = threading.Barrier(8)

    def reader():
        barrier.wait()
        for j in range(50):
            LazyTensor(path=path, key=f"t{j}").load()

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert parse_count == [str(path)]


# ------------------------------------------------------------------------------ batched SVD

def _group(b, n, r, k, seed, kinds=("gauss", "decay", "deficient", "zero", "tiny")):
    """b factor pairs of one shape, cycling through well-conditioned, rank-deficient and zero ones."""
    g = torch.Generator().manual_seed(seed)
    ups, downs = [], []
    for i in range(b):
        kind = kinds[i % len(kinds)]
        up = torch.randn(n, r, generator=g) / n ** 0.5
        down = torch.randn(r, k, generator=g) / k ** 0.5
        if kind == "decay":
            up = up * torch.exp(-torch.arange(r) / 3)
        elif kind == "deficient" and r > 1:
            up[:, r // 2:] = up[:, :1]  # repeated columns: the product has rank < r
            down[-1] = 0
        elif kind == "zero":
            up = torch.zeros_like(up)
        elif kind == "tiny":  # one direction at fp32's edge (κ ≈ 1e6)
            up[:, -1] *= 1e-6
        ups.append(up)
        downs.append(down)
    return ups, downs


SHAPES = [(6, 40, 8, 50), (5, 64, 16, 32), (4, 12, 16, 30), (4, 30, 16, 12), (3, 9, 12, 7), (2, 300, 4, 5)]


@pytest.mark.parametrize("b,n,r,k", SHAPES)
@pytest.mark.parametrize("method", ["householder", "cholesky"])
def test_batched_svd_equals_per_layer(b, n, r, k, method):
    ups, downs = _group(b, n, r, k, seed=n * k + r)
    batch = BatchedFactoredSVD(ups, downs, method=method)
    keep = min(r, n, k) // 2 + 1
    results = batch.svds(keep)
    for up, down, got in zip(ups, downs, results):
        want = factored_svd(up, down)
        exact = np.linalg.svd(up.double().numpy() @ down.double().numpy(), compute_uv=False)[: want.S.shape[0]]
        scale = max(float(exact[0]), 1e-30)
        assert got.S.dtype == torch.float32 and got.S.shape == want.S.shape
        assert float((got.S - want.S).abs().max()) <= 2e-6 * scale
        assert np.abs(got.S.double().numpy() - exact).max() <= 2e-6 * scale
        if method == "householder":  # the same LAPACK calls; only the r×r core product may round differently
            assert float((got.S - want.S).abs().max()) <= 4 * torch.finfo(torch.float32).eps * scale
        # the kept triplets rebuild the same best rank-`keep` approximation
        torch.testing.assert_close(got.dense(keep), want.dense(keep), rtol=0, atol=1e-5 * scale)
        assert got.U.shape == (n, min(keep, want.rank_bound)) and got.Vh.shape == (min(keep, want.rank_bound), k)
    if method == "cholesky" and r < n and b >= 4:
        assert batch.fallbacks >= 1  # the zero and repeated-column factors went to Householder QR


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5), st.integers(1, 48), st.integers(1, 12), st.integers(1, 48), st.integers(0, 2**31 - 1),
       st.sampled_from(["householder", "cholesky"]))
def test_batched_svd_property(b, n, r, k, seed, method):
    ups, downs = _group(b, n, r, k, seed)
    for up, down, got in zip(ups, downs, factored_svd_batched(ups, downs, method=method)):
        exact = np.linalg.svd(up.double().numpy() @ down.double().numpy(), compute_uv=False)
        q = min(r, n, k)
        scale = max(float(exact[0]), 1e-30)
        assert got.S.shape == (q,)
        assert np.abs(got.S.double().numpy() - exact[:q]).max() <= 2e-6 * scale
        np.testing.assert_allclose(got.dense().double().numpy(), up.double().numpy() @ down.double().numpy(),
                                   rtol=0, atol=1e-5 * scale)


def test_batched_svd_float64_and_stacked_input():
    ups, downs = _group(4, 50, 6, 40, seed=3)
    up64, down64 = torch.stack(ups).double(), torch.stack(downs).double()
    results = factored_svd_batched(up64, down64, compute_dtype=torch.float64, method="cholesky")
    for up, down, got in zip(ups, downs, results):
        want = factored_svd(up, down, compute_dtype=torch.float64)
        assert got.S.dtype == torch.float64
        torch.testing.assert_close(got.S, want.S, rtol=0, atol=1e-12 * max(float(want.S[0]), 1e-30))


def test_batched_svd_keep_per_product_and_split():
    ups, downs = _group(3, 30, 8, 20, seed=4, kinds=("gauss",))
    batch = BatchedFactoredSVD(ups, downs)
    assert [res.U.shape[1] for res in batch.svds([1, 5, 8])] == [1, 5, 8]
    results = batch.svds()
    U, Vh = batch.expand(5)
    for mode in ("balanced", "up", "down"):
        up_b, down_b = split_factors_batched(U, batch.S, Vh, mode)
        for i in range(3):
            up_i, down_i = split_factors(results[i], 3, mode)
            torch.testing.assert_close(up_b[i, :, :3], up_i)
            torch.testing.assert_close(down_b[i, :3], down_i)


def test_batched_svd_sum_equals_per_sum():
    g = torch.Generator().manual_seed(7)
    term_lists = [[(0.7, torch.randn(40, 4, generator=g), torch.randn(4, 30, generator=g)),
                   (-0.3, torch.randn(40, 2, generator=g), torch.randn(2, 30, generator=g))] for _ in range(3)]
    for terms, got in zip(term_lists, factored_svd_sum_batched(term_lists, keep=3)):
        want = factored_svd_sum(terms)
        torch.testing.assert_close(got.S, want.S, rtol=0, atol=1e-5 * float(want.S[0]))
        torch.testing.assert_close(got.dense(3), want.dense(3), rtol=0, atol=1e-5 * float(want.S[0]))


def test_batched_svd_names_the_layer_with_nan():
    ups, downs = _group(3, 20, 4, 10, seed=5, kinds=("gauss",))
    ups[1][0, 0] = float("nan")
    for method in ("householder", "cholesky"):
        with pytest.raises(LorahubError, match="tensor 'b'.*NaN or Inf"):
            BatchedFactoredSVD(ups, downs, method=method, names=["a", "b", "c"])


def test_batched_svd_rejects_mixed_shapes():
    with pytest.raises(ValueError, match="one shape"):
        factored_svd_batched([torch.ones(4, 2), torch.ones(5, 2)], [torch.ones(2, 3)] * 2)


def test_plan_batches_groups_and_balances():
    keys = ["a", "b", "a", "a", "b", "a", "c"]
    nbytes = [10] * 7
    cpu = plan_batches(keys, nbytes, device="cpu", max_layers=3, workers=2)
    assert cpu == [[0, 2], [3, 5], [1], [4], [6]]
    assert plan_batches(keys, nbytes, device="cpu", max_layers=3, max_bytes=20) == [[0, 2], [3, 5], [1, 4], [6]]
    assert sorted(i for batch in plan_batches(keys, nbytes, workers=1) for i in batch) == list(range(7))


def test_stack_factors_reads_lazy_and_memory_tensors(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.arange(6.0).reshape(2, 3).bfloat16()}, str(path))
    stacked = stack_factors([LazyTensor(path=path, key="x"), torch.ones(3, 2, 1)], (2, 3))
    assert stacked.dtype == torch.float32 and stacked.shape == (2, 2, 3)
    assert torch.equal(stacked[0], torch.arange(6.0).reshape(2, 3)) and torch.equal(stacked[1], torch.ones(2, 3))


# --------------------------------------------------------------------------- resize, batched

def _mixed_adapter(dtype=torch.float32) -> Adapter:
    g = torch.Generator().manual_seed(11)
    layers = {}
    specs = [("linear", (48, 8), (8, 40))] * 5 + [("conv", (16, 8, 1, 1), (8, 4, 3, 3))] * 3 + \
        [("linear", (24, 6), (6, 24))] * 2 + [("linear", (10, 12), (12, 9))] * 2
    for i, (kind, up_shape, down_shape) in enumerate(specs):
        up = torch.randn(*up_shape, generator=g) * torch.exp(-torch.arange(up_shape[1]) / 2).reshape(
            1, -1, *([1] * (len(up_shape) - 2)))
        down = torch.randn(*down_shape, generator=g)
        if i == 3:
            up = torch.zeros_like(up)  # a zero layer inside a batch
        if i == 4:
            up[:, 4:] = up[:, :1]  # rank-deficient
        r = down_shape[0]
        layers[f"m{i}"] = LoraLayer(target=f"m{i}", kind=kind, A=LazyTensor.of(down.to(dtype)),
                                    B=LazyTensor.of(up.to(dtype)), alpha=float(r) * 2, rank=r)
    return Adapter(path=None, format="peft", layers=layers)


@pytest.mark.parametrize("options", [
    dict(rank=3), dict(rank=4, conv_rank=2, split="up"), dict(rank=8, method="sv_fro", param=0.9),
    dict(rank=6, method="sv_ratio", param=4.0, kohya_compat=True), dict(method="sv_cumulative", param=0.8)])
@pytest.mark.parametrize("workers", [None, 0])
def test_resize_batched_equals_per_layer(options, workers):
    adapter = _mixed_adapter()
    one, report_one = resize_adapter(adapter, batch_size=1, workers=workers, **options)
    for batch_size in (None, 2, 64):
        batched, report = resize_adapter(adapter, batch_size=batch_size, workers=workers, **options)
        assert [layer.target for layer in report.layers] == list(adapter.layers)
        assert list(batched.layers) == list(adapter.layers)
        for a, b in zip(report.layers, report_one.layers):
            assert (a.new_rank, a.kept, a.zero, a.new_alpha) == (b.new_rank, b.kept, b.zero, b.new_alpha)
            assert a.energy_retained == pytest.approx(b.energy_retained, abs=1e-6)
        for target, layer in one.layers.items():
            got = batched.layers[target]
            assert got.A.shape == layer.A.shape and got.B.shape == layer.B.shape
            torch.testing.assert_close(got.delta_weight(), layer.delta_weight(), rtol=0, atol=1e-5)


def test_resized_batches_save_and_keep_dtype(tmp_path):
    adapter = _mixed_adapter(torch.bfloat16)
    small, _ = resize_adapter(adapter, rank=3)
    assert all(layer.A.load().dtype == torch.bfloat16 for layer in small.layers.values())
    save_adapter(small, tmp_path / "out", format="peft")
    again = load_adapter(tmp_path / "out")
    for target, layer in small.layers.items():
        torch.testing.assert_close(again.layers[target].delta_weight(), layer.delta_weight(), rtol=0, atol=0)


def test_layer_spectra_batched_matches_per_layer():
    adapter = _mixed_adapter()
    spectra = layer_spectra(adapter)
    assert list(spectra) == list(adapter.layers)
    for target, layer in adapter.layers.items():
        up, down = layer.factors()
        torch.testing.assert_close(spectra[target], factored_svd(up, down).S * abs(layer.scale))


def test_resize_names_the_layer_with_nan():
    adapter = _mixed_adapter()
    adapter.layers["m6"].B = LazyTensor.of(torch.full(adapter.layers["m6"].B.shape, float("nan")))
    with pytest.raises(LorahubError, match="m6.*NaN or Inf"):
        resize_adapter(adapter, rank=2)


# ---------------------------------------------------------------------------------- NaN scan

def _adapter_from_file(tmp_path, tensors, name="scan.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return load_adapter(path)


def test_scan_finds_each_nonfinite_tensor_among_many(tmp_path):
    from lorahub.inspect import scan_nonfinite

    tensors = kohya_file(tmp_path / "a.safetensors", modules=300, dtype=torch.float16)
    bad_down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_17_attn1_to_q.lora_down.weight"
    bad_up = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_250_attn1_to_q.lora_up.weight"
    tensors[bad_down][0, 3] = float("nan")
    tensors[bad_up][5, 0] = float("inf")
    tensors[bad_up][6, 1] = float("-inf")
    # a NaN alpha sits between the scanned factors: it may trigger the bulk test, never a report
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_5_attn1_to_q.alpha"] = \
        torch.tensor(float("nan"), dtype=torch.float16)
    adapter = _adapter_from_file(tmp_path, tensors)
    assert scan_nonfinite(adapter) == [{"key": bad_down, "nan": 1, "inf": 0}, {"key": bad_up, "nan": 0, "inf": 2}]


def test_scan_of_mixed_dtypes_fp8_and_memory_tensors(tmp_path):
    from lorahub.inspect import scan_nonfinite

    adapter = _adapter_from_file(tmp_path, {
        "m.lora_down.weight": torch.ones(2, 8), "m.lora_up.weight": torch.ones(8, 2).bfloat16(),
        "n.lora_down.weight": torch.tensor([[1.0, float("nan")]]).to(torch.float8_e4m3fn),
        "n.lora_up.weight": torch.ones(3, 1, dtype=torch.float64)})
    assert scan_nonfinite(adapter) == [{"key": "n.lora_down.weight", "nan": 1, "inf": 0}]
    memory = Adapter(path=None, format="peft", layers={"x": LoraLayer(
        target="x", kind="linear", A=LazyTensor.of(torch.tensor([[float("inf"), 1.0]]), key="x.A"),
        B=LazyTensor.of(torch.ones(2, 1), key="x.B"), alpha=1.0, rank=1)})
    assert scan_nonfinite(memory) == [{"key": "x.A", "nan": 0, "inf": 1}]


def test_gc_paused_restores_the_collector():
    import gc

    assert gc.isenabled()
    with storage.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with storage.gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: left off
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------ CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_svd_on_cuda_uses_cholesky_and_matches_float64():
    ups, downs = _group(6, 4096, 64, 4096, seed=9)
    batch = BatchedFactoredSVD(ups, downs, device="cuda")
    assert batch.method == "cholesky" and batch.fallbacks >= 2  # the zero and repeated-column factors
    for up, down, got in zip(ups, downs, batch.svds(16)):
        exact = torch.linalg.svdvals(up.double() @ down.double())[:64]
        scale = max(float(exact[0]), 1e-30)
        assert got.S.device.type == "cuda"
        assert float((got.S.double().cpu() - exact).abs().max()) <= 2e-6 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resize_on_cuda_batched_equals_cpu_per_layer():
    adapter = _mixed_adapter()
    on_cpu, report_cpu = resize_adapter(adapter, rank=3, batch_size=1, device="cpu")
    on_gpu, report_gpu = resize_adapter(adapter, rank=3, device="cuda")
    assert [e.new_rank for e in report_gpu.layers] == [e.new_rank for e in report_cpu.layers]
    for target, layer in on_cpu.layers.items():
        assert on_gpu.layers[target].A.load().device.type == "cpu"
        torch.testing.assert_close(on_gpu.layers[target].delta_weight(), layer.delta_weight(), rtol=0, atol=1e-4)
