"""released.py: official SiT, MAETok 1D SiT and LightningDiT weights through the strict loaders into diffusion.DiT,
against the official forwards and samplers (tests/golden/PROVENANCE.md).

SiT and LightningDiT run t = 0 as noise and predict the velocity toward data: a loaded model at our t = 1 - t_official
returns minus the official output, so every comparison below is ours(x, 1 - t) == -official(x, t)."""
import json
import math

import pytest
import torch

import engine
import released
from conftest import golden, golden_tensor
from diffusion import DiT, DiTConfig, Transport, guided_velocity
from released import denoiser_config, denoiser_from_official, denoiser_key, denoiser_kind


def _close(got, ref):
    """float32 agreement at the outputs' scale: inner activations reach 20, and the accumulation order of a
    matmul differs by CPU (AVX2 / AVX-512 / AMX kernels: 2e-5 seen at |x| = 6); a wrong op differs by > 1e-2."""
    torch.testing.assert_close(got, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-4)


def _official(name):
    fx = golden(name)
    return fx, {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}


def _model(sd, **kw):
    cfg, state = denoiser_from_official(sd, **kw)
    model = DiT(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def _use_tables(model, sd):
    """Put the file's (rule-filled) tables into the computed buffers: the fixture's main outputs use them."""
    model.pos_embed.copy_(sd["pos_embed"])
    if "feat_rope.freqs_cos" in sd:
        model.rope_cos.copy_(sd["feat_rope.freqs_cos"])
        model.rope_sin.copy_(sd["feat_rope.freqs_sin"])


def tokens(x):
    """(B, C, H, W) official latents -> (B, H*W, C), ours."""
    return x.float().flatten(2).mT


def _flipped(model, x, t, y):
    """Ours at 1 - t, negated: the official SiT / LightningDiT velocity, as an image (B, C, H, W)."""
    with torch.no_grad():
        v = -model(tokens(x), 1 - t, y)
    return v.mT.unflatten(2, x.shape[2:])


def _flipped_cfg(model, x, t, y, s, k=3):
    with torch.no_grad():
        v = -model.forward_with_cfg(tokens(x), 1 - t, y, s, guide_channels=k)
    return v.mT.unflatten(2, x.shape[2:])


def test_sit_loader_rejects_a_learned_pos_embed_and_maps_the_computed_table():
    fx, sd = _official("sit_small.pt")
    with pytest.raises(ValueError, match="pos_embed"):
        denoiser_from_official(sd, heads=3)  # the rule filled pos_embed with noise: not the fixed table DiT computes
    model = _model({**sd, "pos_embed": fx["outputs"]["pos_embed_sincos"]}, heads=3)
    _close(model.pos_embed, fx["outputs"]["pos_embed_sincos"])
    c = model.cfg
    assert (c.patch_size, c.grid, c.in_channels, c.learn_sigma, c.sit_time, c.heads) == (2, (8, 8), 4, True, True, 3)


def test_sit_forward_null_and_cfg_match_official_with_the_time_flip():
    fx, sd = _official("sit_small.pt")
    x, t, y, yn = (fx["inputs"][k] for k in ("x", "t", "y", "y_null"))
    out = fx["outputs"]["with_sincos_pos_embed"]
    model = _model({**sd, "pos_embed": fx["outputs"]["pos_embed_sincos"]}, heads=3)
    _close(_flipped(model, x, t, y), out["forward"])
    _close(_flipped(model, x, t, yn), out["forward_null"])
    # forward_with_cfg on [x, x]: its first half is the guided velocity; channel 3 stays conditional
    _close(_flipped_cfg(model, x, t, y, 4.0), out["forward_with_cfg"][:2])
    _use_tables(model, sd)  # and the main outputs, with the stored noise table
    _close(_flipped(model, x, t, y), fx["outputs"]["forward"])
    _close(_flipped_cfg(model, x, t, y, 4.0), fx["outputs"]["forward_with_cfg"][:2])


def test_time_convention_official_velocity_at_t_is_minus_ours_at_one_minus_t():
    """The conversion itself: a DiT with sit_time is the same network as one without, read at 1 - t, negated."""
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=4, num_tokens=16, grid=(4, 4), width=64, depth=2, heads=4, num_classes=3)
    net = DiT(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flipped = DiT(DiTConfig(**{**cfg.__dict__, "sit_time": True})).eval()
    flipped.load_state_dict(net.state_dict())
    x, t, y = torch.randn(2, 16, 4), torch.tensor([0.2, 0.9]), torch.tensor([0, 2])
    with torch.no_grad():
        _close(flipped(x, t, y), -net(x, 1 - t, y))


def test_maetok_sit_forward_cfg_and_samplers_match_official():
    fx, sd = _official("maetok_sit1d_small.pt")
    inp, out = fx["inputs"], fx["outputs"]
    x, t, y, z = inp["x"].float(), inp["t"], inp["y"], inp["z"].float()
    model = _model({**sd, "pos_embed": out["pos_embed_1d_sincos"]}, heads=3)
    assert not model.cfg.sit_time and model.cfg.pos_embed == "sincos_interleaved" and model.cfg.num_classes == 1000
    ref = out["with_sincos_pos_embed"]
    with torch.no_grad():
        _close(model(x, t, y), ref["forward"])                                # t = 1 noise, as ours: no flip
        _close(model(x, t, inp["y_null"]), ref["forward_null"])
        _close(model.forward_with_cfg(x, t, y, 1.9), ref["cfg_combined"])   # all channels guided
    velocity = guided_velocity(model, y, 1.9, (0.0, 0.75))
    _close(Transport().sample(velocity, z, "euler", 4), ref["euler_sampler_4steps"])
    _use_tables(model, sd)  # the Heun and SDE references ran with the stored noise table
    _close(Transport().sample(velocity, z, "heun", 4), out["heun_sampler_4steps"])
    torch.manual_seed(7)  # the official SDE draws its noise from the global generator, float64, before each call
    _close(Transport().sample(velocity, z, "sde", 4), out["euler_maruyama_sampler_4steps_seed7"])


def test_maetok_sit_hub_folder_loads_through_the_checkpoint_reader(tmp_path):
    from safetensors.torch import save_file
    fx, sd = _official("maetok_sit1d_small.pt")
    sd["pos_embed"] = fx["outputs"]["pos_embed_1d_sincos"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    hub = {k: v for k, v in fx["config"].items() if isinstance(v, (int, float, bool, str, list))}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    ckpt = released.load(str(tmp_path))
    assert ckpt["released_kind"] == "maetok_sit" and ckpt["guide_channels"] is None
    model = DiT(DiTConfig(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["ema"])
    assert model.cfg.heads == 3  # from config.json's num_heads
    inp = fx["inputs"]
    with torch.no_grad():
        _close(model(inp["x"].float(), inp["t"], inp["y"]), fx["outputs"]["with_sincos_pos_embed"]["forward"])


def test_lightningdit_forward_cfg_interval_and_qknorm_off_match_official():
    fx, sd = _official("lightningdit_small.pt")
    inp, out = fx["inputs"], fx["outputs"]
    x, t, y, yn = inp["x"], inp["t"], inp["y"], inp["y_null"]
    with pytest.raises(ValueError, match="pos_embed|feat_rope"):
        denoiser_from_official(sd)
    model = _model({**sd, **out["fixed_tables"]})
    c = model.cfg
    assert (c.norm, c.ffn, c.rope, c.qk_norm, c.sit_time, c.heads) == ("rmsnorm", "swiglu", True, True, True, 3)
    ref = out["with_fixed_tables"]
    _close(_flipped(model, x, t, y), ref["forward"])
    _close(_flipped(model, x, t, yn), ref["forward_null"])
    _close(_flipped_cfg(model, x, t, y, 4.0), ref["forward_with_cfg"][:2])   # only the first 3 channels guided
    _use_tables(model, sd)
    _close(_flipped(model, x, t, y), out["forward"])
    _close(_flipped_cfg(model, x, t, y, 4.0), out["forward_with_cfg"][:2])
    # cfg_interval: t[0] = 0.3 < start 0.5 (noise end in its time) -> the conditional output, unguided
    _close(_flipped(model, x, t, y), out["forward_with_cfg_interval_t0_below"][:2])
    t_hi = torch.tensor([0.85, 0.3])
    _close(_flipped_cfg(model, x, t_hi, y, 4.0), out["forward_with_cfg_interval_t0_above"][:2])
    _close(_flipped(model, torch.cat([x, x]), torch.cat([t_hi, t_hi]), torch.cat([y, yn])), out["forward_t_hi"])
    # what guided_velocity decides for the same interval in our time: guided only where t_ours <= 1 - 0.5
    v = guided_velocity(model, y, 4.0, (0.0, 0.5), guide_channels=3)
    with torch.no_grad():
        _close(v(tokens(x), 0.7), model(tokens(x), torch.full((2,), 0.7), y))
    # the released switch set: qk-norm off
    no_qk = {k: v for k, v in sd.items() if "q_norm" not in k and "k_norm" not in k}
    model = _model({**no_qk, **out["fixed_tables"]})
    assert not model.cfg.qk_norm
    _use_tables(model, sd)
    ref = out["qknorm_off"]
    _close(_flipped(model, x, t, y), ref["forward"])
    _close(_flipped(model, x, t, yn), ref["forward_null"])
    _close(_flipped_cfg(model, x, t, y, 4.0), ref["forward_with_cfg"][:2])


@pytest.mark.parametrize("name,params", [("sit_small.pt", 675_129_632 - 256 * 1152),
                                         ("maetok_sit1d_small.pt", 675_000_608 - 128 * 1152),
                                         ("lightningdit_small.pt", 675_256_736 - 256 * 1152)])
def test_real_xl_key_lists_map_onto_dit_exactly(name, params):
    """The real released files (key lists from the official code on the meta device) map onto DiT key by key."""
    fx = golden(name)
    (desc, keys), = fx["real_state_dict_keys"].items()
    sd = {k: torch.empty(s, device="meta") for k, s, _ in keys}
    cfg = denoiser_config(sd, denoiser_kind(sd))
    with torch.device("meta"):
        model = DiT(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {}
    for k, s, _ in keys:
        if k in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
            continue
        s = (s[0], math.prod(s[1:])) if k == "x_embedder.proj.weight" else tuple(s)
        mapped[denoiser_key(k)] = s
    assert mapped == own, desc
    assert sum(p.numel() for p in model.parameters()) == params  # pos_embed is a table here, a parameter there
    assert (cfg.width, cfg.depth, cfg.heads, cfg.num_classes) == (1152, 28, 16, 1000)


def test_sample_py_runs_a_released_denoiser_with_its_tokenizer(tmp_path):
    """sample.py --ckpt <official hub folder> --tokenizer_ckpt ...: the statistics come from the released tokenizer
    or --latent_stats, and a clear error says which is missing."""
    from dataclasses import asdict

    from safetensors.torch import save_file
    import sample
    from tokenizer import MAETok, make_config
    fx, sd = _official("maetok_sit1d_small.pt")
    sd["pos_embed"] = fx["outputs"]["pos_embed_1d_sincos"]
    rel = tmp_path / "sit"
    rel.mkdir()
    save_file(sd, str(rel / "model.safetensors"))
    (rel / "config.json").write_text(json.dumps({"num_heads": 3, "vae_1d": True}))
    torch.manual_seed(0)
    tok = MAETok(make_config("tiny", aux_targets=(), enc_depth=1, dec_depth=1, num_latent_tokens=16, latent_dim=8))
    tok_path = str(tmp_path / "tok.pt")
    engine.save_checkpoint({"model": tok.state_dict(), "ema": tok.state_dict(), "step": 0,
                            "config": asdict(tok.cfg), "args": {}}, tok_path)
    base = ["--ckpt", str(rel), "--tokenizer_ckpt", tok_path, "--classes", "1,999", "--seeds", "0", "--num_steps", "2",
            "--cfg_scale", "1.9", "--guidance_interval", "0,0.75", "--out", str(tmp_path / "g.png")]
    with pytest.raises(SystemExit, match="--latent_stats"):
        sample.main(base)
    with pytest.raises(SystemExit, match="--tokenizer_ckpt"):
        sample.main(["--ckpt", str(rel), "--latent_stats", "0,1"])
    sample.main(base + ["--latent_stats", "0.1,2.0"])
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (34 + 2, 2 * 34 + 2)


def test_sample_py_decodes_a_released_lightningdit_with_vavae_and_its_latent_stats(tmp_path):
    """LightningDiT's release chain: an official {ema} file, the VA-VAE tokenizer (the golden small autoencoder as
    a Lightning file, converted at 16 px: an 8 x 8 x 8 grid) and latents_stats.pt (mean / std (1, C, 1, 1))."""
    import released
    import sample
    fx, sd = _official("lightningdit_small.pt")
    torch.save({"ema": {**sd, **fx["outputs"]["fixed_tables"]}, "opt": {}}, tmp_path / "ldit.pt")
    vfx = golden("vavae_decoder_small.pt")
    vsd = {k: golden_tensor(k, s) for k, s, _ in vfx["state_dict_keys"]}
    tok = released.vavae_checkpoint({"state_dict": vsd}, str(tmp_path / "vavae.ckpt"), image_size=16)
    engine.save_checkpoint(tok, str(tmp_path / "vavae.pt"))
    torch.save({"mean": torch.zeros(1, 8, 1, 1), "std": torch.full((1, 8, 1, 1), 2.0)}, tmp_path / "stats.pt")
    sample.main(["--ckpt", str(tmp_path / "ldit.pt"), "--tokenizer_ckpt", str(tmp_path / "vavae.pt"),
                 "--latent_stats", str(tmp_path / "stats.pt"), "--classes", "1,3", "--seeds", "0", "--num_steps", "2",
                 "--cfg_scale", "4", "--timestep_shift", "3.333", "--out", str(tmp_path / "g.png")])
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (18 + 2, 2 * 18 + 2)
