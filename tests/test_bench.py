"""bench.py --quick runs on CPU and prints every row with its MFU (the numbers themselves go in the README)."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.slow
def test_bench_quick_runs_on_cpu():
    r = subprocess.run([sys.executable, "bench.py", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CPU fp32 estimate" in r.stdout
    for row in ("tokenizer tiny training", "FID InceptionV3", "diffusion tiny training", "sampling tiny"):
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(row))
        assert "img/s" in line and "MFU" in line, line


def test_mfu_peak_table_matches_device_names_and_mig_slices():
    from bench import gpu_peak
    assert gpu_peak("NVIDIA H100 80GB HBM3", 132)[0] == 989.4e12 and gpu_peak("NVIDIA H100 PCIe", 114)[0] == 756e12
    assert gpu_peak("NVIDIA H200", 132)[0] == 989.4e12 and gpu_peak("NVIDIA A100-SXM4-80GB", 108)[0] == 312e12
    peak, desc = gpu_peak("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60)     # a slice: its share of the SMs
    assert abs(peak - 989.4e12 * 60 / 132) < 1 and "MIG slice" in desc
    assert gpu_peak("Some GPU", 10)[0] is None


def test_the_paper_tokenizer_step_has_its_teachers_and_lpips():
    """The MAETok-B-128 rows time the paper's loss stack: three aux targets with DINOv2-L and SigLIP SO400M."""
    import bench
    with torch.device("meta"):
        model, lpips = bench.paper_maetok(torch.device("meta"))
    assert set(model.aux) == {"hog", "dinov2", "siglip"} and isinstance(lpips, torch.nn.Module)
    size = {k: sum(p.numel() for p in fn.parameters()) for k, fn in model.feature_fns.items()}
    assert size["dinov2"] > 300e6 and size["siglip"] > 400e6, size
