"""diffusion.py: the time convention, samplers against the exact velocity of Gaussian data, CFG, presets."""

import pytest
import torch

from diffusion import (PRESETS, DiT, Transport, guided_velocity, make_config, rope_table, shift_time,
                       sincos_pos_embed)


def test_path_endpoints_and_velocity_is_the_time_derivative():
    x, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    x0, v = Transport.path(x, eps, torch.zeros(3))
    x1, _ = Transport.path(x, eps, torch.ones(3))
    torch.testing.assert_close(x0, x)     # t = 0 is data
    torch.testing.assert_close(x1, eps)   # t = 1 is noise
    t, h = torch.full((3,), 0.37, dtype=torch.float64), 1e-6
    xd, ed = x.double(), eps.double()
    fd = (Transport.path(xd, ed, t + h)[0] - Transport.path(xd, ed, t - h)[0]) / (2 * h)
    torch.testing.assert_close(fd, (ed - xd))
    torch.testing.assert_close(v, eps - x)


class GaussianOracle:
    """The exact velocity E[eps - x | x_t] for data x ~ N(mu, S) (C channels, every token independent)."""

    def __init__(self, mu, S):
        self.mu, self.S = mu.double(), S.double()

    def __call__(self, x, t, at=None):
        C = len(self.mu)
        A = (1 - t) ** 2 * self.S + t ** 2 * torch.eye(C, dtype=torch.float64)
        r = x.double() - (1 - t) * self.mu                                     # (B, L, C)
        Ainv_r = torch.linalg.solve(A, r.reshape(-1, C).T).T.reshape(r.shape)
        e_x = self.mu + (1 - t) * Ainv_r @ self.S                              # S symmetric
        e_eps = t * Ainv_r
        return (e_eps - e_x).float()


@pytest.mark.parametrize("sampler,steps,shift", [("euler", 100, 1.0), ("heun", 40, 1.0), ("euler", 100, 3.0),
                                                 ("sde", 250, 1.0)])
def test_samplers_reproduce_gaussian_data_with_the_exact_velocity(sampler, steps, shift):
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -2.0, 0.5])
    Lc = torch.tensor([[1.0, 0, 0], [0.6, 0.5, 0], [-0.3, 0.2, 0.8]])
    S = Lc @ Lc.T
    n = 20000
    out = Transport().sample(GaussianOracle(mu, S), torch.randn(n, 1, 3), sampler, steps, shift).reshape(n, 3)
    se = (S.diagonal() / n).sqrt()                                            # standard error of the mean
    assert ((out.mean(0) - mu).abs() < 4 * se + 0.02).all(), (out.mean(0), mu)
    torch.testing.assert_close(torch.cov(out.T), S, atol=0.06, rtol=0.05)


def _random_dit(**over):
    torch.manual_seed(0)
    model = DiT(make_config("tiny", in_channels=6, num_tokens=8, num_classes=5, **over)).eval()
    with torch.no_grad():  # move off the adaLN-Zero init so that outputs depend on everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_cfg_scale_one_is_conditional_and_guide_channels_act_on_the_last_dim():
    model = _random_dit()
    x, t, y = torch.randn(4, 8, 6), torch.rand(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, atol=1e-5, rtol=1e-5)
        g = model.forward_with_cfg(x, t, y, 3.0)
        torch.testing.assert_close(g, uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5)
        g2 = model.forward_with_cfg(x, t, y, 3.0, guide_channels=2)
    torch.testing.assert_close(g2[..., :2], g[..., :2])
    torch.testing.assert_close(g2[..., 2:], cond[..., 2:], atol=1e-5, rtol=1e-5)


def test_guidance_interval_is_respected():
    model = _random_dit()
    x, y = torch.randn(2, 8, 6), torch.tensor([1, 4])
    v = guided_velocity(model, y, cfg_scale=4.0, interval=(0.0, 0.5))
    with torch.no_grad():
        cond = lambda t: model(x, torch.full((2,), t), y)
        torch.testing.assert_close(v(x, 0.8), cond(0.8))                     # noisy end: unguided
        guided = model.forward_with_cfg(x, torch.full((2,), 0.3), y, 4.0)
        torch.testing.assert_close(v(x, 0.3), guided)
        assert not torch.allclose(v(x, 0.3), cond(0.3))


def test_timestep_shift_fixes_endpoints_and_is_monotone():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.3, 1.0, 3.0):
        u = shift_time(t, s)
        assert u[0] == 0 and abs(u[-1] - 1) < 1e-12 and (u.diff() > 0).all()
    assert (shift_time(t[1:-1], 3.0) > t[1:-1]).all()  # s > 1: more of the grid near t = 1 (noise)
    # LightningDiT's shift 0.3 (t = 0 noise) equals 1 / 0.3 in this convention
    ld = 0.3 * (1 - t) / (1 + (0.3 - 1) * (1 - t))
    torch.testing.assert_close(1 - ld, shift_time(t, 1 / 0.3))


def test_logit_normal_moments():
    tr = Transport("logit_normal", ln_mu=0.5, ln_sigma=1.2)
    t = tr.sample_t(200_000, generator=torch.Generator().manual_seed(0)).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 1.2) < 0.01
    u = Transport().sample_t(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(u.mean() - 0.5) < 0.005 and u.min() >= 0 and u.max() <= 1


def test_cosine_term_acts_on_channels():
    tr = Transport(cosine_loss=True)
    v = torch.randn(4, 8, 6)
    per_token = tr.velocity_loss(v * torch.rand(4, 8, 1) + v * 0.1, v)        # same direction per token
    assert per_token["cos"].abs() < 1e-6
    per_channel = tr.velocity_loss(v * torch.tensor([1.0, 2, 3, 4, 5, 6]), v)  # direction changes
    assert per_channel["cos"] > 0.01
    assert torch.isclose(per_channel["loss"], per_channel["mse"] + per_channel["cos"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_output_is_zero_at_init_and_shapes(preset):
    cfg = make_config(preset, in_channels=4, num_tokens=16, num_classes=3)
    if cfg.width > 400:  # big presets: shapes only, on the meta device
        with torch.device("meta"):
            model = DiT(cfg)
        assert model(torch.randn(2, 16, 4, device="meta"), torch.rand(2, device="meta"),
                     torch.zeros(2, dtype=torch.long, device="meta")).shape == (2, 16, 4)
        return
    model = DiT(cfg).train()
    out = model(torch.randn(2, 16, 4), torch.rand(2), torch.tensor([0, 2]))
    assert out.shape == (2, 16, 4) and (out == 0).all()  # adaLN-Zero and a zero final layer


@pytest.mark.parametrize("preset", ["SiT-XL", "LightningDiT-XL"])
def test_xl_parameter_count(preset):
    with torch.device("meta"):
        model = DiT(make_config(preset, in_channels=32, num_tokens=128, num_classes=1000))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 675e6 - 1) < 0.02, n  # SiT-XL / LightningDiT-XL: 675M


def test_grid_latents_use_2d_positions():
    emb = sincos_pos_embed(8, 6, grid=(2, 3))
    assert emb.shape == (6, 8)
    torch.testing.assert_close(emb[0, 4:], emb[1, 4:])        # same row -> same row half (dims 4:)
    torch.testing.assert_close(emb[0, :4], emb[3, :4])        # same column -> same column half
    cos, sin = rope_table(8, 6, grid=(2, 3))
    assert cos.shape == sin.shape == (6, 8)
    torch.testing.assert_close(cos[0, :4], cos[2, :4])        # same row -> same first half (row pairs)
    torch.testing.assert_close(cos[0, 4:], cos[3, 4:])        # same column -> same second half
    model = _random_dit(grid=(2, 4), rope=True, norm="rmsnorm", ffn="swiglu", qk_norm=True)
    assert model(torch.randn(2, 8, 6), torch.rand(2), torch.tensor([0, 1])).shape == (2, 8, 6)


def test_rope_scores_depend_only_on_relative_position():
    from vit import RoPETable
    cos, sin = rope_table(16, 20)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rot = lambda x, i: RoPETable()(x, x, cos[i:i + 1], sin[i:i + 1])[0]
    s = lambda i, j: (rot(q, i) * rot(k, j)).sum()
    torch.testing.assert_close(s(3, 7), s(10, 14))
    assert not torch.isclose(s(3, 7), s(3, 8))


def test_sampler_loop_compiles_without_graph_breaks():
    """sample.py --compile: the denoiser compiled in place with fullgraph=True (a graph break raises), t a tensor
    input, through CFG with an interval and every sampler; same samples as eager."""
    model = _random_dit()
    y, noise = torch.tensor([0, 4]), torch.randn(2, 8, 6)
    def run():
        out = []
        for s in ("euler", "heun", "sde"):
            gens = [torch.Generator().manual_seed(i) for i in range(2)]
            v = guided_velocity(model, y, 3.0, (0.0, 0.75))
            out.append(Transport().sample(v, noise, s, 4, shift=2.0, generators=gens))
        return out
    ref = run()
    torch._dynamo.reset()
    model.compile(fullgraph=True, backend="eager")
    for a, b in zip(run(), ref):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
