"""Never silently wrong (issue 11 §2): lorahub refuses, or does what the peers do and says so, where it
used to write wrong weights or report "✓" for nothing.

Adapters are made by PEFT and diffusers themselves (tests/fixtures_models.py); commands run through the
real CLI (tests/cli_runner.py).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from fixtures_models import LLAMA_TARGETS, _load_base, _randomize_lora, load_file_state, peft_merged_state_dict
from safetensors.torch import load_file, save_file

from lorahub.formats import load_adapter
from lorahub.merge import AdapterInput, merge

# ---------------------------------------------------------------------------------------------
# helpers


def _json(result) -> dict:
    return json.loads(result.stdout)


def _one_error_line(result) -> str:
    """The single `error: …` line of a failed command (no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _merged_equals(out_dir: Path, base_dir: Path, reference: dict[str, torch.Tensor]) -> int:
    """Every tensor of the merged model is bit-identical to the reference; returns how many changed."""
    got, base = load_file_state(out_dir), load_file_state(base_dir)
    changed = 0
    for name, value in got.items():
        if name not in reference:  # tied weights are not in the file
            continue
        assert torch.equal(value, reference[name]), f"{name} differs from PEFT's merge"
        changed += int(not torch.equal(value, base[name]))
    assert changed > 0
    return changed


@pytest.fixture(scope="module")
def peft_fifo_llama(tmp_path_factory, tiny_llama_dir) -> Path:
    """A PEFT LoRA on the tiny Llama made with `fan_in_fan_out=True`. PEFT warns and ignores the flag for
    nn.Linear (it resets its own config); the saved config keeps the flag as the user set it, as configs
    written by hand or by other trainers do."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("fifo") / "peft_fifo_llama"
    base = _load_base(tiny_llama_dir)
    torch.manual_seed(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, fan_in_fan_out=True,
                                                target_modules=list(LLAMA_TARGETS)))
    assert any("fan_in_fan_out is set to True" in str(w.message) for w in caught)  # PEFT ignores it
    _randomize_lora(model, seed=77)
    model.peft_config["default"].fan_in_fan_out = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out))
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    return out


# ---------------------------------------------------------------------------------------------
# 1. fan_in_fan_out on ordinary Linear layers


def test_fan_in_fan_out_on_linear_layers_merges_like_peft(tmp_path, tiny_llama_dir, peft_fifo_llama):
    """PEFT ignores fan_in_fan_out=true for nn.Linear: its merge_and_unload adds the normal ΔW. lorahub
    merges bit-identically (it used to transpose ΔW: wrong values on square layers, an error on others)
    and says once that the flag was ignored."""
    reference = peft_merged_state_dict(tiny_llama_dir, peft_fifo_llama)
    out = tmp_path / "merged"
    result = run_cli("merge", "--base", tiny_llama_dir, peft_fifo_llama, "--out", out, "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    payload = _json(result)
    assert _merged_equals(out, tiny_llama_dir, reference) == 2 * len(LLAMA_TARGETS)
    flagged = [w for w in payload["warnings"] if "fan_in_fan_out" in w]
    assert len(flagged) == 1 and "ignored" in flagged[0], payload["warnings"]

    # what the file says is reported, once, by the commands that read it; nothing claims Conv1D
    info = _json(run_cli("inspect", peft_fifo_llama, "--json"))
    assert info["fan_in_fan_out"] is False and not any(layer["fan_in_fan_out"] for layer in info["layers"])
    assert sum("fan_in_fan_out" in w for w in info["warnings"]) == 1
    report = _json(run_cli("validate", peft_fifo_llama, "--base", tiny_llama_dir, "--json"))
    assert report["ok"] is True


def test_merge_decides_orientation_by_the_base_layer(tmp_path, tiny_llama_dir, tiny_gpt2_dir, peft_lora_dir,
                                                    peft_gpt2_dir):
    """Whatever an in-memory adapter's flag says, the base layer decides (as PEFT decides by the layer's
    type): a Linear base is never transposed, a GPT-2 Conv1D base always is."""
    llama = load_adapter(peft_lora_dir)
    for layer in llama.layers.values():
        layer.fan_in_fan_out = True
    result = merge(tiny_llama_dir, [AdapterInput(llama, 1.0, "llama")], tmp_path / "llama", device="cpu")
    _merged_equals(tmp_path / "llama", tiny_llama_dir, peft_merged_state_dict(tiny_llama_dir, peft_lora_dir))
    assert any("ordinary (out, in) layers in the base" in w for w in result.warnings), result.warnings

    gpt2 = load_adapter(peft_gpt2_dir)
    for layer in gpt2.layers.values():
        layer.fan_in_fan_out = False
    result = merge(tiny_gpt2_dir, [AdapterInput(gpt2, 1.0, "gpt2")], tmp_path / "gpt2", device="cpu")
    _merged_equals(tmp_path / "gpt2", tiny_gpt2_dir,
                   peft_merged_state_dict(tiny_gpt2_dir, peft_gpt2_dir, model_cls="gpt2"))
    assert any("Conv1D (in, out) in the base" in w for w in result.warnings), result.warnings


# ---------------------------------------------------------------------------------------------
# 2. lorahub.layers metadata never overrides what the tensors say


def _rewrite(src: Path, dst: Path, *, metadata: dict[str, str] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of a safetensors file with metadata keys set (None: removed) and tensors replaced or added."""
    from fixtures_models import load_file_metadata

    meta = load_file_metadata(src)
    for key, value in (metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    state = {**load_file(str(src)), **(tensors or {})}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst), metadata=meta)
    return dst


def _layers_metadata(path: Path) -> dict:
    from fixtures_models import load_file_metadata

    return json.loads(load_file_metadata(path)["lorahub.layers"])


def test_metadata_mapping_two_modules_to_one_target_is_refused(tmp_path, tiny_llama_dir, peft_lora_dir):
    """A kohya file whose lorahub.layers maps v_proj's factors onto k_proj (same shapes): lorahub used to
    load k_proj's delta from v_proj (one module lost) and merge it with "✓"."""
    kohya = tmp_path / "lora.safetensors"
    run_cli("convert", peft_lora_dir, "--to", "kohya", "--out", kohya, check=True)
    layers = _layers_metadata(kohya)
    module = "lora_model_layers_0_self_attn_v_proj"
    layers[module]["target"] = layers["lora_model_layers_0_self_attn_k_proj"]["target"]
    hostile = _rewrite(kohya, tmp_path / "hostile.safetensors", metadata={"lorahub.layers": json.dumps(layers)})
    for args in (("inspect", hostile), ("merge", "--base", tiny_llama_dir, hostile, "--out", tmp_path / "m"),
                 ("blend", hostile, peft_lora_dir, "-w", "1,1", "--out", tmp_path / "b")):
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stdout)
        line = _one_error_line(result)
        assert module in line and "contradicts" in line, line
    assert not (tmp_path / "m").exists() and not (tmp_path / "b").exists()
    # the same file without the hostile entry reads as it should
    assert run_cli("inspect", kohya).returncode == 0


def test_metadata_kind_contradicting_the_factor_shapes_is_refused(tmp_path, kohya_unet_file):
    """A kind the factors contradict (conv for 2-D factors, linear for a 3×3 conv's, embedding for
    lora_A/lora_B keys) is refused naming the module; what the metadata may decide (a 2-D pair's
    orientation) still reads."""
    adapter = load_adapter(kohya_unet_file)
    linear = next(layer.source_name for layer in adapter.layers.values() if layer.kind == "linear")
    conv = next(layer.source_name for layer in adapter.layers.values() if layer.is_spatial)
    for module, kind in ((linear, "conv"), (conv, "linear"), (conv, "embedding"), (linear, "lora")):
        entry = {module: {"target": adapter.layers[next(t for t, layer in adapter.layers.items()
                                                        if layer.source_name == module)].target, "kind": kind}}
        hostile = _rewrite(kohya_unet_file, tmp_path / f"{kind}.safetensors",
                           metadata={"lorahub.layers": json.dumps(entry)})
        result = run_cli("inspect", hostile)
        assert result.returncode == 1, (kind, result.stdout)
        assert module in _one_error_line(result)

    # diffusers (PEFT-style) keys say lora_A/lora_B, i.e. not an embedding
    diffusers_file = tmp_path / "unet_lora.safetensors"
    run_cli("convert", kohya_unet_file, "--to", "diffusers", "--out", diffusers_file, check=True)
    target = next(t for t, layer in load_adapter(diffusers_file).layers.items() if layer.kind == "linear")
    hostile = _rewrite(diffusers_file, tmp_path / "embedding.safetensors", metadata={"lorahub.layers": json.dumps(
        {target: {"target": target, "kind": "embedding", "fan_in_fan_out": False}})})
    result = run_cli("convert", hostile, "--to", "kohya", "--out", tmp_path / "out.safetensors")
    assert result.returncode == 1 and target in _one_error_line(result) and "lora_A/lora_B keys" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# 3. an adapter of zero modules is an error everywhere


@pytest.mark.parametrize("forced", ["kohya", "lycoris", "diffusers"])
def test_forced_format_that_reads_nothing_is_an_error(tmp_path, tiny_llama_dir, peft_lora_dir, kohya_unet_file,
                                                     forced):
    """`--format X` on files of another format used to read an adapter of 0 modules and say "✓"."""
    source = peft_lora_dir if forced != "diffusers" else kohya_unet_file
    commands = [("inspect", source), ("inspect", source, "--headers-only"),
                ("validate", source, "--base", tiny_llama_dir),
                ("convert", source, "--to", "peft", "--out", tmp_path / "c"),
                ("resize", source, "--rank", "2", "--out", tmp_path / "r"),
                ("blend", source, source, "-w", "1,1", "--out", tmp_path / "b"),
                ("merge", "--base", tiny_llama_dir, source, "--out", tmp_path / "m")]
    for args in commands:
        result = run_cli(*args, "--format", forced, "--json")
        assert result.returncode == 1, (args, result.stdout)
        payload = _json(result)
        assert payload["ok"] is False and "no LoRA modules found" in payload["error"], (args, payload)
        assert f"(format {forced})" in payload["error"]
    assert not any((tmp_path / name).exists() for name in "crbm")
    # the message says what the keys look like
    result = run_cli("inspect", peft_lora_dir, "--format", "kohya")
    assert "its keys look like peft: drop --format or pass --format peft" in _one_error_line(result)


def test_empty_in_memory_adapter_is_refused(tmp_path, tiny_llama_dir):
    from lorahub.adapter import Adapter
    from lorahub.base import load_base
    from lorahub.validate import validate

    empty = Adapter(path=None, format="peft")
    report = validate(empty, load_base(str(tiny_llama_dir)))
    assert not report.ok and report.problems[0].kind == "no_modules"
    with pytest.raises(Exception, match="no LoRA modules"):
        merge(tiny_llama_dir, [AdapterInput(empty, 1.0, "empty")], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 4. NaN / Inf alpha


def _kohya_with_alpha(kohya_unet_file: Path, out: Path, value: float) -> tuple[Path, str]:
    state = load_file(str(kohya_unet_file))
    key = sorted(k for k in state if k.endswith(".alpha"))[0]
    return _rewrite(kohya_unet_file, out, tensors={key: torch.tensor(value, dtype=torch.float32)}), key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_kohya_alpha(tmp_path, tiny_unet_dir, kohya_unet_file, value):
    """inspect reports a NaN/Inf `.alpha` like NaN factors (exit 1, the tensor named); merge, resize, blend
    and convert refuse it naming the module (blend used to write it as alpha = rank, a finite adapter)."""
    hostile, key = _kohya_with_alpha(kohya_unet_file, tmp_path / "in" / "alpha.safetensors", value)
    module = key.removesuffix(".alpha")
    for extra in ((), ("--headers-only",)):
        result = run_cli("inspect", hostile, "--json", *extra)
        assert result.returncode == 1
        payload = _json(result)
        assert payload["ok"] is False and key in payload["error"]
        entry = next(e for e in payload["nonfinite"] if e["key"] == key)
        assert entry["nan" if value != value else "inf"] == 1
    for args in (("merge", "--base", tiny_unet_dir, hostile, "--out", tmp_path / "m"),
                 ("resize", hostile, "--rank", "2", "--out", tmp_path / "r.safetensors"),
                 ("blend", hostile, kohya_unet_file, "-w", "1,1", "--out", tmp_path / "b.safetensors"),
                 ("interpolate", kohya_unet_file, hostile, "-t", "0.5", "--out", tmp_path / "i.safetensors"),
                 ("convert", hostile, "--to", "diffusers", "--out", tmp_path / "c.safetensors")):
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stdout)
        line = _one_error_line(result)
        assert "alpha of module" in line and module in line and "not a finite number" in line, line
    assert not any(p.name != "in" for p in tmp_path.iterdir())


def test_nonfinite_config_alpha(tmp_path, tiny_llama_dir, peft_lora_dir):
    """`lora_alpha` / `alpha_pattern` NaN or Infinity in adapter_config.json (JSON readers accept both)."""
    for field, value in (("lora_alpha", "NaN"), ("alpha_pattern", '{"v_proj": Infinity}')):
        adapter = tmp_path / field
        shutil.copytree(peft_lora_dir, adapter)
        text = (adapter / "adapter_config.json").read_text()
        config = json.loads(text)
        config[field] = "@@"
        (adapter / "adapter_config.json").write_text(json.dumps(config).replace('"@@"', value))
        result = run_cli("inspect", adapter, "--json")
        assert result.returncode == 1
        payload = _json(result)
        assert "alpha of module" in payload["error"] and payload["nonfinite"]
        assert all(e["key"] == "lora_alpha / alpha_pattern in the config" for e in payload["nonfinite"])
        assert payload["alpha"] is None or isinstance(payload["alpha"], str)
        for args in (("merge", "--base", tiny_llama_dir, adapter, "--out", tmp_path / "m"),
                     ("resize", adapter, "--rank", "2", "--out", tmp_path / "r"),
                     ("blend", adapter, peft_lora_dir, "-w", "1,1", "--out", tmp_path / "b"),
                     ("convert", adapter, "--to", "kohya", "--out", tmp_path / "c.safetensors")):
            result = run_cli(*args)
            assert result.returncode == 1, (args, result.stdout)
            line = _one_error_line(result)
            assert "alpha of module 'model.layers." in line and "not a finite number" in line, line
    assert not any((tmp_path / name).exists() for name in ("m", "r", "b", "c.safetensors"))


# ---------------------------------------------------------------------------------------------
# 5. blend refuses adapters of different models


@pytest.fixture(scope="module")
def sd3_transformer_lora(tmp_path_factory) -> Path:
    """A diffusers LoRA file for a tiny SD3 transformer (a DiT: `transformer.transformer_blocks.…to_q`),
    saved by diffusers' own `save_lora_weights`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    out = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(5)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]), model)
    _randomize_lora(model, seed=55)
    StableDiffusion3Pipeline.save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(model))
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def llama_subsets(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    """Two PEFT LoRAs of the tiny Llama on disjoint target sets (attention / MLP)."""
    from fixtures_models import _make_peft

    root = tmp_path_factory.mktemp("subsets")
    return (_make_peft(root / "attn", tiny_llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            _make_peft(root / "mlp", tiny_llama_dir, r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"]))


def test_blend_refuses_adapters_of_different_models(tmp_path, peft_lora_dir, peft_gpt2_dir, kohya_unet_file,
                                                   sd3_transformer_lora):
    """No shared module and no base name to compare: these blends used to write the union of two models'
    modules, an adapter of no model."""
    cases = [
        (peft_lora_dir, kohya_unet_file, (), "a transformers model vs a diffusers pipeline"),  # Llama + SD UNet
        (kohya_unet_file, sd3_transformer_lora, (), "a unet vs a transformer"),  # UNet + DiT
        (peft_lora_dir, peft_gpt2_dir, ("--allow-base-mismatch",), "model.layers.# vs transformer.h.#"),
    ]
    for first, second, extra, why in cases:
        for command in (("blend", first, second, "-w", "0.5,0.5"), ("interpolate", first, second, "-t", "0.5")):
            result = run_cli(*command, *extra, "--to", "kohya", "--out", tmp_path / "out.safetensors")
            assert result.returncode == 1, (command, result.stdout)
            line = _one_error_line(result)
            assert "adapters of different models" in line and why in line, line
            assert not (tmp_path / "out.safetensors").exists()


def test_blend_keeps_adapters_of_one_model_with_different_targets(tmp_path, llama_subsets, kohya_unet_file):
    attn, mlp = llama_subsets
    result = run_cli("blend", attn, mlp, "-w", "1,1", "--out", tmp_path / "mix", "--json")
    assert result.returncode == 0, result.stderr
    assert _json(result)["modules"] == len(load_adapter(attn).layers) + len(load_adapter(mlp).layers)
    # a kohya UNet LoRA and the same model's LoRA on a subset of its modules, in diffusers format
    subset = load_adapter(kohya_unet_file)
    subset.layers = {t: layer for t, layer in subset.layers.items() if t.endswith(("to_q", "to_k"))}
    from lorahub.formats import save_adapter

    diffusers_file = save_adapter(subset, tmp_path / "subset.safetensors", "diffusers")
    result = run_cli("interpolate", kohya_unet_file, diffusers_file, "-t", "0.5", "--out", tmp_path / "i.safetensors")
    assert result.returncode == 0, result.stderr


def test_blend_refuses_one_model_named_two_ways(tmp_path, kohya_unet_file):
    """A diffusers-format UNet LoRA (`unet.down_blocks…`) and a PEFT directory of the same UNet alone
    (`down_blocks…`): their union would hold every module twice, under two names."""
    from lorahub.formats import save_adapter

    adapter = load_adapter(kohya_unet_file)
    bare = load_adapter(kohya_unet_file)
    bare.layers = {t.removeprefix("unet."): layer for t, layer in bare.layers.items()}
    for t, layer in bare.layers.items():
        layer.target = t
    bare.has_components = False
    peft_dir = save_adapter(bare, tmp_path / "peft_unet", "peft")
    diffusers_file = save_adapter(adapter, tmp_path / "unet.safetensors", "diffusers")
    result = run_cli("blend", diffusers_file, peft_dir, "-w", "1,1", "--out", tmp_path / "out.safetensors")
    assert result.returncode == 1
    assert "name the same module differently" in _one_error_line(result)

    # kohya's SGM UNet names (input_blocks…, as in SDXL files) against diffusers' (down_blocks…)
    from lorahub.blend import check_compatible
    from lorahub.names import diffusers_to_ldm_unet

    sgm = load_adapter(kohya_unet_file)
    renamed = {}
    for target, layer in sgm.layers.items():
        mapped = diffusers_to_ldm_unet(target.removeprefix("unet."), 1, {1})
        layer.target = "unet." + mapped if mapped else target
        renamed[layer.target] = layer
    sgm.layers = renamed
    assert any(t.startswith("unet.input_blocks.") for t in sgm.layers)
    with pytest.raises(Exception, match="unet modules named SGM-style vs diffusers-style"):
        check_compatible([sgm, adapter])


# ---------------------------------------------------------------------------------------------
# 6. unmerge without a merge record


def test_unmerge_without_a_merge_record_warns_and_records(tmp_path, tiny_llama_dir, peft_lora_dir):
    """A model lorahub did not merge (PEFT merged it): the subtraction is done as asked, with a warning,
    and the output's record says an unmerge without a recorded merge happened."""
    from fixtures_models import _load_base

    from lorahub.merge import RECORD_FILE
    from lorahub.storage import read_header

    merged_dir = tmp_path / "peft_merged"
    model = _load_base(tiny_llama_dir)
    model.load_state_dict(peft_merged_state_dict(tiny_llama_dir, peft_lora_dir), strict=False)
    model.save_pretrained(str(merged_dir))
    assert not (merged_dir / RECORD_FILE).exists()

    out = tmp_path / "restored"
    result = run_cli("unmerge", "--base", merged_dir, peft_lora_dir, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    warning = f"no lorahub merge record in {merged_dir}: subtracting the adapter's delta as given; the result is " \
              "exact only if it was merged with the same weights"
    assert warning in " ".join(result.stderr.split()), result.stderr
    record = json.loads((out / RECORD_FILE).read_text())
    assert [entry["operation"] for entry in record["merges"]] == ["unmerge"]
    assert record["merges"][0]["adapters"][0]["weight"] == 1.0
    assert "unmerge" in read_header(out / "model.safetensors").metadata["lorahub_merge"]
    payload = _json(run_cli("unmerge", "--base", merged_dir, peft_lora_dir, "--out", tmp_path / "again",
                            "--device", "cpu", "--json"))
    assert payload["ok"] is True and warning in payload["warnings"]

    # a model merged by lorahub: the record matches, no warning
    run_cli("merge", "--base", tiny_llama_dir, peft_lora_dir, "--out", tmp_path / "m", "--device", "cpu", check=True)
    payload = _json(run_cli("unmerge", "--base", tmp_path / "m", peft_lora_dir, "--out", tmp_path / "u",
                            "--device", "cpu", "--json"))
    assert payload["ok"] is True and not any("record" in w for w in payload["warnings"])
