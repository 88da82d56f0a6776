"""MacTok (mactok.py): KL closed forms, the masking law, semantic top-k, alignment, diagnostics, the DINOv2 encoder
init, and training through train_tokenizer.py."""
import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, golden, golden_tensor
from mactok import MacTok, draw_mask_ratios, kl_divergence, sample_posterior, top_k_mask
from tokenizer import build, make_config, stage_config


def _tiny(**kw):
    torch.manual_seed(0)
    return build(make_config("MacTok-tiny", **kw))


def test_kl_closed_forms_and_normalisation():
    mu, lv = torch.zeros(3, 4, 5), torch.zeros(3, 4, 5)
    assert kl_divergence(mu, lv).item() == 0
    m = torch.randn(3, 4, 5)
    torch.testing.assert_close(kl_divergence(m, lv), 0.5 * (m ** 2).sum() / 3)  # summed over L*C, mean over B
    lv = torch.randn(3, 4, 5)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum((1, 2)).mean()
    torch.testing.assert_close(kl_divergence(m, lv), ref, atol=1e-5, rtol=1e-5)
    model = _tiny()
    with torch.no_grad():
        model.encoder.to_moments.bias[8:] = 25.0  # logvar 25 -> clamped to 20
        model.encoder.to_moments.weight.zero_()
        _, logvar = model.moments(torch.zeros(1, 3, 32, 32))
    assert (logvar == 20).all()


def test_kl_matches_monte_carlo_and_the_sample_has_the_posterior_moments():
    torch.manual_seed(0)
    mu, logvar = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    z = sample_posterior(mu.expand(200_000, -1, -1), logvar.expand(200_000, -1, -1))
    sd = (0.5 * logvar).exp()
    log_q = torch.distributions.Normal(mu, sd).log_prob(z)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z)
    mc = (log_q - log_p).sum((1, 2)).mean()
    assert abs(mc.item() - kl_divergence(mu, logvar).item()) < 0.03
    se_mean, se_var = sd / 200_000 ** 0.5, sd ** 2 * (2 / 200_000) ** 0.5
    assert ((z.mean(0) - mu[0]).abs() < 4 * se_mean[0]).all()
    assert ((z.var(0) - sd[0] ** 2).abs() < 4 * se_var[0]).all()


def test_mask_ratio_is_the_clipped_uniform_and_leaves_some_images_unmasked():
    """The paper: the ratio is uniformly sampled and clipped to r_max, which occasionally leaves an image unmasked.
    'uniform': r = min(u, r_max) and floor(r N) tokens, unmasked with probability 1 / N; 'uniform_zero': the
    literal clip of U(-r_max, r_max), unmasked with probability 1/2."""
    from scipy import stats
    r = draw_mask_ratios(100_000, 0.7, torch.Generator().manual_seed(0))
    assert abs((r == 0.7).float().mean().item() - 0.3) < 0.005
    assert stats.kstest((r[r < 0.7] / 0.7).numpy(), "uniform").pvalue > 0.01
    N = 256
    assert abs((torch.floor(r * N) == 0).float().mean().item() - 1 / N) < 0.001      # mass at 0 masked tokens
    r = draw_mask_ratios(100_000, 0.7, torch.Generator().manual_seed(0), dist="uniform_zero")
    assert abs((r == 0).float().mean().item() - 0.5) < 0.005 and abs((r == 0.7).float().mean().item()) < 1e-4
    assert stats.kstest((r[r > 0] / 0.7).numpy(), "uniform").pvalue > 0.01
    model = _tiny(mask_ratio_dist="uniform_zero", semantic_mask_prob=0.0)
    torch.manual_seed(0)
    assert abs((model.sample_mask(4000, "cpu").sum(1) == 0).float().mean().item() - 0.5) < 0.03


def test_tiny_mactok_overfits_one_batch():
    model = _tiny(mask_tokens="none", enc_width=64, enc_heads=2, dec_width=64, dec_heads=2, enc_depth=1,
                  dec_depth=1).train()  # narrower than MacTok-tiny, for speed: 400 steps in about 4 s
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # 5e-3 sometimes stays on the mean-colour plateau
    for _ in range(400):
        loss = model(x)["pixel"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # the posterior mean reconstructs the batch (0.24 at the start, the image variance)
        assert F.mse_loss(model.eval().decode(model.encode(x)), x).item() < 0.01


def test_training_samples_the_posterior_and_encode_is_its_mean():
    model = _tiny().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)
        out = model(x)
        mu, lv = model.moments(x)
        torch.manual_seed(5)
        z = mu + (0.5 * lv).exp() * torch.randn_like(mu)
        torch.testing.assert_close(out["rec"], model.decode(z))
        torch.testing.assert_close(model.eval().encode(x), mu)
        assert torch.equal(model.encode(x), model.encode(x))
    assert out["loss"].item() == pytest.approx(out["pixel"].item() + 1e-6 * out["kl"].item(), rel=1e-6)


def test_mask_ratio_law_and_strategy_choice():
    model = _tiny(semantic_mask_prob=0.5)
    N = model.cfg.num_patches
    torch.manual_seed(0)
    counts = torch.cat([model.sample_mask(1000, "cpu").sum(1) for _ in range(10)])
    r_max_count = int(0.7 * N)
    assert counts.max() == r_max_count and counts.min() == 0
    # floor(r N) tokens: the top count for every u >= r_max_count / N (the clipped 0.3 included), none for u < 1 / N
    assert abs((counts == r_max_count).float().mean().item() - (1 - r_max_count / N)) < 0.015
    assert abs((counts == 0).float().mean().item() - 1 / N) < 0.005
    # semantic or random per sample with probability 0.5: a teacher whose score ranks patches by index
    cls = torch.zeros(10_000, 2)
    cls[:, 0] = 1
    theta = torch.linspace(0.1, 1.5, N)
    teacher = {"cls": cls, "patches": torch.stack([theta.cos(), theta.sin()], -1).expand(10_000, N, 2)}
    torch.manual_seed(1)
    mask = model.sample_mask(10_000, "cpu", teacher=teacher)
    n = mask.sum(1)
    semantic = (mask == (torch.arange(N) < n[:, None])).all(1)  # exactly the k smallest angles
    frac = semantic[n > 3].float().mean().item()  # tiny counts are ambiguous with random
    assert abs(frac - 0.5) < 0.02
    assert model.sample_mask(4, "cpu", ratio=0.0) is None


def test_top_k_is_exact_with_ties_by_index():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]])
    m = top_k_mask(scores, torch.tensor([2, 3]))
    assert m.tolist() == [[False, True, False, True], [True, True, True, False]]


def test_alignment_local_expansion_zero_loss_and_global_permutation_invariance():
    model = _tiny()
    B, L, C = 2, 32, 8
    z = torch.randn(B, L, C)
    with torch.no_grad():
        h = model.align["local"](z)                                           # (B, L, Dt)
        teacher = {"patches": 3.0 * h.repeat_interleave(2, dim=1), "cls": 2.0 * model.align["global"](z.mean(1))}
        out = model.align_losses(z, teacher)
        assert out["align_local"].abs().item() < 1e-6 and out["align_global"].abs().item() < 1e-6
        expanded = h.repeat_interleave(2, dim=1)
        assert all(torch.equal(expanded[:, j], h[:, j // 2]) for j in range(64))
        perm = model.align_losses(z[:, torch.randperm(L)], {**teacher, "patches": torch.randn(B, 64, 256)})
        torch.testing.assert_close(perm["align_global"], out["align_global"], atol=1e-6, rtol=0)
    teacher = {"patches": torch.randn(B, 64, 256), "cls": torch.randn(B, 256)}
    loss = model(torch.rand(B, 3, 32, 32) * 2 - 1, None, teacher)["loss"]
    loss.backward()
    assert model.encoder.to_moments.weight.grad.abs().sum() > 0 and model.align["local"][0].weight.grad is not None


def test_active_units_and_prior_decode(monkeypatch):
    model = _tiny().eval()
    x = torch.rand(64, 3, 32, 32) * 2 - 1

    def moments(x, mask=None):
        mu = torch.zeros(x.shape[0], 32, 8)
        mu[:, 0, :5] = x[:, 0, 0, :5] * 3                                      # exactly 5 units vary with x
        return mu, torch.zeros_like(mu)
    monkeypatch.setattr(model, "moments", moments)
    d = model.diagnostics(x)
    assert d["active_units"] == 5 and d["num_units"] == 256 and d["kl_per_element"] > 0


def test_encoder_init_from_dinov2_matches_official_fixture():
    from pretrained import dinov2_to_patch
    fx = golden("timm_dinov2_p16_256.pt")
    sd = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}
    cfg = make_config("MacTok-B-128", enc_width=96, enc_depth=3, enc_heads=3, dec_width=96, dec_depth=1,
                      dec_heads=3, num_latent_tokens=16, latent_dim=8, align=(), teacher_dim=96)
    model = MacTok(cfg).eval()
    model.encoder.vit.load_state_dict(dinov2_to_patch(sd, 16, 16))          # what --encoder_init dinov2 loads
    x = fx["inputs"]["x256"].float()
    with torch.no_grad():
        f = model.encoder.vit.forward_features(x)
        got = torch.cat([f["x_norm_clstoken"][:, None], f["x_norm_patchtokens"]], 1)
        torch.testing.assert_close(got, fx["outputs"]["forward_features"], atol=1e-5, rtol=1e-4)
        z = model.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert z.shape == (1, 16, 8) and cfg.encoder_init == "dinov2"


def test_paper_sizes_and_decoder_finetune_config():
    with torch.device("meta"):
        model = build(make_config("MacTok-B-128"))
    n = sum(p.numel() for p in model.parameters())  # 172.1M tokenizer + 4.3M alignment heads: the paper's 176M
    assert abs(n / 176e6 - 1) < 0.01, n
    ft = stage_config(make_config("MacTok-tiny"), "decoder_finetune")
    assert ft.align == () and ft.kl_weight == 0 and ft.mask_tokens == "none"


def test_forward_shapes_paper_presets():
    for name, L in (("MacTok-B-128", 128), ("MacTok-B-64", 64)):
        model = build(make_config(name, enc_depth=1, dec_depth=1, encoder_init="scratch")).train()
        x = torch.rand(1, 3, 256, 256) * 2 - 1
        teacher = {"cls": torch.randn(1, 1024), "patches": torch.randn(1, 256, 1024)}
        mask = model.sample_mask(1, "cpu", teacher=teacher)
        out = model(x, mask, teacher)
        assert out["rec"].shape == x.shape and model.encode(x).shape == (1, L, 32) and mask.shape == (1, 256)
        assert {"pixel", "kl", "align_local", "align_global", "loss"} <= set(out)


def test_latent_token_masking_control():
    model = _tiny(mask_tokens="latent")
    mask = model.sample_mask(4, "cpu")
    assert mask.shape == (4, 32)
    out = model(torch.rand(4, 3, 32, 32) * 2 - 1, mask)
    out["loss"].backward()
    assert model.latent_mask_token.grad is not None or not mask.any()
    from dataclasses import asdict as _asdict
    from tokenizer import from_checkpoint  # the control's token is training-only: inference drops it
    tok = from_checkpoint({"config": _asdict(model.cfg), "model": model.state_dict(), "ema": None})
    assert tok.latent_mask_token is None and tok.cfg.mask_tokens == "none"


# ----------------------------------------------------------------------------------------------------------
# through train_tokenizer.py

BASE = ["--preset", "MacTok-tiny", "--global_batch_size", "8", "--lr", "1e-3", "--warmup_steps", "2",
        "--perceptual_weight", "0", "--builtin_size", "40", "--num_workers", "0", "--log_every", "1",
        "--eval_every", "-1", "--grid_every", "-1", "--ema_decay", "0.9"]


@pytest.fixture
def proxy_teacher(tmp_path_factory):
    from proxy import ProxyConfig, ProxyNet
    torch.manual_seed(2)
    net = ProxyNet(ProxyConfig(32, 10, width=4, feature_dim=32))
    path = tmp_path_factory.mktemp("teacher") / "proxy.pt"
    torch.save({"model": net.state_dict(), "proxy_config": asdict(net.cfg), "val_accuracy": 0.0}, path)
    return ["--teacher", "proxy", "--teacher_proxy_ckpt", str(path)]


def _metrics(run):
    return [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]


def test_mactok_trains_resumes_exactly_and_fine_tunes(tmp_path, proxy_teacher):
    import train_tokenizer
    args = BASE + proxy_teacher
    full = train_tokenizer.main(args + ["--max_steps", "4", "--results_dir", str(tmp_path / "a"),
                                        "--eval_every", "4", "--eval_images", "16"])
    half = train_tokenizer.main(args + ["--max_steps", "2", "--decay_steps", "4", "--results_dir", str(tmp_path / "b"),
                                        "--eval_every", "4", "--eval_images", "16"])
    train_tokenizer.main(args + ["--max_steps", "4", "--resume", half])
    a, b = ([r for r in _metrics(run) if "loss" in r] for run in (full, half))  # the training records
    assert {"pixel", "kl", "align_local", "align_global", "loss"} <= set(a[0]) and len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for k in set(ra) - {"img_per_s"}:
            assert ra[k] == rb[k], (ra["step"], k)
    assert "eval_active_units" in _metrics(full)[-1] and "KL per element" in open(os.path.join(full, "log.txt")).read()
    ck = torch.load(os.path.join(full, "checkpoints", "0000004.pt"), weights_only=True)
    assert ck["config"]["teacher_dim"] == 32 and any(k.startswith("align.") for k in ck["model"])
    from tokenizer import from_checkpoint
    tok = from_checkpoint(ck)
    assert not any(k.startswith("align.") for k in tok.state_dict())
    ft = train_tokenizer.main(BASE + ["--max_steps", "2", "--results_dir", str(tmp_path), "--stage",
                                      "decoder_finetune", "--init_from", full])
    s2 = torch.load(os.path.join(ft, "checkpoints", "0000002.pt"), weights_only=True)
    enc = [k for k in s2["model"] if k.startswith("encoder.")]
    assert enc and all(torch.equal(s2["model"][k], ck["ema"][k]) for k in enc)
    assert not any(k.startswith("align.") for k in s2["model"]) and "kl" in _metrics(ft)[0]
    assert s2["config"]["kl_weight"] == 0 and s2["config"]["mask_tokens"] == "none"


def test_the_teacher_runs_in_the_steps_precision_and_hands_over_fp32(tmp_path, proxy_teacher, monkeypatch):
    import mactok
    import train_tokenizer
    seen, real = [], mactok.ProxyTeacher.forward

    def spy(self, x):
        out = real(self, x)
        seen.append((torch.is_autocast_enabled("cpu"), {v.dtype for v in out.values()}))
        return out

    monkeypatch.setattr(mactok.ProxyTeacher, "forward", spy)
    captured, loss = [], train_tokenizer.generator_loss
    monkeypatch.setattr(train_tokenizer, "generator_loss", lambda *a, **k: captured.append(a[4]) or loss(*a, **k))
    train_tokenizer.main(BASE + proxy_teacher + ["--max_steps", "1", "--precision", "bf16",
                                                  "--results_dir", str(tmp_path)])
    assert seen and all(on for on, _ in seen)                          # under the step's bf16 autocast
    assert all(v.dtype == torch.float32 for t in captured for v in t.values())


def test_offline_teacher_and_encoder_init_are_clear_errors(tmp_path, offline):
    import train_tokenizer
    with pytest.raises(SystemExit, match=r"dinov2_vitl14_pretrain\.pth.*--dinov2_ckpt.*--teacher none"):
        train_tokenizer.main(BASE + ["--teacher", "dinov2", "--max_steps", "1", "--results_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no DINOv2 has width 160"):
        train_tokenizer.main(BASE + ["--encoder_init", "dinov2", "--max_steps", "1", "--results_dir", str(tmp_path)])


def test_the_chain_runs_on_a_mactok_checkpoint(tmp_path):
    """cache_latents (posterior mean and its flip), train_diffusion, sample and evaluate on a MacTok tokenizer."""
    import cache_latents
    import evaluate
    import sample
    import train_diffusion
    from data import BuiltinSource, ImageDataset, LatentCache
    from engine import save_checkpoint
    model = _tiny(enc_depth=1, dec_depth=1, align=()).eval()
    tok = str(tmp_path / "mactok.pt")
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "step": 0, "config": asdict(model.cfg),
                     "args": {}}, tok)
    cache = str(tmp_path / "cache")
    cache_latents.main(["--tokenizer_ckpt", tok, "--cache_path", cache, "--builtin_size", "16", "--num_workers", "0"])
    c = LatentCache(cache)
    x = torch.stack([ImageDataset(BuiltinSource(32, 16), 32, train=False)[i][0] for i in range(16)])
    with torch.no_grad():
        mu = model.encode(x)
    s = c.shards[0]
    torch.testing.assert_close(s["latents"][:len(s["latents"])].float(), mu[:len(s["latents"])], atol=2e-3, rtol=2e-3)
    run = train_diffusion.main(["--model", "tiny", "--cache_path", cache, "--global_batch_size", "8", "--max_steps", "2",
                                "--log_every", "1", "--grid_every", "-1", "--num_workers", "0",
                                "--results_dir", str(tmp_path / "dit")])
    sample.main(["--ckpt", run, "--classes", "0,1", "--seeds", "0", "--num_steps", "2",
                 "--out", str(tmp_path / "grid.png")])
    assert os.path.exists(tmp_path / "grid.png")
    res = evaluate.main(["latent", "--ckpt", tok, "--num_images", "40", "--gmm_k", "1",
                         "--out", str(tmp_path / "lat.json")])
    assert 0 <= res["linear_probe_accuracy"] <= 1


def test_dinov2_teacher_gives_cls_and_patch_features_on_the_token_grid():
    from mactok import DINOv2Teacher
    from pretrained import ViTConfig, dinov2_target
    fx = golden("timm_dinov2_p16_256.pt")
    sd = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}
    teacher = DINOv2Teacher(dinov2_target(256, 16, state_dict=sd, cfg=ViTConfig(96, 3, 3)))
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    out = teacher(x)
    f = teacher.target.vit.forward_features(teacher.target.normalize(x))
    assert out["cls"].shape == (2, 96) and out["patches"].shape == (2, 256, 96)
    assert torch.equal(out["cls"], f["x_norm_clstoken"]) and torch.equal(out["patches"], teacher.target(x))
    model = build(make_config("MacTok-B-128", enc_depth=1, dec_depth=1, encoder_init="scratch", teacher_dim=96,
                              semantic_mask_prob=1.0))
    mask = model.sample_mask(2, "cpu", ratio=0.25, teacher=out)
    cos = torch.nn.functional.cosine_similarity(out["cls"][:, None], out["patches"], dim=-1)
    assert torch.equal(mask, top_k_mask(cos, torch.full((2,), 64)))  # semantic: the 64 most cls-like patches


@pytest.mark.slow
@pytest.mark.parametrize("mask_tokens", ["image", "latent", "semantic"])
def test_torchrun_trains_with_image_or_latent_masking(tmp_path, mask_tokens, proxy_teacher):
    """Under DDP every trained parameter needs a gradient: DINOv2's own mask token is never used, nor MacTok's
    under the latent-token control (or no mask), so MacTok.frozen freezes them instead of crashing the reducer.
    'semantic': the paper's recipe, a teacher for semantic masking and both alignment heads."""
    import subprocess
    import sys
    recipe = (["--align", "local,global", "--semantic_mask_prob", "0.5", *proxy_teacher] if mask_tokens == "semantic"
              else ["--align", "", "--teacher", "none", "--semantic_mask_prob", "0", "--mask_tokens", mask_tokens])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
           "train_tokenizer.py", *BASE, *recipe, "--max_steps", "2", "--results_dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    run = next(tmp_path.iterdir())
    assert [m["step"] for m in _metrics(run)] == [1, 2]
    assert mask_tokens != "semantic" or {"align_local", "align_global"} <= set(_metrics(run)[0])


def test_paper_sizes_and_recipes_of_the_s_b_bl_presets():
    """Tab. 6b: MacTok-S 45M, B 176M, BL 391M (alignment heads included) within 2%; the GAN weight 0.2 and start 20K
    (SoftVQ's, the rule for the lost values); decoder fine-tuning with LPIPS whole from its first step; 512 px:
    500K steps at batch 128 with 10K warmup."""
    import train_tokenizer
    from tokenizer import RECIPES
    for preset, paper in (("MacTok-S-128", 45e6), ("MacTok-B-128", 176e6), ("MacTok-BL-128", 391e6),
                          ("MacTok-BL-64-512", 391e6)):
        with torch.device("meta"):
            n = sum(p.numel() for p in build(make_config(preset)).parameters())
        assert abs(n / paper - 1) < 0.02, (preset, n)
    for preset in ("MacTok-S-128", "MacTok-B-64", "MacTok-BL-64-512"):
        for stage, first in (("main", 0.0), ("decoder_finetune", 1.0)):
            _, args, explicit = train_tokenizer.parse_args(["--preset", preset, "--stage", stage])
            train_tokenizer.engine.apply_recipe(args, RECIPES[preset][stage], explicit)
            assert args.disc_weight == 0.2 and train_tokenizer.perceptual_weight(args, 0) == first
    main = RECIPES["MacTok-BL-64-512"]["main"]
    assert (main["max_steps"], main["global_batch_size"], main["warmup_steps"]) == (500_000, 128, 10_000)
    assert make_config("MacTok-BL-64-512").image_size == 512
