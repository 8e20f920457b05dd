"""The adapter library (issue 15): `lorahub list` over a tree of a few hundred adapters (PEFT folders,
kohya/diffusers/LyCORIS files, nested, hard links and symlinks, corrupt files, base shards), `--fits`,
the SQLite index (reuse, pruning, corruption, concurrent runs), the Hugging Face cache, and `lorahub rm`."""
from __future__ import annotations

import ast
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_runner import run_cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from make_library import llama_modules, make_library, peft_dir, write_safetensors  # noqa: E402

from lorahub.library import list_library  # noqa: E402


def _listing(*args, env=None) -> dict:
    result = run_cli("list", *map(str, args), "--json", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh LORAHUB_HOME (the index lives there); no LORAHUB_LIBRARY."""
    path = tmp_path / "lorahub-home"
    monkeypatch.setenv("LORAHUB_HOME", str(path))
    monkeypatch.delenv("LORAHUB_LIBRARY", raising=False)
    return path


@pytest.fixture
def library(tmp_path, peft_lora_dir, peft_dora_dir, peft_wide_dir, kohya_unet_file, tiny_llama_sharded_dir,
            tiny_unet_dir) -> tuple[Path, dict]:
    """A few hundred generated adapters plus real ones written by PEFT and diffusers, real base models
    (shards, a diffusers pipeline) beside them."""
    root = tmp_path / "library"
    manifest = make_library(root, 300, small=True, seed=1)
    real = root / "real"
    for name, src in (("peft_lora", peft_lora_dir), ("deep/er/peft_dora", peft_dora_dir),
                      ("peft_wide", peft_wide_dir)):
        shutil.copytree(src, real / name)
        manifest["adapters"][f"real/{name}"] = {"format": "peft"}
    (real / "kohya").mkdir(parents=True)
    shutil.copy(kohya_unet_file, real / "kohya" / "unet_lora.safetensors")
    manifest["adapters"]["real/kohya/unet_lora.safetensors"] = {"format": "kohya", "rank": 4, "alpha": 2.0}
    from lorahub.formats import load_adapter, save_adapter

    save_adapter(load_adapter(kohya_unet_file), real / "unet_diffusers.safetensors", "diffusers")
    manifest["adapters"]["real/unet_diffusers.safetensors"] = {"format": "diffusers", "rank": 4}
    shutil.copytree(tiny_llama_sharded_dir, root / "bases" / "tiny_llama_sharded")
    shutil.copytree(tiny_unet_dir, root / "bases" / "tiny_unet")
    return root, manifest


# ----------------------------------------------------------------------------------------------
# listing


def test_every_adapter_is_listed_exactly_once(home, library):
    root, manifest = library
    payload = _listing(root)
    assert list(payload)[0] == "ok" and payload["ok"] is True
    listed = [os.path.relpath(a["path"], root) for a in payload["adapters"]]
    assert len(listed) == len(set(listed))
    # one row per adapter, under one of its names; its other names (hard links, symlinks) in `also`
    groups: dict[str, set[str]] = {rel: {rel} for rel in manifest["adapters"]}
    for alias, target in manifest["aliases"].items():
        groups[target].add(alias)
    rows = {}
    for adapter in payload["adapters"]:
        names = {os.path.relpath(adapter["path"], root)} | {os.path.relpath(a, root) for a in adapter["also"]}
        owner = [rel for rel, group in groups.items() if os.path.relpath(adapter["path"], root) in group]
        assert len(owner) == 1, adapter["path"]
        assert names == groups[owner[0]], (names, groups[owner[0]])
        rows[owner[0]] = adapter
    assert set(rows) == set(manifest["adapters"])
    # base models' weights are not adapters; corrupt files are problems, one each
    assert not any("bases/" in a["path"] for a in payload["adapters"])
    problems = sorted(os.path.relpath(p["path"], root) for p in payload["problems"])
    assert problems == sorted(manifest["problems"])
    assert all(p["error"] and "\n" not in p["error"] for p in payload["problems"])
    # what the generator wrote is what the listing says
    for rel, facts in manifest["adapters"].items():
        row = rows[rel]
        assert row["format"] == facts["format"], rel
        if facts.get("rank"):
            assert row["rank"] == facts["rank"], rel
        if facts.get("alpha") is not None:
            assert row["alpha"] == facts["alpha"], rel
        if facts.get("modules") is not None:
            assert row["modules"] == facts["modules"], rel
        if facts.get("family"):
            assert row["family"] == facts["family"], rel
    # every candidate's header was read once: adapters, problems, and the base shards the walk met
    assert payload["index"]["read"] >= len(payload["adapters"]) + len(payload["problems"]) + len(manifest["others"])


def test_listing_agrees_with_inspect(home, library):
    """Header-only rows say what `lorahub inspect` (which reads the adapter) says: format, modules, ranks,
    alpha and scale (where the header holds them), parameters."""
    root, _ = library
    rows = {os.path.relpath(a["path"], root / "real"): a for a in _listing(root / "real")["adapters"]}
    assert set(rows) == {"peft_lora", "deep/er/peft_dora", "peft_wide", "kohya/unet_lora.safetensors",
                         "unet_diffusers.safetensors"}
    for rel, row in rows.items():
        result = run_cli("inspect", root / "real" / rel, "--headers-only", "--json")
        info = json.loads(result.stdout)
        for key in ("format", "modules", "rank", "rank_distribution", "params"):
            assert row[key] == info[key], (rel, key, row[key], info[key])
        if row["alpha_from"] is not None:  # known from the header: exact
            for key in ("alpha", "alpha_distribution", "scale", "scale_distribution"):
                assert row[key] == info[key], (rel, key, row[key], info[key])
    assert rows["deep/er/peft_dora"]["algorithm"] == "dora" and rows["deep/er/peft_dora"]["dora"]
    assert rows["kohya/unet_lora.safetensors"]["alpha_from"] == "metadata"  # kohya's ss_network_alpha
    assert rows["peft_lora"]["family"] == "llama" and rows["kohya/unet_lora.safetensors"]["family"] == "sd1"


def test_text_output_one_row_per_adapter_and_problems_one_line_each(home, library):
    root, manifest = library
    result = run_cli("list", root, "--sort", "size")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "FORMAT", "MODEL"]
    problems = [line for line in lines if line.startswith("problem: ")]
    rows = [line for line in lines[1:] if not line.startswith("problem: ")]
    assert len(rows) == len(manifest["adapters"]) and len(problems) == len(manifest["problems"])
    sizes = [a["size"] for a in _listing(root, "--sort", "size")["adapters"]]
    assert sizes == sorted(sizes, reverse=True)
    assert "adapters" in result.stderr and "problem" in result.stderr


def test_format_filter_and_sorts(home, library):
    root, manifest = library
    kohya = _listing(root, "--format", "kohya")["adapters"]
    assert kohya and {a["format"] for a in kohya} == {"kohya"}
    assert len(kohya) == sum(1 for f in manifest["adapters"].values() if f["format"] == "kohya")
    by_rank = _listing(root, "--sort", "rank")["adapters"]
    ranks = [max(map(int, a["rank_distribution"]), default=0) for a in by_rank]
    assert ranks == sorted(ranks, reverse=True)
    names = [a["name"].casefold() for a in _listing(root)["adapters"]]
    assert names == sorted(names)
    assert run_cli("list", root, "--sort", "alpha").returncode == 2
    assert run_cli("list", root / "missing").returncode == 1


def test_names_print_without_terminal_control_characters(home, tmp_path):
    lib = tmp_path / "lib"
    peft_dir(lib / "evil\x1b[31mred", llama_modules(1, 64, 128, 32, ["q_proj"]), 4, 8, "org/x\x1b]0;title\x07")
    result = run_cli("list", lib)
    assert result.returncode == 0 and "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "evilred" in result.stdout and "org/x" in result.stdout


# ----------------------------------------------------------------------------------------------
# --fits


def test_fits_keeps_exactly_the_adapters_that_validate(home, library, tiny_llama_dir):
    """Generated adapters for hidden 64 (tiny_llama's) and 96 (another hidden size), the real PEFT ones,
    SD adapters: --fits keeps exactly the hidden-64 ones, and each one kept passes `lorahub validate`."""
    root, manifest = library
    for i in range(5):
        peft_dir(root / "wide" / f"w{i}", llama_modules(2, 96, 192, 48, ["q_proj", "v_proj"]), 4, 8, "org/wide")
    fits = _listing(root, "--fits", tiny_llama_dir)
    kept = sorted(os.path.relpath(a["path"], root) for a in fits["adapters"])
    expected = sorted(rel for rel, facts in manifest["adapters"].items()
                      if facts["format"] == "peft" and rel != "real/peft_wide")
    assert kept == expected
    assert "real/peft_wide" not in kept and not any(rel.startswith("wide/") for rel in kept)
    everything = _listing(root)
    assert fits["base"] and fits["excluded"] == len(everything["adapters"]) - len(kept)
    for rel in [kept[0], "real/peft_lora", "real/peft_wide", "wide/w0"]:
        code = run_cli("validate", root / rel, "--base", tiny_llama_dir).returncode
        assert code == (1 if "wide" in rel else 0), rel


def test_fits_takes_a_registry_name(home, tmp_path):
    lib = tmp_path / "lib"
    for i in range(3):  # Llama-3-8B: 8 KV heads of 128 (k/v 1024 wide); Llama-2-7B: 4096
        peft_dir(lib / f"l3-{i}", llama_modules(32, 4096, 14336, 1024, ["q_proj", "k_proj", "v_proj"]), 16, 32,
                 "meta-llama/Meta-Llama-3-8B")
        peft_dir(lib / f"l2-{i}", llama_modules(32, 4096, 11008, 4096, ["q_proj", "k_proj", "v_proj"]), 16, 32,
                 "meta-llama/Llama-2-7b-hf")
    kept = {Path(a["path"]).name for a in _listing(lib, "--fits", "llama-3-8b")["adapters"]}
    assert kept == {"l3-0", "l3-1", "l3-2"}
    assert {Path(a["path"]).name for a in _listing(lib, "--fits", "llama-2-7b")["adapters"]} == {"l2-0", "l2-1", "l2-2"}
    result = run_cli("list", lib, "--fits", "no-such-base")
    assert result.returncode == 1 and "no-such-base" in result.stderr


# ----------------------------------------------------------------------------------------------
# the index


def test_index_reads_only_what_changed(home, library):
    root, manifest = library
    first = _listing(root)
    total = first["index"]["read"]
    assert first["index"]["reused"] == 0 and Path(first["index"]["path"]) == home / "library.sqlite"
    again = _listing(root)
    assert again["index"] == {"path": first["index"]["path"], "read": 0, "reused": total}
    assert again["adapters"] == first["adapters"]
    # touch one file: one header read
    one = root / next(rel for rel in manifest["adapters"] if rel.endswith(".safetensors"))
    os.utime(one, ns=(one.stat().st_atime_ns, one.stat().st_mtime_ns + 1_000_000_000))
    touched = _listing(root)
    assert touched["index"]["read"] == 1 and touched["index"]["reused"] == total - 1
    # rewrite one with another rank: the listing says the new rank
    peft = root / next(rel for rel, f in manifest["adapters"].items() if f["format"] == "peft")
    peft_dir(peft, llama_modules(2, 64, 128, 32, ["q_proj"]), 2, 4, "meta-llama/Llama-2-7b-hf")
    row = next(a for a in _listing(root)["adapters"] if a["path"] == str(peft))
    assert row["rank"] == 2 and row["modules"] == 2
    # a removed file leaves the listing and the index
    (root / "real" / "kohya" / "unet_lora.safetensors").unlink()
    gone = _listing(root)
    assert not any(a["path"].endswith("unet_lora.safetensors") for a in gone["adapters"])
    with sqlite3.connect(home / "library.sqlite") as conn:
        assert not conn.execute("SELECT count(*) FROM entries WHERE path LIKE '%unet_lora.safetensors'").fetchone()[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-version"])
def test_a_damaged_index_is_rebuilt(home, tmp_path, damage):
    lib = tmp_path / "lib"
    for i in range(4):
        peft_dir(lib / f"a{i}", llama_modules(1, 64, 128, 32, ["q_proj"]), 4, 8, "org/base")
    assert _listing(lib)["index"]["read"] == 4
    index = home / "library.sqlite"
    if damage == "garbage":
        for suffix in ("-wal", "-shm"):
            Path(str(index) + suffix).unlink(missing_ok=True)
        index.write_bytes(b"this is not a database" * 200)
    elif damage == "truncated":
        with sqlite3.connect(index) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = index.read_bytes()
        index.write_bytes(data[: len(data) // 2] + b"\x00" * 100)
    else:
        with sqlite3.connect(index) as conn:
            conn.execute("PRAGMA user_version = 7")
    rebuilt = _listing(lib)
    assert len(rebuilt["adapters"]) == 4 and rebuilt["index"]["read"] == 4, rebuilt["index"]
    assert _listing(lib)["index"]["read"] == 0  # and it works again
    with sqlite3.connect(index) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_unusable_home_lists_without_the_index(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    monkeypatch.setenv("LORAHUB_HOME", str(blocker))
    lib = tmp_path / "lib"
    peft_dir(lib / "a", llama_modules(1, 64, 128, 32, ["q_proj"]), 4, 8, "org/base")
    payload = _listing(lib)
    assert len(payload["adapters"]) == 1 and payload["index"]["path"] is None
    assert payload["warnings"] and "without the index" in payload["warnings"][0]


def test_concurrent_listings_keep_the_index_whole(home, tmp_path):
    """Four `lorahub list` processes at once on an empty index: all succeed with the same rows, the index
    passes SQLite's integrity check, and the next run reads nothing."""
    lib = tmp_path / "lib"
    make_library(lib, 60, small=True, seed=3)
    env = {**os.environ, "LORAHUB_HOME": str(home), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "lorahub.cli", "list", str(lib), "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    rows = [[a["path"] for a in json.loads(out)["adapters"]] for out, _ in outputs]
    assert all(r == rows[0] for r in rows) and len(rows[0]) == 60
    with sqlite3.connect(home / "library.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert _listing(lib)["index"]["read"] == 0


def test_concurrent_writers_in_process(home, tmp_path):
    """Threads storing into one index file through separate connections: no lost or torn rows."""
    from lorahub.library.index import Index

    path = home / "library.sqlite"
    home.mkdir(parents=True)
    errors = []

    def writer(n: int) -> None:
        try:
            with Index(path) as index:
                for i in range(20):
                    index.store([(f"/x/{n}/{i}", "1:2:3", {"status": "adapter", "n": n, "i": i})])
        except Exception as exc:  # pragma: no cover - the assertion says what failed
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with Index(path) as index:
        found = index.lookup(f"/x/{n}/{i}" for n in range(4) for i in range(20))
    assert len(found) == 80 and all(summary["status"] == "adapter" for _, summary in found.values())


# ----------------------------------------------------------------------------------------------
# no torch on the listing path


# lorahub modules that import torch (or numpy) when loaded, today or through what they import
_HEAVY = {"adapter", "kinds", "lowrank", "devices", "inspect", "batches", "resize", "convert", "demo", "merge",
          "blend", "names", "validate", "base", "registry"}


def _top_level_imports(path: Path) -> set[str]:
    """The modules a file imports when it is loaded (not inside functions or `if TYPE_CHECKING:`), relative
    ones without their dots: `..formats.kohya` -> `formats.kohya`."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names.add(module)
            names |= {f"{module}.{alias.name}".strip(".") for alias in node.names}
    return names


def test_library_modules_import_no_torch_at_the_top():
    """The modules of this path import nothing heavy when loaded: torch only ever comes from code that
    needs tensors (`--fits` and `search --check` load adapters and validate, inside those functions)."""
    files = [*sorted((ROOT / "lorahub" / "library").glob("*.py")), ROOT / "lorahub" / "commands" / "library.py",
             ROOT / "lorahub" / "hub" / "search.py", ROOT / "lorahub" / "hub" / "cache.py"]
    for file in files:
        for name in _top_level_imports(file):
            parts = name.split(".")
            assert not {"torch", "numpy"} & set(parts), (file.name, name)
            assert parts[0] not in _HEAVY, (file.name, name)


def test_listing_runs_no_torch_code(home, library, monkeypatch):
    """While `lorahub list` runs (the CLI command, in this process, one worker), not one function of
    torch, safetensors.torch or numpy is called: whatever the package imports when loaded, the listing
    itself needs none of it."""
    import torch

    from lorahub.library import parallel

    root, _ = library
    monkeypatch.setattr(parallel, "workers", lambda: 1)
    heavy_dirs = tuple(str(Path(m.__file__).parent) for m in (torch, __import__("numpy")))
    calls: list[str] = []

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(heavy_dirs):
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")
        elif event == "c_call" and str(getattr(arg, "__module__", "") or "").startswith(("torch", "numpy")):
            calls.append(f"{arg.__module__}.{getattr(arg, '__name__', '?')}")

    sys.setprofile(hook)
    try:
        result = run_cli("list", root, "--json")
    finally:
        sys.setprofile(None)
    assert result.returncode == 0 and json.loads(result.stdout)["index"]["read"] > 300
    assert not calls, sorted(set(calls))[:10]


def test_list_imports_no_torch(tmp_path):
    """`lorahub list` in a fresh process, as `python -m lorahub.cli` runs it: torch is never imported (it
    is also among tests/test_start_fast.py's light commands)."""
    lib = tmp_path / "lib"
    make_library(lib, 40, small=True)
    code = ("import sys, runpy\nsys.argv = ['lorahub', 'list', sys.argv[1], '--json']\n"
            "try:\n    runpy.run_module('lorahub.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\nsys.stderr.write('TORCH=%s' % ('torch' in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "LORAHUB_HOME": str(tmp_path / "h")})
    assert "TORCH=False" in out.stderr, out.stderr[-2000:]
    assert len(json.loads(out.stdout)["adapters"]) == 40


# ----------------------------------------------------------------------------------------------
# the library API


def test_library_api(home, library):
    root, manifest = library
    listing = list_library([root], format="peft", sort="name")
    assert listing.entries and all(e.format == "peft" for e in listing.entries)
    assert listing.read > 0 and listing.to_dict()["index"]["read"] == listing.read
    with pytest.raises(Exception, match="unknown sort"):
        list_library([root], sort="alpha")


def test_generated_file_is_a_valid_safetensors_header(tmp_path):
    from lorahub.storage import read_header

    path = tmp_path / "x.safetensors"
    write_safetensors(path, [("a", "F16", (3, 4)), ("b", "F32", ())], {"k": "v"})
    header = read_header(path)
    assert list(header.tensors) == ["a", "b"] and header.metadata == {"k": "v"}
    assert path.stat().st_size == header.data_start + 24 + 4
