"""`lorahub validate`: adapters made by PEFT/diffusers against real bases, header-only 70B bases,
SD single-file checkpoints, Hub bases, and the problems a user needs named."""
from __future__ import annotations

import builtins
import json
import os
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import save_file
from test_base import header_len, sd_single_file_from_unet, write_skeleton

from lorahub import storage
from lorahub.adapter import Adapter, LazyTensor, LoraLayer
from lorahub.base import load_base
from lorahub.formats import load_adapter
from lorahub.names import diffusers_to_ldm_unet, match_layers
from lorahub.registry import load_manifest
from lorahub.validate import validate

# ----------------------------------------------------------------------------------------------
# in-memory adapters: shapes only (LazyTensors without a file; validation never loads them)


def shaped(*shape: int) -> LazyTensor:
    return LazyTensor(shape=shape, dtype="F32")


def layer(target: str, a: tuple, b: tuple, kind: str = "linear", **kwargs) -> LoraLayer:
    return LoraLayer(target=target, kind=kind, A=shaped(*a), B=shaped(*b), alpha=float(a[0]), rank=a[0], **kwargs)


def adapter_of(*layers: LoraLayer, full: dict | None = None, base_model: str | None = None) -> Adapter:
    return Adapter(path=Path("mem.safetensors"), format="peft", layers={l.target: l for l in layers},
                   full_tensors={k: shaped(*v) for k, v in (full or {}).items()}, base_model=base_model)


# ----------------------------------------------------------------------------------------------
# the adapters PEFT and diffusers made


@pytest.mark.parametrize("adapter_fixture, base_fixture", [
    ("peft_lora_dir", "tiny_llama_dir"),
    ("peft_lora_dir", "tiny_llama_sharded_dir"),
    ("peft_rslora_dir", "tiny_llama_dir"),
    ("peft_dora_dir", "tiny_llama_dir"),
    ("peft_embed_dir", "tiny_llama_dir"),
    ("peft_gpt2_dir", "tiny_gpt2_dir"),
    ("kohya_unet_file", "tiny_unet_dir"),
])
def test_matching_adapters_pass(request, adapter_fixture, base_fixture):
    adapter_path, base_path = request.getfixturevalue(adapter_fixture), request.getfixturevalue(base_fixture)
    adapter = load_adapter(adapter_path)
    base = load_base(base_path)
    report = validate(adapter, base)
    assert report.ok, report.problems
    assert not report.errors
    assert report.matched == report.modules == len(adapter.layers) + len(adapter.full_tensors)
    result = run_cli("validate", adapter_path, "--base", base_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("✓ fits:")


def test_every_kohya_module_resolves_to_the_diffusers_tensor(kohya_unet_file, tiny_unet_dir):
    adapter, base = load_adapter(kohya_unet_file), load_base(tiny_unet_dir)
    match = match_layers(adapter, base)
    assert not match.missing and len(match.targets) == len(adapter.layers) > 0
    for target, layer in adapter.layers.items():
        # the raw kohya name, flattened from the diffusers module path diffusers itself converted
        tensor = match.targets[target]
        assert layer.source_name == "lora_" + tensor[: -len(".weight")].replace(".", "_")
        assert base.get(tensor).file == "unet/diffusion_pytorch_model.safetensors"
    assert set(match.files(base)) == {"unet/diffusion_pytorch_model.safetensors"}


def test_wider_adapter_fails_with_every_module_listed(peft_wide_dir, tiny_llama_dir):
    adapter = load_adapter(peft_wide_dir)
    report = validate(adapter, load_base(tiny_llama_dir))
    assert not report.ok
    assert {p.module for p in report.errors} == set(adapter.layers)  # all 8 q/k/v/o modules
    assert all(p.kind == "shape" for p in report.errors)
    q = next(p for p in report.errors if p.module == "model.layers.0.self_attn.q_proj")
    assert q.expected == "A [r, 64], B [64, r] (W [64, 64])"
    assert q.found == "A [8, 96], B [96, 8]"
    assert "hidden size 96" in q.hint
    k = next(p for p in report.errors if p.module == "model.layers.0.self_attn.k_proj")
    assert "W [32, 64]" in k.expected and "B [48, 8]" in k.found
    assert any("trained on" in w and "wide_llama" in w for w in report.warnings)  # base name differs

    result = run_cli("validate", peft_wide_dir, "--base", tiny_llama_dir)
    assert result.returncode == 1
    assert result.stdout.startswith("✗ does not fit: 8 of 8 modules")
    for module in adapter.layers:
        assert module in result.stdout
    assert "A [8, 96], B [96, 8]" in result.stdout and "W [64, 64]" in result.stdout
    assert "Traceback" not in result.stderr

    result = run_cli("validate", peft_wide_dir, "--base", tiny_llama_dir, "--json")
    assert result.returncode == 1
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["matched"] == 0 and payload["modules"] == 8
    assert len(payload["problems"]) == 8
    assert {"module", "expected", "found", "hint", "severity", "kind"} <= set(payload["problems"][0])


def test_base_named_in_the_adapter_is_the_default(peft_lora_dir):
    result = run_cli("validate", peft_lora_dir)
    assert result.returncode == 0, result.stderr
    assert "named in the adapter" in result.stdout


def test_max_rank(peft_lora_dir, tiny_llama_dir):
    adapter, base = load_adapter(peft_lora_dir), load_base(tiny_llama_dir)
    assert validate(adapter, base, max_rank=8).ok
    report = validate(adapter, base, max_rank=4)
    assert not report.ok and {p.kind for p in report.errors} == {"max_rank"}
    assert len(report.errors) == len(adapter.layers) and report.matched == report.modules
    assert report.errors[0].found == "rank 8" and "--max-rank 4" in report.errors[0].hint
    assert run_cli("validate", peft_lora_dir, "--base", tiny_llama_dir, "--max-rank", "4").returncode == 1
    assert run_cli("validate", peft_lora_dir, "--base", tiny_llama_dir, "--max-rank", "16").returncode == 0


# ----------------------------------------------------------------------------------------------
# what else validation has to name


def test_missing_modules_name_the_siblings(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    adapter = adapter_of(layer("model.layers.0.self_attn.qkv_proj", (4, 64), (128, 4)),
                         layer("model.layers.0.self_attn.q_proj", (4, 64), (64, 4)))
    report = validate(adapter, base)
    assert not report.ok and report.matched == 1
    (problem,) = report.errors
    assert problem.kind == "missing" and problem.module == "model.layers.0.self_attn.qkv_proj"
    assert "q_proj" in problem.hint and "packed" in problem.hint
    other = validate(adapter_of(layer("encoder.block.0.SelfAttention.q", (4, 64), (64, 4))), base)
    assert "different architecture" in other.errors[0].hint


def test_embedding_orientation_and_dora_magnitude(tiny_llama_dir):
    base = load_base(tiny_llama_dir)  # embed_tokens (128, 64), q_proj (64, 64), up_proj (128, 64)
    good = adapter_of(layer("model.embed_tokens", (4, 128), (64, 4), kind="embedding"),
                      layer("model.layers.0.mlp.up_proj", (4, 64), (128, 4), magnitude=shaped(128)))
    assert validate(good, base).ok
    # A and B of an embedding swapped: (num, dim) read as (dim, num)
    swapped = adapter_of(layer("model.embed_tokens", (4, 64), (128, 4), kind="embedding"))
    report = validate(swapped, base)
    assert not report.ok and report.errors[0].expected == "A [r, 128], B [64, r] (W [128, 64])"
    bad_dora = adapter_of(layer("model.layers.0.mlp.up_proj", (4, 64), (128, 4), magnitude=shaped(64)))
    report = validate(bad_dora, base)
    assert [p.kind for p in report.errors] == ["magnitude"]
    assert "128" in report.errors[0].expected and report.errors[0].found == "magnitude [64]"


def test_conv1d_orientation_decided_by_the_base(tiny_gpt2_dir):
    base = load_base(tiny_gpt2_dir)  # c_attn weight (64, 192) stored (in, out)
    right = adapter_of(layer("transformer.h.0.attn.c_attn", (4, 64), (192, 4), fan_in_fan_out=True))
    assert validate(right, base).ok
    # the adapter forgot fan_in_fan_out: PEFT forces it for Conv1D, so this is a warning, not a failure
    flagless = adapter_of(layer("transformer.h.0.attn.c_attn", (4, 64), (192, 4)))
    report = validate(flagless, base)
    assert report.ok and [p.kind for p in report.problems] == ["orientation"]
    assert "Conv1D" in report.problems[0].hint
    wrong = adapter_of(layer("transformer.h.0.attn.c_attn", (4, 192), (64, 4), fan_in_fan_out=True))
    assert not validate(wrong, base).ok


def test_modules_to_save_resized_vocabulary(tiny_llama_dir, tiny_gpt2_dir):
    base = load_base(tiny_llama_dir)
    resized = adapter_of(full={"lm_head.weight": (130, 64), "model.embed_tokens.weight": (130, 64)})
    report = validate(resized, base)
    assert not report.ok and {p.module for p in report.errors} == {"lm_head.weight", "model.embed_tokens.weight"}
    problem = report.errors[0]
    assert problem.kind == "full_tensor" and problem.expected == "[128, 64]" and problem.found == "[130, 64]"
    assert "resized vocabulary" in problem.hint
    assert not validate(adapter_of(full={"score.weight": (2, 64)}), base).ok
    # GPT-2 ties lm_head to wte, so its file has no lm_head.weight: compare with the embedding
    tied = adapter_of(full={"lm_head.weight": (128, 64)})
    assert validate(tied, load_base(tiny_gpt2_dir)).ok


def test_lora_bias_needs_a_base_bias(tiny_llama_dir, tiny_gpt2_dir):
    with_bias = layer("model.layers.0.self_attn.q_proj", (4, 64), (64, 4), bias=shaped(64))
    report = validate(adapter_of(with_bias), load_base(tiny_llama_dir))  # Llama has no biases
    assert [p.kind for p in report.errors] == ["bias"]
    gpt2 = layer("transformer.h.0.attn.c_attn", (4, 64), (192, 4), fan_in_fan_out=True, bias=shaped(192))
    assert validate(adapter_of(gpt2), load_base(tiny_gpt2_dir)).ok


def test_empty_and_rank_mismatched_factors(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    report = validate(adapter_of(layer("model.layers.0.self_attn.q_proj", (0, 64), (64, 0))), base)
    assert report.errors[0].kind == "empty" and "ZeRO-3" in report.errors[0].hint
    odd = LoraLayer("model.layers.0.self_attn.q_proj", "linear", shaped(4, 64), shaped(64, 8), 4.0, 4)
    assert validate(adapter_of(odd), base).errors[0].kind == "rank"


def test_prefix_differences_are_bridged(tiny_gpt2_dir, tmp_path):
    # GPT-2's own Hub file was saved from GPT2Model: keys "h.0.attn.c_attn.weight", no "transformer."
    bare = tmp_path / "gpt2-bare"
    bare.mkdir()
    from safetensors.torch import load_file

    state = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(bare / "model.safetensors"))
    (bare / "config.json").write_text((tiny_gpt2_dir / "config.json").read_text())
    adapter = adapter_of(layer("transformer.h.0.attn.c_attn", (4, 64), (192, 4), fan_in_fan_out=True),
                         layer("transformer.h.1.mlp.c_fc", (4, 64), (256, 4), fan_in_fan_out=True))
    base = load_base(bare)
    report = validate(adapter, base)
    assert report.ok, report.problems
    assert match_layers(adapter, base).targets["transformer.h.0.attn.c_attn"] == "h.0.attn.c_attn.weight"
    assert any("prefix" in w for w in report.warnings)


def test_registry_suggestion(tiny_gpt2_dir):
    # an adapter shaped for the real GPT-2 (n_embd 768), validated against the tiny one
    adapter = adapter_of(layer("transformer.h.0.attn.c_attn", (8, 768), (2304, 8), fan_in_fan_out=True),
                         layer("transformer.h.11.mlp.c_proj", (8, 3072), (768, 8), fan_in_fan_out=True))
    report = validate(adapter, load_base(tiny_gpt2_dir))
    assert not report.ok
    assert report.suggestions == ["gpt2"]
    assert "(fits: gpt2)" in report.summary
    assert "hidden size 768" in report.errors[0].hint or "768" in report.errors[0].hint


def test_registry_bases_offline(tmp_path):
    """`--base llama-3-8b`: a PEFT adapter with Llama-3-8B shapes, validated with no network at all."""
    adapter_dir = tmp_path / "llama3-lora"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["k_proj", "o_proj"],
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B"}))
    save_file({"base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight": torch.zeros(2, 4096),
               "base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight": torch.zeros(1024, 2),
               "base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight": torch.zeros(2, 4096),
               "base_model.model.model.layers.3.self_attn.o_proj.lora_B.weight": torch.zeros(4096, 2)},
              str(adapter_dir / "adapter_model.safetensors"))
    result = run_cli("validate", adapter_dir, "--base", "llama-3-8b", "--json",
                     env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(result.stdout)
    assert payload["ok"] and payload["matched"] == 2 and payload["warnings"] == []  # base name matches
    # Llama-2-7B has 32 KV heads: k_proj is (4096, 4096) there
    result = run_cli("validate", adapter_dir, "--base", "llama-2-7b", "--json")
    payload = json.loads(result.stdout)
    assert result.returncode == 1 and [p["module"] for p in payload["problems"]] == ["model.layers.3.self_attn.k_proj"]
    assert "llama-3-8b" in payload["suggestions"]


# ----------------------------------------------------------------------------------------------
# a 70B base costs header reads only


class _ReadSpy:
    """Counts the bytes read from every file lorahub.storage opens."""

    def __init__(self):
        self.bytes = Counter()
        self._open = builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = self._open(file, mode, *args, **kwargs)
        if "b" not in mode:
            return handle
        spy = self

        class Counted:
            def __init__(self, inner):
                self._inner = inner

            def read(self, n=-1):
                data = self._inner.read(n)
                spy.bytes[Path(file).name] += len(data)
                return data

            def __getattr__(self, name):
                return getattr(self._inner, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

        return Counted(handle)


def _write_70b(root: Path, data: str) -> dict[str, int]:
    """The Llama-3.1-70B checkpoint layout (30 shards, 723 tensors) with headers and no tensor data."""
    manifest = load_manifest("llama-3.1-70b")
    names = list(manifest.tensors)
    shards = 30
    weight_map, header_lens = {}, {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
        chunk = {n: (manifest.tensors[n].shape, manifest.tensors[n].dtype) for n in part}
        header_lens[file] = write_skeleton(root / file, chunk, data=data)
        weight_map.update({n: file for n in chunk})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(manifest.config))
    return header_lens


def _sparse_supported(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    with open(probe, "wb") as handle:
        handle.truncate(64 << 20)
    supported = probe.stat().st_blocks * 512 < (1 << 20)
    probe.unlink()
    return supported


@pytest.fixture(scope="module")
def lora_70b(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora70b")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "base_model_name_or_path": "meta-llama/Llama-3.1-70B"}))
    tensors = {}
    for i in (0, 79):
        p = f"base_model.model.model.layers.{i}"
        tensors[f"{p}.self_attn.q_proj.lora_A.weight"] = torch.zeros(1, 8192)
        tensors[f"{p}.self_attn.q_proj.lora_B.weight"] = torch.zeros(8192, 1)
        tensors[f"{p}.self_attn.v_proj.lora_A.weight"] = torch.zeros(1, 8192)
        tensors[f"{p}.self_attn.v_proj.lora_B.weight"] = torch.zeros(1024, 1)
        tensors[f"{p}.mlp.down_proj.lora_A.weight"] = torch.zeros(1, 28672)
        tensors[f"{p}.mlp.down_proj.lora_B.weight"] = torch.zeros(8192, 1)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("data", ["none", "sparse"])
def test_70b_base_costs_header_reads_only(tmp_path, lora_70b, monkeypatch, data):
    if data == "sparse" and not _sparse_supported(tmp_path):
        pytest.skip("filesystem without sparse files")
    base_dir = tmp_path / "Llama-3.1-70B"
    header_lens = _write_70b(base_dir, data)
    if data == "sparse":  # full size on paper (≈141 GB), nothing on disk
        total = sum((base_dir / f).stat().st_size for f in header_lens)
        assert total > 140e9
    spy = _ReadSpy()
    monkeypatch.setattr(storage, "open", spy, raising=False)
    real_pread = os.pread

    def counted_pread(fd, n, offset):  # storage reads headers with os.pread on a checked regular file
        data = real_pread(fd, n, offset)
        spy.bytes[Path(os.readlink(f"/proc/self/fd/{fd}")).name] += len(data)
        return data

    monkeypatch.setattr(storage.os, "pread", counted_pread)
    adapter = load_adapter(lora_70b)
    report = validate(adapter, load_base(base_dir))
    assert report.ok, report.problems
    assert report.matched == 6
    for file, n in header_lens.items():
        assert spy.bytes[file] == 8 + n, file  # the 8-byte length and the JSON header, nothing else
    assert report.base == str(base_dir)
    assert ("header-only" in " ".join(report.warnings)) == (data == "none")

    # a wrong adapter fails the same way, still from headers only
    wrong = adapter_of(layer("model.layers.0.self_attn.v_proj", (1, 8192), (8192, 1)))
    report = validate(wrong, load_base(base_dir))
    assert not report.ok and report.errors[0].expected == "A [r, 8192], B [1024, r] (W [1024, 8192])"


# ----------------------------------------------------------------------------------------------
# Stable Diffusion single-file checkpoints and SDXL's naming zoo


def test_kohya_against_sd_single_file(kohya_unet_file, tiny_unet_dir, tmp_path):
    single = sd_single_file_from_unet(tiny_unet_dir / "unet", tmp_path / "tiny-sd.safetensors")
    adapter, base = load_adapter(kohya_unet_file), load_base(single)
    report = validate(adapter, base)
    assert report.ok and report.matched == len(adapter.layers), report.problems
    match = match_layers(adapter, base)
    assert all(t.startswith("model.diffusion_model.") for t in match.targets.values())
    diffusers_base = load_base(tiny_unet_dir)
    diffusers_match = match_layers(adapter, diffusers_base)
    for target, tensor in diffusers_match.targets.items():  # the same tensor under both namings
        assert base.shape(match.targets[target]) == diffusers_base.shape(tensor)
    result = run_cli("validate", kohya_unet_file, "--base", single)
    assert result.returncode == 0, result.stdout + result.stderr


def test_diffusers_ldm_map_agrees_with_diffusers_converter():
    """Our diffusers→LDM UNet names, fed to diffusers' own LDM→diffusers converter, come back unchanged."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lorahub.names import ldm_to_diffusers_unet

    for name in ("sd-1.5", "sdxl"):
        base = load_manifest(name)
        config = base.config["unet"]
        unet = {n[len("unet."):]: t for n, t in base.tensors.items() if n.startswith("unet.")}
        up_attn = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
        checkpoint, originals = {}, {}
        for key, tensor in unet.items():
            module, _, param = key.rpartition(".")
            ldm = diffusers_to_ldm_unet(module, config["layers_per_block"], up_attn)
            assert ldm_to_diffusers_unet(ldm, config["layers_per_block"]) == module
            value = torch.empty(tensor.shape, device="meta")
            checkpoint[f"model.diffusion_model.{ldm}.{param}"] = originals[key] = value
        converted = convert_ldm_unet_checkpoint(dict(checkpoint), config)
        assert set(converted) == set(originals)
        assert all(converted[k] is originals[k] for k in originals), name  # the very same tensor


def _sdxl_single_file_tensors() -> dict[str, tuple[tuple[int, ...], str]]:
    """SDXL's original (SGM) checkpoint layout, from the SDXL manifest: LDM UNet, CLIP-L, OpenCLIP bigG."""
    base = load_manifest("sdxl")
    config = base.config["unet"]
    up_attn = {int(k.split(".")[2]) for k in base.tensors if k.startswith("unet.up_blocks.") and ".attentions." in k}
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    te2 = "conditioner.embedders.1.model."
    for name, tensor in base.tensors.items():
        shape = (tensor.shape, "F16")
        component, _, rest = name.partition(".")
        module, _, param = rest.rpartition(".")
        if component == "unet":
            out[f"model.diffusion_model.{diffusers_to_ldm_unet(module, config['layers_per_block'], up_attn)}.{param}"] = shape
        elif component == "text_encoder":
            out["conditioner.embedders.0.transformer." + rest] = shape
        elif rest.startswith("text_model.encoder.layers."):
            layer_no, sub = rest[len("text_model.encoder.layers."):].split(".", 1)
            block = f"{te2}transformer.resblocks.{layer_no}."
            if sub.startswith("self_attn.q_proj."):
                width = tensor.shape[0]
                out[block + ("attn.in_proj_weight" if param == "weight" else "attn.in_proj_bias")] = \
                    ((3 * width, *tensor.shape[1:]), "F16")
            elif not sub.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                sub = (sub.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
                       .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj"))
                out[block + sub] = shape
        elif rest == "text_model.embeddings.token_embedding.weight":
            out[te2 + "token_embedding.weight"] = shape
        elif rest == "text_model.embeddings.position_embedding.weight":
            out[te2 + "positional_embedding"] = shape
        elif rest.startswith("text_model.final_layer_norm."):
            out[te2 + "ln_final." + param] = shape
        elif rest == "text_projection.weight":
            out[te2 + "text_projection"] = ((tensor.shape[1], tensor.shape[0]), "F16")
    return out


def _kohya_sdxl_adapter(tmp_path: Path) -> Path:
    """A kohya SDXL LoRA: SGM UNet names, CLIP-L (te1) and OpenCLIP-as-CLIP (te2) names; rank 1."""
    modules = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k": (1280, 2048),
        "lora_unet_middle_block_1_proj_in": (1280, 1280),
        "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_0_proj": (10240, 1280),
        "lora_unet_output_blocks_8_0_out_layers_3": (320, 320, 3, 3),
        "lora_te1_text_model_encoder_layers_11_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (1280, 1280),
        "lora_te2_text_model_encoder_layers_31_mlp_fc2": (1280, 5120),
    }
    tensors = {}
    for name, (out, *rest) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.zeros(1, *rest)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(out, 1, *([1, 1] if len(rest) == 3 else []))
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "sdxl_lora.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def test_kohya_sdxl_against_registry_and_single_file(tmp_path):
    adapter = load_adapter(_kohya_sdxl_adapter(tmp_path))
    # the diffusers-layout SDXL manifest: SGM names reach the diffusers UNet through aliases
    sdxl = load_manifest("sdxl")
    report = validate(adapter, sdxl)
    assert report.ok and report.matched == 8, report.problems
    match = match_layers(adapter, sdxl)
    by_raw = {adapter.layers[t].source_name: tensor for t, tensor in match.targets.items()}
    assert by_raw["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert by_raw["lora_unet_output_blocks_8_0_out_layers_3"] == "unet.up_blocks.2.resnets.2.conv2.weight"
    assert by_raw["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"] == \
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.weight"
    # the original single-file checkpoint (header-only here): OpenCLIP's fused in_proj holds q/k/v rows
    single = tmp_path / "sd_xl_base_1.0.safetensors"
    write_skeleton(single, _sdxl_single_file_tensors())
    base = load_base(single)
    assert base.layout == "sd-single-file"
    report = validate(adapter, base)
    assert report.ok and report.matched == 8, report.problems
    match = match_layers(adapter, base)
    refs = {adapter.layers[t].source_name: ref for t, ref in match.refs.items()}
    v = refs["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"]
    assert v.weight == "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert v.rows == (2560, 3840) and v.bias == "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"
    assert refs["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].weight == \
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert refs["lora_te1_text_model_encoder_layers_11_self_attn_q_proj"].weight == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight"
    # and SD 1.5 is the wrong base
    wrong = validate(adapter, load_manifest("sd-1.5"))
    assert not wrong.ok and "sdxl" in wrong.suggestions


def test_open_clip_aliases_agree_with_diffusers_converter():
    """Row blocks of OpenCLIP's in_proj, as diffusers' own converter splits them (real values)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from lorahub.base import BaseModel, BaseTensor
    from lorahub.names import base_index

    d, prefix = 8, "conditioner.embedders.1.model."
    torch.manual_seed(0)
    checkpoint = {prefix + "token_embedding.weight": torch.randn(50, d), prefix + "positional_embedding": torch.randn(77, d),
                  prefix + "ln_final.weight": torch.randn(d), prefix + "ln_final.bias": torch.randn(d)}
    for i in range(2):
        block = f"{prefix}transformer.resblocks.{i}."
        checkpoint.update({block + "attn.in_proj_weight": torch.randn(3 * d, d), block + "attn.in_proj_bias": torch.randn(3 * d),
                           block + "attn.out_proj.weight": torch.randn(d, d), block + "ln_1.weight": torch.randn(d),
                           block + "ln_2.weight": torch.randn(d), block + "mlp.c_fc.weight": torch.randn(4 * d, d),
                           block + "mlp.c_proj.weight": torch.randn(d, 4 * d)})
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(4, 4, 3, 3)
    converted = convert_open_clip_checkpoint(types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=d)),
                                             checkpoint, prefix=prefix)
    base = BaseModel(source="mem", name=None, layout="sd-single-file",
                     tensors={k: BaseTensor(k, tuple(v.shape), "F32", "x") for k, v in checkpoint.items()})
    index = base_index(base)
    checked = 0
    for key, value in converted.items():
        module, _, param = key.rpartition(".")
        ref = index.modules.get("text_encoder_2." + module)
        if ref is None or param not in ("weight", "bias"):
            continue
        source = checkpoint[ref.weight if param == "weight" else ref.bias]
        if ref.rows:
            source = source[ref.rows[0]:ref.rows[1]]
        assert torch.equal(source, value), key
        checked += 1
    assert checked >= 2 * 9  # q/k/v weights and biases, out_proj, fc1, fc2, norms per layer


# ----------------------------------------------------------------------------------------------
# the Hub


def test_validate_against_a_hub_base_reads_headers_only(hub_server, hub_env, tiny_llama_sharded_dir, peft_lora_dir,
                                                        peft_wide_dir):
    repo_id = hub_server.new_repo_id("alice", "tiny-llama")
    files = {str(p.relative_to(tiny_llama_sharded_dir)): p for p in tiny_llama_sharded_dir.iterdir() if p.is_file()}
    hub_server.seed_repo(repo_id, files)
    hub_server.reset_stats()
    result = hub_env.run("validate", peft_lora_dir, "--base", repo_id, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(result.stdout)
    assert payload["ok"] and payload["base"] == repo_id and payload["matched"] == 14
    served = hub_server.stats.bytes_served
    shards = [p for p in tiny_llama_sharded_dir.glob("*.safetensors")]
    assert len(shards) >= 3
    for shard in shards:
        assert served[(repo_id, shard.name)] == 8 + header_len(shard), shard.name
    assert sum(n for (r, _), n in served.items() if r == repo_id) < sum(p.stat().st_size for p in shards) / 10
    result = hub_env.run("validate", peft_wide_dir, "--base", f"hf://{repo_id}@main")
    assert result.returncode == 1 and "does not fit" in result.stdout and "hidden size 96" in result.stdout


def test_lycoris_modules_are_checked_for_existence(tiny_unet_dir):
    base = load_base(tiny_unet_dir)
    adapter = adapter_of()
    adapter.other_modules = {"unet.down_blocks.0.attentions.0.proj_in": "loha"}
    report = validate(adapter, base)
    assert report.ok and any("LyCORIS loha" in w for w in report.warnings)
    adapter.other_modules["unet.down_blocks.9.attentions.0.proj_in"] = "lokr"
    report = validate(adapter, base)
    assert not report.ok and report.errors[0].module == "unet.down_blocks.9.attentions.0.proj_in"


def test_adapter_directory_with_a_config_is_not_a_base(peft_lora_dir, tmp_path):
    fake = tmp_path / "adapter-with-config"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    (fake / "adapter_model.safetensors").write_bytes((peft_lora_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(Exception, match="LoRA adapter, not a base model"):
        load_base(fake)
