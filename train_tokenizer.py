"""
Train a tokenizer of any family (MAETok, MacTok, AlignTok; each family brings its stages). One script for a CPU
process, one GPU, or torchrun (DDP: NCCL on GPU, gloo on CPU). Read top to bottom: the flags, each family's setup
under its own header (FAMILY_SETUP), the GAN and the generator loss, then main() with the training step inline.

CPU quick start (tiny preset, built-in data; the preset brings the quick start's batch, lr, warmup, EMA, steps):
  python train_tokenizer.py --preset tiny --perceptual_weight 0
Paper (MAETok-B-128, ImageNet 256 px, 8 GPUs):
  torchrun --nproc_per_node=8 train_tokenizer.py --data_path /data/imagenet/train --mask_ratio 0.6
Stage 2, decoder fine-tuning (encoder frozen, aux decoders dropped, mask ratio 0.6 -> 0 over 50K steps):
  torchrun --nproc_per_node=8 train_tokenizer.py --stage decoder_finetune --init_from results/000-MAETok-B-128
AlignTok's three stages (latent alignment, perceptual alignment with L_sp, decoder refinement):
  python train_tokenizer.py --preset AlignTok-L-f16d32 --stage align --data_path ...
  python train_tokenizer.py --stage perceptual --init_from results/000-AlignTok-L-f16d32-align
  python train_tokenizer.py --stage decoder --init_from results/001-AlignTok-L-f16d32-perceptual
Resume exactly where a run stopped (optionally with a new --max_steps):
  python train_tokenizer.py --resume results/000-MAETok-B-128
Watch diffusability while it trains (LNC, linear probe, VIV_norm of the EMA latents; docs/study.md):
  python train_tokenizer.py --preset tiny --perceptual_weight 0 --diffusability_every 100
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
import diffusability
import engine
import released
from aligntok import semantic_preservation
from discriminator import (Discriminator, GANLoss, NLayerDiscriminator, ProxyDiscTrunk, dino_discriminator,
                           load_dino_disc_trunk)
from mactok import DINOv2Teacher, ProxyTeacher
from maetok import random_mask
from pretrained import DINOV2_ARCHS, SIGLIP_SO400M, dinov2_target, load_dinov2, load_lpips, siglip_target
from proxy import load_proxy
from tokenizer import PRESETS, RECIPES, STAGES, build, config_from_dict, make_config, param_groups, stage_config
from vit import unpatchify

# flags a resumed run may change; every other flag is restored from the checkpoint
RESUME_FLAGS = ("max_steps", "decay_steps", "log_every", "eval_every", "ckpt_every", "grid_every", "num_workers",
                "compile", "keep_checkpoints", "eval_images", "resume", "vgg_ckpt", "dinov2_ckpt", "siglip_ckpt",
                "dino_ckpt", "disc_proxy_ckpt", "teacher_proxy_ckpt", "encoder_ckpt", "encoder_init_ckpt",
                "decoder_ckpt", "micro_batch_size", "nonfinite_patience", "diffusability_every",
                "diffusability_images")
ALL_STAGES = sorted({s for stages in STAGES.values() for s in stages})
AUX_TARGETS = ("hog", "dinov2", "siglip")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a tokenizer (defaults: the paper's MAETok-B-128 run)")
    g = p.add_argument_group("what to train")
    gm = p.add_argument_group("MAETok")
    gc = p.add_argument_group("MacTok")
    ga = p.add_argument_group("AlignTok")
    go = p.add_argument_group("optimisation and losses")
    gg = p.add_argument_group("GAN")
    gr = p.add_argument_group("run: folders, resume, logging")
    g.add_argument("--preset", default="MAETok-B-128", choices=sorted(PRESETS),
                   help="tokenizer preset; it brings its recipe (tiny: the CPU quick start's), explicit flags win")
    g.add_argument("--data_path", default=data.BUILTIN, help="ImageFolder folder, .npz file, or 'builtin'")
    g.add_argument("--val_data_path", default=None, help="held-out images for eval (builtin: its val split)")
    g.add_argument("--builtin_size", type=int, default=50_000, help="number of built-in training images")
    g.add_argument("--image_size", type=int, default=None, help="resolution (default: the preset's)")
    gm.add_argument("--rope", default=None, choices=["mixed", "axial"], help="2D RoPE variant (default: preset)")
    gm.add_argument("--aux_targets", default="hog,dinov2,siglip",
                   help="comma list of aux decoder targets from hog,dinov2,siglip ('' for none; the paper: all "
                        "three; the tiny preset: hog, as no teacher weights exist offline)")
    gm.add_argument("--dinov2_arch", default="vitl14", choices=sorted(DINOV2_ARCHS),
                   help="DINOv2 of MAETok's dinov2 target and MacTok's teacher, and AlignTok's encoder (official: "
                        "ViT-L/14)")
    gm.add_argument("--dinov2_mode", default="patch", choices=["patch", "resize"],
                   help="patch: kernel resampled to the tokenizer patch (official MAETok); resize: image to grid*14")
    gm.add_argument("--dinov2_ckpt", default=None, help="local official DINOv2 .pth (default: official URL)")
    gm.add_argument("--siglip_ckpt", default=None,
                   help="local SigLIP SO400M/14 file: OpenCLIP open_clip_pytorch_model.bin of "
                        "timm/ViT-SO400M-14-SigLIP (default: its Hugging Face URL)")
    gm.add_argument("--mask_ratio", type=float, default=0.6, help="MAETok: max mask ratio (truncated-normal peak)")
    gm.add_argument("--mask_ratio_min", type=float, default=0.4, help="MAETok: min mask ratio")
    # MacTok (defaults: its preset's config)
    gc.add_argument("--kl_weight", type=float, default=None, help="MacTok: KL weight (KL summed over L*C; 1e-6)")
    gc.add_argument("--mask_ratio_max", type=float, default=None, help="MacTok: r = min(U(0,1), this) (0.7)")
    gc.add_argument("--mask_ratio_dist", default=None, choices=["uniform", "uniform_zero"],
                   help="MacTok: the law of r: uniform = min(U(0, 1), max), floor(r N) tokens (unmasked with "
                        "probability 1 / N); uniform_zero = U(-max, max) clipped to [0, max] (unmasked half the time)")
    gc.add_argument("--semantic_mask_prob", type=float, default=None,
                   help="MacTok: probability per sample of teacher-guided rather than random masking (0.5)")
    gc.add_argument("--mask_tokens", default=None, choices=["image", "latent", "none"],
                   help="MacTok: mask image tokens (paper), latent tokens (appendix control) or nothing")
    gc.add_argument("--align", default=None, help="MacTok: alignment terms among local,global ('' for none)")
    gc.add_argument("--align_weight", type=float, default=None, help="MacTok: weight of the alignment sum (0.1)")
    gc.add_argument("--teacher", default="dinov2", choices=["dinov2", "proxy", "none"],
                   help="MacTok: the teacher of semantic masking and alignment (DINOv2 of --dinov2_arch; offline: "
                        "a proxy.py classifier)")
    gc.add_argument("--teacher_proxy_ckpt", default=None, help="--teacher proxy: a proxy.py checkpoint")
    gc.add_argument("--encoder_init", default=None, choices=["dinov2", "scratch"],
                   help="MacTok: encoder from the DINOv2 of its width (paper) or from scratch (default: preset)")
    gc.add_argument("--encoder_init_ckpt", default=None,
                   help="MacTok --encoder_init dinov2: a local DINOv2 .pth of the encoder's width (default: official "
                        "URL)")
    ga.add_argument("--encoder_ckpt", default=None,
                   help="AlignTok: the frozen foundation encoder's weights, a DINOv2 .pth (default: official URL) or, "
                        "for --preset AlignTok-tiny, a proxy.py checkpoint")
    ga.add_argument("--decoder_ckpt", default=None,
                   help="AlignTok stage align: start the decoder from VA-VAE's (its release .pt, or any checkpoint "
                        "with decoder.* and post_quant_conv.*; default: random, as the paper)")
    ga.add_argument("--sp_weight", type=float, default=1.0,
                   help="AlignTok stage perceptual: weight of the semantic-preservation loss (x its adaptive weight)")
    g.add_argument("--crop", default=None, choices=list(data.CROPS),
                   help="training crop: random-resized (MAETok), center (MacTok), or short side to the image size + "
                        "a random crop (short_random: AlignTok / VA-VAE); default: the preset's")
    go.add_argument("--global_batch_size", type=int, default=512, help="images per optimizer step, all ranks")
    go.add_argument("--micro_batch_size", type=int, default=None,
                   help="images per forward on one rank (default: global/world); sets gradient accumulation")
    go.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (official: 2e-4 at batch 512)")
    go.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    go.add_argument("--warmup_steps", type=int, default=5000, help="linear warmup (official: 2 epochs)")
    go.add_argument("--decay_steps", type=int, default=None,
                   help="step where the cosine reaches its floor (default: --max_steps); kept when a resumed run "
                        "extends --max_steps, so the planned schedule never changes silently")
    go.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW decay on >=2-D non-embedding weights")
    go.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (AlignTok's recipe: VA-VAE's 0.5)")
    go.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (AlignTok's recipe: VA-VAE's 0.9)")
    go.add_argument("--grad_clip", type=float, default=1.0, help="max grad norm (0 = no clipping)")
    go.add_argument("--max_steps", type=int, default=500_000, help="optimizer steps (paper: 500K)")
    go.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per step")
    go.add_argument("--perceptual_weight", type=float, default=1.0, help="LPIPS-VGG weight (0 disables)")
    go.add_argument("--perceptual_warmup", type=int, default=10_000, help="steps to ramp LPIPS in (official)")
    go.add_argument("--vgg_ckpt", default=None, help="local VGG16 weights for LPIPS (default: official URL)")
    gg.add_argument("--disc", default="dino", choices=["dino", "proxy", "patchgan", "none"],
                   help="adversarial loss: dino = frozen DINO ViT-S/16 + 5 trainable heads (official), proxy = a "
                        "frozen proxy CNN (proxy.py) as the trunk, for offline work; patchgan = the LDM PatchGAN "
                        "(VA-VAE / AlignTok); none = no GAN")
    gg.add_argument("--dino_ckpt", default=None, help="local DINO v1 ViT-S/16 .pth (default: official URL)")
    gg.add_argument("--disc_proxy_ckpt", default=None,
                   help="--disc proxy: a proxy.py checkpoint (another seed / width than the evaluation proxy)")
    gg.add_argument("--disc_start", type=int, default=30_000, help="step where the GAN terms switch on (official)")
    gg.add_argument("--disc_weight", type=float, default=0.4, help="adversarial weight for G and D (official)")
    gg.add_argument("--disc_betas", default=None,
                   help="'b1,b2' of the discriminator's AdamW (default: the generator's, as official MAETok; "
                        "AlignTok's recipe: VA-VAE's 0.5,0.9)")
    gg.add_argument("--lecam_weight", type=float, default=1e-3, help="LeCAM regulariser weight in the D loss")
    gg.add_argument("--cr_weight", type=float, default=4.0, help="consistency regularisation weight (not x 0.4)")
    g.add_argument("--precision", default="auto", choices=engine.PRECISIONS, help=engine.PRECISION_HELP)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--stage", default="main", choices=ALL_STAGES,
                   help="training stage of the family (MAETok / MacTok: main, decoder_finetune; AlignTok: align, "
                        "perceptual, decoder, and scratch for the baseline); each brings its defaults")
    g.add_argument("--init_from", default=None, help="stage 2: run folder or checkpoint of the stage-1 model")
    gm.add_argument("--mask_anneal_steps", type=int, default=50_000, help="stage 2: mask ratio 0.6 -> 0 steps")
    gr.add_argument("--results_dir", default="results", help="parent of the numbered run folders")
    gr.add_argument("--resume", default=None, help="run folder or checkpoint to resume exactly")
    gr.add_argument("--seed", type=int, default=0, help="global seed")
    gr.add_argument("--num_workers", type=int, default=4, help="data loader workers per rank")
    gr.add_argument("--log_every", type=int, default=100, help="steps between metrics.jsonl lines (-1 off)")
    gr.add_argument("--eval_every", type=int, default=10_000, help="steps between held-out PSNR evals (-1 off)")
    gr.add_argument("--eval_images", type=int, default=1000, help="held-out images per eval (class-balanced)")
    gr.add_argument("--diffusability_every", type=int, default=5000,
                    help="steps between the diffusability monitor's LNC / linear probe / VIV_norm of the EMA model's "
                         "latents on held-out images (metrics.jsonl; -1 off)")
    gr.add_argument("--diffusability_images", type=int, default=1000,
                    help="held-out images of the monitor (class-balanced, at most 50 classes)")
    gr.add_argument("--ckpt_every", type=int, default=10_000, help="steps between checkpoints (-1: only last)")
    gr.add_argument("--grid_every", type=int, default=5000, help="steps between picture grids (-1 off)")
    gr.add_argument("--keep_checkpoints", type=int, default=3, help="newest checkpoints kept (0 = all)")
    gr.add_argument("--nonfinite_patience", type=int, default=20,
                   help="consecutive steps with a non-finite loss or gradient (each skipped) before the run stops")
    args = p.parse_args(argv)
    return p, args, engine.explicit_flags(p, argv)


def validate(p, args):
    checks = [
        (0 <= args.mask_ratio_min <= args.mask_ratio < 1, "need 0 <= --mask_ratio_min <= --mask_ratio < 1"),
        (args.global_batch_size > 0, "--global_batch_size must be positive"),
        (args.nonfinite_patience > 0, "--nonfinite_patience must be positive"),
        (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1, "need 0 <= --beta1, --beta2 < 1"),
        (args.disc_betas is None or (args.disc_betas.count(",") == 1 and all(
            b.replace(".", "", 1).isdigit() and float(b) < 1 for b in args.disc_betas.split(","))),
         f"--disc_betas {args.disc_betas!r}: give 'b1,b2' with each in [0, 1), e.g. 0.5,0.9"),
        (args.micro_batch_size is None or args.micro_batch_size > 0, "--micro_batch_size must be positive"),
        (args.lr > 0 and 0 <= args.min_lr_ratio <= 1, "need --lr > 0 and 0 <= --min_lr_ratio <= 1"),
        (args.max_steps > 0 and args.warmup_steps >= 0, "need --max_steps > 0 and --warmup_steps >= 0"),
        (args.decay_steps is None or args.decay_steps > 0, "--decay_steps must be positive"),
        (0 <= args.ema_decay < 1, "--ema_decay must be in [0, 1)"),
        (args.perceptual_weight >= 0 and args.sp_weight >= 0, "--perceptual_weight and --sp_weight must be >= 0"),
        (args.disc_start >= 0 and min(args.disc_weight, args.lecam_weight, args.cr_weight) >= 0,
         "need --disc_start >= 0 and non-negative --disc_weight, --lecam_weight, --cr_weight"),
        (args.disc != "proxy" or args.disc_proxy_ckpt, "--disc proxy needs --disc_proxy_ckpt (train one: python "
                                                       "proxy.py --seed 1 --width 8 --out results/disc_proxy.pt)"),
        (args.teacher != "proxy" or args.teacher_proxy_ckpt, "--teacher proxy needs --teacher_proxy_ckpt (train "
                                                             "one: python proxy.py --out results/proxy.pt)"),
        (args.decoder_ckpt is None or args.stage == "align", "--decoder_ckpt starts stage align's decoder (later "
                                                            "stages continue theirs from --init_from)"),
        (args.image_size is None or args.image_size > 0, "--image_size must be positive"),
        (args.builtin_size > 0 and args.eval_images > 0, "--builtin_size and --eval_images must be positive"),
        (args.diffusability_images >= 20, "--diffusability_images must be at least 20"),
        (set(args.aux_targets.split(",")) <= {"", *AUX_TARGETS},
         f"--aux_targets {args.aux_targets!r}: choose from {','.join(AUX_TARGETS)}"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)


# ----------------------------------------------------------------------------------------------------------
# MAETok: its config flags, and the frozen teachers of its aux targets (DINOv2, SigLIP; outside the checkpoint)

def maetok_overrides(args):
    over = {"aux_targets": tuple(t for t in args.aux_targets.split(",") if t),
            "mask_ratio": args.mask_ratio, "mask_ratio_min": args.mask_ratio_min,
            "feature_dims": {"dinov2": DINOV2_ARCHS[args.dinov2_arch][0], "siglip": SIGLIP_SO400M[0]}}
    return {**over, **{k: getattr(args, k) for k in ("image_size", "rope") if getattr(args, k)}}


def maetok_teachers(model, args, cfg, device):
    """The aux decoders' feature targets: frozen DINOv2 and SigLIP, attached to the model (not to its EMA)."""
    if "dinov2" in getattr(model, "aux", {}):
        try:
            teacher = dinov2_target(cfg.image_size, cfg.patch_size, args.dinov2_arch, args.dinov2_mode,
                                    args.dinov2_ckpt).to(device)
        except (RuntimeError, FileNotFoundError, KeyError) as e:
            sys.exit(f"error: DINOv2 target: {e} (or train without it: --aux_targets hog)")
        model.set_feature_target("dinov2", teacher)
    if "siglip" in getattr(model, "aux", {}):
        try:
            teacher = siglip_target(cfg.patch_size, args.siglip_ckpt).to(device)
        except (RuntimeError, FileNotFoundError, KeyError) as e:
            sys.exit(f"error: SigLIP target: {e} (or train without it: --aux_targets hog,dinov2)")
        model.set_feature_target("siglip", teacher)


# ----------------------------------------------------------------------------------------------------------
# MacTok: its config flags, its encoder from DINOv2 (a fresh run, the paper's), and the teacher of semantic
# masking and alignment

def mactok_overrides(args):
    keys = ("kl_weight", "mask_ratio_max", "mask_ratio_dist", "semantic_mask_prob", "mask_tokens", "align_weight",
            "encoder_init", "image_size")
    over = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.align is not None:
        over["align"] = tuple(t for t in args.align.split(",") if t)
    if args.teacher == "none":  # no teacher: random masking only, no alignment
        over.update(align=(), semantic_mask_prob=0.0)
    else:
        over["teacher_dim"] = (DINOV2_ARCHS[args.dinov2_arch][0] if args.teacher == "dinov2"
                               else load_proxy(args.teacher_proxy_ckpt).cfg.feature_dim)
    return over


def init_encoder_from_dinov2(model, args, cfg):
    """MacTok's encoder from the official DINOv2 of its width, converted to its patch size and grid."""
    arch = {384: "vits14", 768: "vitb14", 1024: "vitl14"}.get(cfg.enc_width)
    if arch is None or cfg.enc_depth != DINOV2_ARCHS[arch][1]:
        sys.exit(f"error: no DINOv2 has width {cfg.enc_width} and depth {cfg.enc_depth}: --encoder_init scratch")
    try:
        vit = load_dinov2(arch, ckpt=args.encoder_init_ckpt, patch_size=cfg.patch_size, grid=cfg.grid_size)
    except (RuntimeError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: MacTok encoder init: {e} (or --encoder_init scratch)")
    model.encoder.vit.load_state_dict(vit.state_dict())
    return arch


def mactok_start(model, args, cfg, ckpt, init):
    """A fresh MacTok's encoder from DINOv2 (--encoder_init dinov2): (what the encoder is, no L_sp reference)."""
    if cfg.encoder_init == "dinov2" and ckpt is None and init is None:
        return f"DINOv2 {init_encoder_from_dinov2(model, args, cfg)}", None
    return None, None


def build_teacher(args, cfg, device):
    """MacTok's teacher (semantic masking, alignment): frozen, outside the checkpoint, reported by name."""
    try:
        if args.teacher == "dinov2":
            return DINOv2Teacher(dinov2_target(cfg.image_size, cfg.patch_size, args.dinov2_arch, "patch",
                                               args.dinov2_ckpt)).to(device)
        return ProxyTeacher(load_proxy(args.teacher_proxy_ckpt), cfg.grid_size).to(device)
    except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"error: MacTok teacher: {e} (or train without one: --teacher none)")


def mactok_teachers(model, args, cfg, device):
    if args.teacher != "none" and (cfg.align or (cfg.mask_tokens == "image" and cfg.semantic_mask_prob > 0)):
        model.set_teacher(build_teacher(args, cfg, device))


# ----------------------------------------------------------------------------------------------------------
# AlignTok: its config flags, the frozen foundation encoder and VA-VAE's decoder of stage align, and stage
# perceptual's reference for the semantic-preservation loss

def aligntok_overrides(args):
    over = {"image_size": args.image_size} if args.image_size else {}
    if args.dinov2_arch != "vitl14" and make_config(args.preset).encoder == "dinov2":  # the paper's: ViT-L/14
        over.update(dinov2_arch=args.dinov2_arch, enc_dim=DINOV2_ARCHS[args.dinov2_arch][0])
    return over


def init_aligntok_encoder(model, args, cfg):
    """AlignTok's pretrained encoder: the official DINOv2 (by URL or --encoder_ckpt) or, offline, the proxy."""
    try:
        if cfg.encoder == "proxy":
            if not args.encoder_ckpt:
                sys.exit("error: AlignTok-tiny's encoder is a trained proxy classifier: pass --encoder_ckpt "
                         "(python proxy.py --out results/proxy.pt), or train the baseline: --stage scratch")
            model.encoder.trunk.load_state_dict(load_proxy(args.encoder_ckpt).trunk[:18].state_dict())
            return f"proxy {args.encoder_ckpt}"
        vit = load_dinov2(cfg.dinov2_arch, ckpt=args.encoder_ckpt)
    except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"error: AlignTok encoder: {e} (or the from-scratch baseline: --stage scratch)")
    model.encoder.vit.load_state_dict(vit.state_dict())
    return f"DINOv2 {cfg.dinov2_arch}"


def init_aligntok_decoder(model, path):
    """--decoder_ckpt: post_quant_conv + the LDM decoder from a VA-VAE file (the official names are ours)."""
    parts = ("decoder.", "post_quant_conv.")
    own = {k: v.shape for k, v in model.state_dict().items() if k.startswith(parts)}
    got = {k: v for k, v in released.load(path)["model"].items() if k.startswith(parts)}
    bad = sorted(set(own) ^ set(got)) + [k for k in own if k in got and got[k].shape != own[k]]
    if bad:
        sys.exit(f"error: --decoder_ckpt {path!r} does not hold this decoder (e.g. {bad[:3]}): AlignTok-L-f16d32 "
                 f"takes VA-VAE f16d32's")
    model.load_state_dict(got, strict=False)


def aligntok_start(model, args, cfg, ckpt, init):
    """Stage align of a fresh run: the pretrained encoder (and --decoder_ckpt's decoder). Stage perceptual: the frozen
    stage-1 model as L_sp's reference (the weights it starts from; a resumed run's from its checkpoint).
    Returns (what the encoder is, the reference or None)."""
    encoder_src = None
    if args.stage == "align" and ckpt is None:
        encoder_src = init_aligntok_encoder(model, args, cfg)
        if args.decoder_ckpt:
            init_aligntok_decoder(model, args.decoder_ckpt)
    ref = None
    if args.stage == "perceptual" and args.sp_weight > 0:
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        if ckpt is not None:
            ref.load_state_dict(ckpt["sp_reference"])
    return encoder_src, ref


# per family: its config overrides from the flags, the start of a model (before the EMA copy), its frozen teachers
FAMILY_SETUP = {"maetok": (maetok_overrides, None, maetok_teachers),
                "mactok": (mactok_overrides, mactok_start, mactok_teachers),
                "aligntok": (aligntok_overrides, aligntok_start, None)}


# ----------------------------------------------------------------------------------------------------------
# the GAN, the generator loss, evaluation

def build_gan(args, ckpt, init, device, ddp, local):
    """The discriminator (heads seeded after the tokenizer), its optimizer (AdamW as G's, same schedule) and
    its DDP wrapper, restored from a resumed checkpoint or, in a later stage, from the stage it continues."""
    if args.disc == "none":
        return None, None, None
    try:
        if args.disc == "dino":
            disc = dino_discriminator(load_dino_disc_trunk(args.dino_ckpt).to(device))
        elif args.disc == "patchgan":
            disc = NLayerDiscriminator()
        else:
            trunk = ProxyDiscTrunk(load_proxy(args.disc_proxy_ckpt)).to(device)
            disc = Discriminator(trunk, trunk.dims)
    except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"error: discriminator: {e} (or train without the GAN: --disc none)")
    if ddp and device.type == "cuda":  # official SyncBatchNorm: global-batch statistics (gloo cannot: per rank)
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    patch = args.disc == "patchgan"  # VA-VAE: no DiffAug, the D hinge at weight 1, the G term at disc_weight
    gan = GANLoss(disc.to(device), args.disc_start, args.disc_weight, args.lecam_weight, args.cr_weight,
                  augment=not patch, d_weight=1.0 if patch else None).to(device)
    decay = [p for p in disc.parameters() if p.ndim >= 2]
    opt_d = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": [p for p in disc.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                              lr=args.lr, betas=disc_betas(args), fused=device.type == "cuda")
    src = ckpt if ckpt is not None else init
    if src is not None and src.get("disc") is not None:
        disc.load_state_dict(src["disc"])
        gan.lecam_ema.copy_(torch.tensor([src["lecam"]["real"], src["lecam"]["fake"]]))
        if ckpt is not None:
            opt_d.load_state_dict(ckpt["disc_optimizer"])
    disc_fwd = engine.wrap_model(disc, False, ddp, device, local)
    return gan, opt_d, disc_fwd


def disc_betas(args):
    """The discriminator optimiser's betas: --disc_betas, else the generator's."""
    if not args.disc_betas:
        return args.beta1, args.beta2
    b1, b2 = (float(b) for b in args.disc_betas.split(","))
    return b1, b2


def gan_state(gan, opt_d):
    """What a checkpoint keeps of the GAN: heads (with SN vectors, BN statistics), optimizer, LeCAM EMAs."""
    if gan is None:
        return {}
    real, fake = gan.lecam_ema.tolist()
    return {"disc": gan.disc.state_dict(), "disc_optimizer": opt_d.state_dict(), "lecam": {"real": real, "fake": fake}}


def perceptual_weight(args, step):
    """LPIPS's weight at a step: ramped in linearly over --perceptual_warmup steps (official MAETok), or whole."""
    return args.perceptual_weight * min(1.0, step / args.perceptual_warmup if args.perceptual_warmup else 1.0)


def generator_loss(model, fwd, x, mask, teacher, lpips=None, pw=0.0, ref=None, sp_weight=0.0, gan=None):
    """The tokenizer's loss on one micro-batch: the model's own terms (reconstruction, aux, KL, alignment), LPIPS
    at weight pw, AlignTok's L_sp against the stage-1 model `ref`, and the GAN's generator term when `gan` is
    given. fwd is the model or its DDP / compiled wrapper; both adaptive weights balance against nll."""
    out = fwd(x, mask, teacher)
    nll = out["pixel"]
    if lpips is not None:
        out["lpips"] = lpips(out["rec"].float(), x).mean()
        nll = nll + pw * out["lpips"]
        out["loss"] = out["loss"] + pw * out["lpips"]
    if ref is not None:
        term, logs = semantic_preservation(model, ref, x, out["z"], nll, sp_weight)
        out["loss"] = out["loss"] + term
        out.update(logs)
    if gan is not None:  # the adaptive weight balances the GAN against reconstruction + perceptual only
        term, logs = gan.generator_term(out["rec"], nll, model.last_layer)
        out["loss"] = out["loss"] + term
        out.update(logs)
    return out


@torch.no_grad()
def eval_psnr(model, ds, idx, rank, world, device, ctx, batch_size=64):
    """Mean PSNR (uint8 pixels, the usual convention) of unmasked reconstructions of held-out images idx."""
    idx = idx[rank::world]
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for b in range(0, len(idx), batch_size):
        x = torch.stack([ds[i][0] for i in idx[b:b + batch_size]]).to(device)
        with ctx:
            x_rec = model.decode(model.encode(x))
        mse = (data.to_uint8(x).float() - data.to_uint8(x_rec).float()).pow(2).mean(dim=(1, 2, 3))
        total += torch.stack([(10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).sum().double(),
                              torch.tensor(float(len(mse)), dtype=torch.float64)]).to(device)
    if world > 1:
        torch.distributed.all_reduce(total)
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


def resolve_flags(p, args, explicit, world):
    """The run's flags, config and what it starts from: (args, cfg, ckpt, init, ignored, replanned).
    --resume: the defaults, then the checkpoint's args, then the explicit run-length flags; --init_from (a later
    stage): the preset and config of the run it continues, with that stage's recipe; else the preset and its
    recipe for the stage."""
    ckpt = released.load(args.resume) if args.resume else None
    init, ignored, replanned = None, [], None
    if ckpt is not None:
        a = ckpt["args"]  # a flag newer than the checkpoint takes its preset's recipe, else its default
        saved = {**RECIPES.get(a["preset"], {}).get(a["stage"], {}), "decay_steps": a["max_steps"], "disc": "none",
                 "beta1": 0.9, "disc_betas": None, **a}  # older checkpoints: no GAN; betas (0.9, beta2) for both
        args, ignored = engine.resume_args(p, args, explicit, saved, RESUME_FLAGS)
        cfg = config_from_dict(ckpt["config"])
        # on another world size: the same global batch, the micro-batch re-planned
        args.micro_batch_size = engine.resume_micro_batch(args.global_batch_size, args.micro_batch_size,
                                                          len(ckpt["rng"]), world)
        if args.decay_steps != saved["decay_steps"]:
            replanned = (saved["decay_steps"], args.decay_steps)
    elif args.init_from is not None:  # a later stage: the preset and config of the run it continues
        init = released.load(args.init_from)
        args.preset = init["args"].get("preset", args.preset)                # named after what it fine-tunes
        family = config_from_dict(init["config"]).family
        if family not in STAGES:
            p.error(f"--init_from {args.init_from!r} is a {family} tokenizer, which nanotok loads but does not train")
        stages = STAGES[family]
        if args.stage not in stages or not stages[args.stage].init:
            p.error(f"--stage {args.stage} does not continue a run: drop --init_from, or give a later stage "
                    f"({', '.join(s for s, st in stages.items() if st.init)})")
        engine.apply_recipe(args, RECIPES.get(args.preset, {}).get(args.stage, {}), explicit)
        cfg = stage_config(config_from_dict(init["config"]), args.stage)
    else:
        family = make_config(args.preset).family
        if family == "mactok" and "encoder_ckpt" in explicit:
            p.error("--encoder_ckpt is AlignTok's frozen encoder; MacTok's DINOv2 start is --encoder_init_ckpt")
        stages = STAGES[family]
        if args.stage == "main" and "main" not in stages:
            args.stage = next(iter(stages))                                 # AlignTok: its first stage, align
        if args.stage not in stages:
            p.error(f"--stage {args.stage} is not a stage of preset {args.preset}: choose {', '.join(stages)}")
        if stages[args.stage].init:
            p.error(f"--stage {args.stage} needs --init_from (the run or checkpoint it continues)")
        engine.apply_recipe(args, RECIPES.get(args.preset, {}).get(args.stage, {}), explicit)
        cfg = make_config(args.preset, **FAMILY_SETUP[family][0](args))
    if args.decay_steps is None:
        args.decay_steps = args.max_steps
    validate(p, args)
    return args, cfg, ckpt, init, ignored, replanned


def main(argv=None):
    p, args, explicit = parse_args(argv)
    ddp, rank, world, local, device = engine.setup_distributed()
    precision, ctx = engine.autocast_context(args.precision, device)

    # ---- flags and config: fresh, a later stage (--init_from) or a resumed run
    args, cfg, ckpt, init, ignored, replanned = resolve_flags(p, args, explicit, world)
    stage = STAGES[cfg.family][args.stage]
    if cfg.image_size % cfg.patch_size:
        sys.exit(f"error: --image_size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}")
    if ddp and stage.mask == "drawn" and getattr(cfg, "aux_targets", ()) and getattr(cfg, "mask_ratio", 1) == 0:
        sys.exit("error: with masking off (--mask_ratio 0) the aux decoders get no gradient, which DDP cannot "
                 "reduce: give a mask ratio > 0 or --aux_targets ''")
    micro, accum = engine.micro_batching(args.global_batch_size, args.micro_batch_size, world)

    # ---- data (errors here come before any work)
    try:
        train_src = data.build_source(args.data_path, cfg.image_size, "train", args.builtin_size)
        val_src = (data.build_source(args.val_data_path or args.data_path, cfg.image_size, "val")
                   if args.val_data_path or args.data_path == data.BUILTIN else train_src)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    train_ds = data.ImageDataset(train_src, cfg.image_size, train=True, seed=args.seed, crop=args.crop or "random")
    val_ds = data.ImageDataset(val_src, cfg.image_size, train=False, seed=args.seed)
    eval_idx = data.balanced_subset(val_src.labels, args.eval_images, args.seed)  # every class, not the first n
    monitor_idx = diffusability.monitor_subset(val_src.labels, args.diffusability_images)
    monitor_labels = [val_src.labels[i] for i in monitor_idx]
    monitor_classes = len(set(monitor_labels))
    if args.diffusability_every > 0 and len(monitor_idx) < 2 * monitor_classes:
        sys.exit(f"error: the diffusability monitor needs two held-out images per class of its "
                 f"{monitor_classes} (a probe split): raise --diffusability_images to {2 * monitor_classes} or more")
    steps_per_epoch = math.ceil(len(train_ds) / world) // (micro * accum)
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_ds)} training images are fewer than one global batch "
                 f"({args.global_batch_size}); lower --global_batch_size")

    # ---- model, EMA, optimizer. Same init on every rank (seeded before the per-rank seed)
    torch.manual_seed(args.seed)
    model = build(cfg).to(device)
    if init is not None:  # start from the EMA weights of the previous stage
        sd = init.get("ema") or init["model"]
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith(model.TRAIN_ONLY_PARAMS)})
    _, start, teachers = FAMILY_SETUP[cfg.family]
    encoder_src, ref = start(model, args, cfg, ckpt, init) if start else (None, None)
    groups = param_groups(model, args.stage, args.weight_decay)             # freezes what the stage does not train
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # e.g. a parameter this version freezes (DINOv2's unused mask token in AlignTok)
            sys.exit(f"error: the checkpoint's optimizer does not fit the parameters this version trains ({e}): "
                     f"continue from its weights as a new run, --init_from {args.resume} with the next --stage, or "
                     f"resume with the nanotok version that wrote it")
        step = ckpt["step"]
    lpips = None
    if args.perceptual_weight > 0:
        try:
            lpips = load_lpips(args.vgg_ckpt).to(device)
        except (RuntimeError, FileNotFoundError, KeyError) as e:
            sys.exit(f"error: LPIPS: {e} (or train without it: --perceptual_weight 0)")
    if teachers:  # frozen, not part of the checkpoint
        teachers(model, args, cfg, device)
    if args.compile:  # the adaptive weights (GAN, L_sp) differentiate w.r.t. one weight: its layer stays eager
        engine.keep_eager(model, ([model.last_layer] if args.disc != "none" else []) +
                          ([model.encoder_last_layer] if ref is not None else []))
    fwd = engine.wrap_model(model, args.compile, ddp, device, local)
    gan, opt_d, disc_fwd = build_gan(args, ckpt, init, device, ddp, local)

    # ---- run folder, logging
    name = args.preset if args.preset.lower().startswith(cfg.family) else f"{type(model).__name__}-{args.preset}"
    run = engine.Run(args.results_dir, name + ("" if args.stage == "main" else "-" + args.stage),
                     args.resume if ckpt is not None else None, ddp, rank, world)
    log = run.log
    log(f"{'resuming ' + run.dir + f' at step {step}' if ckpt else 'run ' + run.dir} | device {device} x{world} | "
        f"precision {precision} | global batch {args.global_batch_size} = {world} ranks x {micro} x {accum} accum")
    if ignored:
        log(f"resume: ignored {', '.join('--' + k for k in ignored)} (restored from the checkpoint; a resumed run "
            f"may change only {', '.join('--' + k for k in RESUME_FLAGS)})")
    log(f"lr schedule: warmup {args.warmup_steps}, cosine to {args.lr * args.min_lr_ratio:.3g} at step "
        f"{args.decay_steps}" + (f"; steps {args.decay_steps}-{args.max_steps} stay at that floor (pass "
                                 f"--decay_steps to re-plan)" if args.max_steps > args.decay_steps else ""))
    if replanned:
        old, new = (engine.cosine_lr(step, args.lr, args.warmup_steps, h, args.min_lr_ratio) for h in replanned)
        log(f"lr schedule re-planned on resume (--decay_steps {replanned[1]}, was {replanned[0]}): the lr at step "
            f"{step} moves from {old:.3g} to {new:.3g}")
    aux = getattr(model, "aux", torch.nn.ModuleDict())
    log(f"parameters: encoder {engine.count(model.encoder) / 1e6:.2f}M, pixel decoder "
        f"{engine.count(model.decoder) / 1e6:.2f}M, aux decoders {engine.count(aux) / 1e6:.2f}M "
        f"({', '.join(aux) or 'none'}), trainable "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M")
    if gan is not None:
        log(f"GAN: {args.disc} discriminator, {engine.count(gan.disc) / 1e6:.2f}M trainable, from step "
            f"{args.disc_start} (weight {args.disc_weight} x adaptive, LeCAM {args.lecam_weight}, CR {args.cr_weight})"
            + ("; BatchNorm per rank under gloo" if ddp and device.type != "cuda" else ""))
    if encoder_src:
        log(f"encoder: {encoder_src}")
    if ref is not None:
        log(f"semantic preservation: L_sp against the stage-1 model, weight {args.sp_weight} x adaptive")
    log(f"config: {json.dumps(asdict(cfg))}")
    log(f"args: {json.dumps(vars(args))}")
    log(f"data: {len(train_ds)} train images ({train_src.num_classes} classes), {steps_per_epoch} steps/epoch")

    # ---- RNG: per-rank streams for masking; a resumed run restores them exactly
    torch.manual_seed(args.seed * world + rank)
    if ckpt is not None:
        run.restore_rng(ckpt, device, args.seed)

    def checkpoint(step):
        run.checkpoint(lambda: {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                "step": step, "epoch": step // steps_per_epoch, "config": asdict(cfg),
                                "args": vars(args), **gan_state(gan, opt_d),
                                **({"sp_reference": ref.state_dict()} if ref is not None else {})},
                       step, args.keep_checkpoints, device)

    stream = engine.step_batches(train_ds, step, steps_per_epoch, accum, micro, args.seed, rank, world,
                                 args.num_workers, pin=device.type == "cuda")
    grid_idx = [eval_idx[j] for j in data.balanced_subset([val_src.labels[i] for i in eval_idx], 8, args.seed)]
    grid_x = torch.stack([val_ds[i][0] for i in grid_idx]).to(device)
    model.train()
    sums, counts, n_sum, t0 = {}, {}, 0, time.time()
    streak, nonfinite, skipped = 0, 0, 0  # consecutive non-finite steps; skipped updates, unreadable images
    monitor_s, t_run = 0.0, time.time()
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps:
        lr = engine.cosine_lr(step, args.lr, args.warmup_steps, args.decay_steps, args.min_lr_ratio)
        for g in opt.param_groups + (opt_d.param_groups if gan is not None else []):
            g["lr"] = lr
        mask_ratio = None  # 'drawn': a ratio per batch
        if stage.mask == "anneal":
            mask_ratio = cfg.mask_ratio * max(0.0, 1 - step / max(1, args.mask_anneal_steps))
        elif stage.mask == "none":
            mask_ratio = 0.0
        log_now = args.log_every > 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.max_steps)
        # the generator: accum micro-batches, their gradients all-reduced on the last one only (DDP)
        pw, adversarial = perceptual_weight(args, step), gan is not None and gan.active(step)
        terms, pairs = {}, []  # pairs: (x, detached reconstruction) of each micro-batch, for the D step
        for i in range(accum):
            x, _, n_bad = next(stream)
            skipped += int(n_bad.sum())
            x = x.to(device, non_blocking=True)
            with ctx:  # once per micro-batch, on the unmasked image (MacTok; None for MAETok), in the step's
                teacher = model.teach(x)  # precision: DINOv2-L in fp32 would cost as much as the tokenizer
            teacher = teacher and {k: v.float() for k, v in teacher.items()}  # fp32 for the masks and losses
            mask = model.sample_mask(len(x), device, mask_ratio, teacher)  # on the CPU RNG: no sync
            with (fwd.no_sync() if ddp and i < accum - 1 else nullcontext()), ctx:
                out = generator_loss(model, fwd, x, mask, teacher, lpips, pw, ref, args.sp_weight,
                                     gan if adversarial else None)
                (out["loss"] / accum).backward()
            engine.add_terms(terms, out, accum)
            if adversarial:
                pairs.append((x, out["rec"].detach()))
        gnorm = engine.clip_gradients(model.parameters(), args.grad_clip)
        streak = engine.nonfinite_streak(gnorm, streak, args.nonfinite_patience, log, step)
        if streak == 0:
            opt.step()
            engine.ema_update(ema, model, args.ema_decay)
        opt.zero_grad(set_to_none=True)
        nonfinite += streak > 0
        dnorm = None
        if pairs and streak == 0:  # the D step on the same images and the pre-update generator's reconstructions
            d_terms = {}
            for i, (x, rec) in enumerate(pairs):
                with (disc_fwd.no_sync() if ddp and i < accum - 1 else nullcontext()), ctx:
                    d_out = gan.discriminator_loss(disc_fwd, x, rec, ddp)
                    (d_out["loss"] / accum).backward()
                engine.add_terms(d_terms, d_out, accum)
            terms["d_loss"] = d_terms.pop("loss")
            terms.update(d_terms)
            dnorm = engine.clip_gradients(gan.disc.parameters(), args.grad_clip)
            if bool(torch.isfinite(dnorm)):
                opt_d.step()
            else:
                log(f"step {step + 1}: non-finite discriminator gradient norm: its update skipped")
                nonfinite += 1
            opt_d.zero_grad(set_to_none=True)
        for k, v in terms.items():
            if v is not None:
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
        n_sum += 1
        step += 1
        bar.update(1)

        if log_now:
            means, (n_bad,) = engine.reduce_means(sums, counts, ddp, world, extra=(skipped,))
            rec = {"step": step, **means, "lr": lr, "grad_norm": gnorm.item(),
                   "img_per_s": n_sum * args.global_batch_size / (time.time() - t0), "skipped_images": int(n_bad),
                   "nonfinite_steps": nonfinite}
            if mask_ratio is not None:
                rec["mask_ratio"] = mask_ratio
            if dnorm is not None:
                rec["d_grad_norm"] = dnorm.item()
            run.metrics(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", pix=f"{rec['pixel']:.4f}")
            if n_bad:
                log(f"step {step}: {int(n_bad)} unreadable images skipped since the last log")
            for name in ("d_weight", "sp_lambda"):  # an adaptive weight that its clamp or eps decided
                bound = [f"{w} in {rec[f'{name}_{w}']:.0%} of steps" for w in ("clamped", "eps_bound")
                         if rec.get(f"{name}_{w}", 0) > 0]
                if bound:
                    log(f"step {step}: warning: the adaptive weight {name} was {', '.join(bound)} since the last "
                        f"log (gradient norms {rec[name + '_nll_grad']:.3g} / {rec[name + '_grad']:.3g})")
            sums, counts, n_sum, skipped, t0, nonfinite = {}, {}, 0, 0, time.time(), 0
        if args.eval_every > 0 and (step % args.eval_every == 0 or step == args.max_steps):
            psnr = eval_psnr(ema, val_ds, eval_idx, rank, world, device, ctx)
            log(f"step {step}: held-out PSNR (EMA, {len(eval_idx)} images) {psnr:.2f} dB")
            run.metrics({"step": step, "eval_psnr_ema": psnr})
            if hasattr(ema, "diagnostics"):  # MacTok's posterior-collapse diagnostics
                x = torch.stack([val_ds[i][0] for i in eval_idx[:1000]]).to(device)
                d = ema.diagnostics(x)
                log(f"step {step}: KL per element {d['kl_per_element']:.4f}, active units {d['active_units']}/"
                    f"{d['num_units']}, PSNR of D(mu) {d['psnr_mu']:.2f} dB against D(0) {d['psnr_prior']:.2f} dB")
                run.metrics({"step": step, **{f"eval_{k}": v for k, v in d.items()}})
        if args.diffusability_every > 0 and step % args.diffusability_every == 0:  # every rank: no collective
            t_mon = time.time()
            m = diffusability.monitor(ema, val_ds, monitor_idx, monitor_labels, device, ctx)
            monitor_s += time.time() - t_mon
            log(f"step {step}: diffusability monitor ({len(monitor_idx)} images): LNC {m['lnc']:.3f}, linear probe "
                f"{m['linear_probe_accuracy']:.3f}, VIV_norm {m['viv_norm']:.3f} ({time.time() - t_mon:.1f} s)")
            run.metrics({"step": step, **{f"monitor_{k}": v for k, v in m.items()}, "monitor_s": time.time() - t_mon})
            t0 += time.time() - t_mon                                        # not in the next img_per_s
        if rank == 0 and args.grid_every > 0 and (step % args.grid_every == 0 or step == args.max_steps):
            vis = getattr(cfg, "mask_ratio", getattr(cfg, "mask_ratio_max", 0.0))
            save_grid(model, ema, grid_x, vis if mask_ratio is None else mask_ratio,
                      os.path.join(run.dir, "grids", f"{step:07d}.png"), ctx)
        if (args.ckpt_every > 0 and step % args.ckpt_every == 0) or step == args.max_steps:
            checkpoint(step)
    bar.close()
    log(f"done: {step} steps, checkpoints in {os.path.join(run.dir, 'checkpoints')}" + (
        f"; the diffusability monitor took {monitor_s:.1f} s of {time.time() - t_run:.1f} s "
        f"({100 * monitor_s / (time.time() - t_run):.1f}%)" if monitor_s else ""))
    if ddp:  # the DDP wrappers hold the process group: released first, so that it is shut down here, not at exit
        del fwd, disc_fwd
        torch.distributed.destroy_process_group()
    return run.dir


if __name__ == "__main__":
    main()
