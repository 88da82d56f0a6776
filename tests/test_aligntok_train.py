"""AlignTok's three stages through train_tokenizer.py on CPU (docs/fidelity.md c.6): what each stage trains and freezes,
L_sp and its adaptive weight, the PatchGAN schedule, the EMA, exact resume inside a stage, a tiny overfit."""
import json
import os

import pytest
import torch

import train_tokenizer
from discriminator import adaptive_weight

BASE = ["--global_batch_size", "8", "--builtin_size", "32", "--num_workers", "0", "--log_every", "1",
        "--eval_every", "-1", "--grid_every", "-1"]


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def last(run):
    return torch.load(sorted(__import__("glob").glob(os.path.join(run, "checkpoints", "*.pt")))[-1],
                      weights_only=True)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    import proxy
    path = str(tmp_path_factory.mktemp("enc") / "proxy.pt")
    proxy.main(["--steps", "3", "--batch_size", "8", "--num_workers", "0", "--out", path])
    return path


@pytest.fixture(scope="module")
def stages(encoder_ckpt, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("stages"))
    s1 = train_tokenizer.main(["--preset", "AlignTok-tiny", "--encoder_ckpt", encoder_ckpt, "--max_steps", "3",
                               "--disc", "patchgan", "--disc_start", "2", "--results_dir", d, *BASE])
    s2 = train_tokenizer.main(["--stage", "perceptual", "--init_from", s1, "--max_steps", "2", "--results_dir", d,
                               *BASE])
    s3 = train_tokenizer.main(["--stage", "decoder", "--init_from", s2, "--max_steps", "2", "--ema_decay", "0",
                               "--results_dir", d, *BASE])
    return s1, s2, s3


def _part(sd, prefix):
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def test_stage_one_trains_adapter_and_decoder_with_the_encoder_frozen(stages, encoder_ckpt):
    s1 = last(stages[0])
    trunk = torch.load(encoder_ckpt, weights_only=True)["model"]
    for k, v in _part(s1["model"], "encoder.trunk.").items():
        torch.testing.assert_close(v, trunk[k[len("encoder."):]], rtol=0, atol=0)  # the proxy's, bit for bit
    s2_start = torch.load(os.path.join(stages[1], "checkpoints", os.listdir(os.path.join(stages[1], "checkpoints"))[0]),
                          weights_only=True)
    assert any(not torch.equal(v, s1["model"][k]) for k, v in _part(s2_start["model"], "encoder.").items())
    # the PatchGAN from 0-based step 2 of stage 1: no G term at the first two logged steps, one at the third
    m = metrics(stages[0])
    assert [("g_loss" in r) for r in m if "pixel" in r] == [False, False, True]
    assert s1["disc"] is not None and "main.0.weight" in s1["disc"]


def test_stage_two_semantic_preservation_is_zero_at_its_start_and_then_weighted(stages):
    m = [r for r in metrics(stages[1]) if "pixel" in r]
    assert m[0]["sp"] == 0.0 and m[0]["loss"] == pytest.approx(m[0]["pixel"])   # L_sp = 0, no NaN
    assert m[1]["sp"] > 0 and 0 < m[1]["sp_lambda"] < 1e8
    log = open(os.path.join(stages[1], "log.txt")).read()
    assert "semantic preservation" in log
    # the weight and what it comes from are logged; at the first step grad L_sp = 0, so eps decides (and is said)
    assert m[0]["sp_lambda_eps_bound"] == 1.0 and m[1]["sp_lambda_eps_bound"] == 0.0
    assert m[1]["sp_lambda"] == pytest.approx(m[1]["sp_lambda_nll_grad"] / (m[1]["sp_lambda_grad"] + 1e-4), rel=1e-5)
    assert "step 1: warning: the adaptive weight sp_lambda was eps_bound in 100% of steps" in log
    g = [r for r in metrics(stages[0]) if "d_weight" in r][0]
    assert g["d_weight"] == pytest.approx(min(1e4, g["d_weight_nll_grad"] / (g["d_weight_grad"] + 1e-4)), rel=1e-5)


def test_the_paper_recipe_crops_the_short_side_and_uses_vavaes_adam():
    """AlignTok's data: the short side resized to the image size, then a random crop (not MAETok's random-resized
    crop); G and D on VA-VAE's Adam betas (0.5, 0.9); an image that varies only down its rows keeps every row."""
    import numpy as np
    from PIL import Image
    import data
    rows = np.repeat(np.linspace(0, 255, 300).astype(np.uint8)[:, None, None], 400, 1).repeat(3, 2)
    img = Image.fromarray(rows)                                             # 300 x 400, constant along each row
    ref = data.center_crop_arr(img, 256)                                    # the short side at 256, no zoom
    for seed in range(4):
        got = data.transform(img, 256, True, np.random.default_rng(seed), crop="short_random")
        torch.testing.assert_close(got, data.to_tensor(ref))
    _, args, explicit = train_tokenizer.parse_args(["--preset", "AlignTok-L-f16d32", "--stage", "perceptual"])
    from tokenizer import RECIPES
    train_tokenizer.engine.apply_recipe(args, RECIPES["AlignTok-L-f16d32"]["perceptual"], explicit)
    assert args.crop == "short_random" and train_tokenizer.disc_betas(args) == (0.5, 0.9) and args.beta1 == 0.5
    _, args, _ = train_tokenizer.parse_args([])
    assert train_tokenizer.disc_betas(args) == (0.9, 0.95)                 # MAETok: D as G, as official
    with pytest.raises(SystemExit):
        p, args, _ = train_tokenizer.parse_args(["--disc_betas", "0.5"])
        train_tokenizer.validate(p, args)


def test_adaptive_weight_scales_inversely_with_the_loss():
    g_nll, g_sp = torch.randn(10), torch.randn(10)
    for c in (0.1, 10.0):
        ratio = adaptive_weight(g_nll, c * g_sp, max_weight=1e8) / adaptive_weight(g_nll, g_sp, max_weight=1e8)
        assert abs(ratio - 1 / c) < 1e-3 / min(c, 1)
    assert adaptive_weight(g_nll, 0 * g_sp, max_weight=1e8) * 0 == 0       # L_sp = 0: finite times 0


def test_stage_three_keeps_the_latent_and_its_ema_is_the_model_at_decay_zero(stages):
    s2, s3 = last(stages[1]), last(stages[2])
    for prefix in ("encoder.", "adapter."):                                  # z(x) is frozen bit for bit
        for k, v in _part(s3["model"], prefix).items():
            assert torch.equal(v, s2["ema"][k]), k
    assert any(not torch.equal(v, s2["ema"][k]) for k, v in _part(s3["model"], "decoder.").items())
    for k in s3["model"]:
        assert torch.equal(s3["model"][k], s3["ema"][k])                      # decay 0: EMA = the model


def test_resume_inside_a_stage_is_exact(stages, tmp_path):
    full = train_tokenizer.main(["--stage", "perceptual", "--init_from", stages[0], "--max_steps", "4",
                                 "--results_dir", str(tmp_path / "a"), *BASE])
    half = train_tokenizer.main(["--stage", "perceptual", "--init_from", stages[0], "--max_steps", "2",
                                 "--decay_steps", "4", "--results_dir", str(tmp_path / "b"), *BASE])
    train_tokenizer.main(["--resume", half, "--max_steps", "4"])
    a, b = last(full), last(half)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in metrics(full)] == [r["loss"] for r in metrics(half)]


def test_flags_name_the_stages(capsys, encoder_ckpt):
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--preset", "AlignTok-tiny", "--stage", "decoder_finetune"])
    assert "choose align, perceptual, decoder, scratch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--preset", "AlignTok-tiny", "--stage", "perceptual"])
    assert "needs --init_from" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--encoder_ckpt"):
        train_tokenizer.main(["--preset", "AlignTok-tiny", "--max_steps", "1", *BASE])


@pytest.mark.slow
def test_tiny_aligntok_fits_one_batch(tmp_path):
    """8 images (flipped and cropped at random, as in training): the L1 falls by more than 40% in 60 steps."""
    run = train_tokenizer.main(["--preset", "AlignTok-tiny", "--stage", "scratch", "--builtin_size", "8",
                                "--global_batch_size", "8", "--max_steps", "60", "--lr", "3e-3", "--num_workers", "0",
                                "--log_every", "1", "--eval_every", "-1", "--grid_every", "-1",
                                "--results_dir", str(tmp_path)])
    pix = [r["pixel"] for r in metrics(run) if "pixel" in r]
    assert max(pix[-3:]) < 0.6 * pix[0], (pix[0], pix[-3:])


def test_decoder_starts_from_a_vavae_file(tmp_path, encoder_ckpt):
    """--decoder_ckpt: post_quant_conv + decoder from a VA-VAE Lightning file of the same shape (AlignTok-tiny's
    decoder here); a decoder of another shape is a clear error."""
    from aligntok import VAVAE, VAVAEConfig
    torch.manual_seed(3)
    shape = dict(image_size=32, patch_size=4, latent_dim=8, z_channels=8, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(8,))
    vae = VAVAE(VAVAEConfig(**shape)).state_dict()
    torch.save({"state_dict": vae}, tmp_path / "vavae.ckpt")
    run = train_tokenizer.main(["--preset", "AlignTok-tiny", "--encoder_ckpt", encoder_ckpt, "--max_steps", "1",
                                "--lr", "1e-12", "--decoder_ckpt", str(tmp_path / "vavae.ckpt"),
                                "--results_dir", str(tmp_path / "r"), *BASE])
    sd = last(run)["model"]
    for k, v in vae.items():
        if k.startswith(("decoder.", "post_quant_conv.")):
            torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-6)
    torch.save({"state_dict": VAVAE(VAVAEConfig(**{**shape, "latent_dim": 4})).state_dict()}, tmp_path / "bad.ckpt")
    with pytest.raises(SystemExit, match="does not hold this decoder"):
        train_tokenizer.main(["--preset", "AlignTok-tiny", "--encoder_ckpt", encoder_ckpt, "--max_steps", "1",
                              "--decoder_ckpt", str(tmp_path / "bad.ckpt"), "--results_dir", str(tmp_path / "b"), *BASE])


@pytest.mark.slow
def test_torchrun_trains_the_paper_structure_through_stage_two(tmp_path):
    """AlignTok-L-f16d32's structure (a DINOv2 encoder with its unused mask token, the adapter, VA-VAE's decoder,
    the PatchGAN) under 2 gloo ranks at 64 px with DINOv2-S: the perceptual stage with L_sp and the GAN from step
    0, at one image per rank (where a view gradient used to mismatch DDP's buckets), from a stage-1 file."""
    import subprocess
    import sys
    from dataclasses import asdict
    from conftest import ROOT
    from engine import save_checkpoint
    from tokenizer import build, make_config
    cfg = make_config("AlignTok-L-f16d32", image_size=64, dinov2_arch="vits14", enc_dim=384)
    torch.manual_seed(0)
    sd = build(cfg).state_dict()
    save_checkpoint({"model": sd, "ema": sd, "step": 1, "config": asdict(cfg), "rng": [],
                     "args": {"preset": "AlignTok-L-f16d32", "stage": "align"}}, str(tmp_path / "stage1.pt"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
                        "train_tokenizer.py", "--stage", "perceptual", "--init_from", str(tmp_path / "stage1.pt"),
                        "--dinov2_arch", "vits14", "--perceptual_weight", "0", "--global_batch_size", "2",
                        "--builtin_size", "8", "--num_workers", "0", "--eval_every", "-1", "--grid_every", "-1",
                        "--log_every", "1", "--max_steps", "2", "--results_dir", str(tmp_path / "p")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Grad strides do not match" not in r.stderr
    run = next((tmp_path / "p").iterdir())
    m = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [r["step"] for r in m] == [1, 2] and all(r["sp_lambda"] >= 0 and "d_loss" in r for r in m)
    assert '"dinov2_arch": "vits14"' in (run / "log.txt").read_text()                  # the stage-1 file's config
