"""Pieces shared by the benchmarks in bench/: Llama-2-7B shapes, the generated adapter, timing helpers.

The benchmarks run as scripts (`python bench/bench_resize.py`), so Python puts bench/ first on sys.path
and they import this module as `common`; importing it puts the repository root on sys.path for `lorahub`.
"""
from __future__ import annotations

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
