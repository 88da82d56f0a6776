"""aligntok.py: the LDM / VA-VAE conv autoencoder against the official forward (golden vavae_decoder_small.pt)
and the real f16d32 key list; the PatchGAN discriminator's size."""
import pytest
import torch

import released

from aligntok import VAVAE_F16D32, AutoencoderKL, LDMConfig
from conftest import golden, golden_tensor


def _close(got, ref, scaled=False):
    """The fixtures' atol 1e-5 / rtol 1e-4. scaled: the decoder's inner taps reach |x| ~ 32, where float32 conv
    sums in another order (another CPU's oneDNN kernels) differ by up to ~1e-6 of the tensor's scale (2.9e-5 seen);
    the atol follows that scale (a real deviation, e.g. bilinear upsampling, is off by 1.4)."""
    atol = max(1e-5, 2e-6 * ref.abs().max().item()) if scaled else 1e-5
    torch.testing.assert_close(got, ref, atol=atol, rtol=1e-4)


def test_vavae_autoencoder_matches_the_official_forward():
    fx = golden("vavae_decoder_small.pt")
    dd = fx["config"]["ddconfig"]
    cfg = LDMConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in dd.items() if k != "dropout"})
    model = AutoencoderKL(cfg, embed_dim=fx["config"]["embed_dim"]).eval()
    sd = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}
    model.load_state_dict(sd, strict=True)
    out, x, z = fx["outputs"], fx["inputs"]["x"].float(), fx["inputs"]["z"].float()
    taps = {}
    for name in ("decoder.conv_in", "decoder.mid.block_2", "decoder.up.1.attn.1", "decoder.up.1.upsample",
                 "decoder.up.0.block.1", "post_quant_conv"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: taps.__setitem__(n, o))
    with torch.no_grad():
        _close(model.decode(z), out["decode"])
        for k, v in out["debug_decode"].items():
            _close(taps[k], v, scaled=True)
        _close(model.encoder(x), out["encoder_out"])
        mean, logvar = model.moments(x)
        _close(mean, out["posterior_mean"])
        _close(logvar, out["posterior_logvar"])
        _close(model.decode(mean), out["decode_posterior_mode"])


def test_real_f16d32_key_list_and_parameter_counts():
    fx = golden("vavae_decoder_small.pt")
    (desc, keys), = fx["real_state_dict_keys"].items()
    with torch.device("meta"):
        model = AutoencoderKL(VAVAE_F16D32, embed_dim=32)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    real = {k: tuple(s) for k, s, _ in keys}
    assert own == real, desc
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model.decoder) == 41_417_603 and count(model.post_quant_conv) == 1_056
    assert count(model.encoder) == 28_413_248 and count(model.quant_conv) == 4_160
    with torch.no_grad():
        assert model.decode(torch.empty(1, 32, 16, 16, device="meta")).shape == (1, 3, 256, 256)


def test_patchgan_size_and_output_grid():
    from discriminator import NLayerDiscriminator
    d = NLayerDiscriminator()
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    with torch.device("meta"):
        d_meta, x = NLayerDiscriminator(), torch.empty(2, 3, 256, 256, device="meta")
        assert d_meta.main(x).shape == (2, 1, 30, 30) and d_meta(x).shape == (2, 900)  # one logit per patch
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002  # LDM weights_init: N(0, 0.02)


def test_aligntok_shapes_presets_and_frozen_proxy_statistics():
    from aligntok import PRESETS, AlignTok, AlignTokConfig
    with torch.device("meta"):
        big = AlignTok(AlignTokConfig(**PRESETS["AlignTok-L-f16d32"]))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(big.encoder), count(big.adapter), count(big.decoder), count(big.post_quant_conv)) == \
        (304_368_640, 1_082_400, 41_417_603, 1_056)            # DINOv2-L/14, the MLP adapter, VA-VAE's decoder
    with torch.no_grad():
        z = big.encode(torch.empty(1, 3, 256, 256, device="meta"))
        assert z.shape == (1, 256, 32) and big.grid == (16, 16)
        assert big.decode(z).shape == (1, 3, 256, 256)
    torch.manual_seed(0)
    tiny = AlignTok(AlignTokConfig(**PRESETS["AlignTok-tiny"])).train()
    assert all(not m.training for m in tiny.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tiny(x)
    assert out["z"].shape == (2, 64, 8) and out["rec"].shape == x.shape
    out["loss"].backward()
    assert all(p.grad is not None for p in tiny.parameters())


def test_a_2d_grid_tokenizer_feeds_lightningdit_end_to_end(tmp_path):
    """AlignTok-tiny's (B, 8*8, 8) grid latents: cache (grid recorded) -> LightningDiT with 2D RoPE -> samples."""
    from dataclasses import asdict

    import cache_latents
    import sample
    import train_diffusion
    from aligntok import PRESETS, AlignTok, AlignTokConfig
    from data import LatentCache
    from engine import save_checkpoint
    torch.manual_seed(0)
    tok = AlignTok(AlignTokConfig(**PRESETS["AlignTok-tiny"]))
    path = str(tmp_path / "tok.pt")
    save_checkpoint({"model": tok.state_dict(), "ema": tok.state_dict(), "step": 0, "config": asdict(tok.cfg),
                     "args": {}}, path)
    cache = str(tmp_path / "cache")
    cache_latents.main(["--tokenizer_ckpt", path, "--cache_path", cache, "--builtin_size", "32", "--batch_size", "16",
                        "--num_workers", "0"])
    assert tuple(LatentCache(cache).meta["grid"]) == (8, 8)
    run = train_diffusion.main(["--model", "LightningDiT-tiny", "--cache_path", cache, "--max_steps", "2",
                                "--global_batch_size", "8", "--log_every", "1", "--grid_every", "-1",
                                "--num_workers", "0", "--results_dir", str(tmp_path / "d")])
    ck = torch.load(next((tmp_path / "d").glob("*/checkpoints/*.pt")), weights_only=True)
    assert tuple(ck["config"]["grid"]) == (8, 8) and ck["config"]["rope"]
    sample.main(["--ckpt", run, "--classes", "0,1", "--seeds", "0", "--num_steps", "2", "--guide_channels", "3",
                 "--cfg_scale", "2", "--out", str(tmp_path / "g.png")])
    assert (tmp_path / "g.png").exists()


def test_vavae_lightning_file_loads_as_a_tokenizer(tmp_path):
    """A Lightning-format VA-VAE file (state_dict with the training-only loss.* / foundation_model.* /
    linear_proj.* beside the autoencoder) loads through every script's checkpoint path as a grid tokenizer that
    reproduces the official encode (posterior mean) and decode."""
    import tokenizer
    fx = golden("vavae_decoder_small.pt")
    sd = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}
    extra = {"loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4), "loss.logvar": torch.zeros(()),
             "foundation_model.model.cls_token": torch.zeros(1, 1, 8), "linear_proj.weight": torch.zeros(8, 8, 1, 1)}
    path = tmp_path / "vavae.ckpt"
    torch.save({"state_dict": {**sd, **extra}, "global_step": 7, "epoch": 1}, path)
    ckpt = released.vavae_checkpoint(torch.load(path, weights_only=True), str(path), image_size=8)
    assert ckpt["config"]["attn_resolutions"] == (4,) and ckpt["config"]["patch_size"] == 2
    via = released.load(str(path))                                 # what every script's --ckpt reads
    assert via["config"]["image_size"] == 256 and via["released"] == str(path)  # the release is 256 px
    assert all(torch.equal(via["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    tok = tokenizer.from_checkpoint(ckpt)
    out, x, z = fx["outputs"], fx["inputs"]["x"].float(), fx["inputs"]["z"].float()
    with torch.no_grad():
        lat = tok.encode(x)                                                  # (B, H*W, C) on a 4 x 4 grid
        assert lat.shape == (2, 16, 8) and tok.grid == (4, 4)
        _close(lat.transpose(1, 2).unflatten(2, (4, 4)), out["posterior_mean"])
        _close(tok.decode(z.flatten(2).transpose(1, 2)), out["decode"])
    with pytest.raises(KeyError, match="cannot place"):                 # an unknown tensor is not dropped silently
        released.vavae_state({"state_dict": {**sd, "other.w": torch.zeros(1)}})


def test_vavae_release_config_from_the_real_key_list():
    from aligntok import VAVAE
    (desc, keys), = golden("vavae_decoder_small.pt")["real_state_dict_keys"].items()
    shapes = {k: torch.empty(s, device="meta") for k, s, _ in keys}
    cfg = released.vavae_config(shapes)
    assert (cfg.patch_size, cfg.latent_dim, cfg.ch_mult, cfg.attn_resolutions) == (16, 32, (1, 1, 2, 2, 4), (16,))
    with torch.device("meta"):
        model = VAVAE(cfg)
    assert sum(p.numel() for p in model.parameters()) == 69_836_067
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(s) for k, s, _ in keys}
