"""
Sample from a trained diffusion checkpoint (EMA weights), decoding the latents with its tokenizer.

A picture grid of chosen classes and seeds:
  python sample.py --ckpt results/001-SiT-XL --classes 207,360,387,974 --seeds 0,1,2,3 --cfg_scale 1.9
Many samples for evaluation, as an ADM-style .npz (arr_0 uint8 NHWC, labels beside it), in parallel:
  torchrun --nproc_per_node=8 sample.py --ckpt results/001-SiT-XL --num_samples 50000 --sampler sde \
      --num_steps 250 --cfg_scale 1.9 --guidance_interval 0,0.75
Sample i always starts from the noise of seed (--seed, i) and gets label i mod K (balanced) or a label drawn
from that seed (uniform), so the images do not depend on the number of processes or the batch size.
Released denoisers (released.py: SiT, MAETok's SiT, LightningDiT) sample the same way, given their tokenizer:
  python sample.py --ckpt hf/sit-xl_maetok-b-128 --tokenizer_ckpt hf/maetok-b-128 --num_samples 50000 \
      --sampler sde --num_steps 250 --cfg_scale 1.9 --guidance_interval 0,0.75
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from diffusion import DiT, DiTConfig, Transport, guided_velocity
import released
from engine import PRECISION_HELP, PRECISIONS, autocast_context, check_shared_folder, setup_distributed
from tokenizer import from_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample a grid or an ADM-style .npz from a diffusion checkpoint")
    p.add_argument("--ckpt", required=True, help="diffusion run folder or checkpoint")
    p.add_argument("--tokenizer_ckpt", default=None,
                   help="tokenizer checkpoint or release (default: the one it was trained on)")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7", help="grid: comma list of class ids (one row each)")
    p.add_argument("--seeds", default="0,1,2,3", help="grid: comma list of seeds (one column each)")
    p.add_argument("--num_samples", type=int, default=0, help="> 0: write that many samples to an .npz")
    p.add_argument("--labels", default="balanced", choices=["balanced", "uniform"],
                   help=".npz: labels i mod K (exactly balanced) or uniform at random")
    p.add_argument("--batch_size", type=int, default=64, help="samples per forward on one process")
    p.add_argument("--sampler", default="euler", choices=["euler", "heun", "sde"], help="ODE Euler / Heun or SDE")
    p.add_argument("--num_steps", type=int, default=50, help="sampling steps")
    p.add_argument("--timestep_shift", type=float, default=1.0,
                   help="t' = s t / (1 + (s - 1) t), t = 1 noise (LightningDiT's 0.3 is 1/0.3 = 3.33 here)")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance_interval", default="0,1", help="'low,high': guide only where low <= t <= high")
    p.add_argument("--guide_channels", type=int, default=None,
                   help="guide only the first k latent channels; default: a released SiT / LightningDiT's 3, else all")
    p.add_argument("--latent_stats", default=None,
                   help="latent normalisation: a .pt with mean / std (LightningDiT's latents_stats.pt) or 'mean,std'; "
                        "default: the diffusion checkpoint's, else the released tokenizer's")
    p.add_argument("--seed", type=int, default=0, help="global seed of the .npz samples")
    p.add_argument("--out", default=None,
                   help="output .png (grid) or .npz (default: in the run folder; for a release, here)")
    p.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (one graph per batch shape)")
    args = p.parse_args(argv)
    try:
        args.classes = [int(c) for c in args.classes.split(",") if c]
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
        lo, hi = (float(v) for v in args.guidance_interval.split(","))
    except ValueError:
        p.error("--classes and --seeds are comma lists of integers, --guidance_interval is 'low,high'")
    if not 0 <= lo <= hi <= 1:
        p.error(f"--guidance_interval {args.guidance_interval}: need 0 <= low <= high <= 1 (t = 1 is noise)")
    args.guidance_interval = (lo, hi)
    if args.num_steps <= 0 or args.batch_size <= 0 or args.num_samples < 0 or args.timestep_shift <= 0:
        p.error("--num_steps, --batch_size and --timestep_shift must be positive, --num_samples >= 0")
    return args


def read_latent_stats(spec):
    """--latent_stats: 'mean,std' numbers, or a .pt dict of mean / std tensors (per channel: any shape of C)."""
    if os.path.isfile(spec):
        st = torch.load(spec, map_location="cpu", weights_only=True)
        if not (isinstance(st, dict) and "mean" in st and "std" in st):
            sys.exit(f"error: --latent_stats {spec!r} holds no 'mean' and 'std'")
        return {k: torch.as_tensor(st[k]).float().flatten() for k in ("mean", "std")}  # (C,): channel last
    try:
        m, sd = (float(v) for v in spec.split(","))
    except ValueError:
        sys.exit(f"error: --latent_stats {spec!r} is neither a file nor 'mean,std'")
    return {"mean": torch.tensor(m), "std": torch.tensor(sd)}


def load(args, device):
    """The denoiser, latent statistics and tokenizer of a diffusion checkpoint or a released denoiser."""
    ckpt = released.load(args.ckpt)
    kind = ckpt.get("released_kind")
    if "latent_stats" not in ckpt and not kind:
        sys.exit(f"error: {args.ckpt!r} is not a diffusion checkpoint (no latent statistics); "
                 f"sample.py needs a train_diffusion.py run or a released SiT / LightningDiT")
    model = DiT(DiTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"] if args.raw else ckpt["ema"])
    tok_path = args.tokenizer_ckpt or ckpt.get("tokenizer_ckpt")
    if tok_path is None:
        sys.exit(f"error: {args.ckpt!r} is a released {kind} without its tokenizer; pass --tokenizer_ckpt")
    if not os.path.exists(tok_path):
        sys.exit(f"error: tokenizer checkpoint {tok_path!r} not found; pass it with --tokenizer_ckpt")
    tok_ckpt = released.load(tok_path)
    tok = from_checkpoint(tok_ckpt)
    if tuple(tok.latent_shape) != (model.cfg.num_tokens, model.cfg.in_channels):
        sys.exit(f"error: tokenizer {tok_path!r} makes {tuple(tok.latent_shape)} latents, the denoiser expects "
                 f"({model.cfg.num_tokens}, {model.cfg.in_channels})")
    stats = read_latent_stats(args.latent_stats) if args.latent_stats else (
        ckpt.get("latent_stats") or tok_ckpt.get("latent_stats"))
    if stats is None:
        sys.exit(f"error: no latent statistics for the released {kind}: pass --latent_stats (LightningDiT: its "
                 f"latents_stats.pt; SiT-XL/2 on SD-VAE latents: 0,5.4915 = 1 / 0.18215)")
    if args.guide_channels is None:
        args.guide_channels = ckpt.get("guide_channels")
    args.released = bool(kind)
    return model.eval().to(device), tok.to(device), stats["mean"].to(device), stats["std"].to(device)


@torch.no_grad()
def generate(model, tok, mean, std, labels, seeds, args, device, ctx):
    """Images (B, 3, H, W) in [-1, 1]: sample b from noise and SDE noise of its own seed seeds[b]."""
    c = model.cfg
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(c.num_tokens, c.in_channels, generator=g, device=device) for g in gens])
    y = torch.as_tensor(labels, device=device)
    velocity = guided_velocity(model, y, args.cfg_scale, args.guidance_interval, args.guide_channels)
    with ctx:
        z = Transport().sample(velocity, noise, args.sampler, args.num_steps, args.timestep_shift, generators=gens)
        return tok.decode(z * std + mean).float()                             # un-normalize, decode


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, _, device = setup_distributed()
    _, ctx = autocast_context(args.precision, device)
    model, tok, mean, std = load(args, device)
    if args.compile:  # in place, so forward_with_cfg's self(...) runs the compiled graph too; t is a tensor
        model.compile(fullgraph=True)
    K = model.cfg.num_classes
    if K and any(not 0 <= y < K for y in args.classes):
        sys.exit(f"error: --classes {args.classes}: this model has classes 0..{K - 1}")
    run_dir = (os.getcwd() if args.released  # a release: outputs in the working directory, not in its folder
               else os.path.dirname(os.path.dirname(os.path.abspath(released.locate(args.ckpt)))))
    tag = f"{args.sampler}{args.num_steps}-cfg{args.cfg_scale}"
    if args.num_samples == 0:  # a grid: rows are classes, columns seeds
        if rank == 0:
            labels = [y for y in args.classes for _ in args.seeds]
            seeds = [s for _ in args.classes for s in args.seeds]
            img = generate(model, tok, mean, std, labels, seeds, args, device, ctx)
            n = len(args.seeds)
            out = args.out or os.path.join(run_dir, f"samples-{tag}.png")
            data.save_image_grid([img[j::n] for j in range(n)], out)
            print(f"wrote {out}: classes {args.classes} (rows) x seeds {args.seeds} (columns)")
    else:
        # sample i: seed (seed, i); label i mod K or from its own generator. Rank r makes i = r, r + world, ...
        # Each rank writes its share to a memory-mapped .npy as it goes; rank 0 then holds the one in-memory copy
        # that becomes the .npz (50K samples at 256 px: 9.8 GB)
        out = args.out or os.path.join(run_dir, f"samples-{args.num_samples}-{tag}.npz")
        check_shared_folder(os.path.dirname(os.path.abspath(out)), rank, world, "the output folder")
        mine = list(range(rank, args.num_samples, world))
        part, labels = None, np.zeros(len(mine), dtype=np.int64)
        for b in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, desc="sampling"):
            idx = mine[b:b + args.batch_size]
            seeds = [args.seed * 1_000_003 + i for i in idx]
            if args.labels == "balanced" or not K:
                ys = [i % max(K, 1) for i in idx]
            else:
                ys = [int(torch.randint(K, (), generator=torch.Generator().manual_seed(s + 7))) for s in seeds]
            u8 = data.to_uint8(generate(model, tok, mean, std, ys, seeds, args, device, ctx)).numpy()
            if part is None:
                part = np.lib.format.open_memmap(f"{out}.part{rank:03d}.npy", "w+", np.uint8, (len(mine),) + u8.shape[1:])
            part[b:b + len(idx)] = u8
            labels[b:b + len(idx)] = ys
        if part is not None:
            part.flush()
            np.save(f"{out}.labels{rank:03d}.npy", labels)
        del part
        if ddp:
            dist.barrier()
        if rank == 0:
            shape = np.load(f"{out}.part000.npy", mmap_mode="r").shape[1:]
            arr, lab = np.empty((args.num_samples,) + shape, np.uint8), np.empty(args.num_samples, np.int64)
            for r in range(min(world, args.num_samples)):
                arr[r::world] = np.load(f"{out}.part{r:03d}.npy", mmap_mode="r")
                lab[r::world] = np.load(f"{out}.labels{r:03d}.npy")
                os.remove(f"{out}.part{r:03d}.npy")
                os.remove(f"{out}.labels{r:03d}.npy")
            tmp = out + ".tmp.npz"
            np.savez(tmp, arr_0=arr, labels=lab)
            os.replace(tmp, out)
            counts = np.bincount(lab)
            print(f"wrote {out}: arr_0 {arr.shape} uint8, labels {lab.shape} "
                  f"({len(counts)} classes, {counts.min()}..{counts.max()} per class)")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
