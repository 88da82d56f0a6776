"""
Networks whose weights come from elsewhere, each loading its official checkpoint format from the official
URL (torch.hub.load_state_dict_from_url) or a local path. Torch only: no torchvision, timm or lpips import.
Every one is checked against fixtures made by the official code (tests/golden, tests/test_pretrained.py).

  LPIPS v0.1 'vgg'   Zhang et al. 2018, the `lpips` 0.1.4 package: MAETok's perceptual loss, a recon metric
  FID InceptionV3    mseitzer/pytorch-fid's FID network: pool3 (FID), logits (IS), mixed_6 spatial (sFID)
  DINOv2 ViT-S/B/L/G facebookresearch/dinov2 (with / without registers): MAETok's aux target, MacTok, AlignTok
  DINO v1 ViT-S/16   facebookresearch/dino (the frozen trunk of the DINO discriminator: discriminator.py)
  SigLIP SO400M/14   OpenCLIP / timm ViT-SO400M-14-SigLIP: MAETok's third aux target
"""
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit import Block, SwiGLU

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision IMAGENET1K_V1
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"
DINO_V1_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_official(url, path, flag):
    """State dict from a local path (the flag) or the official URL; a failure names the file, URL and flag."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path!r}: no such file")
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not download {os.path.basename(url)} from {url} ({type(e).__name__}: {e}); "
                           f"offline, download it elsewhere and pass its local path with {flag}") from e


def load_strict(model, sd, what, optional=()):
    """load_state_dict(strict) with a message that says which checkpoint was expected; keys ending in
    `optional` may be absent (BatchNorm's num_batches_tracked in files written by an old torch)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith(optional)]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise KeyError(f"not the expected {what} checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                       f"wrong shape {bad[:3]}")
    model.load_state_dict({**{k: own[k] for k in own if k not in sd}, **sd})
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# VGG16 + LPIPS

VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision features.{i} conv indices
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (features index of the ReLU)


class VGG16Features(nn.Module):
    """torchvision vgg16().features[:30] with the same indices (so official keys load as they are)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)
        return taps


class LPIPS(nn.Module):
    """LPIPS v0.1 'vgg' on images in [-1, 1]: scaling layer, five VGG taps, unit-normalised over channels,
    squared differences, calibrated 1x1 linear heads, spatial mean, sum over taps -> (B, 1, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))

    def per_layer(self, x0, x1, spatial=False):
        f0 = self.net((x0 - self.shift) / self.scale)
        f1 = self.net((x1 - self.shift) / self.scale)
        out = []
        for a, b, lin in zip(f0, f1, self.lins):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = lin((a - b) ** 2)                                             # (B, 1, h, w)
            out.append(F.interpolate(d, size=x0.shape[-2:], mode="bilinear", align_corners=False) if spatial
                       else d.mean(dim=(2, 3), keepdim=True))
        return out

    def forward(self, x0, x1, spatial=False):
        return sum(self.per_layer(x0, x1, spatial))


def lpips_head_weights():
    """The calibrated v0.1 'vgg' heads shipped in the lpips wheel, found without importing lpips."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the LPIPS heads ship in the `lpips` package: pip install lpips")
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)  # storages are tagged CUDA: map to CPU
    return [sd[f"lin{k}.model.1.weight"] for k in range(5)]


def load_lpips(vgg_ckpt=None, vgg_state_dict=None):
    """LPIPS-VGG, frozen and in eval mode. VGG16 from the official torchvision URL, a local path
    (--vgg_ckpt), or an official-format state dict given directly."""
    model = LPIPS()
    sd = vgg_state_dict if vgg_state_dict is not None else load_official(VGG16_URL, vgg_ckpt, "--vgg_ckpt")
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}  # classifier.* is not used
    missing = [f"features.{i}.{p}" for i in VGG16_CONVS for p in ("weight", "bias") if f"features.{i}.{p}" not in feats]
    if missing:
        raise KeyError(f"not a torchvision VGG16 checkpoint: missing {missing[:3]}...")
    model.net.load_state_dict(feats)
    for lin, w in zip(model.lins, lpips_head_weights()):
        lin.weight.data.copy_(w)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# FID InceptionV3 (pytorch-fid `fid_inception_v3`: torchvision Inception3 with the TF graph's pooling variants)

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x):
    # FID blocks: average pool without the zero padding in the count (TF), unlike torchvision's count_include_pad
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # FIDInceptionA (Mixed_5b/c/d)
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_pool_branch(x))], 1)


class InceptionB(nn.Module):  # torchvision InceptionB (Mixed_6a)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # FIDInceptionC (Mixed_6b..6e)
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([b1, b7, d, self.branch_pool(_pool_branch(x))], 1), b1


class InceptionD(nn.Module):  # torchvision InceptionD (Mixed_7a)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # FIDInceptionE_1 (Mixed_7b, avg pool) and FIDInceptionE_2 (Mixed_7c, max pool)
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # the TF graph's last block max-pools (pytorch-fid FIDInceptionE_2); the others average-pool
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _pool_branch(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


def resize_bilinear_tf1(x, size):
    """TF1 tf.image.resize_bilinear (align_corners=False, no half-pixel centres): source = dst * in / out.
    This is what the ADM evaluator's graph does to its input (as torch-fidelity's TF-compatible resize)."""
    def taps(n_in):
        s = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        i0 = s.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (s - i0).to(x.dtype)
    y0, y1, fy = taps(x.shape[-2])
    x0, x1, fx = taps(x.shape[-1])
    rows = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * fy.view(-1, 1)        # (B, C, size, W)
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * fx


class FIDInceptionV3(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> dict: pool3 (B, 2048) for FID / precision / recall, logits (B, 1008,
    pytorch-fid: fc with bias) and logits_unbiased (the TF graph's softmax/logits/MatMul, which ADM's IS uses),
    spatial (B, 2023): mixed_6/conv (Mixed_6d.branch1x1) first 7 channels, channels last, for sFID.
    resize 'tf' (default): the ADM evaluator's input path (TF1 bilinear to 299 on [0, 255], (x - 128) / 128);
    'pytorch_fid': F.interpolate bilinear, then 2x - 1 (pytorch-fid; not bit-identical to TF)."""

    def __init__(self, resize="tf"):
        super().__init__()
        assert resize in ("tf", "pytorch_fid"), resize
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, x):
        if self.resize == "tf":
            return (resize_bilinear_tf1(x.float() * 255, 299) - 128) / 128
        return 2 * F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False) - 1

    def blocks(self, x):
        """Preprocessed input -> the four pytorch-fid block maps and the mixed_6/conv map."""
        b0 = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        b1 = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(b0)), 3, stride=2)   # (B, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(b1))))
        x = self.Mixed_6b(x)[0]
        x = self.Mixed_6c(x)[0]
        x, mixed6 = self.Mixed_6d(x)                                              # mixed6 (B, 192, 17, 17)
        b2 = self.Mixed_6e(x)[0]                                                  # (B, 768, 17, 17)
        b3 = F.adaptive_avg_pool2d(self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(b2))), 1)  # (B, 2048, 1, 1)
        return [b0, b1, b2, b3], mixed6

    def forward(self, x):
        (_, _, _, b3), mixed6 = self.blocks(self.preprocess(x))
        pool3 = b3.flatten(1)                                                     # (B, 2048)
        return {"pool3": pool3, "logits": self.fc(pool3), "logits_unbiased": pool3 @ self.fc.weight.t(),
                "spatial": mixed6[:, :7].permute(0, 2, 3, 1).flatten(1)}          # (B, 17*17*7)


def load_inception(ckpt=None, state_dict=None, resize="tf"):
    """The FID Inception, frozen, in eval mode, from pt_inception-2015-12-05-6726825d.pth (official pytorch-fid
    release URL), a local path (--inception_ckpt) or a state dict given directly."""
    sd = state_dict if state_dict is not None else load_official(FID_INCEPTION_URL, ckpt, "--inception_ckpt")
    return load_strict(FIDInceptionV3(resize), sd, "pytorch-fid FID Inception (pt_inception-2015-12-05)",
                       optional=("num_batches_tracked",))


# ----------------------------------------------------------------------------------------------------------
# DINOv2 / DINO v1 ViT (facebookresearch/dinov2 DinoVisionTransformer, facebookresearch/dino VisionTransformer)

@dataclass
class ViTConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    img_size: int = 518               # the stored position embedding covers (img_size / patch_size)^2 patches
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    layerscale: bool = True           # DINOv2 yes, DINO v1 no
    ffn: str = "mlp"                  # 'mlp' or 'swiglu' (ViT-g)
    gelu: str = "none"                # exact GELU; 'tanh' in the MAETok DINO-discriminator trunk
    interpolate_offset: float = 0.1   # DINOv2 without registers and DINO v1: 0.1; DINOv2 with registers: 0
    interpolate_antialias: bool = False


DINOV2_ARCHS = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}


def dinov2_config(arch="vitb14", registers=False):
    D, depth, heads = DINOV2_ARCHS[arch]
    return ViTConfig(D, depth, heads, num_register_tokens=4 if registers else 0,
                     ffn="swiglu" if arch == "vitg14" else "mlp", interpolate_offset=0.0 if registers else 0.1,
                     interpolate_antialias=registers)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                         # (B, N, D) row-major


def dinov2_block(cfg: ViTConfig):
    """An official DINOv2 / DINO v1 block: LayerScale (DINOv2), GELU MLP or SwiGLUFFNFused (ViT-g, hidden 2/3 *
    4D rounded up to a multiple of 8)."""
    D, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    ffn = SwiGLU(D, (int(hidden * 2 / 3) + 7) // 8 * 8) if cfg.ffn == "swiglu" else None
    return Block(D, cfg.num_heads, cfg.mlp_ratio, ls_init=1.0 if cfg.layerscale else None, ffn=ffn, gelu=cfg.gelu)


class DinoViT(nn.Module):
    """DINOv2 / DINO v1 with the official parameter names, so official checkpoints load strictly.
    Tokens [cls, registers, patches]; the position embedding is added to [cls, patches] before the registers
    are inserted, and resampled (official interpolate_pos_encoding) for other resolutions."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, n = cfg.embed_dim, (cfg.img_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, D)) \
            if cfg.num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, D)) if cfg.layerscale else None  # DINOv2 only; unused
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.blocks = nn.ModuleList(dinov2_block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def interpolate_pos_encoding(self, H, W):
        """(1, 1 + h*w, D) position embedding for an H x W image (official rule, see golden README sec. 3)."""
        pos, p, c = self.pos_embed, self.cfg.patch_size, self.cfg
        M = int(math.sqrt(pos.shape[1] - 1))
        h, w = H // p, W // p
        if h * w == M * M and H == W:
            return pos
        grid = pos[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)      # (1, D, M, M)
        if c.interpolate_offset:  # scale_factor, not size: samples at (dst + .5) * M / (n + offset) - .5
            kw = {"scale_factor": ((h + c.interpolate_offset) / M, (w + c.interpolate_offset) / M)}
        else:
            kw = {"size": (h, w)}
        grid = F.interpolate(grid, mode="bicubic", antialias=c.interpolate_antialias, **kw)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)], dim=1)

    def prepare_tokens(self, x):
        B, _, H, W = x.shape
        t = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        t = t + self.interpolate_pos_encoding(H, W)                              # (B, 1 + N, D)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(B, -1, -1), t[:, 1:]], dim=1)
        return t

    def block_outputs(self, x, n=1):
        """Raw outputs (B, T, D) of the last n blocks (int) or of the given block indices (list)."""
        keep = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        t, outs = self.prepare_tokens(x), []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in keep:
                outs.append(t)
        return outs

    def forward_features(self, x):
        t = self.block_outputs(x)[0]
        r = 1 + self.cfg.num_register_tokens
        n = self.norm(t)
        return {"x_norm_clstoken": n[:, 0], "x_norm_regtokens": n[:, 1:r], "x_norm_patchtokens": n[:, r:],
                "x_prenorm": t}

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(self, x, n=1, norm=True, return_class_token=False):
        """Official DINOv2 API: patch tokens (and cls) of the last n blocks / of the listed blocks."""
        outs = [self.norm(t) if norm else t for t in self.block_outputs(x, n)]
        patches = [t[:, 1 + self.cfg.num_register_tokens:] for t in outs]
        return tuple(zip(patches, [t[:, 0] for t in outs])) if return_class_token else tuple(patches)

    def get_last_selfattention(self, x):
        """Softmax attention (B, heads, T, T) of the last block (DINO v1 API)."""
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        a = self.blocks[-1].attn
        B, T, D = t.shape
        q, k, _ = a.qkv(self.blocks[-1].norm1(t)).view(B, T, 3, a.heads, D // a.heads).permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-2, -1) * (D // a.heads) ** -0.5).softmax(dim=-1)


def resample_patch_embed(w, new):
    """timm resample_patch_embed (bicubic, antialias): the kernel w' with <w', resize(x)> ~ <w, x>, i.e.
    w' = w @ pinv(M) where column j of M is the resized j-th basis patch."""
    O, C, k, _ = w.shape
    eye = torch.eye(k * k, dtype=torch.float32).reshape(k * k, 1, k, k)
    M = F.interpolate(eye, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    M = M.reshape(k * k, new * new).t()                                       # (new^2, k^2)
    return (w.float().reshape(O, C, k * k) @ torch.linalg.pinv(M)).reshape(O, C, new, new)


def dinov2_to_patch(sd, patch_size, grid):
    """MAETok's DINOv2 teacher (timm create_model(..., img_size=grid*patch, patch_size=patch) from the official
    file): the 14-px kernel resampled to `patch_size`, the 37x37 position grid resized to grid x grid
    (bicubic, antialias), both once at load time. Returns a new official-format state dict."""
    sd = dict(sd)
    sd["patch_embed.proj.weight"] = resample_patch_embed(sd["patch_embed.proj.weight"], patch_size)
    pos = sd["pos_embed"]
    M = int(math.sqrt(pos.shape[1] - 1))
    g = pos[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    sd["pos_embed"] = torch.cat([pos[:, :1], g.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    return sd


def load_dinov2(arch="vitb14", registers=False, ckpt=None, state_dict=None, cfg=None, patch_size=None, grid=None):
    """DINOv2 frozen in eval mode from the official file (URL by default, --dinov2_ckpt a local path, or a state
    dict). patch_size / grid: MAETok's converted teacher (see dinov2_to_patch); otherwise patch 14 with runtime
    position interpolation, exactly as the official hub model."""
    if arch not in DINOV2_ARCHS:
        raise ValueError(f"unknown DINOv2 arch {arch!r}; choose one of {sorted(DINOV2_ARCHS)}")
    cfg = cfg or dinov2_config(arch, registers)
    url = DINOV2_URL.format(arch=arch, reg="_reg4" if cfg.num_register_tokens else "")
    sd = state_dict if state_dict is not None else load_official(url, ckpt, "--dinov2_ckpt")
    if patch_size:
        sd = dinov2_to_patch(sd, patch_size, grid)
        cfg = ViTConfig(**{**cfg.__dict__, "patch_size": patch_size, "img_size": patch_size * grid})
    return load_strict(DinoViT(cfg), sd, f"official DINOv2 {arch}{'_reg4' if cfg.num_register_tokens else ''}")


def load_dino_v1(ckpt=None, state_dict=None, cfg=None):
    """DINO v1 ViT-S/16 (dino_deitsmall16_pretrain.pth) frozen in eval mode."""
    cfg = cfg or ViTConfig(384, 12, 6, patch_size=16, img_size=224, layerscale=False)
    sd = state_dict if state_dict is not None else load_official(DINO_V1_URL, ckpt, "--dino_ckpt")
    return load_strict(DinoViT(cfg), sd, "official DINO v1 ViT-S/16")


class FeatureTarget(nn.Module):
    """A frozen ViT as a per-patch feature target: image in [-1, 1] -> ImageNet normalisation (the official MAETok
    code feeds SigLIP ImageNet statistics too, not its native 0.5 / 0.5) -> forward_features (B, N, D)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x):
        return ((x.float() + 1) / 2 - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x):
        return self.vit.forward_features(self.normalize(x))


class DINOv2Target(FeatureTarget):
    """A frozen DINOv2 as a per-patch feature target: image (B, 3, H, W) in [-1, 1] -> (B, grid^2, D).
    mode 'patch' (default; official MAETok): a teacher converted to the tokenizer's patch size, fed the image at
    its own resolution. 'resize' (REPA / AlignTok): bicubic resize to grid*14 px, patch 14 kept."""

    def __init__(self, vit, grid, mode="patch"):
        super().__init__(vit)
        self.grid, self.mode = grid, mode

    @torch.no_grad()
    def forward(self, x):
        x = self.normalize(x)
        if self.mode == "resize":
            x = F.interpolate(x, size=(self.grid * 14, self.grid * 14), mode="bicubic", align_corners=False)
        return self.vit.forward_features(x)["x_norm_patchtokens"]


def dinov2_target(image_size, patch_size, arch="vitl14", mode="patch", ckpt=None, state_dict=None, cfg=None):
    """MAETok's DINOv2 aux target (official: ViT-L/14 converted to patch 16 at 256 px)."""
    if mode not in ("patch", "resize"):
        raise ValueError(f"DINOv2 target mode {mode!r}: choose 'patch' or 'resize'")
    grid = image_size // patch_size
    vit = load_dinov2(arch, ckpt=ckpt, state_dict=state_dict, cfg=cfg,
                      patch_size=patch_size if mode == "patch" else None, grid=grid)
    return DINOv2Target(vit, grid, mode)


# ----------------------------------------------------------------------------------------------------------
# SigLIP SO400M/14 (MAETok's third teacher): timm vit_so400m_patch14_siglip_gap_224, no cls token, average pool

SIGLIP_URL = "https://huggingface.co/timm/ViT-SO400M-14-SigLIP/resolve/main/open_clip_pytorch_model.bin"
SIGLIP_SO400M = (1152, 27, 16)  # width, depth, heads; MLP hidden int(3.7362 * width) = 4304, exact GELU


class SigLIPViT(nn.Module):
    """timm's SigLIP ViT trunk: patches + position embedding (no cls), pre-LN blocks, final LN. The stored
    position grid is resampled to the input grid at run time (timm dynamic_img_size: bicubic, antialias)."""

    def __init__(self, dim=1152, depth=27, heads=16, patch_size=16, grid=16):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 3.7362) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, h, w):
        pos, M = self.pos_embed, int(math.sqrt(self.pos_embed.shape[1]))
        if (h, w) == (M, M):
            return pos
        g = pos.float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        return g.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)

    def forward_features(self, x):
        """x (B, 3, H, W), ImageNet-normalised -> final-LN patch tokens (B, N, D)."""
        p = self.patch_embed.proj.kernel_size[0]
        t = self.patch_embed(x) + self.position_embedding(x.shape[-2] // p, x.shape[-1] // p)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)


def siglip_state_dict(sd, patch_size):
    """The OpenCLIP file MAETok downloads (visual.trunk.*; the text tower, logit scale / bias and the MAP head
    dropped, as timm's strict=False load drops attn_pool) or a timm-native dict, the kernel resampled 14 -> 16."""
    if any(k.startswith("visual.trunk.") for k in sd):
        sd = {k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("attn_pool.")}
    if "patch_embed.proj.weight" in sd and sd["patch_embed.proj.weight"].shape[-1] != patch_size:
        sd["patch_embed.proj.weight"] = resample_patch_embed(sd["patch_embed.proj.weight"], patch_size)
    return sd


def siglip_target(patch_size=16, ckpt=None, state_dict=None, arch=SIGLIP_SO400M):
    """MAETok's SigLIP aux target: SO400M/14 (OpenCLIP 'webli', SigLIP 1; recent timm resolves the bare model name
    to SigLIP 2, another teacher) with its kernel resampled to the tokenizer's patch; the 16 x 16 position grid
    is kept (224 / 14 = 256 / 16) and resampled at run time for other grids."""
    sd = state_dict if state_dict is not None else load_official(SIGLIP_URL, ckpt, "--siglip_ckpt")
    sd = siglip_state_dict(dict(sd), patch_size)
    grid = int(math.sqrt(sd["pos_embed"].shape[1])) if "pos_embed" in sd else 16
    vit = SigLIPViT(*arch, patch_size=patch_size, grid=grid)
    return FeatureTarget(load_strict(vit, sd, "official SigLIP SO400M/14 (OpenCLIP open_clip_pytorch_model.bin)"))
