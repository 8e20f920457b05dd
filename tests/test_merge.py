"""`lorahub merge` / `lorahub unmerge`: against PEFT's and diffusers' own merges, layouts, atomicity."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures_models import peft_merged_state_dict, reference_fused_unet_state_dict
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lorahub.adapter import LazyTensor, LoraLayer
from lorahub.cli import cli
from lorahub.commands.merge import parse_adapter_arg
from lorahub.errors import CheckFailed, LorahubError, UnsupportedError
from lorahub.formats import load_adapter
from lorahub.merge import (
    METADATA_KEY,
    RECORD_FILE,
    UNDO_PREFIX,
    AdapterInput,
    Op,
    apply_ops,
    merge,
    unmerge,
)
from lorahub.output import MANIFEST
from lorahub.storage import build_header, read_header

# ---------------------------------------------------------------------------------------------
# helpers


def inputs(*specs) -> list[AdapterInput]:
    """AdapterInput for (path) or (path, weight)."""
    out = []
    for spec in specs:
        path, weight = (spec, None) if not isinstance(spec, tuple) else spec
        out.append(AdapterInput(load_adapter(path), 1.0 if weight is None else weight, str(path), weight is not None))
    return out


def spacing(x: torch.Tensor) -> torch.Tensor:
    """One ulp at |x|, in x's dtype, as float64."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def ulps(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |got − ref| in ulps of the dtype at max(|ref|, |scale|) (scale: e.g. the base weight, so
    that an element where W and ΔW nearly cancel is measured against its operands, not its tiny result)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    mag = ref.abs() if scale is None else torch.maximum(ref.abs(), scale.to(ref.dtype).abs())
    return float(((got.double() - ref.double()).abs() / spacing(mag)).max()) if got.numel() else 0.0


def files_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of every model safetensors file under a directory (lorahub sidecars excluded)."""
    state = {}
    for f in sorted(Path(path).rglob("*.safetensors")):
        if not f.name.startswith(UNDO_PREFIX):
            state.update(load_file(str(f)))
    return state


def compare_with_reference(out_dir, base_dir, reference, *, allow_ulps=0.0):
    """Every tensor equals the reference within `allow_ulps`; untouched tensors are bit-identical to the base."""
    got, base = files_state(out_dir), files_state(base_dir)
    assert set(got) == set(base)
    worst, changed = 0.0, 0
    for name, value in got.items():
        if name not in reference:  # tied weights (GPT-2 lm_head) are not in the file
            continue
        err = ulps(value, reference[name], base[name])
        worst = max(worst, err)
        assert err <= allow_ulps, f"{name}: {err} ulps from the reference"
        if not torch.equal(reference[name], base[name]):
            changed += 1
        else:
            assert torch.equal(value, base[name]), f"{name} untouched by the reference but changed"
    assert changed > 0
    return worst


# ---------------------------------------------------------------------------------------------
# equal to PEFT's merge_and_unload / diffusers' fuse_lora


@pytest.mark.parametrize("adapter_fixture", ["peft_lora_dir", "peft_rslora_dir", "peft_dora_dir", "peft_embed_dir"])
def test_merge_equals_peft_fp32(request, tmp_path, tiny_llama_dir, adapter_fixture):
    adapter = request.getfixturevalue(adapter_fixture)
    result = merge(tiny_llama_dir, inputs(adapter), tmp_path / "out", device="cpu")
    reference = peft_merged_state_dict(tiny_llama_dir, adapter)
    # same order of fp32 operations as PEFT ((B@A)*s, then add): bit-identical, not just within one ulp
    assert compare_with_reference(tmp_path / "out", tiny_llama_dir, reference, allow_ulps=0) == 0
    assert result.tensors_changed > 0


class _Narrow(torch.nn.Module):
    """Layers narrower than 16 in one dimension or both, beside a wide one: CPU BLASes take other kernels
    for such small products, which accumulate onto W and round differently from PEFT's (B @ A) * s + W."""

    def __init__(self) -> None:
        super().__init__()
        self.thin_in = torch.nn.Linear(4, 32, bias=False)
        self.thin_out = torch.nn.Linear(64, 8, bias=False)
        self.tiny = torch.nn.Linear(8, 8, bias=False)
        self.single = torch.nn.Linear(24, 1, bias=False)
        self.wide = torch.nn.Linear(48, 64, bias=False)


@pytest.mark.parametrize("alpha", [4, 3])  # s = alpha / r: a power of two (the fused path's case) and not
def test_merge_equals_peft_on_narrow_layers(tmp_path, alpha):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(5)
    model = _Narrow()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=alpha, target_modules=[
        "thin_in", "thin_out", "tiny", "single", "wide"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    fresh = _Narrow()
    fresh.load_state_dict(load_file(str(tmp_path / "base.safetensors")))
    reference = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    merged = {k: v.detach() for k, v in reference.merge_and_unload().state_dict().items()}
    merge(tmp_path / "base.safetensors", inputs(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "base.safetensors"))
    base = load_file(str(tmp_path / "base.safetensors"))
    assert set(got) == set(merged)
    for name, value in got.items():
        assert not torch.equal(value, base[name]), name
        assert torch.equal(value, merged[name]), (name, float((value - merged[name]).abs().max()))


@pytest.mark.parametrize("adapter_fixture", ["peft_lora_dir", "peft_rslora_dir", "peft_dora_dir"])
def test_merge_equals_peft_bf16(request, tmp_path, tiny_llama_bf16_dir, adapter_fixture):
    adapter = request.getfixturevalue(adapter_fixture)
    merge(tiny_llama_bf16_dir, inputs(adapter), tmp_path / "out", device="cpu")
    reference = peft_merged_state_dict(tiny_llama_bf16_dir, adapter, dtype=torch.bfloat16)
    assert compare_with_reference(tmp_path / "out", tiny_llama_bf16_dir, reference, allow_ulps=0) == 0


def test_merge_embedding_bf16_single_rounding(tmp_path, tiny_llama_bf16_dir, peft_embed_dir):
    """PEFT keeps embedding LoRA factors in bf16 and rounds ΔW to bf16 before adding (two roundings);
    lorahub rounds once. They agree within one bf16 ulp of the operands, and lorahub's value is the
    correctly rounded fp32 sum."""
    merge(tiny_llama_bf16_dir, inputs(peft_embed_dir), tmp_path / "out", device="cpu")
    reference = peft_merged_state_dict(tiny_llama_bf16_dir, peft_embed_dir, dtype=torch.bfloat16)
    worst = compare_with_reference(tmp_path / "out", tiny_llama_bf16_dir, reference, allow_ulps=1.0)
    assert worst <= 1.0
    got = files_state(tmp_path / "out")["model.embed_tokens.weight"]
    base = files_state(tiny_llama_bf16_dir)["model.embed_tokens.weight"]
    layer = load_adapter(peft_embed_dir).layers["model.embed_tokens"]
    exact = (base.double() + layer.delta_weight(dtype=torch.float64)).to(torch.bfloat16)
    assert ulps(got, exact, base) <= 0.5 + 1e-9  # fp32 ΔW vs fp64: at most a tie away


def test_merge_equals_peft_gpt2_conv1d(tmp_path, tiny_gpt2_dir, peft_gpt2_dir):
    merge(tiny_gpt2_dir, inputs(peft_gpt2_dir), tmp_path / "out", device="cpu")
    reference = peft_merged_state_dict(tiny_gpt2_dir, peft_gpt2_dir, model_cls="gpt2")
    assert compare_with_reference(tmp_path / "out", tiny_gpt2_dir, reference, allow_ulps=0) == 0


def test_merge_equals_diffusers_fuse_lora_kohya_unet(tmp_path, tiny_unet_dir, kohya_unet_file):
    result = merge(tiny_unet_dir, inputs(kohya_unet_file), tmp_path / "out", device="cpu")
    reference = reference_fused_unet_state_dict(tiny_unet_dir, kohya_unet_file)
    got = load_file(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    convs = 0
    for name, value in got.items():
        assert ulps(value, reference[name], base[name]) <= 1.0, name
        if torch.equal(reference[name], base[name]):
            assert torch.equal(value, base[name]), name
        elif value.dim() == 4 and value.shape[-1] == 3:
            convs += 1
    assert convs > 0  # 3×3 conv layers were merged (alpha 2 ≠ rank 4)
    assert (tmp_path / "out" / "model_index.json").read_bytes() == (tiny_unet_dir / "model_index.json").read_bytes()
    assert (tmp_path / "out" / "unet" / "config.json").read_bytes() == \
        (tiny_unet_dir / "unet" / "config.json").read_bytes()
    assert result.adapters[0]["format"] == "kohya"


# ---------------------------------------------------------------------------------------------
# the math on its own (no files): random shapes and kinds against float64


def _layer(kind, n, k, r, *, alpha, rslora=False, fifo=False, kernel=(1, 1), seed=0, dora=False):
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        A = torch.randn((r, k, *kernel), generator=g) * 0.2
        B = torch.randn((n, r, 1, 1), generator=g) * 0.2
    elif kind == "embedding":
        A = torch.randn((r, k), generator=g) * 0.2  # (r, num)
        B = torch.randn((n, r), generator=g) * 0.2  # (dim, r)
    else:
        A = torch.randn((r, k), generator=g) * 0.2
        B = torch.randn((n, r), generator=g) * 0.2
    magnitude = LazyTensor.of(torch.rand(n, generator=g) + 0.5) if dora else None
    return LoraLayer("m", kind, LazyTensor.of(A), LazyTensor.of(B), alpha=alpha, rank=r, use_rslora=rslora,
                     fan_in_fan_out=fifo, magnitude=magnitude)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["linear", "fifo", "conv1x1", "conv3x3", "embedding"]),
       n=st.integers(1, 24), k=st.integers(1, 24), r=st.integers(1, 6),
       alpha=st.sampled_from([1.0, 3.0, 8.0, 16.0]), rslora=st.booleans(),
       weight=st.sampled_from([1.0, 0.5, -1.0, 0.3]), seed=st.integers(0, 1000))
def test_apply_ops_against_float64(kind, n, k, r, alpha, rslora, weight, seed):
    kernel = (3, 3) if kind == "conv3x3" else (1, 1)
    layer = _layer("conv" if kind.startswith("conv") else ("linear" if kind == "fifo" else kind), n, k, r,
                   alpha=alpha, rslora=rslora, fifo=kind == "fifo", kernel=kernel, seed=seed)
    shape = layer.base_shape
    base = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    merged, _ = apply_ops(base.clone(), [Op("add", weight, layer=layer)])
    exact = base.double() + weight * layer.delta_weight(dtype=torch.float64)
    assert merged.shape == base.shape
    # error bound of an fp32 r-term dot product plus one rounding: (r + 2) ulps of the operands' size
    up, down = layer.factors(dtype=torch.float64)
    operands = base.abs().double() + layer.to_base_layout(abs(weight * layer.scale) * (up.abs() @ down.abs()))
    assert ulps(merged, exact.float(), operands.float()) <= r + 2
    restored, _ = apply_ops(merged.clone(), [Op("add", -weight, layer=layer)])
    assert ulps(restored, base, operands.float()) <= 2 * (r + 2)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["linear", "fifo", "conv3x3", "embedding"]), n=st.integers(1, 16),
       k=st.integers(2, 16), r=st.integers(1, 4), weight=st.sampled_from([1.0, 0.5]), seed=st.integers(0, 1000))
def test_dora_merge_and_recorded_unmerge(kind, n, k, r, weight, seed):
    kernel = (3, 3) if kind == "conv3x3" else (1, 1)
    layer = _layer("conv" if kind.startswith("conv") else ("linear" if kind == "fifo" else kind), n, k, r,
                   alpha=2.0 * r, fifo=kind == "fifo", kernel=kernel, seed=seed, dora=True)
    base = torch.randn(layer.base_shape, generator=torch.Generator().manual_seed(seed + 7)) + 0.1
    merged, norms = apply_ops(base.clone(), [Op("dora", weight, layer=layer, norm_key="k")])
    # reference, in float64 and in the (n, k) orientation the magnitude refers to
    delta = weight * layer.delta_math(dtype=torch.float64)
    w0 = layer.to_base_layout(delta * 0).double() + base.double()
    view = lambda t: t.reshape(n, -1) if kind.startswith("conv") else (t.T if kind in ("fifo", "embedding") else t)
    summed = view(w0) + delta.reshape(n, -1)
    m = layer.magnitude.load().double()
    expected = summed * (m / summed.norm(dim=1)).unsqueeze(1)
    assert torch.allclose(view(merged).double().reshape(n, -1), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(norms["k"].double(), summed.norm(dim=1), rtol=1e-5)
    restored, _ = apply_ops(merged.clone(), [Op("undora", weight, layer=layer, norm=norms["k"])])
    assert torch.allclose(restored, base, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# several adapters, weights, layouts


def test_several_adapters_with_weights(tmp_path, tiny_llama_dir, peft_lora_dir, peft_rslora_dir):
    result = merge(tiny_llama_dir, inputs((peft_lora_dir, 0.5), (peft_rslora_dir, -1.25)), tmp_path / "out",
                   device="cpu")
    got, base = files_state(tmp_path / "out"), files_state(tiny_llama_dir)
    lora, rslora = load_adapter(peft_lora_dir), load_adapter(peft_rslora_dir)
    expected = {k: v.double() for k, v in base.items()}
    operands = {k: v.double().abs() for k, v in base.items()}  # |W| + Σ|wᵢ·sᵢ|·|Bᵢ|·|Aᵢ|: the error scale
    for adapter, weight in ((lora, 0.5), (rslora, -1.25)):
        for target, layer in adapter.layers.items():
            expected[target + ".weight"] += weight * layer.delta_weight(dtype=torch.float64)
            up, down = layer.factors(dtype=torch.float64)
            operands[target + ".weight"] += layer.to_base_layout(abs(weight * layer.scale) * (up.abs() @ down.abs()))
    for name in base:  # fp32 products of ≤ 12 terms, two adds, one rounding
        assert ulps(got[name], expected[name].float(), operands[name].float()) <= 8.0, name
    assert [a["weight"] for a in result.adapters] == [0.5, -1.25]


def test_layout_metadata_and_record(tmp_path, tiny_llama_dir, tiny_llama_sharded_dir, peft_dora_dir):
    """Same shard files and index; untouched shards byte-identical; tensor order, dtypes, offsets kept;
    the record is in each rewritten file's metadata and in lorahub_merge.json."""
    out = tmp_path / "out"
    result = merge(tiny_llama_sharded_dir, inputs((peft_dora_dir, 0.75)), out, device="cpu")
    base_files = sorted(p.name for p in tiny_llama_sharded_dir.iterdir())
    out_files = sorted(p.name for p in out.iterdir())
    assert set(out_files) - set(base_files) == {RECORD_FILE, f"{UNDO_PREFIX}0.safetensors", MANIFEST}
    assert set(base_files) <= set(out_files)
    for name in base_files:  # config, generation config, tokenizer files and the index: copied as they are
        if not name.endswith(".safetensors"):
            assert (out / name).read_bytes() == (tiny_llama_sharded_dir / name).read_bytes(), name
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(base_files)
    assert (out / "model.safetensors.index.json").read_bytes() == \
        (tiny_llama_sharded_dir / "model.safetensors.index.json").read_bytes()
    assert result.files_copied >= 1 and result.files_rewritten >= 1
    record = json.loads((out / RECORD_FILE).read_text())
    entry = record["merges"][-1]
    assert entry["adapters"][0]["weight"] == 0.75 and len(entry["adapters"][0]["sha256"]) == 64
    assert entry["adapters"][0]["dora"] is True
    for shard in sorted(tiny_llama_sharded_dir.glob("*.safetensors")):
        src, dst = read_header(shard), read_header(out / shard.name)
        assert list(src.tensors) == list(dst.tensors)
        for name, info in src.tensors.items():
            assert (dst.tensors[name].dtype, dst.tensors[name].shape, dst.tensors[name].begin,
                    dst.tensors[name].end) == (info.dtype, info.shape, info.begin, info.end)
        touched = [n for n in src.tensors if "q_proj" in n or "v_proj" in n]
        raw_src, raw_dst = shard.read_bytes(), (out / shard.name).read_bytes()
        if not touched:
            assert raw_src == raw_dst  # copied whole
            continue
        meta = json.loads(dst.metadata[METADATA_KEY])
        assert meta["merges"][0]["adapters"][0]["sha256"] == entry["adapters"][0]["sha256"]
        assert {k: v for k, v in dst.metadata.items() if k != METADATA_KEY} == src.metadata
        for name in src.tensors:  # untouched tensors: the same bytes at shifted absolute offsets
            if name not in touched:
                a, b = src.absolute_range(name), dst.absolute_range(name)
                assert raw_src[a[0]:a[1]] == raw_dst[b[0]:b[1]], name
    single = tmp_path / "single"  # the same weights unsharded: the same values
    merge(tiny_llama_dir, inputs((peft_dora_dir, 0.75)), single, device="cpu")
    a, b = files_state(out), files_state(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_base(tmp_path, tiny_llama_dir, peft_lora_dir):
    out = tmp_path / "out"
    merge(tiny_llama_dir / "model.safetensors", inputs(peft_lora_dir), out, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, RECORD_FILE, "model.safetensors"]
    reference = peft_merged_state_dict(tiny_llama_dir, peft_lora_dir)
    compare_with_reference(out, tiny_llama_dir, reference, allow_ulps=0)


def test_dtype_option_rewrites_layout(tmp_path, tiny_llama_sharded_dir, peft_lora_dir):
    out = tmp_path / "out"
    merge(tiny_llama_sharded_dir, inputs(peft_lora_dir), out, dtype="bf16", device="cpu")
    fp32 = tmp_path / "fp32"
    merge(tiny_llama_sharded_dir, inputs(peft_lora_dir), fp32, device="cpu")
    got, full = files_state(out), files_state(fp32)
    for name, value in got.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, full[name].to(torch.bfloat16)), name  # one rounding from fp32
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in got.values())
    assert index["weight_map"] == json.loads((tiny_llama_sharded_dir / "model.safetensors.index.json")
                                             .read_text())["weight_map"]


def test_validation_refuses_mismatch(tmp_path, tiny_llama_dir, peft_wide_dir):
    with pytest.raises(CheckFailed) as info:
        merge(tiny_llama_dir, inputs(peft_wide_dir), tmp_path / "out", device="cpu")
    assert not info.value.report.ok and info.value.report.problems
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, ["merge", "--base", str(tiny_llama_dir), str(peft_wide_dir),
                                      "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["exit_code"] == 1 and payload["validation"]["problems"]
    assert not (tmp_path / "out").exists()


def test_nonfinite_merge_is_refused(tmp_path, tiny_llama_dir, peft_lora_dir):
    broken = tmp_path / "broken"
    shutil.copytree(peft_lora_dir, broken)
    state = load_file(str(broken / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key][0, 0] = float("inf")
    save_file(state, str(broken / "adapter_model.safetensors"))
    with pytest.raises(LorahubError, match="not finite"):
        merge(tiny_llama_dir, inputs(broken), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.lorahub-tmp") for p in tmp_path.iterdir())


def test_out_checks(tmp_path, tiny_llama_dir, peft_lora_dir):
    """lorahub.output's policy through the library call (tests/test_output_policy.py has every rule)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(LorahubError, match="did not write"):
        merge(tiny_llama_dir, inputs(peft_lora_dir), out, device="cpu")
    # --overwrite never deletes a file lorahub did not write (this used to replace the directory)
    with pytest.raises(LorahubError, match="did not write.*keep.txt"):
        merge(tiny_llama_dir, inputs(peft_lora_dir), out, device="cpu", overwrite=True)
    assert (out / "keep.txt").read_text() == "previous"
    (out / "keep.txt").unlink()
    with pytest.raises(LorahubError, match="empty directory.*--overwrite"):
        merge(tiny_llama_dir, inputs(peft_lora_dir), out, device="cpu")
    merge(tiny_llama_dir, inputs(peft_lora_dir), out, device="cpu", overwrite=True)  # an empty directory
    with pytest.raises(LorahubError, match="--overwrite"):
        merge(tiny_llama_dir, inputs(peft_lora_dir), out, device="cpu")
    merge(tiny_llama_dir, inputs(peft_lora_dir), out, device="cpu", overwrite=True)  # lorahub's own output
    assert (out / "model.safetensors").exists()
    with pytest.raises(LorahubError, match="--out is the base"):
        merge(tiny_llama_dir, inputs(peft_lora_dir), tiny_llama_dir, device="cpu", overwrite=True)
    with pytest.raises(LorahubError, match="lies inside the base"):
        merge(tiny_llama_dir, inputs(peft_lora_dir), tiny_llama_dir / "sub", device="cpu")


def test_parse_adapter_arg():
    assert parse_adapter_arg("a/b") == ("a/b", None)
    assert parse_adapter_arg("a/b:0.5") == ("a/b", 0.5)
    assert parse_adapter_arg("./x.safetensors:-1") == ("./x.safetensors", -1.0)
    assert parse_adapter_arg("hf://org/repo") == ("hf://org/repo", None)
    assert parse_adapter_arg("hf://org/repo:1e-1") == ("hf://org/repo", 0.1)
    assert parse_adapter_arg("hf://org/repo@v1/file.safetensors:2") == ("hf://org/repo@v1/file.safetensors", 2.0)
    assert parse_adapter_arg("C:\\loras\\x") == ("C:\\loras\\x", None)
    assert parse_adapter_arg("weird:name") == ("weird:name", None)
    with pytest.raises(LorahubError):
        parse_adapter_arg("x:nan")


def test_build_header_padding():
    raw = build_header([("a", "F32", (2,), 0, 8)], {"k": "v"})
    (length,) = __import__("struct").unpack("<Q", raw[:8])
    assert length % 8 == 0 and len(raw) == 8 + length
    assert json.loads(raw[8:])["a"]["data_offsets"] == [0, 8]


# ---------------------------------------------------------------------------------------------
# unmerge


@pytest.mark.parametrize("adapter_fixture", ["peft_lora_dir", "peft_rslora_dir", "peft_embed_dir"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_unmerge_roundtrip_within_one_ulp(request, tmp_path, tiny_llama_dir, tiny_llama_bf16_dir,
                                          adapter_fixture, dtype):
    """unmerge(merge(W)) is W within one ulp of max(|W|, |W'|) per element; the error is measured."""
    base = tiny_llama_bf16_dir if dtype == "bf16" else tiny_llama_dir
    adapter = request.getfixturevalue(adapter_fixture)
    merge(base, inputs((adapter, 0.8)), tmp_path / "merged", device="cpu")
    result = unmerge(tmp_path / "merged", inputs(adapter), tmp_path / "restored", device="cpu")
    assert result.adapters[0]["weight"] == 0.8  # taken from the record
    assert not result.exact
    original, merged, restored = (files_state(base), files_state(tmp_path / "merged"),
                                  files_state(tmp_path / "restored"))
    worst, max_abs, changed = 0.0, 0.0, 0
    for name, value in original.items():
        worst = max(worst, ulps(restored[name], value, merged[name]))
        max_abs = max(max_abs, float((restored[name].double() - value.double()).abs().max()))
        changed += int(not torch.equal(restored[name], value))
    print(f"{dtype} {adapter_fixture}: worst {worst} ulp of max(|W|,|W'|), max |error| {max_abs:.3g}, "
          f"{changed} tensors not bit-identical")
    assert worst <= 1.0
    # the merge record was popped: the restored model carries none
    assert not (tmp_path / "restored" / RECORD_FILE).exists()
    assert all(METADATA_KEY not in read_header(f).metadata for f in (tmp_path / "restored").glob("*.safetensors"))


def test_unmerge_dora_needs_the_record(tmp_path, tiny_llama_bf16_dir, peft_dora_dir):
    merged = tmp_path / "merged"
    merge(tiny_llama_bf16_dir, inputs(peft_dora_dir), merged, device="cpu")
    result = unmerge(merged, inputs(peft_dora_dir), tmp_path / "restored", device="cpu")
    original, after = files_state(tiny_llama_bf16_dir), files_state(merged)
    restored = files_state(tmp_path / "restored")
    # W = W'·‖W₀+ΔW‖/m − ΔW: the recorded norm undoes the rescale; the division adds at most an ulp
    worst = max(ulps(restored[k], original[k], after[k]) for k in original)
    print(f"bf16 DoRA unmerge from recorded norms: worst {worst} ulp of max(|W|,|W'|)")
    assert worst <= 3.0 and not result.exact
    # without the record (or with another weight) the merged weights alone cannot be unmerged
    with pytest.raises(UnsupportedError, match="DoRA cannot be unmerged"):
        unmerge(merged, inputs((peft_dora_dir, 0.5)), tmp_path / "x", device="cpu")
    bare = tmp_path / "bare"
    shutil.copytree(merged, bare)
    (bare / RECORD_FILE).unlink()
    with pytest.raises(UnsupportedError, match="DoRA cannot be unmerged from the merged weights alone"):
        unmerge(bare, inputs(peft_dora_dir), tmp_path / "y", device="cpu")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_unmerge_order_does_not_matter_for_stacked_dora(tmp_path, tiny_llama_dir, peft_lora_dir, peft_dora_dir):
    """LoRA then DoRA on the same q/v tensors: the DoRA rescale covers the LoRA delta, so the undo must
    run in the recorded (reverse) order whatever order the command line gives."""
    merged = tmp_path / "merged"
    merge(tiny_llama_dir, inputs(peft_lora_dir, (peft_dora_dir, 0.5)), merged, device="cpu")
    unmerge(merged, inputs((peft_dora_dir, 0.5), peft_lora_dir), tmp_path / "reversed", device="cpu")
    unmerge(merged, inputs(peft_lora_dir, (peft_dora_dir, 0.5)), tmp_path / "same", device="cpu")
    original, after = files_state(tiny_llama_dir), files_state(merged)
    reversed_, same = files_state(tmp_path / "reversed"), files_state(tmp_path / "same")
    assert all(torch.equal(reversed_[k], same[k]) for k in original)
    # error measured at the size of the operands: |W|, |W'| and the deltas (ΔW ≫ W in these fixtures)
    lora, dora = load_adapter(peft_lora_dir), load_adapter(peft_dora_dir)
    worst = 0.0
    for name in original:
        scale = original[name].abs() + after[name].abs()
        target = name[: -len(".weight")]
        if target in lora.layers:
            scale = scale + lora.layers[target].delta_weight().abs()
        if target in dora.layers:
            scale = scale + 0.5 * dora.layers[target].delta_weight().abs()
        worst = max(worst, ulps(same[name], original[name], scale))
    assert worst <= 2.0, worst


def test_fits_dtype():
    from lorahub.merge import fits_dtype

    ok = torch.randn(64, 64)
    assert fits_dtype(ok, torch.bfloat16) and fits_dtype(ok, torch.float16)
    big = ok.clone()
    big[3, 3] = 70000.0  # finite in fp32 and bf16, inf in fp16
    assert fits_dtype(big, torch.bfloat16) and not fits_dtype(big, torch.float16)
    many = torch.full((1000, 1000), 100.0)  # ‖·‖ = 1e5 > fp16 max, yet every element fits: exact check
    assert fits_dtype(many, torch.float16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = ok.clone()
        broken[0, 1] = bad
        assert not fits_dtype(broken, torch.float32)


def test_unmerge_exact_with_saved_originals(tmp_path, tiny_llama_bf16_dir, peft_lora_dir, peft_dora_dir,
                                            peft_embed_dir):
    merged = tmp_path / "merged"
    merge(tiny_llama_bf16_dir, inputs((peft_lora_dir, 0.5), peft_dora_dir, (peft_embed_dir, -1.0)), merged,
          device="cpu", save_originals=True)
    result = unmerge(merged, inputs(peft_embed_dir, peft_dora_dir, (peft_lora_dir, 0.5)), tmp_path / "restored",
                     device="cpu", exact=True)
    assert result.exact
    original, restored = files_state(tiny_llama_bf16_dir), files_state(tmp_path / "restored")
    assert all(torch.equal(restored[k], original[k]) for k in original)
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == \
        sorted([MANIFEST, *(p.name for p in tiny_llama_bf16_dir.iterdir())])
    with pytest.raises(LorahubError, match="exact unmerge needs"):
        unmerge(merged, inputs(peft_lora_dir), tmp_path / "z", device="cpu", exact=True)


def test_stacked_merges_unmerge_last(tmp_path, tiny_llama_dir, peft_lora_dir, peft_rslora_dir):
    merge(tiny_llama_dir, inputs(peft_lora_dir), tmp_path / "one", device="cpu")
    merge(tmp_path / "one", inputs((peft_rslora_dir, 2.0)), tmp_path / "two", device="cpu")
    record = json.loads((tmp_path / "two" / RECORD_FILE).read_text())
    assert [len(e["adapters"]) for e in record["merges"]] == [1, 1]
    unmerge(tmp_path / "two", inputs(peft_rslora_dir), tmp_path / "back", device="cpu")
    record = json.loads((tmp_path / "back" / RECORD_FILE).read_text())
    assert [e["adapters"][0]["weight"] for e in record["merges"]] == [1.0]
    one, back = files_state(tmp_path / "one"), files_state(tmp_path / "back")
    assert max(ulps(back[k], one[k], files_state(tmp_path / "two")[k]) for k in one) <= 1.0


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_merge_unmerge_json(tmp_path, tiny_llama_bf16_dir, peft_lora_dir):
    runner = CliRunner()
    merged = tmp_path / "merged"
    result = runner.invoke(cli, ["merge", "--base", str(tiny_llama_bf16_dir), f"{peft_lora_dir}:0.5",
                                 "--out", str(merged), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["ok"] and payload["tensors_changed"] == 14 and payload["bytes_written"] > 0
    result = runner.invoke(cli, ["unmerge", "--base", str(merged), str(peft_lora_dir), "--out",
                                 str(tmp_path / "restored"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "unmerged" in result.output and "GB/s" in result.output
    result = runner.invoke(cli, ["merge", "--base", str(tiny_llama_bf16_dir), str(peft_lora_dir), "--out",
                                 str(merged), "--device", "cpu"])
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = runner.invoke(cli, ["merge", "--base", str(tiny_llama_bf16_dir), "--out", str(merged)])
    assert result.exit_code == 2  # usage: no adapter
    result = runner.invoke(cli, ["merge", "--help"])
    assert result.exit_code == 0 and "Examples" in result.output


def test_cli_device_errors(tmp_path, tiny_llama_dir, peft_lora_dir):
    result = CliRunner().invoke(cli, ["merge", "--base", str(tiny_llama_dir), str(peft_lora_dir), "--out",
                                      str(tmp_path / "o"), "--device", "tpu"])
    assert result.exit_code == 2 and "device" in result.output  # not a device: a usage error
    if not torch.cuda.is_available():
        result = CliRunner().invoke(cli, ["merge", "--base", str(tiny_llama_dir), str(peft_lora_dir), "--out",
                                          str(tmp_path / "o"), "--device", "cuda"])
        assert result.exit_code == 1 and "CUDA is not available" in result.output


# ---------------------------------------------------------------------------------------------
# kill -9 in the middle of a merge


def _start_merge(base, adapter, out, *extra):
    env = dict(os.environ, LORAHUB_MERGE_THROTTLE_S="0.25", LORAHUB_NO_PROGRESS="1")
    return subprocess.Popen([sys.executable, "-m", "lorahub.cli", "merge", "--base", str(base), str(adapter),
                             "--out", str(out), "--device", "cpu", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_mid_merge(proc, out: Path) -> None:
    deadline = time.monotonic() + 60
    tmp = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.lorahub-tmp-")]
        if found and any(found[0].rglob("*.safetensors")):
            tmp = found[0]
            break
        time.sleep(0.05)
    assert tmp is not None, f"merge never started writing: {proc.communicate()}"
    time.sleep(0.6)  # a few throttled items in: some shards written, others not
    assert proc.poll() is None, "merge finished before the kill; raise the throttle"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_leaves_no_half_written_output(tmp_path, tiny_llama_sharded_dir, peft_lora_dir):
    out = tmp_path / "out"
    proc = _start_merge(tiny_llama_sharded_dir, peft_lora_dir, out)
    _kill_mid_merge(proc, out)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # the same merge, run to completion afterwards, is unaffected by the leftover temporary
    merge(tiny_llama_sharded_dir, inputs(peft_lora_dir), out, device="cpu")
    assert (out / "model.safetensors.index.json").exists()


def test_kill_9_keeps_previous_output(tmp_path, tiny_llama_sharded_dir, peft_lora_dir):
    out = tmp_path / "out"
    merge(tiny_llama_sharded_dir, inputs((peft_lora_dir, 0.5)), out, device="cpu")  # the previous output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _start_merge(tiny_llama_sharded_dir, peft_lora_dir, out, "--overwrite")
    _kill_mid_merge(proc, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_merge_into_sd_single_file_checkpoint(tmp_path, tiny_unet_dir, kohya_unet_file):
    """A kohya LoRA (diffusers module names) merged into a Stable Diffusion single-file checkpoint
    (original LDM keys `model.diffusion_model.input_blocks…`) equals diffusers' own fuse_lora.

    The checkpoint is checked with diffusers' own `convert_ldm_unet_checkpoint` (it must map back to
    the saved UNet exactly), and the merged file is read back through the same converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lorahub.names import diffusers_to_ldm_unet

    unet = UNet2DConditionModel.from_pretrained(str(tiny_unet_dir), subfolder="unet")
    config = dict(unet.config)
    up_attn = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    state = unet.state_dict()
    checkpoint = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        checkpoint[f"model.diffusion_model.{diffusers_to_ldm_unet(module, config['layers_per_block'], up_attn)}"
                   f".{param}"] = value.contiguous()
    back = convert_ldm_unet_checkpoint(dict(checkpoint), config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    single = tmp_path / "sd_tiny.safetensors"
    save_file(checkpoint, str(single))

    result = CliRunner().invoke(cli, ["merge", "--base", str(single), str(kohya_unet_file), "--out",
                                      str(tmp_path / "merged"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    merged_file = tmp_path / "merged" / "sd_tiny.safetensors"
    merged = convert_ldm_unet_checkpoint(load_file(str(merged_file)), config)
    expected = reference_fused_unet_state_dict(tiny_unet_dir, kohya_unet_file)
    changed = [k for k in state if not torch.equal(expected[k], state[k])]
    assert len(changed) >= 40
    for key in state:
        torch.testing.assert_close(merged[key], expected[key], rtol=2e-7, atol=1e-8)
