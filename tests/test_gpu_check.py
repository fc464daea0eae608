"""``scripts/gpu-check.sh``: on a machine without a GPU it says so, runs nothing and fails."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_the_check_says_so_and_fails(tmp_path):
    doc = tmp_path / "benchmarks.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "PTP_GPU_CHECK_DOC": str(doc)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], capture_output=True, env=env,
                          cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 1
    assert "no GPU" in proc.stderr.decode() and "nothing was run" in proc.stderr.decode()
    assert proc.stdout == b"" and not doc.exists()


def test_the_table_replaces_the_previous_gpu_section(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_section", ROOT / "scripts" / "gpu_section.py")
    gpu_section = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_section)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nCPU tables.\n")
    gpu_section.write(doc, gpu_section.section("NVIDIA H200", "row 1 | 2.0x", versions="ptp 0"))
    gpu_section.write(doc, gpu_section.section("NVIDIA H200", "row 1 | 3.0x", versions="ptp 0"))
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nCPU tables.\n")
    assert text.count("## GPU check: NVIDIA H200") == 1 and "3.0x" in text and "2.0x" not in text
