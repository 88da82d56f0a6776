"""
Train a MAETok tokenizer. One script for a CPU process, one GPU, or torchrun (DDP: NCCL on GPU, gloo on CPU).

CPU quick start (tiny preset, built-in data):
  python train_tokenizer.py --preset tiny --global_batch_size 64 --lr 1e-3 --max_steps 1000 ...  (see README)
Paper (MAETok-B-128, ImageNet 256 px, 8 GPUs):
  torchrun --nproc_per_node=8 train_tokenizer.py --data_path /data/imagenet/train --mask_ratio 0.6
Stage 2, decoder fine-tuning (encoder frozen, aux decoders dropped, mask ratio 0.6 -> 0 over 50K steps):
  torchrun --nproc_per_node=8 train_tokenizer.py --stage decoder_finetune --init_from results/000-MAETok-B-128
Resume exactly where a run stopped:  python train_tokenizer.py --resume results/000-MAETok-B-128
"""
import argparse
import copy
import glob
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from pretrained import DINOV2_ARCHS, dinov2_target, load_lpips
from tokenizer import PRESETS, MAETok, TokenizerConfig, make_config, random_mask, unpatchify

# flags a resumed run may change; every other flag is restored from the checkpoint
RESUME_FLAGS = ("max_steps", "log_every", "eval_every", "ckpt_every", "grid_every", "num_workers", "compile",
                "keep_checkpoints", "eval_images", "resume", "vgg_ckpt", "dinov2_ckpt")
NO_DECAY = ("pos_embed", "cls_token", "mask_token", "latent_tokens", "rope.freqs")  # embeddings: no weight decay


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a MAETok tokenizer (defaults: the paper's MAETok-B-128 run)")
    p.add_argument("--preset", default="MAETok-B-128", choices=sorted(PRESETS), help="tokenizer preset")
    p.add_argument("--data_path", default=data.BUILTIN, help="ImageFolder folder, .npz file, or 'builtin'")
    p.add_argument("--val_data_path", default=None, help="held-out images for eval (builtin: its val split)")
    p.add_argument("--builtin_size", type=int, default=50_000, help="number of built-in training images")
    p.add_argument("--image_size", type=int, default=None, help="resolution (default: the preset's)")
    p.add_argument("--rope", default=None, choices=["mixed", "axial"], help="2D RoPE variant (default: preset)")
    p.add_argument("--aux_targets", default="hog",
                   help="comma list of aux decoder targets from hog,dinov2 ('' for none; the paper adds SigLIP)")
    p.add_argument("--dinov2_arch", default="vitl14", choices=sorted(DINOV2_ARCHS),
                   help="DINOv2 teacher for the dinov2 target (official MAETok: ViT-L/14)")
    p.add_argument("--dinov2_mode", default="patch", choices=["patch", "resize"],
                   help="patch: kernel resampled to the tokenizer patch (official MAETok); resize: image to grid*14")
    p.add_argument("--dinov2_ckpt", default=None, help="local official DINOv2 .pth (default: official URL)")
    p.add_argument("--mask_ratio", type=float, default=0.6, help="max mask ratio (truncated-normal peak)")
    p.add_argument("--mask_ratio_min", type=float, default=0.4, help="min mask ratio")
    p.add_argument("--global_batch_size", type=int, default=512, help="images per optimizer step, all ranks")
    p.add_argument("--micro_batch_size", type=int, default=None,
                   help="images per forward on one rank (default: global/world); sets gradient accumulation")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (official: 2e-4 at batch 512)")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup_steps", type=int, default=5000, help="linear warmup (official: 2 epochs)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW decay on >=2-D non-embedding weights")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (beta1 = 0.9)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max grad norm (0 = no clipping)")
    p.add_argument("--max_steps", type=int, default=500_000, help="optimizer steps (paper: 500K)")
    p.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per step")
    p.add_argument("--perceptual_weight", type=float, default=1.0, help="LPIPS-VGG weight (0 disables)")
    p.add_argument("--perceptual_warmup", type=int, default=10_000, help="steps to ramp LPIPS in (official)")
    p.add_argument("--vgg_ckpt", default=None, help="local VGG16 weights for LPIPS (default: official URL)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--stage", default="main", choices=["main", "decoder_finetune"], help="training stage")
    p.add_argument("--init_from", default=None, help="stage 2: run folder or checkpoint of the stage-1 model")
    p.add_argument("--mask_anneal_steps", type=int, default=50_000, help="stage 2: mask ratio 0.6 -> 0 steps")
    p.add_argument("--results_dir", default="results", help="parent of the numbered run folders")
    p.add_argument("--resume", default=None, help="run folder or checkpoint to resume exactly")
    p.add_argument("--seed", type=int, default=0, help="global seed")
    p.add_argument("--num_workers", type=int, default=4, help="data loader workers per rank")
    p.add_argument("--log_every", type=int, default=100, help="steps between metrics.jsonl lines (-1 off)")
    p.add_argument("--eval_every", type=int, default=10_000, help="steps between held-out PSNR evals (-1 off)")
    p.add_argument("--eval_images", type=int, default=1000, help="held-out images per eval")
    p.add_argument("--ckpt_every", type=int, default=10_000, help="steps between checkpoints (-1: only last)")
    p.add_argument("--grid_every", type=int, default=5000, help="steps between picture grids (-1 off)")
    p.add_argument("--keep_checkpoints", type=int, default=3, help="newest checkpoints kept (0 = all)")
    args = p.parse_args(argv)
    checks = [
        (0 <= args.mask_ratio_min <= args.mask_ratio < 1, "need 0 <= --mask_ratio_min <= --mask_ratio < 1"),
        (args.global_batch_size > 0, "--global_batch_size must be positive"),
        (args.micro_batch_size is None or args.micro_batch_size > 0, "--micro_batch_size must be positive"),
        (args.lr > 0 and 0 <= args.min_lr_ratio <= 1, "need --lr > 0 and 0 <= --min_lr_ratio <= 1"),
        (args.max_steps > 0 and args.warmup_steps >= 0, "need --max_steps > 0 and --warmup_steps >= 0"),
        (0 <= args.ema_decay < 1, "--ema_decay must be in [0, 1)"),
        (args.perceptual_weight >= 0, "--perceptual_weight must be >= 0"),
        (args.image_size is None or args.image_size > 0, "--image_size must be positive"),
        (args.stage == "main" or args.init_from or args.resume, "--stage decoder_finetune needs --init_from"),
        (args.builtin_size > 0 and args.eval_images > 0, "--builtin_size and --eval_images must be positive"),
        (set(args.aux_targets.split(",")) <= {"", "hog", "dinov2"},
         f"--aux_targets {args.aux_targets!r}: choose from hog,dinov2 (SigLIP is not implemented yet)"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return args


def find_checkpoint(path):
    """A checkpoint file, or the newest checkpoints/*.pt of a run folder."""
    if os.path.isfile(path):
        return path
    ckpts = sorted(glob.glob(os.path.join(path, "checkpoints", "*.pt")))
    if not ckpts:
        sys.exit(f"error: {path!r} is neither a checkpoint file nor a run folder with checkpoints/*.pt")
    return ckpts[-1]


def load_checkpoint(path):
    try:
        return torch.load(find_checkpoint(path), map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: cannot read checkpoint {path!r} ({type(e).__name__}: {e}); is it a nanotok checkpoint?")


def save_checkpoint(state, path):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def lr_at(step, args):
    """Linear warmup, then cosine from --lr to --lr * --min_lr_ratio at --max_steps (timm cosine, per step)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


def make_optimizer(model, args, fused):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith(NO_DECAY) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=fused)


@torch.no_grad()
def ema_update(ema, model, decay):
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def setup_distributed():
    """torchrun sets RANK: DDP with NCCL on GPU, gloo on CPU; otherwise one process. TF32 on."""
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, local, device


def autocast_context(flag, device):
    """--precision auto: bf16 autocast on GPU, fp32 on CPU."""
    precision = ("bf16" if device.type == "cuda" else "fp32") if flag == "auto" else flag
    return precision, (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())


def count(module):
    return sum(p.numel() for p in module.parameters())


def rng_state(device):
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda"
            else torch.zeros(0, dtype=torch.uint8)}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"], device)


class Run:
    """A numbered results folder (or, resuming, the checkpoint's own) with rank-0 logging to log.txt and
    metrics.jsonl, and checkpoints holding every rank's RNG state, written atomically, the newest `keep` kept."""

    def __init__(self, results_dir, name, resume, ddp, rank, world):
        self.ddp, self.rank, self.world = ddp, rank, world
        if resume:
            self.dir = os.path.dirname(os.path.dirname(os.path.abspath(find_checkpoint(resume))))
        else:
            box = [None]
            if rank == 0:
                os.makedirs(results_dir, exist_ok=True)
                idx = len(glob.glob(os.path.join(results_dir, "*")))
                box = [os.path.join(results_dir, f"{idx:03d}-{name}")]
            if ddp:
                dist.broadcast_object_list(box)
            self.dir = box[0]
        if rank == 0:
            for sub in ("checkpoints", "grids"):
                os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.log_file = open(os.path.join(self.dir, "log.txt"), "a") if rank == 0 else None

    def log(self, msg):
        if self.rank == 0:
            tqdm.write(msg)
            self.log_file.write(msg + "\n")
            self.log_file.flush()

    def metrics(self, rec):
        if self.rank == 0:
            with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint(self, make_state, step, keep, device):
        """Gather the RNG states of all ranks, then rank 0 writes make_state() + rng; all ranks wait."""
        rngs = [None] * self.world
        if self.ddp:
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs = [rng_state(device)]
        if self.rank == 0:
            save_checkpoint({**make_state(), "rng": rngs}, os.path.join(self.dir, "checkpoints", f"{step:07d}.pt"))
            old = sorted(glob.glob(os.path.join(self.dir, "checkpoints", "*.pt")))
            for f in old[:-keep] if keep > 0 else []:
                os.remove(f)
        if self.ddp:
            dist.barrier()


@torch.no_grad()
def eval_psnr(model, ds, n, rank, world, device, ctx, batch_size=64):
    """Mean PSNR (uint8 pixels, the usual convention) of unmasked reconstructions of n held-out images."""
    idx = list(range(min(n, len(ds))))[rank::world]
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for b in range(0, len(idx), batch_size):
        x = torch.stack([ds[i][0] for i in idx[b:b + batch_size]]).to(device)
        with ctx:
            x_rec = model.decode(model.encode(x))
        mse = (data.to_uint8(x).float() - data.to_uint8(x_rec).float()).pow(2).mean(dim=(1, 2, 3))
        total += torch.stack([(10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).sum().double(),
                              torch.tensor(float(len(mse)), dtype=torch.float64)]).to(device)
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def save_grid(model, ema, x, mask_ratio, path, ctx):
    """input | masked input | reconstruction from the masked input | EMA reconstruction (no mask)."""
    cfg, p = model.cfg, model.cfg.patch_size
    g = torch.Generator().manual_seed(0)  # a private generator: grids never shift the training RNG
    mask = random_mask(x.shape[0], cfg.num_patches, mask_ratio, generator=g).to(x.device)
    pix = unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p * p * 3), p, cfg.grid_size, cfg.grid_size)
    with ctx:
        rec_masked = model.decode(model.encode(x, mask if mask_ratio > 0 else None))
        rec = ema.decode(ema.encode(x))
    data.save_image_grid([x, x * (1 - pix), rec_masked.float(), rec.float()], path)


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, local, device = setup_distributed()
    precision, ctx = autocast_context(args.precision, device)

    # ---- resume / init: the checkpoint fixes the config and every flag but a few run-length ones
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        given = vars(args)
        args = argparse.Namespace(**{**ckpt["args"], **{k: given[k] for k in RESUME_FLAGS}})
        cfg = TokenizerConfig(**ckpt["config"])
    elif args.stage == "decoder_finetune":
        init = load_checkpoint(args.init_from)
        cfg = TokenizerConfig(**{**init["config"], "aux_targets": ()})  # aux decoders are dropped (paper)
    else:
        over = {"aux_targets": tuple(t for t in args.aux_targets.split(",") if t),
                "mask_ratio": args.mask_ratio, "mask_ratio_min": args.mask_ratio_min,
                "feature_dims": {"dinov2": DINOV2_ARCHS[args.dinov2_arch][0]}}
        if args.image_size:
            over["image_size"] = args.image_size
        if args.rope:
            over["rope"] = args.rope
        cfg = make_config(args.preset, **over)
    if cfg.image_size % cfg.patch_size:
        sys.exit(f"error: --image_size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}")
    micro = args.micro_batch_size or args.global_batch_size // world
    if args.global_batch_size % (micro * world):
        sys.exit(f"error: --global_batch_size {args.global_batch_size} is not divisible by "
                 f"world size {world} x --micro_batch_size {micro}")
    accum = args.global_batch_size // (micro * world)

    # ---- data (errors here come before any work)
    try:
        train_src = data.build_source(args.data_path, cfg.image_size, "train", args.builtin_size)
        val_src = (data.build_source(args.val_data_path or args.data_path, cfg.image_size, "val")
                   if args.val_data_path or args.data_path == data.BUILTIN else train_src)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    train_ds = data.ImageDataset(train_src, cfg.image_size, train=True, seed=args.seed)
    val_ds = data.ImageDataset(val_src, cfg.image_size, train=False, seed=args.seed)
    per_rank = math.ceil(len(train_ds) / world)
    steps_per_epoch = per_rank // (micro * accum)
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_ds)} training images are fewer than one global batch "
                 f"({args.global_batch_size}); lower --global_batch_size")

    # ---- model, EMA, optimizer. Same init on every rank (seeded before the per-rank seed)
    torch.manual_seed(args.seed)
    model = MAETok(cfg).to(device)
    if args.stage == "decoder_finetune" and ckpt is None:
        sd = init.get("ema") or init["model"]  # start from the EMA weights of stage 1
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("aux.")})
    if args.stage == "decoder_finetune":  # encoder and its latent tokens are frozen
        model.encoder.requires_grad_(False)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(model, args, fused=device.type == "cuda")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    lpips = None
    if args.perceptual_weight > 0:
        try:
            lpips = load_lpips(args.vgg_ckpt).to(device)
        except (RuntimeError, FileNotFoundError, KeyError) as e:
            sys.exit(f"error: LPIPS: {e} (or train without it: --perceptual_weight 0)")
    if "dinov2" in model.aux:  # frozen teacher, not part of the checkpoint
        try:
            teacher = dinov2_target(cfg.image_size, cfg.patch_size, args.dinov2_arch, args.dinov2_mode,
                                    args.dinov2_ckpt).to(device)
        except (RuntimeError, FileNotFoundError, KeyError) as e:
            sys.exit(f"error: DINOv2 target: {e} (or train without it: --aux_targets hog)")
        model.set_feature_target("dinov2", teacher)
    fwd = torch.compile(model) if args.compile else model
    fwd = DDP(fwd, device_ids=[local] if device.type == "cuda" else None) if ddp else fwd

    # ---- run folder, logging
    run = Run(args.results_dir, f"MAETok-{args.preset}" + ("-ft" if args.stage == "decoder_finetune" else ""),
              args.resume if ckpt is not None else None, ddp, rank, world)
    run_dir, log, log_metrics = run.dir, run.log, run.metrics

    log(f"{'resuming ' + run_dir + f' at step {step}' if ckpt else 'run ' + run_dir} | device {device} x{world} | "
        f"precision {precision} | global batch {args.global_batch_size} = {world} ranks x {micro} x {accum} accum")
    log(f"parameters: encoder {count(model.encoder) / 1e6:.2f}M, pixel decoder {count(model.decoder) / 1e6:.2f}M, "
        f"aux decoders {count(model.aux) / 1e6:.2f}M ({', '.join(model.aux) or 'none'}), "
        f"trainable {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M")
    log(f"config: {json.dumps(asdict(cfg))}")
    log(f"args: {json.dumps(vars(args))}")
    log(f"data: {len(train_ds)} train images ({train_src.num_classes} classes), {steps_per_epoch} steps/epoch")

    # ---- RNG: per-rank streams for masking; a resumed run restores them exactly
    torch.manual_seed(args.seed * world + rank)
    if ckpt is not None:
        if len(ckpt["rng"]) != world:
            log(f"warning: checkpoint saved with {len(ckpt['rng'])} ranks, resuming on {world}: not bitwise")
        set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])], device)

    def batches(step):
        """Micro-batches from optimizer step `step` on; the data position is a function of the step."""
        epoch, s = divmod(step, steps_per_epoch)
        while True:
            bs = data.epoch_batches(len(train_ds), epoch, args.seed, rank, world, micro, start=s * accum)
            loader = torch.utils.data.DataLoader(
                train_ds, batch_sampler=bs[:(steps_per_epoch - s) * accum], num_workers=args.num_workers,
                pin_memory=device.type == "cuda", generator=torch.Generator())  # own generator: no global RNG use
            yield from loader
            epoch, s = epoch + 1, 0

    def checkpoint(step):
        run.checkpoint(lambda: {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                "step": step, "epoch": step // steps_per_epoch, "config": asdict(cfg),
                                "args": vars(args)}, step, args.keep_checkpoints, device)

    grid_x = torch.stack([val_ds[i][0] for i in range(min(8, len(val_ds)))]).to(device)
    stream = batches(step)
    model.train()
    sums, n_sum, skipped, t0 = {}, 0, 0, time.time()
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        mask_ratio = None  # stage 1: drawn per batch inside the model
        if args.stage == "decoder_finetune":
            mask_ratio = args.mask_ratio * max(0.0, 1 - step / max(1, args.mask_anneal_steps))
        pw = args.perceptual_weight * min(1.0, step / args.perceptual_warmup if args.perceptual_warmup else 1.0)
        for micro_step in range(accum):
            x, _, n_bad = next(stream)
            skipped += int(n_bad.sum())
            x = x.to(device, non_blocking=True)
            sync = not ddp or micro_step == accum - 1
            with (nullcontext() if sync else fwd.no_sync()), ctx:
                x_rec, losses, _ = fwd(x, mask_ratio)
                if lpips is not None:
                    losses["lpips"] = lpips(x_rec.float(), x).mean()
                    losses["loss"] = losses["loss"] + pw * losses["lpips"]
                (losses["loss"] / accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        n_sum += accum
        params = [p for p in model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, args.ema_decay)
        step += 1
        bar.update(1)

        if args.log_every > 0 and (step % args.log_every == 0 or step == args.max_steps):
            keys = sorted(sums)
            vals = torch.stack([sums[k] / n_sum for k in keys] + [torch.tensor(float(skipped))]).to(device)
            if ddp:
                dist.all_reduce(vals)
                vals[:-1] /= world
            dt = time.time() - t0
            rec = {"step": step, **{k: vals[i].item() for i, k in enumerate(keys)}, "lr": lr,
                   "grad_norm": gnorm.item(), "img_per_s": n_sum / accum * args.global_batch_size / dt,
                   "skipped_images": int(vals[-1].item())}
            if mask_ratio is not None:
                rec["mask_ratio"] = mask_ratio
            log_metrics(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", pix=f"{rec['pixel']:.4f}")
            if skipped:
                log(f"step {step}: {int(vals[-1].item())} unreadable images skipped since the last log")
            sums, n_sum, skipped, t0 = {}, 0, 0, time.time()
        if args.eval_every > 0 and (step % args.eval_every == 0 or step == args.max_steps):
            psnr = eval_psnr(ema, val_ds, args.eval_images, rank, world, device, ctx)
            log(f"step {step}: held-out PSNR (EMA, {min(args.eval_images, len(val_ds))} images) {psnr:.2f} dB")
            log_metrics({"step": step, "eval_psnr_ema": psnr})
        if rank == 0 and args.grid_every > 0 and (step % args.grid_every == 0 or step == args.max_steps):
            save_grid(model, ema, grid_x, args.mask_ratio if mask_ratio is None else mask_ratio,
                      os.path.join(run_dir, "grids", f"{step:07d}.png"), ctx)
        if (args.ckpt_every > 0 and step % args.ckpt_every == 0) or step == args.max_steps:
            checkpoint(step)
    bar.close()
    log(f"done: {step} steps, checkpoints in {os.path.join(run_dir, 'checkpoints')}")
    if ddp:
        dist.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    main()
