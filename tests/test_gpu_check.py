"""`benchmarks/gpu_check.sh --dry-run`: the GPU check's code path on the CPU (tiny shapes), so
the script is known to run the day a GPU is there. It measures nothing here."""
from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_the_table():
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--modes", "nam_sma", "--chunks", "2",
         "--warmup-chunks", "2"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rows = [line for line in out.splitlines() if line.startswith("| nam_sma |")]
    assert [r.split("|")[2].strip() for r in rows] == ["eager", "compiled", "graphs"]
    eager, compiled, graphs = rows
    assert "skipped: CUDA graphs need CUDA" in graphs
    for row in (eager, compiled):  # DiT FPS, end-to-end FPS and first-chunk latency measured
        cells = [c.strip() for c in row.split("|")[4:7]]
        assert all(float(c) > 0 for c in cells), row
    assert "CUDA vs CPU, `small` preset, float32" in out


def test_gpu_check_without_a_gpu_says_to_dry_run():
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--dry-run" in done.stderr
