"""The planning micro-benchmark (`python -m vllm_entropy_kv.bench.planning`) on a tiny grid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vllm_entropy_kv.bench import planning


def test_importing_it_leaves_vllm_out() -> None:
    code = "import sys, vllm_entropy_kv.bench.planning; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_table_and_section(tmp_path: Path, capsys) -> None:
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nkept\n")
    argv = ["--shapes", "embedded", "--tokens", "80", "--policies", "entropy,src",
            "--warmup", "0", "--repeats", "1", "--check-device", "--write", str(page)]
    assert planning.main(argv) == 0
    out = capsys.readouterr().out
    assert "check-device entropy embedded n=80: PASS" in out
    assert "| policy | shape | n | W | device | median s |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| entropy |", "| src |"))]
    assert len(rows) == 2 and rows[0].split(" | ")[1:5] == ["embedded", "80", "32", "cpu"]
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert "<!-- planning-cpu:begin -->" in text and "<!-- planning-cpu:end -->" in text
    assert "torch " + planning.torch.__version__ in text and rows[1] in text
