"""Regression tests from code review: format round trips checked against PEFT itself."""
from __future__ import annotations

import warnings

import torch
from safetensors.torch import load_file

from lorahub.formats import load_adapter, save_adapter


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _peft_conv_dora(out):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_ConvNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv"], use_dora=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(out))
    return model


def _peft_output(adapter_dir, x):
    from peft import PeftModel

    torch.manual_seed(0)  # the base weights _peft_conv_dora trained on
    base = _ConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model(x)


def test_conv_dora_peft_round_trip_loads_in_peft(tmp_path):
    """A conv DoRA adapter written back as PEFT (directly or via kohya) must load in PEFT and give
    the same outputs; PEFT stores a conv magnitude as (1, out, 1, 1)."""
    model = _peft_conv_dora(tmp_path / "src")
    x = torch.randn(2, 4, 5, 5)
    expected = model(x)
    assert torch.allclose(_peft_output(tmp_path / "src", x), expected, atol=1e-6)

    adapter = load_adapter(tmp_path / "src")
    save_adapter(adapter, tmp_path / "peft", "peft")
    assert torch.allclose(_peft_output(tmp_path / "peft", x), expected, atol=1e-6)

    save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    save_adapter(load_adapter(tmp_path / "k.safetensors"), tmp_path / "peft2", "peft")
    assert torch.allclose(_peft_output(tmp_path / "peft2", x), expected, atol=1e-6)


def test_conv_dora_kohya_scale_on_output_axis(tmp_path):
    """LyCORIS (wd_on_out) and ComfyUI read a conv `dora_scale` of shape (out, 1, 1, 1) as per output
    channel; (1, out, 1, 1) would be taken as per input channel."""
    _peft_conv_dora(tmp_path / "src")
    save_adapter(load_adapter(tmp_path / "src"), tmp_path / "k.safetensors", "kohya")
    tensors = load_file(str(tmp_path / "k.safetensors"))
    (scale,) = [v for k, v in tensors.items() if k.endswith(".dora_scale")]
    magnitude = load_file(str(tmp_path / "src" / "adapter_model.safetensors"))[
        "base_model.model.conv.lora_magnitude_vector"]
    assert tuple(scale.shape) == (6, 1, 1, 1)
    assert torch.equal(scale.reshape(-1), magnitude.reshape(-1))


def test_kohya_input_axis_dora_scale_gets_lycoris_math(tmp_path):
    """LyCORIS with wd_on_out=False stores a per-input-column `dora_scale` (1, in): not the
    per-output-row DoRA of PEFT. It is read as LyCORIS input-axis DoRA (merged as LyCORIS does, see
    tests/test_lycoris.py) and refused by convert, which no plain LoRA format can carry."""
    from safetensors.torch import save_file

    from lorahub.convert import convert_adapter
    from lorahub.errors import LorahubError

    name = "lora_unet_mid_block_attentions_0_proj_in"
    path = tmp_path / "dora.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 8), f"{name}.lora_up.weight": torch.randn(8, 2),
               f"{name}.alpha": torch.tensor(2.0), f"{name}.dora_scale": torch.rand(1, 8)}, str(path))
    adapter = load_adapter(path)
    (layer,) = adapter.layers.values()
    assert layer.lycoris is not None and layer.lycoris.dora_on_out is False
    try:
        convert_adapter(adapter, tmp_path / "out", "peft")
    except LorahubError as exc:
        assert "per input channel" in str(exc) and name in str(exc)
    else:
        raise AssertionError("an input-axis dora_scale was converted")
    assert not (tmp_path / "out").exists()


def test_bad_number_in_peft_config_is_one_line_error(tmp_path, peft_lora_dir):
    import json
    import shutil

    from cli_runner import run_cli

    adapter = tmp_path / "a"
    shutil.copytree(peft_lora_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value in (("r", "eight"), ("lora_alpha", [16]), ("rank_pattern", {"q_proj": "x"})):
        broken = {**config, key: value}
        (adapter / "adapter_config.json").write_text(json.dumps(broken))
        result = run_cli("inspect", adapter)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert "adapter_config.json" in result.stderr and key in result.stderr


def test_paths_with_brackets_are_printed_verbatim(tmp_path, kohya_unet_file):
    """File names may contain '[...]' (rich markup syntax): messages must show them as they are."""
    from cli_runner import run_cli

    missing = tmp_path / "x[bold]y.safetensors"
    result = run_cli("inspect", missing)
    assert result.returncode == 1
    assert "x[bold]y.safetensors" in result.stderr

    out = tmp_path / "out[/red]"
    result = run_cli("convert", kohya_unet_file, "--to", "diffusers", "--out", out / "a.safetensors")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "out[/red]" in result.stdout


def test_colons_in_paths_are_not_emoji_codes(tmp_path):
    """'name:abc:' must not turn into an emoji (rich's :code: syntax) in messages."""
    from cli_runner import run_cli

    result = run_cli("inspect", tmp_path / "a:smile:b.safetensors")
    assert result.returncode == 1
    assert "a:smile:b.safetensors" in result.stderr
