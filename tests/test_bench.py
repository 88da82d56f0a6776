"""bench.py --quick runs on CPU and prints every row with its MFU (the numbers themselves go in the README)."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_quick_runs_on_cpu():
    r = subprocess.run([sys.executable, "bench.py", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CPU fp32 estimate" in r.stdout
    for row in ("tokenizer tiny training", "FID InceptionV3", "diffusion tiny training", "sampling tiny"):
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(row))
        assert "img/s" in line and "MFU" in line, line


def test_mfu_peak_table_matches_device_names():
    from bench import PEAK_BF16
    find = lambda name: next(p for k, p in PEAK_BF16 if k in name)
    assert find("NVIDIA H100 80GB HBM3") == 989.4e12 and find("NVIDIA H100 PCIe") == 756e12
    assert find("NVIDIA H200") == 989.4e12 and find("NVIDIA A100-SXM4-80GB") == 312e12
