"""Real adapters made by the real peers (transformers, PEFT, diffusers) on tiny models.

This is a pytest plugin (listed in ``tests/conftest.py``) and also a plain module: every fixture is
backed by a ``make_*`` function that can be called from a script, and :func:`build_all` builds the
whole set into one directory.  Nothing here reaches the network; all models are built from configs.
transformers / peft / diffusers are imported lazily (inside functions), so importing this module does
not import ``huggingface_hub`` before ``fixtures_hub`` has patched it.

All fixtures are **session-scoped**, built once under ``tmp_path_factory`` (fixture ``models_root``)
and return a ``pathlib.Path``.  A ``make_*`` call is idempotent: it skips work when the sibling
marker ``<dir>.built`` exists, so output directories hold only what the peers wrote.  Everything is seeded (``torch.manual_seed``) so the files are bit-identical between
runs.  LoRA ``B`` factors are random and non-zero (PEFT initialises ``B = 0``, which would make every
delta zero).

Base models
-----------
``tiny_llama_dir``
    ``LlamaForCausalLM`` (hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, vocab 128,
    untied embeddings), fp32, ``save_pretrained`` → ``config.json``, ``generation_config.json``,
    ``model.safetensors`` and a non-weight ``tokenizer_config.json`` (``{}``).
``tiny_llama_sharded_dir``
    The same weights saved with a small ``max_shard_size`` → ≥ 3 ``model-0000x-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json``.
``tiny_llama_bf16_dir``
    The same weights in bfloat16 (``config.json`` says ``bfloat16``).
``wide_llama_dir``
    Same config but hidden 96 / intermediate 192 (shape mismatch against ``tiny_llama_dir``).
``tiny_gpt2_dir``
    ``GPT2LMHeadModel`` (n_embd 64, 2 layers, 4 heads, vocab 128, n_positions 64; tied lm_head).
``tiny_unet_dir``
    Diffusers pipeline layout: ``model_index.json`` at the top and ``unet/config.json`` +
    ``unet/diffusion_pytorch_model.safetensors`` of a tiny ``UNet2DConditionModel``
    (block_out_channels (32, 64), 1 layer per block, cross-attention dim 32).

PEFT adapters (directories with ``adapter_config.json`` + ``adapter_model.safetensors``; the config's
``base_model_name_or_path`` is the base directory's path as a string)
--------------------------------------------------------------------------------------------------
``peft_lora_dir``
    r=8, alpha=16, targets q,k,v,o,gate,up,down_proj on ``tiny_llama_dir``.
``peft_rslora_dir``
    rsLoRA, r=8, alpha=16, ``rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 12}``,
    ``alpha_pattern={"v_proj": 32}``, targets q,k,v,o,down_proj on ``tiny_llama_dir``.
``peft_dora_dir``
    DoRA, r=4, alpha=8, targets q_proj,v_proj; magnitudes perturbed (× (1 + 0.1·randn)), so they
    differ from the row norms of ``W + s·B·A``.  On disk: ``<p>.lora_magnitude_vector``.
``peft_embed_dir``
    r=8, alpha=16, targets ``embed_tokens`` (``<p>.lora_embedding_A`` / ``lora_embedding_B``) and
    ``q_proj``; ``modules_to_save=["lm_head"]`` with a perturbed copy (``base_model.model.lm_head.weight``).
    PEFT (save_embedding_layers="auto") also writes the *unchanged* full base embedding as
    ``base_model.model.model.embed_tokens.base_layer.weight`` because the embedding is targeted.
``peft_gpt2_dir``
    r=8, alpha=8, ``fan_in_fan_out=True``, targets c_attn, c_proj, c_fc on ``tiny_gpt2_dir``
    (GPT-2 ``Conv1D``: weight is ``(in, out)``, ΔW = s·(B·A)ᵀ).
``peft_wide_dir``
    r=8, alpha=16, targets q,k,v,o_proj on ``wide_llama_dir`` (shapes mismatch ``tiny_llama_dir``).

kohya file
----------
``kohya_unet_file``
    ``Path`` to ``lora_unet.safetensors``: kohya keys ``lora_unet_<path>.lora_down.weight`` /
    ``.lora_up.weight`` / ``.alpha`` for the UNet's to_q,to_k,to_v,to_out.0 (Linear), proj_in /
    proj_out (1×1 Conv2d), ff.net.0.proj (Linear) and resnets conv1/conv2 (3×3 Conv2d); r=4, every
    ``.alpha`` is a 0-d float32 tensor equal to 2.0 (≠ rank, so scale = 0.5).  Made by PEFT +
    ``diffusers.utils.convert_state_dict_to_kohya`` (which writes alpha = rank as an int64 tensor; we
    overwrite it).  ``__metadata__`` carries ``ss_network_module``, ``ss_network_dim`` ("4"),
    ``ss_network_alpha`` ("2.0"), ``ss_base_model_version`` ("sd_v1"), ``ss_output_name``,
    ``ss_v2`` ("False"), ``ss_network_args`` ("{}").

Plain helpers (not fixtures)
----------------------------
``peft_merged_state_dict(base_dir, adapter_dir, model_cls="llama"|"gpt2", dtype=torch.float32)``
    Reference merge by PEFT: ``PeftModel.from_pretrained(...).merge_and_unload().state_dict()``
    (cloned tensors, base-model key names such as ``model.layers.0.self_attn.q_proj.weight``).
``reference_fused_unet_state_dict(unet_dir, kohya_file)``
    Reference merge by diffusers: loads ``unet_dir/unet``, converts the kohya file with diffusers'
    own loader (``StableDiffusionLoraLoaderMixin.lora_state_dict`` → network alphas), loads it with
    ``UNet2DConditionModel.load_lora_adapter``, ``fuse_lora()``, and returns the state dict under the
    saved UNet's own key names.
``load_file_state(path)``
    ``safetensors.torch.load_file`` of a file, or of every ``*.safetensors`` in a directory (merged).
``load_file_metadata(path)``
    The ``__metadata__`` dict of a safetensors file.
``build_all(root)``
    Builds everything under ``root`` and returns ``{fixture_name: Path}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KOHYA_RANK = 4
KOHYA_ALPHA = 2.0
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "conv1", "conv2"]

_BASE_SEED = 1234
_LORA_SEED = 4321


# ----------------------------------------------------------------------------------------------
# small helpers


def _done(path: Path) -> bool:
    # the marker lives beside the directory, so the directory holds only what the peer wrote
    return path.with_name(path.name + ".built").exists()


def _mark(path: Path) -> Path:
    path.with_name(path.name + ".built").write_text("ok\n")
    return path


def load_file_state(path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, or every ``*.safetensors`` file of a directory, into one dict."""
    path = Path(path)
    if path.is_dir():
        out: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    return load_file(str(path))


def load_file_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _randomize_lora(model: torch.nn.Module, seed: int = _LORA_SEED, std: float = 0.1) -> None:
    """Fill every LoRA factor with seeded random values; perturb DoRA magnitudes and saved copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
            elif any(t in name for t in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)


# ----------------------------------------------------------------------------------------------
# base models


def _llama_config(hidden: int = 64, intermediate: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def _build_llama(hidden: int = 64, intermediate: int = 128):
    from transformers import LlamaForCausalLM

    torch.manual_seed(_BASE_SEED)
    model = LlamaForCausalLM(_llama_config(hidden, intermediate))
    return model.eval()


def _save_llama(model, out: Path, **kwargs) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), **kwargs)
    (out / "tokenizer_config.json").write_text("{}\n")
    return _mark(out)


def make_tiny_llama(out: Path) -> Path:
    out = Path(out)
    if not _done(out):
        _save_llama(_build_llama(), out)
    return out


def make_tiny_llama_sharded(out: Path) -> Path:
    out = Path(out)
    if not _done(out):
        # whole model is ~360 kB in fp32; the largest tensor (gate/up/down, 32 kB) fits in a shard.
        _save_llama(_build_llama(), out, max_shard_size="100KB")
    return out


def make_tiny_llama_bf16(out: Path) -> Path:
    out = Path(out)
    if not _done(out):
        _save_llama(_build_llama().to(torch.bfloat16), out)
    return out


def make_wide_llama(out: Path) -> Path:
    out = Path(out)
    if not _done(out):
        _save_llama(_build_llama(96, 192), out)
    return out


def make_tiny_gpt2(out: Path) -> Path:
    out = Path(out)
    if not _done(out):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(_BASE_SEED)
        cfg = GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=127, eos_token_id=127
        )
        model = GPT2LMHeadModel(cfg).eval()
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        _mark(out)
    return out


def _unet_config() -> dict:
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=16,
        in_channels=4,
        out_channels=4,
    )


def make_tiny_unet(out: Path) -> Path:
    out = Path(out)
    if not _done(out):
        import diffusers
        from diffusers import UNet2DConditionModel

        torch.manual_seed(_BASE_SEED)
        unet = UNet2DConditionModel(**_unet_config()).eval()
        out.mkdir(parents=True, exist_ok=True)
        unet.save_pretrained(str(out / "unet"))
        model_index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": [None, None],
            "text_encoder": [None, None],
            "tokenizer": [None, None],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": [None, None],
        }
        (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
        _mark(out)
    return out


# ----------------------------------------------------------------------------------------------
# PEFT adapters


def _load_base(base_dir: Path, model_cls: str = "llama", dtype=torch.float32):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cls = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}[model_cls]
    model = cls.from_pretrained(str(base_dir), dtype=dtype)
    return model.eval()


def _make_peft(out: Path, base_dir: Path, model_cls: str = "llama", **lora_kwargs) -> Path:
    import warnings

    from peft import LoraConfig, get_peft_model

    out = Path(out)
    if _done(out):
        return out
    base = _load_base(base_dir, model_cls)
    assert base.name_or_path == str(base_dir)
    torch.manual_seed(_LORA_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(**lora_kwargs))
        _randomize_lora(model)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir), cfg["base_model_name_or_path"]
    return _mark(out)


def make_peft_lora(out: Path, base_dir: Path) -> Path:
    return _make_peft(out, base_dir, r=8, lora_alpha=16, target_modules=list(LLAMA_TARGETS))


def make_peft_rslora(out: Path, base_dir: Path) -> Path:
    return _make_peft(
        out,
        base_dir,
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 12},
        alpha_pattern={"v_proj": 32},
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    )


def make_peft_dora(out: Path, base_dir: Path) -> Path:
    return _make_peft(out, base_dir, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])


def make_peft_embed(out: Path, base_dir: Path) -> Path:
    return _make_peft(
        out, base_dir, r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]
    )


def make_peft_gpt2(out: Path, base_dir: Path) -> Path:
    return _make_peft(
        out, base_dir, "gpt2", r=8, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]
    )


def make_peft_wide(out: Path, base_dir: Path) -> Path:
    return _make_peft(out, base_dir, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def peft_merged_state_dict(
    base_dir: Path, adapter_dir: Path, model_cls: str = "llama", dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """PEFT's own merge: load base, ``PeftModel.from_pretrained``, ``merge_and_unload``, state dict."""
    import warnings

    from peft import PeftModel

    base = _load_base(Path(base_dir), model_cls, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# kohya file for the UNet


def make_kohya_unet(out_file: Path, unet_dir: Path) -> Path:
    """kohya LoRA (``lora_unet_*``) for ``unet_dir/unet`` produced with diffusers' converter."""
    out_file = Path(out_file)
    if out_file.exists():
        return out_file
    import warnings

    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), subfolder="unet").eval()
    torch.manual_seed(_LORA_SEED)
    cfg = LoraConfig(r=KOHYA_RANK, lora_alpha=KOHYA_ALPHA, target_modules=list(UNET_LORA_TARGETS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = inject_adapter_in_model(cfg, unet)
    _randomize_lora(unet)
    peft_sd = get_peft_model_state_dict(unet)
    peft_sd = {f"unet.{k}": v.detach().clone().contiguous() for k, v in peft_sd.items()}
    kohya_sd = convert_state_dict_to_kohya(peft_sd)
    for k in list(kohya_sd):
        if k.endswith(".alpha"):
            # the converter writes int64 alpha = rank; a trained kohya file has the real network_alpha
            kohya_sd[k] = torch.tensor(KOHYA_ALPHA, dtype=torch.float32)
        else:
            kohya_sd[k] = kohya_sd[k].contiguous()
    metadata = {
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(KOHYA_RANK),
        "ss_network_alpha": str(KOHYA_ALPHA),
        "ss_network_args": json.dumps({"conv_dim": str(KOHYA_RANK), "conv_alpha": str(KOHYA_ALPHA)}),
        "ss_output_name": "tiny_unet_lora",
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_sd, str(out_file), metadata=metadata)
    return out_file


def reference_fused_unet_state_dict(unet_dir: Path, kohya_file: Path) -> dict[str, torch.Tensor]:
    """diffusers' own kohya load + fuse, returned under the saved UNet's key names."""
    import warnings

    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), subfolder="unet").eval()
    expected_keys = set(unet.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # as `pipe.load_lora_weights` does: kohya files give network alphas, PEFT-style files their
        # LoraConfig in the `lora_adapter_metadata` JSON
        state_dict, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(kohya_file), return_lora_metadata=True)
        unet.load_lora_adapter(state_dict, prefix="unet", network_alphas=network_alphas,
                               metadata=metadata or None, adapter_name="kohya")
        unet.fuse_lora(lora_scale=1.0)
    out: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone()
    missing = expected_keys.symmetric_difference(out)
    assert not missing, f"key mismatch after fuse: {sorted(missing)[:5]}"
    return out


# ----------------------------------------------------------------------------------------------
# everything at once


def build_all(root: Path) -> dict[str, Path]:
    root = Path(root)
    p: dict[str, Path] = {}
    p["tiny_llama_dir"] = make_tiny_llama(root / "tiny_llama")
    p["tiny_llama_sharded_dir"] = make_tiny_llama_sharded(root / "tiny_llama_sharded")
    p["tiny_llama_bf16_dir"] = make_tiny_llama_bf16(root / "tiny_llama_bf16")
    p["wide_llama_dir"] = make_wide_llama(root / "wide_llama")
    p["tiny_gpt2_dir"] = make_tiny_gpt2(root / "tiny_gpt2")
    p["tiny_unet_dir"] = make_tiny_unet(root / "tiny_unet")
    p["peft_lora_dir"] = make_peft_lora(root / "peft_lora", p["tiny_llama_dir"])
    p["peft_rslora_dir"] = make_peft_rslora(root / "peft_rslora", p["tiny_llama_dir"])
    p["peft_dora_dir"] = make_peft_dora(root / "peft_dora", p["tiny_llama_dir"])
    p["peft_embed_dir"] = make_peft_embed(root / "peft_embed", p["tiny_llama_dir"])
    p["peft_gpt2_dir"] = make_peft_gpt2(root / "peft_gpt2", p["tiny_gpt2_dir"])
    p["peft_wide_dir"] = make_peft_wide(root / "peft_wide", p["wide_llama_dir"])
    p["kohya_unet_file"] = make_kohya_unet(root / "kohya" / "lora_unet.safetensors", p["tiny_unet_dir"])
    return p


# ----------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama_dir(models_root) -> Path:
    return make_tiny_llama(models_root / "tiny_llama")


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(models_root) -> Path:
    return make_tiny_llama_sharded(models_root / "tiny_llama_sharded")


@pytest.fixture(scope="session")
def tiny_llama_bf16_dir(models_root) -> Path:
    return make_tiny_llama_bf16(models_root / "tiny_llama_bf16")


@pytest.fixture(scope="session")
def wide_llama_dir(models_root) -> Path:
    return make_wide_llama(models_root / "wide_llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(models_root) -> Path:
    return make_tiny_gpt2(models_root / "tiny_gpt2")


@pytest.fixture(scope="session")
def tiny_unet_dir(models_root) -> Path:
    return make_tiny_unet(models_root / "tiny_unet")


@pytest.fixture(scope="session")
def peft_lora_dir(models_root, tiny_llama_dir) -> Path:
    return make_peft_lora(models_root / "peft_lora", tiny_llama_dir)


@pytest.fixture(scope="session")
def peft_rslora_dir(models_root, tiny_llama_dir) -> Path:
    return make_peft_rslora(models_root / "peft_rslora", tiny_llama_dir)


@pytest.fixture(scope="session")
def peft_dora_dir(models_root, tiny_llama_dir) -> Path:
    return make_peft_dora(models_root / "peft_dora", tiny_llama_dir)


@pytest.fixture(scope="session")
def peft_embed_dir(models_root, tiny_llama_dir) -> Path:
    return make_peft_embed(models_root / "peft_embed", tiny_llama_dir)


@pytest.fixture(scope="session")
def peft_gpt2_dir(models_root, tiny_gpt2_dir) -> Path:
    return make_peft_gpt2(models_root / "peft_gpt2", tiny_gpt2_dir)


@pytest.fixture(scope="session")
def peft_wide_dir(models_root, wide_llama_dir) -> Path:
    return make_peft_wide(models_root / "peft_wide", wide_llama_dir)


@pytest.fixture(scope="session")
def kohya_unet_file(models_root, tiny_unet_dir) -> Path:
    return make_kohya_unet(models_root / "kohya" / "lora_unet.safetensors", tiny_unet_dir)
