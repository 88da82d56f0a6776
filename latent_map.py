"""
A tokenizer seen through an invertible linear map T of its normalised latents: the fixed-reconstruction members of
the diffusability study (study.py --family F and G, docs/study.md).

  encode  x -> z = base.encode(x) (B, L, C) -> u = (z - mean_c) / std_c flattened to (B, d = L C) -> v = T u
  decode  v -> u = T^-1 v -> z = u std_c + mean_c -> base.decode(z)

decode(encode(x)) is the base tokenizer's reconstruction to float rounding (the map runs in float64), so PSNR and
rFID are those of the base for every member, and a difference in how well a denoiser generates in the new latent
space is the latent geometry alone. No map is a per-channel scaling (a diagonal map), which the pipeline's
per-channel standardisation would undo: the 1D maps act on all d dimensions at once.

  lda_gain g    I + (g - 1) Q Q^T, Q an orthonormal basis of the K - 1 discriminant (LDA) directions: the classes
                further apart (g > 1) or closer (g < 1) against everything else; a linear probe sees the same classes
  pca_power p   U diag(lam^((p - 1) / 2)) U^T on u's PCA basis: the spectrum lam becomes lam^p (p = 0 whitens,
                p = 2 squares the anisotropy)
  mix kappa     Q1 diag(s) Q2^T, random orthogonal Q1, Q2, singular values log-spaced from 1 to 1 / kappa
On a grid tokenizer (H x W tokens, study.py --family G) the maps act on the token grid instead, the same filter on
every channel (T = F kron I_C, F (H W, H W)), so the latents keep their spatial layout:
  blur s        Gaussian low-pass in the 2D DCT-II basis (reflective borders, no wrap-around; the basis SEC measures
                in): gains exp(-2 pi^2 s^2 |f|^2) at the DCT frequencies f = (k_h, k_w) / 2n, in cycles per token
  sharpen s     its inverse (gains exp(+2 pi^2 s^2 |f|^2)): the energy moved to high spatial frequencies
  shuffle       a fixed random permutation of the H W positions: orthogonal; the covariance spectra (VIV), the
                cosine distances of flattened latents (LNC) unchanged, spatial neighbourhoods destroyed
Each map is scaled to keep u's total variance (trace T S T^T = trace S).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import latent_metrics as lm

MAPS = ("identity", "lda_gain", "pca_power", "mix", "blur", "sharpen", "shuffle")
GRID_MAPS = ("blur", "sharpen", "shuffle")  # the maps of a grid's positions (the rest mix every token; identity: both)
EIG_FLOOR = 1e-4  # pca_power: eigenvalues under this fraction of the largest count as this (T's condition <= 1e4^|p-1|/2)


@dataclass
class LatentMapConfig:
    family: str = "latent_map"
    base: dict = field(default_factory=dict)  # the base tokenizer's config, inference form (tokenizer.build reads it)
    map: str = "identity"                     # one of MAPS
    value: float = 1.0                        # g, p, kappa or s
    seed: int = 0                             # mix: the orthogonal factors' seed; shuffle: the permutation's


# ----------------------------------------------------------------------------------------------------------
# the maps, from the base's normalised training latents u (N, d) and labels y (N,)

def covariance(u):
    u = u.double()
    uc = u - u.mean(0)
    return uc.T @ uc / (len(u) - 1)                                          # (d, d)


def lda_basis(u, y, ridge=1e-6):
    """Orthonormal basis (d, K - 1) of the discriminant subspace: the top generalised eigenvectors of the
    between-class scatter against the within-class one (Fisher's LDA)."""
    u, y = u.double(), torch.as_tensor(y)
    classes = torch.unique(y)
    means = torch.stack([u[y == c].mean(0) for c in classes])               # (K, d)
    counts = torch.tensor([(y == c).sum().item() for c in classes], dtype=torch.float64)
    dm = means - u.mean(0)
    Sb = (dm.T * counts) @ dm                                                # (d, d)
    r = u - means[torch.searchsorted(classes, y)]
    Sw = r.T @ r + ridge * torch.eye(u.shape[1], dtype=torch.float64) * r.pow(2).sum() / u.shape[1]
    e, V = torch.linalg.eigh(Sw)
    W = V @ torch.diag(e.rsqrt()) @ V.T                                      # Sw^-1/2
    _, B = torch.linalg.eigh(W @ Sb @ W)
    D = W @ B[:, -(len(classes) - 1):]                                       # discriminant directions (d, K-1)
    return torch.linalg.qr(D)[0]


def lda_gain(g, Q):
    return torch.eye(Q.shape[0], dtype=torch.float64) + (g - 1) * Q @ Q.T


def pca_power(p, S):
    lam, U = torch.linalg.eigh(S)
    lam = lam.clamp_min(EIG_FLOOR * lam.max())
    return U @ torch.diag(lam ** ((p - 1) / 2)) @ U.T


def mix(kappa, d, seed):
    g = torch.Generator().manual_seed(seed)
    Q1, Q2 = (torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] for _ in range(2))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), d, dtype=torch.float64)
    return Q1 @ torch.diag(s) @ Q2.T


def dct_filter(n, s):
    """(n, n) Gaussian filter of one grid axis, diagonal in the orthonormal DCT-II basis: gains exp(-2 pi^2 s^2 f^2)
    at the DCT frequencies f = k / 2n (cycles per token); s < 0 gives the inverse gains (sharpen). Symmetric."""
    D = lm.dct_matrix(n)                                                     # (n, n): coefficients = D x
    f = torch.arange(n, dtype=torch.float64) / (2 * n)
    return D.T @ torch.diag(torch.exp(-2 * math.pi ** 2 * math.copysign(s * s, s) * f ** 2)) @ D


def grid_map(kind, value, grid, channels, seed=0):
    """T (d, d) = F kron I_C of a spatial map on an (H, W) grid, for latents flattened position-major (L C)."""
    H, W = grid
    if kind in ("blur", "sharpen"):
        s = value if kind == "blur" else -value
        F = torch.kron(dct_filter(H, s), dct_filter(W, s))                   # separable: (H W, H W)
    elif kind == "shuffle":
        F = torch.eye(H * W, dtype=torch.float64)[torch.randperm(H * W, generator=torch.Generator().manual_seed(seed))]
    return torch.kron(F, torch.eye(channels, dtype=torch.float64))


def check(kind, grid):
    """A map kind that exists and fits its base: grid maps on a grid tokenizer, the others on a 1D-token one."""
    if kind not in MAPS:
        raise ValueError(f"unknown latent map {kind!r}; choose one of {MAPS}")
    if kind != "identity" and (kind in GRID_MAPS) != (grid is not None):
        raise ValueError(f"latent map {kind!r} on a {'grid' if grid else '1D-token'} tokenizer: the grid maps "
                         f"{GRID_MAPS} need a grid base (AlignTok), the others a 1D-token one (MAETok, MacTok): "
                         f"they mix every token and would lose a grid's spatial layout")


def make_map(kind, value, u, y, seed=0, grid=None):
    """T (d, d) float64 of a map kind (MAPS) at `value`, scaled to keep u's total variance; the GRID_MAPS need the
    token grid (H, W) of a grid tokenizer, the others a 1D-token one."""
    S = covariance(u)
    d = S.shape[0]
    check(kind, grid)
    if kind == "identity":
        T = torch.eye(d, dtype=torch.float64)
    elif kind == "lda_gain":
        T = lda_gain(value, lda_basis(u, y))
    elif kind == "pca_power":
        T = pca_power(value, S)
    elif kind == "mix":
        T = mix(value, d, seed)
    else:
        T = grid_map(kind, value, grid, d // (grid[0] * grid[1]), seed)
    return T * (S.trace() / (T @ S @ T.T).trace()).sqrt()


# ----------------------------------------------------------------------------------------------------------
# the tokenizer

class LatentMapped(nn.Module):
    """The base tokenizer with its latents mapped by T (the tokenizer interface: encode, decode, image_size,
    latent_shape, grid). Built by tokenizer.build, which builds the base from cfg.base. A grid base takes the
    GRID_MAPS only (T keeps its layout), a 1D-token base the others."""

    TRAIN_ONLY_PARAMS = ()

    def __init__(self, base, cfg):
        super().__init__()
        check(cfg.map, base.grid)
        self.base, self.cfg = base, cfg
        L, C = base.latent_shape
        self.register_buffer("mean", torch.zeros(C, dtype=torch.float64))
        self.register_buffer("std", torch.ones(C, dtype=torch.float64))
        self.register_buffer("T", torch.eye(L * C, dtype=torch.float64))
        self.register_buffer("T_inv", torch.eye(L * C, dtype=torch.float64))

    image_size = property(lambda self: self.base.image_size)
    latent_shape = property(lambda self: self.base.latent_shape)
    grid = property(lambda self: self.base.grid)

    @property
    def patch_owner(self):
        """(H W,) the token at which each grid patch's content sits (the FG masks of SRSS / LNC-FG follow it): moved
        by a shuffle only; None where every map keeps content in place."""
        if self.cfg.map != "shuffle":
            return None
        C = self.latent_shape[1]
        return self.T[::C, ::C].argmax(0)  # T = P kron I_C, (P u)[l] = u[perm[l]]: patch p sits at l with P[l, p] = 1

    @torch.no_grad()
    def set_map(self, T, mean, std):
        self.T.copy_(T)
        self.T_inv.copy_(torch.linalg.inv(T.double()))
        self.mean.copy_(mean)
        self.std.copy_(std)
        return self

    def encode(self, x):
        z = self.base.encode(x)                                              # (B, L, C)
        u = ((z.double() - self.mean) / self.std).flatten(1)                 # (B, d)
        # at least float32, never bf16: T^-1 would magnify its rounding (1e-1 of the latent at kappa 1000)
        return (u @ self.T.T).view(z.shape).to(torch.promote_types(z.dtype, torch.float32))

    def decode(self, v):
        u = (v.double().flatten(1) @ self.T_inv.T).view(v.shape)             # (B, L, C)
        return self.base.decode((u * self.std + self.mean).to(v.dtype))

