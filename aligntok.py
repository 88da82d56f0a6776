"""
AlignTok's conv parts: the LDM / VA-VAE convolutional autoencoder (Rombach et al. 2022; VA-VAE, Yao et al. 2025,
github.com/hustvl/LightningDiT vavae/ldm/modules/diffusionmodules/model.py at 2725fed), with the official
state-dict names so that a VA-VAE checkpoint loads.

"Aligning Visual Foundation Encoders to Tokenizers for Diffusion Models" (AlignTok) reuses VA-VAE's decoder:
post_quant_conv (1x1, 32 -> 32) + Decoder(z 32, ch 128, ch_mult (1, 1, 2, 2, 4), 2 res-blocks, attention at
16 x 16) = 41,417,603 + 1,056 parameters (docs/fidelity.md c.1). The VA-VAE encoder is here too: it is
the conv encoder of the 2D-grid baselines.

  ResnetBlock   GroupNorm(32, 1e-6) -> swish -> 3x3 conv, twice; 1x1 nin_shortcut when the width changes; no temb
  AttnBlock     one head over the H*W positions, 1x1 q / k / v / proj_out, residual
  Encoder       conv_in -> levels (blocks [+ attn], Downsample = pad (0, 1, 0, 1) + 3x3 stride-2 conv) -> mid -> out
  Decoder       conv_in -> mid (block, attn, block) -> levels from the lowest resolution (blocks + 1 [+ attn],
                Upsample = nearest x2 + 3x3 conv) -> norm_out -> swish -> conv_out; no tanh. `up.0` is the
                full-resolution level and runs last (the official code prepends each level)
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from discriminator import LOGGED_TERMS, adaptive_terms
from pretrained import IMAGENET_MEAN, IMAGENET_STD, DinoViT, dinov2_config
from proxy import ProxyConfig, ProxyNet
from vit import PatchGrid


@dataclass
class LDMConfig:
    z_channels: int = 32
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    resolution: int = 256  # fixes where attention goes: the level at resolution / 2^i in attn_resolutions
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True   # the encoder's conv_out gives mean and log-variance (a KL-VAE)
    norm_groups: int = 32   # GroupNorm groups (LDM / VA-VAE / SD-VAE: 32)


def norm(c, groups=32):
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups=32):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, c, groups=32):
        super().__init__()
        self.norm = norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)                         # scale C^-1/2, as official
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))                            # asymmetric pad (official)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or the decoder: `block`, `attn` and `downsample` / `upsample`."""

    def __init__(self, blocks, attn, resample=None, name=None):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
        if resample is not None:
            setattr(self, name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, x):
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


def mid_block(c, groups=32):
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)
    return m


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2 z or z, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, cfg: LDMConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, c_in, res, g = [], cfg.ch, cfg.resolution, cfg.norm_groups
        for i, m in enumerate(cfg.ch_mult):
            c_out = cfg.ch * m
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks)]
            attn = [AttnBlock(c_out, g) for _ in blocks] if res in cfg.attn_resolutions else []
            last = i == len(cfg.ch_mult) - 1
            levels.append(Level(blocks, attn, None if last else Downsample(c_out), "downsample"))
            c_in, res = c_out, res if last else res // 2
        self.down = nn.ModuleList(levels)
        self.mid = mid_block(c_in, g)
        self.norm_out = norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        m = self.mid
        h = m.block_2(m.attn_1(m.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z, h, w) -> (B, 3, h 2^(L-1), w 2^(L-1))."""

    def __init__(self, cfg: LDMConfig):
        super().__init__()
        L = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res, g = cfg.resolution // 2 ** (L - 1), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = mid_block(c, g)
        levels = [None] * L
        for i in reversed(range(L)):  # lowest resolution first; stored at index i (official `up.insert(0, ...)`)
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(c_out, g) for _ in blocks] if res in cfg.attn_resolutions else []
            levels[i] = Level(blocks, attn, Upsample(c_out) if i else None, "upsample")
            c, res = c_out, res * 2 if i else res
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        m = self.mid
        h = m.block_2(m.attn_1(m.block_1(h)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """VA-VAE's inference wrapper (tokenizer/autoencoder.py): quant_conv, post_quant_conv, Gaussian posterior
    with the log-variance clamped to [-30, 20]. Latents here are NCHW, as the official code's."""

    def __init__(self, cfg: LDMConfig, embed_dim=32):
        super().__init__()
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, cfg.z_channels, 1)

    def moments(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


VAVAE_F16D32 = LDMConfig()  # tokenizer/configs/vavae_f16d32.yaml: the decoder AlignTok reuses


@dataclass
class VAVAEConfig(PatchGrid):
    """An LDM KL autoencoder as a tokenizer of the chain, from released weights only (nanotok does not train it):
    VA-VAE (family 'vavae', LightningDiT's), or a diffusers AutoencoderKL release (family 'autoencoderkl': SD-VAE,
    the tokenizer of DiT / SiT / REPA, and its exports), the same network under other names (released.py)."""
    family: str = "vavae"
    image_size: int = 256
    patch_size: int = 16          # 2^(levels - 1): f16
    latent_dim: int = 32          # embed_dim
    z_channels: int = 32
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    norm_groups: int = 32
    force_upcast: bool = False    # diffusers' flag: encode and decode in fp32 whatever the caller's autocast

    @property
    def ldm(self):
        return LDMConfig(z_channels=self.z_channels, ch=self.ch, ch_mult=tuple(self.ch_mult),
                         num_res_blocks=self.num_res_blocks, attn_resolutions=tuple(self.attn_resolutions),
                         resolution=self.image_size, norm_groups=self.norm_groups)


class VAVAE(AutoencoderKL):
    """The released VA-VAE behind the tokenizer interface, for LightningDiT's released denoisers: encode gives
    the posterior mean as (B, H*W, C) on its grid (the official extract_features.py caches a posterior sample;
    nanotok caches means, DESIGN.md), decode takes the grid back to NCHW."""

    TRAIN_ONLY_PARAMS = ()

    def __init__(self, cfg: VAVAEConfig):
        super().__init__(cfg.ldm, embed_dim=cfg.latent_dim)
        self.cfg = cfg

    latent_shape = property(lambda self: (self.cfg.num_patches, self.cfg.latent_dim))
    grid = property(lambda self: (self.cfg.grid_size, self.cfg.grid_size))
    image_size = property(lambda self: self.cfg.image_size)

    def precision(self, x):
        """fp32 inside when the release asks for it (diffusers' force_upcast), else the caller's autocast."""
        return torch.autocast(x.device.type, enabled=False) if self.cfg.force_upcast else nullcontext()

    def moments(self, x):
        """The posterior's mean and log-variance as tokens, (B, H*W, C) each (what a KL tokenizer reports)."""
        with self.precision(x):
            x = x.float() if self.cfg.force_upcast else x
            return tuple(t.flatten(2).transpose(1, 2) for t in super().moments(x))

    def encode(self, x, mask=None):
        return self.moments(x)[0]                                            # (B, H*W, C)

    def decode(self, z):
        g = self.cfg.grid_size
        with self.precision(z):
            z = z.float() if self.cfg.force_upcast else z
            return super().decode(z.transpose(1, 2).unflatten(2, (g, g)))  # (B, 3, H, W)

    def forward(self, x, mask=None, teacher=None):
        raise NotImplementedError("nanotok does not train VA-VAE (its VF loss is not here); it loads the release")


# ----------------------------------------------------------------------------------------------------------
# AlignTok: a foundation encoder -> per-token adapter -> VA-VAE's conv decoder; z (B, H*W, C) on a grid

@dataclass
class AlignTokConfig(PatchGrid):
    family: str = "aligntok"
    image_size: int = 256
    patch_size: int = 16          # pixels per latent cell: f16, a 16 x 16 grid at 256 px
    # 'dinov2': the paper's ViT-L/14 on the image resized to grid * 14 (224 at 256 px: 16 x 16 tokens); 'proxy':
    # offline, the proxy classifier's stages 1-3 (a stride-4 grid), always reported by name
    encoder: str = "dinov2"
    dinov2_arch: str = "vitl14"
    proxy_width: int = 16
    enc_dim: int = 1024
    adapter_hidden: int = 1024    # [CHOICE] the paper's 2-layer MLP width and activation (GELU) are not given
    latent_dim: int = 32          # no KL (the paper: it only constrains the distribution)
    dec_ch: int = 128
    dec_ch_mult: tuple = (1, 1, 2, 2, 4)
    dec_res_blocks: int = 2
    dec_attn: tuple = (16,)

    @property
    def ldm(self):
        return LDMConfig(z_channels=self.latent_dim, ch=self.dec_ch, ch_mult=tuple(self.dec_ch_mult),
                         num_res_blocks=self.dec_res_blocks, attn_resolutions=tuple(self.dec_attn),
                         resolution=self.image_size)


class DINOv2Encoder(nn.Module):
    """Trainable DINOv2 (stage 2): [-1, 1] images resized to grid * 14 (bicubic; 224 for the paper's 16 x 16 grid at
    256 px) and ImageNet-normalised -> the final-norm patch tokens (B, grid^2, D); cls and registers dropped. The
    resize follows the latent grid, so every image size that is a multiple of the patch size works."""

    def __init__(self, arch, grid=16):
        super().__init__()
        self.vit, self.size = DinoViT(dinov2_config(arch)), grid * 14
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.vit.forward_features(x)["x_norm_patchtokens"]


class ProxyEncoder(nn.Module):
    """The proxy CNN's stages 1-3 as the offline "foundation encoder": (B, 4 w, s / 4, s / 4) -> tokens. Its
    BatchNorms stay in eval mode when it is fine-tuned ([CHOICE]: the running statistics are the pretrained ones)."""

    def __init__(self, width):
        super().__init__()
        self.trunk = ProxyNet(ProxyConfig(width=width)).trunk[:18]           # stages 1-3 of proxy.ProxyNet

    def train(self, mode=True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x):
        return self.trunk(x).flatten(2).transpose(1, 2)                      # (B, N, 4 w)


class AlignTok(nn.Module):
    """encode: E_p(x) (B, N, D) -> adapter (per token 2-layer MLP) -> z (B, N, C); decode: z on its grid ->
    post_quant_conv -> LDM decoder. forward: the L1 reconstruction term (the trainer adds LPIPS, the GAN and the
    semantic-preservation term)."""

    TRAIN_ONLY_PARAMS = ()

    def __init__(self, cfg: AlignTokConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = (DINOv2Encoder(cfg.dinov2_arch, cfg.grid_size) if cfg.encoder == "dinov2"
                        else ProxyEncoder(cfg.proxy_width))
        self.adapter = nn.Sequential(nn.Linear(cfg.enc_dim, cfg.adapter_hidden), nn.GELU(),
                                     nn.Linear(cfg.adapter_hidden, cfg.latent_dim))
        self.post_quant_conv = nn.Conv2d(cfg.latent_dim, cfg.latent_dim, 1)
        self.decoder = Decoder(cfg.ldm)

    latent_shape = property(lambda self: (self.cfg.num_patches, self.cfg.latent_dim))
    grid = property(lambda self: (self.cfg.grid_size, self.cfg.grid_size))
    image_size = property(lambda self: self.cfg.image_size)

    # where the adaptive weights are measured: the GAN's at the decoder's conv_out (VA-VAE), L_sp's at the
    # adapter's last Linear, which makes z ([CHOICE] for the paper's "last layer of the encoder")
    last_layer = property(lambda self: self.decoder.conv_out.weight)
    encoder_last_layer = property(lambda self: self.adapter[-1].weight)

    def frozen(self):
        """Parameters no stage trains (DDP needs a gradient for every trained one): DINOv2's own mask token, kept
        so that the official checkpoint loads strictly; AlignTok never masks."""
        return ("encoder.vit.mask_token",) if self.cfg.encoder == "dinov2" else ()

    def encode(self, x, mask=None):
        return self.adapter(self.encoder(x))                                 # (B, N, C)

    def decode(self, z):
        g = self.cfg.grid_size
        return self.decoder(self.post_quant_conv(z.transpose(1, 2).unflatten(2, (g, g))))

    def sample_mask(self, B, device, ratio=None, teacher=None):
        return None

    def teach(self, x):
        return None

    def forward(self, x, mask=None, teacher=None):
        z = self.encode(x)
        rec = self.decode(z)
        pixel = F.l1_loss(rec.float(), x.float())
        return {"pixel": pixel, "loss": pixel, "rec": rec, "z": z}


def semantic_preservation(model, ref, x, z, nll, weight):
    """AlignTok's L_sp = ||z - z_ref||^2 (mean) against the frozen stage-1 model, times its adaptive weight
    ||grad nll|| / (||grad L_sp|| + 1e-4) at the adapter's last layer, clamped to [0, 1e8] (VA-VAE's VF clamp):
    0, not NaN, at the first step of stage 2 where L_sp = 0."""
    with torch.no_grad():
        z_ref = ref.encode(x)
    sp = (z.float() - z_ref.float()).pow(2).mean()
    w = model.encoder_last_layer
    g_nll, = torch.autograd.grad(nll, w, retain_graph=True)
    g_sp, = torch.autograd.grad(sp, w, retain_graph=True, allow_unused=False)
    a = adaptive_terms(g_nll, g_sp, max_weight=1e8)
    return weight * a["weight"] * sp, {"sp": sp.detach(), "sp_lambda": a["weight"],
                                       **{f"sp_lambda_{k}": a[k] for k in LOGGED_TERMS}}


PRESETS = {
    # the paper's ImageNet tokenizer: DINOv2-L/14 (304M), adapter 1024 -> 1024 -> 32, VA-VAE f16d32's decoder
    "AlignTok-L-f16d32": dict(family="aligntok"),
    # the 64-channel variant (Tab. 3 / 7): adapter 1024 -> 1024 -> 64, the decoder's z 64 wide
    "AlignTok-L-f16d64": dict(family="aligntok", latent_dim=64),
    # CPU (docs/fidelity.md c.7): 32 px, the proxy's stride-4 grid (8 x 8), adapter 64 -> 64 -> 8, a small LDM decoder
    # (ch 32, ch_mult (1, 2, 2), 2 res-blocks, attention at 8 x 8)
    "AlignTok-tiny": dict(family="aligntok", image_size=32, patch_size=4, encoder="proxy", enc_dim=64,
                          adapter_hidden=64, latent_dim=8, dec_ch=32, dec_ch_mult=(1, 2, 2), dec_attn=(8,)),
}


# ----------------------------------------------------------------------------------------------------------
# training stages (tokenizer.Stage fields), what inference drops, and the recipes of the presets

# 1 latent alignment (encoder frozen), 2 perceptual alignment (everything, + the semantic-preservation loss against
# the stage-1 model), 3 decoder refinement (the latent frozen); `scratch` is the baseline: the same network, a
# random encoder, everything trained from step 0 (docs/fidelity.md c.3)
STAGES = {
    "align": dict(trains=("adapter.", "post_quant_conv.", "decoder."), keep_aux=True, mask="none", init=False),
    "perceptual": dict(trains=("",), keep_aux=True, mask="none", init=True),
    "decoder": dict(trains=("post_quant_conv.", "decoder."), keep_aux=True, mask="none", init=True),
    "scratch": dict(trains=("",), keep_aux=True, mask="none", init=False),
}
INFERENCE_CONFIG = dict()  # nothing of AlignTok (or of VA-VAE / AutoencoderKL releases) is training-only
# docs/fidelity.md c.2-c.3, c.7: L1 + LPIPS + the PatchGAN at 0.5 x adaptive (VA-VAE); constant lr; EMA used
# for inference in stages 2 and 3 (stage 1 keeps the raw weights: decay 0, and stage 2's L_sp reference is them)
_AT = dict(global_batch_size=64, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, disc="patchgan",
           disc_weight=0.5, lecam_weight=0.0, cr_weight=0.0, perceptual_warmup=0, aux_targets="", crop="short_random",
           beta1=0.5, beta2=0.9, disc_betas="0.5,0.9")  # VA-VAE's Adam for G and D; short side 256 + a random crop
_AT_TINY = dict(global_batch_size=64, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, disc="none",
                perceptual_weight=0.0, aux_targets="", log_every=50, grid_every=-1, eval_images=500)
RECIPES = {
    "AlignTok-L-f16d32": {"align": {**_AT, "max_steps": 120_000, "lr": 1e-4, "disc_start": 5000, "ema_decay": 0.0},
                          "perceptual": {**_AT, "max_steps": 220_000, "lr": 1e-5, "disc_start": 0,
                                         "ema_decay": 0.9999, "sp_weight": 1.0},
                          "decoder": {**_AT, "max_steps": 100_000, "lr": 1e-4, "disc_start": 0, "ema_decay": 0.9999},
                          "scratch": {**_AT, "max_steps": 120_000, "lr": 1e-4, "disc_start": 5000, "ema_decay": 0.9999}},
    # the 64-channel variant: 6 / 17 / 11 epochs at batch 64 (20K steps an epoch)
    "AlignTok-L-f16d64": {"align": {**_AT, "max_steps": 120_000, "lr": 1e-4, "disc_start": 5000, "ema_decay": 0.0},
                          "perceptual": {**_AT, "max_steps": 340_000, "lr": 1e-5, "disc_start": 0,
                                         "ema_decay": 0.9999, "sp_weight": 1.0},
                          "decoder": {**_AT, "max_steps": 220_000, "lr": 1e-4, "disc_start": 0, "ema_decay": 0.9999},
                          "scratch": {**_AT, "max_steps": 120_000, "lr": 1e-4, "disc_start": 5000, "ema_decay": 0.9999}},
    "AlignTok-tiny": {"align": {**_AT_TINY, "max_steps": 400, "lr": 1e-3, "ema_decay": 0.0, "eval_every": 400,
                                "ckpt_every": 400},
                      "perceptual": {**_AT_TINY, "max_steps": 400, "lr": 1e-4, "ema_decay": 0.99, "sp_weight": 1.0,
                                     "eval_every": 400, "ckpt_every": 400},
                      "decoder": {**_AT_TINY, "max_steps": 300, "lr": 1e-3, "ema_decay": 0.99, "eval_every": 300,
                                  "ckpt_every": 300},
                      "scratch": {**_AT_TINY, "max_steps": 1100, "lr": 1e-3, "ema_decay": 0.99, "eval_every": 1100,
                                  "ckpt_every": 1100}},
}
