"""diffusers AutoencoderKL releases (SD-VAE and its kin) as grid tokenizers: the golden fixture's two small models
(f8c4 as SD-VAE, f16c8) through released.py's strict key map reproduce diffusers' encoder output, posterior,
post-quant output and reconstruction; both attention namings and both weight formats load; the real SD-VAE key
list maps exactly; and a released SiT samples through one with sample.py."""
import json

import pytest
import torch

import engine
import released
from aligntok import VAVAE, AutoencoderKL
from conftest import golden, golden_tensor
from tokenizer import from_checkpoint


def _close(got, ref):
    """1e-5 at the output's scale: the conv stacks' float32 sums are ordered differently by CPU (2.6e-5 seen on a
    reconstruction reaching 3.5); a wrong map or op differs by > 1e-2."""
    torch.testing.assert_close(got, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-4)


def _release(folder, config, sd, fmt="safetensors"):
    """A diffusers release folder: config.json + diffusion_pytorch_model.safetensors (or .bin)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(sd, folder / "diffusion_pytorch_model.bin")
    return str(folder)


@pytest.mark.parametrize("name", ["f8c4", "f16c8"])
def test_autoencoderkl_matches_diffusers(name, tmp_path):
    fx = golden("diffusers_autoencoderkl_small.pt")[name]
    ckpt = released.load(_release(tmp_path / name, fx["config"], fx["state_dict"]))
    tok = from_checkpoint(ckpt)
    assert isinstance(tok, VAVAE) and tok.cfg.family == "autoencoderkl"
    x = fx["x"]
    C, g = fx["config"]["latent_channels"], 64 // tok.cfg.patch_size
    with torch.no_grad():
        _close(tok.encoder(x), fx["encoder_out"])
        mean, logvar = AutoencoderKL.moments(tok, x)                         # NCHW, as diffusers
        _close(mean, fx["posterior_mean"])
        _close(logvar, fx["posterior_logvar"])
        _close(tok.post_quant_conv(mean), fx["post_quant_conv_out"])
        z = tok.encode(x)                                                  # tokens (B, H*W, C)
        assert tuple(z.shape) == (2, g * g, C) and tuple(tok.latent_shape) == (g * g, C)
        _close(tok.decode(z), fx["reconstruction"])
    scale = fx["config"]["scaling_factor"]                                 # the pipeline's z * scaling_factor
    assert float(ckpt["latent_stats"]["mean"]) == 0 and abs(float(ckpt["latent_stats"]["std"]) - 1 / scale) < 1e-6


def test_force_upcast_runs_the_vae_in_fp32_under_a_bf16_caller(tmp_path):
    fx = golden("diffusers_autoencoderkl_small.pt")["f8c4"]
    tok = from_checkpoint(released.load(_release(tmp_path / "vae", fx["config"], fx["state_dict"])))
    assert tok.cfg.force_upcast                                              # diffusers' default
    with torch.no_grad():
        ref = tok.decode(tok.encode(fx["x"]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = tok.encode(fx["x"])
            got = tok.decode(z)
    assert z.dtype == got.dtype == torch.float32 and torch.equal(got, ref)


def test_old_attention_names_and_the_bin_format_load_the_same_model(tmp_path):
    fx = golden("diffusers_autoencoderkl_small.pt")["f8c4"]
    old = fx["state_dict_deprecated_attention_names"]
    assert any(".query." in k for k in old)
    tok = from_checkpoint(released.load(_release(tmp_path / "old", fx["config"], old, fmt="bin")))
    with torch.no_grad():
        _close(tok.decode(tok.encode(fx["x"])), fx["reconstruction"])


def test_the_real_sdvae_key_list_maps_exactly_and_counts_its_parameters():
    real = golden("diffusers_autoencoderkl_small.pt")["real_sdvae"]
    cfg = released.autoencoderkl_config(real["config"])
    assert (cfg.ch, cfg.ch_mult, cfg.latent_dim, cfg.patch_size) == (128, (1, 2, 4, 4), 4, 8)
    with torch.device("meta"):
        own = VAVAE(cfg).state_dict()
        sd = {k: torch.empty(shape) for k, shape in real["keys"].items()}
    state = released.strict_map({released.autoencoderkl_key(k, 4): v.view(*v.shape, 1, 1) if v.ndim == 2 else v
                                 for k, v in sd.items()}, own, "SD-VAE", "nanotok")
    assert len(state) == len(real["keys"]) == 248
    n = sum(v.numel() for v in own.values())
    enc = sum(v.numel() for k, v in own.items() if k.startswith("encoder."))
    assert (n, enc) == (real["params"], real["encoder_params"])


def test_a_config_nanotok_cannot_express_is_a_clear_error():
    cfg = dict(golden("diffusers_autoencoderkl_small.pt")["f8c4"]["config"], mid_block_add_attention=False)
    with pytest.raises(ValueError, match="does not express"):
        released.autoencoderkl_config(cfg)
    stats, how = released.autoencoderkl_stats({}, 4)                         # the 2022 SD-VAE configs: no key
    assert abs(float(stats["std"]) - 1 / 0.18215) < 1e-6
    big = dict(golden("diffusers_autoencoderkl_small.pt")["f8c4"]["config"], sample_size=1024)
    assert released.autoencoderkl_config(big).image_size == 256              # a tiling default, not the input size
    stats, how = released.autoencoderkl_stats({"scaling_factor": 0.3611, "shift_factor": 0.1159}, 16)
    assert abs(float(stats["mean"]) - 0.1159) < 1e-7 and abs(float(stats["std"]) - 1 / 0.3611) < 1e-6
    stats, how = released.autoencoderkl_stats({"scaling_factor": 0.5, "latents_mean": [1.0, 2.0],
                                               "latents_std": [3.0, 4.0]}, 2)
    assert stats["mean"].tolist() == [1.0, 2.0] and stats["std"].tolist() == [6.0, 8.0] and "latents_std" in how


def test_sample_py_decodes_a_released_sit_through_an_autoencoderkl(tmp_path):
    """The SiT-XL/2 + SD-VAE chain at fixture size: SiT's official file (8 x 8 x 4 latents, patch 2) and the f8c4
    AutoencoderKL (64 px -> 8 x 8 x 4); the latent statistics are the release's scaling factor."""
    import sample
    fx = golden("sit_small.pt")
    sd = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}
    sd["pos_embed"] = fx["outputs"]["pos_embed_sincos"]
    torch.save(sd, tmp_path / "SiT-small.pt")
    # SiT-XL/2's head count follows from its width (1152: 16 heads); this small one's is given at conversion
    engine.save_checkpoint(released.denoiser_checkpoint(sd, str(tmp_path / "SiT-small.pt"), {"num_heads": 3}),
                           str(tmp_path / "sit.pt"))
    vae = golden("diffusers_autoencoderkl_small.pt")["f8c4"]
    folder = _release(tmp_path / "sd-vae", vae["config"], vae["state_dict"])
    sample.main(["--ckpt", str(tmp_path / "sit.pt"), "--tokenizer_ckpt", folder, "--classes", "1,3", "--seeds",
                 "0", "--num_steps", "2", "--cfg_scale", "4", "--out", str(tmp_path / "g.png")])
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (64 + 4, 2 * (64 + 2) + 2)


def test_one_diffusability_report_over_released_tokenizers(tmp_path):
    """evaluate.py diffusability over two release-format tokenizers on the same held-out images: one JSON, one
    markdown table and one figure, each tokenizer's latents normalised as its release normalises them."""
    import evaluate
    from dataclasses import asdict
    from proxy import ProxyConfig, ProxyNet
    fx = golden("diffusers_autoencoderkl_small.pt")
    a = _release(tmp_path / "sd-vae-small", fx["f8c4"]["config"], fx["f8c4"]["state_dict"])
    b = _release(tmp_path / "f16-small", fx["f16c8"]["config"], fx["f16c8"]["state_dict"])
    proxy = ProxyNet(ProxyConfig(width=8))
    torch.save({"model": proxy.state_dict(), "proxy_config": asdict(proxy.cfg)}, tmp_path / "proxy.pt")
    out = tmp_path / "cmp" / "releases.json"
    res = evaluate.main(["diffusability", "--tokenizer_ckpt", f"{a},{b}", "--proxy_ckpt", str(tmp_path / "proxy.pt"),
                         "--num_train", "40", "--num_val", "40", "--num_ifid", "8", "--posterior", "mean",
                         "--tsne_points", "30", "--tsne_reps", "1", "--viv_samples", "4", "--out", str(out)])
    assert [r["grid"] for r in res] == [[8, 8], [4, 4]]
    assert "z - 0.0) * 0.18215" in res[0]["normalisation"] and "* 1.0" in res[1]["normalisation"]
    table = (tmp_path / "cmp" / "releases.md").read_text()
    assert "| lnc |" in table and "sd-vae-small" in table and "f16-small" in table and "0.18215" in table
    assert (tmp_path / "cmp" / "releases.png").exists() and len(json.load(open(out))) == 2
    one = evaluate.main(["diffusability", "--tokenizer_ckpt", a, "--proxy_ckpt", str(tmp_path / "proxy.pt"),
                         "--num_train", "40", "--num_val", "40", "--num_ifid", "8", "--posterior", "mean",
                         "--tsne_points", "30", "--tsne_reps", "1", "--viv_samples", "4", "--normalisation", "channel",
                         "--out", str(tmp_path / "one.json")])
    assert one["normalisation"] == "per channel, train statistics"
