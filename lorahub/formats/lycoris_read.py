"""LyCORIS tensor keys (kohya module names): which algorithm and role each key is, and the layer a
module's keys make (`lorahub.lycoris` holds the math; this module only knows the key names).

| algorithm | keys per module                                                                   |
| --------- | --------------------------------------------------------------------------------- |
| LoHa      | `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, opt. `hada_t1`, `hada_t2`       |
| LoKr      | `lokr_w1` or `lokr_w1_a`/`_b`, `lokr_w2` or `lokr_w2_a`/`_b`, opt. `lokr_t2`        |
| LoCon     | `lora_down.weight`, `lora_up.weight`, opt. `lora_mid.weight` (Tucker)             |
| full      | `diff` (ΔW), opt. `diff_b` (Δbias)                                                |

plus `alpha` and `dora_scale` ((out, 1, …) with wd_on_out, (1, in, …) without). A `diff_b` next to
`lora_down`/`lora_up` (Wan LoRAs) is the module's bias delta, added unscaled.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..adapter import LazyTensor, LoraLayer
from ..errors import LorahubError
from ..lycoris import LycorisModule, dense_when_smaller, factor_tensors, plan
from .common import TensorSource

# key suffix -> (algorithm, role)
SUFFIXES = {
    ".hada_w1_a": ("loha", "w1a"), ".hada_w1_b": ("loha", "w1b"), ".hada_w2_a": ("loha", "w2a"),
    ".hada_w2_b": ("loha", "w2b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1a"), ".lokr_w1_b": ("lokr", "w1b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2a"), ".lokr_w2_b": ("lokr", "w2b"),
    ".lokr_t2": ("lokr", "t2"), ".lokr_t1": ("lokr", "t1"),
    ".lora_mid.weight": ("locon", "mid"), ".diff": ("full", "diff"), ".diff_b": ("full", "diff_b"),
}


def split(key: str) -> tuple[str, str, str] | None:
    """(module, algorithm, role) of a LyCORIS factor key, or None."""
    for suffix, (algo, role) in SUFFIXES.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], algo, role
    return None


def dora_orientation(path: Path, key: str, shape: tuple[int, ...], out_features: int) -> bool:
    """True: one magnitude per output row (wd_on_out, shape (out, 1, …)); False: per input channel
    (shape (1, in, …)). ComfyUI decides the same way, by the shape."""
    numel = math.prod(shape)
    if shape and shape[0] == out_features and numel == out_features:
        return True
    if len(shape) >= 2 and shape[0] == 1 and numel == shape[1] and numel > 1:
        return False
    raise LorahubError(f"dora_scale of shape {list(shape)} fits neither the {out_features} output rows nor "
                       "one input axis", path=path, key=key)


def build_layer(path: Path, source: TensorSource, module: str, target: str, algos: dict[str, dict[str, str]],
                lora_keys: dict[str, str], kind_for_linear: str = "linear") -> LoraLayer:
    """The layer of one LyCORIS module. `algos`: algorithm -> role -> key; `lora_keys`: the module's
    kohya LoRA keys by label (down, up, alpha, dora, ...)."""
    names = sorted(a for a in algos if a != "full" or "diff" in algos["full"])
    if "locon" in algos:
        names = [a for a in names if a != "locon"] + ["locon"]
    if len(names) != 1:
        raise LorahubError(f"module '{module}' mixes LyCORIS algorithms ({', '.join(names) or 'diff_b alone'})",
                           path=path)
    algo = names[0]
    roles = dict(algos[algo])
    if algo == "locon":
        if "down" not in lora_keys or "up" not in lora_keys:
            raise LorahubError(f"module '{module}' has a Tucker lora_mid but no lora_down/lora_up", path=path)
        roles.update(down=lora_keys["down"], up=lora_keys["up"])
    elif "down" in lora_keys or "up" in lora_keys:
        raise LorahubError(f"module '{module}' has both {algo} factors and lora_down/lora_up", path=path)
    used = {"alpha", "dora"} | ({"down", "up"} if algo == "locon" else set())
    unused = sorted(key for label, key in lora_keys.items() if label not in used)
    if unused:
        raise LorahubError(f"LyCORIS {algo} module '{module}' also has {', '.join(unused)}, which LyCORIS does not "
                           "apply with it", path=path)
    diff_b = algos.get("full", {}).get("diff_b")
    roles.pop("diff_b", None)
    if "t1" in roles and algo == "lokr":
        raise LorahubError(f"LoKr module '{module}' has lokr_t1, which LyCORIS never applies", path=path,
                           key=roles["t1"])
    tensors = {role: source.lazy(key) for role, key in roles.items()}
    for role, tensor in tensors.items():
        if tensor.numel == 0:  # plan() would divide by a rank of 0; ΔW of a 0-wide factor is no layer
            raise LorahubError(f"empty LyCORIS factor (shape {list(tensor.shape)}, 0 elements)", path=path,
                               key=roles[role])
    alpha = source.scalar(lora_keys["alpha"]) if "alpha" in lora_keys else None
    try:
        n, in_shape, scale, rank = plan(algo, {r: t.shape for r, t in tensors.items()}, alpha, module)
    except LorahubError as exc:
        raise LorahubError(str(exc), path=path) from None
    mod = dense_when_smaller(LycorisModule(algo=algo, tensors=tensors, out_features=n, in_shape=in_shape,
                                           scale=scale, rank=rank, keys=roles))
    rank = mod.rank
    if algo in ("locon", "full"):
        mod.resolved = True  # the factors' own shapes are the layer's
    magnitude = None
    if "dora" in lora_keys:
        magnitude = source.lazy(lora_keys["dora"])
        mod.dora_on_out = dora_orientation(path, lora_keys["dora"], magnitude.shape, n)
    conv = len(in_shape) > 1
    a, b = factor_tensors(mod, conv)
    return LoraLayer(target=target, kind="conv" if conv else kind_for_linear, A=a, B=b, alpha=scale * rank,
                     rank=rank, magnitude=magnitude, bias=source.lazy(diff_b) if diff_b else None,
                     bias_unscaled=True, source_key=module, source_name=module, lycoris=mod)


def plain_lora_with_input_dora(path: Path, module: str, layer: LoraLayer) -> LoraLayer:
    """A LoRA/LoCon layer whose dora_scale is per input channel (LyCORIS wd_on_out=False): the
    LyCORIS DoRA math, with the factors as they are."""
    assert layer.magnitude is not None
    down, up = layer.A, layer.B
    tensors: dict[str, LazyTensor] = {"up": up, "down": down}
    n, r = up.shape[0], down.shape[0]
    mod = LycorisModule(algo="locon", tensors=tensors, out_features=n, in_shape=tuple(down.shape[1:]),
                        scale=layer.scale, rank=r, dora_on_out=False, resolved=True)
    return LoraLayer(target=layer.target, kind=layer.kind, A=down, B=up, alpha=layer.alpha, rank=layer.rank,
                     magnitude=layer.magnitude, bias=layer.bias, bias_unscaled=layer.bias_unscaled,
                     source_key=layer.source_key, source_name=layer.source_name, lycoris=mod)
