"""latent_metrics.py against closed forms and constructed cases (docs/metrics.md)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latent_metrics as lm


def _spd(n, g, decay=0.7):
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(A)[0]
    return Q @ torch.diag(decay ** torch.arange(n, dtype=torch.float64) + 0.05) @ Q.T


def _matrix_normal(N, U, V, mean, g):
    a, P = torch.linalg.eigh(U)
    b, Q = torch.linalg.eigh(V)
    G = torch.randn(N, len(a), len(b), generator=g, dtype=torch.float64)
    return mean + P @ (a.sqrt()[:, None] * G * b.sqrt()[None]) @ Q.T


def test_viv_matches_the_kronecker_closed_form_and_flip_flop_recovers_the_factors():
    g = torch.Generator().manual_seed(0)
    n, p, N = 16, 8, 2000
    zs, ys, truth = [], [], []
    for c in range(2):
        U, V = _spd(n, g), 2.0 * _spd(p, g, 0.5)
        zs.append(_matrix_normal(N, U, V, torch.randn(n, p, generator=g, dtype=torch.float64) * 3, g))
        ys += [c] * N
        a, b = torch.linalg.eigvalsh(U), torch.linalg.eigvalsh(V)
        truth.append((math.pi / 2) * a.sqrt().sum().item() * b.sqrt().sum().item())
        Ue, Ve = lm.flip_flop(zs[-1])
        err = torch.linalg.norm(torch.kron(Ue, Ve) - torch.kron(U, V)) / torch.linalg.norm(torch.kron(U, V))
        assert err < 0.05, err
    res = lm.viv(torch.cat(zs).float(), ys)
    assert abs(res["viv"] / np.mean(truth) - 1) < 0.01, (res["viv"], np.mean(truth))
    assert abs(res["viv_norm"] - res["viv"] / (math.pi / 2 * n * p)) < 1e-12


def test_iv_curve_endpoints_and_marginal_viv_bounds():
    g = torch.Generator().manual_seed(1)
    eigs = {0: torch.tensor([[0.5, 2.0], [4.0, 0.1]], dtype=torch.float64)}
    lo, hi = lm.iv_curve(eigs, [0.0, 1.0])
    assert abs(lo - 1.0) < 1e-12 and abs(hi - eigs[0].mean().item()) < 1e-12  # t = 0 data, t = 1 noise
    # classes drawn from one Gaussian: the mixture is that Gaussian, so its VIV is the closed form
    n, p, N = 4, 3, 600
    U, V = _spd(n, g) * 0.3, _spd(p, g) * 0.3
    z = _matrix_normal(3 * N, U, V, torch.zeros(n, p, dtype=torch.float64), g).float()
    ys = [c for c in range(3) for _ in range(N)]
    closed = (math.pi / 2) * torch.linalg.eigvalsh(U).sqrt().sum().item() * torch.linalg.eigvalsh(V).sqrt().sum().item()
    marg = lm.viv_marginal(z, ys, samples=512)["viv_marginal"]
    assert abs(marg / closed - 1) < 0.05, (marg, closed)
    # classes apart: near the noise end the label is ambiguous, so the mixture's VIV exceeds the classes'
    z2 = z + torch.tensor(ys, dtype=torch.float32).view(-1, 1, 1)
    assert lm.viv_marginal(z2, ys, samples=256)["viv_marginal"] > 1.05 * lm.viv(z2, ys)["viv"]


def test_lnc_is_one_on_separated_clusters_and_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(1000) % 10
    centres = F.normalize(torch.randn(10, 16, generator=g), dim=1) * 10
    f = centres[y] + 0.1 * torch.randn(1000, 16, generator=g)
    assert lm.lnc(f, y) == 1.0
    assert abs(lm.lnc(torch.randn(1000, 16, generator=g), y) - 0.1) < 0.03


def test_sec_on_fields_with_known_spectra():
    H = W = 16
    const = torch.ones(4, H * W, 3)
    assert lm.sec(const, (H, W))["sec_0.5"] < 1e-12                       # DC only
    noise = torch.randn(400, H * W, 4, generator=torch.Generator().manual_seed(0))
    r = torch.arange(H)[:, None] + torch.arange(W)[None]
    share = (r > 0.5 * (H + W - 2)).float().mean().item()                  # 120 / 256 coefficients
    assert abs(lm.sec(noise, (H, W))["sec_0.5"] - share) < 0.01            # white: energy spread evenly
    D = lm.dct_matrix(H)
    basis = torch.outer(D[15], D[14]).float().reshape(1, H * W, 1)         # one high-frequency cosine
    assert abs(lm.sec(basis, (H, W))["sec_0.5"] - 1) < 1e-6
    torch.testing.assert_close(D @ D.T, torch.eye(H, dtype=torch.float64))  # orthonormal (Parseval)
    lam = torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
    assert abs(lm.sec_1d(lam)["sec1d_0.5"] - lam[4:].sum() / lam.sum()) < 1e-6


def test_spatial_metrics_smooth_field_against_its_shuffled_tokens():
    g = torch.Generator().manual_seed(0)
    H = W = 8
    low = torch.randn(200, 4, 2, 2, generator=g)
    smooth = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=True).flatten(2).mT  # (N, 64, 4)
    pos = lm.grid_coords(H, W)
    s = lm.spatial_metrics(smooth, pos, far=3, dmax=4)
    shuffled = lm.spatial_metrics(smooth[:, torch.randperm(H * W, generator=g)], pos, far=3, dmax=4)
    assert s["lds"] > 0.3 and s["cds"] > 0.05
    assert abs(shuffled["lds"]) < 0.05 and abs(shuffled["cds"]) < 0.02
    # SRSS: foreground tokens all one direction, background another, orthogonal -> pos 1, neg 0
    fg = torch.zeros(2, H * W, dtype=torch.bool)
    fg[:, pos[:, 0] < 4] = True
    u = torch.where(fg[..., None], torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.0, 1, 0, 0]))
    assert abs(lm.spatial_metrics(u, pos, fg, far=3, dmax=4, d_neg=3)["srss"] - 1) < 1e-9


def test_equivariance_is_exact_for_an_equivariant_encoder():
    g = torch.Generator().manual_seed(0)
    Wt = torch.randn(4, 3, generator=g)
    encode = lambda x: torch.einsum("oc,bchw->bhwo", Wt, x).flatten(1, 2)  # pointwise: commutes with T
    x = torch.rand(6, 3, 8, 8, generator=g)
    res = lm.grid_equivariance(encode, x, (8, 8))
    assert res["eq_err_rot90"] < 1e-12 and res["eq_err_scale"] < 1e-12
    assert abs(res["eq_cos_rot90"] - 1) < 1e-9
    lin = lm.linear_equivariance(encode, torch.rand(400, 3, 8, 8, generator=g), x, ridge=1e-8)
    assert lin["eq_linear_r2_rot90"] > 0.999 and lin["eq_linear_r2_scale"] > 0.999
    blur = lambda x: encode(F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, 1))     # not rot90-equivariant
    assert lm.grid_equivariance(blur, x, (8, 8))["eq_err_rot90"] > 1e-3


def test_trajectory_metrics_are_one_for_a_straight_constant_speed_flow():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, 2, generator=g), torch.randn(5, 3, 2, generator=g)
    ts = np.linspace(1, 0, 11)
    states = torch.stack([x0 + (1 - t) * (x1 - x0) for t in ts])
    m = lm.trajectory_metrics(states, ts)
    assert abs(m["local_straightness"] - 1) < 1e-9 and abs(m["global_efficiency"] - 1) < 1e-9
    assert np.allclose(m["segment_ratio"], 1)
    bent = states.clone()
    bent[5] += 1.0
    assert lm.trajectory_metrics(bent, ts)["global_efficiency"] < 0.99


def test_pearson_spearman_match_scipy_and_the_bootstrap_covers_the_truth():
    from scipy import stats
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    y[3] = y[4]  # a tie
    assert abs(lm.pearson(x, y) - stats.pearsonr(x, y)[0]) < 1e-12
    assert abs(lm.spearman(x, y) - stats.spearmanr(x, y)[0]) < 1e-12
    r, covered = 0.6, 0
    for t in range(200):
        a = rng.normal(size=40)
        b = r * a + math.sqrt(1 - r ** 2) * rng.normal(size=40)
        lo, hi = lm.bootstrap_ci(a, b, lm.pearson, n=300, seed=t)
        covered += lo <= r <= hi
    assert covered >= 180, covered


def test_tsne_keeps_clusters_and_uniformity_orders_spread_against_clumped():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(3, 10, generator=g)[y] * 10 + torch.randn(300, 10, generator=g)
    emb = lm.tsne(x, perplexity=20, iters=400)
    assert lm.lnc(emb, y, k=5) > 0.99
    grid = torch.stack(torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij"), -1).reshape(-1, 2)
    clumped = torch.cat([torch.randn(380, 2, generator=g) * 0.3, torch.randn(20, 2, generator=g) * 5 + 10])
    u, c = lm.uniformity(grid), lm.uniformity(clumped)
    assert u["density_cv"] < c["density_cv"] and u["gini"] < c["gini"] and u["entropy"] > c["entropy"]
    assert 0 < c["entropy"] < u["entropy"] <= 1


def test_slerp_and_neighbours():
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(4, 12, generator=g), dim=1).view(4, 6, 2) for _ in range(2))
    mid = lm.slerp(a, b, 0.5)                                               # unit vectors: on the great circle
    ca = F.cosine_similarity(mid.flatten(1), a.flatten(1))
    cb = F.cosine_similarity(mid.flatten(1), b.flatten(1))
    torch.testing.assert_close(ca, cb)                                      # halfway in angle
    torch.testing.assert_close(lm.slerp(a, a, 0.5), a)                      # sin(theta) = 0: linear
    db = 10 * torch.randn(50, 6, 2, generator=g)
    q = db[:5] + 1e-3 * torch.randn(5, 6, 2, generator=g)
    # softmax(-MSE): with MSE gaps of ~200 the near copy is drawn (the reference's near-argmin behaviour)
    torch.testing.assert_close(lm.neighbours(q, db, k=3, generator=g), db[:5])


@pytest.mark.parametrize("seed", [0, 1])
def test_shape_masks_agree_with_the_rendered_images(seed):
    """Replaying the renderer's draws: inside the mask the colour is nearer the drawn foreground colour."""
    import data
    src = data.BuiltinSource(32, 1000, "val", seed=seed)
    for i in range(0, 1000, 10):  # 100 images, every class
        img = np.asarray(src.load(i)).astype(np.float64) / 255
        m = src.mask(i)
        rng = np.random.default_rng([seed, 1, i])
        n = 64
        Y, X = (np.mgrid[0:n, 0:n] + 0.5) / n
        data._placed_mask(src.labels[i], X, Y, rng)
        bg0, bg1 = rng.random(3), rng.random(3)
        fg = rng.random(3)
        while np.abs(fg - (bg0 + bg1) / 2).sum() < 0.6:
            fg = rng.random(3)
        inside, outside = img[m > 0.99].mean(0), img[m < 0.01].mean(0)
        assert np.abs(inside - fg).sum() < np.abs(outside - fg).sum(), i
    np.testing.assert_array_equal(src.mask(7), src.mask(7))


def test_permutation_p_equals_brute_force_enumeration_and_monte_carlo_agrees():
    import itertools
    rng = np.random.default_rng(1)
    for n in (4, 6):
        x, y = rng.normal(size=n), rng.normal(size=n)
        for rank, fn in ((False, lm.pearson), (True, lm.spearman)):
            obs = abs(fn(x, y))
            brute = np.mean([abs(fn(x, y[list(p)])) >= obs - 1e-12 for p in itertools.permutations(range(n))])
            assert abs(lm.permutation_p(x, y, rank=rank) - brute) < 1e-12
    x = rng.normal(size=8)
    y = 0.6 * x + rng.normal(size=8)
    exact = lm.permutation_p(x, y)                                          # 8! orders
    mc = lm.permutation_p(x, y, n=20_000, exact_max=7)
    assert abs(exact - mc) < 0.01 and 0 < exact < 1
    assert lm.permutation_p(np.arange(4.0), np.arange(4.0)) == 2 / 24      # |r| = 1: the order and its reverse
    assert np.isnan(lm.permutation_p(np.arange(4.0), np.ones(4)))          # nothing to test


def test_partial_r_equals_the_correlation_of_regression_residuals():
    rng = np.random.default_rng(2)
    c = rng.normal(size=30)
    x, y = c + rng.normal(size=30), 2 * c + 0.5 * rng.normal(size=30)
    A = np.stack([np.ones(30), c], 1)
    res = lambda v: v - A @ np.linalg.lstsq(A, v, rcond=None)[0]
    assert abs(lm.partial_r(x, y, c) - lm.pearson(res(x), res(y))) < 1e-12
    assert lm.pearson(x, y) > 0.5 and abs(lm.partial_r(x, y, c)) < 0.4     # c explains the correlation
    assert np.isnan(lm.partial_r(x, y, np.ones(30)))                        # nothing to partial out


def test_holm_adjusts_as_the_step_down_rule():
    assert lm.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert lm.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert lm.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
