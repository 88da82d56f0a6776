"""
The adversarial stack of MAETok, which MacTok reuses (official continuous_tokenizer @ f4d60a0:
discriminator_dino.py, utils/diff_aug.py, losses/vq_loss.py; docs/fidelity.md section a).

  diff_augment     DiffAugment (Zhao et al. 2020) with the official policies, per-batch gates and RNG call order
  Discriminator    trainable heads on the activations of a frozen trunk: DinoDiscTrunk, the official DINO ViT-S/16
                   (5 heads of 384 channels, 7,386,245 parameters, 980 logits per image) or, offline,
                   ProxyDiscTrunk (the stages of a proxy CNN)
  hinge_d, hinge_g, lecam_reg, adaptive_weight
  GANLoss          the generator term and the discriminator loss with the official weights, the LeCAM EMAs
All logits and losses are fp32 (a bf16 mean is too coarse for LeCAM and CR).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrained import DINO_V1_URL, IMAGENET_MEAN, IMAGENET_STD, DinoViT, ViTConfig, load_official, load_strict

GEN_POLICY = "color,translation,cutout_0.2"     # G step and D step (weak), gate probability 0.5
STRONG_POLICY = "color,translation,cutout_0.5"  # consistency regularisation, probability 1


# ----------------------------------------------------------------------------------------------------------
# DiffAugment. Each group of the policy is applied to the whole batch with probability `prob`, decided by one
# torch.rand(1) on the CPU generator; the parameters inside a group are drawn per sample on x's device.

def _rand(x):
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)   # (B, 1, 1, 1)


def _color(x):
    x = x + (_rand(x) - 0.5)                                                # brightness, shift in [-0.5, 0.5)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_rand(x) * 2) + m                                        # saturation, factor in [0, 2)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_rand(x) + 0.5) + m                                   # contrast, factor in [0.5, 1.5)


def _translation(x, ratio=0.125):
    """Integer shifts in [-s, s] per sample; uncovered pixels are 0 (mid-grey in [-1, 1])."""
    B, C, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    th = torch.randint(-sh, sh + 1, (B, 1, 1), device=x.device)
    tw = torch.randint(-sw, sw + 1, (B, 1, 1), device=x.device)
    b, i, j = torch.meshgrid(torch.arange(B, device=x.device), torch.arange(H, device=x.device),
                             torch.arange(W, device=x.device), indexing="ij")
    i = (i + th + 1).clamp(0, H + 1)                                        # into the 1-px zero-padded image
    j = (j + tw + 1).clamp(0, W + 1)
    pad = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)                        # (B, H+2, W+2, C)
    return pad[b, i, j].permute(0, 3, 1, 2)                                 # (B, C, H, W)


def _cutout(x, ratio):
    """A zeroed box of round(ratio * side) per sample, its centre anywhere in the image (clipped at borders)."""
    B, C, H, W = x.shape
    kh, kw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    oh = torch.randint(0, H + (1 - kh % 2), (B, 1, 1), device=x.device)
    ow = torch.randint(0, W + (1 - kw % 2), (B, 1, 1), device=x.device)
    b, i, j = torch.meshgrid(torch.arange(B, device=x.device), torch.arange(kh, device=x.device),
                             torch.arange(kw, device=x.device), indexing="ij")
    i = (i + oh - kh // 2).clamp(0, H - 1)
    j = (j + ow - kw // 2).clamp(0, W - 1)
    mask = torch.ones(B, H, W, dtype=x.dtype, device=x.device)
    mask[b, i, j] = 0
    return x * mask.unsqueeze(1)


def diff_augment(x, policy=GEN_POLICY, prob=0.5):
    """x (B, 3, H, W) in [-1, 1] -> the same shape; differentiable in x. policy: comma-separated groups among
    color, translation, cutout_<ratio>, applied in the order written."""
    for group in policy.split(","):
        if torch.rand(1) > prob:  # one gate per group and batch, on the CPU generator (official)
            continue
        if group == "color":
            x = _color(x)
        elif group == "translation":
            x = _translation(x)
        elif group.startswith("cutout_"):
            x = _cutout(x, float(group.split("_", 1)[1]))
        else:
            raise ValueError(f"unknown DiffAugment group {group!r} (color, translation, cutout_<ratio>)")
    return x


# ----------------------------------------------------------------------------------------------------------
# the discriminator heads (official DinoDisc heads; parameter names as its state dict: heads.k.0.0.weight_orig ...)

def spectral_conv(cin, cout, kernel_size, **kw):
    """Conv1d with the classic spectral-norm hook (one power iteration per train-mode forward, none in eval),
    whose weight_orig / weight_u / weight_v are the official checkpoint's tensors."""
    return nn.utils.spectral_norm(nn.Conv1d(cin, cout, kernel_size, **kw), n_power_iterations=1, eps=1e-12)


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) * (1 / math.sqrt(2))


def disc_head(dim, kernel_size=9):
    """(B, C, T) -> (B, T): a 1x1 conv block, a residual block whose kernel-9 conv pads circularly along the
    flattened token sequence (it wraps across rows, as official), a 1x1 conv to one logit per token.
    BatchNorm1d has SyncBatchNorm's state dict; under DDP on GPU it is converted (global-batch statistics)."""
    def block(k):
        return nn.Sequential(spectral_conv(dim, dim, k, padding=k // 2, padding_mode="circular" if k > 1 else "zeros"),
                             nn.BatchNorm1d(dim, eps=1e-6), nn.LeakyReLU(0.2))
    return nn.Sequential(block(1), Residual(block(kernel_size)), spectral_conv(dim, 1, 1))


class Discriminator(nn.Module):
    """One head per trunk activation; logits of all heads concatenated, (B, sum T). The trunk is frozen and held
    outside the module tree (official: in a tuple), so it is never saved, optimised or DDP-synchronised.
    The discriminator always runs in train mode (official): BatchNorm uses the statistics of the batch it sees."""

    def __init__(self, trunk, dims, kernel_size=9):
        super().__init__()
        self.heads = nn.ModuleList(disc_head(d, kernel_size) for d in dims)
        self._trunk = (trunk.eval().requires_grad_(False),)

    @property
    def trunk(self):
        return self._trunk[0]

    def forward(self, x, trunk_grad=True):
        """x (B, 3, H, W) in [-1, 1] -> logits (B, sum T) fp32. trunk_grad=False: the trunk runs without autograd
        (the D step: its input is detached and it is frozen, so the head gradients are the same; not official)."""
        with torch.set_grad_enabled(trunk_grad and torch.is_grad_enabled()):
            acts = self.trunk(x)                                            # [(B, C_k, T_k)] fp32
        return torch.cat([h(a).flatten(1) for h, a in zip(self.heads, acts)], dim=1).float()


class DinoDiscTrunk(nn.Module):
    """The frozen DINO ViT-S/16 trunk of the MAETok / MacTok DINO discriminator (continuous_tokenizer
    FrozenDINOSmallNoDrop): own ImageNet normalisation of [-1, 1] input, resize to 224 (area when larger, else
    bicubic; a random 224 crop with probability 1/2 when both sides exceed 224), tanh GELU, no position
    interpolation, no final norm. Returns [after pos-embed] + [after block i for i in key_depths], each
    patches + cls as (B, D, 196)."""

    def __init__(self, cfg=None, key_depths=(2, 5, 8, 11)):
        super().__init__()
        cfg = cfg or ViTConfig(384, 12, 6, patch_size=16, img_size=224, layerscale=False)
        self.vit = DinoViT(ViTConfig(**{**cfg.__dict__, "gelu": "tanh"}))
        self.key_depths = tuple(key_depths)
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, generator=None):
        with torch.autocast(x.device.type, enabled=False):  # preprocessing and pos-embed in fp32 (official)
            x = x.float() * self.x_scale + self.x_shift
            H, W = x.shape[-2:]
            if H > 224 and W > 224 and torch.rand((), generator=generator) < 0.5:
                i, j = (int(torch.randint(n - 224 + 1, (), generator=generator)) for n in (H, W))
                x = x[..., i:i + 224, j:j + 224]
            else:
                x = F.interpolate(x, size=(224, 224), mode="area" if H > 224 else "bicubic")
            t = self.vit.prepare_tokens(x)                                   # 224 px: the stored grid, as is
        acts = [t]
        for i, blk in enumerate(self.vit.blocks[:max(self.key_depths) + 1]):
            t = blk(t)
            if i in self.key_depths:
                acts.append(t)
        return [(a[:, 1:] + a[:, :1]).transpose(1, 2).float() for a in acts]  # (B, D, N) each, fp32


def load_dino_disc_trunk(ckpt=None, state_dict=None, cfg=None, key_depths=(2, 5, 8, 11)):
    """DinoDiscTrunk from the official DINO v1 file, with the key bias zeroed as DinoDisc.__init__ does."""
    sd = dict(state_dict if state_dict is not None else load_official(DINO_V1_URL, ckpt, "--dino_ckpt"))
    for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
        b = sd[k].clone()
        D = b.shape[0] // 3
        b[D:2 * D] = 0  # the key bias cannot change softmax attention; the official code drops it
        sd[k] = b
    trunk = DinoDiscTrunk(cfg, key_depths)
    load_strict(trunk.vit, sd, "official DINO v1 ViT-S/16")
    return trunk.eval().requires_grad_(False)


class ProxyDiscTrunk(nn.Module):
    """The four stage outputs of a frozen proxy CNN (proxy.py) as token sequences (B, C_i, H_i * W_i): the
    stand-in for the DINO trunk where no pretrained weights exist. It must be another network than the proxy
    that evaluates (another seed and width), or the GAN would optimise the metric directly."""

    def __init__(self, net):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.dims = [net.cfg.width * 2 ** i for i in range(4)]

    def forward(self, x):
        return [f.flatten(2).float() for f in self.net.stages(x)]


def dino_discriminator(trunk, kernel_size=9):
    """The official DinoDisc: a head per activation of the DINO trunk (after pos-embed + each key depth)."""
    return Discriminator(trunk, [trunk.vit.cfg.embed_dim] * (len(trunk.key_depths) + 1), kernel_size)


# ----------------------------------------------------------------------------------------------------------
# losses (official vq_loss.py)

class NLayerDiscriminator(nn.Module):
    """The LDM PatchGAN (taming-transformers / VA-VAE, AlignTok's inferred discriminator; docs/fidelity.md c.2): 4x4
    convs 3 -> 64 (stride 2) -> 128 -> 256 (stride 2, BN) -> 512 (stride 1, BN) -> 1 logit per patch; LeakyReLU
    0.2; (B, 1, 30, 30) at 256 px; 2,765,633 parameters; init N(0, 0.02) convs, N(1, 0.02) BN weights."""

    def __init__(self, in_ch=3, ndf=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(1, n_layers + 1):
            c_out = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if n < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, trunk_grad=True):  # no trunk: the flag of the DINO discriminator's interface is moot
        return self.main(x).flatten(1).float()                               # (B, 30 * 30) logits at 256 px


def hinge_d(real, fake):
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def hinge_g(fake):
    return -fake.mean()


def lecam_reg(real, fake, ema_real, ema_fake):
    """LeCAM (Tseng et al. 2021): keep the logits near the EMA of the other side's logits."""
    return F.relu(real - ema_fake).pow(2).mean() + F.relu(ema_real - fake).pow(2).mean()


def adaptive_terms(nll_grad, g_grad, eps=1e-4, max_weight=1e4):
    """The adaptive weight ||grad_W nll|| / (||grad_W L_G|| + eps), clamped to [0, max_weight], detached, with what
    it comes from (logged, so a run's log answers how the terms were balanced): the two gradient norms, whether
    the clamp bound, and whether eps did (eps at least half the denominator). Tensors: no host sync."""
    n_nll, n_g = nll_grad.detach().norm(), g_grad.detach().norm()
    raw = n_nll / (n_g + eps)
    return {"weight": raw.clamp(0, max_weight), "nll_grad": n_nll, "grad": n_g,
            "clamped": (raw > max_weight).float(), "eps_bound": (n_g < eps).float()}


def adaptive_weight(nll_grad, g_grad, eps=1e-4, max_weight=1e4):
    """||grad_W nll|| / (||grad_W L_G|| + eps), clamped to [0, 1e4], detached (W: the pixel decoder's last layer)."""
    return adaptive_terms(nll_grad, g_grad, eps, max_weight)["weight"]


LOGGED_TERMS = ("nll_grad", "grad", "clamped", "eps_bound")  # of an adaptive weight, beside the weight itself


class GANLoss(nn.Module):
    """The official GAN terms around a Discriminator. Before disc_start nothing adversarial runs (official runs
    every pass and multiplies by 0: the parameters do not move, only the SN vectors, BN statistics and LeCAM
    EMAs do; skipping saves the 5 discriminator passes). The LeCAM EMAs are buffers (saved and restored; the
    official code loses them on resume), fp32 tensors on the device (no host sync), all-reduced under DDP."""

    def __init__(self, disc, disc_start=30_000, disc_weight=0.4, lecam_weight=1e-3, cr_weight=4.0, lecam_decay=0.999,
                 augment=True, d_weight=None):
        """augment: DiffAugment the views (MAETok); d_weight: the D loss's weight (default disc_weight, MAETok's
        0.4 for both; VA-VAE / AlignTok: G 0.5 x adaptive, D 1.0, no DiffAug, LeCAM or CR)."""
        super().__init__()
        self.disc = disc
        self.disc_start, self.disc_weight, self.lecam_weight = disc_start, disc_weight, lecam_weight
        self.cr_weight, self.lecam_decay = cr_weight, lecam_decay
        self.augment, self.d_weight = augment, disc_weight if d_weight is None else d_weight
        self.register_buffer("lecam_ema", torch.zeros(2))                  # (real, fake) logit means

    def active(self, step):
        """0-based step >= disc_start (official: 1-based global_step >= disc_start, one step earlier)."""
        return step >= self.disc_start

    def generator_term(self, x_rec, nll, last_layer):
        """disc_weight * lambda * hinge_G(D(DiffAug(x_rec))), with lambda the adaptive weight at last_layer.
        Returns (term, logs). The term is a surrogate, <x_rec, dL_G/dx_rec> * weight: the same gradient for
        the tokenizer as official, with one backward through the frozen trunk instead of two, and no gradient
        into the heads (which the official G step computes and throws away)."""
        heads = self.disc.module if hasattr(self.disc, "module") else self.disc  # no DDP hooks in the G step
        heads.requires_grad_(False)
        g = hinge_g(heads(self.view(x_rec, GEN_POLICY, 0.5)))
        heads.requires_grad_(True)
        gx, = torch.autograd.grad(g, x_rec)             # dL_G / dx_rec through the trunk; frees the trunk graph
        surrogate = (x_rec.float() * gx.float()).sum()                     # grad = dL_G / dx_rec upstream
        nll_w, = torch.autograd.grad(nll, last_layer, retain_graph=True)
        g_w, = torch.autograd.grad(surrogate, last_layer, retain_graph=True)
        a = adaptive_terms(nll_w, g_w)
        return self.disc_weight * a["weight"] * surrogate, {"g_loss": g.detach(), "d_weight": a["weight"],
                                                            **{f"d_weight_{k}": a[k] for k in LOGGED_TERMS}}

    def view(self, x, policy, prob):
        return diff_augment(x, policy, prob) if self.augment else x

    def update_lecam(self, real, fake, ddp=False):
        m = torch.stack([real.detach().mean(), fake.detach().mean()])
        if ddp:  # one EMA on every rank, independent of the process count (official: rank-local floats)
            torch.distributed.all_reduce(m)
            m = m / torch.distributed.get_world_size()
        self.lecam_ema.mul_(self.lecam_decay).add_((1 - self.lecam_decay) * m)

    def discriminator_loss(self, disc, x, x_rec, ddp=False):
        """disc (the module or its DDP wrapper) on real x and detached x_rec -> dict with 'loss' and the terms.
        Weak views (p 0.5) for hinge and LeCAM, strong views (p 1) for CR; every view an independent draw."""
        real = disc(self.view(x, GEN_POLICY, 0.5), trunk_grad=False)
        fake = disc(self.view(x_rec, GEN_POLICY, 0.5), trunk_grad=False)
        hinge = hinge_d(real, fake)
        out = {"d_hinge": hinge.detach(), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
        loss = self.d_weight * hinge
        if self.lecam_weight:
            self.update_lecam(real, fake, ddp)                             # before the regulariser (official)
            lecam = lecam_reg(real, fake, self.lecam_ema[0], self.lecam_ema[1])
            loss, out["d_lecam"] = loss + self.d_weight * self.lecam_weight * lecam, lecam.detach()
        if self.cr_weight:
            real_s = disc(self.view(x, STRONG_POLICY, 1.0), trunk_grad=False)
            fake_s = disc(self.view(x_rec, STRONG_POLICY, 1.0), trunk_grad=False)
            cr = F.mse_loss(torch.cat([real, fake]), torch.cat([real_s, fake_s]))  # neither side detached (official)
            loss, out["d_cr"] = loss + self.cr_weight * cr, cr.detach()          # CR not times 0.4
        return {"loss": loss, **out}
