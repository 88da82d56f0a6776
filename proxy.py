"""
A proxy feature network for small-scale work, where the ImageNet Inception is meaningless (32-px procedural
shapes) or unavailable (offline): a small CNN classifier trained on a labeled dataset (the built-in one by
default). evaluate.py uses its penultimate features for FID / precision / recall and its predictions for the
class accuracy of generated samples, always reported under the name "proxy" (never as an Inception FID).

  python proxy.py --image_size 32 --out results/proxy-builtin-32.pt      # about 2 minutes on 2 CPU cores
"""
import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data


@dataclass
class ProxyConfig:
    image_size: int = 32
    num_classes: int = 10
    width: int = 16        # channels of the first stage; doubled at each of the 4 stages
    feature_dim: int = 256  # penultimate features (the FID space)


class ProxyNet(nn.Module):
    """4 stages of (conv3x3-BN-ReLU) x 2 with stride-2 downsampling, global average pool, a linear
    bottleneck to feature_dim (the features), ReLU, linear classifier. Any input size is resized first."""

    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.cfg = cfg
        layers, c = [], 3
        for i in range(4):
            w = cfg.width * 2 ** i
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(), nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.trunk = nn.Sequential(*layers)
        self.fc = nn.Linear(c, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def resize(self, x):
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, x):
        """x (B, 3, H, W) in [-1, 1] -> (B, feature_dim)."""
        return self.fc(self.trunk(self.resize(x)).mean(dim=(2, 3)))

    def stages(self, x):
        """x (B, 3, H, W) in [-1, 1] -> the 4 stage outputs (B, width * 2^i, s / 2^i, s / 2^i)."""
        x, out = self.resize(x), []
        for i in range(4):
            x = self.trunk[6 * i:6 * i + 6](x)
            out.append(x)
        return out

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def load_proxy(path):
    """A trained proxy network, frozen, in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--proxy_ckpt {path!r}: no such file; train one with python proxy.py")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "proxy_config" not in ck:
        raise ValueError(f"{path!r} is not a proxy-network checkpoint (made by proxy.py)")
    model = ProxyNet(ProxyConfig(**ck["proxy_config"]))
    model.load_state_dict(ck["model"])
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model, ds, n, batch_size=256):
    """Accuracy on n class-balanced images of ds (never the first n of a class-sorted folder)."""
    idx = data.balanced_subset(ds.source.labels, n)
    correct = 0
    for b in range(0, len(idx), batch_size):
        items = [ds[i] for i in idx[b:b + batch_size]]
        x, y = torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])
        correct += (model(x).argmax(-1) == y).sum().item()
    return correct / len(idx)


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the proxy classifier used by evaluate.py --feature_net proxy")
    p.add_argument("--data_path", default=data.BUILTIN, help="labeled ImageFolder folder, .npz, or 'builtin'")
    p.add_argument("--val_data_path", default=None, help="held-out images (builtin: its val split)")
    p.add_argument("--image_size", type=int, default=32, help="resolution the proxy sees")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW lr (cosine to 0)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--num_workers", type=int, default=2, help="data loader workers")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--out", default=None, help="checkpoint path (default results/proxy-<data>-<size>.pt)")
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit("error: proxy.py trains on one process (it is small); run it with python, not torchrun: under "
                 "torchrun every rank would train a copy and write the same file")
    if args.steps <= 0 or args.batch_size <= 0 or args.image_size <= 0:
        p.error("--steps, --batch_size and --image_size must be positive")
    try:
        src = data.build_source(args.data_path, args.image_size, "train")
        if args.val_data_path or args.data_path == data.BUILTIN:
            val = data.build_source(args.val_data_path or args.data_path, args.image_size, "val")
        else:  # one labeled folder: hold out a class-stratified 10% for the accuracy
            train_idx, val_idx = data.stratified_split(src.labels, 0.1, args.seed)
            src, val = data.SubsetSource(src, train_idx), data.SubsetSource(src, val_idx)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if src.num_classes < 2:
        sys.exit("error: the proxy classifier needs labeled data (class subfolders), found one class")
    torch.manual_seed(args.seed)
    model = ProxyNet(ProxyConfig(args.image_size, src.num_classes, args.width))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warm = max(1, args.steps // 10)  # linear warmup, then cosine to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(1.0, (s - warm) / max(1, args.steps - warm)))) if s >= warm else 1.0))
    ds = data.ImageDataset(src, args.image_size, train=True, seed=args.seed)
    step, bar = 0, tqdm(total=args.steps, desc="proxy")
    for epoch in range(10 ** 9):
        bs = data.epoch_batches(len(ds), epoch, args.seed, 0, 1, args.batch_size)
        for x, y, _ in torch.utils.data.DataLoader(ds, batch_sampler=bs, num_workers=args.num_workers):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step == args.steps:
                break
        if step == args.steps:
            break
    bar.close()
    model.eval()
    acc = accuracy(model, data.ImageDataset(val, args.image_size, train=False), 2000)
    out = args.out or os.path.join("results", f"proxy-{os.path.basename(str(args.data_path).rstrip('/'))}-"
                                              f"{args.image_size}.pt")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    state = {"model": model.state_dict(), "proxy_config": asdict(model.cfg), "val_accuracy": acc,
             "data_path": args.data_path, "classes": list(getattr(src, "classes", []))}
    torch.save(state, out + ".tmp")
    os.replace(out + ".tmp", out)
    print(f"proxy network: held-out accuracy {acc * 100:.1f}% ({min(2000, len(val))} images) -> {out}")
    return out


if __name__ == "__main__":
    main()
