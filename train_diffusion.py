"""
Train a SiT / LightningDiT denoiser in a tokenizer's latent space. One script for a CPU process, one GPU, or
torchrun (DDP). Trains on a latent cache (cache_latents.py), or encodes images on the fly with
--tokenizer_ckpt when there is no cache. Latents are normalized per channel with statistics that live in the
cache and in every checkpoint.

  python train_diffusion.py --model tiny --cache_path results/cache-tiny ...                   (see README)
  torchrun --nproc_per_node=8 train_diffusion.py --model SiT-XL --cache_path /data/cache/maetok-b-128
  torchrun --nproc_per_node=8 train_diffusion.py --model LightningDiT-XL --cache_path ...  # its own recipe
  python train_diffusion.py --resume results/001-SiT-XL
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
from tqdm import tqdm

import data
import engine
import released
from diffusion import PRESETS, DiT, DiTConfig, Transport, guided_velocity, make_config, recipe
from tokenizer import comparable_config, from_checkpoint

RESUME_FLAGS = ("max_steps", "log_every", "ckpt_every", "grid_every", "num_workers", "compile",
                "keep_checkpoints", "resume", "tokenizer_ckpt", "micro_batch_size", "nonfinite_patience")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train SiT / LightningDiT on tokenizer latents (defaults: SiT recipe)")
    g = p.add_argument_group("what to train")
    go = p.add_argument_group("optimisation and loss")
    gr = p.add_argument_group("run: folders, resume, logging")
    g.add_argument("--model", default="SiT-XL", choices=sorted(PRESETS), help="denoiser preset")
    g.add_argument("--cache_path", default=None, help="latent cache folder from cache_latents.py")
    g.add_argument("--tokenizer_ckpt", default=None,
                   help="tokenizer run/checkpoint: encodes on the fly without a cache; decodes the picture grids")
    g.add_argument("--data_path", default=data.BUILTIN, help="images for on-the-fly encoding (no cache)")
    g.add_argument("--builtin_size", type=int, default=50_000, help="number of built-in training images")
    g.add_argument("--stats_images", type=int, default=10_000,
                   help="on-the-fly: images whose latents give the per-channel statistics (LightningDiT: 10K)")
    g.add_argument("--unconditional", action="store_true", help="no class labels")
    g.add_argument("--class_dropout", type=float, default=0.1, help="label dropout for CFG")
    g.add_argument("--qk_norm", action="store_true", help="QK-norm (LightningDiT long runs)")
    g.add_argument("--precision", default="auto", choices=engine.PRECISIONS, help=engine.PRECISION_HELP)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    go.add_argument("--global_batch_size", type=int, default=None, help="default: the preset's recipe (256 / 1024)")
    go.add_argument("--micro_batch_size", type=int, default=None, help="per-rank forward batch; sets accumulation")
    go.add_argument("--lr", type=float, default=None, help="constant lr (default: recipe, 1e-4 SiT / 2e-4 Lightning)")
    go.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default: recipe, 0.999 / 0.95)")
    go.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    go.add_argument("--warmup_steps", type=int, default=0, help="linear lr warmup (official: none)")
    go.add_argument("--grad_clip", type=float, default=0.0, help="max grad norm (0: none, official)")
    go.add_argument("--time_dist", default=None, choices=["uniform", "logit_normal"], help="default: recipe")
    go.add_argument("--cosine_loss", default=None, type=int, choices=[0, 1], help="LightningDiT cosine term")
    go.add_argument("--max_steps", type=int, default=400_000, help="optimizer steps")
    go.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per step")
    gr.add_argument("--results_dir", default="results", help="parent of the numbered run folders")
    gr.add_argument("--resume", default=None, help="run folder or checkpoint to resume exactly")
    gr.add_argument("--seed", type=int, default=0, help="global seed")
    gr.add_argument("--num_workers", type=int, default=4, help="data loader workers per rank (on-the-fly mode)")
    gr.add_argument("--log_every", type=int, default=100, help="steps between metrics.jsonl lines (-1 off)")
    gr.add_argument("--ckpt_every", type=int, default=50_000, help="steps between checkpoints (-1: only last)")
    gr.add_argument("--grid_every", type=int, default=10_000, help="steps between sample grids (-1 off)")
    gr.add_argument("--grid_steps", type=int, default=50, help="Euler steps for the picture grids")
    gr.add_argument("--grid_cfg", type=float, default=1.0, help="CFG scale for the picture grids")
    gr.add_argument("--keep_checkpoints", type=int, default=3, help="newest checkpoints kept (0 = all)")
    gr.add_argument("--nonfinite_patience", type=int, default=20,
                    help="consecutive steps with a non-finite loss or gradient (each skipped) before the run stops")
    args = p.parse_args(argv)
    return p, args, engine.explicit_flags(p, argv)


def resolve_flags(p, args, explicit):
    """The run's flags: a fresh run's preset recipe under the explicit flags, or a resumed run's checkpoint args
    with the explicit run-length flags; then the checks. Returns (args, the resumed checkpoint or None)."""
    ckpt = None
    if args.resume:  # defaults, then the checkpoint's args, then the explicit run-length flags
        ckpt = released.load(args.resume)
        args, ignored = engine.resume_args(p, args, explicit, ckpt["args"], RESUME_FLAGS)
        if ignored:
            print(f"resume: ignored {', '.join('--' + k for k in ignored)} (restored from the checkpoint)")
    else:
        engine.apply_recipe(args, recipe(args.model), explicit)  # the preset brings its recipe; explicit flags win
        args.cosine_loss = bool(args.cosine_loss)
    checks = [
        (args.cache_path or args.tokenizer_ckpt, "give --cache_path, or --tokenizer_ckpt to encode on the fly"),
        (args.global_batch_size > 0 and args.lr > 0, "--global_batch_size and --lr must be > 0"),
        (args.max_steps > 0 and args.warmup_steps >= 0, "need --max_steps > 0 and --warmup_steps >= 0"),
        (0 <= args.ema_decay < 1, "--ema_decay must be in [0, 1)"),
        (0 <= args.class_dropout < 1, "--class_dropout must be in [0, 1)"),
        (args.stats_images > 0 and args.grid_steps > 0, "--stats_images and --grid_steps must be positive"),
        (args.nonfinite_patience > 0, "--nonfinite_patience must be positive"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return args, ckpt


class OnTheFly(torch.utils.data.Dataset):
    """Images (train augmentation) for on-the-fly encoding: same (index, epoch) interface as the cache."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        x, y, _ = self.ds[item]
        return x, y


@torch.no_grad()
def latent_stats(tok, ds, n, device, ctx, batch_size=64):
    """Per-channel mean / std of the latents of n class-balanced images (center crops), as LightningDiT's
    10K random training latents; never the first n of a class-sorted folder."""
    idx, moments = data.balanced_subset(ds.source.labels, n), 0
    for b in range(0, len(idx), batch_size):
        x = torch.stack([ds[i][0] for i in idx[b:b + batch_size]]).to(device)
        with ctx:
            moments = moments + data.channel_moments(tok.encode(x).float())
    return data.moments_to_stats(moments.cpu())


@torch.no_grad()
def sample_grid(ema, tok, stats, num_classes, steps, cfg_scale, path, device, ctx):
    """8 classes x 4 seeds from the EMA model (Euler ODE), decoded by the tokenizer."""
    cfg = ema.cfg
    y = torch.arange(8, device=device).repeat_interleave(4) % max(1, num_classes)
    g = torch.Generator().manual_seed(0)  # private: grids never shift the training RNG
    noise = torch.randn(len(y), cfg.num_tokens, cfg.in_channels, generator=g).to(device)
    with ctx:
        z = Transport().sample(guided_velocity(ema, y, cfg_scale), noise, "euler", steps)
        img = tok.decode(z * stats[1].to(device) + stats[0].to(device)).float()  # un-normalize, then decode
    data.save_image_grid([img[i::4] for i in range(4)], path)


def main(argv=None):
    args, ckpt = resolve_flags(*parse_args(argv))  # a resumed run's config and flags come from its checkpoint
    ddp, rank, world, local, device = engine.setup_distributed()
    precision, ctx = engine.autocast_context(args.precision, device)
    if ckpt is not None:  # on another world size: the same global batch, the micro-batch re-planned
        args.micro_batch_size = engine.resume_micro_batch(args.global_batch_size, args.micro_batch_size,
                                                          len(ckpt["rng"]), world)
    micro, accum = engine.micro_batching(args.global_batch_size, args.micro_batch_size, world)

    # ---- data: a latent cache, or images encoded on the fly. Errors come before any work
    tok, tok_cfg = None, None
    if args.tokenizer_ckpt:
        tok_ckpt = released.load(args.tokenizer_ckpt)
        tok, tok_cfg = from_checkpoint(tok_ckpt).to(device), comparable_config(tok_ckpt["config"])
    try:
        if args.cache_path:
            train_ds = data.LatentCache(args.cache_path, seed=args.seed)
            train_ds.check(tokenizer_config=tok_cfg)
            stats = (train_ds.mean, train_ds.std)
            num_classes, (L, C) = train_ds.meta["num_classes"], train_ds.meta["latent_shape"]
            tok_cfg = train_ds.meta["tokenizer_config"]
            if tok is None and os.path.exists(train_ds.meta["tokenizer_ckpt"]):  # for the picture grids
                tok = from_checkpoint(released.load(train_ds.meta["tokenizer_ckpt"])).to(device)
        else:
            size = tok.image_size
            src = data.build_source(args.data_path, size, "train", args.builtin_size)
            train_ds = OnTheFly(data.ImageDataset(src, size, train=True, seed=args.seed))
            num_classes, (L, C) = src.num_classes, tok.latent_shape
            stats = None if ckpt else latent_stats(tok, data.ImageDataset(src, size, train=False), args.stats_images,
                                                   device, ctx)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if ckpt is not None:
        stats = (ckpt["latent_stats"]["mean"], ckpt["latent_stats"]["std"])
        if ckpt["tokenizer_config"] != tok_cfg:
            sys.exit("error: this run was trained on latents of another tokenizer (config differs); "
                     "resume with the same --cache_path / --tokenizer_ckpt")
    num_classes = 0 if args.unconditional else num_classes
    grid = train_ds.meta.get("grid") if args.cache_path else tok.grid                 # 2D latents: (H, W)
    cfg = DiTConfig(**ckpt["config"]) if ckpt else make_config(
        args.model, in_channels=C, num_tokens=L, grid=tuple(grid) if grid else None, num_classes=num_classes,
        class_dropout=args.class_dropout, **({"qk_norm": True} if args.qk_norm else {}))
    if (cfg.num_tokens, cfg.in_channels) != (L, C):
        sys.exit(f"error: the data holds ({L}, {C}) latents but the model expects ({cfg.num_tokens}, "
                 f"{cfg.in_channels})")
    per_rank = math.ceil(len(train_ds) / world)
    steps_per_epoch = per_rank // (micro * accum)
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_ds)} training latents are fewer than one global batch "
                 f"({args.global_batch_size}); lower --global_batch_size")
    mean, std = stats[0].to(device), stats[1].to(device)

    # ---- model, EMA, optimizer (same init on every rank)
    torch.manual_seed(args.seed)
    model = DiT(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2),
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    transport = Transport(args.time_dist, cosine_loss=args.cosine_loss)
    fwd = engine.wrap_model(model, args.compile, ddp, device, local)

    # ---- run folder, logging
    run = engine.Run(args.results_dir, args.model, args.resume if ckpt is not None else None, ddp, rank, world)
    run_dir, log = run.dir, run.log

    log(f"{'resuming ' + run_dir + f' at step {step}' if ckpt else 'run ' + run_dir} | device {device} x{world} | "
        f"precision {precision} | global batch {args.global_batch_size} = {world} ranks x {micro} x {accum} accum")
    log(f"parameters: {args.model} {engine.count(model) / 1e6:.2f}M on ({L}, {C}) latents, {num_classes} classes")
    log(f"config: {json.dumps(asdict(cfg))}")
    log(f"args: {json.dumps(vars(args))}")
    log(f"data: {len(train_ds)} {'cached latents' if args.cache_path else 'images, encoded on the fly'}, "
        f"{steps_per_epoch} steps/epoch; latent mean {mean.mean():.4f} std {std.mean():.4f} (channel averages)")
    if tok is None and args.grid_every > 0:
        log("no tokenizer available (give --tokenizer_ckpt): picture grids are off")

    torch.manual_seed(args.seed * world + rank)  # per-rank streams for t, noise and label dropout
    if ckpt is not None:
        run.restore_rng(ckpt, device, args.seed)

    def checkpoint(step):
        run.checkpoint(lambda: {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "config": asdict(cfg), "args": vars(args), "latent_stats": {"mean": stats[0].cpu(), "std": stats[1].cpu()},
            "tokenizer_config": tok_cfg,
            "tokenizer_ckpt": (os.path.abspath(released.locate(args.tokenizer_ckpt)) if args.tokenizer_ckpt
                               else train_ds.meta["tokenizer_ckpt"])}, step, args.keep_checkpoints, device)

    stream = engine.step_batches(train_ds, step, steps_per_epoch, accum, micro, args.seed, rank, world,
                                 args.num_workers, pin=device.type == "cuda", in_memory=bool(args.cache_path))

    model.train()
    sums, n_sum, t0 = {}, 0, time.time()
    streak, nonfinite = 0, 0  # consecutive non-finite steps; skipped updates since the last log
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for g in opt.param_groups:
            g["lr"] = lr
        log_now = args.log_every > 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.max_steps)
        terms = {}  # accum micro-batches, their gradients all-reduced on the last one only (DDP)
        for i in range(accum):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if not args.cache_path:
                with torch.no_grad(), ctx:
                    x = tok.encode(x).float()
            x = (x - mean) / std                                             # per-channel normalization
            with (fwd.no_sync() if ddp and i < accum - 1 else nullcontext()), ctx:
                out = transport.loss(fwd, x, y)
                (out["loss"] / accum).backward()
            engine.add_terms(terms, out, accum)
        gnorm = engine.clip_gradients(model.parameters(), args.grad_clip)
        streak = engine.nonfinite_streak(gnorm, streak, args.nonfinite_patience, log, step)
        if streak == 0:  # a non-finite step leaves the optimizer and the EMA untouched
            opt.step()
            engine.ema_update(ema, model, args.ema_decay)
        opt.zero_grad(set_to_none=True)
        nonfinite += streak > 0
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sum += 1
        step += 1
        bar.update(1)

        if log_now:
            means, _ = engine.reduce_means(sums, n_sum, ddp, world)
            rec = {"step": step, **means, "lr": lr, "grad_norm": gnorm.item(),
                   "img_per_s": n_sum * args.global_batch_size / (time.time() - t0), "nonfinite_steps": nonfinite}
            run.metrics(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            sums, n_sum, t0, nonfinite = {}, 0, time.time(), 0
        if rank == 0 and tok is not None and args.grid_every > 0 and (step % args.grid_every == 0
                                                                      or step == args.max_steps):
            sample_grid(ema, tok, (mean, std), num_classes, args.grid_steps, args.grid_cfg,
                        os.path.join(run_dir, "grids", f"{step:07d}.png"), device, ctx)
        if (args.ckpt_every > 0 and step % args.ckpt_every == 0) or step == args.max_steps:
            checkpoint(step)
    bar.close()
    log(f"done: {step} steps, checkpoints in {os.path.join(run_dir, 'checkpoints')}")
    if ddp:  # the DDP wrapper holds the process group: released first, so that it is shut down here, not at exit
        del fwd
        torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    main()
