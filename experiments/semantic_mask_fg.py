"""
Does MacTok's teacher-guided masking mask the object? On held-out built-in images, with their exact shape masks
(data.render_shape_mask), the share of foreground among the patches that semantic masking picks (top-k of the
teacher's cls-patch cosine) against random masking's, at the same ratios. A patch is foreground when more than
half of its pixels are.

  python experiments/semantic_mask_fg.py --teacher_proxy_ckpt results/quickstart-full/proxy.pt
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from mactok import ProxyTeacher  # noqa: E402
from proxy import load_proxy  # noqa: E402
from tokenizer import build, make_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="foreground share of semantic against random masks")
    p.add_argument("--teacher_proxy_ckpt", required=True, help="the proxy classifier used as MacTok's teacher")
    p.add_argument("--num_images", type=int, default=1000, help="held-out built-in images")
    p.add_argument("--ratios", default="0.25,0.5,0.7", help="comma list of mask ratios")
    args = p.parse_args(argv)
    cfg = make_config("MacTok-tiny", semantic_mask_prob=1.0)
    tok = build(cfg)
    teacher = ProxyTeacher(load_proxy(args.teacher_proxy_ckpt), cfg.grid_size)
    src = data.BuiltinSource(cfg.image_size, args.num_images, "val")
    ds = data.ImageDataset(src, cfg.image_size, train=False)
    x = torch.stack([ds[i][0] for i in range(len(src))])
    cover = torch.stack([torch.from_numpy(src.mask(i)) for i in range(len(src))]).float()[:, None]
    fg = (F.avg_pool2d(cover, cfg.patch_size) > 0.5).flatten(1)                # (N, num_patches)
    t = teacher(x)
    print(f"foreground share of all patches: {fg.float().mean():.3f} ({args.num_images} images, "
          f"{cfg.num_patches} patches each)")
    print("| mask ratio | FG share of semantic-masked patches | of random-masked patches | of all |")
    print("|---|---|---|---|")
    torch.manual_seed(0)
    for r in (float(v) for v in args.ratios.split(",")):
        sem = tok.sample_mask(len(x), "cpu", ratio=r, teacher=t)
        tok.cfg.semantic_mask_prob = 0.0
        rnd = tok.sample_mask(len(x), "cpu", ratio=r, teacher=t)
        tok.cfg.semantic_mask_prob = 1.0
        share = lambda m: (fg & m).sum().item() / m.sum().item()
        print(f"| {r:g} | {share(sem):.3f} | {share(rnd):.3f} | {fg.float().mean():.3f} |")
    per_class = [(fg[i::10] & sem[i::10]).sum().item() / sem[i::10].sum().item() for i in range(10)]
    print("per class at the last ratio (semantic): " + ", ".join(f"{c} {v:.2f}" for c, v in
                                                                 zip(data.BUILTIN_CLASSES, per_class)))
    return np.array(per_class)


if __name__ == "__main__":
    main()
