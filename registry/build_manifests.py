#!/usr/bin/env python
"""Build the shape manifests in this folder from published architecture configs.

Each model below is its config.json as published on the Hub (the `source` URL), copied here so the
build needs no network. The architecture is instantiated on PyTorch's meta device (no memory, no
weights), and the names, shapes and dtypes of its state dict are written to `<name>.json`, in the
key layout `save_pretrained` writes (tied weights dropped, transformers' load-time renames
reverted — e.g. Mixtral's per-expert `block_sparse_moe.experts.N.w1` rather than fused experts).

    python registry/build_manifests.py               # rebuild every manifest
    python registry/build_manifests.py gpt2 sdxl     # rebuild some
    python registry/build_manifests.py --check       # exit 1 if a committed manifest differs

Adding a model: add an entry to MODELS (kind "causal-lm" with a transformers config, or "diffusers"
with components), run the script, commit the JSON. Needs torch, transformers and (for diffusers
entries) diffusers.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HF = "https://huggingface.co"

_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

CLIP_L = {  # openai/clip-vit-large-patch14 text tower, as shipped in SD 1.x and SDXL text_encoder/
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408,
}

T5_XXL = {  # google/t5-v1_1-xxl encoder, as shipped in FLUX.1 text_encoder_2/ and SD3.5 text_encoder_3/
    "architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True,
    "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32128,
}
CLIP_G = {  # laion CLIP-ViT-bigG text tower with projection, as in SDXL text_encoder_2/ and SD3.5
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0,
    "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1,
    "projection_dim": 1280, "torch_dtype": "float16", "vocab_size": 49408,
}
# the text encoders of FLUX.1 (CLIP-L, T5-XXL) and SD3.5 (CLIP-L and CLIP-G with projection, T5-XXL)
_FLUX_TEXT = {
    "text_encoder": {"class": "CLIPTextModel", "dtype": "BF16", "config": {**CLIP_L, "torch_dtype": "bfloat16"}},
    "text_encoder_2": {"class": "T5EncoderModel", "dtype": "BF16", "config": T5_XXL},
}
_SD3_TEXT = {
    "text_encoder": {"class": "CLIPTextModelWithProjection", "dtype": "F16", "config": {
        **CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "torch_dtype": "float16"}},
    "text_encoder_2": {"class": "CLIPTextModelWithProjection", "dtype": "F16", "config": CLIP_G},
    "text_encoder_3": {"class": "T5EncoderModel", "dtype": "F16", "config": {**T5_XXL, "torch_dtype": "float16"}},
}

MODELS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "repo_id": "meta-llama/Llama-2-7b-hf", "kind": "causal-lm", "aliases": ["llama2-7b"],
        "config": {
            "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
            "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
            "vocab_size": 32000,
        },
    },
    "llama-3-8b": {
        "repo_id": "meta-llama/Meta-Llama-3-8B", "kind": "causal-lm", "aliases": ["llama3-8b", "meta-llama-3-8b"],
        "config": {
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
            "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
            "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
        },
    },
    "llama-3.1-70b": {
        "repo_id": "meta-llama/Llama-3.1-70B", "kind": "causal-lm", "aliases": ["llama3.1-70b", "meta-llama-3.1-70b"],
        "config": {
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 8192,
            "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 131072,
            "mlp_bias": False, "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80,
            "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
            "vocab_size": 128256,
        },
    },
    "mistral-7b": {
        "repo_id": "mistralai/Mistral-7B-v0.1", "kind": "causal-lm", "aliases": ["mistral-7b-v0.1"],
        "config": {
            "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
            "vocab_size": 32000,
        },
    },
    "mixtral-8x7b": {
        "repo_id": "mistralai/Mixtral-8x7B-v0.1", "kind": "causal-lm", "aliases": ["mixtral-8x7b-v0.1"],
        "config": {
            "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
            "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
            "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
        },
    },
    "qwen2.5-7b": {
        "repo_id": "Qwen/Qwen2.5-7B", "kind": "causal-lm", "aliases": ["qwen2.5-7b-base"],
        "config": {
            "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
            "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
            "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
            "vocab_size": 152064,
        },
    },
    "gemma-2-9b": {
        "repo_id": "google/gemma-2-9b", "kind": "causal-lm", "aliases": ["gemma2-9b"],
        "config": {
            "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
            "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
            "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
            "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
            "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
            "torch_dtype": "float32", "use_cache": True, "vocab_size": 256000,
        },
    },
    "phi-3-mini": {
        "repo_id": "microsoft/Phi-3-mini-4k-instruct", "kind": "causal-lm",
        "aliases": ["phi-3-mini-4k", "phi-3-mini-4k-instruct"],
        "config": {
            "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
            "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
            "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
            "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
            "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32064,
        },
    },
    "gpt2": {
        "repo_id": "openai-community/gpt2", "kind": "causal-lm", "dtype": "F32", "aliases": ["gpt-2"],
        "config": {
            "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
            "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
            "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
            "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
            "vocab_size": 50257,
        },
    },
    "sd-1.5": {
        "repo_id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "kind": "diffusers",
        "aliases": ["sd15", "sd-v1-5", "stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"],
        "components": {
            "unet": {"class": "UNet2DConditionModel", "dtype": "F32", "config": {
                "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
                "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
                "cross_attention_dim": 768,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "DownBlock2D"],
                "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
                "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
                "out_channels": 4, "sample_size": 64,
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            }},
            "text_encoder": {"class": "CLIPTextModel", "dtype": "F32", "config": CLIP_L},
        },
    },
    "sdxl": {
        "repo_id": "stabilityai/stable-diffusion-xl-base-1.0", "kind": "diffusers",
        "aliases": ["sdxl-base", "sdxl-base-1.0", "sd-xl-base-1.0", "stable-diffusion-xl-base-1.0"],
        "components": {
            "unet": {"class": "UNet2DConditionModel", "dtype": "F32", "config": {
                "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
                "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
                "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
                "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
                "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
                "cross_attention_dim": 2048, "cross_attention_norm": None,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
                "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
                "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
                "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
                "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
                "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
                "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
                "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
                "time_embedding_type": "positional", "timestep_post_act": None,
                "transformer_layers_per_block": [1, 2, 10],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "upcast_attention": None, "use_linear_projection": True,
            }},
            "text_encoder": {"class": "CLIPTextModel", "dtype": "F32", "config": {**CLIP_L, "torch_dtype": "float16"}},
            "text_encoder_2": {"class": "CLIPTextModelWithProjection", "dtype": "F32", "config": {
                "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0,
                "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280,
                "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 5120,
                "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
                "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280,
                "torch_dtype": "float16", "vocab_size": 49408,
            }},
        },
    },
    "flux.1-dev": {
        "repo_id": "black-forest-labs/FLUX.1-dev", "kind": "diffusers", "aliases": ["flux-dev", "flux1-dev", "flux"],
        "components": {
            "transformer": {"class": "FluxTransformer2DModel", "dtype": "BF16", "config": {
                "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
                "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True,
                "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
            }},
            **_FLUX_TEXT,
        },
    },
    "flux.1-schnell": {
        "repo_id": "black-forest-labs/FLUX.1-schnell", "kind": "diffusers",
        "aliases": ["flux-schnell", "flux1-schnell"],
        "components": {
            "transformer": {"class": "FluxTransformer2DModel", "dtype": "BF16", "config": {
                "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
                "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False,
                "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
            }},
            **_FLUX_TEXT,
        },
    },
    "sd3.5-large": {
        "repo_id": "stabilityai/stable-diffusion-3.5-large", "kind": "diffusers",
        "aliases": ["sd35-large", "stable-diffusion-3.5-large"],
        "components": {
            "transformer": {"class": "SD3Transformer2DModel", "dtype": "BF16", "config": {
                "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0.dev0",
                "attention_head_dim": 64, "caption_projection_dim": 2432, "dual_attention_layers": [],
                "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38,
                "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                "qk_norm": "rms_norm", "sample_size": 128,
            }},
            **_SD3_TEXT,
        },
    },
    "sd3.5-medium": {
        "repo_id": "stabilityai/stable-diffusion-3.5-medium", "kind": "diffusers",
        "aliases": ["sd35-medium", "stable-diffusion-3.5-medium"],
        "components": {
            "transformer": {"class": "SD3Transformer2DModel", "dtype": "BF16", "config": {
                "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0.dev0",
                "attention_head_dim": 64, "caption_projection_dim": 1536,
                "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "in_channels": 16,
                "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
                "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                "sample_size": 128,
            }},
            **_SD3_TEXT,
        },
    },
    "wan2.1-t2v-1.3b": {
        "repo_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "kind": "diffusers", "aliases": ["wan2.1-1.3b", "wan-1.3b"],
        "components": {
            "transformer": {"class": "WanTransformer3DModel", "dtype": "F32", "config": {
                "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0",
                "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
                "ffn_dim": 8960, "freq_dim": 256, "image_dim": None, "in_channels": 16, "num_attention_heads": 12,
                "num_layers": 30, "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
                "rope_max_seq_len": 1024, "text_dim": 4096,
            }},
        },
    },
    "wan2.1-t2v-14b": {
        "repo_id": "Wan-AI/Wan2.1-T2V-14B-Diffusers", "kind": "diffusers", "aliases": ["wan2.1-14b", "wan-14b"],
        "components": {
            "transformer": {"class": "WanTransformer3DModel", "dtype": "F32", "config": {
                "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0",
                "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
                "ffn_dim": 13824, "freq_dim": 256, "image_dim": None, "in_channels": 16, "num_attention_heads": 40,
                "num_layers": 40, "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
                "rope_max_seq_len": 1024, "text_dim": 4096,
            }},
        },
    },
    "wan2.2-t2v-a14b": {
        # two experts of this shape (`transformer/` high noise, `transformer_2/` low noise); a LoRA is
        # trained for one of them, so the manifest describes one
        "repo_id": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "kind": "diffusers", "aliases": ["wan2.2-a14b", "wan2.2-14b"],
        "components": {
            "transformer": {"class": "WanTransformer3DModel", "dtype": "F32", "config": {
                "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0.dev0",
                "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
                "ffn_dim": 13824, "freq_dim": 256, "image_dim": None, "in_channels": 16, "num_attention_heads": 40,
                "num_layers": 40, "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
                "rope_max_seq_len": 1024, "text_dim": 4096,
            }},
        },
    },
    "qwen-image": {
        "repo_id": "Qwen/Qwen-Image", "kind": "diffusers", "aliases": ["qwen-image-20b"],
        "components": {
            "transformer": {"class": "QwenImageTransformer2DModel", "dtype": "BF16", "config": {
                "_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.35.0.dev0",
                "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False,
                "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60,
                "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 768,
            }},
        },
    },
    "hunyuanvideo": {
        "repo_id": "hunyuanvideo-community/HunyuanVideo", "kind": "diffusers", "aliases": ["hunyuan-video"],
        "components": {
            "transformer": {"class": "HunyuanVideoTransformer3DModel", "dtype": "BF16", "config": {
                "_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0.32.0.dev0",
                "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 16, "mlp_ratio": 4.0,
                "num_attention_heads": 24, "num_layers": 20, "num_refiner_layers": 2, "num_single_layers": 40,
                "out_channels": 16, "patch_size": 2, "patch_size_t": 1, "pooled_projection_dim": 768,
                "qk_norm": "rms_norm", "rope_axes_dim": [16, 56, 56], "rope_theta": 256.0, "text_embed_dim": 4096,
            }},
        },
    },
    "ltx-video": {
        "repo_id": "Lightricks/LTX-Video", "kind": "diffusers", "aliases": ["ltxv", "ltx-video-0.9"],
        "components": {
            "transformer": {"class": "LTXVideoTransformer3DModel", "dtype": "BF16", "config": {
                "_class_name": "LTXVideoTransformer3DModel", "_diffusers_version": "0.32.0.dev0",
                "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64,
                "attention_out_bias": True, "caption_channels": 4096, "cross_attention_dim": 2048,
                "in_channels": 128, "norm_elementwise_affine": False, "norm_eps": 1e-06, "num_attention_heads": 32,
                "num_layers": 28, "out_channels": 128, "patch_size": 1, "patch_size_t": 1,
                "qk_norm": "rms_norm_across_heads",
            }},
        },
    },
}


def source_url(repo_id: str, path: str = "config.json") -> str:
    return f"{HF}/{repo_id}/blob/main/{path}"


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _strip_private(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def causal_lm_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes a transformers causal LM of this config saves (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    cfg = AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    state = model.state_dict()
    try:  # the keys save_pretrained writes: tied weights dropped, load-time conversions reverted
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(state, model)
        state = revert_weight_conversion(model, state)
        state = _restore_removed_prefixes(model, state)
    except ImportError:  # transformers < 5 saves its state dict as is
        tied = {k for k in getattr(model, "_tied_weights_keys", None) or []}
        if getattr(cfg, "tie_word_embeddings", False):
            state = {k: v for k, v in state.items() if k not in tied}
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _restore_removed_prefixes(model, state: dict) -> dict:
    """Put back prefixes transformers >= 5 strips on load (CLIPTextModel's `text_model.`).

    `revert_weight_conversion` leaves them out for a model built from a config (it cannot know whether
    the checkpoint had them); the published checkpoints do have them.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers < 5 keeps the prefixes in its module tree
        return state
    for conversion in get_model_conversion_mapping(model, add_legacy=False):
        prefix = getattr(conversion, "prefix_to_remove", None)
        # only where the prefix is gone entirely (CLIPTextModelWithProjection keeps `text_model.` itself)
        if isinstance(conversion, PrefixChange) and prefix and not conversion.model_prefix and \
                not any(k.startswith(prefix + ".") for k in state):
            state = {(k if k.startswith(prefix + ".") else f"{prefix}.{k}"): v for k, v in state.items()}
    return state


def component_tensors(cls_name: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one diffusers pipeline component (built on the meta device)."""
    import torch

    with torch.device("meta"):
        if cls_name.startswith("CLIPTextModel"):
            import transformers

            cfg = transformers.CLIPTextConfig(**{k: v for k, v in config.items()
                                                 if k not in ("architectures", "model_type", "torch_dtype")})
            model = getattr(transformers, cls_name)(cfg)
            state = _restore_removed_prefixes(model, model.state_dict())
            return {name: tuple(tensor.shape) for name, tensor in state.items()}
        elif cls_name == "T5EncoderModel":
            import transformers

            cfg = transformers.T5Config(**{k: v for k, v in config.items()
                                           if k not in ("architectures", "model_type", "torch_dtype")})
            model = transformers.T5EncoderModel(cfg)
            state = _restore_removed_prefixes(model, model.state_dict())
            return {name: tuple(tensor.shape) for name, tensor in state.items()}
        else:
            import diffusers

            model = getattr(diffusers, cls_name).from_config(_strip_private(config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def build(name: str) -> dict[str, Any]:
    """The manifest of one model in MODELS (deterministic; no network)."""
    spec = MODELS[name]
    repo_id = spec["repo_id"]
    tensors: dict[str, list] = {}
    if spec["kind"] == "causal-lm":
        config = spec["config"]
        dtype = spec.get("dtype") or _DTYPES[config["torch_dtype"]]
        shapes = causal_lm_tensors(config)
        for tensor in sorted(shapes, key=_natural):
            tensors[tensor] = [list(shapes[tensor]), dtype]
        layout, source, manifest_config = "transformers", source_url(repo_id), config
    elif spec["kind"] == "diffusers":
        source, manifest_config = {}, {}
        dtypes: dict[str, int] = {}
        for component, entry in spec["components"].items():
            shapes = component_tensors(entry["class"], entry["config"])
            for tensor in sorted(shapes, key=_natural):
                tensors[f"{component}.{tensor}"] = [list(shapes[tensor]), entry["dtype"]]
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + len(shapes)
            source[component] = source_url(repo_id, f"{component}/config.json")
            manifest_config[component] = entry["config"]
        layout, dtype = "diffusers", max(dtypes, key=dtypes.get)
    else:
        raise ValueError(f"unknown kind {spec['kind']!r}")
    params = 0
    for shape, _ in tensors.values():
        count = 1
        for d in shape:
            count *= d
        params += count
    return {
        "name": name,
        "repo_id": repo_id,
        "aliases": list(spec.get("aliases", [])),
        "source": source,
        "layout": layout,
        "dtype": dtype,
        "params": params,
        "generator": _generator(),
        "config": manifest_config,
        "tensors": tensors,
    }


def _generator() -> str:
    versions = []
    for module in ("torch", "transformers", "diffusers"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return "registry/build_manifests.py (" + ", ".join(versions) + ")"


def comparable(manifest: dict) -> dict:
    """A manifest without fields that legitimately change between builds (library versions)."""
    return {k: v for k, v in manifest.items() if k != "generator"}


def _dump(manifest: dict) -> str:
    sys.path.insert(0, str(HERE.parent))
    from lorahub.registry import dump_manifest

    return dump_manifest(manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to build (default: all of {', '.join(MODELS)})")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: this folder)")
    parser.add_argument("--check", action="store_true", help="compare with the committed manifests instead")
    args = parser.parse_args(argv)
    names = args.names or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    drift = []
    for name in names:
        manifest = build(name)
        path = args.out / f"{name}.json"
        if args.check:
            committed = json.loads(path.read_text()) if path.exists() else None
            if committed is None or comparable(committed) != comparable(json.loads(_dump(manifest))):
                drift.append(name)
                print(f"{name}: differs from {path}")
            else:
                print(f"{name}: ok")
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(_dump(manifest))
        print(f"{name}: {len(manifest['tensors'])} tensors, {manifest['params']:,} parameters -> {path}")
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
