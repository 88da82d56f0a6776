"""
The diffusability study at small scale (docs/study.md): families of tokenizers, each member with a latent cache,
tiny denoisers (one per seed), samples and a proxy gFID, then every latent metric (evaluate.py diffusability); the
script correlates each metric with gFID within a family, with statistics fixed in advance (docs/study.md): Pearson r
(the paper's statistic) and Spearman rho with permutation p-values, the partial r of log gFID given log rFID,
Holm's correction over the primary metrics (VIV_norm, LNC, linear probe; F: the first two), the seed noise
floor; a bootstrap interval only from 10 members up. It writes a markdown table, a JSON and a scatter grid.

  F: reconstruction held fixed by construction (the primary test): one plain AE, 12 invertible linear maps of its
     latents (latent_map.py), decoded through the inverse: identical PSNR / rFID, different latent geometry
  G: the same design on a 2D grid (the spatial metrics and SEC): B1's network seen through spatial filters of its
     token grid, the same on every channel (blur, sharpen, a shuffle of the positions)
  R: the regularisation axis with reconstruction controlled both ways: MAETok-tiny's mask ratio from 0 to 0.9, each
     member followed by the decoder fine-tuning stage; only members within --psnr_band dB of the median are correlated
  A: 1D-token tokenizers trained with the paper's regularisations (KL, masking, alignment); B: 2D grids (AlignTok's
     stages). Reconstruction varies in both: the control drops members > --psnr_gap dB under the median.

  python study.py                               # family F: 12 members x 2 denoiser seeds (docs/study.md: time)
  python study.py --family R --out results/study-R   # the mask-ratio family (docs/study.md: time)
  python study.py --family G --out results/study-G   # the grid family (docs/study.md: time)
  python study.py --family A,B --seeds 0        # the trained families
  python study.py --members F01,F05 --out results/study-x
  python study.py --launcher "torchrun --nproc_per_node=8" --data_path /data/imagenet/train \\
      --val_data_path /data/imagenet/val --tok_steps 20000 --dit_steps 50000 ...   # the same on GPUs

Resumes: every step of every member is skipped when its output exists, and a finished member (summary.json)
is not touched. A summary.json copied into <out>/<id>/ (with the same shared proxies) counts as finished.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import engine
import latent_map
import latent_metrics as lm
import released
import tokenizer

MAE = ["--preset", "tiny"]
KL = ["--preset", "MacTok-tiny", "--align", "", "--teacher", "none", "--semantic_mask_prob", "0"]
BSTAR = 1e-3  # the collapse experiment's beta* (README, MacTok): the KL weight where the unmasked run collapses
TEACHER = ["--teacher", "proxy", "--teacher_proxy_ckpt", "{teacher}"]
# id: (family, what it varies, train_tokenizer.py flags)
MEMBERS = {
    "A1": ("A", "plain AE: no mask, no aux, no KL", MAE + ["--aux_targets", "", "--mask_ratio", "0",
                                                          "--mask_ratio_min", "0"]),
    "A2": ("A", "MAETok-tiny: mask 0.4-0.6 + HOG", MAE),
    "A3": ("A", f"KL {BSTAR / 10:g}, no mask", KL + ["--kl_weight", f"{BSTAR / 10:g}", "--mask_tokens", "none"]),
    "A4": ("A", f"KL {BSTAR / 3:.2g}, no mask", KL + ["--kl_weight", f"{BSTAR / 3:.2g}", "--mask_tokens", "none"]),
    "A5": ("A", f"KL {BSTAR:g}, no mask", KL + ["--kl_weight", f"{BSTAR:g}", "--mask_tokens", "none"]),
    "A6": ("A", f"KL {BSTAR / 3:.2g} + random mask, r_max 0.4",
           KL + ["--kl_weight", f"{BSTAR / 3:.2g}", "--mask_tokens", "image", "--mask_ratio_max", "0.4"]),
    "A7": ("A", f"KL {BSTAR / 3:.2g} + random mask, r_max 0.7",
           KL + ["--kl_weight", f"{BSTAR / 3:.2g}", "--mask_tokens", "image", "--mask_ratio_max", "0.7"]),
    "A8": ("A", "A7 + local and global alignment to a proxy teacher (0.1)",
           KL + ["--kl_weight", f"{BSTAR / 3:.2g}", "--mask_tokens", "image", "--mask_ratio_max", "0.7",
                 "--align", "local,global", "--align_weight", "0.1"] + TEACHER),
    "A9": ("A", "A8 + semantic masking (p 0.5): MacTok-tiny",
           KL + ["--kl_weight", f"{BSTAR / 3:.2g}", "--mask_tokens", "image", "--mask_ratio_max", "0.7",
                 "--align", "local,global", "--align_weight", "0.1", "--semantic_mask_prob", "0.5"] + TEACHER),
}
# family B, 2D grids (AlignTok-tiny's shape: an 8 x 8 x 8 latent grid, the small LDM decoder, L1): the same
# network from scratch, with the "foundation encoder" (the teacher proxy) frozen, and fine-tuned with and without
# the semantic-preservation loss; its denoiser is --dit_model_2d (LightningDiT: 2D RoPE)
AT = ["--preset", "AlignTok-tiny"]
MEMBERS.update({
    "B1": ("B", "2D conv AE from scratch (AlignTok-tiny's network, random encoder)", AT + ["--stage", "scratch"]),
    "B2": ("B", "AlignTok-tiny stage 1: the proxy encoder frozen", AT + ["--stage", "align", "--encoder_ckpt",
                                                                         "{teacher}"]),
    "B3": ("B", "B2 + stage 2 (encoder fine-tuned), w_sp 0", ["--stage", "perceptual", "--init_from", "{init}",
                                                             "--sp_weight", "0"]),
    "B4": ("B", "B2 + stage 2 (encoder fine-tuned), w_sp 1", ["--stage", "perceptual", "--init_from", "{init}",
                                                             "--sp_weight", "1"]),
})
PARENTS = {"B3": "B2", "B4": "B2"}  # a later stage starts from the finished tokenizer of another member
# family F, reconstruction fixed by construction: A1's plain AE (trained once, with the diffusability monitor on)
# seen through invertible linear maps of its normalised latents (latent_map.py): class directions scaled (LDA gain),
# the PCA spectrum raised to a power at fixed total variance, random dense mixes of a given condition number
FIXED_BASE = MEMBERS["A1"][2]
FIXED = {"F01": ("identity", 1), "F02": ("lda_gain", 0.25), "F03": ("lda_gain", 2), "F04": ("lda_gain", 4),
         "F05": ("lda_gain", 8), "F06": ("pca_power", 0), "F07": ("pca_power", 0.5), "F08": ("pca_power", 1.5),
         "F09": ("pca_power", 2), "F10": ("mix", 10), "F11": ("mix", 100), "F12": ("mix", 1000)}
MEMBERS.update({m: ("F", f"A1 latents through {kind} {v:g}", None) for m, (kind, v) in FIXED.items()})
# family G, the same design on a 2D grid, for the spatial metrics (LDS, CDS) and SEC: B1's network (AlignTok-tiny from
# scratch: no teacher, so nothing circular with the proxy that scores gFID), its 8 x 8 token grid filtered the same way
# on every channel: Gaussian blur and its inverse (sharpen) at two widths, and a fixed shuffle of the positions,
# which keeps VIV_norm and LNC exactly and destroys spatial neighbourhoods
GRID_BASE = MEMBERS["B1"][2]
GRID_FIXED = {"G1": ("identity", 1), "G2": ("blur", 0.5), "G3": ("blur", 0.8), "G4": ("sharpen", 0.5),
              "G5": ("sharpen", 0.8), "G6": ("shuffle", 0)}
FIXED.update(GRID_FIXED)
MEMBERS.update({m: ("G", f"B1 latents through {kind}" + (f" {v:g}" if kind != "shuffle" else ""), None)
                for m, (kind, v) in GRID_FIXED.items()})
MAPPED = {"F": ("F-base", FIXED_BASE), "G": ("G-base", GRID_BASE)}  # family: its base's folder and flags
# family R, the regularisation axis with reconstruction controlled both ways: MAETok-tiny's mask ratio (the paper's
# regulariser; the HOG target of the masked patches from a ratio > 0) swept from 0 to 0.9, every member then given
# MAETok's decoder fine-tuning (encoder frozen, mask annealed to 0: the paper's way to recover reconstruction,
# --dec_steps); only members within --psnr_band dB of the family's median PSNR enter the correlations
masked = lambda lo, hi: MAE + ["--mask_ratio", f"{hi:g}", "--mask_ratio_min", f"{lo:g}"]
MEMBERS.update({
    "R1": ("R", "plain AE (mask 0, no aux target)", FIXED_BASE),
    "R2": ("R", "mask 0.05-0.15, HOG target", masked(0.05, 0.15)),
    "R3": ("R", "mask 0.2-0.4, HOG target", masked(0.2, 0.4)),
    "R4": ("R", "mask 0.4-0.6, HOG target (MAETok-tiny)", masked(0.4, 0.6)),
    "R5": ("R", "mask 0.6-0.75, HOG target", masked(0.6, 0.75)),
    "R6": ("R", "mask 0.75-0.9, HOG target", masked(0.75, 0.9)),
})
# ... and six more, fixed before they ran, that fill the band R2-R4 fell in (their PSNR within 0.6 dB of each other
# for mask ratios 0.05-0.6, R1 and R5 outside it): ranges of width 0.1 centred every 0.1 from 0.05 to 0.6
MEMBERS.update({f"R{i}": ("R", f"mask {lo:g}-{lo + 0.1:g}, HOG target", masked(lo, lo + 0.1))
                for i, lo in zip(range(7, 13), (0.0, 0.15, 0.25, 0.35, 0.45, 0.55))})
DECODER_STAGE = ("R",)  # families whose members add the decoder fine-tuning stage
BAND = ("R",)  # families whose recon control is two-sided (+-psnr_band), the rest one-sided (psnr_gap under)
SMOKE = ["F01", "F04", "F06", "F11"]
PRIMARY = ("viv_norm", "lnc", "linear_probe_accuracy")  # Holm's correction runs over these (the paper's main three)
# ... plus, in the grid family built to test them, SEC and LDS (the spatial metrics of the paper's Section 4)
PRIMARY_OF = {"G": PRIMARY + ("sec_0.5", "lds")}
# ... except where a design holds one fixed: an invertible linear map leaves the classes a linear probe can separate
# unchanged (up to its regularisation), so families F and G cannot test the probe
INVARIANT = {"F": ("linear_probe_accuracy",), "G": ("linear_probe_accuracy",)}
# the metrics correlated with gFID, and the direction the paper reports (+: higher metric, worse gFID); the
# grid-only ones (SEC, LDS, CDS, SRSS, LNC-FG, the direct equivariance error) enter families B's and G's only
METRICS = {"viv_norm": "+", "viv_marginal_norm": "+", "lnc": "-", "linear_probe_accuracy": "-",
           "gmm_nll_per_dim_k10": "+", "sec1d_0.5": "+", "sec_0.5": "+", "lds": "-", "cds": "-", "srss": "-",
           "lnc_fg": "-", "rmsc": "-", "density_cv": "weak", "gini": "weak",
           "entropy": "weak", "proxy_ifid": "+", "eq_linear_r2_rot90": "weak", "eq_linear_r2_scale": "weak",
           "eq_err_rot90": "weak", "eq_err_scale": "weak",
           "trajectory_local_straightness": "-", "trajectory_global_efficiency": "-", "psnr": "weak (controlled)",
           "proxy_rfid": "weak (controlled)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="the diffusability study at small scale")
    p.add_argument("--out", default="results/study", help="study folder (one sub-folder per member)")
    p.add_argument("--family", default="F", help="comma list of families: F (fixed reconstruction), G (the same on "
                   "a grid), R (mask ratio, reconstruction within a band), A, B")
    p.add_argument("--members", default=None, help="comma list of member ids (default: every member of --family)")
    p.add_argument("--smoke", action="store_true", help=f"only {','.join(SMOKE)}")
    p.add_argument("--seeds", default="0,1", help="denoiser seeds per member (their spread is the noise floor)")
    p.add_argument("--time_dist", default="uniform", choices=["uniform", "logit_normal"],
                   help="the denoisers' training t (uniform: as the paper's SiT; the A / B tables of docs/study.md "
                        "were measured with logit_normal and one seed)")
    p.add_argument("--monitor_every", type=int, default=100, help="families F / G's base tokenizer: the diffusability "
                   "monitor's interval (train_tokenizer.py --diffusability_every)")
    p.add_argument("--launcher", default=sys.executable, help="how to run the scripts, e.g. 'torchrun --nproc_per_node=8'")
    p.add_argument("--data_path", default="builtin", help="training images (every script)")
    p.add_argument("--val_data_path", default=None, help="held-out images (builtin: its val split)")
    p.add_argument("--builtin_size", type=int, default=50_000, help="built-in training images")
    p.add_argument("--image_size", type=int, default=32, help="resolution of the proxy and the reference images")
    p.add_argument("--tok_steps", type=int, default=600, help="tokenizer steps per member")
    p.add_argument("--cache_images", type=int, default=5000, help="images in each latent cache")
    p.add_argument("--dit_model", default="tiny", help="denoiser preset of 1D-token members")
    p.add_argument("--dit_model_2d", default="LightningDiT-tiny", help="denoiser preset of 2D-grid members")
    p.add_argument("--dit_steps", type=int, default=1000, help="denoiser steps per member and seed (the A / B tables: "
                   "1500)")
    p.add_argument("--dit_batch", type=int, default=64, help="denoiser global batch")
    p.add_argument("--num_samples", type=int, default=500, help="samples per member for gFID")
    p.add_argument("--sample_steps", type=int, default=25, help="Euler steps of those samples")
    p.add_argument("--cfg_scale", type=float, default=4.0, help="the guided gFID's scale (also reported: none)")
    p.add_argument("--num_val", type=int, default=1000, help="held-out images for the latent metrics and recon")
    p.add_argument("--tsne_reps", type=int, default=2, help="uniformity repetitions")
    p.add_argument("--proxy_steps", type=int, default=600, help="steps of the evaluation proxy and the teacher")
    p.add_argument("--psnr_gap", type=float, default=2.0, help="recon control of A / B: dB under the family median")
    p.add_argument("--psnr_band", type=float, default=1.0, help="recon control of R: dB either side of the median")
    p.add_argument("--dec_steps", type=int, default=300, help="family R: decoder fine-tuning steps per member")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each correlation (only with "
                   "10 members or more: below, the intervals are artefacts of few distinct resamples)")
    p.add_argument("--permutations", type=int, default=20_000, help="Monte-Carlo permutations (exact up to 8 members)")
    p.add_argument("--num_workers", type=int, default=1, help="data loader workers of every script")
    args = p.parse_args(argv)
    fams = [f for f in args.family.split(",") if f]
    if args.smoke:
        args.members = SMOKE
    elif args.members:
        args.members = [m for m in args.members.split(",") if m]
    else:
        args.members = [m for m in MEMBERS if MEMBERS[m][0] in fams]
    args.seeds = [int(v) for v in args.seeds.split(",") if v]
    if not args.members or not args.seeds:
        p.error("no members (--family F, G, R, A, B or --members) or no --seeds")
    bad = [m for m in args.members if m not in MEMBERS]
    if bad:
        p.error(f"unknown members {bad}: choose from {sorted(MEMBERS)}")
    late = [m for m in args.members if m in PARENTS and (PARENTS[m] not in args.members or
                                                         args.members.index(PARENTS[m]) > args.members.index(m))]
    if late:
        p.error(f"{', '.join(late)} continue {', '.join(PARENTS[m] for m in late)}: list the parent first")
    return args


def member_flags(mid, paths, out):
    """A member's train_tokenizer.py flags with the teacher proxy and the parent member's tokenizer filled in."""
    init = newest(os.path.join(out, PARENTS[mid], "tok")) if mid in PARENTS else None
    return [f.format(teacher=paths.get("teacher"), init=init) for f in MEMBERS[mid][2]]


def run(args, script, *flags, log):
    """One script of the chain under --launcher; proxy.py, a one-process script, always under plain python (under
    torchrun every rank would train its own copy and write the same file)."""
    cmd = (shlex.split(args.launcher) if script != "proxy.py" else [sys.executable]) + [script, *flags]
    with open(log, "a") as f:
        f.write("+ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"error: {script} failed (exit {r.returncode}); see {log}")


def newest(folder):
    runs = sorted(glob.glob(os.path.join(folder, "*", "")))
    return runs[-1] if runs else None


def finished(folder, steps):
    """The newest run under `folder` if it saved its checkpoint of step `steps` (else None: the step runs again; a
    run of another length, from a call with other flags, is not taken for this one)."""
    run_dir = newest(folder)
    return run_dir if run_dir and os.path.exists(os.path.join(run_dir, "checkpoints", f"{steps:07d}.pt")) else None


def shared(args):
    """The evaluation proxy, the teacher proxy (another seed: alignment must not target the metric's network)
    and the reference images, once per study."""
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "shared.log")
    paths = {k: os.path.join(args.out, f) for k, f in (("proxy", "proxy.pt"), ("teacher", "teacher_proxy.pt"),
                                                         ("ref", "ref_val.npz"))}
    data_flags = ["--data_path", args.data_path] + (["--val_data_path", args.val_data_path] if args.val_data_path else [])
    needs_teacher = any("{teacher}" in f for m in args.members for f in MEMBERS[m][2] or [])
    for key, seed in (("proxy", 0), ("teacher", 1)):
        if key == "teacher" and not needs_teacher:
            paths.pop("teacher")
            continue
        if not os.path.exists(paths[key]):
            run(args, "proxy.py", "--steps", str(args.proxy_steps), "--seed", str(seed), "--out", paths[key],
                "--image_size", str(args.image_size),
                "--num_workers", str(args.num_workers), *data_flags, log=log)
    if not os.path.exists(paths["ref"]):
        src = data.build_source(args.val_data_path or args.data_path, args.image_size, "val", args.num_val)
        idx = data.balanced_subset(src.labels, args.num_val)
        ds = data.ImageDataset(src, args.image_size, train=False)
        arr = np.stack([data.to_uint8(ds[i][0][None])[0].numpy() for i in idx])
        np.savez(paths["ref"], arr_0=arr, labels=np.array([src.labels[i] for i in idx]))
    return paths


def last_eval_psnr(run_dir):
    """The last held-out PSNR (EMA) a tokenizer run logged."""
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"eval_psnr_ema"' in l]
    return lines[-1]["eval_psnr_ema"] if lines else None


def digest(path):
    """A short hash of a checkpoint's tensors (not of the file): which proxies scored a summary."""
    sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fixed_base(args, fam):
    """The base of a mapped family (F: A1's plain AE; G: B1's grid) trained once (with the diffusability monitor
    on), its float32 latent cache, and (z (N, L, C), labels) of the cache's images, from which every map is made."""
    folder, flags = MAPPED[fam]
    d = os.path.join(args.out, folder)
    log = os.path.join(d, "log.txt")
    os.makedirs(d, exist_ok=True)
    tok = finished(os.path.join(d, "tok"), args.tok_steps)
    if tok is None:
        print(f"family {fam}: the base tokenizer", flush=True)
        run(args, "train_tokenizer.py", *flags, "--perceptual_weight", "0", "--max_steps", str(args.tok_steps),
            "--eval_every", str(args.tok_steps), "--grid_every", "-1", "--ckpt_every", str(args.tok_steps),
            "--log_every", "50", "--diffusability_every", str(args.monitor_every), "--results_dir",
            os.path.join(d, "tok"), "--data_path", args.data_path, "--builtin_size", str(args.builtin_size),
            "--num_workers", str(args.num_workers), log=log)
        tok = newest(os.path.join(d, "tok"))
    cache = os.path.join(d, "cache")
    if not os.path.exists(os.path.join(cache, "meta.json")):
        print(f"family {fam}: the base latent cache", flush=True)
        run(args, "cache_latents.py", "--tokenizer_ckpt", tok, "--cache_path", cache, "--data_path", args.data_path,
            "--builtin_size", str(args.cache_images), "--num_workers", str(args.num_workers), log=log)
    c = data.LatentCache(cache)
    z = torch.cat([s["latents"] for s in c.shards]).float()
    y = torch.cat([s["labels"] for s in c.shards])
    return tok, z, y


def mapped_tokenizer(args, mid, base, path):
    """A family-F / G member: the base tokenizer and its map T, saved as a tokenizer checkpoint (latent_map.py)."""
    tok_path, z, y = base
    ckpt = released.load(tok_path)
    base_tok = tokenizer.from_checkpoint(ckpt)
    mean, std = z.double().mean((0, 1)), z.double().std((0, 1))
    u = ((z.double() - mean) / std).flatten(1)                               # (N, L C)
    kind, value = FIXED[mid]
    T = latent_map.make_map(kind, value, u, y, seed=0, grid=base_tok.grid)  # one rotation pair for every kappa
    cfg = latent_map.LatentMapConfig(base=asdict(base_tok.cfg), map=kind, value=float(value), seed=0)
    tok = tokenizer.build(cfg)
    tok.base.load_state_dict(base_tok.state_dict())
    tok.set_map(T, mean, std)
    state = {"config": asdict(cfg), "ema": tok.state_dict(), "model": None, "step": ckpt.get("step"),
             "args": {"base": os.path.abspath(engine.find_checkpoint(tok_path)), "map": kind, "value": value}}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def decoder_stage_flags(args, tok, folder):
    """Family R's second stage (MAETok's decoder fine-tuning: encoder frozen, the member's mask ratio annealed to 0
    over the stage) of the tokenizer run `tok`, into `folder`."""
    n = str(args.dec_steps)
    return ["--stage", "decoder_finetune", "--init_from", tok, "--perceptual_weight", "0", "--max_steps", n,
            "--mask_anneal_steps", n, "--eval_every", n, "--grid_every", "-1", "--ckpt_every", n, "--log_every", "50",
            "--results_dir", folder]


def member(args, mid, paths, k, n):
    """Train (or map), cache, denoise (one run per seed), sample, score and measure one member; its summary."""
    fam, what, _ = MEMBERS[mid]
    d = os.path.join(args.out, mid)
    summary = os.path.join(d, "summary.json")
    protocol = {"seeds": args.seeds, "time_dist": args.time_dist, "dit_steps": args.dit_steps,
                "tok_steps": args.tok_steps, "num_samples": args.num_samples,
                **({"dec_steps": args.dec_steps} if fam in DECODER_STAGE else {})}
    if os.path.exists(summary):
        done = json.load(open(summary))
        if done.get("protocol", protocol) != protocol:  # (the A / B summaries predate the record: taken as they are)
            sys.exit(f"error: {summary} was measured with {done['protocol']}, this call asks for {protocol}: pass "
                     f"the same flags, or another --out")
        used = {key: done.get(f"{key}_digest") for key in ("proxy", "teacher")}
        now = {key: digest(paths[key]) for key in used if paths.get(key) and used[key]}
        if any(used[key] != now[key] for key in now):  # a summary from another study folder: other proxies
            sys.exit(f"error: {summary} was measured with other proxies ({used}) than {args.out}'s ({now}); "
                     f"copy that study's proxy.pt / teacher_proxy.pt here, or delete the summary to re-run {mid}")
        print(f"[{k}/{n}] {mid} done before: {what}")
        return done
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "log.txt")
    t0 = time.time()
    stage = lambda s: print(f"[{k}/{n}] {mid} {s} ({(time.time() - t0) / 60:.1f} min) - {what}", flush=True)
    data_flags = ["--data_path", args.data_path, "--builtin_size", str(args.builtin_size)]
    common = ["--num_workers", str(args.num_workers)]
    extra = {}
    if fam in MAPPED:
        tok = os.path.join(d, "tokenizer.pt")
        if not os.path.exists(tok):
            stage("mapped tokenizer")
            mapped_tokenizer(args, mid, fixed_base(args, fam), tok)
        extra["condition_number"] = float(torch.linalg.cond(torch.load(tok, weights_only=True)["ema"]["T"]))
    else:
        if finished(os.path.join(d, "tok"), args.tok_steps) is None:
            stage("tokenizer")
            run(args, "train_tokenizer.py", *member_flags(mid, paths, args.out), "--perceptual_weight",
                "0", "--max_steps", str(args.tok_steps), "--eval_every", str(args.tok_steps), "--grid_every", "-1",
                "--ckpt_every", str(args.tok_steps), "--log_every", "50", "--results_dir", os.path.join(d, "tok"),
                *data_flags, *common, log=log)
        tok = newest(os.path.join(d, "tok"))
        if fam in DECODER_STAGE:
            if finished(os.path.join(d, "dec"), args.dec_steps) is None:
                stage("decoder fine-tuning")
                run(args, "train_tokenizer.py", *decoder_stage_flags(args, tok, os.path.join(d, "dec")), *data_flags,
                    *common, log=log)
            extra["psnr_main_stage"] = last_eval_psnr(tok)  # held-out PSNR before the decoder stage
            tok = newest(os.path.join(d, "dec"))
    cache = os.path.join(d, "cache")
    if not os.path.exists(os.path.join(cache, "meta.json")):
        stage("latent cache")  # A / B: float16, as their tables were measured; F / G: float32 (T^-1 would amplify
        run(args, "cache_latents.py", "--tokenizer_ckpt", tok, "--cache_path", cache, "--data_path",  # rounding)
            args.data_path, "--builtin_size", str(args.cache_images), "--cache_dtype",
            "float32" if fam in MAPPED else "float16", *common, log=log)
    model = args.dit_model_2d if json.load(open(os.path.join(cache, "meta.json"))).get("grid") else args.dit_model
    P = ["--feature_net", "proxy", "--proxy_ckpt", paths["proxy"]]
    gen, dits = {}, {}
    for seed in args.seeds:
        runs = os.path.join(d, "dit" if seed == 0 else f"dit-seed{seed}")
        if finished(runs, args.dit_steps) is None:
            stage(f"denoiser, seed {seed}")
            run(args, "train_diffusion.py", "--model", model, "--cache_path", cache, "--results_dir", runs,
                "--global_batch_size", str(args.dit_batch), "--lr", "1e-3", "--time_dist", args.time_dist,
                "--max_steps", str(args.dit_steps), "--ema_decay", "0.99", "--log_every", "100", "--grid_every",
                "-1", "--ckpt_every", str(args.dit_steps), "--seed", str(seed), *common, log=log)
        dits[seed] = newest(runs)
        for cfg in (1.0, args.cfg_scale):
            tag = f"cfg{cfg:g}" + ("" if seed == 0 else f"_seed{seed}")
            npz, js = os.path.join(d, f"samples_{tag}.npz"), os.path.join(d, f"gen_{tag}.json")
            if not os.path.exists(js):
                stage(f"samples and gFID, CFG {cfg:g}, seed {seed}")
                run(args, "sample.py", "--ckpt", dits[seed], "--num_samples", str(args.num_samples), "--batch_size",
                    "250", "--num_steps", str(args.sample_steps), "--cfg_scale", str(cfg), "--seed", str(seed),
                    "--out", npz, log=log)
                run(args, "evaluate.py", "gen", "--samples", npz, "--ref", paths["ref"], *P, "--out", js, log=log)
            gen[seed, cfg] = json.load(open(js))
    recon = os.path.join(d, "recon.json")
    if not os.path.exists(recon):
        stage("reconstruction")
        val = ["--data_path", args.val_data_path] if args.val_data_path else []
        run(args, "evaluate.py", "recon", "--ckpt", tok, "--num_images", str(args.num_val), "--lpips", "0", *P,
            *val, "--out", recon, log=log)
    dif = os.path.join(d, "diffusability.json")
    if not os.path.exists(dif):
        stage("latent metrics")
        val = ["--data_path", args.val_data_path, "--train_path", args.data_path] if args.val_data_path else []
        run(args, "evaluate.py", "diffusability", "--tokenizer_ckpt", tok, "--denoiser_ckpt", dits[args.seeds[0]],
            *P, *val, "--num_val", str(args.num_val), "--num_ifid", str(min(1000, args.num_val)), "--tsne_reps",
            str(args.tsne_reps), "--out", dif, log=log)
    r, m = json.load(open(recon)), json.load(open(dif))
    per_seed = lambda cfg, key: [gen[s, cfg].get(key) for s in args.seeds]
    out = {"id": mid, "family": fam, "what": what, "tokenizer": tok, "denoiser": dits[args.seeds[0]],
           "protocol": protocol, "gfid_seeds": per_seed(1.0, "proxy_fid"),
           "gfid_cfg_seeds": per_seed(args.cfg_scale, "proxy_fid"),
           "gfid": float(np.mean(per_seed(1.0, "proxy_fid"))),
           "gfid_cfg": float(np.mean(per_seed(args.cfg_scale, "proxy_fid"))),
           "sample_class_accuracy": gen[args.seeds[0], 1.0].get("class_accuracy"),
           "sample_class_accuracy_cfg": gen[args.seeds[0], args.cfg_scale].get("class_accuracy"),
           "psnr": r["psnr"], "proxy_rfid": r["proxy_rfid"], **extra,
           **{k: v for k, v in m.items() if isinstance(v, float)},
           "posterior_sample": {k: v for k, v in m.get("posterior_sample", {}).items() if isinstance(v, float)},
           "proxy_digest": digest(paths["proxy"]),
           "teacher_digest": digest(paths["teacher"]) if "teacher" in paths else None}
    with open(summary + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(summary + ".tmp", summary)
    stage(f"done: gFID {out['gfid']:.2f} (CFG {args.cfg_scale:g}: {out['gfid_cfg']:.2f}), PSNR {out['psnr']:.2f}")
    return out


def spread_is_nil(x):
    """A value held fixed by construction (families F / G: PSNR and rFID differ in float rounding only)."""
    return np.ptp(x) <= 1e-3 * max(np.abs(x).max(), 1e-12)


def primary(fam):
    """The metrics Holm's correction runs over in a family: its primary ones but those fixed by its design."""
    return [k for k in PRIMARY_OF.get(fam, PRIMARY) if k not in INVARIANT.get(fam, ())]


def verdict(e, sign, n_tests, args):
    """The reading of one primary metric, by the rules fixed in advance (docs/study.md): 'reproduces' needs the
    paper's sign, a Holm-corrected permutation p < 0.05 and a partial r (log gFID given log rFID) of the same sign."""
    n = e["n"]
    p_min = 1 / math.factorial(n) if n <= 8 else 1 / (1 + args.permutations)  # Pearson: one order reaches it
    if n_tests * p_min >= 0.05:
        return f"not tested (n = {n}: no order reaches a corrected p < 0.05)"
    want = 1 if sign == "+" else -1
    if e["pearson_p_holm"] >= 0.05:
        return "does not reproduce (not significant)"
    if np.sign(e["pearson"]) != want:
        return "does not reproduce (opposite sign)"
    pr = e["partial_r"]
    if pr is not None and not (np.isfinite(pr) and np.sign(pr) == want):
        return "does not reproduce (sign lost given rFID)"
    return "reproduces"


def correlate(rows, target, args):
    """Per metric, on the recon-controlled members and on all: Pearson r and Spearman rho with permutation p-values,
    the partial r of log target given log rFID (None when rFID is fixed), bootstrap intervals from 10 members up;
    Holm's correction and a verdict for the primary metrics (controlled set)."""
    psnr = np.array([r["psnr"] for r in rows])
    fam = rows[0]["family"]
    keep = (np.abs(psnr - np.median(psnr)) <= args.psnr_band if fam in BAND else
            psnr >= np.median(psnr) - args.psnr_gap)
    y_all, c_all = np.array([r[target] for r in rows]), np.log([r["proxy_rfid"] for r in rows])
    table = {}
    for key in METRICS:
        vals = [r.get(key) for r in rows]
        if any(v is None or not np.isfinite(v) for v in vals):
            continue
        x = np.array(vals, dtype=float)
        entry = {}
        for name, sel in (("controlled", keep), ("all", np.ones(len(rows), bool))):
            if sel.sum() < 3 or spread_is_nil(x[sel]):
                continue
            xs, ys, cs = x[sel], y_all[sel], c_all[sel]
            e = {"n": int(sel.sum()), "pearson": lm.pearson(xs, ys), "spearman": lm.spearman(xs, ys),
                 "pearson_p": lm.permutation_p(xs, ys, n=args.permutations),
                 "spearman_p": lm.permutation_p(xs, ys, rank=True, n=args.permutations),
                 "partial_r": None if spread_is_nil(cs) else  # rFID given itself: nothing left to measure
                 float("nan") if key == "proxy_rfid" else lm.partial_r(xs, np.log(ys), cs)}
            if sel.sum() >= 10:
                e["pearson_ci"] = lm.bootstrap_ci(xs, ys, lm.pearson, args.bootstrap)
                e["spearman_ci"] = lm.bootstrap_ci(xs, ys, lm.spearman, args.bootstrap)
            entry[name] = e
        if entry:
            table[key] = entry
    fixed = INVARIANT.get(fam, ())
    prim = [k for k in primary(fam) if "controlled" in table.get(k, {})]
    for k, p_adj in zip(prim, lm.holm([table[k]["controlled"]["pearson_p"] for k in prim])):
        e = table[k]["controlled"]
        e["pearson_p_holm"] = p_adj
        e["verdict"] = verdict(e, METRICS[k], len(prim), args)
    for k in fixed:
        if "controlled" in table.get(k, {}):
            table[k]["controlled"]["verdict"] = "not tested (invariant by construction)"
    return table, [r["id"] for r, k in zip(rows, keep) if not k]


def noise_floor(rows, target):
    """The seed noise floor of a family: the pooled within-member SD of `target` across denoiser seeds, the SD of
    the member means, and the correlation of the first two seeds' values over members; None with one seed."""
    seeds = [r.get(target + "_seeds") or [] for r in rows]
    if any(len(v) < 2 for v in seeds):
        return None
    v = np.array([s[:2] for s in seeds], dtype=float)
    return {"within_sd": float(np.sqrt(np.mean([np.var(s, ddof=1) for s in seeds]))),
            "between_sd": float(np.std([np.mean(s) for s in seeds], ddof=1)),
            "seed_r": lm.pearson(v[:, 0], v[:, 1]), "seeds": min(len(s) for s in seeds)}


def markdown(rows, table, excluded, target, args):
    fam = rows[0]["family"]
    nf = noise_floor(rows, target)
    head = (f"Proxy gFID ({'no CFG' if target == 'gfid' else f'CFG {args.cfg_scale:g}'}) against each metric, family "
            f"{fam}, {len(rows)} tokenizers" + (f" (gFID: mean of {nf['seeds']} denoiser seeds)" if nf else
                                                " (one denoiser seed)") + "; excluded by the recon control (PSNR more "
            + (f"than {args.psnr_band:g} dB from" if fam in BAND else f"than {args.psnr_gap:g} dB under") +
            f" the median): {', '.join(excluded) or 'none'}. p: two-sided permutation "
            "p-values (exact up to 8 members); partial r: log gFID against the metric given log rFID ('fixed': rFID "
            "held fixed by construction); p Holm over " + ", ".join(primary(fam)) + ".")
    lines = [head, ""]
    if nf:
        lines += [f"Seed noise floor: within-member SD {nf['within_sd']:.2f}, between-member SD {nf['between_sd']:.2f}, "
                  f"seed-to-seed r over members {nf['seed_r']:+.2f}.", ""]
    lines += ["| metric | paper's sign | r | p | rho | p | partial r | p Holm | reading | r (all) | n |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in table.items():
        c, a = e.get("controlled"), e.get("all")
        if c is None:
            lines.append(f"| {key} | {METRICS[key]} | - | - | - | - | - | - | - | {a['pearson']:+.2f} | {a['n']} |")
            continue
        pr = "fixed" if c["partial_r"] is None else "-" if np.isnan(c["partial_r"]) else f"{c['partial_r']:+.2f}"
        holm = f"{c['pearson_p_holm']:.3f}" if "pearson_p_holm" in c else "-"
        lines.append(f"| {key} | {METRICS[key]} | {c['pearson']:+.2f} | {c['pearson_p']:.3f} | {c['spearman']:+.2f} | "
                     f"{c['spearman_p']:.3f} | {pr} | {holm} | {c.get('verdict', '-')} | "
                     f"{a['pearson']:+.2f} | {c['n']} |")
    extra = [k for k in PRIMARY_OF.get(fam, PRIMARY) if k not in PRIMARY]  # G: its spatial metrics too
    lines += ["", "| id | tokenizer | PSNR | proxy rFID | gFID | gFID CFG | VIV_norm | LNC | probe |" +
              "".join(f" {k} |" for k in extra), "|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for r in rows:
        g = lambda k: f"{r[k]:.2f}" + (f" ({', '.join(f'{v:.1f}' for v in r[k + '_seeds'])})"
                                       if len(r.get(k + "_seeds") or []) > 1 else "")
        lines.append(f"| {r['id']} | {r['what']} | {r['psnr']:.2f} | {r['proxy_rfid']:.1f} | {g('gfid')} | "
                     f"{g('gfid_cfg')} | {r['viv_norm']:.3f} | {r['lnc']:.3f} | {r['linear_probe_accuracy']:.3f} |" +
                     "".join(f" {r.get(k, float('nan')):.3f} |" for k in extra))
    return "\n".join(lines) + "\n"


def scatter(rows, table, target, path, cell=170, cols=5):
    """One small panel per metric: gFID (y) against the metric (x), each member labelled."""
    keys = list(table)
    rows_n = (len(keys) + cols - 1) // cols
    img = Image.new("RGB", (cols * cell, rows_n * cell), "white")
    d = ImageDraw.Draw(img)
    y = np.array([r[target] for r in rows])
    for i, key in enumerate(keys):
        ox, oy = (i % cols) * cell, (i // cols) * cell
        x = np.array([r[key] for r in rows], dtype=float)
        m = 28
        d.rectangle([ox + m, oy + m, ox + cell - 8, oy + cell - m], outline="black")
        sx = lambda v: ox + m + (cell - 8 - m) * (v - x.min()) / (np.ptp(x) or 1)
        sy = lambda v: oy + cell - m - (cell - 2 * m) * (v - y.min()) / (np.ptp(y) or 1)
        for r, xv, yv in zip(rows, x, y):
            d.ellipse([sx(xv) - 3, sy(yv) - 3, sx(xv) + 3, sy(yv) + 3], fill=(31, 119, 180))
            d.text((sx(xv) + 4, sy(yv) - 6), r["id"], fill="gray")
        e = table[key].get("controlled") or table[key].get("all")
        d.text((ox + 4, oy + 4), f"{key}", fill="black")
        d.text((ox + 4, oy + cell - m + 4), f"r {e['pearson']:+.2f}  rho {e['spearman']:+.2f}", fill="black")
    img.save(path)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    paths = shared(args)
    rows = [member(args, m, paths, k + 1, len(args.members)) for k, m in enumerate(args.members)]
    report = {"members": rows, "minutes": (time.time() - t0) / 60}
    text, pngs = "", []
    for fam in sorted({r["family"] for r in rows}):  # correlations within a family only (the paper's protocol)
        fam_rows = [r for r in rows if r["family"] == fam]
        for target in ("gfid", "gfid_cfg"):
            table, excluded = correlate(fam_rows, target, args)
            report.setdefault(fam, {})[target] = {"table": table, "excluded": excluded,
                                                  "noise_floor": noise_floor(fam_rows, target)}
            text += markdown(fam_rows, table, excluded, target, args) + "\n"
            if table:
                pngs.append(f"scatter_{fam}_{target}.png")
                scatter(fam_rows, table, target, os.path.join(args.out, pngs[-1]))
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}/study.md, study.json, {', '.join(pngs) or 'no scatter (under 3 members a family)'} "
          f"({report['minutes']:.1f} min this call)")


if __name__ == "__main__":
    main()
