"""
Networks whose weights come from elsewhere, each loading its official checkpoint format from the official
URL (torch.hub.load_state_dict_from_url) or a local path. Torch only: no torchvision, timm or lpips import.

So far: VGG16 + LPIPS v0.1 'vgg' (Zhang et al. 2018; the `lpips` 0.1.4 package), the perceptual loss of
MAETok. To come (issue "pretrained.py"): FID InceptionV3, DINOv2, DINO v1.
"""
import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision IMAGENET1K_V1


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
