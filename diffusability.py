"""
The parts of `python evaluate.py diffusability` (the command itself is evaluate.cmd_diffusability): every latent
metric of the diffusability study for one tokenizer, in one JSON and a PNG (the metric math is latent_metrics.py;
definitions and section numbers: docs/metrics.md).

  python evaluate.py diffusability --tokenizer_ckpt results/001-tiny --proxy_ckpt proxy.pt \
      [--denoiser_ckpt results/002-tiny] [--compare other/diffusability.json,...]
  torchrun --nproc_per_node=8 evaluate.py diffusability --tokenizer_ckpt ... --data_path /data/imagenet/val \
      --train_path /data/imagenet/train --feature_net inception --num_val 50000

Latents are normalised per channel with train statistics, as the denoiser sees them; KL tokenizers are measured
on the posterior mean and on a sample (`posterior_sample`). The images are encoded across ranks; the metrics run
on rank 0. `monitor` is the cheap view that train_tokenizer.py --diffusability_every logs while a tokenizer trains.
"""
import math
import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import latent_metrics as lm
import mactok
from diffusion import DiT, DiTConfig, Transport, guided_velocity
import released
from engine import gather_to_rank0


def encode_split(tok, src, idx, device, ctx, rank, world, sample=False, batch_size=128):
    """Latents (posterior mean, or a sample) of src[idx], encoded across ranks, on rank 0 (None elsewhere)."""
    ds = data.ImageDataset(src, tok.image_size, train=False)
    mine, out = idx[rank::world], []
    for b in tqdm(range(0, len(mine), batch_size), desc="encoding", disable=rank != 0):
        x = torch.stack([ds[i][0] for i in mine[b:b + batch_size]]).to(device)
        with torch.no_grad(), ctx:
            z = mactok.sample_posterior(*tok.moments(x)) if sample else tok.encode(x)
        out.append(z.float().cpu())
    parts = gather_to_rank0(torch.cat(out), rank, world)
    if parts is None:
        return None
    z = torch.empty(len(idx), *parts[0].shape[1:])
    for r, p in enumerate(parts):
        z[r::world] = p
    return z


def token_layout(tok, trained):
    """(grid, positions (T, 2), patch -> token map, prefix) where a spatial reading exists: a grid tokenizer's own
    cells, or MacTok's local alignment (in the config it was trained with, `trained`), which gives token j the
    patches j N/L ... consecutively, a (g, g L / N) token grid of footprints; None for free 1D tokens."""
    if tok.grid is not None:  # one token per patch (a latent map's shuffle moves them: its patch_owner)
        owner = getattr(tok, "patch_owner", None)
        owner = torch.arange(tok.grid[0] * tok.grid[1]) if owner is None else owner.cpu()
        return tuple(tok.grid), lm.grid_coords(*tok.grid), owner, ""
    c = tok.cfg
    if "local" not in trained.get("align", ()) or c.num_patches % c.num_latent_tokens:
        return None
    per, g = c.num_patches // c.num_latent_tokens, c.grid_size
    if g % per:
        return None
    grid = (g, g // per)
    return grid, lm.grid_coords(*grid), torch.arange(c.num_patches) // per, "footprint_"


def fg_tokens(src, idx, tok, layout):
    """Foreground per token (N, T): a patch is FG if any of its pixels is (coverage > 0.5), a token if any of
    its patches is (iREPA's max-pool)."""
    p = tok.image_size // layout[0][0]                                        # a layout row is a row of patches
    m = torch.stack([torch.from_numpy(src.mask(i) > 0.5) for i in idx]).float()[:, None]
    patch = F.max_pool2d(m, p).flatten(1) > 0                                  # (N, num_patches)
    owner = layout[2]
    return torch.stack([patch[:, owner == j].any(1) for j in range(int(owner.max()) + 1)], 1)


def normalisation(ckpt, rule="pipeline"):
    """((mean, std) or None for per-channel train statistics, how in words) of a tokenizer's latents. 'pipeline':
    as the tokenizer's own pipeline feeds its denoiser: a release's latent_stats (SD-VAE: z x 0.18215; MAETok:
    its scalar vq_mean / vq_std), else per channel with train statistics (nanotok's runs; VA-VAE, whose
    latents_stats.pt are per-channel training statistics too)."""
    stats = ckpt.get("latent_stats") if rule == "pipeline" else None
    if stats is None:
        return None, "per channel, train statistics"
    mean, std = (torch.as_tensor(stats[k]).float().flatten() for k in ("mean", "std"))
    how = ckpt.get("latent_normalisation") or (f"(z - {mean.tolist()}) / {std.tolist()}" if mean.numel() <= 4
                                               else "(z - mean_c) / std_c, the release's per-channel statistics")
    return (mean, std), f"release pipeline: {how}"


def comparison_table(results):
    """A markdown table of every scalar metric (rows) of several tokenizers (columns), with how each is
    normalised."""
    names = [run_name(str(r["tokenizer"])) for r in results]
    keys = [k for k in results[0] if all(isinstance(r.get(k), float) for r in results)]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {k} | " + " | ".join(f"{r[k]:.4g}" for r in results) + " |" for k in keys]
    lines += ["", "Normalisation: " + "; ".join(f"{n}: {r['normalisation']}" for n, r in zip(names, results))]
    return "\n".join(lines) + "\n"


def diffusability_metrics(z_tr, y_tr, z_va, y_va, layout, fg, args, device=None, stats=None):
    """Every latent-only metric on normalised latents (`stats` = (mean, std), else per-channel train
    statistics); the all-pairs ones (LNC) in row blocks on `device`."""
    mean, std = stats if stats is not None else (z_tr.mean((0, 1)), z_tr.std((0, 1)).clamp_min(1e-8))
    u_tr, u_va = (z_tr - mean) / std, (z_va - mean) / std
    res = {}
    v = lm.viv(u_va, y_va)
    res.update({"viv": v["viv"], "viv_norm": v["viv_norm"]})
    res.update(lm.viv_marginal(u_va, y_va, samples=args.viv_samples))
    ts = [i / 20 for i in range(21)]
    res["iv_curve"] = {"t": ts, "iv_per_dim": lm.iv_curve(v["eigs"], ts)}
    U = torch.stack([lm.flip_flop(u_va[y_va == c])[0] for c in torch.unique(y_va)]).mean(0)
    res.update(lm.sec_1d(torch.linalg.eigvalsh(U)))
    res["lnc"] = lm.lnc(u_va.flatten(1), y_va, args.lnc_k, device)           # the flattened latent (grids too)
    res["linear_probe_accuracy"] = lm.linear_probe(u_tr, y_tr, u_va, y_va)
    dim = lm.pca_dim(u_tr.flatten(1), 0.9)
    x_tr, x_va = lm.pca_standardize(u_tr.flatten(1), dim, u_va.flatten(1))
    res.update({"gmm_pca_dim": dim, "gmm_nll_per_dim_k10": lm.gmm_nll(x_tr, 10, x_test=x_va) / dim})
    if layout is not None:  # a grid, or token footprints on the image grid
        grid, pos, _, tag = layout
        H = grid[0]
        far, dmax = max(2, round(6 * H / 16)), max(3, round(8 * H / 16))
        res.update({tag + k: val for k, val in lm.spatial_metrics(u_va, pos, fg, far, dmax, 1, far).items()})
        if fg is not None:
            f, keep = lm.fg_pool(u_va, fg)
            res["lnc_fg"] = lm.lnc(f, y_va[keep], args.lnc_k, device)
        res.update({tag + k: val for k, val in lm.sec(u_va, grid).items()})
    res["rmsc"] = lm.rmsc(u_va)                                              # needs no grid
    n = min(args.tsne_points, len(u_va))
    res.update(lm.latent_uniformity(u_va[:n], reps=args.tsne_reps))
    return res


def diffusability_decoded(tok, z_tr, z_va, val, i_va, feats, device, ctx, args):
    """The features of the real images, of the decoded SLERP interpolations (0.5, to a train neighbour) and of the
    reconstructions (iFID and rFID are their FDs to the first), and the equivariance of the encoder (1D tokens: the
    learned-linear R^2 of section 10)."""
    g = torch.Generator().manual_seed(0)
    ds = data.ImageDataset(val, tok.image_size, train=False)
    n = min(args.num_ifid, len(i_va))
    x = torch.stack([ds[i][0] for i in i_va[:n]])
    dec = lambda z: torch.cat([tok.decode(c.to(device)).float().cpu() for c in z.split(128)])
    enc = lambda x: torch.cat([tok.encode(c.to(device)).float().cpu() for c in x.split(128)])
    with torch.no_grad(), ctx:
        interp = dec(lm.slerp(z_va[:n], lm.neighbours(z_va[:n], z_tr, generator=g)))
        rec = dec(z_va[:n])
        f_real, f_int, f_rec = (feats(data.to_uint8(im)) ["pool"] for im in (x, interp, rec))
        half = n // 2
        eq = lm.linear_equivariance(enc, x[:half], x[half:])
        if tok.grid is not None:  # encoder-side errors on the grid itself (section 7)
            eq.update(lm.grid_equivariance(enc, x, tuple(tok.grid)))
    return (f_real, f_int, f_rec), eq


def trajectory_report(args, device, ctx):
    """ODE trajectory metrics of a trained denoiser: Euler, 50 steps, no CFG (the paper's), balanced labels."""
    ck = released.load(args.denoiser_ckpt)
    model = DiT(DiTConfig(**ck["config"])).to(device).eval()
    model.load_state_dict(ck["ema"])
    c = model.cfg
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(args.num_trajectories) % max(c.num_classes, 1)).to(device)
    noise = torch.randn(args.num_trajectories, c.num_tokens, c.in_channels, generator=g).to(device)
    traj = []
    with ctx:
        Transport().sample(guided_velocity(model, y if c.num_classes else None), noise, "euler", 50, trajectory=traj)
    ts, states = [t for t, _ in traj], torch.stack([x for _, x in traj])
    m = lm.trajectory_metrics(states, ts)
    return {"trajectory_" + k: v for k, v in m.items()}


MONITOR_CLASSES = 50  # the monitor's subset spans at most this many classes (ImageNet: 20 images of each of 50)


def monitor_subset(labels, n, seed=0):
    """n held-out indices, class-balanced over at most MONITOR_CLASSES evenly spaced classes (with 1000 classes,
    1000 images would hold one per class: no neighbours or probe to measure)."""
    classes = sorted(set(labels))
    keep = set(classes[::math.ceil(len(classes) / MONITOR_CLASSES)])
    idx = [i for i, c in enumerate(labels) if c in keep]
    return [idx[j] for j in data.balanced_subset([labels[i] for i in idx], n, seed)]


@torch.no_grad()
def monitor(tok, ds, idx, labels, device, ctx, k=10, batch_size=128):
    """LNC, linear-probe accuracy and VIV_norm (docs/metrics.md sections 1, 2) of tok's latents of ds[idx],
    normalised per channel with the subset's own statistics; the probe trains on half of each class and is tested
    on the other half. Draws no random numbers: the training run it watches is unchanged."""
    z = []
    for b in range(0, len(idx), batch_size):
        x = torch.stack([ds[i][0] for i in idx[b:b + batch_size]]).to(device)
        with ctx:
            z.append(tok.encode(x).float().cpu())                            # (b, L, C)
    z = torch.cat(z)
    u = (z - z.mean((0, 1))) / z.std((0, 1)).clamp_min(1e-8)
    y = torch.unique(torch.tensor(labels), return_inverse=True)[1]          # classes 0..K-1
    tr, te = data.stratified_split(y.tolist(), 0.5, seed=0)
    with torch.enable_grad():
        probe = lm.linear_probe(u[tr], y[tr], u[te], y[te])
    return {"lnc": lm.lnc(u.flatten(1), y, k, device), "linear_probe_accuracy": probe,
            "viv_norm": lm.viv(u, y)["viv_norm"]}


def run_name(path):
    """A run folder's name (for a checkpoint file: its run's)."""
    path = os.path.normpath(path)
    if os.path.isfile(path):
        path = os.path.dirname(os.path.dirname(path)) if os.path.basename(os.path.dirname(path)) == "checkpoints" \
            else os.path.dirname(path)
    return os.path.basename(path)


def plot_diffusability(res, refs, path, W=760, H=420):
    """Bars of the headline metrics (this tokenizer and the --compare ones, each metric scaled to its largest
    value) and IV(t) / D for each, drawn with PIL."""
    keys = [k for k in ("viv_norm", "viv_marginal_norm", "lnc", "linear_probe_accuracy", "srss", "lds",
                        "footprint_srss", "footprint_lds", "sec_0.5", "sec1d_0.5", "density_cv", "proxy_ifid",
                        "eq_err_rot90", "eq_linear_r2_rot90",
                        "trajectory_global_efficiency") if isinstance(res.get(k), float)]
    runs = [res] + refs
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    row, x0, bw = (H - 60) / max(len(keys), 1), 150, 260
    for i, k in enumerate(keys):
        vals = [r.get(k) for r in runs]
        top = max(abs(v) for v in vals if isinstance(v, float)) or 1
        y = 30 + i * row
        d.text((8, y + row / 2 - 6), k, fill="black")
        for j, v in enumerate(vals):
            if isinstance(v, float):
                h = row * 0.8 / len(runs)
                d.rectangle([x0, y + j * h, x0 + bw * abs(v) / top, y + (j + 1) * h - 1], fill=colours[j % 6])
                d.text((x0 + bw * abs(v) / top + 4, y + j * h), f"{v:.3g}", fill="black")
    px, py, pw, ph = 470, 40, 270, 300                                         # IV(t) / D
    d.rectangle([px, py, px + pw, py + ph], outline="black")
    curves = [r["iv_curve"] for r in runs if "iv_curve" in r]
    top = max(max(c["iv_per_dim"]) for c in curves) if curves else 1
    for j, c in enumerate(curves):
        pts = [(px + pw * t, py + ph - ph * v / top) for t, v in zip(c["t"], c["iv_per_dim"])]
        d.line(pts, fill=colours[j % 6], width=2)
    d.text((px, py - 16), f"IV(t) / D (0 .. {top:.3g}); t = 1 noise", fill="black")
    d.text((px, py + ph + 6), "t = 0", fill="black")
    d.text((px + pw - 30, py + ph + 6), "t = 1", fill="black")
    for j, r in enumerate(runs):
        d.text((px, py + ph + 24 + 14 * j), run_name(str(r.get("tokenizer"))), fill=colours[j % 6])
    img.save(path)
    print(f"wrote {path}")


MONITOR_PANELS = (("pixel", "reconstruction loss (train)"), ("eval_psnr_ema", "held-out PSNR (EMA)"),
                  ("monitor_lnc", "LNC"), ("monitor_linear_probe_accuracy", "linear probe"),
                  ("monitor_viv_norm", "VIV_norm"))


def plot_training_curves(rows, path, cell=240, m=34):
    """One panel per curve of a tokenizer run's metrics.jsonl rows against the step: its reconstruction (training
    loss, held-out PSNR) beside the diffusability monitor's LNC, probe and VIV_norm (train_tokenizer.py
    --diffusability_every)."""
    panels = [(k, t) for k, t in MONITOR_PANELS if any(k in r for r in rows)]
    img = Image.new("RGB", (cell * max(len(panels), 1), cell), "white")
    d = ImageDraw.Draw(img)
    for i, (key, title) in enumerate(panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        s, v = zip(*pts)
        ox = i * cell
        d.rectangle([ox + m, m, ox + cell - 10, cell - m], outline="black")
        sx = lambda x: ox + m + (cell - 10 - m) * (x - min(s)) / ((max(s) - min(s)) or 1)
        sy = lambda y: cell - m - (cell - 2 * m) * (y - min(v)) / ((max(v) - min(v)) or 1)
        if len(pts) > 1:
            d.line([(sx(a), sy(b)) for a, b in pts], fill=(31, 119, 180), width=2)
        if len(pts) < 40:  # the points too, where they are few enough to see
            for a, b in pts:
                d.ellipse([sx(a) - 2, sy(b) - 2, sx(a) + 2, sy(b) + 2], fill=(31, 119, 180))
        d.text((ox + 6, 6), title, fill="black")
        d.text((ox + 6, 18), f"{min(v):.3g} .. {max(v):.3g}", fill="gray")
        d.text((ox + m, cell - m + 6), f"step {min(s)} .. {max(s)}", fill="black")
    img.save(path)
    print(f"wrote {path}")
