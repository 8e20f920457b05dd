"""A generated adapter library for `bench/bench_library.py` and `tests/test_library.py`.

Realistic headers (names, shapes, dtypes, metadata as PEFT, kohya sd-scripts, LyCORIS and diffusers write
them), data sections left as holes (sparse files: a thousand adapters cost a few hundred MB of headers
and no data), in nested folders, with the things a real library holds besides adapters: base-model
shards, hard links and symlinks to adapters, corrupt files. Standard library only (no torch).

    manifest = make_library(root, adapters=1000)                  # the benchmark's mix
    manifest = make_library(root, adapters=300, small=True)       # the tests' (a few modules each)

`manifest` says what a listing must find: `adapters` {path relative to root: facts}, `aliases`
{other name: the adapter's path}, `problems` [paths], `others` [non-adapter files].
"""
from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


def write_safetensors(path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                      metadata: dict[str, str] | None = None, values: dict[str, bytes] | None = None) -> None:
    """A safetensors file with these (name, dtype, shape) tensors; the data section is a hole, except
    the raw bytes in `values` {name: data}."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        size = ITEMSIZE[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.truncate(8 + len(raw) + offset)
        for name, data in (values or {}).items():
            handle.seek(8 + len(raw) + header[name]["data_offsets"][0])
            handle.write(data)


# ---------------------------------------------------------------------------------------------
# module tables: (name, in_features, out_features, conv kernel or None)

LLAMA_PROJ = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "kv"), "self_attn.v_proj": ("h", "kv"),
              "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("h", "i"), "mlp.up_proj": ("h", "i"),
              "mlp.down_proj": ("i", "h")}


def llama_modules(layers: int, hidden: int, inter: int, kv: int, targets: list[str]) -> list[tuple]:
    dims = {"h": hidden, "i": inter, "kv": kv}
    out = []
    for layer in range(layers):
        for proj, (i, o) in LLAMA_PROJ.items():
            if proj.split(".")[1] in targets:
                out.append((f"model.layers.{layer}.{proj}", dims[i], dims[o], None))
    return out


def sd_unet_modules(xl: bool, small: bool) -> list[tuple]:
    """(diffusers dotted name, in, out, kernel) of the UNet modules a LoRA adapts (attentions)."""
    cross = 2048 if xl else 768
    if xl:
        blocks = [("down_blocks.1", 640, 2, 2), ("down_blocks.2", 1280, 2, 10), ("mid_block", 1280, 1, 10),
                  ("up_blocks.0", 1280, 3, 10), ("up_blocks.1", 640, 3, 2)]
    else:
        blocks = [("down_blocks.0", 320, 2, 1), ("down_blocks.1", 640, 2, 1), ("down_blocks.2", 1280, 2, 1),
                  ("mid_block", 1280, 1, 1), ("up_blocks.1", 1280, 3, 1), ("up_blocks.2", 640, 3, 1),
                  ("up_blocks.3", 320, 3, 1)]
    if small:
        blocks = blocks[:2]
    out = []
    for block, c, attentions, depth in blocks:
        for a in range(attentions if not small else 1):
            base = f"{block}.attentions.{a}"
            kernel = None if xl else (1, 1)
            out.append((f"{base}.proj_in", c, c, kernel))
            for t in range(depth if not small else 1):
                tb = f"{base}.transformer_blocks.{t}"
                for attn, kv in (("attn1", c), ("attn2", cross)):
                    out += [(f"{tb}.{attn}.to_q", c, c, None), (f"{tb}.{attn}.to_k", kv, c, None),
                            (f"{tb}.{attn}.to_v", kv, c, None), (f"{tb}.{attn}.to_out.0", c, c, None)]
                out += [(f"{tb}.ff.net.0.proj", c, 8 * c, None), (f"{tb}.ff.net.2", 4 * c, c, None)]
            out.append((f"{base}.proj_out", c, c, kernel))
    return out


def clip_modules(layers: int, hidden: int, mlp: int) -> list[tuple]:
    out = []
    for i in range(layers):
        base = f"text_model.encoder.layers.{i}"
        out += [(f"{base}.self_attn.{p}", hidden, hidden, None) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        out += [(f"{base}.mlp.fc1", hidden, mlp, None), (f"{base}.mlp.fc2", mlp, hidden, None)]
    return out


def _down_up(in_f: int, out_f: int, rank: int, kernel: tuple | None) -> tuple[tuple, tuple]:
    if kernel is None:
        return (rank, in_f), (out_f, rank)
    return (rank, in_f, *kernel), (out_f, rank, 1, 1)


# ---------------------------------------------------------------------------------------------
# one adapter of each kind


def peft_dir(folder: Path, modules: list[tuple], rank: int, alpha: float, base: str,
             dora: bool = False) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, in_f, out_f, kernel in modules:
        down, up = _down_up(in_f, out_f, rank, kernel)
        entries += [(f"base_model.model.{name}.lora_A.weight", "F32", down),
                    (f"base_model.model.{name}.lora_B.weight", "F32", up)]
        if dora:
            entries.append((f"base_model.model.{name}.lora_magnitude_vector", "F32", (out_f,)))
    write_safetensors(folder / "adapter_model.safetensors", entries, {"format": "pt"})
    targets = sorted({m[0].rsplit(".", 1)[-1] for m in modules})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
              "base_model_name_or_path": base, "task_type": "CAUSAL_LM", "use_dora": dora, "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return {"format": "peft", "rank": rank, "alpha": alpha, "modules": len(modules)}


def kohya_file(path: Path, unet: list[tuple], te: list[tuple], rank: int, alpha: float, xl: bool) -> dict:
    entries = []
    for prefix, modules in (("lora_unet_", unet), ("lora_te1_" if xl else "lora_te_", te)):
        for name, in_f, out_f, kernel in modules:
            flat = prefix + name.replace(".", "_")
            down, up = _down_up(in_f, out_f, rank, kernel)
            entries += [(f"{flat}.alpha", "F16", ()), (f"{flat}.lora_down.weight", "F16", down),
                        (f"{flat}.lora_up.weight", "F16", up)]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                "ss_base_model_version": "sdxl_base_v1-0" if xl else "sd_v1", "ss_output_name": path.stem,
                "ss_network_args": "{}"}
    # the alphas as the metadata says (a kohya alpha of 0 is refused: kohya and diffusers/ComfyUI read it apart)
    write_safetensors(path, entries, metadata,
                      values={name: struct.pack("<e", alpha) for name, _, _ in entries if name.endswith(".alpha")})
    return {"format": "kohya", "rank": rank, "alpha": alpha, "modules": len(unet) + len(te),
            "family": "sdxl" if xl else "sd1"}


def lycoris_loha_file(path: Path, unet: list[tuple], rank: int) -> dict:
    entries = []
    for name, in_f, out_f, kernel in unet:
        flat = "lora_unet_" + name.replace(".", "_")
        inner = in_f * (kernel[0] * kernel[1] if kernel else 1)
        entries += [(f"{flat}.alpha", "F16", ()), (f"{flat}.hada_w1_a", "F16", (out_f, rank)),
                    (f"{flat}.hada_w1_b", "F16", (rank, inner)), (f"{flat}.hada_w2_a", "F16", (out_f, rank)),
                    (f"{flat}.hada_w2_b", "F16", (rank, inner))]
    # alpha 1 (as the metadata says): a LyCORIS alpha of 0 is refused (LyCORIS and ComfyUI read it differently)
    write_safetensors(path, entries, {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(rank),
                                      "ss_network_alpha": "1", "ss_base_model_version": "sd_v1"},
                      values={name: struct.pack("<e", 1.0) for name, _, _ in entries if name.endswith(".alpha")})
    return {"format": "lycoris", "rank": None, "modules": 0, "lycoris": len(unet)}


def diffusers_file(path: Path, unet: list[tuple], rank: int, alpha: float) -> dict:
    entries = []
    for name, in_f, out_f, kernel in unet:
        down, up = _down_up(in_f, out_f, rank, kernel)
        entries += [(f"unet.{name}.lora_A.weight", "F16", down), (f"unet.{name}.lora_B.weight", "F16", up)]
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    write_safetensors(path, entries, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return {"format": "diffusers", "rank": rank, "alpha": alpha, "modules": len(unet)}


def base_shard(path: Path, layers: int = 2, hidden: int = 64) -> None:
    entries = [("model.embed_tokens.weight", "BF16", (128, hidden))]
    for i in range(layers):
        for proj, (a, b) in LLAMA_PROJ.items():
            dims = {"h": hidden, "i": 2 * hidden, "kv": hidden // 2}
            entries.append((f"model.layers.{i}.{proj}.weight", "BF16", (dims[b], dims[a])))
        entries.append((f"model.layers.{i}.input_layernorm.weight", "BF16", (hidden,)))
    write_safetensors(path, entries, {"format": "pt"})


# ---------------------------------------------------------------------------------------------
# the library


def make_library(root: Path, adapters: int = 1000, *, small: bool = False, seed: int = 0) -> dict:
    """`adapters` adapters under `root` (mix: 35% PEFT Llama folders, 30% kohya SD 1.5, 15% kohya SDXL,
    10% diffusers SDXL, 5% LyCORIS LoHa, 5% PEFT checkpoints nested deeper), plus base shards (2%),
    corrupt files (2%), hard links and symlinks (1% each) of adapters already there."""
    rng = random.Random(seed)
    root = Path(root)
    manifest: dict[str, Any] = {"adapters": {}, "aliases": {}, "problems": [], "others": []}
    llama = dict(layers=2, hidden=64, inter=128, kv=32) if small else dict(layers=32, hidden=4096, inter=11008,
                                                                           kv=4096)
    sd1_unet, sdxl_unet = sd_unet_modules(False, small), sd_unet_modules(True, small)
    sd1_te = clip_modules(1 if small else 12, 768, 3072)
    kinds = (["peft"] * 35 + ["kohya_sd1"] * 30 + ["kohya_sdxl"] * 15 + ["diffusers"] * 10 + ["loha"] * 5
             + ["checkpoint"] * 5)
    made: list[str] = []
    for i in range(adapters):
        kind = kinds[i % len(kinds)]
        shelf = f"shelf{i % 7}/{['', 'a/', 'a/b/', 'c/'][i % 4]}"
        rank = rng.choice([4, 8, 16, 32, 64])
        alpha = float(rng.choice([rank, rank // 2 or 1, 2 * rank]))
        if kind in ("peft", "checkpoint"):
            targets = rng.choice([["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"],
                                  [p.split(".")[1] for p in LLAMA_PROJ]])
            rel = f"{shelf}llama-{i:04d}" + ("/checkpoint-500" if kind == "checkpoint" else "")
            facts = peft_dir(root / rel, llama_modules(llama["layers"], llama["hidden"], llama["inter"], llama["kv"],
                                                       targets), rank, alpha, "meta-llama/Llama-2-7b-hf",
                             dora=rng.random() < 0.1)
            facts["family"] = "llama"
        elif kind == "kohya_sd1":
            rel = f"{shelf}sd15-style-{i:04d}.safetensors"
            facts = kohya_file(root / rel, sd1_unet, sd1_te, rank, alpha, xl=False)
        elif kind == "kohya_sdxl":
            rel = f"{shelf}sdxl-{i:04d}.safetensors"
            facts = kohya_file(root / rel, sdxl_unet, [], rank, alpha, xl=True)
        elif kind == "diffusers":
            rel = f"{shelf}sdxl-diffusers-{i:04d}/pytorch_lora_weights.safetensors"
            facts = diffusers_file(root / rel, sdxl_unet, rank, alpha)
            facts["family"] = "sdxl"
        else:
            rel = f"{shelf}loha-{i:04d}.safetensors"
            facts = lycoris_loha_file(root / rel, sd1_unet, rank)
            facts["family"] = "sd1"
        manifest["adapters"][rel] = facts
        made.append(rel)
    files = [rel for rel in made if rel.endswith(".safetensors")]
    for j in range(max(1, adapters // 50)):  # base model shards: never listed
        rel = f"bases/model-{j % 3}/model-{j + 1:05d}-of-{adapters // 50 + 1:05d}.safetensors"
        base_shard(root / rel)
        manifest["others"].append(rel)
    for j in range(max(1, adapters // 50)):  # corrupt: listed as problems
        rel = f"broken/bad-{j:03d}.safetensors"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if j % 3 == 0:
            path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        elif j % 3 == 1:  # header says more data than the file has
            write_safetensors(path, [("lora_unet_x.lora_down.weight", "F32", (4, 8)),
                                     ("lora_unet_x.lora_up.weight", "F32", (8, 4))])
            os.truncate(path, path.stat().st_size - 16)
        else:
            path.write_bytes(b"\x01")
        manifest["problems"].append(rel)
    broken_peft = root / "broken" / "peft-bad-config"
    broken_peft.mkdir(parents=True, exist_ok=True)
    (broken_peft / "adapter_config.json").write_text("{ this is not json")
    write_safetensors(broken_peft / "adapter_model.safetensors",
                      [("base_model.model.x.lora_A.weight", "F32", (4, 8)),
                       ("base_model.model.x.lora_B.weight", "F32", (8, 4))])
    manifest["problems"].append("broken/peft-bad-config")
    for j in range(max(1, adapters // 100)):  # hard links and symlinks: one adapter, several names
        target = files[(j * 7) % len(files)]
        link = f"links/hard-{j:03d}.safetensors"
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        os.link(root / target, root / link)
        manifest["aliases"][link] = target
        sym = f"links/sym-{j:03d}.safetensors"
        os.symlink(os.path.relpath(root / target, (root / sym).parent), root / sym)
        manifest["aliases"][sym] = target
    return manifest


if __name__ == "__main__":  # python bench/make_library.py DIR [N]
    import sys

    out = make_library(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
    print(f"{len(out['adapters'])} adapters, {len(out['aliases'])} aliases, {len(out['problems'])} problems, "
          f"{len(out['others'])} other files")
