"""The benchmarks in bench/ still run (smallest settings; they time nothing useful here)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        __import__(name)
        return sys.modules[name]

    return load


def test_bench_resize_kohya_tiny(bench, capsys):
    assert bench("bench_resize_kohya").main(["--tiny", "--repeats", "2", "--cli-repeats", "0", "--legacy-repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "per-layer" in out and "legacy I/O" in out and "same ranks" in out


def test_bench_header_small(bench, capsys):
    for fmt in ("peft", "kohya"):
        assert bench("bench_header").main(["--entries", "600", "--format", fmt, "--repeats", "1",
                                           "--cli-repeats", "0", "--legacy-samples", "2"]) == 0
        assert "header parses 1 (every run: [1]), safe_open calls 0" in capsys.readouterr().out


def test_bench_resize_tiny(bench, capsys):
    assert bench("bench_resize").main(["--tiny", "--device", "cpu", "--repeats", "1", "--per-layer-repeats", "1",
                                       "--dense-samples", "0", "--no-io"]) == 0
    assert "RATIO per-layer / batched" in capsys.readouterr().out


def test_bench_startup_smoke(bench, capsys):
    assert bench("bench_startup").main(["--repeats", "1", "--commands", "help,inspect-headers", "--bytecode", "as-is",
                                        "--no-torch-reference"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("lorahub --", "lorahub inspect"))]
    assert len(rows) == 2 and all(row.endswith("  none") for row in rows), rows


def test_bench_library_small(bench, capsys, tmp_path):
    assert bench("bench_library").main(["--adapters", "40", "--small", "--cold-repeats", "1", "--repeats", "1",
                                        "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "listed 40 adapters" in out and "as generated" in out and "RATIO cold / find" in out
    assert "touched one file" in out and "headers read: 1" in out
    assert "torch imported by the listing process: no" in out


def test_bench_lycoris_tiny(bench, capsys):
    assert bench("bench_lycoris").main(["--tiny", "--repeats", "1", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "RATIO dense / factored+SVD" in out and "ESTIMATED" in out
