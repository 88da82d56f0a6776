"""
MacTok ("Masked Autoencoding and Representation Alignment...", arXiv 2603.29634; no public
code): a KL 1D tokenizer kept from posterior collapse by masking its image tokens, randomly and where a teacher
looks (DINO-guided semantic masking), with global and local alignment of the latent tokens to the teacher.
What the paper's text lost is reconstructed in docs/fidelity.md section b; each choice is marked there.

  encoder   DINOv2 ViT (pretrained.DinoViT: its blocks, LayerScale, cls, APE over [cls; patches], no RoPE) on
            [cls; N patches (masked = a mask token, before the APE); L latent tokens + 1D pos] -> final LN ->
            latent slice -> Linear(D -> 2C) = (mu, logvar)
  KL        z = mu + sigma * eps in training, mu in encode; KL summed over L * C, mean over the batch
  decoder   plain ViT on [N reconstruction tokens + 1D pos; Linear(C -> D)(z) + 1D pos] -> LN -> Linear(D -> p*p*3)
  masking   per sample r = min(u, r_max); the top floor(r N) of a score per patch (none when r < 1 / N: the paper's
            "occasionally unmasked"): U(0, 1) (random) or the teacher's cosine between its cls and each patch token
            (semantic), chosen per sample with probability p
  align     local: each token repeated N / L times -> MLP -> cosine to the teacher's patch features;
            global: mean token -> MLP -> cosine to the teacher's cls. Heads dropped from released checkpoints.
The teacher (masking and alignment) runs once per step on the unmasked image: `teach(x) -> {cls, patches}`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from maetok import TINY_RECIPE  # the CPU recipe MacTok-tiny shares with MAETok's tiny preset
from pretrained import DinoViT, ViTConfig
from vit import Block, PatchGrid, grid_positions, unpatchify


@dataclass
class MacTokConfig(PatchGrid):
    family: str = "mactok"
    image_size: int = 256
    patch_size: int = 16
    enc_width: int = 768          # MacTok-B: a DINOv2 ViT-B encoder (converted to patch 16 at 256 px)
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0
    layerscale_init: float = 1e-5  # from-scratch blocks (timm DINOv2 architecture); pretrained values otherwise
    encoder_init: str = "dinov2"   # 'dinov2' (paper: weights loaded by the trainer) or 'scratch' (fixed sin-cos APE)
    num_latent_tokens: int = 128
    latent_dim: int = 32
    kl_weight: float = 1e-6        # [LOST] in the paper; the codebase default, with KL summed over L * C
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    # masking (training only): 'image' tokens (paper), 'latent' tokens (appendix control) or 'none'
    mask_tokens: str = "image"
    mask_ratio_max: float = 0.7
    # the law of r ([CHOICE], the paper's range was lost): 'uniform' r = min(u, r_max), u ~ U(0, 1), floor(r N)
    # tokens, so an image stays unmasked with probability 1 / N; 'uniform_zero' the literal clip of U(-r_max, r_max)
    # to [0, r_max]: unmasked with probability 1/2
    mask_ratio_dist: str = "uniform"
    semantic_mask_prob: float = 0.5
    # representation alignment to the teacher: any of 'local', 'global'
    align: tuple = ("local", "global")
    align_weight: float = 0.1
    align_hidden: int = 1024
    teacher_dim: int = 1024        # DINOv2-L (the SoftVQ / MAETok teacher); the proxy's feature_dim offline


def sincos_2d(dim, grid):
    """Fixed 2D sin-cos embedding (MAE): half the dims per axis, (grid^2, dim)."""
    pos = grid_positions(grid, grid)                                          # (N, 2) = (x, y)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    parts = [torch.cat([(p.double()[:, None] * omega).sin(), (p.double()[:, None] * omega).cos()], 1)
             for p in (pos[:, 0], pos[:, 1])]
    return torch.cat(parts, dim=1).float()


def kl_divergence(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) summed over every latent element, averaged over the batch (the codebase's
    normalisation: beside a *mean* pixel MSE this is what lets 1D KL tokenizers collapse; docs/fidelity.md b.3)."""
    return 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum() / mu.shape[0]


def sample_posterior(mu, logvar):
    """z = mu + sigma * eps, eps ~ N(0, I) (the reparameterisation)."""
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu)


MASK_RATIO_DISTS = ("uniform", "uniform_zero")


def draw_mask_ratios(B, r_max, generator=None, dist="uniform"):
    """MacTok's ratio per sample (CPU RNG: no host sync), [CHOICE] for the paper's lost 'uniformly sampled, clipped
    to r_max': 'uniform' r = min(u, r_max), u ~ U(0, 1), so P(r = r_max) = 1 - r_max and r | r < r_max is uniform
    on [0, r_max); 'uniform_zero' r = clip(u, 0, r_max), u ~ U(-r_max, r_max): P(r = 0) = 1/2."""
    u = torch.rand(B, generator=generator)
    if dist == "uniform_zero":
        return (r_max * (2 * u - 1)).clamp(0, r_max)
    return u.clamp(max=r_max)


def top_k_mask(scores, counts):
    """scores (B, N), counts (B,) -> bool (B, N) with the counts[b] highest scores of each row True (ties by
    index, the lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices    # (B, N)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                            .expand_as(order))
    return rank < counts[:, None]


def align_head(c_in, hidden, c_out):
    """The REPA / SoftVQ projector: Linear -> SiLU -> Linear -> SiLU -> Linear."""
    return nn.Sequential(nn.Linear(c_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, c_out))


class MacTokEncoder(nn.Module):
    def __init__(self, cfg: MacTokConfig):
        super().__init__()
        D, L = cfg.enc_width, cfg.num_latent_tokens
        self.vit = DinoViT(ViTConfig(D, cfg.enc_depth, cfg.enc_heads, patch_size=cfg.patch_size,
                                     img_size=cfg.image_size, mlp_ratio=cfg.mlp_ratio))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.latent_tokens = nn.Parameter(torch.zeros(1, L, D))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, L, D))
        self.to_moments = nn.Linear(D, 2 * cfg.latent_dim)

    def forward(self, x, mask=None):
        """x (B, 3, H, W), mask (B, N) bool or None -> moments (B, L, 2C)."""
        v, B = self.vit, x.shape[0]
        t = v.patch_embed(x)                                                  # (B, N, D)
        if mask is not None:  # before the APE, as DINOv2's prepare_tokens_with_masks
            t = torch.where(mask.unsqueeze(-1), self.mask_token.to(t.dtype), t)
        t = torch.cat([v.cls_token.expand(B, -1, -1), t], dim=1) + v.interpolate_pos_encoding(*x.shape[-2:])
        t = torch.cat([t, (self.latent_tokens + self.latent_pos_embed).expand(B, -1, -1)], dim=1)
        for blk in v.blocks:
            t = blk(t)
        L = self.latent_tokens.shape[1]
        return self.to_moments(v.norm(t[:, -L:]))                             # (B, L, 2C)


class MacTokDecoder(nn.Module):
    def __init__(self, cfg: MacTokConfig):
        super().__init__()
        D, N, L = cfg.dec_width, cfg.num_patches, cfg.num_latent_tokens
        self.recon_token = nn.Parameter(torch.zeros(1, 1, D))
        self.recon_pos_embed = nn.Parameter(torch.zeros(1, N, D))
        self.from_latent = nn.Linear(cfg.latent_dim, D)
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, L, D))
        self.blocks = nn.ModuleList(Block(D, cfg.dec_heads, cfg.mlp_ratio, ls_init=cfg.layerscale_init)
                                    for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, cfg.patch_size ** 2 * 3)

    def forward(self, z):
        """z (B, L, C) -> per-patch pixels (B, N, p*p*3)."""
        B, N = z.shape[0], self.recon_pos_embed.shape[1]
        t = torch.cat([(self.recon_token + self.recon_pos_embed).expand(B, -1, -1),
                       self.from_latent(z) + self.latent_pos_embed], dim=1)   # (B, N + L, D)
        for blk in self.blocks:
            t = blk(t)
        return self.head(self.norm(t[:, :N]))


class MacTok(nn.Module):
    TRAIN_ONLY_PARAMS = ("align.", "latent_mask_token")  # dropped from released-style checkpoints and stage 2

    def __init__(self, cfg: MacTokConfig):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        assert cfg.num_patches % cfg.num_latent_tokens == 0 or "local" not in cfg.align, \
            "local alignment repeats each latent token N / L times: N must be a multiple of L"
        self.cfg = cfg
        self.encoder = MacTokEncoder(cfg)
        self.decoder = MacTokDecoder(cfg)
        self.latent_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.latent_dim)) \
            if cfg.mask_tokens == "latent" else None
        self.align = nn.ModuleDict({k: align_head(cfg.latent_dim, cfg.align_hidden, cfg.teacher_dim)
                                    for k in cfg.align})
        self.aux = nn.ModuleDict()  # no auxiliary decoders (the interface's name for train-only decoders)
        self._teacher = (None,)     # image -> {'cls': (B, Dt), 'patches': (B, N, Dt)}; outside the module tree
        self.initialize_weights()

    # the interface every family shares
    image_size = property(lambda self: self.cfg.image_size)
    latent_shape = property(lambda self: (self.cfg.num_latent_tokens, self.cfg.latent_dim))
    grid = None
    last_layer = property(lambda self: self.decoder.head.weight)  # the GAN's adaptive weight is taken here

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("mask_token", "latent_tokens", "recon_token", "cls_token")):
                nn.init.normal_(p, std=0.02)
            elif name.endswith("pos_embed"):
                nn.init.trunc_normal_(p, std=0.02)
            elif name.endswith("gamma"):
                nn.init.constant_(p, self.cfg.layerscale_init)
        with torch.no_grad():  # from scratch: a fixed 2D sin-cos APE on the patches (the cls row stays 0)
            pe = self.encoder.vit.pos_embed
            pe.zero_()[0, 1:] = sincos_2d(pe.shape[-1], self.cfg.grid_size)

    def frozen(self):
        """Parameters no stage trains (DDP needs a gradient for every trained one): the from-scratch encoder's
        fixed sin-cos APE; DINOv2's own mask token (kept so that its checkpoint loads; MacTok's is
        encoder.mask_token, docs/fidelity.md b); and that one too when no image token is ever masked (no mask, or the
        latent-token control)."""
        return ("encoder.vit.mask_token",) + (("encoder.vit.pos_embed",) if self.cfg.encoder_init == "scratch"
                                              else ()) + (("encoder.mask_token",) if self.cfg.mask_tokens != "image"
                                                          else ())

    def moments(self, x, mask=None):
        mu, logvar = self.encoder(x, mask).float().chunk(2, dim=-1)          # (B, L, C) each
        return mu, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)

    def encode(self, x, mask=None):
        """x (B, 3, H, W) in [-1, 1] -> the posterior mean (B, L, C) (an image-token mask applies if given)."""
        return self.moments(x, mask if self.cfg.mask_tokens == "image" else None)[0]

    def decode(self, z):
        g = self.cfg.grid_size
        return unpatchify(self.decoder(z), self.cfg.patch_size, g, g)

    def set_teacher(self, fn):
        """Plug in the frozen teacher (never saved, optimised or copied into the EMA)."""
        self._teacher = (fn,)

    @torch.no_grad()
    def teach(self, x):
        fn = self._teacher[0]
        c = self.cfg
        return None if fn is None or not (c.align or (c.mask_tokens == "image" and c.semantic_mask_prob)) else fn(x)

    def sample_mask(self, B, device, ratio=None, teacher=None):
        """A training mask (B, N) for the image tokens (or (B, L) for latent-token masking): per sample a drawn
        ratio r (draw_mask_ratios) and floor(r * count) tokens, so that some images stay unmasked (a given ratio
        masks ceil(ratio * count) in every sample), chosen as the top scores: random, or the teacher's cls-patch
        cosine with probability semantic_mask_prob (image tokens)."""
        c = self.cfg
        if c.mask_tokens == "none" or ratio == 0:
            return None
        n = c.num_patches if c.mask_tokens == "image" else c.num_latent_tokens
        if ratio is not None:
            counts = torch.full((B,), math.ceil(n * float(ratio) - 1e-9))
        else:
            counts = torch.floor(draw_mask_ratios(B, c.mask_ratio_max, dist=c.mask_ratio_dist) * n).long()
        scores = torch.rand(B, n)
        semantic = torch.rand(B) < c.semantic_mask_prob if teacher is not None and c.mask_tokens == "image" \
            else torch.zeros(B, dtype=torch.bool)
        counts, scores, semantic = (t.to(device, non_blocking=True) for t in (counts, scores, semantic))
        if teacher is not None and c.mask_tokens == "image":
            cos = F.cosine_similarity(teacher["cls"].unsqueeze(1).float(), teacher["patches"].float(), dim=-1)
            scores = torch.where(semantic.unsqueeze(1), cos, scores)                # (B, N)
        return top_k_mask(scores, counts)

    def align_losses(self, z, teacher):
        out = {}
        if "local" in self.align:  # per token, then each token repeated N / L times consecutively
            h = self.align["local"](z).repeat_interleave(self.cfg.num_patches // z.shape[1], dim=1)
            out["align_local"] = (1 - F.cosine_similarity(h.float(), teacher["patches"].float(), dim=-1)).mean()
        if "global" in self.align:
            g = self.align["global"](z.mean(dim=1))
            out["align_global"] = (1 - F.cosine_similarity(g.float(), teacher["cls"].float(), dim=-1)).mean()
        return out

    def forward(self, x, mask=None, teacher=None):
        """x (B, 3, H, W) in [-1, 1] -> {'pixel' (mean MSE), 'kl' (unweighted), alignment terms, 'loss', 'rec'}."""
        c = self.cfg
        image_mask = mask if c.mask_tokens == "image" else None
        mu, logvar = self.moments(x, image_mask)
        z = sample_posterior(mu, logvar)                                      # (B, L, C) a posterior sample
        if c.mask_tokens == "latent" and mask is not None:                   # the appendix control
            z = torch.where(mask.unsqueeze(-1), self.latent_mask_token.to(z.dtype), z)
        x_rec = self.decode(z)
        out = {"pixel": F.mse_loss(x_rec.float(), x.float()), "kl": kl_divergence(mu, logvar)}
        loss = out["pixel"] + c.kl_weight * out["kl"]
        if teacher is not None and len(self.align):
            terms = self.align_losses(z, teacher)
            out.update(terms)
            loss = loss + c.align_weight * sum(terms.values())
        out["loss"] = loss
        out["rec"] = x_rec
        return out

    @torch.no_grad()
    def diagnostics(self, x, threshold=0.01):
        """Posterior-collapse diagnostics on held-out images x: KL per latent element, active units (Var over x of
        each mu element > 0.01; Burda et al.), and the PSNR of D(mu) against that of D(0), the prior's decode."""
        mu, logvar = (torch.cat(t) for t in zip(*(self.moments(c) for c in x.split(64))))  # (n, L, C)
        kl = kl_divergence(mu, logvar) / mu[0].numel()
        active = int((mu.float().var(dim=0) > threshold).sum())
        psnr = lambda r: (10 * torch.log10(4.0 / ((r.float().clamp(-1, 1) - x.float()) ** 2)
                                           .mean(dim=(1, 2, 3)).clamp_min(1e-10))).mean().item()
        dec = lambda z: torch.cat([self.decode(c) for c in z.split(64)])
        return {"kl_per_element": kl.item(), "active_units": active, "num_units": mu[0].numel(),
                "psnr_mu": psnr(dec(mu)), "psnr_prior": psnr(dec(torch.zeros_like(mu)))}


# ----------------------------------------------------------------------------------------------------------
# teachers: {'cls': (B, Dt), 'patches': (B, N, Dt)} on the tokenizer's patch grid, from the unmasked image

class DINOv2Teacher(nn.Module):
    """DINOv2 converted to the tokenizer's patch (pretrained.dinov2_target's vit): final-norm cls and patches."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    @torch.no_grad()
    def forward(self, x):
        f = self.target.vit.forward_features(self.target.normalize(x))
        return {"cls": f["x_norm_clstoken"], "patches": f["x_norm_patchtokens"]}


class ProxyTeacher(nn.Module):
    """The proxy classifier (proxy.py) as the teacher where no DINOv2 exists: its bottleneck Linear applied at
    each position of the last stage (nearest-upsampled to the patch grid) as patch features, and applied to the
    pooled map (its feature, = the mean of the patch features before upsampling) as cls."""

    def __init__(self, net, grid):
        super().__init__()
        self.net, self.grid = net.eval().requires_grad_(False), grid

    @torch.no_grad()
    def forward(self, x):
        f = self.net.fc(self.net.stages(x)[-1].permute(0, 2, 3, 1))           # (B, h, w, Dt)
        cls = f.mean(dim=(1, 2))
        f = F.interpolate(f.permute(0, 3, 1, 2), size=(self.grid, self.grid), mode="nearest")
        return {"cls": cls, "patches": f.flatten(2).transpose(1, 2)}            # (B, Dt), (B, N, Dt)


_S = dict(enc_width=384, enc_depth=12, enc_heads=6, dec_width=384, dec_depth=12, dec_heads=6, align_hidden=512)
_BL = dict(dec_width=1024, dec_depth=24, dec_heads=16)
PRESETS = {
    # the paper's sizes (Tab. 6b; docs/fidelity.md b.1): B 176M (ViT-B encoder + decoder + the two alignment heads),
    # S 45M (ViT-S encoder from DINOv2-S + ViT-S decoder; [INFERRED] heads 512 wide: the B heads' 1024 would make
    # 47.8M), BL 391M (ViT-B encoder + ViT-L decoder, as SoftVQ-BL; the paper's 512 px model, with 64 tokens)
    "MacTok-B-128": dict(family="mactok"),
    "MacTok-B-64": dict(family="mactok", num_latent_tokens=64),
    "MacTok-S-128": dict(family="mactok", **_S),
    "MacTok-S-64": dict(family="mactok", num_latent_tokens=64, **_S),
    "MacTok-BL-128": dict(family="mactok", **_BL),
    "MacTok-BL-64-512": dict(family="mactok", image_size=512, num_latent_tokens=64, **_BL),
    # CPU: the MAETok tiny sizes (32 px, patch 4, 32 tokens x 8 channels, 160 wide, 2 + 2 layers), from scratch
    "MacTok-tiny": dict(family="mactok", image_size=32, patch_size=4, enc_width=160, enc_depth=2, enc_heads=4,
                        dec_width=160, dec_depth=2, dec_heads=4, num_latent_tokens=32, latent_dim=8,
                        layerscale_init=0.1, encoder_init="scratch", align_hidden=256, teacher_dim=256),
}


# ----------------------------------------------------------------------------------------------------------
# training stages (tokenizer.Stage fields), what inference drops, and the recipes of the presets

STAGES = {
    "main": dict(trains=("",), keep_aux=True, mask="drawn", init=False),
    # paper: encoder frozen, decoder trained without masks; the KL and the alignment heads go (constant or
    # unused once the encoder is frozen), z is still sampled from the posterior (docs/fidelity.md b.6)
    "decoder_finetune": dict(trains=("decoder.",), keep_aux=False, mask="none", init=True),
}
INFERENCE_CONFIG = dict(align=(), kl_weight=0.0, mask_tokens="none")
# 250K steps at batch 256, 5K warmup, lr 1e-4 and the GAN's lost values as SoftVQ, the codebase MacTok follows,
# configures them (start 20K, weight 0.2), center crop; 512 px: 500K steps at batch 128, 10K warmup. Decoder
# fine-tuning: LPIPS at its full weight from the first step (no second ramp). docs/fidelity.md b.6
_MACTOK = dict(max_steps=250_000, global_batch_size=256, lr=1e-4, warmup_steps=5000, disc_start=20_000,
               disc_weight=0.2, aux_targets="", crop="center")
_MACTOK_FT = dict(max_steps=50_000, global_batch_size=256, lr=1e-4, warmup_steps=0, min_lr_ratio=1.0, disc_start=0,
                  disc_weight=0.2, perceptual_warmup=0, aux_targets="", crop="center")
_MACTOK_512 = dict(max_steps=500_000, global_batch_size=128, warmup_steps=10_000)
RECIPES = {
    "MacTok-B-128": {"main": _MACTOK, "decoder_finetune": _MACTOK_FT},
    "MacTok-tiny": {"main": {**TINY_RECIPE, "aux_targets": "", "teacher": "none"},
                    "decoder_finetune": {**TINY_RECIPE, "aux_targets": "", "max_steps": 500, "warmup_steps": 20}},
    "MacTok-BL-64-512": {"main": {**_MACTOK, **_MACTOK_512},
                         "decoder_finetune": {**_MACTOK_FT, "global_batch_size": 128, "max_steps": 100_000}},
}
for _p in ("MacTok-B-64", "MacTok-S-128", "MacTok-S-64", "MacTok-BL-128"):
    RECIPES[_p] = RECIPES["MacTok-B-128"]
