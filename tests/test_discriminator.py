"""discriminator.py: the heads and trunk against the official fixture, DiffAugment invariants, loss closed forms,
the adaptive weight."""
import math

import pytest
import torch
import torch.nn as nn

from conftest import golden, golden_tensor
from discriminator import (GEN_POLICY, Discriminator, GANLoss, _cutout, _translation, adaptive_weight, diff_augment,
                           dino_discriminator, disc_head, hinge_d, hinge_g, lecam_reg)


class Fixed(nn.Module):
    """A stand-in trunk that returns given activations."""

    def __init__(self, acts):
        super().__init__()
        self.acts = acts

    def forward(self, x):
        return self.acts


class Linear1d(nn.Module):
    """A tiny differentiable trunk: (B, 3, H, W) -> [(B, C, H*W)] via a fixed 1x1 conv."""

    def __init__(self, dims):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, d, 1) for d in dims)

    def forward(self, x):
        return [c(x).flatten(2) for c in self.convs]


def _heads_fixture():
    fx = golden("maetok_dinodisc_heads.pt")
    sd = {k: golden_tensor(k, s) for k, s, _ in fx["state_dict_keys"]}
    return fx, {k: v for k, v in sd.items() if k.startswith("heads.")}, {k: v for k, v in sd.items()
                                                                           if not k.startswith("heads.")}


def test_heads_match_official_fixture_train_and_eval():
    fx, heads_sd, _ = _heads_fixture()
    acts = fx["outputs"]["trunk_activations"]
    disc = Discriminator(Fixed(acts), [96] * 3)
    disc.load_state_dict(heads_sd, strict=True)
    x = torch.zeros(2, 3, 8, 8)
    with torch.no_grad():
        ref = fx["outputs"]["eval"]["logits"]
        got = disc.eval()(x)
        # eval: stored u, v, no iteration. The rule-filled weights give logits up to 1e7 from cancelling sums: the
        # float32 accumulation order of the conv differs by CPU (4e-5 of the largest logit seen with AMX kernels)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        disc.load_state_dict(heads_sd)
        torch.testing.assert_close(disc.train()(x), fx["outputs"]["train"]["logits"], atol=1e-5, rtol=1e-4)
        state = disc.state_dict()
        for k, v in fx["outputs"]["train"]["state_after"].items():
            torch.testing.assert_close(state[k].to(v.dtype), v, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(disc.eval()(x), fx["outputs"]["eval_after_train"]["logits"], atol=1e-5, rtol=1e-4)


def test_trunk_and_heads_end_to_end_on_official_fixture():
    from discriminator import load_dino_disc_trunk
    from pretrained import ViTConfig
    fx, heads_sd, trunk_sd = _heads_fixture()
    trunk = load_dino_disc_trunk(state_dict=trunk_sd, cfg=ViTConfig(96, 3, 3, patch_size=16, img_size=224,
                                                                     layerscale=False), key_depths=(1, 2))
    disc = dino_discriminator(trunk)
    disc.load_state_dict(heads_sd, strict=True)
    with torch.no_grad():
        got = disc.train()(fx["inputs"]["x160_disc"].float())
    torch.testing.assert_close(got, fx["outputs"]["train"]["logits"], atol=1e-4, rtol=1e-4)
    assert not any(k.startswith("_trunk") or "vit" in k for k in disc.state_dict())  # the trunk is never saved
    assert all(not p.requires_grad for p in trunk.parameters())


def test_real_configuration_parameters_and_keys():
    fx = golden("maetok_dinodisc_heads.pt")
    disc = Discriminator(Fixed(None), [384] * 5)
    assert sum(p.numel() for p in disc.parameters() if p.requires_grad) == 7_386_245
    keys = [(k, list(v.shape)) for k, v in disc.state_dict().items()]
    real = next(v for k, v in fx["real_state_dict_keys"].items() if k.startswith("DinoDisc()"))
    assert keys == [(k, s) for k, s, _ in real]


def test_head_is_roll_equivariant_and_spectral_norm_converges():
    torch.manual_seed(0)
    head = disc_head(16).train()
    a = torch.randn(4, 16, 49)
    with torch.no_grad():
        for _ in range(200):
            head(a)
        out = head(a)
        torch.testing.assert_close(head(torch.roll(a, 5, dims=-1)), torch.roll(out, 5, dims=-1), atol=1e-5, rtol=1e-4)
    for m in head.modules():
        if isinstance(m, nn.Conv1d):
            w = m.weight_orig.reshape(m.weight_orig.shape[0], -1)
            sigma = torch.linalg.matrix_norm(w / (m.weight_u @ w @ m.weight_v), ord=2)
            assert abs(sigma.item() - 1) < 1e-3


# ----------------------------------------------------------------------------------------------------------
# DiffAugment

def test_diffaug_identity_gates_and_shapes():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(diff_augment(x, GEN_POLICY, 0.0), x)
    torch.manual_seed(0)
    y = diff_augment(x, "color,translation,cutout_0.5", 1.0)
    assert y.shape == x.shape and not torch.equal(y, x)
    seen = set()
    for seed in range(8):  # one gate per group, from the CPU RNG, for the whole batch
        torch.manual_seed(seed)
        on = torch.rand(1).item() <= 0.5
        torch.manual_seed(seed)
        y = diff_augment(x, "cutout_0.5", 0.5)
        applied = (y != x).flatten(1).any(1)
        assert bool(applied.all()) == on and bool(applied.any()) == on
        seen.add(on)
    assert seen == {True, False}
    with pytest.raises(ValueError, match="unknown DiffAugment group"):
        diff_augment(x, "flip", 1.0)


def test_color_brightness_is_a_constant_shift_and_factors_of_one_are_identity(monkeypatch):
    import discriminator as D
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    draws = iter([None, torch.full((4, 1, 1, 1), 0.5), torch.full((4, 1, 1, 1), 0.5)])
    real_rand = D._rand

    def rand(x):
        r = next(draws)
        return real_rand(x) if r is None else r
    monkeypatch.setattr(D, "_rand", rand)
    torch.manual_seed(1)
    y = D._color(x)  # brightness drawn, saturation factor 2 * 0.5 = 1, contrast factor 0.5 + 0.5 = 1
    d = (y - x).flatten(1)
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-6) and (d[:, 0].abs() <= 0.5).all()


def test_translation_equals_zero_filled_roll():
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    y = _translation(x)
    torch.manual_seed(3)
    th, tw = torch.randint(-4, 5, (2, 1, 1)), torch.randint(-4, 5, (2, 1, 1))
    for b in range(2):
        h, w = int(th[b]), int(tw[b])
        ref = torch.zeros_like(x[b])
        src = x[b, :, max(h, 0):32 + min(h, 0), max(w, 0):32 + min(w, 0)]   # out(i, j) = x(i + h, j + w)
        ref[:, max(-h, 0):32 - max(h, 0), max(-w, 0):32 - max(w, 0)] = src
        torch.testing.assert_close(y[b], ref)


def test_cutout_area():
    x = torch.ones(64, 3, 32, 32)
    torch.manual_seed(0)
    y = _cutout(x, 0.2)                                                     # a 6 x 6 box
    zeros = (y[:, 0] == 0).flatten(1).sum(1)
    assert zeros.max() == 36 and zeros.min() < 36 and (zeros > 0).all()   # clipped at borders, never gone
    assert torch.equal(y[:, 0] == 0, y[:, 2] == 0)                        # all channels


def test_diffaug_ops_are_differentiable():
    x = (torch.rand(2, 3, 8, 8, dtype=torch.double) * 2 - 1).requires_grad_()
    for policy in ("color", "translation", "cutout_0.5"):
        torch.manual_seed(0)
        fn = lambda t: (torch.manual_seed(0), diff_augment(t, policy, 1.0))[1]
        assert torch.autograd.gradcheck(fn, (x,))


# ----------------------------------------------------------------------------------------------------------
# losses

def test_hinge_and_lecam_closed_forms():
    assert hinge_d(torch.full((4,), 1.5), torch.full((4,), -2.0)).item() == 0
    assert hinge_d(torch.zeros(4), torch.zeros(4)).item() == 1
    assert hinge_g(torch.tensor([1.0, 3.0])).item() == -2
    real, fake = torch.tensor([1.0, -1.0, 2.0, 0.5]), torch.tensor([-1.0, 0.0, 1.0, -2.0])
    ema_r, ema_f = 0.5, -0.5  # relu(r - ef)^2 = (1.5^2, 0, 2.5^2, 1^2); relu(er - f)^2 = (1.5^2, .5^2, 0, 2.5^2)
    ref = (2.25 + 0 + 6.25 + 1) / 4 + (2.25 + 0.25 + 0 + 6.25) / 4
    assert abs(lecam_reg(real, fake, ema_r, ema_f).item() - ref) < 1e-6
    gan = GANLoss(Discriminator(Fixed(None), [4]))
    for _ in range(50):
        gan.update_lecam(torch.full((8,), 2.0), torch.full((8,), -1.0))
    torch.testing.assert_close(gan.lecam_ema, torch.tensor([2.0, -1.0]) * (1 - 0.999 ** 50))


def test_discriminator_loss_weights_and_constant_d():
    torch.manual_seed(0)
    disc = Discriminator(Linear1d([4, 4]), [4, 4])
    gan = GANLoss(disc, disc_start=0)
    x, x_rec = torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1
    out = gan.discriminator_loss(disc, x, x_rec)
    ref = 0.4 * (out["d_hinge"] + 1e-3 * out["d_lecam"]) + 4.0 * out["d_cr"]  # CR is not times 0.4
    torch.testing.assert_close(out["loss"].detach(), ref)
    out["loss"].backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in disc.trunk.parameters())
    const = Discriminator(Fixed([torch.randn(4, 4, 64)]), [4])           # D ignores its input -> CR = 0
    assert GANLoss(const).discriminator_loss(const, x, x_rec)["d_cr"].item() < 1e-10  # SN moves u a little


def test_adaptive_terms_say_when_the_clamp_or_eps_decides():
    from discriminator import adaptive_terms
    a = adaptive_terms(torch.tensor([3.0, 4.0]), torch.tensor([0.5, 0.0]))
    assert (a["nll_grad"].item(), a["grad"].item(), a["clamped"].item(), a["eps_bound"].item()) == (5.0, 0.5, 0, 0)
    assert adaptive_terms(torch.tensor([3.0, 4.0]), torch.tensor([1e-5, 0.0]))["eps_bound"].item() == 1
    big = adaptive_terms(torch.tensor([1e3, 0.0]), torch.tensor([1e-2, 0.0]))
    assert big["clamped"].item() == 1 and big["weight"].item() == 1e4


def test_adaptive_weight_closed_form_clamp_and_scale_invariance():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.5])
    assert abs(adaptive_weight(a, b).item() - 5 / (0.5 + 1e-4)) < 1e-4
    assert adaptive_weight(a, torch.zeros(2)).item() == 1e4
    assert adaptive_weight(a.requires_grad_(), b).grad_fn is None
    assert abs(adaptive_weight(a, 10 * b).item() * 10 - adaptive_weight(a, b).item()) < 1e-2


def test_generator_term_equals_the_official_double_backward():
    """The surrogate term gives the tokenizer exactly the gradient of the official d_weight * 0.4 * hinge_G,
    its lambda equals the ratio of gradient norms at the last layer, and the heads get no gradient."""
    torch.manual_seed(0)
    disc = Discriminator(Linear1d([4, 8]), [4, 8])
    gan = GANLoss(disc, disc_start=0)
    last = nn.Linear(6, 3 * 8 * 8)
    z = torch.randn(2, 6)
    x = torch.rand(2, 3, 8, 8) * 2 - 1

    def run(official):
        last.zero_grad()
        x_rec = last(z).view(2, 3, 8, 8)
        nll = (x_rec - x).pow(2).mean()
        torch.manual_seed(5)
        if official:
            g = hinge_g(disc(diff_augment(x_rec, GEN_POLICY, 0.5)))
            gn, = torch.autograd.grad(nll, last.weight, retain_graph=True)
            gg, = torch.autograd.grad(g, last.weight, retain_graph=True)
            lam = (gn.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4).detach()
            term = 0.4 * lam * g
        else:
            term, logs = gan.generator_term(x_rec, nll, last.weight)
            lam = logs["d_weight"]
        (nll + term).backward()
        return lam, last.weight.grad.clone(), last.bias.grad.clone()
    state = {k: v.clone() for k, v in disc.state_dict().items()}  # each train forward moves the SN vectors
    lam0, gw0, gb0 = run(True)
    for p in disc.parameters():
        p.grad = None
    disc.load_state_dict(state)
    lam1, gw1, gb1 = run(False)
    torch.testing.assert_close(lam1, lam0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb1, gb0, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())
    assert 0 < lam1.item() < 1e4 and math.isfinite(lam1.item())
