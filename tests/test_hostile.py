"""Issue 11 §3, hostile input: one `error: …` line naming the file and the broken key or tensor, exit 1
(2 for usage errors), never a traceback or a hang, nothing half-written.

The cases themselves (how each input is built, what the command must print) live in
`scripts/hostile_inputs.py`, which also writes the table in docs/hostile-inputs.md; here they run in
process where that is safe, and in a fresh process with a timeout where the input could hang the
test (FIFOs), needs a file-size limit (EFBIG) or the Hub. Below them: the pieces (header validation,
the sanitiser, Hub names, glob escaping), a disk that fills up, the sanitiser in every command, a
broken tensor named as such, and a 100,000-entry header.
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import struct
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import hostile_inputs as H  # noqa: E402

from lorahub import storage  # noqa: E402
from lorahub.errors import LorahubError  # noqa: E402

SIZE_CASE = "header-300k"  # run by the script; here a smaller one (test_a_huge_header_*)
IN_PROCESS = [c for c in H.CASES if not c.isolate and not c.hub]
ISOLATED = [c for c in H.CASES if c.isolate and c.id != SIZE_CASE]
HUB = [c for c in H.CASES if c.hub]


def _ids(case: H.Case) -> str:
    return case.id


@pytest.mark.parametrize("case", IN_PROCESS, ids=_ids)
def test_hostile_input(case, tmp_path, monkeypatch):
    ctx = H.Ctx(tmp_path)
    args = case.build(ctx)
    for key, value in ctx.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ctx.cwd or ctx.work)
    result = run_cli(*args, env={"NO_COLOR": "1", "COLUMNS": "200"})
    outcome = H.Outcome(result.returncode, result.stdout, result.stderr, 0.0)
    assert not H.problems(case, ctx, outcome), (H.problems(case, ctx, outcome), result.stderr[-3000:])


@pytest.mark.parametrize("case", ISOLATED, ids=_ids)
def test_hostile_input_in_its_own_process(case, tmp_path):
    """FIFOs (an open() that would wait for a writer forever) and file-size limits: a fresh process,
    killed after a timeout."""
    ctx = H.Ctx(tmp_path)
    outcome = H.run_subprocess(case.build(ctx), ctx, timeout=45)
    assert not H.problems(case, ctx, outcome), (H.problems(case, ctx, outcome), outcome.stderr[-3000:])


@pytest.mark.parametrize("case", HUB, ids=_ids)
def test_hostile_hub_listing(case, tmp_path, hub_server):
    ctx = H.Ctx(tmp_path, hub=hub_server, env={"HF_HOME": str(tmp_path / "hf_home")})
    outcome = H.run_subprocess(case.build(ctx), ctx, timeout=60)
    assert not H.problems(case, ctx, outcome), (H.problems(case, ctx, outcome), outcome.stderr[-3000:])


def test_every_case_is_run_by_a_test():
    assert {c.id for c in IN_PROCESS + ISOLATED + HUB} | {SIZE_CASE} == {c.id for c in H.CASES}
    assert len({c.id for c in H.CASES}) == len(H.CASES)


# ---------------------------------------------------------------------------------------------
# safetensors headers: validated in full when parsed


def _header(entries: dict, metadata: dict | None = None) -> bytes:
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    return json.dumps(header).encode()


def _entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "unknown dtype": ({"w": _entry(dtype="Q4")}, "unknown dtype 'Q4'"),
    "dtype not a string": ({"w": _entry(dtype=["F32"])}, "unknown dtype"),
    "negative dimension": ({"w": _entry(shape=(-2, -2))}, "non-negative"),
    "boolean dimension": ({"w": _entry(shape=(True, 4))}, "non-negative"),
    "float offsets": ({"w": _entry(offsets=(0.0, 16.0))}, "two non-negative integers"),
    "three offsets": ({"w": _entry(offsets=(0, 8, 16))}, "two non-negative integers"),
    "end before begin": ({"w": _entry(offsets=(16, 0))}, "end before they begin"),
    "size is not dtype × shape": ({"w": _entry(offsets=(0, 12))}, "takes 16 bytes"),
    "huge shape, small offsets": ({"w": _entry(shape=(1 << 40, 1 << 40))}, "takes"),
    "offsets past 1 PiB": ({"w": _entry(shape=(1 << 40, 1 << 40), offsets=(0, 1 << 82))}, "beyond any real file"),
    "overlapping tensors": ({"a": _entry(offsets=(0, 16)), "b": _entry(offsets=(8, 24))}, "overlap"),
    "F4 odd element count": ({"w": _entry(dtype="F4", shape=(3,), offsets=(0, 2))}, "takes 1.5 bytes"),
    "entry not an object": ({"w": [1, 2]}, "not an object"),
    "entry without shape": ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, "no 'shape'"),
}


@pytest.mark.parametrize("name", BAD_HEADERS)
def test_malformed_header_entries_are_refused_naming_the_tensor(name):
    entries, needle = BAD_HEADERS[name]
    with pytest.raises(LorahubError) as info:
        storage.parse_header_bytes(_header(entries), "x.safetensors", None)
    message = str(info.value)
    assert message.startswith("x.safetensors: tensor '") and needle in message, message
    assert "corrupt safetensors header" in message


def test_header_checks_that_are_not_about_one_entry():
    with pytest.raises(LorahubError, match="__metadata__ value of 'n' is a number"):
        storage.parse_header_bytes(_header({}, {"n": 5}), "x.safetensors", None)
    with pytest.raises(LorahubError, match="nested too deeply"):
        storage.parse_header_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "x.safetensors", None)
    # the file's size: the tensor that runs past the end is named
    raw = _header({"a": _entry(offsets=(0, 16)), "b": _entry(offsets=(16, 32))})
    with pytest.raises(LorahubError, match=r"tensor 'b': truncated safetensors file"):
        storage.parse_header_bytes(raw, "x.safetensors", 8 + len(raw) + 30)


def test_valid_headers_still_parse():
    """Zero-size tensors share offsets, gaps between tensors are allowed (kohya writers leave none, but
    readers never needed them closed), sub-byte dtypes pack, skeletons (no file size) are fine."""
    raw = _header({"empty1": _entry(shape=(0, 4), offsets=(0, 0)), "empty2": _entry(shape=(0,), offsets=(0, 0)),
                   "a": _entry(offsets=(0, 16)), "gap": _entry(offsets=(32, 48)),
                   "f4": _entry(dtype="F4", shape=(4,), offsets=(48, 50)), "u16": _entry(dtype="U16", offsets=(64, 72)),
                   "big": _entry(shape=(1 << 20, 1 << 20), offsets=(72, 72 + (4 << 40)))},
                  {"format": "pt"})
    header = storage.parse_header_bytes(raw, "x.safetensors", None)
    assert header.tensors["big"].shape == (1 << 20, 1 << 20) and header.metadata == {"format": "pt"}
    # entries out of offset order (not what writers do, but valid)
    raw = _header({"b": _entry(offsets=(16, 32)), "a": _entry(offsets=(0, 16))})
    assert list(storage.parse_header_bytes(raw, "x.safetensors", 8 + len(raw) + 32).tensors) == ["b", "a"]


# ---------------------------------------------------------------------------------------------
# JSON files and regular files


def test_json_files_one_reader(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}')  # a UTF-8 byte-order mark (Windows editors) is fine
    assert storage.read_json_file(path) == {"a": 1}
    for data, needle in ((b"\xff\xfe{\x00}\x00", "UTF-16"), (b'{"a": "caf\xe9"}', "byte 0xe9"),
                         (b'{"a": ', "Expecting value"), (b"[" * 100_000, "nested too deeply")):
        path.write_bytes(data)
        with pytest.raises(LorahubError, match=needle):
            storage.read_json_file(path)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(LorahubError, match="not a regular file .a FIFO."):
        storage.read_json_file(tmp_path / "fifo.json")
    with pytest.raises(LorahubError, match="not a regular file .a directory."):
        storage.read_json_file(tmp_path)


# ---------------------------------------------------------------------------------------------
# the sanitiser


def test_clean_strips_terminal_control_and_keeps_text():
    from lorahub.ui import clean

    assert clean("a\x1b[2J\x1b]0;title\x07b") == "ab"
    assert clean("x\x1b[31mred\x1b[0m") == "xred"
    assert clean("line\rover\nnext\ttab") == "line over next tab"
    assert clean("bell\x07 nul\x00 del\x7f c1\x9b31m") == "bell nul del c1"
    assert clean("bidi\u202eevil\u2066") == "bidievil"
    assert clean("[/] [bold]x[/bold] 日本 é") == "[/] [bold]x[/bold] 日本 é"


def test_no_file_text_reaches_the_terminal_raw(tmp_path):
    """Module names and metadata carrying escape sequences, BEL, CR and rich markup, through every
    command that prints them: no control character and no traceback comes out, markup is literal."""
    nasty = "\x1b[2J\x1b]0;owned\x07[/]\r"
    path = tmp_path / "k.safetensors"
    metadata = {"ss_comment": f"c{nasty}", "lorahub.base_model": f"base{nasty}"}
    H.kohya(path, (f"lora_unet_a{nasty}b", "lora_unet_c_d"), metadata=metadata)
    runs = [("inspect", path, "--all-layers"), ("inspect", path, "--json"),
            ("validate", path, "--base", H.BASE), ("validate", path),
            ("convert", path, "--to", "peft", "--out", tmp_path / "peft"),
            ("resize", path, "--rank", "2", "--out", tmp_path / "r.safetensors"),
            ("blend", path, path, "-w", "1,1", "--out", tmp_path / "b.safetensors")]
    for args in runs:
        result = run_cli(*args, env={"NO_COLOR": "1", "COLUMNS": "200"})
        output = result.stdout + result.stderr
        assert "Traceback" not in output, (args, output[-3000:])
        assert not any(c in output for c in "\x1b\x07\r"), (args, repr(output[-2000:]))
        if args[0] in ("inspect", "validate"):  # they print the names: literally
            assert "[/]" in output, (args, output[-2000:])


# ---------------------------------------------------------------------------------------------
# the disk fills up inside the safetensors writer (it raises SafetensorError, not OSError)


def _full_disk(code: int):
    from safetensors import SafetensorError

    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    return save_file


@pytest.mark.parametrize("case", ["convert", "resize", "blend"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_disk_full_inside_the_writer_is_one_line(tmp_path, monkeypatch, case, code):
    import lorahub.formats.kohya as kohya_format
    import lorahub.formats.peft as peft_format

    monkeypatch.setattr(kohya_format, "save_file", _full_disk(code))
    monkeypatch.setattr(peft_format, "save_file", _full_disk(code))
    out = tmp_path / "out"
    args = {"convert": ("convert", H.LORA, "--to", "kohya", "--out", tmp_path / "out.safetensors"),
            "resize": ("resize", H.LORA, "--rank", "2", "--out", out),
            "blend": ("blend", H.LORA, H.LORA, "-w", "1,1", "--out", out)}[case]
    result = run_cli(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and os.strerror(code) in lines[0] and "nothing was written" in lines[0]
    assert str(tmp_path / "out") in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the tensor that is broken is the one named


def test_a_read_that_fails_names_the_tensor_it_failed_on(tmp_path, monkeypatch):
    """The NaN/Inf scan reads neighbouring tensors in one call; when that read fails (the file shrank
    under us), the error names the tensor that cannot be read, not the first of the run."""
    import lorahub.inspect as inspect_module
    from lorahub.formats import load_adapter

    path = H.kohya(tmp_path / "three.safetensors", ("lora_unet_m0_p", "lora_unet_m1_p", "lora_unet_m2_p"))
    adapter = load_adapter(path)
    stale = storage.open_safetensors(path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 6)  # the last alpha (4 bytes) and 2 bytes of the last up factor
    monkeypatch.setattr(inspect_module, "open_safetensors", lambda p: stale)
    with pytest.raises(LorahubError) as info:
        inspect_module.scan_nonfinite(adapter)
    assert "tensor 'lora_unet_m2_p.lora_up.weight'" in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------
# Hub file names


def test_hub_names_that_cannot_be_local_file_names():
    from lorahub.hub.files import choose_adapter_files, unsafe_name

    for name in ("/etc/x.safetensors", "a/../../x.safetensors", "../x.safetensors", "a//b.safetensors",
                 "a\\..\\x.safetensors", "C:x.safetensors", "a\x1b[2Jb.safetensors", "./x.safetensors", ""):
        assert unsafe_name(name), name
    for name in ("x.safetensors", "style [v2].safetensors", "a*b?.safetensors", "dir/sub/x.safetensors", "x..y"):
        assert unsafe_name(name) is None, name
    # an unsafe name is never a candidate: the safe adapter beside it is chosen
    assert choose_adapter_files(["../evil.safetensors", "good.safetensors"], repo_id="o/r") == ["good.safetensors"]
    with pytest.raises(LorahubError, match="absolute path"):
        choose_adapter_files(["/evil.safetensors"], repo_id="o/r")
    with pytest.raises(LorahubError, match="ignored: 1 files"):
        choose_adapter_files(["../evil.safetensors"], repo_id="o/r")
    with pytest.raises(LorahubError, match="'..'"):
        choose_adapter_files(["good.safetensors"], repo_id="o/r", path="../good.safetensors")


def test_glob_escape_matches_the_name_only():
    from lorahub.hub.download import glob_escape

    names = ["style [v2].safetensors", "style v.safetensors", "a*.safetensors", "ab.safetensors", "q?.bin", "qq.bin",
             "x]y[z"]
    for name in names:
        assert [n for n in names if fnmatch.fnmatchcase(n, glob_escape(name))] == [name]


# ---------------------------------------------------------------------------------------------
# a header of hundreds of thousands of entries


def _peft_with_entries(root: Path, entries: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_header import make_peft

    make_peft(root, entries)
    return root


def test_a_huge_header_is_parsed_once(tmp_path, monkeypatch):
    from lorahub.base import load_base
    from lorahub.formats import load_adapter
    from lorahub.validate import validate

    adapter_dir = _peft_with_entries(tmp_path / "big", 3000)
    storage.close_open_files()
    parses: list[str] = []
    real = storage.parse_header_bytes
    monkeypatch.setattr(storage, "parse_header_bytes", lambda raw, path, size: parses.append(str(path)) or
                        real(raw, path, size))
    report = validate(load_adapter(adapter_dir), load_base(H.BASE))
    assert not report.ok and report.modules == 1500
    assert parses.count(str(adapter_dir / "adapter_model.safetensors")) == 1, parses


def test_a_huge_header_is_validated_in_seconds(tmp_path):
    """`validate` of a 100,000-entry adapter against a tiny base it does not fit: the missing modules
    were looked up in a list (quadratic: 86 s at 300,000 entries), and the registry suggestions
    validated every module against every manifest; seconds now (the script times 300,000)."""
    ctx = H.Ctx(tmp_path)
    args = H._big_header(ctx, 100_000)
    outcome = H.run_subprocess(args, ctx, timeout=90)
    assert outcome.code == 1, outcome.stderr[-2000:]
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert lines == ["error: does not fit: 50000 of 50000 modules of big do not match " + H.BASE], lines
    assert outcome.seconds < 60


def test_the_script_writes_the_table(tmp_path):
    """scripts/hostile_inputs.py runs cases and writes the markdown table (one cheap case here)."""
    out = tmp_path / "table.md"
    assert H.main(["--only", "device-meta", "--write", str(out)]) == 0
    text = out.read_text()
    assert "| `--device meta` | `lorahub resize" in text and "| 2 |" in text


def test_docs_table_lists_every_case():
    text = (Path(__file__).resolve().parents[1] / "docs" / "hostile-inputs.md").read_text()
    for case in H.CASES:
        assert f"| {case.input} |" in text, case.id
    assert "check failed" not in text


def test_struct_of_st_bytes_is_safetensors(tmp_path):
    """The script's hand-written safetensors files load in safetensors itself (the cases are real files)."""
    from safetensors import safe_open

    path = H.kohya(tmp_path / "k.safetensors", ("lora_unet_a_b",), metadata={"x": "y"})
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == ["lora_unet_a_b.alpha", "lora_unet_a_b.lora_down.weight",
                                         "lora_unet_a_b.lora_up.weight"]
        assert handle.metadata() == {"x": "y"}
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
