"""Outputs never destroy what lorahub did not write: the one policy (`lorahub.output`) of every writing
command, tested rule by rule through the real CLI on real adapters (docs/outputs.md).

Inputs that an old, destructive lorahub would have deleted are copies in `tmp_path`, never the session
fixtures themselves.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import run_cli

WRITERS = ["convert", "resize", "blend", "interpolate", "merge", "unmerge", "pull", "registry add"]
MANIFEST = ".lorahub-output.json"


# ---------------------------------------------------------------------------------------------
# helpers


def _tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of the file), by relative name: what a user would lose."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".lorahub-" in p.name)


def _error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def lora_repo(hub_server, peft_lora_dir) -> str:
    repo_id = hub_server.new_repo_id(prefix="policy-lora")
    hub_server.seed_repo(repo_id, {name: peft_lora_dir / name
                                   for name in ("adapter_config.json", "adapter_model.safetensors")})
    return repo_id


class Writers:
    """Each writing command, with copies of a real PEFT adapter and a tiny Llama base as inputs."""

    def __init__(self, root: Path, peft_lora_dir: Path, tiny_llama_dir: Path, request, monkeypatch):
        self.root = root
        self.inputs = root / "inputs"
        self.lora = self.inputs / "lora"
        self.base = self.inputs / "base"
        shutil.copytree(peft_lora_dir, self.lora)
        shutil.copytree(tiny_llama_dir, self.base)
        self.request = request
        self._merged: Path | None = None
        monkeypatch.setenv("LORAHUB_HOME", str(root / "lorahub-home"))

    @property
    def merged(self) -> Path:
        """A merged model (a lorahub output) for unmerge."""
        if self._merged is None:
            self._merged = self.inputs / "merged"
            run_cli("merge", "--base", self.base, f"{self.lora}:0.5", "--out", self._merged, "--device", "cpu",
                    check=True)
        return self._merged

    def args(self, name: str, out: Path, *extra, lora: Path | None = None, base: Path | None = None) -> tuple:
        lora = lora or self.lora
        base = base or self.base
        if name == "convert":
            return ("convert", lora, "--to", "peft", "--out", out, *extra)
        if name == "resize":
            return ("resize", lora, "--rank", "2", "--out", out, *extra)
        if name == "blend":
            return ("blend", lora, lora, "-w", "0.5,0.25", "--out", out, *extra)
        if name == "interpolate":
            return ("interpolate", lora, lora, "--t", "0.3", "--out", out, *extra)
        if name == "merge":
            return ("merge", "--base", base, lora, "--out", out, "--device", "cpu", *extra)
        if name == "unmerge":
            return ("unmerge", "--base", base if base is not self.base else self.merged, lora, "--out", out,
                    "--device", "cpu", *extra)
        if name == "pull":
            repo = self.request.getfixturevalue("lora_repo")
            return ("pull", repo, "--out", out, "--no-inspect", *extra)
        if name == "registry add":
            return ("registry", "add", base, "--name", "policy-test", "--out", out, *extra)
        raise AssertionError(name)

    def kind(self, name: str) -> str:
        return "file" if name == "registry add" else "dir"

    def out(self, name: str) -> Path:
        return self.root / ("out.json" if name == "registry add" else "out")

    def run(self, name: str, out: Path, *extra, **kwargs):
        return run_cli(*self.args(name, out, *extra, **kwargs))


@pytest.fixture
def writers(tmp_path, peft_lora_dir, tiny_llama_dir, request, monkeypatch) -> Writers:
    return Writers(tmp_path, peft_lora_dir, tiny_llama_dir, request, monkeypatch)


# ---------------------------------------------------------------------------------------------
# one spelling: -o/--out and --overwrite everywhere, no --force


def test_every_writing_command_takes_out_and_overwrite():
    from lorahub.cli import cli

    for name in WRITERS:
        command = cli
        for part in name.split():
            command = command.commands[part]
        flags = {opt for param in command.params for opt in param.opts}
        assert {"-o", "--out", "--overwrite"} <= flags, (name, sorted(flags))
        assert "--force" not in flags, name


@pytest.mark.parametrize("name", ["resize", "registry add"])
def test_force_is_gone(writers, name):
    out = writers.out(name)
    result = writers.run(name, out, "--force")
    assert result.returncode == 2 and "--force" in result.stderr, (result.returncode, result.stderr)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# an existing --out: refused unless --overwrite; --overwrite replaces lorahub's outputs only


@pytest.mark.parametrize("name", WRITERS)
def test_existing_out_is_refused_without_overwrite(writers, name):
    out = writers.out(name)
    first = writers.run(name, out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _tree(out)
    line = _error(writers.run(name, out))
    assert str(out) in line and "--overwrite" in line, line
    assert _tree(out) == before


@pytest.mark.parametrize("name", ["convert", "merge"])
def test_an_existing_empty_directory_needs_overwrite_too(writers, name):
    out = writers.out(name)
    out.mkdir()
    line = _error(writers.run(name, out))
    assert "empty directory" in line and "--overwrite" in line, line
    assert out.is_dir() and not any(out.iterdir())
    result = writers.run(name, out, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / MANIFEST).is_file()


@pytest.mark.parametrize("name", WRITERS)
def test_overwrite_replaces_a_lorahub_output(writers, name):
    out = writers.out(name)
    assert writers.run(name, out).returncode == 0
    result = writers.run(name, out, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    if writers.kind(name) == "dir":  # lorahub's output directories are marked with what lorahub wrote
        manifest = json.loads((out / MANIFEST).read_text())
        assert sorted(manifest["files"]) == sorted(p for p in _tree(out) if p != MANIFEST)
        for rel, entry in manifest["files"].items():
            assert entry["size"] == (out / rel).stat().st_size
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("name", [n for n in WRITERS if n != "registry add"])
def test_overwrite_never_replaces_a_directory_with_foreign_files(writers, name):
    out = writers.out(name)
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "data").mkdir()
    for i in range(7):
        (out / "data" / f"run{i}.csv").write_text(str(i))
    before = _tree(out)
    for extra in ((), ("--overwrite",)):
        line = _error(writers.run(name, out, *extra))
        assert str(out) in line and "did not write" in line and "notes.txt" in line, line
        assert "8 file(s)" in line and "more" in line, line  # the first few, and how many in all
        assert _tree(out) == before
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("name", ["convert", "merge"])
def test_overwrite_refuses_a_lorahub_output_changed_since(writers, name):
    out = writers.out(name)
    assert writers.run(name, out).returncode == 0
    edited = next(p for p in sorted(out.iterdir()) if p.suffix == ".json" and p.name != MANIFEST)
    edited.write_text(edited.read_text() + "\n")  # the user edited a file lorahub wrote
    (out / "README.md").write_text("# my model card\n")
    before = _tree(out)
    line = _error(writers.run(name, out, "--overwrite"))
    assert edited.name in line and "README.md" in line, line
    assert _tree(out) == before


def test_single_file_outputs(writers, tmp_path):
    out = tmp_path / "lora.safetensors"
    args = ("convert", writers.lora, "--to", "kohya", "--out", out)
    run_cli(*args, check=True)
    before = _tree(out)
    assert "--overwrite" in _error(run_cli(*args))
    assert _tree(out) == before
    out.write_bytes(b"a regular file of mine")
    run_cli(*args, "--overwrite", check=True)  # --overwrite replaces a regular file
    assert out.read_bytes() != b"a regular file of mine"
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    (folder / "x").write_text("kept")
    assert "directory" in _error(run_cli("convert", writers.lora, "--to", "kohya", "--out", folder, "--overwrite"))
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    assert "not a regular file" in _error(run_cli("convert", writers.lora, "--to", "kohya", "--out", fifo,
                                                  "--overwrite"))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (folder / "x").read_text() == "kept"
    assert _leftovers(tmp_path) == []


def test_out_that_is_a_symlink_is_refused(writers, tmp_path):
    real = tmp_path / "real"
    run_cli(*writers.args("convert", real), check=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert "symbolic link" in _error(writers.run("convert", link, "--overwrite"))
    assert link.is_symlink() and (real / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------
# --out is never, contains, or lies inside an input


RELATIONS = ["is", "parent", "inside", "inside-via-symlink", "is-via-symlink"]


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("name", ["convert", "blend", "merge", "unmerge"])
def test_out_is_never_an_input_nor_holds_one_nor_lies_inside_one(writers, name, relation):
    # the input at stake: the adapter for convert and blend, the base for merge, the merged model for unmerge
    target = {"convert": writers.lora, "blend": writers.lora, "merge": writers.base,
              "unmerge": writers.merged}[name]
    link = writers.root / "link"
    link.symlink_to(target)
    out = {"is": target, "parent": target.parent, "inside": target / "sub",
           "inside-via-symlink": link / "sub", "is-via-symlink": link}[relation]
    before = {p: _tree(p) for p in (writers.lora, writers.base, writers.merged)}
    line = _error(writers.run(name, out, "--overwrite"))
    role = {"convert": "adapter", "blend": "adapter", "merge": "base", "unmerge": "merged model"}[name]
    assert f"the {role} {target.resolve()}" in line, line
    assert {p: _tree(p) for p in before} == before  # every input intact
    assert not (target / "sub").exists()


def test_out_dot_in_the_folder_holding_the_input(writers, monkeypatch):
    """`--out .` (and `--out` = the current directory) holding the input: refused, nothing deleted."""
    monkeypatch.chdir(writers.inputs)
    before = _tree(writers.inputs)
    for out in (".", str(writers.inputs)):
        line = _error(run_cli("convert", "lora", "--to", "peft", "--out", out, "--overwrite"))
        assert "contains the adapter" in line, line
    assert _tree(writers.inputs) == before


def test_adapter_given_through_a_symlink_is_still_an_input(writers):
    link = writers.root / "lora-link"
    link.symlink_to(writers.lora)
    before = _tree(writers.lora)
    line = _error(run_cli("convert", link, "--to", "peft", "--out", writers.lora, "--overwrite"))
    assert "--out is the adapter" in line, line
    assert _tree(writers.lora) == before


# ---------------------------------------------------------------------------------------------
# one writer per --out


@pytest.mark.parametrize("name", WRITERS)
def test_a_second_writer_fails_at_once(writers, name):
    from lorahub.output import lock_path

    out = writers.out(name)
    lock = lock_path(out)
    assert lock == out.parent / f".{out.name}.lorahub-lock"
    if name == "unmerge":
        assert writers.merged.is_dir()  # made before the lock is held
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another lorahub is writing `out`
        os.write(fd, b"4242\n")
        started = time.monotonic()
        line = _error(writers.run(name, out))
        assert time.monotonic() - started < 30
        assert "another lorahub (pid 4242) is writing" in line and str(out) in line, line
        assert not out.exists()
    finally:
        os.close(fd)


def _throttled_merge(base: Path, adapter: Path, out: Path, *extra) -> subprocess.Popen:
    env = dict(os.environ, LORAHUB_MERGE_THROTTLE_S="0.25", LORAHUB_NO_PROGRESS="1")
    return subprocess.Popen([sys.executable, "-m", "lorahub.cli", "merge", "--base", str(base), str(adapter),
                             "--out", str(out), "--device", "cpu", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_merges_into_one_out_the_second_fails_clearly(writers):
    out = writers.root / "merged-out"
    first = _throttled_merge(writers.base, writers.lora, out)
    try:
        deadline = time.monotonic() + 60
        while not [p for p in writers.root.iterdir() if p.name.startswith(".merged-out.lorahub-tmp-")]:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = run_cli("merge", "--base", writers.base, f"{writers.lora}:0.5", "--out", out, "--device", "cpu",
                         "--overwrite")
        line = _error(second)
        assert f"another lorahub (pid {first.pid}) is writing" in line, line
        assert first.poll() is None  # the second one failed while the first was still writing
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "merged" in stdout and (out / "model.safetensors").is_file()
    assert _leftovers(writers.root) == []


# ---------------------------------------------------------------------------------------------
# crash-safe replace: a kill at any point leaves the old output or the new one


# Runs the CLI in a process that SIGKILLs itself in the middle of the swap. "exchange": right after the
# one-step exchange. "renames": where the filesystem cannot exchange (the swap is then two renames),
# right after the first rename moved the old output aside.
KILL_SCRIPT = r"""
import os, signal, sys

out_name, mode = sys.argv[1], sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

try:
    import lorahub.output as output
except ImportError:
    output = None
if mode == "exchange":
    real_exchange = output._exchange
    def exchange(a, b):
        real_exchange(a, b)
        die()
    output._exchange = exchange
else:
    if output is not None:
        output._RENAMEAT2 = None  # no renameat2: two renames
    def killing(real):
        def rename(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            if os.path.basename(os.fspath(src)) == out_name and os.path.isdir(dst):
                die()  # the old output was moved aside; the new one is not in place yet
        return rename
    os.rename, os.replace = killing(os.rename), killing(os.replace)

from lorahub.cli import main
main(sys.argv[3:])
"""


def _killed_run(mode: str, out: Path, *args) -> None:
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, out.name, mode, *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])


def _merge_args(writers: Writers, out: Path, weight: float, *extra) -> tuple:
    return ("merge", "--base", writers.base, f"{writers.lora}:{weight}", "--out", out, "--device", "cpu", *extra)


def test_kill_right_after_the_exchange_leaves_the_new_output_and_the_next_run_cleans_up(writers):
    out = writers.root / "out"
    run_cli(*_merge_args(writers, out, 0.5), check=True)
    old = _tree(out)
    _killed_run("exchange", out, *_merge_args(writers, out, 1.0, "--overwrite"))
    new = _tree(out)
    assert new != old and (out / "model.safetensors").is_file()  # the new output, complete
    assert json.loads((out / MANIFEST).read_text())["state"] == "complete"
    assert any(".lorahub-tmp-" in name for name in _leftovers(writers.root))  # the old one, beside it
    # the next run on that --out (even one that is refused) removes lorahub's leftovers
    assert "--overwrite" in _error(run_cli(*_merge_args(writers, out, 1.0)))
    assert _leftovers(writers.root) == [] and _tree(out) == new


def test_kill_between_the_two_renames_keeps_the_old_output_for_the_next_run(writers):
    out = writers.root / "out"
    run_cli(*_merge_args(writers, out, 0.5), check=True)
    old = _tree(out)
    _killed_run("renames", out, *_merge_args(writers, out, 1.0, "--overwrite"))
    assert not out.exists()
    aside = [p for p in writers.root.iterdir() if p.name.startswith(".out.lorahub-old-")]
    assert len(aside) == 1 and _tree(aside[0]) == old  # the old output, whole, beside --out
    # the next run puts it back before anything else: without --overwrite it is then refused
    assert "--overwrite" in _error(run_cli(*_merge_args(writers, out, 1.0)))
    assert _tree(out) == old and _leftovers(writers.root) == []
    run_cli(*_merge_args(writers, out, 1.0, "--overwrite"), check=True)
    assert _tree(out) != old and _leftovers(writers.root) == []


def test_ctrl_c_between_the_two_renames_puts_the_old_output_back(writers, monkeypatch):
    import lorahub.output as output

    out = writers.root / "out"
    run_cli(*_merge_args(writers, out, 0.5), check=True)
    old = _tree(out)
    monkeypatch.setattr(output, "_RENAMEAT2", None)
    calls = []
    real = output._rename

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(output, "_rename", rename)
    result = run_cli(*_merge_args(writers, out, 1.0, "--overwrite"))
    assert result.returncode == 130 and "interrupted" in result.stderr, result.stderr[-3000:]
    assert _tree(out) == old and _leftovers(writers.root) == []


def test_leftovers_that_are_not_lorahubs_are_kept(writers):
    """Only lorahub's own leftovers go: the name and the marker inside must both be there."""
    out = writers.root / "out"
    mine = writers.root / ".out.lorahub-tmp-123-abcd"  # the name, but no marker: not lorahub's
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    stale = writers.root / ".out.lorahub-tmp-456-ef01"  # a killed run's temporary: name and marker
    stale.mkdir()
    (stale / MANIFEST).write_text(json.dumps({"kind": "lorahub-output", "state": "writing"}))
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    run_cli(*writers.args("convert", out), check=True)
    assert not stale.exists()
    assert (mine / "important.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# modes: as `cp` would create them


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(writers, tmp_path, umask):
    previous = os.umask(umask)
    try:
        outputs = {
            "peft": ("convert", writers.lora, "--to", "peft", "--out", tmp_path / "peft"),
            "kohya": ("convert", writers.lora, "--to", "kohya", "--out", tmp_path / "k.safetensors"),
            "resize": ("resize", writers.lora, "--rank", "2", "--to", "kohya", "--out", tmp_path / "r.safetensors"),
            "merge": _merge_args(writers, tmp_path / "merged", 1.0),
        }
        for args in outputs.values():
            run_cli(*args, check=True)
    finally:
        os.umask(previous)
    for path in (tmp_path / "peft", tmp_path / "k.safetensors", tmp_path / "r.safetensors", tmp_path / "merged"):
        entries = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
        for entry in entries:
            expected = (0o777 if entry.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(entry.stat().st_mode) == expected, (entry, oct(entry.stat().st_mode))


# ---------------------------------------------------------------------------------------------
# the demo writes its workdir under the same policy


def test_demo_reruns_in_its_workdir_but_never_deletes_a_folder_it_did_not_write(tmp_path):
    workdir = tmp_path / "demo"
    run_cli("demo", "--workdir", workdir, "--json", check=True)
    run_cli("demo", "--workdir", workdir, "--json", check=True)  # its own outputs are replaced
    other = tmp_path / "models"
    (other / "merged").mkdir(parents=True)  # a folder with the name of one of the demo's outputs
    (other / "merged" / "my-weights.safetensors").write_bytes(b"precious")
    line = _error(run_cli("demo", "--workdir", other))
    assert "my-weights.safetensors" in line, line
    assert (other / "merged" / "my-weights.safetensors").read_bytes() == b"precious"
