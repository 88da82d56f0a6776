"""aligntok.py: the LDM / VA-VAE conv autoencoder against the official forward (golden vavae_decoder_small.pt)
and the real f16d32 key list; the PatchGAN discriminator's size."""
import torch

from aligntok import VAVAE_F16D32, AutoencoderKL, LDMConfig
from conftest import golden, golden_tensor


def _close(got, ref):
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


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
            _close(taps[k], v)
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
        assert NLayerDiscriminator()(torch.empty(2, 3, 256, 256, device="meta")).shape == (2, 1, 30, 30)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002  # LDM weights_init: N(0, 0.02)
