"""
A tokenizer seen through an invertible linear map T of its normalised latents: the fixed-reconstruction members of
the diffusability study (study.py --family F, docs/study.md).

  encode  x -> z = base.encode(x) (B, L, C) -> u = (z - mean_c) / std_c flattened to (B, d = L C) -> v = T u
  decode  v -> u = T^-1 v -> z = u std_c + mean_c -> base.decode(z)

decode(encode(x)) is the base tokenizer's reconstruction to float rounding (the map runs in float64), so PSNR and
rFID are those of the base for every member, and a difference in how well a denoiser generates in the new latent
space is the latent geometry alone. The maps act on all d dimensions at once, never per channel: the pipeline's
per-channel standardisation would undo a diagonal map.

  lda_gain g    I + (g - 1) Q Q^T, Q an orthonormal basis of the K - 1 discriminant (LDA) directions: the classes
                further apart (g > 1) or closer (g < 1) against everything else; a linear probe sees the same classes
  pca_power p   U diag(lam^((p - 1) / 2)) U^T on u's PCA basis: the spectrum lam becomes lam^p (p = 0 whitens,
                p = 2 squares the anisotropy)
  mix kappa     Q1 diag(s) Q2^T, random orthogonal Q1, Q2, singular values log-spaced from 1 to 1 / kappa
Each map is scaled to keep u's total variance (trace T S T^T = trace S).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

MAPS = ("identity", "lda_gain", "pca_power", "mix")
EIG_FLOOR = 1e-4  # pca_power: eigenvalues under this fraction of the largest count as this (T's condition <= 1e4^|p-1|/2)


@dataclass
class LatentMapConfig:
    family: str = "latent_map"
    base: dict = field(default_factory=dict)  # the base tokenizer's config, inference form (tokenizer.build reads it)
    map: str = "identity"                     # one of MAPS
    value: float = 1.0                        # g, p or kappa
    seed: int = 0                             # mix: the orthogonal factors' seed


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


def make_map(kind, value, u, y, seed=0):
    """T (d, d) float64 of a map kind (MAPS) at `value`, scaled to keep u's total variance."""
    S = covariance(u)
    d = S.shape[0]
    if kind == "identity":
        T = torch.eye(d, dtype=torch.float64)
    elif kind == "lda_gain":
        T = lda_gain(value, lda_basis(u, y))
    elif kind == "pca_power":
        T = pca_power(value, S)
    elif kind == "mix":
        T = mix(value, d, seed)
    else:
        raise ValueError(f"unknown latent map {kind!r}; choose one of {MAPS}")
    return T * (S.trace() / (T @ S @ T.T).trace()).sqrt()


# ----------------------------------------------------------------------------------------------------------
# the tokenizer

class LatentMapped(nn.Module):
    """The base tokenizer with its latents mapped by T (the tokenizer interface: encode, decode, image_size,
    latent_shape, grid). Built by tokenizer.build, which builds the base from cfg.base."""

    TRAIN_ONLY_PARAMS = ()

    def __init__(self, base, cfg):
        super().__init__()
        if base.grid is not None:
            raise ValueError("latent maps mix every token: a grid tokenizer would lose its spatial layout; "
                             "use a 1D-token base (MAETok, MacTok)")
        self.base, self.cfg = base, cfg
        L, C = base.latent_shape
        self.register_buffer("mean", torch.zeros(C, dtype=torch.float64))
        self.register_buffer("std", torch.ones(C, dtype=torch.float64))
        self.register_buffer("T", torch.eye(L * C, dtype=torch.float64))
        self.register_buffer("T_inv", torch.eye(L * C, dtype=torch.float64))

    image_size = property(lambda self: self.base.image_size)
    latent_shape = property(lambda self: self.base.latent_shape)
    grid = None

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

