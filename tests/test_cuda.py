"""The tiny chain on a CUDA GPU in bf16 with torch.compile: tokenizer -> latent cache -> denoiser -> samples ->
evaluate, in one process and under torchrun --nproc_per_node=1 (NCCL). Skipped without a GPU (CI has none);
run on a GPU machine with:  python -m pytest -q tests/test_cuda.py"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(launcher, script, *args):
    r = subprocess.run([*launcher, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{script} {' '.join(args)}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def proxy_and_ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy")
    _run([sys.executable], "proxy.py", "--steps", "20", "--num_workers", "0", "--out", str(d / "proxy.pt"))
    from data import BuiltinSource
    src = BuiltinSource(32, 200, "val")
    np.savez(d / "ref.npz", arr_0=np.stack([np.asarray(src.load(i)) for i in range(200)]), labels=np.array(src.labels))
    return str(d / "proxy.pt"), str(d / "ref.npz")


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_tiny_chain_on_cuda_bf16_compiled(launcher, proxy_and_ref, tmp_path):
    run = [sys.executable] if launcher == "python" else [sys.executable, "-m", "torch.distributed.run",
                                                         "--nproc_per_node=1", "--master_port=29531"]
    proxy, ref = proxy_and_ref
    common = ["--precision", "bf16", "--num_workers", "0"]
    _run(run, "train_tokenizer.py", "--preset", "tiny", "--perceptual_weight", "0", "--max_steps", "30",
         "--builtin_size", "512", "--compile", "--eval_every", "30", "--eval_images", "100", "--grid_every", "30",
         "--results_dir", str(tmp_path / "tok"), *common)
    tok = glob.glob(str(tmp_path / "tok" / "*"))[0]
    assert "held-out PSNR" in open(os.path.join(tok, "log.txt")).read()
    _run(run, "cache_latents.py", "--tokenizer_ckpt", tok, "--cache_path", str(tmp_path / "cache"),
         "--builtin_size", "512", *common)
    _run(run, "train_diffusion.py", "--model", "tiny", "--cache_path", str(tmp_path / "cache"), "--max_steps", "30",
         "--global_batch_size", "64", "--lr", "1e-3", "--compile", "--grid_every", "30", "--grid_steps", "5",
         "--results_dir", str(tmp_path / "dit"), *common)
    dit = glob.glob(str(tmp_path / "dit" / "*"))[0]
    samples = str(tmp_path / "s.npz")
    _run(run, "sample.py", "--ckpt", dit, "--num_samples", "100", "--batch_size", "50", "--num_steps", "5",
         "--cfg_scale", "2", "--compile", "--precision", "bf16", "--out", samples)
    with np.load(samples) as f:
        assert f["arr_0"].shape == (100, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    P = ["--feature_net", "proxy", "--proxy_ckpt", proxy]
    _run(run, "evaluate.py", "recon", "--ckpt", tok, "--num_images", "100", "--lpips", "0", "--precision", "bf16",
         *P, "--out", str(tmp_path / "recon.json"))
    _run(run, "evaluate.py", "gen", "--samples", samples, "--ref", ref, *P, "--out", str(tmp_path / "gen.json"))
    _run(run, "evaluate.py", "latent", "--cache_path", str(tmp_path / "cache"), "--num_images", "512",
         "--gmm_k", "1,2", "--out", str(tmp_path / "lat.json"))
    recon, gen = (json.load(open(tmp_path / f)) for f in ("recon.json", "gen.json"))
    assert 0 < recon["psnr"] < 60 and np.isfinite(recon["proxy_rfid"]) and np.isfinite(gen["proxy_fid"])


def test_attention_runs_on_flash_sdpa_in_bf16():
    """Every ViT of the chain (MAETok's RoPE attention, DiT) reaches the flash kernel in bf16: with the other SDPA
    backends disabled, a fallback (a mask, an fp32 q after RoPE) raises instead of silently running the slow math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from diffusion import DiT, make_config as dit_config
    from tokenizer import build, make_config
    tok = build(make_config("MAETok-B-128", aux_targets=())).cuda().train()
    dit = DiT(dit_config("LightningDiT-B", in_channels=32, num_tokens=256, grid=(16, 16))).cuda().train()
    x = torch.rand(4, 3, 256, 256, device="cuda") * 2 - 1
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        tok(x, tok.sample_mask(4, "cuda"))["loss"].backward()
        dit(torch.randn(4, 256, 32, device="cuda"), torch.rand(4, device="cuda"),
            torch.randint(1000, (4,), device="cuda")).float().pow(2).mean().backward()
