"""Tokenizer math and model: RoPE, masking, HOG, patchify, presets, overfit."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import golden
from maetok import HOG, MAETok, random_mask, sample_mask_ratio
from tokenizer import PRESETS, make_config
from vit import patchify, unpatchify
from vit import RoPE2D, apply_rope, grid_positions


@pytest.mark.parametrize("mixed", [True, False])
def test_rope_scores_depend_only_on_relative_position(mixed):
    torch.manual_seed(0)
    rope = RoPE2D(heads=2, head_dim=16, theta=10.0, mixed=mixed)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    pos = grid_positions(4, 4)
    def score(pq, pk):
        aq, ak = rope.angles(pq[None]), rope.angles(pk[None])
        return (apply_rope(q, aq) * apply_rope(k, ak)).sum(-1)
    for shift in (torch.tensor([3.0, 0.0]), torch.tensor([-2.0, 5.0])):
        for i, j in [(0, 5), (7, 2), (15, 15)]:
            torch.testing.assert_close(score(pos[i], pos[j]), score(pos[i] + shift, pos[j] + shift))
    assert not torch.allclose(score(pos[0], pos[1]), score(pos[0], pos[5]))  # but it does see the offset
    torch.testing.assert_close(apply_rope(q, rope.angles(torch.zeros(1, 2))), q)  # position 0 is the identity


def test_rope_axial_splits_axes_and_mixed_is_learnable():
    axial = RoPE2D(1, 16, 10.0, mixed=False)
    f = axial.freqs[0]
    assert (f[:4, 1] == 0).all() and (f[4:, 0] == 0).all()  # first half x only, second half y only
    torch.testing.assert_close(f[:4, 0], 10.0 ** (-4 * torch.arange(4.0) / 16))
    mixed = RoPE2D(3, 16, 10.0, mixed=True)
    assert isinstance(mixed.freqs, torch.nn.Parameter)
    torch.testing.assert_close(mixed.freqs.norm(dim=-1), f.norm(dim=-1).expand(3, -1))  # same magnitudes
    d1, d2 = mixed.freqs[:, 0], mixed.freqs[:, 4]  # the two halves are perpendicular per head
    torch.testing.assert_close((d1 * d2).sum(-1), torch.zeros(3), atol=1e-6, rtol=0)


def test_patchify_round_trip():
    x = torch.randn(2, 3, 32, 48)
    t = patchify(x, 8)
    assert t.shape == (2, 4 * 6, 8 * 8 * 3)
    torch.testing.assert_close(t[0, 1].view(8, 8, 3).permute(2, 0, 1), x[0, :, 0:8, 8:16])  # row-major
    torch.testing.assert_close(unpatchify(t, 8, 4, 6), x)


@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.5, 0.6, 0.999])
def test_mask_count_exact_and_random_per_sample(ratio):
    m = random_mask(64, 256, ratio)
    assert (m.sum(1) == math.ceil(256 * ratio - 1e-9)).all()
    if 0 < ratio < 0.99:
        assert len({tuple(r.nonzero().flatten().tolist()) for r in m}) == 64


def test_mask_ratio_distribution_is_official_truncnorm():
    torch.manual_seed(0)
    r = np.array([sample_mask_ratio(0.4, 0.6, 0.25) for _ in range(4000)])
    assert r.min() >= 0.4 and r.max() <= 0.6
    ref = stats.truncnorm((0.4 - 0.6) / 0.25, 0, loc=0.6, scale=0.25)  # official: scipy truncnorm
    assert stats.kstest(r, ref.cdf).pvalue > 1e-3
    hist = np.histogram(r, bins=4, range=(0.4, 0.6))[0]
    assert (np.diff(hist) > 0).all()  # density rises towards the peak at mask_ratio


def test_aux_losses_only_with_a_mask():
    torch.manual_seed(0)
    model = MAETok(make_config("tiny"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = model.sample_mask(2, "cpu")
    assert mask.shape == (2, 64) and 0.4 * 64 <= mask[0].sum() <= 0.6 * 64 + 1
    assert set(model(x, mask)) == {"rec", "pixel", "hog", "loss"}
    assert set(model(x)) == {"rec", "pixel", "loss"} and model.sample_mask(2, "cpu", 0.0) is None


def test_hog_matches_official_fixture():
    fx = golden("hog_maetok.pt")
    hog = HOG()
    for k in ("x64", "x256"):
        x = fx["inputs"][k].float()
        torch.testing.assert_close(hog(x), fx["outputs"][k]["hog_cells"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hog.tokens(x, 16), fx["outputs"][k]["tokens_p16"], atol=1e-5, rtol=1e-4)
    x = fx["inputs"]["x256"].float()
    torch.testing.assert_close(hog.tokens(x, 16), fx["outputs"]["x256"]["tokens_official_forward"])
    sd_names = [k for k, *_ in fx["state_dict_keys"]]
    assert sd_names == ["weight_x", "weight_y", "gaussian_kernel"]  # official buffer names
    torch.testing.assert_close(hog.gaussian_kernel.sum(), torch.tensor(1.0))


def test_hog_properties():
    hog = HOG()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    cells = hog(x)
    assert cells.shape == (2, 3, 9, 8, 8)
    torch.testing.assert_close(cells.norm(dim=2), torch.ones(2, 3, 8, 8))  # L2-normalised per cell
    assert hog.tokens(x, 16).shape == (2, 16, 108) and hog.dim(16) == 108
    assert HOG(pool=4).tokens(torch.zeros(1, 3, 32, 32), 4).shape == (1, 64, 27)  # tiny: one cell per patch
    assert hog(torch.full((1, 3, 32, 32), 0.3)).abs().max() == 0  # flat image: no gradients
    torch.testing.assert_close(hog(x + 0.5), cells)  # invariant to a brightness offset
    agree = (hog(-x) - cells).abs() < 1e-4  # unsigned orientations: negating the image keeps the bins
    assert agree.float().mean() > 0.97
    # a vertical edge puts all its energy in one orientation bin
    e = torch.zeros(1, 3, 32, 32); e[..., 16:] = 1.0
    bins = hog(e)[0, 0, :, 1, 1:3].sum(-1)
    assert (bins > 0).sum() == 1


def test_forward_shapes_every_preset():
    for name in (n for n, p in PRESETS.items() if p["family"] == "maetok"):
        cfg = make_config(name, enc_depth=1, dec_depth=1)  # full width and resolution, shallow for speed
        model = MAETok(cfg).train()
        x = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1
        mask = model.sample_mask(1, "cpu")
        losses = model(x, mask)
        assert losses["rec"].shape == x.shape and mask.shape == (1, cfg.num_patches)
        assert model.encode(x).shape == (1, cfg.num_latent_tokens, cfg.latent_dim)
        assert set(losses) == {"rec", "pixel", "hog", "loss"} and torch.isfinite(losses["loss"])
        assert model.aux["hog"].head.out_features == model.hog.dim(cfg.patch_size)


def test_maetok_b_128_parameter_count():
    with torch.device("meta"):
        model = MAETok(make_config("MAETok-B-128"))
    n = sum(p.numel() for m in (model.encoder, model.decoder) for p in m.parameters())
    assert abs(n / 176e6 - 1) < 0.05, n  # paper: encoder + pixel decoder ~176M
    cfg = model.cfg
    assert (cfg.num_latent_tokens, cfg.latent_dim, cfg.patch_size, cfg.image_size) == (128, 32, 16, 256)
    assert (cfg.aux_width, cfg.aux_depth, cfg.rope, cfg.rope_theta) == (192, 3, "mixed", 10.0)


def test_modulation_is_zero_initialised_on_latent_positions():
    model = MAETok(make_config("tiny", mod_scale_init=0.0))                  # the official init
    blk = model.decoder.blocks[0]
    z = torch.randn(2, 32, 8)
    x = torch.randn(2, 64 + 32, model.cfg.dec_width)
    shift, scale, *_ = blk.ada(z).chunk(4, -1)
    out = blk.modulate(blk.norm1(x), shift, scale)
    assert out[:, -32:].abs().max() == 0 and torch.equal(out[:, :-32], blk.norm1(x)[:, :-32])
    # so at init the decoder's output cannot depend on the latent: the encoder gets no gradient
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), model.decode(torch.randn(2, 32, 8)))


def test_tiny_modulation_starts_as_identity():
    model = MAETok(make_config("tiny"))                                       # mod_scale_init = 1
    blk = model.decoder.blocks[0]
    z, x = torch.randn(2, 32, 8), torch.randn(2, 64 + 32, model.cfg.dec_width)
    shift, scale, *_ = blk.ada(z).chunk(4, -1)
    torch.testing.assert_close(blk.modulate(blk.norm1(x), shift, scale), blk.norm1(x))
    with torch.no_grad():
        assert (model.decode(z) - model.decode(torch.randn(2, 32, 8))).abs().max() > 1e-4


def test_pluggable_feature_target_uses_masked_negative_cosine():
    cfg = make_config("tiny", aux_targets=("hog", "toy"), feature_dims={"toy": 6})
    model = MAETok(cfg)
    proj = torch.randn(3 * 4 * 4, 6)
    model.set_feature_target("toy", lambda x: patchify(x, 4) @ proj)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    target = patchify(x, 4) @ proj
    mask = random_mask(2, 64, 0.5)
    torch.testing.assert_close(model.aux_loss("toy", 3 * target, x, mask), torch.tensor(-1.0))
    torch.testing.assert_close(model.aux_loss("toy", -target, x, mask), torch.tensor(1.0))
    assert {"rec", "pixel", "hog", "toy", "loss"} == set(model.train()(x, model.sample_mask(len(x), "cpu")))


def test_tiny_overfits_one_batch():
    from data import BuiltinSource, ImageDataset
    torch.manual_seed(0)
    ds = ImageDataset(BuiltinSource(32, 8), 32, train=False)
    x = torch.stack([ds[i][0] for i in range(8)])
    model = MAETok(make_config("tiny", aux_targets=(), enc_width=64, enc_heads=2, dec_width=64, dec_heads=2,
                               aux_width=32)).train()  # the tiny structure, narrower: 400 steps in a few seconds
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    first = None
    for step in range(400):
        losses = model(x)  # unmasked: the pure autoencoding path must memorise
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first or losses["pixel"].item()
    final = torch.nn.functional.mse_loss(model.eval()(x)["rec"], x).item()
    assert final < first / 10, (first, final)


def test_rope_angles_and_hog_stay_fp32_under_bf16_autocast():
    """The official code computes both in fp32; under bf16 autocast the einsum / conv would round them."""
    torch.manual_seed(0)
    rope = RoPE2D(4, 32, 10.0, mixed=True)
    pos = grid_positions(32, 32)  # 512 px at patch 16: phases up to ~45 rad
    hog, x = HOG(), torch.rand(2, 3, 64, 64) * 2 - 1  # a textured image
    ref_a, ref_h = rope.angles(pos), hog(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_a, got_h = rope.angles(pos), hog(x)
        assert torch.einsum("nd,hkd->hnk", pos, rope.freqs).dtype == torch.bfloat16  # what autocast would do
    assert got_a.dtype == got_h.dtype == torch.float32
    torch.testing.assert_close(got_a, ref_a, rtol=0, atol=0)
    torch.testing.assert_close(got_h, ref_h, rtol=0, atol=0)
