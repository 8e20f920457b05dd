"""Hostile input to the readers and operations added with LyCORIS, XLabs Flux files, ComfyUI dotted
names, model families, `diff`/`diff_b` deltas and PEFT weights without adapter_config.json (`--alpha`).

The rules of tests/test_hostile.py: bad input gets ONE `error: …` line naming the file and the tensor or
module, exit 1 (2 for usage errors), no traceback, nothing written, the input untouched; a silently wrong
result is worse than a refusal. Every file here is a handful of tiny tensors written with
`safetensors.torch.save_file` under the key names LyCORIS / x-flux / ComfyUI use (the valid files
themselves are checked against LyCORIS, diffusers and PEFT in test_lycoris.py, test_families_*.py and
test_layouts.py). Each case runs through the real CLI (`run_cli`) on inspect, validate --base, merge,
convert --to peft|kohya|diffusers, resize --rank and blend.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file, save_file

from lorahub import ui

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import hostile_inputs as H  # noqa: E402

ENV = {"NO_COLOR": "1", "COLUMNS": "200"}
M = "lora_unet_lin"  # kohya's name for the base's `lin` (8 × 16)
C = "lora_unet_conv"  # the base's `conv` (8 × 4 × 3 × 3)


def rn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=_GEN) * 0.1).to(dtype)


_GEN = torch.Generator().manual_seed(0)


def _edit(tensors: dict[str, torch.Tensor], module: str, over: dict) -> dict[str, torch.Tensor]:
    for suffix, value in over.items():
        if value is None:
            tensors.pop(f"{module}.{suffix}", None)
        else:
            tensors[f"{module}.{suffix}"] = value
    return tensors


def loha(**over) -> dict[str, torch.Tensor]:
    return _edit({f"{M}.hada_w1_a": rn(8, 2), f"{M}.hada_w1_b": rn(2, 16), f"{M}.hada_w2_a": rn(8, 2),
                  f"{M}.hada_w2_b": rn(2, 16), f"{M}.alpha": torch.tensor(1.0)}, M, over)


def lokr(**over) -> dict[str, torch.Tensor]:  # kron((2×4), (4×2)·(2×4)) = 8 × 16
    return _edit({f"{M}.lokr_w1": rn(2, 4), f"{M}.lokr_w2_a": rn(4, 2), f"{M}.lokr_w2_b": rn(2, 4),
                  f"{M}.alpha": torch.tensor(1.0)}, M, over)


def loha_tucker(**over) -> dict[str, torch.Tensor]:
    return _edit({f"{C}.hada_w1_a": rn(2, 8), f"{C}.hada_w1_b": rn(2, 4), f"{C}.hada_w2_a": rn(2, 8),
                  f"{C}.hada_w2_b": rn(2, 4), f"{C}.hada_t1": rn(2, 2, 3, 3), f"{C}.hada_t2": rn(2, 2, 3, 3)},
                 C, over)


def locon_tucker(**over) -> dict[str, torch.Tensor]:
    return _edit({f"{C}.lora_down.weight": rn(2, 4, 1, 1), f"{C}.lora_up.weight": rn(8, 2, 1, 1),
                  f"{C}.lora_mid.weight": rn(2, 2, 3, 3), f"{C}.alpha": torch.tensor(1.0)}, C, over)


def full(**over) -> dict[str, torch.Tensor]:
    return _edit({f"{M}.diff": rn(8, 16)}, M, over)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file({"lin.weight": rn(8, 16), "lin.bias": rn(8), "conv.weight": rn(8, 4, 3, 3)}, str(path))
    return path


COMMANDS = ("inspect", "validate", "merge", "peft", "kohya", "diffusers", "resize", "blend")


def _args(command: str, adapter: Path, out: Path, base: Path | None) -> list:
    with_base = ["--base", base] if base is not None else []
    file = out.with_name(out.name + ".safetensors")  # kohya/diffusers files (PEFT and merge: folders)
    return {"inspect": ["inspect", adapter],
            "validate": ["validate", adapter, "--base", base],
            "merge": ["merge", "--base", base, adapter, "--out", out, "--device", "cpu"],
            "peft": ["convert", adapter, "--to", "peft", *with_base, "--out", out],
            "kohya": ["convert", adapter, "--to", "kohya", *with_base, "--out", file],
            "diffusers": ["convert", adapter, "--to", "diffusers", *with_base, "--out", file],
            "resize": ["resize", adapter, "--rank", "1", "--to", "kohya", *with_base, "--out", file],
            "blend": ["blend", adapter, adapter, "-w", "1,1", "--to", "kohya", *with_base, "--out", file]}[command]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(args: list, work: Path, needles: tuple[str, ...], *, code: int = 1, inputs: tuple[Path, ...] = (),
            warnings: bool = False):
    """Run the CLI; it must print one `error:` line holding `needles`, exit `code`, print no traceback,
    write nothing under `work` and leave `inputs` as they were. `warnings`: the reader's `warning:` lines
    may come before the error line."""
    before = {p: _digest(p) for p in inputs}
    files_before = {p for p in work.rglob("*")}
    result = run_cli(*args, env=ENV)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if warnings:
        lines = [line for line in lines if not line.startswith("warning: ")]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert result.returncode == code, (result.returncode, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(needle in lines[0] for needle in needles), (needles, lines[0])
    assert ui.clean(lines[0]) == lines[0] and "\x1b" not in result.stdout
    new = {p for p in work.rglob("*")} - files_before
    assert not new, f"wrote {sorted(map(str, new))}"
    assert all(_digest(p) == digest for p, digest in before.items()), "an input was modified"
    return lines[0]


def _write(work: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = work / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# LyCORIS: refused when the file is read, by every command, naming the file and the module or tensor

READ_REFUSED = {
    # inconsistent factor shapes
    "loha-rank-mismatch": (lambda: loha(hada_w1_b=rn(3, 16)), ("lora_unet_lin", "do not fit", "w1b [3, 16]")),
    "loha-out-dims-disagree": (lambda: loha(hada_w2_a=rn(6, 2)), ("lora_unet_lin", "w2a [6, 2]")),
    "loha-missing-half": (lambda: loha(hada_w1_b=None), ("lora_unet_lin", "w1b missing")),
    "loha-1d-factor": (lambda: loha(hada_w1_a=rn(8)), ("lora_unet_lin", "w1a has shape [8]")),
    "loha-tucker-t1-rank": (lambda: loha_tucker(hada_t1=rn(3, 3, 3, 3)), ("lora_unet_conv", "t1 [3, 3, 3, 3]")),
    "locon-mid-dims": (lambda: locon_tucker(**{"lora_mid.weight": rn(2, 3, 3, 3)}),
                       ("lora_unet_conv", "mid [2, 3, 3, 3]")),
    "lokr-w1-and-w1-factors": (lambda: lokr(lokr_w1_a=rn(2, 1), lokr_w1_b=rn(1, 4)),
                               ("lora_unet_lin", "both a full w1 and its factors w1a, w1b")),
    "lokr-w2-and-w2-factors": (lambda: lokr(lokr_w2=rn(4, 4)), ("lora_unet_lin", "both a full w2")),
    "lokr-w2-and-t2": (lambda: lokr(lokr_w2=rn(4, 4), lokr_w2_a=None, lokr_w2_b=None, lokr_t2=rn(2, 2, 1, 1)),
                       ("lora_unet_lin", "both a full w2 and its factors t2")),
    # alpha
    "alpha-nan": (lambda: loha(alpha=torch.tensor(float("nan"))), ("alpha", "lora_unet_lin", "NaN")),
    "alpha-inf": (lambda: loha(alpha=torch.tensor(float("inf"))), ("alpha", "lora_unet_lin", "Infinity")),
    "alpha-zero": (lambda: loha(alpha=torch.tensor(0.0)), ("lora_unet_lin", "alpha is 0", "ComfyUI")),
    "alpha-vector": (lambda: loha(alpha=torch.tensor([1.0, 2.0])), ("lora_unet_lin.alpha", "expected a scalar")),
    # zero-size factors (a rank of 0 once divided alpha by it)
    "loha-rank-0": (lambda: loha(hada_w1_a=rn(8, 0), hada_w1_b=rn(0, 16)), ("lora_unet_lin.hada_w1_a", "empty")),
    "lokr-rank-0": (lambda: lokr(lokr_w2_a=rn(4, 0), lokr_w2_b=rn(0, 4)), ("lora_unet_lin.lokr_w2_a", "empty")),
    "loha-0-outputs": (lambda: loha(hada_w1_a=rn(0, 2), hada_w2_a=rn(0, 2)), ("lora_unet_lin.hada_w1_a", "empty")),
    "diff-0-rows": (lambda: full(diff=rn(0, 16)), ("lora_unet_lin.diff", "empty")),
    # DoRA
    "dora-scale-shape": (lambda: loha(dora_scale=rn(5, 1)), ("lora_unet_lin.dora_scale", "[5, 1]")),
}
# inspect's refusal of NaN/Inf alphas is its NaN scan (same line for plain LoRA); the others read alone
INSPECT_NEEDLES = {"alpha-nan": ("alpha", "NaN"), "alpha-inf": ("alpha", "Infinity")}
OPERATION_NEEDLES = {"alpha-nan": ("alpha", "lora_unet_lin", "nan"), "alpha-inf": ("alpha", "lora_unet_lin", "inf")}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", READ_REFUSED)
def test_lycoris_broken_module_is_refused_by_every_command(case, command, base, tmp_path):
    build, needles = READ_REFUSED[case]
    adapter = _write(tmp_path, case, build())
    if command == "validate" and case in ("alpha-nan", "alpha-inf"):
        pytest.skip("validate checks shapes; a NaN alpha is inspect's and the operations' to refuse")
    if command == "inspect":
        needles = INSPECT_NEEDLES.get(case, needles)
    elif case in OPERATION_NEEDLES:
        needles = OPERATION_NEEDLES[case]
    refused(_args(command, adapter, tmp_path / "out", base), tmp_path, (adapter.name, *needles),
            inputs=(adapter, base))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int32])
def test_lycoris_integer_factors_are_refused_by_operations_and_flagged_by_inspect(dtype, base, tmp_path):
    """Integer/bool LyCORIS factors were widened to fp32 silently (their A and B are computed tensors of
    dtype F32, so the floating-point check never saw them)."""
    bad = torch.ones(8, 2, dtype=dtype)
    for name, tensors, key in (("loha", loha(hada_w1_a=bad), "lora_unet_lin.hada_w1_a"),
                               ("full", full(diff=torch.ones(8, 16, dtype=dtype)), "lora_unet_lin.diff")):
        adapter = _write(tmp_path, name, tensors)
        shown = run_cli("inspect", adapter, env=ENV)
        assert shown.returncode == 0 and "not floating point" in shown.stdout and key in shown.stdout
        for command in ("merge", "peft", "kohya", "diffusers", "resize", "blend"):
            refused(_args(command, adapter, tmp_path / "out", base), tmp_path,
                    (adapter.name, key, "needs floating-point factors"), inputs=(adapter, base))


def test_lycoris_fp8_factors_are_widened_exactly(base, tmp_path):
    """F8 factors are floating point: merged as their fp32 values (the same as fp32 factors holding them)."""
    from safetensors.torch import load_file

    tensors = loha()
    tensors[f"{M}.hada_w1_a"] = tensors[f"{M}.hada_w1_a"].to(torch.float8_e4m3fn)
    f8 = _write(tmp_path, "f8", tensors)
    widened = _write(tmp_path, "f32", {**tensors, f"{M}.hada_w1_a": tensors[f"{M}.hada_w1_a"].float()})
    for name, adapter in (("a", f8), ("b", widened)):
        run_cli("merge", "--base", base, adapter, "--out", tmp_path / name, "--device", "cpu", check=True, env=ENV)
    a, b = (load_file(str(next((tmp_path / n).glob("*.safetensors")))) for n in ("a", "b"))
    assert torch.equal(a["lin.weight"], b["lin.weight"]) and not torch.equal(a["lin.weight"], load_file(
        str(base))["lin.weight"])


def test_lycoris_negative_alpha_is_applied_as_lycoris_does(base, tmp_path):
    """A negative alpha is a number LyCORIS applies (scale alpha/dim < 0): merged, not refused; the merged
    delta is exactly minus that of the positive alpha (checked against the dense LyCORIS formula)."""
    from safetensors.torch import load_file

    tensors = loha(alpha=torch.tensor(-2.0))
    adapter = _write(tmp_path, "neg", tensors)
    run_cli("merge", "--base", base, adapter, "--out", tmp_path / "m", "--device", "cpu", check=True, env=ENV)
    merged = load_file(str(next((tmp_path / "m").glob("*.safetensors"))))["lin.weight"]
    t = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
    delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (-2.0 / 2)
    torch.testing.assert_close(merged - load_file(str(base))["lin.weight"], delta, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# full diffs: shapes against the base


@pytest.mark.parametrize("case", ["diff-wrong-shape", "diff-1d-on-matrix", "diff_b-wrong-length"])
def test_diff_that_does_not_fit_the_base_is_refused_by_validate_and_merge(case, base, tmp_path):
    tensors = {"diff-wrong-shape": full(diff=rn(8, 12)), "diff-1d-on-matrix": full(diff=rn(8)),
               "diff_b-wrong-length": full(diff_b=rn(5))}[case]
    adapter = _write(tmp_path, case, tensors)
    for command in ("validate", "merge"):
        refused(_args(command, adapter, tmp_path / "out", base), tmp_path, ("does not fit",),
                inputs=(adapter, base))


# ---------------------------------------------------------------------------------------------
# XLabs Flux files, ComfyUI dotted names, model families (a tiny Flux from diffusers)

D, MLP = 32, 128  # tests/fixtures_families.py FLUX_TINY: 2 heads of 16, mlp 4·dim


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    from fixtures_families import tiny_flux

    return tiny_flux(tmp_path_factory.mktemp("flux") / "flux")


def xlabs(**over) -> dict[str, torch.Tensor]:
    tensors = {"double_blocks.0.processor.qkv_lora1.down.weight": rn(2, D),
               "double_blocks.0.processor.qkv_lora1.up.weight": rn(3 * D, 2),
               "single_blocks.0.processor.qkv_lora.down.weight": rn(2, D),
               "single_blocks.0.processor.qkv_lora.up.weight": rn(3 * D, 2),
               "single_blocks.0.processor.proj_lora.down.weight": rn(2, D + MLP),
               "single_blocks.0.processor.proj_lora.up.weight": rn(D, 2)}
    for key, value in over.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return tensors


def kohya(modules: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (n, k) in modules.items():
        tensors.update({f"{name}.lora_down.weight": rn(2, k), f"{name}.lora_up.weight": rn(n, 2),
                        f"{name}.alpha": torch.tensor(2.0)})
    return tensors


def peft_style(modules: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """ComfyUI names with PEFT suffixes (`<module>.lora_A.weight`), as ComfyUI-compatible trainers save."""
    tensors = {}
    for name, (n, k) in modules.items():
        tensors.update({f"{name}.lora_A.weight": rn(2, k), f"{name}.lora_B.weight": rn(n, 2)})
    return tensors


QKV1 = "double_blocks.0.processor.qkv_lora1"
FLUX_READ_REFUSED = {
    "xlabs-extra-alpha": (lambda: xlabs(**{f"{QKV1}.alpha": torch.tensor(1.0)}),
                          (f"'{QKV1}.alpha' is not an XLabs Flux LoRA key",)),
    "xlabs-partial-name": (lambda: xlabs(**{"double_blocks.0.processor.down.weight": rn(2, D)}),
                           ("'double_blocks.0.processor.down.weight'",)),
    "xlabs-down-without-up": (lambda: xlabs(**{f"{QKV1}.up.weight": None}),
                              (f"'{QKV1}.down.weight' has no matching '{QKV1}.up.weight'",)),
    "xlabs-rank-mismatch": (lambda: xlabs(**{f"{QKV1}.up.weight": rn(3 * D, 3)}), ("rank mismatch", QKV1)),
    "xlabs-single-qkv-not-3-dim": (lambda: xlabs(**{"single_blocks.0.processor.qkv_lora.up.weight": rn(97, 2)}),
                                   ("single_blocks.0.processor.qkv_lora.up.weight", "97 rows", "3·32")),
    "xlabs-proj-narrower-than-qkv": (lambda: xlabs(**{"single_blocks.0.processor.proj_lora.down.weight": rn(2, 8)}),
                                     ("single_blocks.0.processor.proj_lora.down.weight", "8 input features")),
    "comfy-empty-segment": (lambda: kohya({"diffusion_model..x": (D, D)}),
                            ("'diffusion_model..x'", "empty path segment")),
    "comfy-trailing-dot": (lambda: kohya({"diffusion_model.double_blocks.0.img_attn.": (D, D)}),
                           ("empty path segment",)),
    "comfy-peft-empty-segment": (lambda: peft_style({"diffusion_model..x": (D, D)}),
                                 ("diffusion_model..x.lora_A.weight", "empty path segment")),
    "comfy-peft-kohya-name-inside": (lambda: peft_style({"diffusion_model.lora_unet_double_blocks_0_img_attn_qkv":
                                                         (3 * D, D)}), ("kohya name",)),
    "comfy-kohya-name-inside": (lambda: kohya({"diffusion_model.lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D)}),
                                ("kohya name 'lora_unet_double_blocks_0_img_attn_qkv'",)),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", FLUX_READ_REFUSED)
def test_flux_file_with_broken_names_or_shapes_is_refused_by_every_command(case, command, flux, tmp_path):
    build, needles = FLUX_READ_REFUSED[case]
    adapter = _write(tmp_path, case, build())
    refused(_args(command, adapter, tmp_path / "out", flux if command in ("validate", "merge") else None),
            tmp_path, (adapter.name, *needles), inputs=(adapter,))


def test_comfy_unknown_text_encoder_is_refused_naming_the_file(flux, tmp_path):
    """`text_encoders.clip_x.…`: no kohya prefix exists; the refusal names the file (it named none)."""
    name = "text_encoders.clip_x.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    adapter = _write(tmp_path, "te", kohya({name: (D, D)}))
    for command in ("kohya", "resize"):
        refused(_args(command, adapter, tmp_path / "out", None), tmp_path,
                (adapter.name, "no kohya prefix for ComfyUI text encoder 'clip_x'"), inputs=(adapter,))
    for command in ("peft", "diffusers"):
        refused(_args(command, adapter, tmp_path / "out", None), tmp_path, (adapter.name, "clip_x"),
                inputs=(adapter,))
    refused(_args("merge", adapter, tmp_path / "out", flux), tmp_path, ("does not fit",), inputs=(adapter,))


def test_fused_qkv_whose_rows_do_not_split_is_refused_where_it_must_be_split(flux, tmp_path):
    """A kohya Flux `img_attn.qkv` with 97 B rows: validate, merge and --to peft/diffusers (which split it
    into to_q/to_k/to_v) refuse naming the module; --to kohya keeps BFL names and copies it unsplit."""
    adapter = _write(tmp_path, "qkv", kohya({"lora_unet_double_blocks_0_img_attn_qkv": (3 * D + 1, D)}))
    needles = (adapter.name, "lora_unet_double_blocks_0_img_attn_qkv", "97 rows, not a multiple of 3")
    for command in ("validate", "merge", "peft", "diffusers"):
        refused(_args(command, adapter, tmp_path / "out", flux), tmp_path, needles, inputs=(adapter,))


def test_flux_names_the_table_does_not_know_are_refused_by_convert(flux, tmp_path):
    """A kohya Flux module the family table does not know (`img_attn_zzz`) beside known ones: converting it to
    diffusers names would write a name diffusers does not load, so peft/diffusers are refused; `--to kohya`
    keeps the file's own kohya name (what its readers loaded before), with the reader's warning; merge
    names it as unmatched."""
    adapter = _write(tmp_path, "unknown", kohya({"lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D),
                                                 "lora_unet_double_blocks_0_img_attn_zzz": (D, D)}))
    for command in ("peft", "diffusers"):
        refused(_args(command, adapter, tmp_path / "out", flux), tmp_path,
                (adapter.name, "lora_unet_double_blocks_0_img_attn_zzz", "not in Flux"), inputs=(adapter,))
    out = tmp_path / "same.safetensors"
    result = run_cli("convert", adapter, "--to", "kohya", "--out", out, env=ENV)
    assert result.returncode == 0 and "img_attn_zzz" in result.stderr, result.stderr
    written = {key.rsplit(".", 2)[0] for key in load_file(str(out)) if key.endswith(".lora_down.weight")}
    assert written == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_zzz"}
    out.unlink()
    refused(_args("merge", adapter, tmp_path / "out", flux), tmp_path, ("does not fit: 1 of 2",), inputs=(adapter,),
            warnings=True)


def test_names_of_two_families_are_refused_by_convert(flux, tmp_path):
    """Flux's `double_blocks_0_img_attn_qkv` beside Wan's `blocks_0_self_attn_q` in one file: no diffusers
    names exist for it (refused); `--to kohya` writes the file's own names back, unchanged."""
    adapter = _write(tmp_path, "two", kohya({"lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D),
                                             "lora_unet_blocks_0_self_attn_q": (D, D)}))
    for command in ("peft", "diffusers"):
        refused(_args(command, adapter, tmp_path / "out", None), tmp_path,
                (adapter.name, "lora_unet_blocks_0_self_attn_q", "not in Flux"), inputs=(adapter,))
    out = tmp_path / "same.safetensors"
    assert run_cli("convert", adapter, "--to", "kohya", "--out", out, env=ENV).returncode == 0
    assert set(load_file(str(out))) == set(load_file(str(adapter)))
    out.unlink()


@pytest.mark.parametrize("module", ["lora_unet_double_blocks_0_img[red]attn_qkv\x1b[31m",
                                    "diffusion_model.double_blocks.0.[red]img_attn\x1b]0;owned\x07.qkv"])
def test_markup_and_escapes_in_module_names_are_printed_literally_and_clean(module, flux, tmp_path):
    adapter = _write(tmp_path, "markup", kohya({module: (3 * D, D)}))
    result = run_cli("validate", adapter, "--base", flux, env=ENV)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "[red]" in result.stdout and "\x1b" not in result.stdout + result.stderr and "\x07" not in result.stdout


def test_markup_and_escapes_in_a_lycoris_error_line(base, tmp_path):
    name = "lora_unet_x[red]\x1b[31m"
    adapter = _write(tmp_path, "lyco", {f"{name}.hada_w1_a": rn(8, 2), f"{name}.hada_w1_b": rn(3, 4),
                                        f"{name}.hada_w2_a": rn(8, 2), f"{name}.hada_w2_b": rn(2, 4)})
    line = refused(["inspect", adapter], tmp_path, ("lora_unet_x[red]", "do not fit"), inputs=(adapter,))
    assert "\x1b" not in line


# ---------------------------------------------------------------------------------------------
# PEFT weights without adapter_config.json: --alpha


@pytest.mark.parametrize("alpha, needle", [("nan", "nan is not a finite number"),
                                           ("1e400", "beyond ±1.8e308"),
                                           ("-inf", "-inf is not a finite number"),
                                           ("-1", "-1 is not a lora_alpha (> 0)"),
                                           ("0", "0 is not a lora_alpha (> 0)")])
def test_alpha_option_that_is_no_lora_alpha_is_a_usage_error(alpha, needle, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(H.EXAMPLES / "tiny-lora" / "adapter_model.safetensors", weights)
    for args in (["merge", "--base", H.BASE, weights, "--out", tmp_path / "out", "--device", "cpu"],
                 ["convert", weights, "--to", "kohya", "--out", tmp_path / "out.safetensors"],
                 ["resize", weights, "--rank", "2", "--out", tmp_path / "out"],
                 ["blend", weights, weights, "-w", "1,1", "--out", tmp_path / "out"]):
        refused([*args, "--alpha", alpha], tmp_path, ("--alpha", needle), code=2,
                inputs=(weights / "adapter_model.safetensors",))


# ---------------------------------------------------------------------------------------------
# a huge rank claimed by a small file


def test_loha_whose_rank_product_exceeds_the_matrix_is_factored_through_its_delta(base, tmp_path):
    """A LoHa's exact LoRA factorisation has rank r1·r2: 512·512 = 262,144 on an 8 × 16 layer from a 200 KB
    file (8,192 and a 1 MB file: 64 GB of factors). Past min(n, k) the factors split ΔW itself (rank 8),
    exactly: the converted file's ΔW is LyCORIS's forward delta."""
    from safetensors.torch import load_file

    r = 512
    tensors = loha(hada_w1_a=rn(8, r), hada_w1_b=rn(r, 16), hada_w2_a=rn(8, r), hada_w2_b=rn(r, 16),
                   alpha=torch.tensor(4.0))
    adapter = _write(tmp_path, "wide", tensors)
    run_cli("convert", adapter, "--to", "kohya", "--base", base, "--out", tmp_path / "k.safetensors", check=True,
            env=ENV)
    out = load_file(str(tmp_path / "k.safetensors"))
    down, up, alpha = (out[f"{M}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert down.shape == (8, 16) and up.shape == (8, 8)
    t = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
    delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (4.0 / r)
    torch.testing.assert_close(up @ down * (alpha / 8), delta, rtol=1e-5, atol=1e-7)
    info = json.loads(run_cli("inspect", adapter, "--json", check=True, env=ENV).stdout)
    assert info["rank"] == 8


@pytest.mark.parametrize("command", COMMANDS)
def test_kohya_alpha_zero_is_refused_by_every_operation(command, base, tmp_path):
    """A plain kohya LoRA with alpha 0: kohya's scripts read it as alpha = rank (scale 1), diffusers and
    ComfyUI as scale 0. Either guess would silently be wrong for someone: every operation that needs the
    scale refuses, naming the tensor; inspect and validate (shapes) say it in a warning."""
    tensors = {"lora_unet_lin.lora_down.weight": rn(2, 16), "lora_unet_lin.lora_up.weight": rn(8, 2),
               "lora_unet_lin.alpha": torch.tensor(0.0)}
    adapter = _write(tmp_path, "alpha0", tensors)
    args = _args(command, adapter, tmp_path / "out", base)
    if command in ("inspect", "validate"):
        result = run_cli(*args, env=ENV)
        assert result.returncode == 0 and "alpha 0" in result.stdout + result.stderr, result.stdout + result.stderr
        return
    refused(args, tmp_path, (adapter.name, "lora_unet_lin.alpha", "alpha is 0", "kohya", "ComfyUI"),
            inputs=(adapter, base), warnings=True)
