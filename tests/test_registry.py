"""The shape registry: built-in manifests (and that they match the build script), `lorahub registry
list/show/add/remove`, user manifests, and that the manifests ship inside the wheel."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from cli_runner import run_cli
from test_base import header_len

from lorahub import registry
from lorahub.base import load_base

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ["llama-2-7b", "llama-3-8b", "llama-3.1-70b", "mistral-7b", "mixtral-8x7b", "qwen2.5-7b", "gemma-2-9b",
            "phi-3-mini", "gpt2", "sd-1.5", "sdxl", "flux.1-dev", "flux.1-schnell", "sd3.5-large", "sd3.5-medium",
            "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "qwen-image", "hunyuanvideo", "ltx-video"]


def _build_script():
    spec = importlib.util.spec_from_file_location("build_manifests", ROOT / "registry" / "build_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def user_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ----------------------------------------------------------------------------------------------
# built-in manifests


def test_required_manifests_with_sources():
    refs = {ref.name: ref for ref in registry.list_manifests()}
    assert set(REQUIRED) <= set(refs)
    for name in REQUIRED:
        ref = refs[name]
        assert ref.builtin and ref.path.name == f"{name}.json"
        sources = ref.source.values() if isinstance(ref.source, dict) else [ref.source]
        assert all(re.fullmatch(rf"https://huggingface.co/{re.escape(ref.repo_id)}/blob/main/(\w+/)?config.json", s)
                   for s in sources), ref.source
        manifest = json.loads(ref.path.read_text())
        assert manifest["config"] and manifest["params"] == registry.load_manifest(ref).num_params


@pytest.mark.parametrize("name, tensor, shape", [
    ("llama-2-7b", "model.layers.31.self_attn.k_proj.weight", (4096, 4096)),
    ("llama-3-8b", "model.layers.31.self_attn.k_proj.weight", (1024, 4096)),
    ("llama-3-8b", "lm_head.weight", (128256, 4096)),
    ("llama-3.1-70b", "model.layers.79.mlp.down_proj.weight", (8192, 28672)),
    ("mistral-7b", "model.layers.0.mlp.gate_proj.weight", (14336, 4096)),
    ("mixtral-8x7b", "model.layers.31.block_sparse_moe.experts.7.w1.weight", (14336, 4096)),  # per-expert, as on disk
    ("mixtral-8x7b", "model.layers.0.block_sparse_moe.gate.weight", (8, 4096)),
    ("qwen2.5-7b", "model.layers.0.self_attn.q_proj.bias", (3584,)),
    ("gemma-2-9b", "model.layers.41.self_attn.q_proj.weight", (4096, 3584)),
    ("phi-3-mini", "model.layers.0.self_attn.qkv_proj.weight", (9216, 3072)),
    ("gpt2", "transformer.h.0.attn.c_attn.weight", (768, 2304)),  # Conv1D: (in, out)
    ("sd-1.5", "unet.down_blocks.0.attentions.0.proj_in.weight", (320, 320, 1, 1)),
    ("sd-1.5", "text_encoder.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768)),
    ("sdxl", "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
    ("sdxl", "unet.add_embedding.linear_1.weight", (1280, 2816)),
    ("sdxl", "text_encoder_2.text_model.encoder.layers.31.self_attn.q_proj.weight", (1280, 1280)),
    ("sdxl", "text_encoder_2.text_projection.weight", (1280, 1280)),
    ("flux.1-dev", "transformer.single_transformer_blocks.37.proj_mlp.weight", (12288, 3072)),
    ("flux.1-dev", "transformer.transformer_blocks.18.attn.add_q_proj.weight", (3072, 3072)),
    # the diffusion transformers' diffusers folders (issue 12), from their published configs
    ("flux.1-schnell", "transformer.single_transformer_blocks.37.proj_out.weight", (3072, 15360)),
    ("sd3.5-large", "transformer.transformer_blocks.37.norm1_context.linear.weight", (4864, 2432)),
    ("sd3.5-medium", "transformer.transformer_blocks.12.attn2.to_q.weight", (1536, 1536)),
    ("wan2.1-t2v-1.3b", "transformer.blocks.29.ffn.net.0.proj.weight", (8960, 1536)),
    ("wan2.1-t2v-14b", "transformer.blocks.39.attn2.to_k.weight", (5120, 5120)),
    ("qwen-image", "transformer.transformer_blocks.59.img_mod.1.weight", (18432, 3072)),
    ("hunyuanvideo", "transformer.single_transformer_blocks.39.proj_mlp.weight", (12288, 3072)),
    ("ltx-video", "transformer.transformer_blocks.27.attn2.to_k.weight", (2048, 2048)),
])
def test_manifest_shapes(name, tensor, shape):
    assert registry.load_manifest(name).shape(tensor) == shape


def test_tied_and_published_names():
    assert "lm_head.weight" not in registry.load_manifest("gemma-2-9b")  # tied: not in the files
    assert "lm_head.weight" not in registry.load_manifest("gpt2")
    mixtral = registry.load_manifest("mixtral-8x7b")
    assert not any("experts.gate_up_proj" in n for n in mixtral.tensors)  # transformers 5's fused layout
    assert registry.load_manifest("llama-3.1-70b").num_params == 70_553_706_496
    assert registry.load_manifest("sdxl").components == ["text_encoder", "text_encoder_2", "unet"]


@pytest.mark.parametrize("name", REQUIRED)
def test_manifests_match_the_build_script(name):
    """Rebuilding from the script's configs on the meta device gives the committed JSON (no drift)."""
    script = _build_script()
    built = json.loads(registry.dump_manifest(script.build(name)))
    committed = json.loads((ROOT / "registry" / f"{name}.json").read_text())
    assert script.comparable(built) == script.comparable(committed)


def test_lookup_by_alias_case_and_repo():
    assert registry.find_manifest("SDXL").name == "sdxl"
    assert registry.find_manifest("stable-diffusion-xl-base-1.0").name == "sdxl"
    assert registry.find_manifest("meta-llama/Meta-Llama-3-8B").name == "llama-3-8b"
    assert registry.find_manifest("meta-llama/Meta-Llama-3-8B", by_repo_id=False) is None
    assert registry.find_manifest("no-such-model") is None


# ----------------------------------------------------------------------------------------------
# the CLI


def test_registry_list_and_show(user_home):
    result = run_cli("registry", "list")
    assert result.returncode == 0
    for name in REQUIRED:
        assert name in result.stdout
    payload = json.loads(run_cli("registry", "list", "--json").stdout)
    assert {p["name"] for p in payload} >= set(REQUIRED)
    result = run_cli("registry", "show", "llama-3-8b")
    assert result.returncode == 0
    assert "meta-llama/Meta-Llama-3-8B" in result.stdout and "8,030,261,248" in result.stdout
    assert "https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json" in result.stdout
    shown = json.loads(run_cli("registry", "show", "sdxl", "--json", "--tensors").stdout)
    assert shown["components"] == ["text_encoder", "text_encoder_2", "unet"]
    assert shown["tensor_shapes"]["unet.conv_in.weight"] == [[320, 4, 3, 3], "F32"]
    result = run_cli("registry", "show", "nope")
    assert result.returncode == 1 and "no registry manifest" in result.stderr
    # subcommands are not top-level commands (`lorahub list` is the adapter library's, not the registry's)
    for sub in ("show", "add", "remove"):
        assert run_cli(sub, "x").returncode == 2
    from lorahub.cli import cli

    assert cli.commands["list"] is not cli.commands["registry"].commands["list"]


def test_registry_add_local_then_validate_offline(user_home, tiny_llama_sharded_dir, peft_lora_dir, peft_wide_dir):
    result = run_cli("registry", "add", tiny_llama_sharded_dir, "--name", "tiny-llama")
    assert result.returncode == 0, result.stderr
    path = user_home / "registry" / "tiny-llama.json"
    assert path.is_file() and "added tiny-llama" in result.stdout
    manifest = json.loads(path.read_text())
    assert manifest["layout"] == "transformers" and manifest["config"]["hidden_size"] == 64
    assert {n: tuple(e[0]) for n, e in manifest["tensors"].items()} == \
        {n: t.shape for n, t in load_base(tiny_llama_sharded_dir).tensors.items()}
    listed = json.loads(run_cli("registry", "list", "--json").stdout)
    assert {"name": "tiny-llama", "builtin": False}.items() <= next(p for p in listed if p["name"] == "tiny-llama").items()
    assert run_cli("validate", peft_lora_dir, "--base", "tiny-llama").returncode == 0
    assert run_cli("validate", peft_wide_dir, "--base", "tiny-llama").returncode == 1
    # the same name again needs --overwrite; a built-in name too
    again = run_cli("registry", "add", tiny_llama_sharded_dir, "--name", "tiny-llama")
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert run_cli("registry", "add", tiny_llama_sharded_dir, "--name", "tiny-llama", "--overwrite").returncode == 0
    builtin = run_cli("registry", "add", tiny_llama_sharded_dir, "--name", "gpt2")
    assert builtin.returncode == 1 and "built-in" in builtin.stderr
    assert run_cli("registry", "add", tiny_llama_sharded_dir, "--name", "Bad Name!").returncode == 2  # usage
    # remove: yours only
    assert run_cli("registry", "remove", "gpt2").returncode == 1
    assert run_cli("registry", "remove", "tiny-llama").returncode == 0
    assert not path.exists()
    # nothing was ever written into the package
    assert not (ROOT / "registry" / "tiny-llama.json").exists()


def test_registry_add_from_the_hub_reads_headers_only(user_home, hub_server, tiny_unet_dir, kohya_unet_file):
    repo_id = hub_server.new_repo_id("alice", "tiny-sd")
    files = {str(p.relative_to(tiny_unet_dir)): p for p in tiny_unet_dir.rglob("*") if p.is_file()}
    commit = hub_server.seed_repo(repo_id, files)
    hub_server.reset_stats()
    path, base = registry.add(repo_id, "tiny-sd")
    weights = tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert hub_server.stats.bytes_served[(repo_id, "unet/diffusion_pytorch_model.safetensors")] == 8 + header_len(weights)
    manifest = json.loads(path.read_text())
    assert manifest["repo_id"] == repo_id and manifest["revision"] == commit
    assert manifest["layout"] == "diffusers" and "unet.conv_in.weight" in manifest["tensors"]
    result = run_cli("validate", kohya_unet_file, "--base", "tiny-sd")
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# packaging: the manifests ship inside the wheel


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lorahub").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"]["lorahub.registry_data"] == "registry"
    assert "*.json" in config["package-data"]["lorahub.registry_data"]


def test_wheel_ships_the_manifests(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "lorahub", src / "lorahub", ignore=ignore)
    shutil.copytree(ROOT / "registry", src / "registry", ignore=ignore)
    code = ("import sys, setuptools.build_meta as b; sys.stdout.write(b.build_wheel(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = tmp_path / "dist" / result.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in REQUIRED:
        assert f"lorahub/registry_data/{name}.json" in names
    assert "lorahub/registry.py" in names and "lorahub/commands/registry.py" in names
    # installed (unpacked) without the repository around it, the registry finds its manifests
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import lorahub.registry as r, lorahub.base as b; print(r.builtin_dir()); "
            "print(len(r.list_manifests())); print(b.load_base('llama-3-8b').num_params)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(site), "LORAHUB_HOME": str(tmp_path / "home"),
                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    folder, count, params = result.stdout.split()
    assert Path(folder) == site / "lorahub" / "registry_data"
    assert int(count) == len(REQUIRED) and int(params) == 8_030_261_248
    # the README's first command (`pip install . && lorahub demo`) needs the bundled example in the wheel
    examples = ROOT / "lorahub" / "examples"
    shipped = {str(p.relative_to(ROOT)) for p in examples.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped and shipped <= names
    code = (f"import lorahub; assert lorahub.__file__.startswith({str(site)!r}), lorahub.__file__; "
            "from lorahub.cli import main; main(['demo', '--json'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(site), "LORAHUB_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr[-2000:]
    demo = json.loads(result.stdout)
    assert demo["numbers"]["validate_ok"] is True and len(demo["steps"]) >= 7
