"""The CUDA path of `lorahub merge` / `unmerge` (skipped without CUDA; run on a GPU machine).

cuBLAS sums the r products of B·A in another order than MKL, so CUDA results are compared with PEFT
(on CPU) within the error bound of an fp32 r-term dot product measured at the operands' size
(|W| + |w·s|·|B|·|A|), and within one ulp of the output dtype at that size after rounding.

    python -m pytest tests/test_merge_gpu.py -q -s
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from fixtures_models import peft_merged_state_dict, reference_fused_unet_state_dict
from safetensors.torch import load_file, save_file

from lorahub.errors import LorahubError
from lorahub.formats import load_adapter
from lorahub.merge import UNDO_PREFIX, AdapterInput, merge, unmerge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(*specs):
    out = []
    for spec in specs:
        path, weight = (spec, 1.0) if not isinstance(spec, tuple) else spec
        out.append(AdapterInput(load_adapter(path), weight, str(path), True))
    return out


def files_state(path):
    state = {}
    for f in sorted(path.rglob("*.safetensors")):
        if not f.name.startswith(UNDO_PREFIX):
            state.update(load_file(str(f)))
    return state


def spacing(x):
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def ulps(got, ref, scale):
    mag = torch.maximum(ref.abs(), scale.to(ref.dtype).abs())
    return float(((got.double() - ref.double()).abs() / spacing(mag)).max()) if got.numel() else 0.0


def operand_scales(base_state, adapter_specs):
    """Per base tensor: |W| + Σ |wᵢ·sᵢ|·|Bᵢ|·|Aᵢ| (base layout), the size the rounding errors scale with."""
    scales = {k: v.double().abs() for k, v in base_state.items()}
    for path, weight in adapter_specs:
        adapter = load_adapter(path)
        for target, layer in adapter.layers.items():
            name = next((n for n in (f"{target}.weight", target.split(".", 1)[-1] + ".weight") if n in scales), None)
            if name is None:
                continue
            up, down = layer.factors(dtype=torch.float64)
            scales[name] = scales[name] + layer.to_base_layout(abs(weight * layer.scale) * (up.abs() @ down.abs())) \
                .reshape(scales[name].shape)
    return scales


def assert_close(got, reference, base, scales, bound):
    worst = 0.0
    for name, value in got.items():
        if name not in reference:
            continue
        err = ulps(value, reference[name], scales[name])
        worst = max(worst, err)
        assert err <= bound, f"{name}: {err} ulps"
        if torch.equal(reference[name], base[name]):
            assert torch.equal(value, base[name]), f"{name}: untouched but changed"
    return worst


@pytest.mark.parametrize("adapter_fixture", ["peft_lora_dir", "peft_rslora_dir", "peft_dora_dir", "peft_embed_dir"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_merge_matches_peft(request, tmp_path, tiny_llama_dir, tiny_llama_bf16_dir, adapter_fixture, dtype):
    base_dir = tiny_llama_bf16_dir if dtype == "bf16" else tiny_llama_dir
    adapter = request.getfixturevalue(adapter_fixture)
    result = merge(base_dir, inputs(adapter), tmp_path / "out", device="cuda")
    assert result.device.startswith("cuda")
    reference = peft_merged_state_dict(base_dir, adapter, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    base = files_state(base_dir)
    # fp32: r ≤ 12 products in another order; bf16: one output ulp at the operands' size
    bound = 14.0 if dtype == "fp32" else 1.0
    worst = assert_close(files_state(tmp_path / "out"), reference, base, operand_scales(base, [(adapter, 1.0)]), bound)
    print(f"cuda {dtype} {adapter_fixture}: worst {worst} ulps of the operands vs PEFT")


def test_cuda_gpt2_and_kohya_unet(tmp_path, tiny_gpt2_dir, peft_gpt2_dir, tiny_unet_dir, kohya_unet_file):
    merge(tiny_gpt2_dir, inputs(peft_gpt2_dir), tmp_path / "gpt2", device="cuda")
    reference = peft_merged_state_dict(tiny_gpt2_dir, peft_gpt2_dir, model_cls="gpt2")
    base = files_state(tiny_gpt2_dir)
    assert_close(files_state(tmp_path / "gpt2"), reference, base, operand_scales(base, [(peft_gpt2_dir, 1.0)]), 14.0)
    merge(tiny_unet_dir, inputs(kohya_unet_file), tmp_path / "unet", device="cuda:0")
    reference = reference_fused_unet_state_dict(tiny_unet_dir, kohya_unet_file)
    got = load_file(str(tmp_path / "unet" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, value in got.items():
        scale = base[name].abs() + (reference[name] - base[name]).abs() * 4  # conv ΔW: ~ its own size
        assert ulps(value, reference[name], scale) <= 14.0, name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_unmerge_roundtrip(tmp_path, tiny_llama_dir, tiny_llama_bf16_dir, peft_lora_dir, dtype):
    """One adapter: unmerge(merge(W)) is W within one ulp of max(|W|, |W'|)."""
    base_dir = tiny_llama_bf16_dir if dtype == "bf16" else tiny_llama_dir
    merge(base_dir, inputs((peft_lora_dir, 0.8)), tmp_path / "m", device="cuda")
    unmerge(tmp_path / "m", inputs((peft_lora_dir, 0.8)), tmp_path / "u", device="cuda")
    base, merged, restored = files_state(base_dir), files_state(tmp_path / "m"), files_state(tmp_path / "u")
    worst = max(ulps(restored[k], base[k], merged[k]) for k in base)
    print(f"cuda {dtype} unmerge(merge(W)), one adapter: worst {worst} ulps of max(|W|, |W'|)")
    assert worst <= 1.0


def test_cuda_unmerge_roundtrip_two_adapters_fp32(tmp_path, tiny_llama_dir, peft_lora_dir, peft_rslora_dir):
    """Two adapters add one at a time, so W + w₁ΔW₁ is an intermediate that can be larger than both W
    and W': the round trip is exact to float32 rounding of the operands (|W| + Σ|wᵢsᵢ||Bᵢ||Aᵢ|)."""
    specs = [(peft_lora_dir, 0.5), (peft_rslora_dir, -1.0)]
    merge(tiny_llama_dir, inputs(*specs), tmp_path / "m", device="cuda")
    unmerge(tmp_path / "m", inputs(*specs), tmp_path / "u", device="cuda")
    base, restored = files_state(tiny_llama_dir), files_state(tmp_path / "u")
    scales = operand_scales(base, specs)
    worst = max(ulps(restored[k], base[k], scales[k]) for k in base)
    print(f"cuda fp32 unmerge(merge(W)), two adapters: worst {worst} ulps of the operands")
    assert worst <= 2.0


def test_cuda_exact_unmerge_and_dora(tmp_path, tiny_llama_bf16_dir, peft_lora_dir, peft_dora_dir, peft_embed_dir):
    merge(tiny_llama_bf16_dir, inputs(peft_lora_dir, peft_dora_dir, peft_embed_dir), tmp_path / "m", device="cuda",
          save_originals=True)
    result = unmerge(tmp_path / "m", inputs(peft_lora_dir, peft_dora_dir, peft_embed_dir), tmp_path / "u",
                     device="cuda")
    assert result.exact
    base, restored = files_state(tiny_llama_bf16_dir), files_state(tmp_path / "u")
    assert all(torch.equal(base[k], restored[k]) for k in base)
    merge(tiny_llama_bf16_dir, inputs(peft_dora_dir), tmp_path / "d", device="cuda")
    unmerge(tmp_path / "d", inputs(peft_dora_dir), tmp_path / "du", device="cuda")
    merged, restored = files_state(tmp_path / "d"), files_state(tmp_path / "du")
    assert max(ulps(restored[k], base[k], merged[k]) for k in base) <= 3.0


def _synthetic(tmp_path, layers=12, hidden=1024, inter=2816, rank=16):
    """A Llama-named bf16 base in 3 shards + an r16 all-linear PEFT adapter (α = 2r)."""
    g = torch.Generator().manual_seed(0)
    names = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        names.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                      p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                      p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                      p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,)})
    names.update({"model.embed_tokens.weight": (1000, hidden), "model.norm.weight": (hidden,),
                  "lm_head.weight": (1000, hidden)})
    base = tmp_path / "base"
    base.mkdir()
    items = sorted(names.items())
    shards = [items[i::3] for i in range(3)]
    weight_map = {}
    for index, shard in enumerate(shards):
        fname = f"model-{index + 1:05d}-of-00003.safetensors"
        save_file({n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shard}, str(base / fname),
                  metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": 1000, "tie_word_embeddings": False}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    state = {}
    for name, shape in names.items():
        if name.endswith("proj.weight"):
            module = name[: -len(".weight")]
            state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, shape[1], generator=g) / 32
            state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], rank, generator=g) / 32
    save_file(state, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    return base, adapter


def test_cuda_pipeline_many_tensors_equals_cpu(tmp_path):
    """Many tensors in flight through the slots/streams: same result as the CPU engine (≤ 1 bf16 ulp)."""
    base, adapter = _synthetic(tmp_path)
    gpu = merge(base, inputs(adapter), tmp_path / "gpu", device="cuda")
    cpu = merge(base, inputs(adapter), tmp_path / "cpu", device="cpu")
    a, b, w = files_state(tmp_path / "gpu"), files_state(tmp_path / "cpu"), files_state(base)
    assert a.keys() == b.keys()
    differing = 0
    for name in a:
        assert ulps(a[name], b[name], w[name] + (b[name].float() - w[name].float()).abs()) <= 1.0, name
        differing += int((a[name] != b[name]).sum())
    print(f"cuda vs cpu: {differing} of {sum(v.numel() for v in a.values())} elements differ by ≤ 1 bf16 ulp; "
          f"gpu {gpu.seconds:.2f} s ({gpu.gb_per_s:.2f} GB/s, stages {gpu.busy}), "
          f"cpu {cpu.seconds:.2f} s ({cpu.gb_per_s:.2f} GB/s)")
    assert gpu.tensors_changed == cpu.tensors_changed == 12 * 7


def test_cuda_nonfinite_refused(tmp_path):
    base, adapter = _synthetic(tmp_path, layers=2, hidden=256, inter=512)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(LorahubError, match="not finite"):
        merge(base, inputs(adapter), tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()
