"""
The diffusability study at small scale (docs/fidelity.md d.3): a family of tokenizers spanning the
paper's regularisations is trained on the same data, each gets a latent cache, a tiny denoiser, samples and a
proxy gFID, then every latent metric (evaluate.py diffusability); the script correlates each metric with gFID
within the family (Pearson r and Spearman rho, bootstrap 95% intervals), with the paper's reconstruction control
(members more than --psnr_gap dB under the family's median PSNR are left out of the primary correlation; all are
also reported), and writes a markdown table, a JSON and a scatter grid.

  python study.py                               # family A (1D tokens, 9: ~80 min on 2 CPU cores) and B (2D grids, 4: ~2 h)
  python study.py --smoke                       # A1, A5, A7, A9
  python study.py --members A1,A3 --out results/study-x
  python study.py --launcher "torchrun --nproc_per_node=8" --data_path /data/imagenet/train \\
      --val_data_path /data/imagenet/val --tok_steps 20000 --dit_steps 50000 ...   # the same on GPUs

Resumes: every step of every member is skipped when its output exists, and a finished member (summary.json)
is not touched. A summary.json copied into <out>/<id>/ (with the same shared proxies) counts as finished.
"""
import argparse
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import latent_metrics as lm

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
SMOKE = ["A1", "A5", "A7", "A9"]
# the metrics correlated with gFID, and the direction the paper reports (+: higher metric, worse gFID); the
# grid-only ones (SEC, LDS, CDS, SRSS, LNC-FG, the direct equivariance error) enter family B's table only
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
    p.add_argument("--members", default=",".join(MEMBERS), help="comma list of member ids")
    p.add_argument("--smoke", action="store_true", help=f"only {','.join(SMOKE)}")
    p.add_argument("--launcher", default=sys.executable, help="how to run the scripts, e.g. 'torchrun --nproc_per_node=8'")
    p.add_argument("--data_path", default="builtin", help="training images (every script)")
    p.add_argument("--val_data_path", default=None, help="held-out images (builtin: its val split)")
    p.add_argument("--builtin_size", type=int, default=50_000, help="built-in training images")
    p.add_argument("--image_size", type=int, default=32, help="resolution of the proxy and the reference images")
    p.add_argument("--tok_steps", type=int, default=600, help="tokenizer steps per member")
    p.add_argument("--cache_images", type=int, default=5000, help="images in each latent cache")
    p.add_argument("--dit_model", default="tiny", help="denoiser preset of 1D-token members")
    p.add_argument("--dit_model_2d", default="LightningDiT-tiny", help="denoiser preset of 2D-grid members")
    p.add_argument("--dit_steps", type=int, default=1500, help="denoiser steps per member")
    p.add_argument("--dit_batch", type=int, default=64, help="denoiser global batch")
    p.add_argument("--num_samples", type=int, default=500, help="samples per member for gFID")
    p.add_argument("--sample_steps", type=int, default=25, help="Euler steps of those samples")
    p.add_argument("--cfg_scale", type=float, default=4.0, help="the guided gFID's scale (also reported: none)")
    p.add_argument("--num_val", type=int, default=1000, help="held-out images for the latent metrics and recon")
    p.add_argument("--tsne_reps", type=int, default=2, help="uniformity repetitions")
    p.add_argument("--proxy_steps", type=int, default=600, help="steps of the evaluation proxy and the teacher")
    p.add_argument("--psnr_gap", type=float, default=2.0, help="recon control: dB under the family median")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each correlation")
    p.add_argument("--num_workers", type=int, default=1, help="data loader workers of every script")
    args = p.parse_args(argv)
    args.members = SMOKE if args.smoke else [m for m in args.members.split(",") if m]
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
    return [f.format(teacher=paths["teacher"], init=init) for f in MEMBERS[mid][2]]


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


def shared(args):
    """The evaluation proxy, the teacher proxy (another seed: alignment must not target the metric's network)
    and the reference images, once per study."""
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "shared.log")
    paths = {k: os.path.join(args.out, f) for k, f in (("proxy", "proxy.pt"), ("teacher", "teacher_proxy.pt"),
                                                         ("ref", "ref_val.npz"))}
    data = ["--data_path", args.data_path] + (["--val_data_path", args.val_data_path] if args.val_data_path else [])
    for key, seed in (("proxy", 0), ("teacher", 1)):
        if not os.path.exists(paths[key]):
            run(args, "proxy.py", "--steps", str(args.proxy_steps), "--seed", str(seed), "--out", paths[key],
                "--image_size", str(args.image_size),
                "--num_workers", str(args.num_workers), *data, log=log)
    if not os.path.exists(paths["ref"]):
        import data as d
        src = d.build_source(args.val_data_path or args.data_path, args.image_size, "val", args.num_val)
        idx = d.balanced_subset(src.labels, args.num_val)
        ds = d.ImageDataset(src, args.image_size, train=False)
        arr = np.stack([d.to_uint8(ds[i][0][None])[0].numpy() for i in idx])
        np.savez(paths["ref"], arr_0=arr, labels=np.array([src.labels[i] for i in idx]))
    return paths


def digest(path):
    """A short hash of a checkpoint's tensors (not of the file): which proxies scored a summary."""
    sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode() + sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def member(args, mid, paths, k, n):
    """Train, cache, denoise, sample, score and measure one member; returns its summary."""
    fam, what, _ = MEMBERS[mid]
    d = os.path.join(args.out, mid)
    summary = os.path.join(d, "summary.json")
    if os.path.exists(summary):
        done = json.load(open(summary))
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
    data = ["--data_path", args.data_path, "--builtin_size", str(args.builtin_size)]
    common = ["--num_workers", str(args.num_workers)]
    if newest(os.path.join(d, "tok")) is None or not glob.glob(os.path.join(newest(os.path.join(d, "tok")), "checkpoints", "*.pt")):
        stage("tokenizer")
        run(args, "train_tokenizer.py", *member_flags(mid, paths, args.out), "--perceptual_weight",
            "0", "--max_steps", str(args.tok_steps), "--eval_every", str(args.tok_steps), "--grid_every", "-1",
            "--ckpt_every", str(args.tok_steps), "--log_every", "50", "--results_dir", os.path.join(d, "tok"),
            *data, *common, log=log)
    tok = newest(os.path.join(d, "tok"))
    cache = os.path.join(d, "cache")
    if not os.path.exists(os.path.join(cache, "meta.json")):
        stage("latent cache")
        run(args, "cache_latents.py", "--tokenizer_ckpt", tok, "--cache_path", cache, "--data_path", args.data_path,
            "--builtin_size", str(args.cache_images), "--cache_dtype", "float16", *common, log=log)
    if newest(os.path.join(d, "dit")) is None or not glob.glob(os.path.join(newest(os.path.join(d, "dit")), "checkpoints", "*.pt")):
        stage("denoiser")
        model = args.dit_model_2d if json.load(open(os.path.join(cache, "meta.json"))).get("grid") else args.dit_model
        run(args, "train_diffusion.py", "--model", model, "--cache_path", cache, "--results_dir",
            os.path.join(d, "dit"), "--global_batch_size", str(args.dit_batch), "--lr", "1e-3", "--time_dist",
            "logit_normal", "--max_steps", str(args.dit_steps), "--ema_decay", "0.99", "--log_every", "100",
            "--grid_every", "-1", "--ckpt_every", str(args.dit_steps), *common, log=log)
    dit = newest(os.path.join(d, "dit"))
    P = ["--feature_net", "proxy", "--proxy_ckpt", paths["proxy"]]
    gen = {}
    for cfg in (1.0, args.cfg_scale):
        npz, js = os.path.join(d, f"samples_cfg{cfg:g}.npz"), os.path.join(d, f"gen_cfg{cfg:g}.json")
        if not os.path.exists(js):
            stage(f"samples and gFID, CFG {cfg:g}")
            run(args, "sample.py", "--ckpt", dit, "--num_samples", str(args.num_samples), "--batch_size", "250",
                "--num_steps", str(args.sample_steps), "--cfg_scale", str(cfg), "--out", npz, log=log)
            run(args, "evaluate.py", "gen", "--samples", npz, "--ref", paths["ref"], *P, "--out", js, log=log)
        gen[cfg] = json.load(open(js))
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
        run(args, "evaluate.py", "diffusability", "--tokenizer_ckpt", tok, "--denoiser_ckpt", dit, *P, *val,
            "--num_val", str(args.num_val), "--num_ifid", str(min(1000, args.num_val)), "--tsne_reps",
            str(args.tsne_reps), "--out", dif, log=log)
    r, m = json.load(open(recon)), json.load(open(dif))
    out = {"id": mid, "family": fam, "what": what, "tokenizer": tok, "denoiser": dit,
           "gfid": gen[1.0]["proxy_fid"], "gfid_cfg": gen[args.cfg_scale]["proxy_fid"],
           "sample_class_accuracy": gen[1.0].get("class_accuracy"), "psnr": r["psnr"], "proxy_rfid": r["proxy_rfid"],
           **{k: v for k, v in m.items() if isinstance(v, float)},
           "posterior_sample": {k: v for k, v in m.get("posterior_sample", {}).items() if isinstance(v, float)},
           "proxy_digest": digest(paths["proxy"]), "teacher_digest": digest(paths["teacher"])}
    with open(summary + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(summary + ".tmp", summary)
    stage(f"done: gFID {out['gfid']:.2f} (CFG {args.cfg_scale:g}: {out['gfid_cfg']:.2f}), PSNR {out['psnr']:.2f}")
    return out


def correlate(rows, target, args):
    """Per metric: r and rho with bootstrap intervals, on the recon-controlled members and on all."""
    psnr = np.array([r["psnr"] for r in rows])
    keep = psnr >= np.median(psnr) - args.psnr_gap
    table = {}
    for key in METRICS:
        vals = [r.get(key) for r in rows]
        if any(v is None or not np.isfinite(v) for v in vals):
            continue
        x, y = np.array(vals, dtype=float), np.array([r[target] for r in rows])
        entry = {}
        for name, sel in (("controlled", keep), ("all", np.ones(len(rows), bool))):
            if sel.sum() < 3 or np.ptp(x[sel]) == 0:
                continue
            entry[name] = {"n": int(sel.sum()), "pearson": lm.pearson(x[sel], y[sel]),
                           "pearson_ci": lm.bootstrap_ci(x[sel], y[sel], lm.pearson, args.bootstrap),
                           "spearman": lm.spearman(x[sel], y[sel]),
                           "spearman_ci": lm.bootstrap_ci(x[sel], y[sel], lm.spearman, args.bootstrap)}
        if entry:
            table[key] = entry
    return table, [r["id"] for r, k in zip(rows, keep) if not k]


def markdown(rows, table, excluded, target, args):
    lines = [f"Proxy gFID ({'no CFG' if target == 'gfid' else f'CFG {args.cfg_scale:g}'}) against each metric, "
             f"family {rows[0]['family']}, {len(rows)} tokenizers; excluded by the recon control (PSNR more than {args.psnr_gap:g} dB "
             f"under the median): {', '.join(excluded) or 'none'}.", "",
             "| metric | paper's sign | r (controlled) [95% CI] | rho (controlled) [95% CI] | r (all) | rho (all) | n |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda e, k: f"{e[k]:+.2f} [{e[k + '_ci'][0]:+.2f}, {e[k + '_ci'][1]:+.2f}]" if e else "-"
    for key, e in table.items():
        c, a = e.get("controlled"), e.get("all")
        lines.append(f"| {key} | {METRICS[key]} | {fmt(c, 'pearson')} | {fmt(c, 'spearman')} | "
                     f"{a['pearson']:+.2f} | {a['spearman']:+.2f} | {(c or a)['n']} |" if a else f"| {key} | - |")
    lines += ["", "| id | tokenizer | PSNR | proxy rFID | gFID | gFID CFG | VIV_norm | LNC | probe |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['what']} | {r['psnr']:.2f} | {r['proxy_rfid']:.1f} | {r['gfid']:.2f} | "
                     f"{r['gfid_cfg']:.2f} | {r['viv_norm']:.3f} | {r['lnc']:.3f} | {r['linear_probe_accuracy']:.3f} |")
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
            report.setdefault(fam, {})[target] = {"table": table, "excluded": excluded}
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
