"""
ViT parts that every network of nanotok shares: the tokenizers (tokenizer.py), the pretrained DINO / DINOv2
trunks (pretrained.py) and the SiT / LightningDiT denoisers (diffusion.py).

  Attention   fused qkv -> optional QK-norm -> optional rotary embedding -> F.scaled_dot_product_attention
  RoPE2D      2D RoPE on a span of grid tokens: 'mixed' (learnable 2D frequencies, Heo et al. 2024, the MAETok
              official rope_utils.py) or 'axial'; interleaved (even, odd) pairs, angles in fp32
  RoPETable   RoPE from precomputed cos / sin tables (LightningDiT VisionRotaryEmbeddingFast)
  MLP, SwiGLU, LayerScale, Block (pre-norm, optional LayerScale); patchify / unpatchify
Parameter names follow the official checkpoints (qkv, proj, fc1/fc2, w12/w3, ls1.gamma, q_norm, k_norm) so
that official weights load strictly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def grid_positions(h, w, device=None):
    """Integer (x, y) patch coordinates of a row-major h x w grid: (h*w, 2); x = i mod w, y = i div w."""
    i = torch.arange(h * w, device=device)
    return torch.stack([i % w, i // w], dim=-1).float()


class PatchGrid:
    """The patch grid of a config with image_size and patch_size (every tokenizer family's config)."""

    @property
    def grid_size(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size ** 2


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


# ----------------------------------------------------------------------------------------------------------
# rotary embeddings. Both 2D variants are "phase = x*fx + y*fy" per complex pair; they differ only in the
# frequency table: axial puts half the pairs on x and half on y, mixed learns a 2D direction per pair.

def rope_frequencies(heads, head_dim, theta, mixed, generator=None):
    """(heads, head_dim/2, 2) frequency vectors (fx, fy) for each rotated pair."""
    k = torch.arange(head_dim // 4, dtype=torch.float32)
    mag = theta ** (-4 * k / head_dim)                                        # (head_dim/4,) 1 ... theta^-1
    if mixed:  # RoPE-Mixed: a random angle per head, the second half rotated by pi/2
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
    def __init__(self, heads, head_dim, theta=10.0, mixed=True):
        super().__init__()
        assert head_dim % 4 == 0, "2D RoPE needs head_dim divisible by 4"
        freqs = rope_frequencies(heads, head_dim, theta, mixed)
        if mixed:  # learnable, excluded from weight decay (official)
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs, persistent=False)

    def angles(self, pos):
        """pos (N, 2) -> angles (heads, N, head_dim/2). In fp32 with autocast off: under bf16 the einsum would
        round the phases (0.09 rad error at 256 px, 0.21 rad at 512 px), the official code keeps them fp32."""
        with torch.autocast(pos.device.type, enabled=False):
            return torch.einsum("nd,hkd->hnk", pos.float(), self.freqs.float())

    def forward(self, q, k, pos, span):
        """Rotate q, k (B, h, T, hd) at the tokens span[0]:span[1], whose grid coordinates are pos (N, 2)."""
        s, e = span
        a = self.angles(pos)                                                  # (h, N, hd/2)
        q = torch.cat([q[:, :, :s], apply_rope(q[:, :, s:e], a), q[:, :, e:]], dim=2)
        k = torch.cat([k[:, :, :s], apply_rope(k[:, :, s:e], a), k[:, :, e:]], dim=2)
        return q, k


class RoPETable(nn.Module):
    """RoPE from precomputed (cos, sin) tables (N, hd) on interleaved pairs, (u0, u1) -> (-u1, u0), as
    LightningDiT's EVA VisionRotaryEmbeddingFast: u * cos + rotate_pairs(u) * sin."""

    def forward(self, q, k, cos, sin):
        def rot(x):
            x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)                      # (B, h, N, hd/2) each
            return (x * cos + torch.stack([-x1, x0], dim=-1).flatten(-2) * sin).type_as(x)
        return rot(q), rot(k)


# ----------------------------------------------------------------------------------------------------------
# attention, feed-forward, block

class Attention(nn.Module):
    """Multi-head self-attention on SDPA (flash / memory-efficient kernels on GPU). `rope` is a module
    (RoPE2D, RoPETable) called as rope(q, k, *rope_args), or a zero-argument factory of one, called after qkv
    and proj exist: RoPE-Mixed draws its frequencies at construction, and drawing them after the Linears keeps
    the seeded initialisation of the tokenizers as it was. QK-norm is RMSNorm per head (LightningDiT)."""

    def __init__(self, dim, heads, rope=None, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope() if callable(rope) and not isinstance(rope, nn.Module) else rope
        hd = dim // heads
        self.q_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x, *rope_args):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, k, *rope_args)
            q, k = q.type_as(v), k.type_as(v)
        # the official MAETok code falls back to explicit softmax attention with RoPE; SDPA is exact and fast
        x = F.scaled_dot_product_attention(q, k, v)                            # (B, h, T, hd)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, approximate="none"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.approximate = approximate  # exact GELU (timm default); 'tanh' in DiT and the DINO-disc trunk

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """w3(silu(x W1) * x W2) with W1, W2 packed in w12 (DINOv2 SwiGLUFFNFused, LightningDiT); the caller
    chooses the hidden width (DINOv2 rounds 2/3 * 4D up to a multiple of 8, LightningDiT truncates)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN ViT block (LN eps 1e-6), LayerScale when ls_init is given (DINOv2, the MAETok encoder).
    ffn: a module of the caller's (SwiGLU), or None for the GELU MLP of width mlp_ratio * dim."""

    def __init__(self, dim, heads, mlp_ratio=4.0, rope=None, ls_init=None, ffn=None, gelu="none", qk_norm=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, rope, qk_norm)
        self.mlp = ffn if ffn is not None else MLP(dim, int(dim * mlp_ratio), approximate=gelu)
        self.ls1 = LayerScale(dim, ls_init) if ls_init is not None else nn.Identity()
        self.ls2 = LayerScale(dim, ls_init) if ls_init is not None else nn.Identity()

    def forward(self, x, *rope_args):
        x = x + self.ls1(self.attn(self.norm1(x), *rope_args))
        return x + self.ls2(self.mlp(self.norm2(x)))
