"""The CUDA path of merging LyCORIS layers (skipped without CUDA; run on a GPU machine).

The CPU merge is checked against LyCORIS's own forward pass in tests/test_lycoris.py; here a CUDA
merge of every algorithm (LoHa, Tucker LoHa, LoKr, Tucker LoKr, full, DoRA both axes) must equal the
CPU merge within fp32 rounding (cuBLAS sums in another order), and unmerge on CUDA must restore the
base. The files are written here with LyCORIS's key layout, so the test needs neither diffusers nor
lycoris-lora (GPU machines may lack them).

    python -m pytest tests/test_lycoris_gpu.py -q
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorahub.formats import load_adapter
from lorahub.merge import AdapterInput, merge, unmerge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _files(tmp_path):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    base = {"lin.weight": rnd(48, 32, std=1), "lin.bias": rnd(48, std=1), "sq.weight": rnd(32, 32, std=1),
            "conv.weight": rnd(24, 16, 3, 3, std=1), "conv.bias": rnd(24, std=1), "pw.weight": rnd(16, 24, 1, 1, std=1)}
    save_file(base, str(tmp_path / "base.safetensors"))
    loha = {"lora_lin.hada_w1_a": rnd(48, 4), "lora_lin.hada_w1_b": rnd(4, 32), "lora_lin.hada_w2_a": rnd(48, 4),
            "lora_lin.hada_w2_b": rnd(4, 32), "lora_lin.alpha": torch.tensor(3.0),
            "lora_conv.hada_w1_a": rnd(4, 24), "lora_conv.hada_w1_b": rnd(4, 16), "lora_conv.hada_t1": rnd(4, 4, 3, 3),
            "lora_conv.hada_w2_a": rnd(4, 24), "lora_conv.hada_w2_b": rnd(4, 16), "lora_conv.hada_t2": rnd(4, 4, 3, 3),
            "lora_conv.alpha": torch.tensor(2.0),
            "lora_sq.lokr_w1": rnd(4, 4), "lora_sq.lokr_w2_a": rnd(8, 2), "lora_sq.lokr_w2_b": rnd(2, 8),
            "lora_sq.alpha": torch.tensor(1.0), "lora_sq.dora_scale": 1 + rnd(1, 32).abs(),
            "lora_pw.lokr_w1": rnd(4, 4), "lora_pw.lokr_w2_a": rnd(2, 4), "lora_pw.lokr_w2_b": rnd(2, 6),
            "lora_pw.lokr_t2": rnd(2, 2, 1, 1), "lora_pw.alpha": torch.tensor(2.0),
            "lora_pw.dora_scale": 1 + rnd(16, 1, 1, 1).abs()}
    save_file(loha, str(tmp_path / "lyco.safetensors"))
    full = {"lora_conv.diff": rnd(24, 16, 3, 3), "lora_conv.diff_b": rnd(24)}
    save_file(full, str(tmp_path / "full.safetensors"))
    return tmp_path / "base.safetensors", [tmp_path / "lyco.safetensors", tmp_path / "full.safetensors"]


@pytest.mark.parametrize("which", [0, 1])
def test_cuda_merge_equals_cpu_and_unmerges(tmp_path, which):
    base, adapters = _files(tmp_path)
    adapter = load_adapter(adapters[which])
    assert adapter.format == "lycoris" and all(layer.lycoris is not None for layer in adapter.layers.values())
    merge(str(base), [AdapterInput(adapter, 1.0)], tmp_path / "cpu", device="cpu")
    merge(str(base), [AdapterInput(adapter, 1.0)], tmp_path / "cuda", device="cuda")
    cpu = load_file(str(tmp_path / "cpu" / "base.safetensors"))
    cuda = load_file(str(tmp_path / "cuda" / "base.safetensors"))
    original = load_file(str(base))
    for key, value in cpu.items():
        scale = float(value.abs().max()) + float(original[key].abs().max())
        assert float((cuda[key] - value).abs().max()) <= 1e-5 * scale, key
    changed = [key for key in cpu if not torch.equal(cpu[key], original[key])]
    assert len(changed) >= (4 if which == 0 else 2)
    unmerge(str(tmp_path / "cuda" / "base.safetensors"), [AdapterInput(adapter, 1.0)], tmp_path / "back",
            device="cuda")
    back = load_file(str(tmp_path / "back" / "base.safetensors"))
    for key, value in original.items():
        assert float((back[key] - value).abs().max()) <= 1e-5 * float(value.abs().max()), key
