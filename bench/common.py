"""Pieces shared by the benchmarks in bench/: Llama-2-7B shapes, the generated adapter, timing helpers.

The benchmarks run as scripts (`python bench/bench_resize.py`), so Python puts bench/ first on sys.path
and they import this module as `common`; importing it puts the repository root on sys.path for `lorahub`.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorahub.adapter import Adapter, LazyTensor, LoraLayer  # noqa: E402


def proj_shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    """The seven linear projections of a Llama block: name -> (out, in)."""
    return {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }


HIDDEN, INTER, BLOCKS = 4096, 11008, 32  # Llama-2-7B
PROJ = proj_shapes(HIDDEN, INTER)


def make_adapter(rank: int, seed: int = 0, *, alpha: float, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32, blocks: int = BLOCKS,
                 proj: dict[str, tuple[int, int]] = PROJ) -> Adapter:
    """A generated PEFT adapter on every projection of `blocks` blocks, factors on the CPU in `dtype`.

    Random factors with a decaying spectrum σᵢ = e^(−i/8) (never zeros: zeros take fast paths),
    scaled per layer by a random c in [0.5, 1.5).
    """
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(-torch.arange(rank, dtype=torch.float32) / 8)
    layers = {}
    for block in range(blocks):
        for name, (n, k) in proj.items():
            # Gaussian columns / √dim are nearly orthonormal for dim ≫ r: spectrum ≈ c·σ, decaying
            c = 0.5 + torch.rand((), generator=g).item()
            up = torch.randn(n, rank, generator=g) * (sigma * c / n ** 0.5)
            down = torch.randn(rank, k, generator=g) / k ** 0.5
            target = f"model.layers.{block}.{name}"
            layers[target] = LoraLayer(target=target, kind="linear", A=LazyTensor.of(down.to(dtype)),
                                       B=LazyTensor.of(up.to(dtype)), alpha=alpha, rank=rank,
                                       use_rslora=use_rslora, source_key="base_model.model." + target)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
              "task_type": "CAUSAL_LM", "target_modules": sorted({p.split(".")[1] for p in proj})}
    return Adapter(path=None, format="peft", layers=layers, config=config, base_model="meta-llama/Llama-2-7b-hf")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, fn()) with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def print_cpu_model() -> str | None:
    """Prints `cpu: <model name>` from /proc/cpuinfo and returns the name; None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                print("cpu:", model)
                return model
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# SDXL shapes, as kohya's LoRA/LoCon (networks.lora with conv_dim) names and shapes its modules

def sdxl_kohya_modules() -> list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
    """Every module a kohya SDXL LoCon adapts: (kohya name, kind, base weight shape).

    Text encoders (CLIP-L: 12 layers of 768, MLP 3072; OpenCLIP-bigG: 32 layers of 1280, MLP 5120),
    the UNet's Transformer2DModel linears (attn1/attn2 q, k, v, out, GEGLU ff, proj_in/out; cross
    attention from 2048) and, as kohya LoCon (`conv_dim`) adapts them, the ResnetBlock2D convs (3×3
    conv1/conv2, 1×1 conv_shortcut, time_emb_proj) and the Down/Upsample 3×3 convs. 1052 modules.
    """
    modules: list[tuple[str, str, tuple[int, ...]]] = []
    for prefix, layers, hidden, mlp in (("lora_te1_text_model_encoder_layers", 12, 768, 3072),
                                        ("lora_te2_text_model_encoder_layers", 32, 1280, 5120)):
        for i in range(layers):
            base = f"{prefix}_{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                modules.append((f"{base}_self_attn_{proj}", "linear", (hidden, hidden)))
            modules.append((f"{base}_mlp_fc1", "linear", (mlp, hidden)))
            modules.append((f"{base}_mlp_fc2", "linear", (hidden, mlp)))

    def resnet(name: str, c_in: int, c_out: int) -> None:
        modules.append((f"{name}_conv1", "conv", (c_out, c_in, 3, 3)))
        modules.append((f"{name}_time_emb_proj", "linear", (c_out, 1280)))
        modules.append((f"{name}_conv2", "conv", (c_out, c_out, 3, 3)))
        if c_in != c_out:
            modules.append((f"{name}_conv_shortcut", "conv", (c_out, c_in, 1, 1)))

    def attention(name: str, c: int, depth: int) -> None:
        modules.append((f"{name}_proj_in", "linear", (c, c)))
        for t in range(depth):
            block = f"{name}_transformer_blocks_{t}"
            for attn, kv_in in (("attn1", c), ("attn2", 2048)):
                modules.append((f"{block}_{attn}_to_q", "linear", (c, c)))
                modules.append((f"{block}_{attn}_to_k", "linear", (c, kv_in)))
                modules.append((f"{block}_{attn}_to_v", "linear", (c, kv_in)))
                modules.append((f"{block}_{attn}_to_out_0", "linear", (c, c)))
            modules.append((f"{block}_ff_net_0_proj", "linear", (8 * c, c)))
            modules.append((f"{block}_ff_net_2", "linear", (c, 4 * c)))
        modules.append((f"{name}_proj_out", "linear", (c, c)))

    u = "lora_unet"
    # down: (320, no attention), (640, depth 2), (1280, depth 10)
    resnet(f"{u}_down_blocks_0_resnets_0", 320, 320)
    resnet(f"{u}_down_blocks_0_resnets_1", 320, 320)
    modules.append((f"{u}_down_blocks_0_downsamplers_0_conv", "conv", (320, 320, 3, 3)))
    for i, c_in in enumerate((320, 640)):
        resnet(f"{u}_down_blocks_1_resnets_{i}", c_in, 640)
        attention(f"{u}_down_blocks_1_attentions_{i}", 640, 2)
    modules.append((f"{u}_down_blocks_1_downsamplers_0_conv", "conv", (640, 640, 3, 3)))
    for i, c_in in enumerate((640, 1280)):
        resnet(f"{u}_down_blocks_2_resnets_{i}", c_in, 1280)
        attention(f"{u}_down_blocks_2_attentions_{i}", 1280, 10)
    resnet(f"{u}_mid_block_resnets_0", 1280, 1280)
    attention(f"{u}_mid_block_attentions_0", 1280, 10)
    resnet(f"{u}_mid_block_resnets_1", 1280, 1280)
    # up: (1280, depth 10), (640, depth 2), (320, no attention); skip connections widen the inputs
    for block, c, depth, ins in ((0, 1280, 10, (2560, 2560, 1920)), (1, 640, 2, (1920, 1280, 960)),
                                 (2, 320, 0, (960, 640, 640))):
        for i, c_in in enumerate(ins):
            resnet(f"{u}_up_blocks_{block}_resnets_{i}", c_in, c)
            if depth:
                attention(f"{u}_up_blocks_{block}_attentions_{i}", c, depth)
        if block < 2:
            modules.append((f"{u}_up_blocks_{block}_upsamplers_0_conv", "conv", (c, c, 3, 3)))
    return modules


def make_kohya_sdxl_adapter(rank: int, modules: int = 700, *, alpha: float | None = None,
                            conv_rank: int | None = None, dtype: torch.dtype = torch.float16,
                            seed: int = 0) -> Adapter:
    """A generated kohya SDXL LoCon adapter of `modules` modules, factors in `dtype` (kohya saves fp16).

    The modules are `modules` evenly spaced picks of `sdxl_kohya_modules()` (all 1052 if more are
    asked for), so every kind and width appears in SDXL's proportions, 3×3 convs included. Factors as
    in `make_adapter` (decaying spectrum σᵢ = e^(−i/8), random per-layer scale); alpha defaults to
    rank/2, as many kohya configs.
    """
    from lorahub.formats.kohya_names import kohya_to_target

    every = sdxl_kohya_modules()
    count = min(modules, len(every))
    picks = [every[(i * len(every)) // count] for i in range(count)]
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, kind, shape in picks:
        r = conv_rank if (conv_rank and len(shape) == 4 and shape[2:] != (1, 1)) else rank
        n, k = shape[0], math.prod(shape[1:])
        sigma = torch.exp(-torch.arange(r, dtype=torch.float32) / 8)
        c = 0.5 + torch.rand((), generator=g).item()
        up = torch.randn(n, r, generator=g) * (sigma * c / n ** 0.5)
        down = torch.randn(r, k, generator=g) / k ** 0.5
        if kind == "conv":
            down = down.reshape(r, *shape[1:])
            up = up.reshape(n, r, 1, 1)
        target = kohya_to_target(name)
        layers[target] = LoraLayer(target=target, kind=kind, A=LazyTensor.of(down.to(dtype)),
                                   B=LazyTensor.of(up.to(dtype)), alpha=float(alpha if alpha is not None else r / 2),
                                   rank=r, source_key=name, source_name=name)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha if alpha is not None else rank / 2),
                "ss_base_model_version": "sdxl_base_v1-0",
                "ss_network_args": f'{{"conv_dim": "{conv_rank or rank}", "conv_alpha": "{(conv_rank or rank) / 2}"}}'}
    return Adapter(path=None, format="kohya", layers=layers, metadata=metadata, has_components=True,
                   base_model="stabilityai/stable-diffusion-xl-base-1.0")
