"""BaseModel from headers only: local directories, sharded models, diffusers layouts, single files, the
registry, and Hub repos (Range requests against the test Hub server)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorahub import storage
from lorahub.base import BaseModel, load_base
from lorahub.errors import LorahubError
from lorahub.hub import parse_repo_spec
from lorahub.names import diffusers_to_ldm_unet

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}


# ----------------------------------------------------------------------------------------------
# helpers shared with test_validate / test_registry


def write_skeleton(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]], data: str = "none") -> int:
    """A safetensors file with a real header and no tensor data.

    data="none": the file ends after the header (the data section is absent);
    data="sparse": the file has its full size but the data was never written (a sparse file).
    Returns the header length N (the file starts with 8 + N header bytes).
    """
    header: dict[str, dict] = {}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        size = ITEMSIZE[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        if data == "sparse":
            handle.truncate(8 + len(raw) + offset)
    return len(raw)


def header_len(path: Path) -> int:
    with open(path, "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def sd_single_file_from_unet(unet_dir: Path, out: Path) -> Path:
    """An SD 1.x-style single-file checkpoint (LDM keys) holding the diffusers UNet's tensors."""
    from safetensors.torch import load_file

    config = json.loads((unet_dir / "config.json").read_text())
    state = load_file(str(unet_dir / "diffusion_pytorch_model.safetensors"))
    layers = config["layers_per_block"]
    up_attn = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    ckpt = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        ldm = diffusers_to_ldm_unet(module, layers, up_attn)
        assert ldm is not None, key
        ckpt[f"model.diffusion_model.{ldm}.{param}"] = value.contiguous()
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    save_file(ckpt, str(out))
    return out


# ----------------------------------------------------------------------------------------------
# local directories and files


def test_transformers_dir(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    assert base.layout == "transformers"
    assert base.root == tiny_llama_dir
    assert base.files == ["model.safetensors"]
    assert base.config["hidden_size"] == 64
    want = file_shapes(tiny_llama_dir / "model.safetensors")
    assert {n: t.shape for n, t in base.tensors.items()} == want
    q = base.get("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (64, 64) and q.dtype == "F32" and q.file == "model.safetensors"
    assert base.path_of(q.name) == tiny_llama_dir / "model.safetensors"
    assert base.complete


def test_sharded_dir_maps_every_tensor_to_its_shard(tiny_llama_dir, tiny_llama_sharded_dir):
    base = load_base(tiny_llama_sharded_dir)
    index = json.loads((tiny_llama_sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert {n: t.file for n, t in base.tensors.items()} == index["weight_map"]
    single = load_base(tiny_llama_dir)
    assert {n: t.shape for n, t in base.tensors.items()} == {n: t.shape for n, t in single.tensors.items()}
    assert sorted(base.files) == sorted(set(index["weight_map"].values()))


def test_diffusers_dir_prefixes_component_names(tiny_unet_dir):
    base = load_base(tiny_unet_dir)
    assert base.layout == "diffusers"
    assert base.components == ["unet"]
    want = file_shapes(tiny_unet_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert {n: t.shape for n, t in base.tensors.items()} == {f"unet.{k}": v for k, v in want.items()}
    assert {t.file for t in base.tensors.values()} == {"unet/diffusion_pytorch_model.safetensors"}
    assert base.config["unet"]["layers_per_block"] == 1
    # a lone diffusers model folder is named after its class, so names still match LoRA targets
    lone = load_base(tiny_unet_dir / "unet")
    assert set(lone.tensors) == set(base.tensors)
    assert lone.get("unet.conv_in.weight").file == "diffusion_pytorch_model.safetensors"


def test_diffusers_dir_with_several_components(tmp_path):
    root = tmp_path / "pipe"
    write_skeleton(root / "unet" / "diffusion_pytorch_model.safetensors", {"conv_in.weight": ((8, 4, 3, 3), "F16")})
    write_skeleton(root / "text_encoder" / "model.safetensors",
                   {"text_model.encoder.layers.0.self_attn.q_proj.weight": ((8, 8), "F16")})
    # sharded text_encoder_2 with its own index
    write_skeleton(root / "text_encoder_2" / "model-00001-of-00002.safetensors", {"a.weight": ((2, 2), "F16")})
    write_skeleton(root / "text_encoder_2" / "model-00002-of-00002.safetensors", {"b.weight": ((3, 2), "F16")})
    (root / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    # an fp16 variant next to the full-precision file is ignored
    write_skeleton(root / "unet" / "diffusion_pytorch_model.fp16.safetensors", {"other.weight": ((1, 1), "F16")})
    (root / "model_index.json").write_text("{}")
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    base = load_base(root)
    assert base.layout == "diffusers"
    assert base.components == ["text_encoder", "text_encoder_2", "unet"]
    assert base.get("text_encoder_2.b.weight").file == "text_encoder_2/model-00002-of-00002.safetensors"
    assert base.get("unet.conv_in.weight").shape == (8, 4, 3, 3)
    assert "unet.other.weight" not in base
    assert base.config == {"unet": {"_class_name": "UNet2DConditionModel"}}
    assert not base.complete  # skeleton files hold no data


def test_sd_single_file(tiny_unet_dir, tmp_path):
    path = sd_single_file_from_unet(tiny_unet_dir / "unet", tmp_path / "tiny-sd.safetensors")
    base = load_base(path)
    assert base.layout == "sd-single-file"
    assert base.files == ["tiny-sd.safetensors"] and base.root == tmp_path
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in base
    assert base.get("model.diffusion_model.input_blocks.1.1.proj_in.weight").file == "tiny-sd.safetensors"


def test_other_single_file_and_model_file_with_config(tiny_llama_dir, tmp_path):
    base = load_base(tiny_llama_dir / "model.safetensors")
    assert base.layout == "transformers" and base.config["hidden_size"] == 64  # config.json beside it
    lone = tmp_path / "weights.safetensors"
    save_file({"layer.weight": torch.zeros(2, 3)}, str(lone))
    base = load_base(lone)
    assert base.layout == "single-file" and base.config is None
    assert base.get("layer.weight").shape == (2, 3)


def test_refuses_adapters_pickles_and_empty_dirs(peft_lora_dir, kohya_unet_file, tmp_path):
    with pytest.raises(LorahubError, match="LoRA adapter, not a base model"):
        load_base(peft_lora_dir)
    with pytest.raises(LorahubError, match="LoRA adapter, not a base model"):
        load_base(kohya_unet_file)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(LorahubError, match="header-only"):
        load_base(pickled)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LorahubError, match="no model weights"):
        load_base(empty)
    with pytest.raises(LorahubError, match="no such file or directory, registry name or Hub repo"):
        load_base(str(tmp_path / "does-not-exist"))


def test_truncated_and_sparse_bases_are_read_from_headers(tmp_path):
    tensors = {"model.layers.0.mlp.up_proj.weight": ((512, 256), "BF16"), "model.norm.weight": ((256,), "BF16")}
    n = write_skeleton(tmp_path / "a" / "model.safetensors", tensors, data="none")
    (tmp_path / "a" / "config.json").write_text("{}")
    write_skeleton(tmp_path / "b" / "model.safetensors", tensors, data="sparse")
    (tmp_path / "b" / "config.json").write_text("{}")
    assert (tmp_path / "a" / "model.safetensors").stat().st_size == 8 + n
    with pytest.raises(LorahubError, match="truncated"):  # the default still refuses truncated files
        storage.read_header(tmp_path / "a" / "model.safetensors")
    truncated, sparse = load_base(tmp_path / "a"), load_base(tmp_path / "b")
    assert not truncated.complete and sparse.complete
    assert {k: v.shape for k, v in truncated.tensors.items()} == {k: v[0] for k, v in tensors.items()}
    assert {k: v.shape for k, v in sparse.tensors.items()} == {k: v[0] for k, v in tensors.items()}


def test_registry_name(monkeypatch):
    import lorahub.base as base_module

    def no_hub(*args, **kwargs):  # a registry name must never touch the network
        raise AssertionError("Hub contacted")

    monkeypatch.setattr(base_module, "load_hub_base", no_hub)
    base = load_base("llama-3-8b")
    assert base.name == "llama-3-8b" and base.repo_id == "meta-llama/Meta-Llama-3-8B"
    assert base.layout == "transformers" and base.files == [] and base.root is None
    assert base.shape("model.layers.31.self_attn.k_proj.weight") == (1024, 4096)
    assert load_base("LLAMA3-8B").name == "llama-3-8b"  # aliases, any case
    assert load_base("registry:sdxl").layout == "diffusers"


@pytest.mark.parametrize("spec, expected", [
    ("meta-llama/Meta-Llama-3-8B", ("meta-llama/Meta-Llama-3-8B", None, None)),
    ("alice/model@v1.0", ("alice/model", "v1.0", None)),
    ("hf://alice/model", ("alice/model", None, None)),
    ("hf://alice/model@main/unet", ("alice/model", "main", "unet")),
    ("hf://alice/model/sd.safetensors", ("alice/model", None, "sd.safetensors")),
    ("alice/model/unet", (None, None, None)),  # a relative path that does not exist, not a repo
    ("llama", (None, None, None)),
    ("alice/", (None, None, None)),
    ("alice/model@", (None, None, None)),
])
def test_parse_repo_spec(spec, expected):
    assert parse_repo_spec(spec) == expected


def test_manifest_round_trip(tiny_unet_dir):
    base = load_base(tiny_unet_dir)
    again = BaseModel.from_manifest(json.loads(json.dumps(base.to_manifest("tiny"))))
    assert again.layout == "diffusers" and again.name == "tiny"
    assert {n: (t.shape, t.dtype) for n, t in again.tensors.items()} == \
        {n: (t.shape, t.dtype) for n, t in base.tensors.items()}
    assert again.config == base.config


# ----------------------------------------------------------------------------------------------
# the Hub (test server): headers through Range requests, never the weights


def _seed_dir(hub_server, repo_id: str, folder: Path, tag: str | None = None) -> str:
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    return hub_server.seed_repo(repo_id, files, tag=tag)


def _assert_headers_only(hub_server, repo_id: str, folder: Path) -> None:
    served = hub_server.stats.bytes_served
    for path in folder.rglob("*.safetensors"):
        rel = str(path.relative_to(folder))
        assert served[(repo_id, rel)] == 8 + header_len(path), rel
        assert served[(repo_id, rel)] < path.stat().st_size


def test_hub_single_and_sharded(hub_server, tiny_llama_dir, tiny_llama_sharded_dir):
    for folder in (tiny_llama_dir, tiny_llama_sharded_dir):
        repo_id = hub_server.new_repo_id("alice", "base")
        _seed_dir(hub_server, repo_id, folder)
        hub_server.reset_stats()
        base = load_base(repo_id)
        local = load_base(folder)
        assert base.layout == "transformers" and base.name == base.repo_id == repo_id
        assert len(base.revision) == 40 and base.root is None
        assert {n: (t.shape, t.dtype, t.file) for n, t in base.tensors.items()} == \
            {n: (t.shape, t.dtype, t.file) for n, t in local.tensors.items()}
        assert base.config["hidden_size"] == 64
        _assert_headers_only(hub_server, repo_id, folder)
        assert all(r["status"] == 206 for r in hub_server.stats.ranges)


def test_hub_diffusers_revision_and_subpaths(hub_server, tiny_unet_dir, tmp_path):
    repo_id = hub_server.new_repo_id("alice", "unet")
    first = _seed_dir(hub_server, repo_id, tiny_unet_dir, tag="v1")
    single = sd_single_file_from_unet(tiny_unet_dir / "unet", tmp_path / "tiny-sd.safetensors")
    hub_server.seed_repo(repo_id, {"tiny-sd.safetensors": single})
    hub_server.reset_stats()
    base = load_base(f"hf://{repo_id}@v1")
    assert base.layout == "diffusers" and base.revision == first
    assert base.get("unet.conv_in.weight").file == "unet/diffusion_pytorch_model.safetensors"
    _assert_headers_only(hub_server, repo_id, tiny_unet_dir)
    assert load_base(repo_id, revision=first).revision == first
    sub = load_base(f"hf://{repo_id}/unet")
    assert set(sub.tensors) == set(base.tensors)
    assert sub.get("unet.conv_in.weight").file == "unet/diffusion_pytorch_model.safetensors"
    hub_server.reset_stats()
    sd = load_base(f"hf://{repo_id}/tiny-sd.safetensors")
    assert sd.layout == "sd-single-file"
    assert hub_server.stats.bytes_served[(repo_id, "tiny-sd.safetensors")] == 8 + header_len(single)


def test_hub_errors_and_offline_fallback(hub_server, monkeypatch):
    with pytest.raises(LorahubError, match="not found"):
        load_base("alice/no-such-repo-anywhere")
    repo_id = hub_server.new_repo_id("alice", "empty")
    hub_server.seed_repo(repo_id, {"README.md": "hi"})
    with pytest.raises(LorahubError, match="no model weights"):
        load_base(repo_id)
    # the Hub is down: a repo the registry describes falls back to its manifest (with a warning)
    hub_server.fail("500")
    try:
        base = load_base("openai-community/gpt2")
        assert base.name == "gpt2" and base.layout == "transformers"
        with pytest.raises(LorahubError, match="cannot reach the Hub"):
            load_base("alice/unknown-model")
        with pytest.raises(LorahubError, match="cannot reach the Hub"):
            load_base("openai-community/gpt2", offline_fallback=False)
    finally:
        hub_server.heal()
