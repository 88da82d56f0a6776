"""latent_map.py (families F and G of the study): a mapped tokenizer reconstructs exactly as its base, round-trips
through a checkpoint, and each map does what it says (LDA gain moves LNC with the probe unchanged; PCA power and mix
set the spectrum and the condition number; blur / sharpen are DCT-basis filters that move SEC and LDS, a shuffle of
the grid keeps VIV and LNC and says where each patch went)."""
from dataclasses import asdict

import math

import pytest
import torch

import latent_map
import latent_metrics as lm
import study
import tokenizer
from aligntok import AlignTok
from maetok import MAETok


def _base(grid=False):
    """A random MAETok-tiny (1D tokens) or AlignTok-tiny (an 8 x 8 grid) as a trained tokenizer loads."""
    torch.manual_seed(0)
    name, cls = ("AlignTok-tiny", AlignTok) if grid else ("MAETok-tiny", MAETok)
    return tokenizer.from_checkpoint({"config": tokenizer.PRESETS[name], "model": cls(
        tokenizer.make_config(name)).state_dict()})


def _clusters(n=400, d=24, k=4, sep=3.0, seed=0):
    """Labelled points: class means on 3 directions, isotropic noise on every dimension."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    means = torch.zeros(k, d, dtype=torch.float64)
    means[:, :k - 1] = torch.randn(k, k - 1, generator=g, dtype=torch.float64) * sep
    return means[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


@pytest.mark.parametrize("kind,value", [("identity", 1), ("lda_gain", 8), ("pca_power", 0), ("mix", 1000),
                                        ("blur", 0.7), ("sharpen", 0.7), ("shuffle", 0)])
def test_a_mapped_tokenizer_reconstructs_as_its_base(kind, value, tmp_path):
    base = _base(grid=kind in latent_map.GRID_MAPS)
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = base.encode(x)
    y = torch.arange(64) % 10
    mean, std = z.double().mean((0, 1)), z.double().std((0, 1))
    T = latent_map.make_map(kind, value, ((z.double() - mean) / std).flatten(1), y, grid=base.grid)
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
    assert tok.grid == base.grid
    assert (rec - ref).abs().max() < 1e-6
    if kind != "identity":
        assert (v - z).abs().max() > 1e-2                                   # the latents did change


def test_a_map_must_fit_its_base():
    """Token-mixing maps would lose a grid's layout; grid maps need a grid: both refused, by the model and by make_map."""
    grid_base, flat_base = _base(grid=True), _base()
    for base, kind in ((grid_base, "mix"), (grid_base, "lda_gain"), (flat_base, "blur"), (flat_base, "shuffle")):
        with pytest.raises(ValueError, match="grid"):
            latent_map.LatentMapped(base, latent_map.LatentMapConfig(map=kind))
    latent_map.LatentMapped(grid_base, latent_map.LatentMapConfig())        # the identity fits both
    u, y = torch.randn(40, 64 * 4, dtype=torch.float64), torch.arange(40) % 4
    with pytest.raises(ValueError, match="grid"):
        latent_map.make_map("blur", 0.5, u, y)
    with pytest.raises(ValueError, match="grid"):
        latent_map.make_map("pca_power", 2, u, y, grid=(8, 8))


def _fields(n=240, grid=(8, 8), C=4, k=4, offset=1.0, seed=0):
    """Labelled latents (N, H W C) on a grid: a smooth random field (a 3-tap box filter of white noise, twice) plus a
    class offset per channel (`offset` its scale), plus a little white noise."""
    g = torch.Generator().manual_seed(seed)
    H, W = grid
    x = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    for _ in range(2):
        x = sum(x.roll(s, d) for s in (-1, 0, 1) for d in (2, 3)) / 6
    y = torch.arange(n) % k
    x = x + offset * torch.randn(k, C, 1, 1, generator=g, dtype=torch.float64)[y] + 0.1 * torch.randn(
        x.shape, generator=g, dtype=torch.float64)
    return x.flatten(2).mT.flatten(1), y                                     # position-major (N, H W C)


def _grid_metrics(u, y, maps, grid=(8, 8), C=4):
    S, pos, out = latent_map.covariance(u), lm.grid_coords(*grid), {}
    for kind, value in maps:
        T = latent_map.make_map(kind, value, u, y, grid=grid)
        assert torch.isclose((T @ S @ T.T).trace(), S.trace())              # total variance kept
        v = (u @ T.T).view(len(u), -1, C)                                    # (N, H W, C)
        out[kind, value] = {"sec": lm.sec(v, grid)["sec_0.5"], "lds": lm.spatial_metrics(v, pos)["lds"],
                            "viv": lm.viv(v, y)["viv_norm"], "lnc": lm.lnc(v, y)}
    return out


def test_grid_maps_move_the_spatial_metrics_and_a_shuffle_keeps_viv_and_lnc():
    order = [("sharpen", 0.7), ("sharpen", 0.35), ("identity", 1), ("blur", 0.35), ("blur", 0.7)]
    out = _grid_metrics(*_fields(offset=0.0), order + [("shuffle", 0)])     # zero-mean fields
    sec, lds = [out[m]["sec"] for m in order], [out[m]["lds"] for m in order]
    assert all(a > b for a, b in zip(sec, sec[1:])), sec                      # smoother: less high-frequency energy
    assert all(a < b for a, b in zip(lds, lds[1:])), lds                      # ... and more alike neighbours
    same, shuf = out["identity", 1], out["shuffle", 0]
    assert abs(shuf["lds"]) < 0.1 < same["lds"] - 0.3 and shuf["sec"] > same["sec"]  # neighbourhoods destroyed
    # with a class offset per image (constant over the grid) a wide blur makes far tokens alike too: LDS is not
    # monotonic in the width there; SEC still is, and a shuffle keeps every per-token statistic
    out = _grid_metrics(*_fields(offset=1.0), order + [("shuffle", 0)])
    assert out["sharpen", 0.35]["sec"] > out["identity", 1]["sec"] > out["blur", 0.35]["sec"]
    same, shuf = out["identity", 1], out["shuffle", 0]
    assert same["lnc"] > 0.5                                                  # the classes are there to keep
    assert abs(shuf["viv"] - same["viv"]) < 1e-6 and abs(shuf["lnc"] - same["lnc"]) < 1e-12  # a permutation


def test_blur_is_diagonal_in_the_dct_basis_sec_reads_and_sharpen_inverts_it():
    x = torch.randn(10, 8, dtype=torch.float64)
    D = lm.dct_matrix(8)
    g = torch.exp(-2 * torch.pi ** 2 * 0.5 ** 2 * (torch.arange(8, dtype=torch.float64) / 16) ** 2)
    assert torch.allclose(x @ latent_map.dct_filter(8, 0.5).T, (x @ D.T * g) @ D, atol=1e-12)  # idct(g dct(x))
    B, Sh = latent_map.grid_map("blur", 0.5, (8, 4), 2), latent_map.grid_map("sharpen", 0.5, (8, 4), 2)
    assert torch.allclose(B @ Sh, torch.eye(64, dtype=torch.float64), atol=1e-9)
    assert abs(torch.linalg.cond(B).item() - math.exp(2 * math.pi ** 2 * 0.25 * ((7 / 16) ** 2 + (3 / 8) ** 2))) < 1e-6


def test_a_shuffled_grid_says_where_each_patch_went():
    base = _base(grid=True)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = base.encode(x)                                                   # (16, 64, 8)
    tok = tokenizer.build(latent_map.LatentMapConfig(base=asdict(base.cfg), map="shuffle")).eval()
    tok.base.load_state_dict(base.state_dict())
    tok.set_map(latent_map.make_map("shuffle", 0, z.double().flatten(1), torch.arange(16), grid=(8, 8)),
                torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
    with torch.no_grad():
        v = tok.encode(x)
    owner = tok.patch_owner
    assert sorted(owner.tolist()) == list(range(64)) and not torch.equal(owner, torch.arange(64))
    assert torch.allclose(v[:, owner], z, atol=1e-6)                          # patch p's latent sits at token owner[p]
    assert tokenizer.build(latent_map.LatentMapConfig(base=asdict(base.cfg), map="blur")).patch_owner is None


def test_the_fixed_families_are_the_design():
    fixed = [m for m in study.MEMBERS if study.MEMBERS[m][0] == "F"]
    assert len(fixed) >= 12 and study.parse_args([]).members == fixed and len(study.parse_args([]).seeds) >= 2
    kinds = {study.FIXED[m][0] for m in fixed}
    assert kinds == {"identity", "lda_gain", "pca_power", "mix"}
    grid = study.parse_args(["--family", "G"]).members
    assert {study.FIXED[m][0] for m in grid} == {"identity", *latent_map.GRID_MAPS}
    assert study.primary("G") == ["viv_norm", "lnc", "sec_0.5", "lds"] and study.primary("R") == list(study.PRIMARY)
