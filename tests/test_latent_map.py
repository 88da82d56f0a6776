"""latent_map.py (family F of the study): a mapped tokenizer reconstructs exactly as its base, round-trips through a
checkpoint, and each map does what it says (LDA gain moves LNC with the probe unchanged; PCA power and mix set the
spectrum and the condition number)."""
from dataclasses import asdict

import pytest
import torch

import latent_map
import latent_metrics as lm
import study
import tokenizer
from maetok import MAETok


def _base():
    torch.manual_seed(0)
    return tokenizer.from_checkpoint({"config": tokenizer.PRESETS["MAETok-tiny"], "model": MAETok(
        tokenizer.make_config("MAETok-tiny")).state_dict()})


def _clusters(n=400, d=24, k=4, sep=3.0, seed=0):
    """Labelled points: class means on 3 directions, isotropic noise on every dimension."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    means = torch.zeros(k, d, dtype=torch.float64)
    means[:, :k - 1] = torch.randn(k, k - 1, generator=g, dtype=torch.float64) * sep
    return means[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


@pytest.mark.parametrize("kind,value", [("identity", 1), ("lda_gain", 8), ("pca_power", 0), ("mix", 1000)])
def test_a_mapped_tokenizer_reconstructs_as_its_base(kind, value, tmp_path):
    base = _base()
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = base.encode(x)
    y = torch.arange(64) % 10
    mean, std = z.double().mean((0, 1)), z.double().std((0, 1))
    T = latent_map.make_map(kind, value, ((z.double() - mean) / std).flatten(1), y)
    cfg = latent_map.LatentMapConfig(base=asdict(base.cfg), map=kind, value=value)
    tok = tokenizer.build(cfg)
    tok.base.load_state_dict(base.state_dict())
    tok.set_map(T, mean, std)
    path = tmp_path / "member.pt"  # through a checkpoint, as the scripts read it
    torch.save({"config": asdict(cfg), "ema": tok.state_dict(), "model": None, "args": {}}, path)
    import released
    tok = tokenizer.from_checkpoint(released.load(str(path)))
    with torch.no_grad():
        v = tok.encode(x)
        rec, ref = tok.decode(v), base.decode(z)
    assert v.shape == z.shape and tok.latent_shape == base.latent_shape and tok.image_size == 32
    assert (rec - ref).abs().max() < 1e-6
    if kind != "identity":
        assert (v - z).abs().max() > 1e-2                                   # the latents did change


def test_a_grid_base_is_refused():
    aligntok_tiny = tokenizer.build(tokenizer.make_config("AlignTok-tiny"))
    with pytest.raises(ValueError, match="grid"):
        latent_map.LatentMapped(aligntok_tiny, latent_map.LatentMapConfig())


def test_lda_gain_moves_lnc_monotonically_while_the_probe_stays():
    u, y = _clusters()
    lnc, probe = [], []
    for g in (0.25, 0.5, 1, 2, 4):
        v = (u @ latent_map.make_map("lda_gain", g, u, y).T).float()
        lnc.append(lm.lnc(v, y))
        probe.append(lm.linear_probe(v[:200], y[:200], v[200:], y[200:]))
    assert all(a < b for a, b in zip(lnc, lnc[1:])), lnc
    assert lnc[-1] - lnc[0] > 0.2 and max(probe) - min(probe) <= 0.05, (lnc, probe)


def test_every_map_keeps_the_total_variance_and_sets_its_spectrum():
    u, y = _clusters()
    S = latent_map.covariance(u)
    for kind, value in (("lda_gain", 4), ("pca_power", 2), ("mix", 100)):
        T = latent_map.make_map(kind, value, u, y)
        assert torch.isclose((T @ S @ T.T).trace(), S.trace())
    lam = torch.linalg.eigvalsh(S)
    T = latent_map.make_map("pca_power", 2, u, y)
    lam2 = torch.linalg.eigvalsh(T @ S @ T.T)
    assert torch.allclose(lam2 / lam2.sum(), lam ** 2 / (lam ** 2).sum(), atol=1e-10)      # lam -> lam^2
    T = latent_map.make_map("pca_power", 0, u, y)
    assert torch.allclose(T @ S @ T.T, torch.eye(len(S), dtype=torch.float64) * S.trace() / len(S))  # whitened
    assert abs(torch.linalg.cond(latent_map.make_map("mix", 100, u, y)).item() - 100) < 1e-6
    with pytest.raises(ValueError, match="unknown latent map"):
        latent_map.make_map("rotate", 1, u, y)


def test_the_fixed_family_is_the_design():
    fixed = [m for m in study.MEMBERS if study.MEMBERS[m][0] == "F"]
    assert len(fixed) >= 12 and study.parse_args([]).members == fixed and len(study.parse_args([]).seeds) >= 2
    kinds = {study.FIXED[m][0] for m in fixed}
    assert kinds == {"identity", "lda_gain", "pca_power", "mix"}
