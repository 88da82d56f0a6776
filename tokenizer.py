"""
MAETok: a plain-autoencoder 1D ViT tokenizer trained with mask modeling.

Paper: "Masked Autoencoders Are Effective Tokenizers for Diffusion Models" (Chen et al., 2025),
official code: github.com/Hhhhhhao/continuous_tokenizer (training code at commit f4d60a0).

Layout (B batch, N image patches, L latent tokens, D width, H latent channels):
  encoder   [cls; N patch tokens (masked ones replaced by a learned mask token) + APE; L latent tokens + 1D pos]
            -> ViT blocks with 2D RoPE on the N image tokens -> LN -> last L tokens -> Linear(D -> H) = z (B, L, H)
  decoder   [N copies of a learned mask token (RoPE only); Linear(H -> D)(z) + 1D pos] -> blocks whose latent
            positions are modulated token-wise by their own raw latent -> LN -> patch slice -> Linear -> pixels
  aux       shallow decoders of the same class predicting HOG / DINOv2 / ... targets of the masked patches.
The model computes its own losses (pixel MSE + aux); the training script adds LPIPS (and a GAN later).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TokenizerConfig:
    image_size: int = 256
    patch_size: int = 16
    # encoder / pixel decoder ViTs (official: timm vit_base_patch14_dinov2 re-instantiated with patch 16)
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0
    layerscale_init: float = 1e-5  # encoder LayerScale (DINOv2 arch); the MoVQ decoder blocks have none
    # latent: L tokens x H channels
    num_latent_tokens: int = 128
    latent_dim: int = 32
    bottleneck: str = "ae"  # plain AE (MAETok). A KL bottleneck (MacTok) plugs into MAETok.bottleneck
    # 2D RoPE on image tokens: 'mixed' (learnable per-head 2D frequencies, official) or 'axial'
    rope: str = "mixed"
    rope_theta: float = 10.0
    # initial scale of the decoders' latent modulation (the bias of its scale outputs). Official: 0, so the
    # latent positions enter every sublayer as zeros and the image only sees z once the modulation has grown
    # (B.4); 1 starts it as the identity, like DiT's "1 + scale"
    mod_scale_init: float = 0.0
    # masking: one ratio per batch from a truncated normal on [mask_ratio_min, mask_ratio], peak at mask_ratio
    mask_ratio: float = 0.6
    mask_ratio_min: float = 0.4
    mask_ratio_std: float = 0.25
    # auxiliary shallow decoders (official: width 192, depth 3, 3 heads, with a cls token)
    aux_targets: tuple = ("hog",)
    aux_width: int = 192
    aux_depth: int = 3
    aux_heads: int = 3
    # output dims of pluggable feature targets (DINOv2-L width, SigLIP SO400M width); HOG's is computed
    feature_dims: dict = field(default_factory=lambda: {"dinov2": 1024, "siglip": 1152})

    @property
    def grid_size(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size ** 2


# ----------------------------------------------------------------------------------------------------------
# patchify / positions

def patchify(x, p):
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, features ordered (p, q, c) as the official 'nhwpqc'."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)                               # (B, C, h, p, w, q)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, h, w, C=3):
    """(B, N, p*p*C) -> (B, C, h*p, w*p); inverse of patchify."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, C)                                           # (B, h, w, p, q, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * p, w * p)


def grid_positions(h, w, device=None):
    """Integer (x, y) patch coordinates of a row-major h x w grid: (h*w, 2); x = i mod w, y = i div w."""
    i = torch.arange(h * w, device=device)
    return torch.stack([i % w, i // w], dim=-1).float()


# ----------------------------------------------------------------------------------------------------------
# 2D RoPE (official rope_utils.py). Both variants are "phase = x*fx + y*fy" per complex pair; they differ only
# in the frequency table: axial puts half the pairs on x and half on y, mixed learns a 2D direction per pair.

def rope_frequencies(heads, head_dim, theta, mixed, generator=None):
    """(heads, head_dim/2, 2) frequency vectors (fx, fy) for each rotated pair."""
    k = torch.arange(head_dim // 4, dtype=torch.float32)
    mag = theta ** (-4 * k / head_dim)                                        # (head_dim/4,) 1 ... theta^-1
    if mixed:  # RoPE-Mixed (Heo et al. 2024): a random angle per head, the second half rotated by pi/2
        a = torch.rand(heads, 1, generator=generator) * 2 * math.pi           # (heads, 1)
        f1 = torch.stack([torch.cos(a) * mag, torch.sin(a) * mag], -1)        # (heads, hd/4, 2)
        f2 = torch.stack([torch.cos(a + math.pi / 2) * mag, torch.sin(a + math.pi / 2) * mag], -1)
        return torch.cat([f1, f2], dim=1)                                     # (heads, hd/2, 2)
    zero = torch.zeros_like(mag)
    fx, fy = torch.stack([mag, zero], -1), torch.stack([zero, mag], -1)       # (hd/4, 2) each: [x-part, y-part]
    return torch.cat([fx, fy], dim=0).expand(heads, -1, -1).clone()


def apply_rope(x, angles):
    """Rotate consecutive (even, odd) pairs of x (B, h, N, hd) by angles (h, N, hd/2); in fp32 as official."""
    xf = x.float().unflatten(-1, (-1, 2))                                     # (B, h, N, hd/2, 2)
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class RoPE2D(nn.Module):
    def __init__(self, heads, head_dim, theta, mixed):
        super().__init__()
        assert head_dim % 4 == 0, "2D RoPE needs head_dim divisible by 4"
        freqs = rope_frequencies(heads, head_dim, theta, mixed)
        if mixed:  # learnable, excluded from weight decay (official)
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, pos):
        """pos (N, 2) -> angles (heads, N, head_dim/2), computed in fp32."""
        return torch.einsum("nd,hkd->hnk", pos.float(), self.freqs.float())


# ----------------------------------------------------------------------------------------------------------
# ViT parts

class Attention(nn.Module):
    def __init__(self, dim, heads, rope=None, theta=10.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = RoPE2D(heads, dim // heads, theta, rope == "mixed") if rope else None

    def forward(self, x, pos=None, span=(0, 0)):
        """x (B, T, D); pos (N, 2) are the grid coordinates of tokens span[0]:span[1], the only ones rotated."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        if self.rope is not None:
            s, e = span
            angles = self.rope(pos)                                           # (h, N, hd/2)
            q = torch.cat([q[:, :, :s], apply_rope(q[:, :, s:e], angles), q[:, :, e:]], dim=2)
            k = torch.cat([k[:, :, :s], apply_rope(k[:, :, s:e], angles), k[:, :, e:]], dim=2)
        # the official code falls back to explicit softmax attention with RoPE; SDPA is exact and fast
        x = F.scaled_dot_product_attention(q, k, v)                            # (B, h, T, hd)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, approximate="none"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.approximate = approximate  # exact GELU (timm default); 'tanh' where an official model uses it

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class LayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN ViT block with LayerScale (encoder; DINOv2 architecture, LN eps 1e-6)."""

    def __init__(self, dim, heads, mlp_ratio, rope, theta, ls_init):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, rope, theta)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ls1, self.ls2 = LayerScale(dim, ls_init), LayerScale(dim, ls_init)

    def forward(self, x, pos, span):
        x = x + self.ls1(self.attn(self.norm1(x), pos, span))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ModulatedBlock(nn.Module):
    """Official MoVQBlockv2: after each (non-affine) LN, the L latent positions (the last L tokens) are set to
    scale * x + shift, where (shift, scale) come from SiLU -> Linear(H -> 4D) of that token's raw latent.
    Zero-initialised, so latent positions enter every sublayer as zeros at init. Image tokens are untouched."""

    def __init__(self, dim, heads, mlp_ratio, latent_dim, rope, theta):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads, rope, theta)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 4 * dim))

    @staticmethod
    def modulate(x, shift, scale):
        L = shift.shape[1]
        return torch.cat([x[:, :-L], x[:, -L:] * scale + shift], dim=1)      # no "1 +": official

    def forward(self, x, z, pos, span):
        shift1, scale1, shift2, scale2 = self.ada(z).chunk(4, dim=-1)        # (B, L, D) each
        x = x + self.attn(self.modulate(self.norm1(x), shift1, scale1), pos, span)
        return x + self.mlp(self.modulate(self.norm2(x), shift2, scale2))


# ----------------------------------------------------------------------------------------------------------
# HOG target (official utils/hog.py, from MaskFeat / SlowFast), generalised to any size and patch size

class HOG(nn.Module):
    """Per RGB channel on the [-1, 1] image: Sobel gradients, 9 unsigned orientation bins (hard assignment),
    magnitudes weighted by a tiled 16x16 Gaussian window (std 8), summed over `pool`-px cells, L2-normalised
    over the bins. tokens() gives 3 * 9 * (patch/pool)^2 dims per patch: 108 for patch 16 (official)."""

    def __init__(self, nbins=9, pool=8, window=16, std=8.0):
        super().__init__()
        self.nbins, self.pool, self.window = nbins, pool, window
        kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("weight_x", kx.view(1, 1, 3, 3).repeat(3, 1, 1, 1), persistent=False)
        self.register_buffer("weight_y", kx.t().contiguous().view(1, 1, 3, 3).repeat(3, 1, 1, 1), persistent=False)
        n = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
        w = torch.exp(-0.5 * (n / std) ** 2)
        g = torch.outer(w, w)
        self.register_buffer("gaussian_kernel", g / g.sum(), persistent=False)

    def dim(self, patch_size):
        return 3 * self.nbins * (patch_size // self.pool) ** 2

    @torch.no_grad()
    def forward(self, x):
        """x (B, 3, H, W) in [-1, 1] -> cells (B, 3, nbins, H/pool, W/pool)."""
        x = x.float()
        B, C, H, W = x.shape
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(x, self.weight_x, groups=3)
        gy = F.conv2d(x, self.weight_y, groups=3)
        mag = torch.stack([gx, gy], dim=-1).norm(dim=-1)                     # (B, 3, H, W)
        phase = torch.atan2(gx, gy) / math.pi * self.nbins                   # argument order as official
        k = self.window
        g = self.gaussian_kernel.repeat(-(-H // k), -(-W // k))[:H, :W]       # tiled window, cropped
        out = torch.zeros(B, C, self.nbins, H, W, device=x.device)
        out.scatter_add_(2, phase.floor().long().remainder(self.nbins).unsqueeze(2), (mag * g).unsqueeze(2))
        p = self.pool
        cells = out.unfold(3, p, p).unfold(4, p, p).sum(dim=[-1, -2])        # (B, 3, nbins, H/p, W/p)
        return F.normalize(cells, p=2, dim=2)

    def tokens(self, x, patch_size):
        """Official _reshape with u = patch/pool cells per patch side: (B, N, 27*u*u), row-major patches,
        feature index (channel*9 + bin)*u*u + dy*u + dx."""
        u = patch_size // self.pool
        f = self(x).flatten(1, 2)                                             # (B, 27, Hc, Wc)
        f = f.permute(0, 2, 3, 1).unfold(1, u, u).unfold(2, u, u)             # (B, Hc/u, Wc/u, 27, u, u)
        return f.flatten(1, 2).flatten(2)


# ----------------------------------------------------------------------------------------------------------
# encoder and decoders

class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        D, N, L = cfg.enc_width, cfg.num_patches, cfg.num_latent_tokens
        self.patch_embed = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        # the official encoder always adds timm's learned APE over [cls; patches] (B.2), on top of RoPE
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + N, D))
        self.latent_tokens = nn.Parameter(torch.zeros(1, L, D))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, L, D))
        self.blocks = nn.ModuleList(Block(D, cfg.enc_heads, cfg.mlp_ratio, cfg.rope, cfg.rope_theta,
                                          cfg.layerscale_init) for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.to_latent = nn.Linear(D, cfg.latent_dim)                         # official quant_conv
        self.register_buffer("pos", grid_positions(cfg.grid_size, cfg.grid_size), persistent=False)

    def forward(self, x, mask=None):
        """x (B, 3, H, W), mask (B, N) bool (True = masked) or None -> h (B, L, H)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)                    # (B, N, D)
        if mask is not None:  # masked patches become the mask token before any position handling
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        B, N, _ = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        x = torch.cat([x, (self.latent_tokens + self.latent_pos_embed).expand(B, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x, self.pos, (1, 1 + N))                                  # RoPE on image tokens only
        L = self.latent_tokens.shape[1]
        return self.to_latent(self.norm(x[:, -L:]))                           # (B, L, H)


class Decoder(nn.Module):
    """Pixel decoder (out_dim = p*p*3) and, with fewer/narrower layers, the auxiliary shallow decoders."""

    def __init__(self, cfg: TokenizerConfig, width, depth, heads, out_dim, cls_token=False):
        super().__init__()
        L = cfg.num_latent_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.from_latent = nn.Linear(cfg.latent_dim, width)                  # official post_quant_conv
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, L, width))
        self.blocks = nn.ModuleList(ModulatedBlock(width, heads, cfg.mlp_ratio, cfg.latent_dim, cfg.rope,
                                                   cfg.rope_theta) for _ in range(depth))
        # official MoVQNorm also modulates the latent positions of the final norm, but only the patch slice
        # is read out, so that modulation cannot change the output: a plain non-affine LN is equivalent
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.head = nn.Linear(width, out_dim)
        self.num_patches = cfg.num_patches
        self.register_buffer("pos", grid_positions(cfg.grid_size, cfg.grid_size), persistent=False)

    def forward(self, z):
        """z (B, L, H) -> (B, N, out_dim) per-patch predictions."""
        B, N = z.shape[0], self.num_patches
        parts = [self.mask_token.expand(B, N, -1), self.from_latent(z) + self.latent_pos_embed]
        if self.cls_token is not None:
            parts.insert(0, self.cls_token.expand(B, -1, -1))
        x = torch.cat(parts, dim=1)                                           # (B, [1]+N+L, D)
        s = 1 if self.cls_token is not None else 0
        for blk in self.blocks:
            x = blk(x, z, self.pos, (s, s + N))
        return self.head(self.norm(x[:, s:s + N]))                            # (B, N, out_dim)


# ----------------------------------------------------------------------------------------------------------
# the tokenizer

def sample_mask_ratio(lo, hi, std, generator=None, device=None):
    """One ratio from a normal(loc=hi, scale=std) truncated to [lo, hi] (official scipy truncnorm), drawn by
    inverse CDF from the torch RNG so that it is restored on resume."""
    a = torch.special.ndtr(torch.tensor((lo - hi) / std, dtype=torch.float64))
    u = a + (0.5 - a) * torch.rand((), generator=generator, dtype=torch.float64, device=device).cpu()
    return float(min(max(hi + std * torch.special.ndtri(u), lo), hi))  # Phi(0) = 0.5 is the upper bound


def random_mask(B, N, ratio, device=None, generator=None):
    """(B, N) bool, exactly ceil(N * ratio) True per row, positions independent per sample."""
    n = math.ceil(N * ratio - 1e-9)
    noise = torch.rand(B, N, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank < n


class MAETok(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, cfg.dec_width, cfg.dec_depth, cfg.dec_heads, cfg.patch_size ** 2 * 3)
        # HOG cells of 8 px (official); patches smaller than 8 px use one cell per patch
        self.hog = HOG(pool=min(8, cfg.patch_size))
        self.aux = nn.ModuleDict({name: Decoder(cfg, cfg.aux_width, cfg.aux_depth, cfg.aux_heads,
                                                self.target_dim(name), cls_token=True)
                                  for name in cfg.aux_targets})
        self.feature_fns = {}  # name -> callable image (B,3,H,W) in [-1,1] -> (B, N, D); not part of the state
        self.initialize_weights()

    def target_dim(self, name):
        if name == "hog":
            return self.hog.dim(self.cfg.patch_size)
        if name not in self.cfg.feature_dims:
            raise ValueError(f"unknown aux target {name!r}: add its output dim to TokenizerConfig.feature_dims")
        return self.cfg.feature_dims[name]

    def set_feature_target(self, name, fn):
        """Plug in a frozen feature network (DINOv2, SigLIP, ...) for the aux decoder `name`."""
        assert name in self.aux, f"{name!r} is not one of the aux targets {list(self.aux)}"
        self.feature_fns[name] = fn

    def initialize_weights(self):
        def init(m):
            if isinstance(m, nn.Linear):  # timm ViT init
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.apply(init)
        w = self.encoder.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as MAE / DiT: like a Linear
        for name, p in self.named_parameters():
            if name.endswith(("cls_token", "mask_token", "latent_tokens")):
                nn.init.normal_(p, std=0.02)
            elif name.endswith("pos_embed"):
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():  # official: modulation layers are zero-initialised
            if isinstance(m, ModulatedBlock):
                nn.init.zeros_(m.ada[-1].weight)
                nn.init.zeros_(m.ada[-1].bias)
                D = m.ada[-1].bias.shape[0] // 4                              # (shift1, scale1, shift2, scale2)
                m.ada[-1].bias.data.view(4, D)[1::2] = self.cfg.mod_scale_init

    def bottleneck(self, h):
        """The one place where the bottleneck lives. MAETok is a plain AE: no noise, no KL, no normalisation
        after the projection. A KL tokenizer (MacTok) splits h into (mean, logvar) and samples here."""
        return h

    def encode(self, x, mask=None):
        """x (B, 3, H, W) in [-1, 1] -> z (B, L, H). Unmasked unless a mask is given."""
        return self.bottleneck(self.encoder(x, mask))

    def decode(self, z):
        """z (B, L, H) -> image (B, 3, H, W), unbounded (no tanh, as official)."""
        g = self.cfg.grid_size
        return unpatchify(self.decoder(z), self.cfg.patch_size, g, g)

    def sample_mask(self, B, device, mask_ratio=None):
        """Training mask: a given ratio (decoder fine-tuning schedule) or one drawn per batch (official)."""
        c = self.cfg
        if mask_ratio is None:
            mask_ratio = sample_mask_ratio(c.mask_ratio_min, c.mask_ratio, c.mask_ratio_std, device=device)
        return random_mask(B, c.num_patches, mask_ratio, device=device) if mask_ratio > 0 else None

    def aux_loss(self, name, pred, x, mask):
        """Masked-token loss of one aux decoder: HOG MSE, features negative cosine (official)."""
        with torch.no_grad():
            target = self.hog.tokens(x, self.cfg.patch_size) if name == "hog" else self.feature_fns[name](x)
        m = mask.unsqueeze(-1).float()                                        # (B, N, 1)
        if name == "hog":
            return ((pred.float() - target.float()) ** 2 * m).sum() / m.sum() / pred.shape[-1]
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1).unsqueeze(-1)
        return -(cos * m).sum() / m.sum()

    def forward(self, x, mask_ratio=None):
        """x (B, 3, H, W) in [-1, 1] -> (reconstruction, losses dict with 'loss' = total, mask (B, N) or None).
        Masks only in training mode."""
        mask = self.sample_mask(x.shape[0], x.device, mask_ratio) if self.training else None
        z = self.encode(x, mask)                                              # (B, L, H)
        x_rec = self.decode(z)                                                # (B, 3, H, W)
        losses = {"pixel": F.mse_loss(x_rec.float(), x.float())}              # all pixels (official)
        if mask is not None:
            for name, dec in self.aux.items():
                losses[name] = self.aux_loss(name, dec(z), x, mask)
        losses["loss"] = sum(losses.values())
        return x_rec, losses, mask


# ----------------------------------------------------------------------------------------------------------
# presets

PRESETS = {
    # paper: ViT-B encoder and pixel decoder (~176M), 256 px, patch 16, 128 tokens x 32 channels
    "MAETok-B-128": dict(),
    # CPU: 32 px, patch 4 (64 patches), 32 tokens x 8 channels. Two inits differ from the official ones so that
    # it learns in a CPU budget (measured on the built-in data, batch 32): LayerScale starts at 0.1, not 1e-5
    # (with 1e-5 the encoder output ignores the image for hundreds of steps: pixel MSE 0.200 vs 0.164 at step
    # 400), and the decoder's latent modulation starts at scale 1, not 0 (with 0 the decoder sits on a
    # mean-colour plateau, pixel MSE 0.087 at step 400 unmasked, against 0.028)
    # Wide and shallow (160 x 2 layers, not 128 x 4): in 4 CPU minutes (1000 steps) its reconstructions are
    # classified at 43% against 35% (192 x 2: 44%, 256 x 2: 34%, 256 x 1: 40%, 96 x 4: 30%, same wall-clock;
    # measured on the earlier built-in class set)
    "tiny": dict(image_size=32, patch_size=4, enc_width=160, enc_depth=2, enc_heads=4, dec_width=160,
                 dec_depth=2, dec_heads=4, num_latent_tokens=32, latent_dim=8, aux_width=64, aux_depth=2,
                 aux_heads=2, layerscale_init=0.1, mod_scale_init=1.0),
}


def from_checkpoint(ckpt, ema=True):
    """A trained tokenizer (aux decoders dropped) in eval mode from a train_tokenizer.py checkpoint dict;
    EMA weights by default, or a released-style dict holding only `ema`."""
    cfg = TokenizerConfig(**{**ckpt["config"], "aux_targets": ()})
    sd = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    model = MAETok(cfg)
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("aux.")})
    return model.eval().requires_grad_(False)


def make_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose one of {sorted(PRESETS)}")
    return TokenizerConfig(**{**PRESETS[preset], **overrides})
