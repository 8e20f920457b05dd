"""The rules every command follows, checked over all of them: `--help` with an example that parses,
`--json` that parses, exit code 2 for usage errors, NO_COLOR, inputs never modified, outputs never
half-written, and docs/README command lines that match the real CLI.

Commands are enumerated from the Click group itself, so a new command is covered without editing
this file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from cli_runner import run_cli
from safetensors import safe_open
from safetensors.torch import load_file

from lorahub.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def _walk(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, command in sorted(group.commands.items()):
        out.append((path + (name,), command))
        if isinstance(command, click.Group):
            out.extend(_walk(command, path + (name,)))
    return out


ALL = _walk(cli)
GROUPS = [("lorahub",)] + [path for path, cmd in ALL if isinstance(cmd, click.Group)]
LEAVES = [path for path, cmd in ALL if not isinstance(cmd, click.Group)]
ids = " ".join


def _command(path: tuple[str, ...]) -> click.Command:
    cmd = cli
    for name in path:
        if name != "lorahub":
            cmd = cmd.commands[name]
    return cmd


def test_the_command_list_is_complete():
    """The enumeration the parametrized tests below run over is the one the issues ask for."""
    names = {" ".join(path) for path, _ in ALL}
    assert {"inspect", "convert", "validate", "registry", "registry list", "registry show", "registry add",
            "merge", "unmerge", "resize", "blend", "interpolate", "pull", "push", "demo"} <= names


# ----------------------------------------------------------------------------------------------
# command lines in help texts and docs are checked against the real parser


FLAG = re.compile(r"(?<![\w/.\-])(--?[a-zA-Z][\w-]*)")
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")


def _options(cmd: click.Command) -> set[str]:
    out = {"-h", "--help"}
    for param in cmd.params:
        out.update(param.opts)
        out.update(param.secondary_opts)
    return out


def check_command_line(line: str, *, full_parse: bool = True) -> None:
    """`lorahub …` as written in a doc or help text: the command exists, every flag named exists on
    it, and (for concrete lines without [optional] / a|b / … placeholders) Click parses it."""
    line = ENV_PREFIX.sub("", line.replace("\\|", "|")).strip()
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        tokens = line.split()
    assert tokens and tokens[0] == "lorahub", line
    cmd, path, i = cli, ["lorahub"], 1
    # parse under the group's context, as the CLI does (help_option_names come from it; a command's
    # help option is cached on first use, so parsing without it would drop `-h` for later tests)
    ctx = click.Context(cli, info_name="lorahub", **cli.context_settings)
    while i < len(tokens) and isinstance(cmd, click.Group):
        token = tokens[i]
        if token.startswith("-") or "…" in token:
            assert token.startswith("…") or token in _options(cmd), f"{' '.join(path)} has no option {token}"
            i += 1
            continue
        if "|" in token:  # `lorahub registry list|show|add`
            missing = [name for name in token.split("|") if name not in cmd.commands]
            assert not missing, f"no command {missing} under {' '.join(path)}"
            return
        assert token in cmd.commands, f"no command '{token}' under {' '.join(path)}"
        cmd = cmd.commands[token]
        path.append(token)
        i += 1
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=token, parent=ctx)
    rest = tokens[i:]
    known = _options(cmd)
    for flag in FLAG.findall(shlex.join(rest)):
        assert flag in known, f"`{' '.join(path)}` has no option {flag}"
    concrete = not re.search(r"[\[\]|…]|\.\.\.", " ".join(rest))
    if not (full_parse and concrete and rest) or isinstance(cmd, click.Group):
        return
    try:
        cmd.make_context(path[-1], list(rest), parent=ctx, resilient_parsing=False)
    except click.exceptions.UsageError as exc:
        message = exc.format_message()
        # a path that does not exist here, or an UPPERCASE placeholder given to a typed option, is fine
        if "does not exist" in message or re.search(r"'[A-Z][A-Z0-9_]*'", message):
            return
        raise AssertionError(f"`{line}`: {message}") from None


def example_lines(help_text: str) -> list[str]:
    lines, inside = [], False
    for raw in help_text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("Example"):
            inside = True
            continue
        if inside:
            if not stripped or not raw.startswith(" "):
                inside = False
                continue
            lines.append(stripped)
    return lines


@pytest.mark.parametrize("path", GROUPS + LEAVES, ids=ids)
def test_help_has_an_example_that_parses(path):
    args = [p for p in path if p != "lorahub"]
    result = run_cli(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout, f"`lorahub {' '.join(args)} --help` shows no example"
    examples = example_lines(result.stdout)
    prefix = " ".join(["lorahub", *args])
    assert any(e == prefix or e.startswith(prefix + " ") for e in examples), examples
    for example in examples:
        check_command_line(example)
    short = run_cli(*args, "-h")
    assert short.stdout == result.stdout, short.stderr[-2000:]


def _doc_command_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, `lorahub …` text, is in a code block) for every command line in a markdown file."""
    out: list[tuple[int, str, bool]] = []
    in_code, previous = False, None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_code, previous = not in_code, None
            continue
        if in_code:
            if previous is not None and raw[:1].isspace() and stripped.startswith(("[", "--")):
                n, text, code = out[previous]  # continuation of a multi-line synopsis
                out[previous] = (n, f"{text} {stripped}", code)
                continue
            previous = None
            text = stripped[2:] if stripped.startswith("$ ") else stripped
            for part in text.split("&&"):
                part = ENV_PREFIX.sub("", part.strip())
                if part == "lorahub" or part.startswith("lorahub "):
                    out.append((number, part, True))
                    previous = len(out) - 1
        else:
            for match in re.finditer(r"`(lorahub(?: [^`]*)?)`", raw):
                out.append((number, match.group(1), False))
    return out


def test_docs_and_readme_command_lines_match_the_cli():
    files = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    failures, checked = [], 0
    for path in files:
        for number, line, in_code in _doc_command_lines(path):
            checked += 1
            try:
                check_command_line(line, full_parse=in_code)
            except AssertionError as exc:
                failures.append(f"{path.relative_to(ROOT)}:{number}: {exc}")
    assert checked > 80  # the scanner found the docs' command lines
    assert not failures, "\n".join(failures)


def test_demo_prints_real_commands(tmp_path):
    """Each demo step is headed by the command it stands for; those command lines parse."""
    payload = json.loads(run_cli("demo", "--workdir", tmp_path / "demo", "--json", check=True).stdout)
    heads = [step["text"].splitlines()[0] for step in payload["steps"]]
    assert len(heads) >= 7 and all(head.startswith("lorahub ") for head in heads), heads
    for head in heads:
        check_command_line(re.sub(r"\s{2,}\(.*\)$", "", head))


def test_the_checker_catches_drift():
    """check_command_line is not a no-op: it rejects commands, flags and values the CLI lacks."""
    for bad in ("lorahub frobnicate x", "lorahub resize a --rank 4 --out b --no-such-flag",
                "lorahub convert a --to onnx --out b", "lorahub registry list|show|delete",
                "lorahub blend a b --weights 1,1 --out c --method nope", "lorahub merge --base b --out o"):
        with pytest.raises(AssertionError):
            check_command_line(bad)


def test_readme_and_docs_links_point_to_files():
    files = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    links = 0
    for path in files:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            links += 1
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"
    assert links >= 10
    # every doc page is reachable from the README (directly or through another page)
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"


# ----------------------------------------------------------------------------------------------
# usage errors exit 2, --json exists everywhere


@pytest.mark.parametrize("path", LEAVES, ids=ids)
def test_unknown_option_is_a_usage_error(path):
    result = run_cli(*path, "--no-such-option")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--no-such-option" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("path", [pytest.param(p, id=ids(p)) for p in LEAVES])
def test_every_command_takes_json(path):
    """README: 'Every command takes --help (with an example) and --json'."""
    assert "--json" in _options(_command(path))


def test_convert_json(tmp_path, peft_lora_dir):
    out = tmp_path / "k.safetensors"
    payload = json.loads(run_cli("convert", peft_lora_dir, "--to", "kohya", "--out", out, "--json",
                                 check=True).stdout)
    with safe_open(str(out), "pt") as handle:
        downs = [k for k in handle.keys() if k.endswith(".lora_down.weight")]
    with safe_open(str(peft_lora_dir / "adapter_model.safetensors"), "pt") as handle:
        peft_modules = {k[: -len(".lora_A.weight")] for k in handle.keys() if k.endswith(".lora_A.weight")}
    assert payload["from"] == "peft" and payload["format"] == "kohya" and Path(payload["out"]) == out
    assert payload["modules"] == len(downs) == len(peft_modules)


def test_unmerge_json(tmp_path, tiny_llama_dir, peft_lora_dir):
    merged, restored = tmp_path / "merged", tmp_path / "restored"
    run_cli("merge", "--base", tiny_llama_dir, peft_lora_dir, "--out", merged, "--device", "cpu", check=True)
    payload = json.loads(run_cli("unmerge", "--base", merged, peft_lora_dir, "--out", restored, "--device", "cpu",
                                 "--json", check=True).stdout)
    before, after = load_file(str(merged / "model.safetensors")), load_file(str(restored / "model.safetensors"))
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    with safe_open(str(peft_lora_dir / "adapter_model.safetensors"), "pt") as handle:
        modules = sum(k.endswith(".lora_A.weight") for k in handle.keys())
    assert payload["ok"] is True and payload["operation"] == "unmerge" and Path(payload["out"]) == restored
    assert payload["tensors_changed"] == changed == modules
    assert payload["tensors_changed"] + payload["tensors_copied"] == len(before)


def test_registry_add_json(tmp_path, monkeypatch, tiny_llama_sharded_dir):
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "home"))
    payload = json.loads(run_cli("registry", "add", tiny_llama_sharded_dir, "--name", "tiny-json", "--json",
                                 check=True).stdout)
    shapes = {}
    for shard in tiny_llama_sharded_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            shapes.update({k: handle.get_slice(k).get_shape() for k in handle.keys()})
    assert payload["name"] == "tiny-json" and Path(payload["out"]).is_file()
    assert payload["tensors"] == len(shapes)
    assert payload["params"] == sum(torch.Size(s).numel() for s in shapes.values())
    assert json.loads(Path(payload["out"]).read_text())["name"] == "tiny-json"


# ----------------------------------------------------------------------------------------------
# NO_COLOR


ESC = "\x1b"
COLOUR_SGR = re.compile(r"\x1b\[([0-9;]*)m")


def _has_colour(text: str) -> bool:
    """An SGR sequence that sets a foreground/background colour (30–37, 38;…, 39–47, 48;…, 90–107)."""
    for params in COLOUR_SGR.findall(text):
        codes = [int(c) for c in params.split(";") if c]
        if any(30 <= c <= 49 or 90 <= c <= 107 for c in codes):
            return True
    return False


_DRIVER = r"""
import contextlib, io, json, sys
from lorahub.cli import cli
results = {}
for name, args in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(args=args, prog_name="lorahub", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    results[name] = [code, out.getvalue(), err.getvalue()]
sys.__stdout__.write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def coloured_runs(tmp_path_factory, tiny_llama_dir, peft_lora_dir, peft_wide_dir):
    """Each command run in a fresh interpreter under rich's FORCE_COLOR (a terminal that colours),
    with and without NO_COLOR=1; progress bars enabled."""
    work = tmp_path_factory.mktemp("nocolor")
    commands = {
        "error": ["inspect", str(work / "missing")],
        "inspect": ["inspect", str(peft_lora_dir), "--all-layers"],
        "validate": ["validate", str(peft_wide_dir), "--base", str(tiny_llama_dir)],
        "registry": ["registry", "list"],
        "merge": ["merge", "--base", str(tiny_llama_dir), str(peft_lora_dir), "--out", "OUT", "--device", "cpu"],
    }
    runs = {}
    for label, no_color in (("colour", None), ("no_color", "1")):
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "LORAHUB_NO_PROGRESS")}
        env.update(FORCE_COLOR="1", TERM="xterm-256color", COLUMNS="120")
        if no_color:
            env["NO_COLOR"] = no_color
        cmds = {k: [str(work / label) if a == "OUT" else a for a in v] for k, v in commands.items()}
        proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cmds)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[label] = json.loads(proc.stdout)
    return runs


def test_forced_terminal_colours_without_no_color(coloured_runs):
    """The control: under FORCE_COLOR these commands do colour, so the NO_COLOR tests can fail."""
    runs = coloured_runs["colour"]
    assert runs["error"][0] == 1 and runs["validate"][0] == 1 and runs["merge"][0] == 0
    assert _has_colour(runs["error"][2]) and _has_colour(runs["merge"][2])


@pytest.mark.parametrize("name", ["error", "inspect", "validate", "registry", "merge"])
def test_no_color_removes_every_colour(coloured_runs, name):
    code, out, err = coloured_runs["no_color"][name]
    assert code == coloured_runs["colour"][name][0]
    assert not _has_colour(out) and not _has_colour(err), (out[-500:], err[-500:])


@pytest.mark.parametrize("name", ["error", "inspect", "validate", "registry"])
def test_no_color_writes_no_escape_sequences(coloured_runs, name):
    _, out, err = coloured_runs["no_color"][name]
    assert ESC not in out and ESC not in err


# ----------------------------------------------------------------------------------------------
# inputs are never modified; failed writes leave nothing half-written


def _snapshot(*paths: Path) -> dict[str, tuple[str, int, int]]:
    """sha256, mtime and mode of every file under the given paths, and which files exist."""
    files = []
    for path in paths:
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                     p.stat().st_mtime_ns, p.stat().st_mode) for p in files}


def test_no_command_modifies_its_inputs(tmp_path, tiny_llama_dir, tiny_llama_sharded_dir, tiny_unet_dir,
                                        peft_lora_dir, peft_rslora_dir, peft_dora_dir, kohya_unet_file):
    inputs = (tiny_llama_dir, tiny_llama_sharded_dir, tiny_unet_dir, peft_lora_dir, peft_rslora_dir,
              peft_dora_dir, kohya_unet_file)
    before = _snapshot(*inputs)
    merged = tmp_path / "merged"
    commands = [
        ("inspect", peft_lora_dir, "--spectrum"),
        ("validate", kohya_unet_file, "--base", tiny_unet_dir),
        ("convert", kohya_unet_file, "--to", "peft", "--out", tmp_path / "peft"),
        ("convert", peft_rslora_dir, "--to", "diffusers", "--out", tmp_path / "d.safetensors"),
        ("resize", peft_rslora_dir, "--rank", "2", "--out", tmp_path / "r"),
        ("resize", kohya_unet_file, "--rank", "2", "--out", tmp_path / "r.safetensors"),
        ("blend", peft_lora_dir, peft_rslora_dir, "-w", "0.5,-1", "--out", tmp_path / "b"),
        ("interpolate", peft_lora_dir, peft_rslora_dir, "-t", "0.3", "--out", tmp_path / "i"),
        ("merge", "--base", tiny_llama_sharded_dir, f"{peft_lora_dir}:0.5", peft_dora_dir, "--out", merged,
         "--device", "cpu"),
        ("merge", "--base", tiny_unet_dir, kohya_unet_file, "--out", tmp_path / "unet", "--device", "cpu"),
    ]
    for args in commands:
        run_cli(*args, check=True)
    merged_before = _snapshot(merged)
    run_cli("unmerge", "--base", merged, f"{peft_lora_dir}:0.5", peft_dora_dir, "--out", tmp_path / "u",
            "--device", "cpu", check=True)
    assert _snapshot(merged) == merged_before
    assert _snapshot(*inputs) == before


def _disk_full(real):
    """A safetensors writer that writes half the file, then fails as a full disk does."""
    def write(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


@pytest.mark.parametrize("case", ["convert", "resize", "blend"])
def test_a_failed_write_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch, peft_lora_dir, case):
    import lorahub.formats.kohya as kohya_format
    import lorahub.formats.peft as peft_format

    def command(out, *extra):
        return {"convert": ("convert", peft_lora_dir, "--to", "kohya", "--out", out),
                "resize": ("resize", peft_lora_dir, "--rank", "2", "--out", out, *extra),
                "blend": ("blend", peft_lora_dir, peft_lora_dir, "-w", "1,1", "--out", out)}[case]

    kohya_out, peft_out = tmp_path / "new.safetensors", tmp_path / "new"
    out = kohya_out if case == "convert" else peft_out
    monkeypatch.setattr(kohya_format, "save_file", _disk_full(kohya_format.save_file))
    monkeypatch.setattr(peft_format, "save_file", _disk_full(peft_format.save_file))
    result = run_cli(*command(out))
    assert result.returncode != 0 and "No space left on device" in result.stderr, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary left behind
    if case == "resize":  # --overwrite over an existing output: the old one survives a failed write
        monkeypatch.undo()
        run_cli(*command(out), check=True)
        old = _snapshot(out)
        monkeypatch.setattr(peft_format, "save_file", _disk_full(peft_format.save_file))
        result = run_cli(*command(out, "--overwrite"))
        assert result.returncode != 0 and "No space left on device" in result.stderr
        assert _snapshot(out) == old
        assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("case", ["convert", "resize", "blend", "merge", "registry add"])
def test_unwritable_out_is_a_one_line_error(tmp_path, monkeypatch, tiny_llama_dir, peft_lora_dir, case):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    monkeypatch.setenv("LORAHUB_HOME", str(blocker))
    args = {"convert": ("convert", peft_lora_dir, "--to", "kohya", "--out", out / "k.safetensors"),
            "resize": ("resize", peft_lora_dir, "--rank", "2", "--out", out),
            "blend": ("blend", peft_lora_dir, peft_lora_dir, "-w", "1,1", "--out", out),
            "merge": ("merge", "--base", tiny_llama_dir, peft_lora_dir, "--out", out, "--device", "cpu"),
            "registry add": ("registry", "add", tiny_llama_dir, "--name", "blocked")}[case]
    result = run_cli(*args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert str(blocker) in lines[0]
