"""Hostile inputs (issue 11 §3): build each one, run `lorahub` on it, check what it prints.

Every case is a file or a Hub listing that once printed a Python traceback, hung, destroyed a file or
said nothing at all. Each is built in a scratch directory from the bundled example (`lorahub/examples`:
a tiny Llama base and a PEFT LoRA for it), run as `python -m lorahub.cli …` in a fresh process (a hang
becomes a timeout, not a stuck run) and checked: the exit status, exactly one `error: …` line on stderr
naming the file and the broken key or tensor, no traceback, nothing half-written.

    python scripts/hostile_inputs.py                        # run every case, print the table
    python scripts/hostile_inputs.py --write docs/hostile-inputs.md
    python scripts/hostile_inputs.py --only fifo-base-file header-300k

`tests/test_hostile.py` runs the same cases (in process where that is safe) with the same checks.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "lorahub" / "examples"
TIMEOUT = 60  # seconds: more than any case needs; a hang is reported as one
NESTED = 100_000  # JSON nesting depth that overflows a recursive parser

# what is wrong in stderr besides the one error line
TRACEBACK = "Traceback (most recent call last)"


# ---------------------------------------------------------------------------------------------
# building blocks: safetensors bytes without torch, copies of the example


def st_bytes(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None,
             header_extra: dict[str, Any] | None = None) -> bytes:
    """A safetensors file: {name: (dtype, shape, data)}, in order; `header_extra` entries are added
    to the header as they are (to write invalid ones)."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header.update(header_extra or {})
    text = json.dumps(header, ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32(count: int, scale: float = 0.01) -> bytes:
    return struct.pack(f"<{count}f", *[scale * ((i * 7919) % 101 - 50) for i in range(count)])


def kohya(path: Path, modules: tuple[str, ...] = ("lora_unet_a_b",), *, metadata: dict[str, str] | None = None,
          dtype: str = "F32", itemsize: int = 4, rank: int = 4, width: int = 16) -> Path:
    """A kohya LoRA file: per module lora_down (rank×width), lora_up (width×rank), alpha."""
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for module in modules:
        # small positive values in any dtype (no FP8 NaN pattern 0x7f/0xff)
        raw = f32(rank * width) if dtype == "F32" else bytes(1 + i % 60 for i in range(rank * width * itemsize))
        tensors[f"{module}.lora_down.weight"] = (dtype, [rank, width], raw[:rank * width * itemsize])
        tensors[f"{module}.lora_up.weight"] = (dtype, [width, rank], raw[:rank * width * itemsize])
        tensors[f"{module}.alpha"] = ("F32", [], struct.pack("<f", float(rank)))
    path.write_bytes(st_bytes(tensors, metadata))
    return path


def diffusers(path: Path, metadata: dict[str, str]) -> Path:
    tensors = {"unet.a.to_q.lora_A.weight": ("F32", [4, 16], f32(64)),
               "unet.a.to_q.lora_B.weight": ("F32", [16, 4], f32(64))}
    path.write_bytes(st_bytes(tensors, metadata))
    return path


def read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


_MERGED: Path | None = None
Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"
V = "model.layers.0.self_attn.v_proj.weight"


@dataclass
class Ctx:
    """A case's scratch directory, the example adapter and base, the Hub (when the case needs it)."""

    work: Path
    hub: Any = None  # a tests/hubserver.HubServer
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the command
    cwd: Path | None = None
    fsize: int | None = None  # RLIMIT_FSIZE of the command, bytes
    label: str = ""  # a unique name for what the case creates on the Hub (default: the work directory's)

    def lora(self, name: str = "lora") -> Path:
        dest = self.work / name
        shutil.copytree(EXAMPLES / "tiny-lora", dest)
        return dest

    def base(self, name: str = "tiny-llama") -> Path:
        """A copy of the example base (named as the adapter names its base: no name-mismatch warning)."""
        dest = self.work / name
        shutil.copytree(EXAMPLES / "tiny-llama", dest)
        return dest

    def config(self, name: str, edit: Callable[[dict], None]) -> Path:
        lora = self.lora(name)
        config = json.loads((lora / "adapter_config.json").read_text())
        edit(config)
        (lora / "adapter_config.json").write_text(json.dumps(config))
        return lora

    def base_header(self, edit: Callable[[dict], None]) -> Path:
        base = self.base()
        header, data = read_st(base / "model.safetensors")
        edit(header)
        write_st(base / "model.safetensors", header, data)
        return base

    def merged(self, name: str = "merged") -> Path:
        """The example merged, with its merge record (made once per run by lorahub itself, then copied)."""
        global _MERGED
        if _MERGED is None:
            _MERGED = Path(tempfile.mkdtemp(prefix="lorahub-hostile-merged-")) / "merged"
            subprocess.run([sys.executable, "-m", "lorahub.cli", "merge", "--base", str(EXAMPLES / "tiny-llama"),
                            str(EXAMPLES / "tiny-lora"), "--out", str(_MERGED), "--device", "cpu"], check=True,
                           capture_output=True, env=command_env(Ctx(self.work)), timeout=TIMEOUT)
        out = self.work / name
        shutil.copytree(_MERGED, out)
        return out

    def record(self, name: str, text: str | bytes) -> Path:
        merged = self.merged(name)
        record = merged / "lorahub_merge.json"
        record.write_bytes(text.encode() if isinstance(text, str) else text)
        return merged

    def fifo(self, path: Path) -> Path:
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        return path

    def registry_home(self) -> Path:
        home = self.work / "home"
        (home / "registry").mkdir(parents=True, exist_ok=True)
        self.env["LORAHUB_HOME"] = str(home)
        return home / "registry"

    def repo(self, files: dict[str, bytes]) -> str:
        assert self.hub is not None, "a Hub case needs the test Hub"
        repo_id = f"alice/{self.label or self.work.name}"
        self.hub.seed_repo(repo_id, files)
        return repo_id


def command_env(ctx: Ctx, root: Path = REPO) -> dict[str, str]:
    """The environment of a command: lorahub from `root`, no colours, no progress bars, the case's
    variables (a variable set to "" is removed)."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "LORAHUB_NO_PROGRESS": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", **ctx.env}
    env = {key: value for key, value in env.items() if value != ""}
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------------------------------------
# the cases


@dataclass
class Case:
    id: str
    input: str  # the hostile input, as the table names it
    build: Callable[[Ctx], list[str]]  # makes the input, returns the lorahub arguments
    code: int = 1
    needles: tuple[str, ...] = ()  # in the error line (code != 0) or in the output (code 0)
    absent: tuple[str, ...] = ()  # never in stdout/stderr (code 0 cases: control characters)
    isolate: bool = False  # needs its own process (a FIFO open blocks, a file-size limit)
    hub: bool = False
    keeps: tuple[str, ...] = ()  # paths under work that must still exist afterwards
    leaves_no: tuple[str, ...] = ()  # paths under work that must not exist afterwards
    note: str = ""  # for the table, when exit 0 is the right answer
    on_main: str = ""  # why this case already passed before its era (a regression guard)
    era: str = "§3"  # the audit that added it: §3 (issue 11) or "formats" (LyCORIS, XLabs, ComfyUI, families)


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda config: config.__setitem__(key, value)


def _entry(name: str, **fields: Any) -> Callable[[dict], None]:
    return lambda header: header[name].update(fields)


def _u16(header: dict) -> None:
    """q_proj as U16: the same shape in half the bytes (the rest of its old range left as a gap)."""
    begin = header[Q]["data_offsets"][0]
    header[Q].update(dtype="U16", data_offsets=[begin, begin + 64 * 64 * 2])


def _nested() -> str:
    return "[" * NESTED + "]" * NESTED


def _utf16(ctx: Ctx) -> list[str]:
    lora = ctx.lora("utf16")
    path = lora / "adapter_config.json"
    path.write_bytes(path.read_text().encode("utf-16"))
    return ["inspect", str(lora)]


def _latin1(ctx: Ctx) -> list[str]:
    lora = ctx.lora("latin1")
    path = lora / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "café/base"
    path.write_bytes(json.dumps(config, ensure_ascii=False).encode("latin-1"))
    return ["inspect", str(lora)]


def _nested_config(ctx: Ctx) -> list[str]:
    lora = ctx.lora("nested")
    (lora / "adapter_config.json").write_text(_nested())
    return ["inspect", str(lora)]


def _header_nested(ctx: Ctx) -> list[str]:
    body = ('{"a": {"dtype": "F32", "shape": ' + _nested() + ', "data_offsets": [0, 4]}}').encode()
    path = ctx.work / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    return ["inspect", str(path)]


def _factor(ctx: Ctx, dtype: str, itemsize: int, *command: str) -> list[str]:
    path = kohya(ctx.work / f"{dtype.lower()}.safetensors", dtype=dtype, itemsize=itemsize)
    out = [str(ctx.work / "out.safetensors")]
    return {"inspect": ["inspect", str(path)],
            "resize": ["resize", str(path), "--rank", "2", "--out", *out],
            "convert": ["convert", str(path), "--to", "peft", "--out", str(ctx.work / "out")]}[command[0]]


def _efbig(ctx: Ctx, command: str) -> list[str]:
    ctx.fsize = 4096  # bytes: the inputs are read whole, every output is larger than this
    lora = str(EXAMPLES / "tiny-lora")
    out = str(ctx.work / "out")
    return {"convert": ["convert", lora, "--to", "kohya", "--out", out + ".safetensors"],
            "resize": ["resize", lora, "--rank", "4", "--out", out],
            "blend": ["blend", lora, lora, "-w", "1,1", "--out", out]}[command]


def _truncated(ctx: Ctx) -> list[str]:
    path = kohya(ctx.work / "three.safetensors", ("lora_unet_m0_p", "lora_unet_m1_p", "lora_unet_m2_p"))
    raw = path.read_bytes()
    header, _ = read_st(path)
    last = max((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    assert last == "lora_unet_m2_p.alpha"
    path.write_bytes(raw[:-2])
    return ["inspect", str(path)]


def _overlap(ctx: Ctx) -> list[str]:
    base = ctx.base_header(lambda h: h[V].update(data_offsets=h[K]["data_offsets"]))
    return ["merge", "--base", str(base), str(EXAMPLES / "tiny-lora"), "--out", str(ctx.work / "out"),
            "--device", "cpu"]


def _record(text: str | bytes, command: str = "unmerge") -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        merged = ctx.record("merged", text)
        return [command, "--base", str(merged), str(EXAMPLES / "tiny-lora"), "--out", str(ctx.work / "out"),
                "--device", "cpu"]
    return build


def _record_entry(**fields: Any) -> str:
    entry = {"operation": "merge", "adapters": [{"name": "a", "weight": 1.0, "sha256": "0" * 64}], **fields}
    return json.dumps({"merges": [entry]})


def _fifo_record(ctx: Ctx) -> list[str]:
    merged = ctx.merged()
    ctx.fifo(merged / "lorahub_merge.json")
    return ["unmerge", "--base", str(merged), str(EXAMPLES / "tiny-lora"), "--out", str(ctx.work / "out"),
            "--device", "cpu"]


def _hub_pull(name: str, *extra: str) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        repo = ctx.repo({name: kohya(ctx.work / "lora.safetensors").read_bytes()})
        return ["pull", repo, *extra]
    return build


def _hub_brackets(ctx: Ctx) -> list[str]:
    repo = ctx.repo({"style [v2].safetensors": kohya(ctx.work / "lora.safetensors").read_bytes()})
    return ["pull", repo, "--out", str(ctx.work / "pulled"), "--no-inspect"]


def _out_dot(ctx: Ctx) -> list[str]:
    ctx.lora("lora")
    ctx.cwd = ctx.work
    return ["convert", "lora", "--to", "peft", "--out", "."]


def _manifest(ctx: Ctx, manifest: Any) -> list[str]:
    folder = ctx.registry_home()
    (folder / "broken.json").write_text(json.dumps(manifest))
    return ["registry", "show", "broken"]


def _victim(ctx: Ctx, *command: str) -> list[str]:
    ctx.registry_home()
    (ctx.work / "victim.json").write_text(json.dumps({"name": "victim", "tensors": {"w": [[2, 2], "F32"]}}))
    return ["registry", *command]


def _fifo_manifest(ctx: Ctx) -> list[str]:
    ctx.fifo(ctx.registry_home() / "pipe.json")
    return ["registry", "show", "pipe"]


def _big_header(ctx: Ctx, entries: int) -> list[str]:
    """A PEFT adapter whose header has `entries` entries (bench/bench_header.py's layout)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_header import make_peft

    make_peft(ctx.work / "big", entries)
    config = json.loads((ctx.work / "big" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "lorahub-example/tiny-llama"  # no name-mismatch warning
    (ctx.work / "big" / "adapter_config.json").write_text(json.dumps(config))
    return ["validate", str(ctx.work / "big"), "--base", str(EXAMPLES / "tiny-llama")]


def _base_fifo_weights(ctx: Ctx) -> list[str]:
    base = ctx.base()
    ctx.fifo(base / "model.safetensors")
    return ["validate", str(EXAMPLES / "tiny-lora"), "--base", str(base)]


def _base_fifo_config(ctx: Ctx) -> list[str]:
    base = ctx.base()
    ctx.fifo(base / "config.json")
    return ["validate", str(EXAMPLES / "tiny-lora"), "--base", str(base)]


def _adapter_fifo_config(ctx: Ctx) -> list[str]:
    lora = ctx.lora("lora")
    ctx.fifo(lora / "adapter_config.json")
    return ["inspect", str(lora)]


LORA = str(EXAMPLES / "tiny-lora")
BASE = str(EXAMPLES / "tiny-llama")
ESC = "\x1b[2J\x1b]0;owned\x07\r"

CASES: list[Case] = [
    # --- adapter_config.json
    Case("config-utf16", "`adapter_config.json` saved as UTF-16", _utf16,
         needles=("adapter_config.json", "UTF-16")),
    Case("config-latin1", "`adapter_config.json` in Latin-1 (`café`)", _latin1,
         needles=("adapter_config.json", "not UTF-8")),
    Case("config-nested", f"`adapter_config.json` nested {NESTED:,} deep", _nested_config,
         needles=("adapter_config.json", "nested too deeply")),
    Case("rank-pattern-regex", '`rank_pattern: {"[": 4}` (invalid regex)',
         lambda c: ["inspect", str(c.config("lora", _set("rank_pattern", {"[": 4})))],
         needles=("adapter_config.json", "rank_pattern", "regular expression")),
    Case("alpha-pattern-regex", '`alpha_pattern: {"q_(proj": 2}` (invalid regex)',
         lambda c: ["inspect", str(c.config("lora", _set("alpha_pattern", {"q_(proj": 2})))],
         needles=("adapter_config.json", "alpha_pattern", "q_(proj")),
    Case("base-model-int", "`base_model_name_or_path: 5`",
         lambda c: ["validate", str(c.config("lora", _set("base_model_name_or_path", 5))), "--base", BASE],
         needles=("adapter_config.json", "base_model_name_or_path", "a number")),
    Case("base-model-dict", '`base_model_name_or_path: {"a": 1}`',
         lambda c: ["validate", str(c.config("lora", _set("base_model_name_or_path", {"a": 1}))), "--base", BASE],
         needles=("adapter_config.json", "base_model_name_or_path", "an object")),
    # --- metadata of the wrong JSON type
    Case("diffusers-metadata-array", "`lora_adapter_metadata` = `[1]`",
         lambda c: ["inspect", str(diffusers(c.work / "d.safetensors", {"lora_adapter_metadata": "[1]"}))],
         needles=("d.safetensors", "lora_adapter_metadata", "an array")),
    Case("diffusers-metadata-field", '`lora_adapter_metadata` = `{"unet.alpha_pattern": [1]}`',
         lambda c: ["inspect", str(diffusers(c.work / "d.safetensors",
                                             {"lora_adapter_metadata": '{"unet.alpha_pattern": [1]}'}))],
         needles=("d.safetensors", "unet.alpha_pattern")),
    Case("layers-metadata-array", "`lorahub.layers` = `[1, 2]`",
         lambda c: ["inspect", str(kohya(c.work / "k.safetensors", metadata={"lorahub.layers": "[1, 2]"}))],
         needles=("k.safetensors", "lorahub.layers", "an array")),
    Case("layers-metadata-entry", '`lorahub.layers` = `{"lora_unet_a_b": {"target": 5}}`',
         lambda c: ["inspect", str(kohya(c.work / "k.safetensors",
                                         metadata={"lorahub.layers": '{"lora_unet_a_b": {"target": 5}}'}))],
         needles=("k.safetensors", "lorahub.layers", "target", "lora_unet_a_b")),
    Case("layers-metadata-nested", f"`lorahub.layers` nested {NESTED:,} deep",
         lambda c: ["inspect", str(kohya(c.work / "k.safetensors", metadata={"lorahub.layers": _nested()}))],
         needles=("k.safetensors", "lorahub.layers", "nested too deeply")),
    # --- markup and terminal control characters
    Case("markup-metadata", "metadata `[/] [bold]x[/bold]`",
         lambda c: ["inspect", str(kohya(c.work / "k.safetensors", metadata={"ss_comment": "[/] [bold]x[/bold]"}))],
         code=0, needles=("[/] [bold]x[/bold]",), note="printed literally"),
    Case("markup-name", "module name `lora_unet_x[/]y`",
         lambda c: ["inspect", str(kohya(c.work / "k.safetensors", ("lora_unet_x[/]y",)))],
         code=0, needles=("x[/]y",), note="printed literally"),
    Case("control-metadata", "metadata with `ESC[2J`, `ESC]0;…BEL`, `\\r`",
         lambda c: ["inspect", str(kohya(c.work / "k.safetensors", metadata={"ss_comment": f"a{ESC}b"}))],
         code=0, needles=("ss_comment=a b",), absent=("\x1b", "\x07", "\r"), note="escape sequences stripped"),
    Case("control-name", "a tensor name holding `ESC[2J`, `ESC]0;…BEL`, rank mismatch",
         lambda c: ["inspect", str(_control_name(c))],
         needles=("lora_unet_ab.lora_down.weight", "rank mismatch"), absent=("\x1b", "\x07", "\r")),
    # --- safetensors headers
    Case("header-nested", f"safetensors header nested {NESTED:,} deep", _header_nested,
         needles=("nested.safetensors", "corrupt safetensors header", "nested too deeply")),
    Case("header-truncated", "adapter file cut 2 bytes short", _truncated,
         needles=("three.safetensors", "tensor 'lora_unet_m2_p.alpha'", "truncated")),
    Case("factor-f8", "factors in F8_E4M3", lambda c: _factor(c, "F8_E4M3", 1, "resize"), code=0,
         needles=("resized",), note="handled: widened to fp32", on_main="FP8 already worked"),
    Case("factor-u16-inspect", "factors in U16", lambda c: _factor(c, "U16", 2, "inspect"), code=0,
         needles=("U16 ×2", "not floating point"), note="reported, with a warning"),
    Case("factor-u16-resize", "factors in U16", lambda c: _factor(c, "U16", 2, "resize"),
         needles=("u16.safetensors", "lora_unet_a_b.lora_down.weight", "floating-point factors")),
    Case("factor-i32-convert", "factors in I32", lambda c: _factor(c, "I32", 4, "convert"),
         needles=("i32.safetensors", "lora_unet_a_b.lora_down.weight", "floating-point factors"),
         leaves_no=("out",)),
    Case("base-unknown-dtype", "base tensor of dtype `Q4`",
         lambda c: ["validate", LORA, "--base", str(c.base_header(_entry(Q, dtype="Q4")))],
         needles=("model.safetensors", Q, "unknown dtype 'Q4'")),
    Case("base-u16", "base tensor of dtype U16, merged",
         lambda c: ["merge", "--base", str(c.base_header(_u16)), LORA,
                    "--out", str(c.work / "out"), "--device", "cpu"],
         needles=("model.safetensors", Q, "U16"), leaves_no=("out",), on_main="merge already refused U16"),
    Case("base-negative-shape", "base tensor of shape `[-64, -64]`",
         lambda c: ["validate", LORA, "--base", str(c.base_header(_entry(Q, shape=[-64, -64])))],
         needles=("model.safetensors", Q, "non-negative")),
    Case("base-huge-shape", "base tensor of shape `[2⁴⁰, 2⁴⁰]` (4 PB of data), offsets of 16 KB",
         lambda c: ["validate", LORA, "--base", str(c.base_header(_entry(Q, shape=[1 << 40, 1 << 40])))],
         needles=("model.safetensors", Q, "takes")),
    Case("base-huge-offsets", "base tensor of shape `[2⁴⁰, 2⁴⁰]` with offsets to match",
         lambda c: ["merge", "--base", str(c.base_header(lambda h: h[Q].update(
             shape=[1 << 40, 1 << 40], data_offsets=[0, 1 << 82]))), LORA, "--out", str(c.work / "out"),
                    "--device", "cpu"],
         needles=("model.safetensors", Q, "beyond any real file"), leaves_no=("out",)),
    Case("base-byte-size", "base tensor: F16 `[64, 64]` over 16 KB (byte size ≠ dtype × shape)",
         lambda c: ["validate", LORA, "--base", str(c.base_header(_entry(Q, dtype="F16")))],
         needles=("model.safetensors", Q, "takes 8,192 bytes")),
    Case("base-overlap", "base tensors sharing bytes (v_proj's offsets = k_proj's), merged", _overlap,
         needles=("model.safetensors", "overlap", "k_proj", "v_proj"), leaves_no=("out",)),
    Case("base-out-of-range", "base tensor whose offsets run past the end of the file, merged",
         lambda c: ["merge", "--base", str(c.base_header(_entry(Q, data_offsets=[10**9, 10**9 + 16384]))),
                    LORA, "--out", str(c.work / "out"), "--device", "cpu"],
         needles=("model.safetensors", Q, "truncated"), leaves_no=("out",)),
    # --- writing: the disk fills up
    Case("efbig-convert", "file-size limit (EFBIG) while `convert` writes", lambda c: _efbig(c, "convert"),
         isolate=True, needles=("out.safetensors", "File too large", "nothing was written"),
         leaves_no=("out.safetensors",)),
    Case("efbig-resize", "file-size limit (EFBIG) while `resize` writes", lambda c: _efbig(c, "resize"),
         isolate=True, needles=("out", "File too large", "nothing was written"), leaves_no=("out",)),
    Case("efbig-blend", "file-size limit (EFBIG) while `blend` writes", lambda c: _efbig(c, "blend"),
         isolate=True, needles=("out", "File too large", "nothing was written"), leaves_no=("out",)),
    # --- merge records
    Case("record-entry-number", '`lorahub_merge.json` = `{"merges": [1]}`', _record('{"merges": [1]}'),
         needles=("lorahub_merge.json", "merges[0]"), leaves_no=("out",)),
    Case("record-weight-string", "`lorahub_merge.json`: an adapter's weight `\"x\"`",
         _record(_record_entry(adapters=[{"name": "a", "weight": "x", "sha256": "0"}])),
         needles=("lorahub_merge.json", "weight"), leaves_no=("out",)),
    Case("record-undo-path", "`lorahub_merge.json`: `undo_file` `../../etc/passwd`",
         _record(_record_entry(undo_file="../../etc/passwd")),
         needles=("lorahub_merge.json", "undo_file"), leaves_no=("out",)),
    Case("record-nested", f"`lorahub_merge.json` nested {NESTED:,} deep, merged over", _record(_nested(), "merge"),
         needles=("lorahub_merge.json", "nested too deeply"), leaves_no=("out",)),
    Case("record-utf16", "`lorahub_merge.json` in UTF-16", _record('{"merges": []}'.encode("utf-16")),
         needles=("lorahub_merge.json", "UTF-16"), leaves_no=("out",)),
    # --- the Hub
    Case("hub-absolute", "Hub file `/tmp/evil.safetensors`", _hub_pull("/tmp/evil.safetensors"), hub=True,
         needles=("absolute path", "/tmp/evil.safetensors")),
    Case("hub-dotdot", "Hub file `a/../../evil.safetensors`", _hub_pull("a/../../evil.safetensors"), hub=True,
         needles=("'..'", "a/../../evil.safetensors")),
    Case("hub-control", "Hub file `ev\\x1b[31mil.safetensors`", _hub_pull("ev\x1b[31mil.safetensors"), hub=True,
         needles=("control characters",), absent=("\x1b",)),
    Case("hub-brackets", "Hub file `style [v2].safetensors`", _hub_brackets, hub=True, code=0,
         needles=("style [v2].safetensors",), note="pulled (glob characters escaped)"),
    # --- options
    Case("out-dot", "`convert lora --to peft --out .` beside the adapter", _out_dot,
         needles=("--out contains the adapter",), keeps=("lora/adapter_config.json",),
         on_main="§1 (output policy) already refused it"),
    Case("device-meta", "`--device meta`", lambda c: ["resize", LORA, "--rank", "2", "--out", str(c.work / "o"),
                                                       "--device", "meta"],
         code=2, needles=("--device", "meta"), on_main="§4 already made it a usage error (exit 2)"),
    # --- FIFOs and devices where a file is expected
    Case("fifo-adapter", "adapter file is a FIFO",
         lambda c: ["inspect", str(c.fifo(c.work / "a.safetensors"))], isolate=True,
         needles=("a.safetensors", "not a regular file (a FIFO)")),
    Case("fifo-config", "`adapter_config.json` is a FIFO", _adapter_fifo_config, isolate=True,
         needles=("adapter_config.json", "a FIFO")),
    Case("fifo-base-file", "`--base` is a FIFO", lambda c: ["validate", LORA, "--base",
                                                             str(c.fifo(c.work / "b.safetensors"))],
         isolate=True, needles=("b.safetensors", "a FIFO")),
    Case("fifo-base-weights", "base `model.safetensors` is a FIFO", _base_fifo_weights, isolate=True,
         needles=("model.safetensors", "a FIFO")),
    Case("fifo-base-config", "base `config.json` is a FIFO", _base_fifo_config, isolate=True,
         needles=("config.json", "a FIFO")),
    Case("fifo-manifest", "registry manifest is a FIFO", _fifo_manifest, isolate=True,
         needles=("pipe.json", "a FIFO")),
    Case("fifo-record", "`lorahub_merge.json` is a FIFO", _fifo_record, isolate=True,
         needles=("lorahub_merge.json", "a FIFO"), leaves_no=("out",)),
    Case("dev-zero-adapter", "adapter `/dev/zero`", lambda c: ["inspect", "/dev/zero"],
         needles=("/dev/zero", "a character device")),
    Case("dev-zero-base", "`--base /dev/zero`", lambda c: ["validate", LORA, "--base", "/dev/zero"],
         needles=("/dev/zero", "a character device")),
    # --- registry names are names
    Case("registry-remove-path", "`registry remove ../victim`", lambda c: _victim(c, "remove", "../../victim"),
         code=2, needles=("invalid registry name", "../../victim"), keeps=("victim.json",)),
    Case("registry-show-path", "`registry show ../victim`", lambda c: _victim(c, "show", "../../victim"),
         needles=("no registry manifest named '../../victim'",), on_main="show only ever looked names up"),
    Case("registry-add-path", "`registry add … --name ../x`",
         lambda c: _victim(c, "add", BASE, "--name", "../victim"), code=2,
         needles=("invalid registry name",), keeps=("victim.json",), on_main="add checked its --name already"),
    Case("registry-manifest-types", 'user manifest with `"aliases": 5`',
         lambda c: _manifest(c, {"name": "broken", "aliases": 5, "tensors": {"w": [[2, 2], "F32"]}}),
         needles=("broken.json", "aliases")),
    Case("registry-manifest-shape", 'user manifest tensor `[[-1, 2], "F32"]`',
         lambda c: _manifest(c, {"name": "broken", "tensors": {"w": [[-1, 2], "F32"]}}),
         needles=("broken.json", "tensor 'w'")),
    # --- size
    Case("header-300k", "validate an adapter whose header has 300,000 entries (39 MB) against a tiny base",
         lambda c: _big_header(c, 300_000), isolate=True,
         needles=("does not fit: 150000 of 150000 modules",), note="timed"),
]


# ---------------------------------------------------------------------------------------------
# the formats audit: LyCORIS, XLabs Flux, ComfyUI dotted names, model families, --alpha
# (tests/test_hostile_formats.py tries each class on every command; here one row per class)

LIN = "lora_unet_lin"  # kohya's name for the one-file base's `lin` (8 × 16)
LOHA = {"hada_w1_a": [8, 2], "hada_w1_b": [2, 16], "hada_w2_a": [8, 2], "hada_w2_b": [2, 16]}
LOKR = {"lokr_w1": [2, 4], "lokr_w2_a": [4, 2], "lokr_w2_b": [2, 4]}  # kron((2×4), (4×2)·(2×4)) = 8 × 16


def lin_base(ctx: Ctx) -> Path:
    path = ctx.work / "base.safetensors"
    path.write_bytes(st_bytes({"lin.weight": ("F32", [8, 16], f32(128))}))
    return path


def lyco(ctx: Ctx, factors: dict[str, Any], alpha: float | None = 1.0, module: str = LIN) -> Path:
    """A LyCORIS file of one module: {key suffix: shape (F32) or (dtype, shape, bytes)}, plus `.alpha`."""
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for suffix, spec in factors.items():
        if isinstance(spec, tuple):
            tensors[f"{module}.{suffix}"] = spec
        else:
            count = 1
            for dim in spec:
                count *= dim
            tensors[f"{module}.{suffix}"] = ("F32", spec, f32(count, 0.1))
    if alpha is not None:
        tensors[f"{module}.alpha"] = ("F32", [], struct.pack("<f", alpha))
    path = ctx.work / "lyco.safetensors"
    path.write_bytes(st_bytes(tensors))
    return path


def _lyco_cmd(command: str, factors: dict[str, Any], alpha: float | None = 1.0,
              module: str = LIN) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        adapter, base, out = str(lyco(ctx, factors, alpha, module)), str(lin_base(ctx)), str(ctx.work / "out")
        return {"inspect": ["inspect", adapter],
                "merge": ["merge", "--base", base, adapter, "--out", out, "--device", "cpu"],
                "convert": ["convert", adapter, "--to", "kohya", "--base", base, "--out",
                            out + ".safetensors"]}[command]
    return build


XL = "double_blocks.0.processor.qkv_lora1"
S0 = "single_blocks.0.processor"


def _xlabs(ctx: Ctx, shapes: dict[str, list[int] | None]) -> list[str]:
    """An XLabs Flux file (dim 32, MLP 128), `shapes` replacing or (None) removing tensors."""
    layout: dict[str, list[int] | None] = {
        f"{XL}.down.weight": [2, 32], f"{XL}.up.weight": [96, 2], f"{S0}.qkv_lora.down.weight": [2, 32],
        f"{S0}.qkv_lora.up.weight": [96, 2], f"{S0}.proj_lora.down.weight": [2, 160],
        f"{S0}.proj_lora.up.weight": [32, 2]}
    layout.update(shapes)
    tensors = {key: ("F32", shape, f32(shape[0] * shape[1])) for key, shape in layout.items() if shape is not None}
    path = ctx.work / "x.safetensors"
    path.write_bytes(st_bytes(tensors))
    return ["inspect", str(path)]


def _flat(ctx: Ctx, modules: dict[str, tuple[int, int]], to: str = "kohya") -> list[str]:
    """A kohya file of `modules` {name: (out, in)}, converted --to `to`."""
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for name, (n, k) in modules.items():
        tensors.update({f"{name}.lora_down.weight": ("F32", [2, k], f32(2 * k)),
                        f"{name}.lora_up.weight": ("F32", [n, 2], f32(2 * n)),
                        f"{name}.alpha": ("F32", [], struct.pack("<f", 2.0))})
    path = ctx.work / "c.safetensors"
    path.write_bytes(st_bytes(tensors))
    return ["convert", str(path), "--to", to, "--out", str(ctx.work / "out") + (".safetensors" if to != "peft" else "")]


def _no_config(ctx: Ctx, alpha: str) -> list[str]:
    weights = ctx.work / "weights"
    weights.mkdir()
    shutil.copy(EXAMPLES / "tiny-lora" / "adapter_model.safetensors", weights)
    return ["merge", "--base", BASE, str(weights), "--alpha", alpha, "--out", str(ctx.work / "out"), "--device", "cpu"]


_I8 = ("I8", [8, 2], bytes(range(1, 17)))
FORMAT_CASES: list[Case] = [
    Case("lyco-shapes", "LoHa `hada_w1_b` of rank 3 beside `hada_w1_a` of rank 2 (also: output dims that "
         "disagree, a missing half, a Tucker `hada_t1` or `lora_mid` of the wrong rank)",
         _lyco_cmd("inspect", {**LOHA, "hada_w1_b": [3, 16]}), needles=("lyco.safetensors", LIN, "do not fit"),
         on_main="the LyCORIS reader checked factor shapes", era="formats"),
    Case("lyco-lokr-both", "LoKr with both `lokr_w1` and `lokr_w1_a`/`lokr_w1_b` (or `lokr_w2` with its factors)",
         _lyco_cmd("merge", {**LOKR, "lokr_w1_a": [2, 1], "lokr_w1_b": [1, 4]}),
         needles=("lyco.safetensors", LIN, "both a full w1"), leaves_no=("out",), era="formats"),
    Case("lyco-rank-zero", "LoHa factors of rank 0 (`hada_w1_a` [8, 0]; a `diff` of 0 rows)",
         _lyco_cmd("inspect", {**LOHA, "hada_w1_a": [8, 0], "hada_w1_b": [0, 16]}),
         needles=("lyco.safetensors", f"{LIN}.hada_w1_a", "empty"), era="formats"),
    Case("lyco-alpha-zero", "LyCORIS `alpha` = 0 (LyCORIS: alpha = dim; ComfyUI: scale 0)",
         _lyco_cmd("merge", LOHA, alpha=0.0), needles=("lyco.safetensors", LIN, "alpha is 0"), leaves_no=("out",),
         era="formats"),
    Case("lyco-alpha-nan", "LyCORIS `alpha` NaN (or ±Inf)", _lyco_cmd("merge", LOHA, alpha=float("nan")),
         needles=("lyco.safetensors", "alpha", "nan"), leaves_no=("out",),
         on_main="NaN alphas were refused for every layer kind", era="formats"),
    Case("lyco-int8", "LoHa factor `hada_w1_a` in I8 (or BOOL, I32)", _lyco_cmd("merge", {**LOHA, "hada_w1_a": _I8}),
         needles=("lyco.safetensors", f"{LIN}.hada_w1_a", "floating-point factors"), leaves_no=("out",),
         era="formats"),
    Case("lyco-dora", "`dora_scale` [5, 1] on an 8-row layer", _lyco_cmd("inspect", {**LOHA, "dora_scale": [5, 1]}),
         needles=("lyco.safetensors", f"{LIN}.dora_scale", "[5, 1]"), on_main="dora_scale's shape was checked",
         era="formats"),
    Case("lyco-huge-rank", "LoHa of r = 512 on an 8 × 16 layer: its exact factorisation has rank r² = 262,144",
         _lyco_cmd("convert", {"hada_w1_a": [8, 512], "hada_w1_b": [512, 16], "hada_w2_a": [8, 512],
                               "hada_w2_b": [512, 16]}),
         code=0, needles=("rank up to 8",), note="converted at rank 8 = min(n, k), through ΔW", era="formats"),
    Case("lyco-diff-shape", "`diff` [8, 12] on an 8 × 16 weight (or a 1-D `diff` there)",
         _lyco_cmd("merge", {"diff": [8, 12]}, alpha=None), needles=("does not fit",), leaves_no=("out",),
         on_main="validate compared the diff with the base", era="formats"),
    Case("lyco-markup", "LyCORIS module `lora_unet_x[red]ESC[31m` whose factors do not fit",
         _lyco_cmd("inspect", {**LOHA, "hada_w1_b": [3, 16]}, module="lora_unet_x[red]\x1b[31m"),
         needles=("lora_unet_x[red]",), absent=("\x1b",), on_main="errors went through ui.clean", era="formats"),
    Case("xlabs-proj-narrow", "XLabs single-block `proj_lora.down` of 8 inputs, narrower than its `qkv_lora`'s 32",
         lambda c: _xlabs(c, {f"{S0}.proj_lora.down.weight": [2, 8]}),
         needles=("x.safetensors", f"{S0}.proj_lora.down.weight", "8 input features"), era="formats"),
    Case("xlabs-partial", "XLabs `qkv_lora1.down` without `.up` (also: rank mismatch, an extra `.alpha`)",
         lambda c: _xlabs(c, {f"{XL}.up.weight": None}),
         needles=("x.safetensors", f"{XL}.down.weight", "no matching"), on_main="the XLabs reader paired keys",
         era="formats"),
    Case("xlabs-qkv-width", "XLabs single-block `qkv_lora.up` of 97 rows (not 3·32)",
         lambda c: _xlabs(c, {f"{S0}.qkv_lora.up.weight": [97, 2]}),
         needles=("x.safetensors", "97 rows", "3·32"), on_main="the XLabs reader checked it", era="formats"),
    Case("comfy-empty", "ComfyUI name `diffusion_model..x` (or a trailing dot)",
         lambda c: _flat(c, {"diffusion_model..x": (32, 32)}),
         needles=("c.safetensors", "diffusion_model..x", "empty path segment"), leaves_no=("out.safetensors",),
         era="formats"),
    Case("comfy-kohya-inside", "ComfyUI name `diffusion_model.lora_unet_double_blocks_0_img_attn_qkv`",
         lambda c: _flat(c, {"diffusion_model.lora_unet_double_blocks_0_img_attn_qkv": (96, 32)}),
         needles=("c.safetensors", "kohya name"), leaves_no=("out.safetensors",), era="formats"),
    Case("comfy-unknown-te", "ComfyUI text encoder `text_encoders.clip_x.transformer.…`",
         lambda c: _flat(c, {"text_encoders.clip_x.transformer.text_model.encoder.layers.0.self_attn.q_proj":
                             (32, 32)}),
         needles=("c.safetensors", "clip_x"), leaves_no=("out.safetensors",), era="formats"),
    Case("flux-qkv-97", "kohya Flux `double_blocks_0_img_attn_qkv` with 97 B rows, to diffusers names",
         lambda c: _flat(c, {"lora_unet_double_blocks_0_img_attn_qkv": (97, 32)}, to="peft"),
         needles=("c.safetensors", "97 rows, not a multiple of 3"), leaves_no=("out",),
         on_main="the family transform checked the split", era="formats"),
    Case("alpha-negative", "`--alpha -1` (or 0) for PEFT weights without adapter_config.json",
         lambda c: _no_config(c, "-1"), code=2, needles=("--alpha", "not a lora_alpha"), leaves_no=("out",),
         era="formats"),
    Case("alpha-overflow", "`--alpha 1e400` (or nan)", lambda c: _no_config(c, "1e400"), code=2,
         needles=("--alpha", "beyond ±1.8e308"), leaves_no=("out",), era="formats"),
]
CASES += FORMAT_CASES


def _control_name(ctx: Ctx) -> Path:
    path = ctx.work / "k.safetensors"
    name = "lora_unet_a\x1b[2J\x1b]0;owned\x07b"
    path.write_bytes(st_bytes({f"{name}.lora_down.weight": ("F32", [4, 16], f32(64)),
                               f"{name}.lora_up.weight": ("F32", [16, 3], f32(48))}))
    return path


# ---------------------------------------------------------------------------------------------
# running and checking


@dataclass
class Outcome:
    code: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float
    max_rss_mb: float | None = None


def run_subprocess(args: list[str], ctx: Ctx, timeout: float = TIMEOUT, root: Path = REPO) -> Outcome:
    def limits() -> None:
        if ctx.fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (ctx.fsize, ctx.fsize))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "lorahub.cli", *args], capture_output=True, text=True,
                              env=command_env(ctx, root), cwd=ctx.cwd or ctx.work, timeout=timeout,
                              preexec_fn=limits, errors="replace")
    except subprocess.TimeoutExpired as exc:
        def text(value: Any) -> str:
            return value.decode(errors="replace") if isinstance(value, bytes) else value or ""

        return Outcome(None, text(exc.stdout), text(exc.stderr), time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return Outcome(done.returncode, done.stdout, done.stderr, time.perf_counter() - start,
                   rss / 1024 if rss > before else None)


def problems(case: Case, ctx: Ctx, outcome: Outcome) -> list[str]:
    """What is wrong with `outcome` for `case` (empty: it behaves)."""
    found = []
    if outcome.code is None:
        return [f"hung (killed after {TIMEOUT} s)"]
    if outcome.code != case.code:
        found.append(f"exit {outcome.code}, expected {case.code}")
    if TRACEBACK in outcome.stderr or TRACEBACK in outcome.stdout:
        found.append("printed a traceback")
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if case.code != 0:
        errors = [line for line in lines if line.startswith("error:")]
        if len(lines) != 1 or len(errors) != 1:
            found.append(f"stderr is not one error line: {lines[:3]!r}")
        haystack = errors[0] if errors else outcome.stderr
    else:
        haystack = outcome.stdout + outcome.stderr
    found += [f"{needle!r} not in the output" for needle in case.needles if needle not in haystack]
    found += [f"{bad!r} printed" for bad in case.absent if bad in outcome.stdout + outcome.stderr]
    found += [f"{rel} was deleted" for rel in case.keeps if not (ctx.work / rel).exists()]
    found += [f"{rel} was written" for rel in case.leaves_no if (ctx.work / rel).exists()]
    leftovers = [p.name for p in ctx.work.rglob("*") if ".lorahub-tmp-" in p.name or ".lorahub-old-" in p.name]
    if leftovers:
        found.append(f"left {leftovers[:3]}")
    return found


def _portable(text: str, ctx: Ctx) -> str:
    if ctx.env.get("HF_HOME"):
        text = text.replace(ctx.env["HF_HOME"], "$HF_HOME")
    text = text.replace(str(ctx.work) + "/", "").replace(str(ctx.work), ".")
    return " ".join(text.replace(str(EXAMPLES) + "/", "examples/").split())


def command_text(args: list[str], ctx: Ctx) -> str:
    return _portable("lorahub " + " ".join(a if a and " " not in a else repr(a) for a in args), ctx)


def before_text(case: Case, ctx: Ctx, outcome: Outcome) -> str:
    """What a run printed before §3, in a few words: a hang, a traceback's last line, the error line,
    or success where an error was due."""
    if outcome.code is None:
        return f"still running after {TIMEOUT} s (killed)"
    lines = [line.strip() for line in outcome.stderr.splitlines() if line.strip()]
    if TRACEBACK in outcome.stderr:
        return "traceback: " + _portable(lines[-1], ctx)[:110]
    error = next((line for line in lines if line.startswith("error:")), None)
    if error is not None:
        return _portable(error, ctx)[:200] + f" (exit {outcome.code})"
    out = [line.strip() for line in outcome.stdout.splitlines() if line.strip() and line.strip()[0] not in "┏┃┡│└"]
    first = (out or lines or [""])[0]
    return f"exit {outcome.code}: " + _portable(first, ctx)[:110]


def shown(case: Case, ctx: Ctx, outcome: Outcome) -> str:
    """What lorahub printed, for the table: the error line, or what a successful run shows."""
    if outcome.code is None:
        return f"(hung; killed after {TIMEOUT} s)"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if case.code != 0 or outcome.code != 0:
        text = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")
    else:
        text = case.note
        if case.id.startswith(("markup", "control")):
            text += ": " + next(line.strip() for line in outcome.stdout.splitlines()
                                if any(n in line for n in case.needles))
    return _portable(text, ctx)


def _cell(text: str) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text.replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", metavar="FILE", help="write the markdown table to FILE")
    ap.add_argument("--only", nargs="*", help="case ids to run")
    ap.add_argument("--before", metavar="DIR", type=Path,
                    help="also run each §3 case with the lorahub in DIR (e.g. `git archive main | tar -x -C DIR` "
                         "of the commit before §3) and add a column saying what it printed")
    ap.add_argument("--before-formats", metavar="DIR", type=Path,
                    help="the same for the formats audit's cases: the lorahub before it (3f9246d)")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.id in args.only]
    hub = None
    if any(c.hub for c in cases):
        sys.path.insert(0, str(REPO / "tests"))
        from hubserver import HubServer

        hub = HubServer(tokens={}).start()
    rows, failed = [], 0
    try:
        with tempfile.TemporaryDirectory(prefix="lorahub-hostile-") as tmp:
            home = Path(tmp) / "hf_home"
            for case in cases:
                work = Path(tmp) / case.id
                work.mkdir()
                env = {"HF_HOME": str(home)}
                if hub is not None:
                    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="10",
                               HF_HUB_DOWNLOAD_TIMEOUT="10", HF_TOKEN="")
                before = None
                before_root = {"§3": args.before, "formats": args.before_formats}[case.era]
                if before_root is not None:
                    old = Ctx(work / "before", hub=hub, env=dict(env), label=f"{case.id}-before")
                    old.work.mkdir()
                    before = before_text(case, old, run_subprocess(case.build(old), old, root=before_root.resolve()))
                ctx = Ctx(work / "now", hub=hub, env=dict(env), label=case.id)
                ctx.work.mkdir()
                command = case.build(ctx)
                outcome = run_subprocess(command, ctx)
                wrong = problems(case, ctx, outcome)
                failed += bool(wrong)
                exit_text = "hang" if outcome.code is None else str(outcome.code)
                if case.id == "header-300k":
                    rss = f", {outcome.max_rss_mb:,.0f} MB" if outcome.max_rss_mb else ""
                    exit_text += f" ({outcome.seconds:.1f} s{rss})"
                rows.append((case, command_text(command, ctx), before, shown(case, ctx, outcome), exit_text, wrong))
                status = "ok " if not wrong else "BAD"
                print(f"{status} {case.id:28} exit {exit_text:14} {shown(case, ctx, outcome)[:150]}"
                      + (f"\n    {wrong}" if wrong else ""), flush=True)
    finally:
        if hub is not None:
            hub.stop()
    with_before = args.before is not None or args.before_formats is not None
    old_column = ("before | ", "--- | ") if with_before else ("", "")
    table = [f"| hostile input | command | {old_column[0]}what lorahub prints now | exit |",
             f"| --- | --- | {old_column[1]}--- | --- |"]
    for case, command, before, text, exit_text, wrong in rows:
        mark = "" if not wrong else " **(check failed: " + "; ".join(wrong) + ")**"
        era = "§3" if case.era == "§3" else "the formats audit"
        guard = f" *(already so before {era}: {case.on_main})*" if case.on_main else ""
        old = f"{_cell(before or '')} | " if with_before else ""
        table.append(f"| {case.input} | `{_cell(command)}` | {old}{_cell(text)}{mark}{guard} | {exit_text} |")
    text = "\n".join(table) + "\n"
    if args.write:
        Path(args.write).write_text(HEADER + text)
        print(f"wrote {args.write}")
    else:
        print(text)
    return 1 if failed else 0


HEADER = """# Hostile inputs

What lorahub prints for each hostile input of issue 11 §3 — generated by running them:
`python scripts/hostile_inputs.py --write docs/hostile-inputs.md` (the same cases are the tests in
`tests/test_hostile.py`). Each case is built from the bundled example (`lorahub/examples`: `tiny-lora`,
`tiny-llama`) in a scratch directory and run as `python -m lorahub.cli …` in a fresh process; paths are
shown relative to that directory. An error is always one `error: …` line on stderr and no traceback;
exit 1 is invalid input, 2 a usage error. Every write that fails leaves nothing behind.

The rules behind the table: every safetensors header is validated in full when it is parsed
(`storage.parse_header_bytes`: known dtype, shape of non-negative integers, byte size = dtype × shape,
offsets inside the file and not overlapping, metadata values strings); every JSON file lorahub reads
goes through one reader (`storage.read_json_file`: a regular file, UTF-8, nesting caught); file- and
Hub-provided text is printed through one sanitiser (`ui.clean`: terminal escape sequences and control
characters removed) and never as rich markup; only regular files are opened (`storage.open_regular`:
a FIFO or a device is refused without blocking); registry names are names; Hub file names that could
not be local file names are refused.

The rows from `LoHa hada_w1_b of rank 3 …` on come from the audit of the formats and layer kinds added
later (LyCORIS, XLabs Flux, ComfyUI dotted names, model families, `--alpha`; every class is tried on
inspect, validate, merge, convert, resize and blend in `tests/test_hostile_formats.py`). Their "before"
is the lorahub before that audit (3f9246d); the other rows' is the lorahub before §3. The rules they
added: a LyCORIS module is checked whole when it is read (factor shapes, one form per LoKr side, no empty
factor, no `alpha` 0 where LyCORIS and ComfyUI disagree on it, its own factors' dtypes), a LoHa/LoKr whose
factorisation would outgrow ΔW is factored through ΔW, a dotted (ComfyUI) module name is a module path,
and `--alpha` is a positive finite number.

"""


if __name__ == "__main__":
    sys.exit(main())
