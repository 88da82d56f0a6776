"""
Encode a dataset once with a trained tokenizer (EMA weights), each image with and without horizontal flip
(LightningDiT's latent cache), into shards, with the per-channel latent mean and std for normalization.
One script for a CPU process, one GPU, or torchrun (each rank encodes every world-th image).

  python cache_latents.py --tokenizer_ckpt results/000-MAETok-tiny --cache_path results/cache-tiny
  torchrun --nproc_per_node=8 cache_latents.py --tokenizer_ckpt tok.pt --data_path /data/imagenet/train \
      --cache_path /data/cache/maetok-b-128
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import released
from engine import PRECISION_HELP, PRECISIONS, autocast_context, check_shared_folder, setup_distributed
from tokenizer import comparable_config, from_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Encode a dataset into a latent cache for train_diffusion.py")
    p.add_argument("--tokenizer_ckpt", required=True,
                   help="tokenizer run folder, checkpoint (EMA weights used) or official MAETok release folder")
    p.add_argument("--data_path", default=data.BUILTIN, help="ImageFolder folder, .npz file, or 'builtin'")
    p.add_argument("--builtin_size", type=int, default=50_000, help="number of built-in training images")
    p.add_argument("--cache_path", required=True, help="output folder (shards + meta.json)")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward on one rank")
    p.add_argument("--cache_dtype", default="float32", choices=["float16", "float32"],
                   help="stored latent dtype (float16 halves the disk; the statistics are always float64)")
    p.add_argument("--shard_size", type=int, default=10_000, help="images per shard file")
    p.add_argument("--num_workers", type=int, default=4, help="data loader workers per rank")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="the encoder's precision; fp32 by default: the latents are the denoiser's data, and bf16 "
                        "autocast would round them to 8 bits of mantissa (a one-off pass). " + PRECISION_HELP)
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.shard_size <= 0 or args.builtin_size <= 0:
        p.error("--batch_size, --shard_size and --builtin_size must be positive")
    return args


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, _, device = setup_distributed()
    _, ctx = autocast_context(args.precision, device)
    ckpt_path = released.locate(args.tokenizer_ckpt)
    ckpt = released.load(ckpt_path)
    tok = from_checkpoint(ckpt).to(device)
    size, (L, C) = tok.image_size, tok.latent_shape
    try:
        src = data.build_source(args.data_path, size, "train", args.builtin_size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    ds = data.ImageDataset(src, size, train=False)                          # ADM center crop, no augmentation
    if rank == 0:
        os.makedirs(args.cache_path, exist_ok=True)
        if os.path.exists(os.path.join(args.cache_path, data.CACHE_META)):  # an old meta never describes new shards
            os.remove(os.path.join(args.cache_path, data.CACHE_META))
    check_shared_folder(args.cache_path, rank, world, "--cache_path")
    mine = list(range(rank, len(ds), world))
    dtype = getattr(torch, args.cache_dtype)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, mine), batch_size=args.batch_size,
                                         num_workers=args.num_workers)
    shards, buf, done = [], {"i": [], "y": [], "z": [], "zf": []}, 0
    moments = torch.zeros(1 + 2 * C, dtype=torch.float64, device=device)  # on the device: no copy per batch
    for x, y, _ in tqdm(loader, disable=rank != 0, desc="encoding"):
        x = x.to(device)
        with ctx:
            z, zf = tok.encode(x).float(), tok.encode(x.flip(-1)).float()   # (B, L, C) each
        moments = moments + data.channel_moments(z)
        buf["i"] += mine[done:done + len(x)]
        buf["y"] += y.tolist()
        buf["z"].append(z.cpu())
        buf["zf"].append(zf.cpu())
        done += len(x)
        if len(buf["i"]) >= args.shard_size or done == len(mine):
            shards.append(data.write_latent_shard(args.cache_path, rank, len(shards), buf["i"], buf["y"],
                                                  torch.cat(buf["z"]), torch.cat(buf["zf"]), dtype))
            buf = {"i": [], "y": [], "z": [], "zf": []}
    all_shards = [None] * world
    if ddp:
        dist.all_reduce(moments)
        dist.all_gather_object(all_shards, shards)
    else:
        all_shards = [shards]
    if rank == 0:
        mean, std = data.moments_to_stats(moments.cpu())
        meta = {"num_images": len(ds), "num_classes": src.num_classes, "image_size": size,
                "latent_shape": [L, C], "grid": tok.grid,
                "mean": mean.tolist(), "std": std.tolist(), "dtype": args.cache_dtype,
                "tokenizer_ckpt": os.path.abspath(ckpt_path), "tokenizer_step": ckpt.get("step"),
                "tokenizer_config": comparable_config(ckpt["config"]),
                "data_path": args.data_path, "shards": [s for r in all_shards for s in r]}
        tmp = os.path.join(args.cache_path, data.CACHE_META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(args.cache_path, data.CACHE_META))     # written last: the cache is complete
        print(f"cache {args.cache_path}: {len(ds)} images x 2 flips, latents {meta['latent_shape']}, "
              f"channel mean {mean.mean():.4f} (avg), std {std.mean():.4f} (avg)")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
