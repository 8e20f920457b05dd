"""One CLI dialect (issue 11 §4): the same concept is the same flag with the same values in every
command, exit codes are the README's (0 ok, 1 invalid input or failed check, 2 usage error), every
failure is one `error: …` line (and with --json a JSON object on stdout), the same quantity has the
same JSON key everywhere (docs/json.md, checked both ways), validate's headline names the check that
failed, and the demo prints commands that run as shown. Also §6: the README's install notes.
"""
from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import click
import pytest
from cli_runner import run_cli
from safetensors import safe_open

from lorahub.cli import cli

ROOT = Path(__file__).resolve().parent.parent
COMPUTING = ("merge", "unmerge", "resize", "blend", "interpolate")


def _params(command: str) -> dict[str, click.Parameter]:
    """The command's options by their long name."""
    return {opt: param for param in cli.commands[command].params for opt in param.opts if opt.startswith("--")}


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _one_error_line(result) -> str:
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "Usage:" not in result.stderr
    return lines[0]


def _stored_dtypes(path: Path) -> set[str]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    dtypes = set()
    for file in files:
        with safe_open(str(file), "pt") as handle:
            dtypes |= {str(handle.get_slice(k).get_dtype()) for k in handle.keys()}
    return dtypes


# ----------------------------------------------------------------------------------------------
# same concept, same flag, same values


def test_dtype_is_one_value_set_with_default_auto_everywhere():
    for command in COMPUTING:
        param = _params(command)["--dtype"]
        assert list(param.type.choices) == ["auto", "fp32", "fp16", "bf16"], command
        assert param.default == "auto", command
        assert set(param.opts) == {"--dtype"}, command  # no --save-dtype
    assert "--save-dtype" not in _params("resize")


@pytest.mark.parametrize("value, stored", [("bf16", "BF16"), ("float16", "F16"), ("auto", "F32")])
def test_dtype_values_mean_the_same_in_resize_and_blend(tmp_path, peft_lora_dir, value, stored):
    """fp32|fp16|bf16 (float32|float16|bfloat16 read as the same) or auto: keep the input's (F32 here)."""
    run_cli("resize", peft_lora_dir, "--rank", 2, "--dtype", value, "--out", tmp_path / "r", check=True)
    run_cli("blend", peft_lora_dir, peft_lora_dir, "-w", "1,1", "--dtype", value, "--out", tmp_path / "b",
            check=True)
    assert _stored_dtypes(tmp_path / "r") == _stored_dtypes(tmp_path / "b") == {stored}


def test_device_is_auto_cpu_cuda_n_with_default_auto_everywhere():
    for command in COMPUTING:
        param = _params(command)["--device"]
        assert param.default == "auto", command  # resize defaulted to cpu
        for value in ("auto", "cpu", "cuda", "cuda:1", "CPU"):
            assert param.type.convert(value, param, None) == value.lower(), (command, value)


@pytest.mark.parametrize("command", COMPUTING)
def test_a_device_outside_the_set_is_a_usage_error(tmp_path, tiny_llama_dir, peft_lora_dir, command):
    args = {"merge": ("merge", "--base", tiny_llama_dir, peft_lora_dir),
            "unmerge": ("unmerge", "--base", tiny_llama_dir, peft_lora_dir),
            "resize": ("resize", peft_lora_dir, "--rank", 2),
            "blend": ("blend", peft_lora_dir, peft_lora_dir, "-w", "1,1"),
            "interpolate": ("interpolate", peft_lora_dir, peft_lora_dir, "-t", "0.5")}[command]
    result = run_cli(*args, "--device", "meta", "--out", tmp_path / "o")
    assert result.returncode == 2
    assert "'meta' is not a device (use auto, cpu, cuda or cuda:N)" in _one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_resize_runs_on_device_auto_by_default(tmp_path, peft_lora_dir):
    from lorahub.devices import resolve_device

    payload = json.loads(run_cli("resize", peft_lora_dir, "--rank", 2, "--out", tmp_path / "r", "--json",
                                 check=True).stdout)
    assert payload["device"] == str(resolve_device("auto"))


def test_dynamic_rank_option_has_one_name_in_resize_and_blend(tmp_path, peft_lora_dir):
    resize, blend = _params("resize"), _params("blend")
    for params in (resize, blend, _params("interpolate")):
        assert set(params["--rank-method"].opts) == {"--rank-method"}
        assert list(params["--rank-method"].type.choices) == ["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]
        assert params["--rank-method"].default == "fixed"
        assert "--param" in params
    assert "--method" not in resize  # resize's old alias (blend's --method is the blend method)
    old = run_cli("resize", peft_lora_dir, "--method", "sv_fro", "--param", "0.9", "--out", tmp_path / "x")
    assert old.returncode == 2 and "--method" in _one_error_line(old)
    new = run_cli("resize", peft_lora_dir, "--rank-method", "sv_fro", "--param", "0.9", "--out", tmp_path / "r",
                  "--json", check=True)
    assert json.loads(new.stdout)["options"]["rank_method"] == "sv_fro"


def test_split_takes_the_same_values_in_resize_and_blend(tmp_path, peft_lora_dir):
    import torch

    from lorahub.formats import load_adapter

    assert list(_params("resize")["--split"].type.choices) == list(_params("blend")["--split"].type.choices) \
        == ["balanced", "up", "down"]
    run_cli("resize", peft_lora_dir, "--rank", 3, "--split", "down", "--out", tmp_path / "d", check=True)
    for layer in load_adapter(tmp_path / "d").layers.values():  # down: B = U, orthonormal columns
        up, _ = layer.factors(dtype=torch.float64)
        assert torch.allclose(up.T @ up, torch.eye(layer.rank, dtype=torch.float64), atol=1e-5)


def test_show_every_layer_has_one_name(peft_lora_dir, tmp_path):
    for path in (("inspect",), ("validate",), ("resize",), ("blend",), ("interpolate",)):
        assert "--all-layers" in _params(path[0]), path
    for name, command in cli.commands.items():
        params = command.params if not isinstance(command, click.Group) else []
        assert not any("--layers" in p.opts for p in params), name
    result = run_cli("inspect", peft_lora_dir, "--all-layers", check=True)
    assert "model.layers.1.mlp.down_proj" in result.stdout


def test_interpolate_takes_short_t(tmp_path, peft_lora_dir, peft_rslora_dir):
    short = json.loads(run_cli("interpolate", peft_lora_dir, peft_rslora_dir, "-t", "0.25", "--out", tmp_path / "a",
                               "--json", check=True).stdout)
    long = json.loads(run_cli("interpolate", peft_lora_dir, peft_rslora_dir, "--t", "0.25", "--out", tmp_path / "b",
                              "--json", check=True).stdout)
    assert [a["weight"] for a in short["adapters"]] == [a["weight"] for a in long["adapters"]] == [0.75, 0.25]


# ----------------------------------------------------------------------------------------------
# exit codes: 0 ok, 1 invalid input or failed check, 2 usage error — whoever finds the problem


def _usage_cases(tmp_path, base, lora, rslora):
    out = ("--out", tmp_path / "o")
    return {
        "resize --rank 0": ("resize", lora, "--rank", "0", *out),
        "blend --rank 0": ("blend", lora, rslora, "-w", "1,1", "--rank", "0", *out),
        "resize --conv-rank 0": ("resize", lora, "--rank", "2", "--conv-rank", "0", *out),
        "resize without --rank": ("resize", lora, *out),
        "resize --rank-method without --param": ("resize", lora, "--rank-method", "sv_fro", *out),
        "resize --param without --rank-method": ("resize", lora, "--param", "0.9", *out),
        "resize --param out of range": ("resize", lora, "--rank-method", "sv_fro", "--param", "1.5", *out),
        "blend --param out of range": ("blend", lora, rslora, "-w", "1,1", "--rank-method", "sv_ratio",
                                       "--param", "0.5", *out),
        "blend --param without --rank-method": ("blend", lora, rslora, "-w", "1,1", "--param", "0.9", *out),
        "blend one weight for two adapters": ("blend", lora, rslora, "-w", "1", *out),
        "blend weights not numbers": ("blend", lora, rslora, "-w", "1,x", *out),
        "blend weight not finite": ("blend", lora, rslora, "-w", "1,nan", *out),
        "blend DARE --density 0": ("blend", lora, rslora, "-w", "1,1", "--method", "dare_linear",
                                   "--density", "0", *out),
        "blend ties without --density": ("blend", lora, rslora, "-w", "1,1", "--method", "ties", *out),
        "blend --density with cat": ("blend", lora, rslora, "-w", "1,1", "--method", "cat", "--density", "0.5",
                                     *out),
        "blend --rank with cat": ("blend", lora, rslora, "-w", "1,1", "--method", "cat", "--rank", "4", *out),
        "interpolate -t nan": ("interpolate", lora, rslora, "-t", "nan", *out),
        "merge weight not finite": ("merge", "--base", base, f"{lora}:inf", *out),
        "merge --dtype fp8": ("merge", "--base", base, lora, "--dtype", "fp8", *out),
        "validate --max-rank 0": ("validate", lora, "--base", base, "--max-rank", "0"),
        "registry add bad name": ("registry", "add", base, "--name", "Bad Name!"),
        "unknown option": ("convert", lora, "--to", "kohya", "--no-such-option", *out),
        "missing option": ("convert", lora, *out),
    }


def test_option_errors_are_usage_errors_in_every_command(tmp_path, monkeypatch, tiny_llama_dir, peft_lora_dir,
                                                         peft_rslora_dir):
    """Exit 2 and one `error:` line, whether Click, the command or the library finds it (resize's
    `--rank 0` exited 1, blend's 2; a wrong number of weights exited 1)."""
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "home"))
    failures = []
    for label, args in _usage_cases(tmp_path, tiny_llama_dir, peft_lora_dir, peft_rslora_dir).items():
        result = run_cli(*args)
        lines = _error_lines(result)
        if result.returncode != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
            failures.append(f"{label}: exit {result.returncode}, stderr {result.stderr!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "o").exists()


def test_required_options_have_no_default():
    """Click ≥ 8.3 takes an explicit `default=None` as a value given: a required option declared that
    way is never reported missing (`convert` without --to wrote a folder and exited 0)."""
    offenders = []
    for path in _leaves(cli):
        command = cli
        for name in path:
            command = command.commands[name]
        offenders += [f"{' '.join(path)} {p.opts[0]}" for p in command.params
                      if isinstance(p, click.Option) and p.required and p.default is None and p.name != "out"]
    assert not offenders


def test_a_missing_out_is_a_usage_error(peft_lora_dir):
    result = run_cli("resize", peft_lora_dir, "--rank", "2")
    assert result.returncode == 2 and "--out" in _one_error_line(result)


def test_usage_errors_come_before_reading_any_input(tmp_path):
    """A usage error is reported as such even when the inputs do not exist (they are never read)."""
    missing = tmp_path / "missing"
    for args in (("resize", missing, "--rank", "0"), ("resize", missing, "--rank-method", "sv_fro"),
                 ("blend", missing, missing, "-w", "1"), ("blend", missing, missing, "-w", "1,1", "--method", "ties"),
                 ("interpolate", missing, missing, "-t", "inf")):
        result = run_cli(*args, "--out", tmp_path / "o")
        assert result.returncode == 2, (args, result.stderr)
    # and invalid input stays exit 1, in every command that reads an adapter (push's was Click's exit 2)
    for args in (("resize", missing, "--rank", "2", "--out", tmp_path / "o"), ("inspect", missing),
                 ("push", missing, "alice/x"), ("convert", missing, "--to", "peft", "--out", tmp_path / "o")):
        result = run_cli(*args)
        assert result.returncode == 1 and "no such file" in _one_error_line(result), (args, result.stderr)


def test_library_option_errors_are_option_errors(peft_lora_dir):
    """The library raises `OptionError` (a LorahubError, exit code 2) for option values, so the CLI's
    usage errors come from one place whoever checks them."""
    from lorahub.blend import blend
    from lorahub.errors import LorahubError, OptionError
    from lorahub.formats import load_adapter
    from lorahub.resize import resize_adapter

    adapter = load_adapter(peft_lora_dir)
    assert issubclass(OptionError, LorahubError) and OptionError.exit_code == 2
    for call in (lambda: resize_adapter(adapter, rank=0), lambda: resize_adapter(adapter, method="sv_fro"),
                 lambda: blend([adapter, adapter], [1.0]), lambda: blend([adapter], [1.0], method="ties"),
                 lambda: blend([adapter], [math.nan])):
        with pytest.raises(OptionError):
            call()


# ----------------------------------------------------------------------------------------------
# one error style; with --json, errors are JSON on stdout too


def test_usage_errors_are_one_error_line(peft_lora_dir):
    for args in (("resize", peft_lora_dir, "--rank", "0", "--out", "x"), ("--no-such-flag",),
                 ("inspect",), ("blend", peft_lora_dir, "--out", "x")):
        result = run_cli(*args)
        assert result.returncode == 2
        line = _one_error_line(result)
        assert "--help" in line  # where to read the options


@pytest.mark.parametrize("where", ["first", "last"])
def test_json_errors_are_json_on_stdout(tmp_path, peft_lora_dir, where):
    """With --json anywhere among a command's arguments, a failure is `{"ok": false, "error", "exit_code"}`
    on stdout (the same message as the stderr line), whether parsing or the work failed."""
    cases = [
        (("resize",), (peft_lora_dir, "--rank", "0", "--out", tmp_path / "o"), 2, "0 is not in the range"),
        (("blend",), (peft_lora_dir, peft_lora_dir, "-w", "1", "--out", tmp_path / "o"), 2,
         "2 adapters but 1 weights"),
        (("resize",), (peft_lora_dir, "--device", "meta", "--rank", "2", "--out", tmp_path / "o"), 2, "not a device"),
        (("convert",), (peft_lora_dir, "--out", tmp_path / "o"), 2, "missing option '--to'"),
        (("inspect",), (tmp_path / "missing",), 1, "no such file"),
        (("registry", "show"), ("no-such-base",), 1, "no registry manifest"),
    ]
    for command, args, code, text in cases:
        argv = (*command, "--json", *args) if where == "first" else (*command, *args, "--json")
        result = run_cli(*argv)
        assert result.returncode == code, (argv, result.stderr)
        payload = json.loads(result.stdout)
        assert list(payload) == ["ok", "error", "exit_code"], payload
        assert payload["ok"] is False and payload["exit_code"] == code and text in payload["error"], payload
        assert _one_error_line(result).startswith(f"error: {payload['error']}")


def test_failed_checks_are_json_failures_that_keep_their_report(tmp_path, tiny_llama_dir, peft_lora_dir,
                                                               peft_wide_dir):
    result = run_cli("validate", peft_wide_dir, "--base", tiny_llama_dir, "--json")
    payload = json.loads(result.stdout)
    assert result.returncode == payload["exit_code"] == 1 and payload["ok"] is False
    assert payload["error"] == payload["headline"] and payload["problems"]
    assert _one_error_line(result) == f"error: {payload['headline']}"
    merge = run_cli("merge", "--base", tiny_llama_dir, peft_wide_dir, "--out", tmp_path / "m", "--device", "cpu",
                    "--json")
    payload = json.loads(merge.stdout)
    assert merge.returncode == payload["exit_code"] == 1 and payload["ok"] is False
    assert payload["error"].startswith("merge refused:") and payload["validation"]["problems"]
    assert _one_error_line(merge) == f"error: {payload['error']}"


# ----------------------------------------------------------------------------------------------
# the JSON contract: docs/json.md, both ways


def _documented_keys() -> dict[str, tuple[set[str], set[str]]]:
    """command → (keys always present, keys present in some runs), from docs/json.md's table."""
    text = (ROOT / "docs" / "json.md").read_text()
    out = {}
    for row in re.findall(r"^\| `lorahub ([a-z ]+)` \| ([^|]+) \|", text, flags=re.M):
        command, cell = row
        keys = re.findall(r"`([a-z_]+\??)`", cell)
        out[command] = ({k for k in keys if not k.endswith("?")}, {k[:-1] for k in keys if k.endswith("?")})
    return out


def _check(payload: dict, command: str, documented) -> None:
    required, optional = documented[command]
    keys = set(payload)
    assert required <= keys, f"{command}: documented but missing {sorted(required - keys)}"
    assert keys <= required | optional, f"{command}: undocumented {sorted(keys - required - optional)}"
    if command != "registry list":
        assert list(payload)[0] == "ok"


def test_every_command_json_has_the_documented_keys(tmp_path, monkeypatch, hub_server, tiny_llama_dir,
                                                    tiny_llama_sharded_dir, peft_lora_dir, peft_rslora_dir):
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "home"))
    documented = _documented_keys()
    assert set(documented) >= {" ".join(path) for path in _leaves(cli)}, "a command is missing from docs/json.md"

    def run(*args, token=None):
        result = run_cli(*args, "--json", env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": None})
        assert result.returncode == 0, result.stderr + result.stdout
        return json.loads(result.stdout)

    payloads = {
        "inspect": run("inspect", peft_lora_dir),
        "validate": run("validate", peft_lora_dir, "--base", tiny_llama_dir),
        "convert": run("convert", peft_lora_dir, "--to", "kohya", "--out", tmp_path / "k.safetensors"),
        "merge": run("merge", "--base", tiny_llama_dir, f"{peft_lora_dir}:0.5", "--out", tmp_path / "m",
                     "--device", "cpu"),
        "resize": run("resize", peft_rslora_dir, "--rank", "3", "--out", tmp_path / "r"),
        "blend": run("blend", peft_lora_dir, peft_rslora_dir, "-w", "0.5,0.5", "--out", tmp_path / "b"),
        "interpolate": run("interpolate", peft_lora_dir, peft_rslora_dir, "-t", "0.5", "--out", tmp_path / "i"),
        "registry list": run("registry", "list"),
        "registry show": run("registry", "show", "llama-3-8b"),
        "registry add": run("registry", "add", tiny_llama_sharded_dir, "--name", "tiny-json-keys"),
        "demo": run("demo", "--workdir", tmp_path / "demo"),
    }
    payloads["unmerge"] = run("unmerge", "--base", tmp_path / "m", f"{peft_lora_dir}:0.5", "--out", tmp_path / "u",
                              "--device", "cpu")
    payloads["registry remove"] = run("registry", "remove", "tiny-json-keys")
    repo_id = hub_server.new_repo_id(prefix="json-keys")
    payloads["push"] = run("push", peft_lora_dir, repo_id, token=hub_server.alice)
    payloads["pull"] = run("pull", repo_id, "--out", tmp_path / "pulled", token=hub_server.alice)
    for command, payload in payloads.items():
        if command == "registry list":
            assert isinstance(payload, list) and payload
            for entry in payload:
                _check(entry, command, documented)
        else:
            _check(payload, command, documented)
    # variants: keys that come and go as the table says
    _check(run("inspect", peft_lora_dir, "--headers-only"), "inspect", documented)
    assert "nonfinite" not in run("inspect", peft_lora_dir, "--headers-only")
    assert "tensor_shapes" in run("registry", "show", "llama-3-8b", "--tensors")

    # one quantity, one key: what resize/blend/convert report about their output is what inspect reads there
    for command, out in (("resize", tmp_path / "r"), ("blend", tmp_path / "b"), ("interpolate", tmp_path / "i")):
        written = run("inspect", out)
        for key in ("modules", "rank", "rank_distribution", "alpha", "alpha_distribution", "scale",
                    "scale_distribution", "params"):
            assert payloads[command][key] == written[key], (command, key)
        assert Path(payloads[command]["out"]) == Path(written["path"])
    assert payloads["convert"]["modules"] == run("inspect", tmp_path / "k.safetensors")["modules"]
    source = payloads["inspect"]
    for command in ("validate", "convert"):
        assert payloads[command]["path"] == source["path"] and payloads[command].get("modules") == source["modules"]
    assert payloads["resize"]["path"] == run("inspect", peft_rslora_dir)["path"]
    assert payloads["merge"]["adapters"][0]["path"] == source["path"] == payloads["blend"]["adapters"][0]["path"]
    for command in ("merge", "unmerge"):
        entry = payloads[command]["adapters"][0]
        assert entry["modules"] == source["modules"] and entry["weight"] == 0.5 and entry["format"] == "peft"
    for command in ("resize", "blend", "interpolate", "merge", "unmerge"):
        assert isinstance(payloads[command]["seconds"], (int, float)), command
        assert re.fullmatch(r"cpu|cuda:\d+", payloads[command]["device"]), command
    assert set(payloads["resize"]["summary"]) >= {"energy_retained_mean", "energy_retained_min"}
    assert set(payloads["blend"]["summary"]) >= {"energy_retained_mean", "energy_retained_min"}
    layer_keys = set(payloads["resize"]["layers"][0]) & set(payloads["blend"]["layers"][0])
    assert {"target", "kind", "rank", "energy_retained", "fro_retained"} <= layer_keys
    assert payloads["pull"]["inspect"]["params"] == source["params"] and "ok" not in payloads["pull"]["inspect"]


def _leaves(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            out += _leaves(command, path + (name,))
        else:
            out.append(path + (name,))
    return out


# ----------------------------------------------------------------------------------------------
# validate says what failed


def test_validate_headline_names_a_rank_limit(tiny_llama_dir, peft_lora_dir):
    result = run_cli("validate", peft_lora_dir, "--base", tiny_llama_dir, "--max-rank", "4")
    assert result.returncode == 1
    headline = result.stdout.splitlines()[0]
    assert "does not fit" not in headline and "do not match" not in headline
    assert headline.startswith("✗ rank limit exceeded:") and "--max-rank 4" in headline
    assert "their shapes fit" in headline
    assert _one_error_line(result) == "error: " + headline.removeprefix("✗ ")
    payload = json.loads(run_cli("validate", peft_lora_dir, "--base", tiny_llama_dir, "--max-rank", "4",
                                 "--json").stdout)
    assert payload["headline"] == headline.removeprefix("✗ ")
    assert {p["kind"] for p in payload["problems"]} == {"max_rank"}


def test_validate_headline_names_both_failures(tiny_llama_dir, peft_wide_dir):
    payload = json.loads(run_cli("validate", peft_wide_dir, "--base", tiny_llama_dir, "--max-rank", "4",
                                 "--json").stdout)
    assert payload["headline"].startswith("does not fit:") and "rank over --max-rank 4" in payload["headline"]
    plain = json.loads(run_cli("validate", peft_wide_dir, "--base", tiny_llama_dir, "--json").stdout)
    assert plain["headline"].startswith("does not fit:") and "max-rank" not in plain["headline"]


# ----------------------------------------------------------------------------------------------
# the demo prints commands that can be re-run as shown


def _demo_commands(*args) -> list[tuple[str, list[str]]]:
    payload = json.loads(run_cli("demo", *args, "--json", check=True).stdout)
    steps = []
    for step in payload["steps"]:
        assert step["text"].splitlines()[0] == step["command"]
        steps.append((step["step"], shlex.split(step["command"])))
    return steps


def _rerun(steps) -> None:
    for name, argv in steps:
        assert argv[0] == "lorahub"
        result = run_cli(*argv[1:])
        expected = 1 if name == "validate (wrong base)" else 0
        assert result.returncode == expected, (name, argv, result.stderr[-1000:])


def test_demo_commands_rerun_as_shown_after_the_temporary_directory_is_gone():
    steps = _demo_commands()
    assert [name for name, _ in steps] == ["inspect", "validate", "validate (wrong base)", "convert", "merge",
                                           "unmerge", "resize", "interpolate"]
    for _, argv in steps:  # real paths: absolute, and the example's exist
        paths = [a for a in argv[2:] if "/" in a]
        assert paths and all(Path(p).is_absolute() for p in paths), argv
    inputs = {a for _, argv in steps for a in argv if "examples" in a}
    assert inputs and all(Path(p).exists() for p in inputs)
    outputs = {Path(argv[argv.index("--out") + 1]) for _, argv in steps if "--out" in argv}
    assert outputs and not any(p.exists() for p in outputs)  # the demo removed them ...
    _rerun(steps)  # ... and the commands, run in order, write them again
    assert all(p.exists() for p in outputs)
    import shutil

    shutil.rmtree(next(iter(outputs)).parent)


def test_demo_commands_rerun_over_a_kept_workdir_with_a_space_in_its_name(tmp_path):
    workdir = tmp_path / "my demo"
    steps = _demo_commands("--workdir", workdir)
    outs = [argv[argv.index("--out") + 1] for _, argv in steps if "--out" in argv]
    assert outs and all(out.startswith(str(workdir.resolve()) + "/") for out in outs)
    _rerun(steps)  # over the demo's own outputs (`--overwrite` where a command takes it)


# ----------------------------------------------------------------------------------------------
# §6: the install notes are true, and CI runs the README's test command


def test_readme_install_notes_and_ci_command_agree():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    quickstart = re.search(r"# 2\..*\n(pip install .*)\n", readme).group(1)
    assert quickstart in ci.splitlines() and "pip install torch==2.13.0" in quickstart
    assert f"Tests: `{quickstart}`" in readme
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme
    # the old claim: a version pin does not keep pip from pulling CUDA wheels from PyPI
    assert "keeps pip from pulling" not in readme
