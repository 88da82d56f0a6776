"""
Metrics, as a CLI that prints a table and writes JSON.

  gen     FID, sFID, IS, precision / recall of an ADM-format sample batch against a reference batch, the ADM
          evaluator's definitions (openai/guided-diffusion/evaluations); or, with --feature_net proxy, FID /
          precision / recall in the proxy classifier's feature space plus the class accuracy of the samples.
            python evaluate.py gen --samples s.npz --ref VIRTUAL_imagenet256_labeled.npz
  recon   tokenizer reconstruction metrics on held-out images: rFID, PSNR, SSIM, LPIPS (EMA weights)
            torchrun --nproc_per_node=8 evaluate.py recon --ckpt tok.pt --data_path /data/imagenet/val
  latent  latent probes: linear-probe accuracy on flattened normalized latents, MAETok's GMM analysis
            python evaluate.py latent --ckpt tok.pt --data_path ...
  diffusability  every latent metric of the diffusability study (latent_metrics.py) in one JSON and a PNG
            python evaluate.py diffusability --tokenizer_ckpt tok.pt [--denoiser_ckpt dit] [--compare a.json,b.json]

Definitions: docs/metrics.md.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from scipy.special import xlogy
from tqdm import tqdm

import data
from engine import PRECISION_HELP, PRECISIONS, gather_to_rank0, use_all_threads
from latent_metrics import gmm_nll, linear_probe, pca_dim, pca_standardize

# ----------------------------------------------------------------------------------------------------------
# statistics and distances (numpy float64, as pytorch-fid and the ADM evaluator)


def gaussian_stats(feats):
    """(N, D) features -> mean (D,), unbiased covariance (D, D), in float64."""
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), pytorch-fid / ADM: if the square root is not finite,
    add eps I to both covariances; a complex result with |imag| > 1e-3 on the diagonal is an error."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """ADM: softmax, per split of split_size exp(mean KL(p(y|x) || p(y))), mean over splits."""
    preds = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = xlogy(part, part) - xlogy(part, part.mean(axis=0, keepdims=True))  # 0 log 0 = 0
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def pairwise_sq_dists(a, b, device=None):
    """Squared Euclidean distances (len(a), len(b)) in float32 on `device` (ADM computes them on the accelerator)."""
    a, b = (torch.as_tensor(v, dtype=torch.float32).to(device) for v in (a, b))
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def manifold_radii(feats, k=3, block=10_000, device=None):
    """Squared distance of each point to its k-th nearest neighbour in the same set (self excluded)."""
    radii = []
    for i in range(0, len(feats), block):
        d = torch.cat([pairwise_sq_dists(feats[i:i + block], feats[j:j + block], device)
                       for j in range(0, len(feats), block)], dim=1)
        radii.append(d.kthvalue(k + 1, dim=1).values)                        # index k: self is the 0th
    return torch.cat(radii)


def precision_recall(ref, samples, k=3, block=10_000, device=None):
    """Kynkaenniemi et al. (ADM): precision = share of samples inside some reference k-NN ball, recall = share
    of references inside some sample ball; computed in blocks, on `device` (the GPU where there is one)."""
    r_ref, r_s = manifold_radii(ref, k, block, device), manifold_radii(samples, k, block, device)
    in_ref = torch.zeros(len(samples), dtype=torch.bool, device=r_ref.device)
    in_s = torch.zeros(len(ref), dtype=torch.bool, device=r_ref.device)
    for i in range(0, len(ref), block):
        for j in range(0, len(samples), block):
            d = pairwise_sq_dists(ref[i:i + block], samples[j:j + block], device)  # (refs, samples)
            in_ref[j:j + block] |= (d <= r_ref[i:i + block, None]).any(dim=0)
            in_s[i:i + block] |= (d <= r_s[None, j:j + block]).any(dim=1)
    return in_ref.double().mean().item(), in_s.double().mean().item()


def psnr(x, y):
    """Per-image PSNR in dB of uint8-valued images (B, H, W, 3) (the usual convention: after rounding)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


def ssim(x, y, window=11, sigma=1.5):
    """Per-image SSIM (Wang et al. 2004) of uint8-valued images (B, H, W, 3): 11x11 Gaussian window (std 1.5),
    K1 0.01, K2 0.03, L 255, valid convolution, per channel, averaged. float64 on the images' device (the
    variances are differences of terms near 255^2: float32 would lose 1e-4 of SSIM); the Gaussian is separable,
    so two 11-tap passes replace the 121-tap one."""
    x, y = (t.double().permute(0, 3, 1, 2) for t in (x, y))
    n = torch.arange(window, dtype=torch.float64, device=x.device) - (window - 1) / 2
    g = torch.exp(-n ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    gh, gv = g.view(1, 1, 1, window).expand(3, 1, 1, window), g.view(1, 1, window, 1).expand(3, 1, window, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, gh, groups=3), gv, groups=3)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def gradient_energy(x):
    """Per-image mean |finite difference| (rows and columns) of uint8-valued images (B, H, W, 3): the ratio of a
    reconstruction's to the real image's is the sharpness ratio (1 = as sharp; blur pulls it below 1)."""
    x = x.double()
    return (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(1) + (x[:, :, 1:] - x[:, :, :-1]).abs().flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------------
# reading images and extracting features

def npz_batches(path, batch_size, key="arr_0", limit=None):
    """Yield uint8 (b, H, W, 3) batches of an .npz array without loading it whole (as the ADM evaluator)."""
    import zipfile
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{path!r}: {key} must be C-order uint8 (N, H, W, 3), got {dtype} {shape}")
        n, per = shape[0] if limit is None else min(limit, shape[0]), int(np.prod(shape[1:]))
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            yield np.frombuffer(f.read(b * per), dtype=np.uint8).reshape(b, *shape[1:])


def image_batches(path, batch_size, limit=None):
    """uint8 NHWC batches from an ADM .npz or an image folder (native size; folders: RGB as read)."""
    if path.endswith(".npz"):
        yield from npz_batches(path, batch_size, limit=limit)
        return
    src = data.ImageFolderSource(path)
    n = len(src) if limit is None else min(limit, len(src))
    for i in range(0, n, batch_size):
        yield np.stack([np.asarray(src.load(j)) for j in range(i, min(i + batch_size, n))])


class Features:
    """A named feature network on uint8 NHWC images -> dict of float64 numpy features.
    inception: pool3 (FID, P/R), spatial (sFID), logits (IS; the ADM graph's, no bias).
    proxy: the proxy classifier's penultimate features (FID, P/R) and logits (class accuracy)."""

    def __init__(self, kind, device, inception_ckpt=None, proxy_ckpt=None, net=None):
        self.kind, self.device = kind, device
        if net is not None:  # an already loaded network (tests, notebooks)
            self.net, self.id = net.to(device).eval(), f"{kind}-given"
        elif kind == "inception":
            from pretrained import load_inception
            self.net = load_inception(inception_ckpt).to(device)
            self.id = "inception-tf"
        else:
            from proxy import load_proxy
            if not proxy_ckpt:
                raise FileNotFoundError("--feature_net proxy needs --proxy_ckpt (train one with python proxy.py)")
            self.net = load_proxy(proxy_ckpt).to(device)
            st = os.stat(proxy_ckpt)
            self.id = "proxy-" + hashlib.sha1(f"{os.path.abspath(proxy_ckpt)}:{st.st_size}:{st.st_mtime}"
                                              .encode()).hexdigest()[:10]

    @torch.no_grad()
    def __call__(self, u8):
        """Features in fp32 wherever they are called from: a caller's bf16 autocast or TF32 would move FID."""
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(torch.device(self.device).type, enabled=False):
                return self.features(u8)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def features(self, u8):
        u8 = u8 if torch.is_tensor(u8) else torch.from_numpy(np.array(u8))  # a tensor may already be on the device
        x = u8.to(self.device).permute(0, 3, 1, 2).float() / 255
        if self.kind == "inception":
            out = self.net(x)
            out = {"pool": out["pool3"], "spatial": out["spatial"], "logits": out["logits_unbiased"]}
        else:
            x = x * 2 - 1
            f = self.net.features(x)
            out = {"pool": f, "logits": self.net.head(F.relu(f))}
        return {k: v.double().cpu().numpy() for k, v in out.items()}


def extract(feats, batches, rank=0, world=1, desc="features"):
    """Concatenated features of all batches on rank 0 (None on the others); under torchrun each rank takes
    every world-th batch."""
    parts = [(i, feats(b)) for i, b in enumerate(tqdm(batches, desc=desc, disable=rank != 0)) if i % world == rank]
    gathered = gather_to_rank0(parts, rank, world)
    if gathered is None:
        return None
    parts = sorted((p for g in gathered for p in g), key=lambda p: p[0])
    return {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]} if parts else {}


def reference_stats(path, feats, batch_size, rank, world, pr_images=10_000):
    """Statistics of a reference batch (on rank 0; None on the others): precomputed ADM mu / sigma / mu_s /
    sigma_s (Inception only) are used as is; otherwise computed and cached beside the file (a read-only folder:
    a warning, and the statistics are used all the same). P/R uses a seeded random pr_images of the features
    (an ADM batch: its first pr_images, which are in random order)."""
    cache = f"{path.rstrip('/')}.{feats.id}.stats.npz"
    st = os.stat(path)
    stamp = np.array([st.st_size, st.st_mtime])
    if os.path.isfile(cache):
        c = np.load(cache)
        if np.array_equal(c["stamp"], stamp):
            return {k: c[k] for k in c.files}
    pre = {}
    if path.endswith(".npz") and feats.kind == "inception":
        with np.load(path) as f:
            pre = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in f.files}
    limit = pr_images if "mu" in pre else None
    f = extract(feats, image_batches(path, batch_size, limit), rank, world, desc="reference features")
    if f is None:
        return None
    keep = np.sort(np.random.default_rng(0).permutation(len(f["pool"]))[:pr_images])  # a folder is class-sorted
    out = {"stamp": stamp, "pr_feats": f["pool"][keep]}
    if "mu" in pre:
        out.update(pre)
    else:
        out["mu"], out["sigma"] = gaussian_stats(f["pool"])
        if "spatial" in f:
            out["mu_s"], out["sigma_s"] = gaussian_stats(f["spatial"])
    try:
        np.savez(cache + ".tmp.npz", **out)
        os.replace(cache + ".tmp.npz", cache)
    except OSError as e:
        warnings.warn(f"cannot write the reference statistics cache {cache} ({e}); using them without caching")
    return out


def generation_metrics(sample_feats, ref, labels=None, split_size=5000, device=None):
    """The metrics table of one sample set against reference statistics (precision / recall on `device`)."""
    mu, sigma = gaussian_stats(sample_feats["pool"])
    out = {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    if "spatial" in sample_feats and "mu_s" in ref:
        mu_s, sigma_s = gaussian_stats(sample_feats["spatial"])
        out["sfid"] = frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"])
    if "spatial" in sample_feats:  # Inception: IS on the ADM logits
        out["inception_score"] = inception_score(sample_feats["logits"], split_size)
    out["precision"], out["recall"] = precision_recall(ref["pr_feats"], sample_feats["pool"], device=device)
    if labels is not None and "spatial" not in sample_feats:  # proxy: does the sample show its class?
        out["class_accuracy"] = float((sample_feats["logits"].argmax(1) == labels).mean())
    return out


# ----------------------------------------------------------------------------------------------------------
# the three commands

def setup(args):
    from engine import setup_distributed
    ddp, rank, world, _, device = setup_distributed()
    feats = None
    if getattr(args, "feature_net", None):
        try:
            feats = Features(args.feature_net, device, args.inception_ckpt, args.proxy_ckpt)
        except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
            sys.exit(f"error: {args.feature_net} feature network: {e}")
    return ddp, rank, world, device, feats


def run_folder(ckpt):
    """The folder a checkpoint belongs to (a run folder is its own)."""
    return ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))


def report(results, title, out, rank):
    """Print a two-column table and write the JSON."""
    if rank != 0:
        return
    print(f"\n{title}")
    w = max(len(k) for k in results)
    for k, v in results.items():
        print(f"  {k:<{w}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{w}}  {v}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")


def cmd_gen(args):
    for p in (args.samples, args.ref):
        if not os.path.exists(p):
            sys.exit(f"error: {p!r} not found (give ADM-format .npz files or an image folder as --ref)")
    ddp, rank, world, device, feats = setup(args)
    try:
        ref = reference_stats(args.ref, feats, args.batch_size, rank, world)
        s = extract(feats, npz_batches(args.samples, args.batch_size), rank, world, desc="sample features")
    except (ValueError, KeyError, OSError) as e:
        sys.exit(f"error: {e}")
    if rank != 0:  # the features went to rank 0
        return None
    if world > 1:  # the other ranks are done: rank 0's metrics get every CPU thread, not torchrun's one
        use_all_threads()
    labels = None
    with np.load(args.samples) as f:
        for key in ("labels", "arr_1"):
            if key in f.files:
                labels = f[key]
                break
    res = {"samples": args.samples, "ref": args.ref, "feature_net": feats.id, "num_samples": len(s["pool"]),
           **generation_metrics(s, ref, labels, args.is_split, device)}
    if feats.kind == "proxy":  # never mistaken for an Inception number
        res = {(f"proxy_{k}" if k in ("fid", "precision", "recall") else k): v for k, v in res.items()}
    report(res, f"generation metrics ({feats.id})", args.out or os.path.splitext(args.samples)[0] +
           f"-{feats.kind}-metrics.json", rank)
    return res


@torch.no_grad()
def cmd_recon(args):
    from engine import autocast_context
    from released import load
    from tokenizer import from_checkpoint
    ddp, rank, world, device, feats = setup(args)
    _, ctx = autocast_context(args.precision, device)
    tok = from_checkpoint(load(args.ckpt), ema=not args.raw).to(device)
    try:
        src = data.build_source(args.data_path, tok.image_size, "val", args.num_images)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    lpips = None
    if args.lpips:
        from pretrained import load_lpips
        try:
            lpips = load_lpips(args.vgg_ckpt).to(device)
        except (RuntimeError, FileNotFoundError, KeyError) as e:
            sys.exit(f"error: LPIPS: {e} (or evaluate without it: --lpips 0)")
    ds = data.ImageDataset(src, tok.image_size, train=False)                 # ADM center crop
    idx = data.balanced_subset(src.labels, args.num_images)                 # every class, not the first n
    sums = torch.zeros(6, dtype=torch.float64, device=device)               # psnr, ssim, lpips, count, sharpness
    fr, fx, hits = [], [], []  # hits: proxy only, does the reconstruction still show its class?
    batches = [idx[b:b + args.batch_size] for b in range(0, len(idx), args.batch_size)]
    for b in tqdm(batches[rank::world], desc="reconstructing", disable=rank != 0):
        items = [ds[i] for i in b]
        x = torch.stack([it[0] for it in items]).to(device)
        with ctx:
            rec = tok.decode(tok.encode(x)).float().clamp(-1, 1)
        u8x, u8r = data.to_uint8(x, device), data.to_uint8(rec, device)    # the metrics run where the images are
        lp = lpips(rec, x).sum().double() if lpips else torch.zeros((), dtype=torch.float64, device=device)
        sums += torch.stack([psnr(u8x, u8r).sum(), ssim(u8x, u8r).sum(), lp,
                             torch.tensor(float(len(x)), dtype=torch.float64, device=device),
                             gradient_energy(u8r).sum(), gradient_energy(u8x).sum()])
        if feats is not None:
            fx.append(feats(u8x)["pool"])
            out = feats(u8r)
            fr.append(out["pool"])
            if feats.kind == "proxy":
                hits.append(out["logits"].argmax(1) == np.array([it[1] for it in items]))
    if ddp:  # sums on the device (NCCL reduces CUDA tensors only); features to rank 0 only
        torch.distributed.all_reduce(sums)
        gathered = gather_to_rank0((fx, fr, hits), rank, world)
        if rank != 0:
            return None
        fx, fr, hits = ([a for g in gathered for a in g[j]] for j in range(3))
    sums = sums.cpu()
    res = {"ckpt": args.ckpt, "weights": "raw" if args.raw else "ema", "num_images": int(sums[3]),
           "psnr": (sums[0] / sums[3]).item(), "ssim": (sums[1] / sums[3]).item(),
           "sharpness_ratio": (sums[4] / sums[5]).item()}
    if lpips:
        res["lpips"] = (sums[2] / sums[3]).item()
    if feats is not None:
        name = "rfid" if feats.kind == "inception" else "proxy_rfid"
        res[name] = frechet_distance(*gaussian_stats(np.concatenate(fx)), *gaussian_stats(np.concatenate(fr)))
    if hits:  # the ceiling for the class accuracy of samples decoded by this tokenizer
        res["class_accuracy"] = float(np.concatenate(hits).mean())
    report(res, "reconstruction metrics", args.out or os.path.join(run_folder(args.ckpt), "recon-metrics.json"), rank)
    return res


@torch.no_grad()
def encode_labeled(tok, src, idx, device, batch_size=256):
    ds = data.ImageDataset(src, tok.image_size, train=False)
    z = []
    for b in tqdm(range(0, len(idx), batch_size), desc="encoding"):
        x = torch.stack([ds[i][0] for i in idx[b:b + batch_size]]).to(device)
        z.append(tok.encode(x).float().cpu())
    return torch.cat(z), torch.tensor([src.labels[i] for i in idx])


def cmd_latent(args):
    """Probes on held-out latents: the linear probe and the GMM NLL are fitted on one class-stratified part and
    measured on the other (the built-in data: its train and val splits)."""
    from released import load
    from tokenizer import from_checkpoint
    _, rank, _, device, _ = setup(args)
    if args.cache_path:  # cached (unflipped) latents
        c = data.LatentCache(args.cache_path)
        idx = data.balanced_subset(c.labels, args.num_images)
        z = torch.stack([c.shards[c.shard_of[i]]["latents"][c.row_of[i]].float() for i in idx])
        y = torch.tensor([c.labels[i] for i in idx])
        tr, te = data.stratified_split(y.tolist())
        (z_tr, y_tr), (z_te, y_te) = (z[tr], y[tr]), (z[te], y[te])
    else:
        tok = from_checkpoint(load(args.ckpt)).to(device)
        try:
            src = data.build_source(args.data_path, tok.image_size, "train", args.num_images)
            val = data.build_source(args.data_path, tok.image_size, "val", args.num_images // 4) \
                if args.data_path == data.BUILTIN else None
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        if val is not None:
            z_tr, y_tr = encode_labeled(tok, src, data.balanced_subset(src.labels, args.num_images), device)
            z_te, y_te = encode_labeled(tok, val, data.balanced_subset(val.labels, args.num_images // 4), device)
        else:
            sub = data.balanced_subset(src.labels, args.num_images)
            tr, te = data.stratified_split([src.labels[i] for i in sub])
            z_tr, y_tr = encode_labeled(tok, src, [sub[i] for i in tr], device)
            z_te, y_te = encode_labeled(tok, src, [sub[i] for i in te], device)
    res = {"source": args.cache_path or args.ckpt, "latent_shape": list(z_tr.shape[1:]),
           "num_train": len(z_tr), "num_test": len(z_te)}
    if len(torch.unique(y_tr)) > 1:
        res["linear_probe_accuracy"] = linear_probe(z_tr, y_tr, z_te, y_te)
    dim = args.pca_dim or pca_dim(z_tr.flatten(1), 0.9)
    x_tr, x_te = pca_standardize(z_tr.flatten(1), dim, z_te.flatten(1))
    ks = [int(k) for k in args.gmm_k.split(",")]
    nll = {k: gmm_nll(x_tr, k, x_test=x_te) for k in tqdm(ks, desc="GMM")}
    res.update({"gmm_pca_dim": dim, "gmm_nll_per_dim": {str(k): v / dim for k, v in nll.items()}})
    out = args.out or os.path.join(args.cache_path or run_folder(args.ckpt), "latent-metrics.json")
    report(res, "latent probes (held-out)", out, rank)
    if rank == 0:
        plot_gmm(ks, [nll[k] / dim for k in ks], os.path.splitext(out)[0] + "-gmm.png")
    return res


def plot_gmm(ks, nll, path, W=420, H=300, m=50):
    """NLL per dimension against the number of GMM components (log2 x axis), drawn with PIL."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo, hi = min(nll), max(nll) + 1e-9
    xs = [m + (W - 2 * m) * (math.log2(k) - math.log2(ks[0])) / max(1e-9, math.log2(ks[-1]) - math.log2(ks[0]))
          for k in ks]
    ys = [H - m - (H - 2 * m) * (v - lo) / (hi - lo) for v in nll]
    d.rectangle([m, m, W - m, H - m], outline="black")
    d.line(list(zip(xs, ys)), fill=(31, 119, 180), width=2)
    for x, y, k in zip(xs, ys, ks):
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
        d.text((x - 6, H - m + 6), str(k), fill="black")
    d.text((m, m - 30), f"GMM NLL per dim: {hi:.3f} (top) .. {lo:.3f} (bottom)", fill="black")
    d.text((W // 2 - 40, H - 20), "components K", fill="black")
    img.save(path)
    print(f"wrote {path}")


def cmd_diffusability(args):
    """Every latent metric of one tokenizer (one JSON and a PNG), or of several on the same images (their JSONs, one
    table and one figure side by side); diffusability.py, latent_metrics.py."""
    import diffusability as dif
    from engine import autocast_context
    paths = [p for p in args.tokenizer_ckpt.split(",") if p]
    if len(paths) > 1 and args.denoiser_ckpt:
        sys.exit("error: --denoiser_ckpt belongs to one tokenizer: give one --tokenizer_ckpt with it")
    _, rank, world, device, feats = setup(args)
    _, ctx = autocast_context(args.precision, device)
    # every tokenizer's variants are encoded on all ranks first (the only collective part); then rank 0 measures
    # alone, with every CPU thread (torchrun starts each rank with one), while the other ranks are already done
    encoded = [encode_for_diffusability(path, args, rank, world, device, ctx) for path in paths]
    if rank != 0:
        return None
    if world > 1:
        use_all_threads()
    results = [measure_diffusability(e, args, device, feats, ctx) for e in encoded]
    if len(paths) == 1:
        res = results[0]
        out = args.out or os.path.join(run_folder(paths[0]), "diffusability.json")
        flat = {k: v for k, v in res.items() if not isinstance(v, (dict, list)) or k == "latent_shape"}
        report(flat, "latent diffusability (docs/metrics.md)", out, rank)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        dif.plot_diffusability(res, [json.load(open(c)) for c in args.compare.split(",") if c], out[:-5] + ".png")
        return res
    out = args.out or "diffusability-comparison.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    with open(out[:-5] + ".md", "w") as f:
        f.write(dif.comparison_table(results))
    dif.plot_diffusability(results[0], results[1:], out[:-5] + ".png")
    print(dif.comparison_table(results) + f"\nwrote {out}, {out[:-5]}.md and {out[:-5]}.png")
    return results


def encode_for_diffusability(path, args, rank, world, device, ctx):
    """One tokenizer, its images and its latents (every variant; encoded across ranks, on rank 0)."""
    import diffusability as dif
    from released import load
    from tokenizer import from_checkpoint
    ckpt = load(path)
    tok = from_checkpoint(ckpt).to(device).eval()
    try:
        train = data.build_source(args.train_path or args.data_path, tok.image_size, "train", args.num_train)
        val = data.build_source(args.data_path, tok.image_size, "val", args.num_val)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    i_tr, i_va = data.balanced_subset(train.labels, args.num_train), data.balanced_subset(val.labels, args.num_val)
    # the held-out images in class turns: the metrics that take the first n (uniformity, iFID, equivariance) see
    # every class on a class-sorted folder such as ImageNet's, not its first classes
    i_va = [i_va[j] for j in data.round_robin([val.labels[i] for i in i_va])]
    y_tr, y_va = (torch.tensor([s.labels[i] for i in ix]) for s, ix in ((train, i_tr), (val, i_va)))
    kl = hasattr(tok, "moments")
    variants = {"mean": False, "sample": True} if kl and args.posterior == "both" else \
        {args.posterior if kl else "mean": args.posterior == "sample" and kl}
    layout = dif.token_layout(tok, ckpt["config"])
    fg = dif.fg_tokens(val, i_va, tok, layout) if layout is not None and hasattr(val, "mask") else None
    latents = {name: (dif.encode_split(tok, train, i_tr, device, ctx, rank, world, sample),
                      dif.encode_split(tok, val, i_va, device, ctx, rank, world, sample))
               for name, sample in variants.items()}
    return dict(path=path, ckpt=ckpt, tok=tok, val=val, i_va=i_va, y_tr=y_tr, y_va=y_va, layout=layout, fg=fg,
                latents=latents)


def measure_diffusability(e, args, device, feats, ctx):
    """The diffusability report of one encoded tokenizer (rank 0)."""
    import diffusability as dif
    tok, layout, val, i_va, y_tr, y_va = (e[k] for k in ("tok", "layout", "val", "i_va", "y_tr", "y_va"))
    stats, how = dif.normalisation(e["ckpt"], args.normalisation)
    res = {"tokenizer": e["path"], "family": tok.cfg.family, "latent_shape": list(tok.latent_shape),
           "num_train": len(y_tr), "num_val": len(y_va), "normalisation": how,
           "footprints": None if layout is None or not layout[3] else list(layout[0]),
           "grid": None if tok.grid is None else list(tok.grid)}
    latents = e["latents"]
    for name, (z_tr, z_va) in latents.items():
        m = dif.diffusability_metrics(z_tr, y_tr, z_va, y_va, layout, e["fg"], args, device, stats)
        res.update(m) if name == "mean" else res.update(posterior_sample=m)
    z_tr, z_va = latents["mean" if "mean" in latents else "sample"]
    if args.num_ifid > 0:
        (f_real, f_int, f_rec), eq = dif.diffusability_decoded(tok, z_tr, z_va, val, i_va, feats, device, ctx, args)
        mu_r, s_r = gaussian_stats(f_real)
        tag = "proxy_" if feats.kind == "proxy" else ""
        res.update({f"{tag}ifid": frechet_distance(*gaussian_stats(f_int), mu_r, s_r),
                    f"{tag}rfid": frechet_distance(*gaussian_stats(f_rec), mu_r, s_r), **eq})
    else:
        print("--num_ifid 0: iFID, rFID and the equivariance metrics (they decode images) are skipped")
    if args.denoiser_ckpt:
        res.update(dif.trajectory_report(args, device, ctx))
    return res


def cmd_curves(args):
    """A tokenizer run's reconstruction and diffusability-monitor curves (metrics.jsonl) in one PNG."""
    import diffusability as dif
    path = os.path.join(args.run, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"error: {args.run!r} holds no metrics.jsonl: give a train_tokenizer.py run folder")
    rows = [json.loads(line) for line in open(path)]
    if not any("monitor_lnc" in r for r in rows):
        print("no diffusability monitor in this run (train_tokenizer.py --diffusability_every N): reconstruction only")
    dif.plot_training_curves(rows, args.out or os.path.join(args.run, "curves.png"))


def main(argv=None):
    p = argparse.ArgumentParser(description="nanotok metrics")
    sub = p.add_subparsers(dest="cmd", required=True)

    def feature_flags(q, default):
        q.add_argument("--feature_net", default=default, choices=["inception", "proxy"],
                       help="inception: the FID InceptionV3 (ADM-compatible); proxy: the proxy classifier")
        q.add_argument("--inception_ckpt", default=None, help="local pt_inception-2015-12-05-6726825d.pth")
        q.add_argument("--proxy_ckpt", default=None, help="proxy network from proxy.py")
        q.add_argument("--batch_size", type=int, default=100, help="images per forward")
        q.add_argument("--out", default=None, help="JSON output path (default: beside the samples / checkpoint)")

    g = sub.add_parser("gen", help="FID / sFID / IS / precision / recall of an .npz sample batch")
    g.add_argument("--samples", required=True, help="ADM-format .npz (arr_0 uint8 NHWC, optional labels)")
    g.add_argument("--ref", required=True, help="reference .npz (ADM batch, with or without mu/sigma) or folder")
    g.add_argument("--is_split", type=int, default=5000, help="Inception Score split size (ADM: 5000)")
    feature_flags(g, "inception")
    r = sub.add_parser("recon", help="rFID / PSNR / SSIM / LPIPS of a tokenizer on held-out images")
    r.add_argument("--ckpt", required=True, help="tokenizer run folder, checkpoint or official MAETok release")
    r.add_argument("--data_path", default=data.BUILTIN, help="held-out images (builtin: its val split)")
    r.add_argument("--num_images", type=int, default=50_000, help="images evaluated (ImageNet val: 50K)")
    r.add_argument("--lpips", type=int, default=1, choices=[0, 1], help="compute LPIPS (needs VGG16 weights)")
    r.add_argument("--vgg_ckpt", default=None, help="local VGG16 weights for LPIPS")
    r.add_argument("--raw", action="store_true", help="raw instead of EMA weights")
    r.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    feature_flags(r, "inception")
    lat = sub.add_parser("latent", help="linear probe and GMM analysis of a tokenizer's latents")
    lat.add_argument("--ckpt", default=None, help="tokenizer run folder, checkpoint or official MAETok release")
    lat.add_argument("--cache_path", default=None, help="or a latent cache (cache_latents.py)")
    lat.add_argument("--data_path", default=data.BUILTIN, help="labeled images to encode")
    lat.add_argument("--num_images", type=int, default=10_000, help="latents used")
    lat.add_argument("--pca_dim", type=int, default=None, help="GMM: common PCA dim (default: 90%% variance)")
    lat.add_argument("--gmm_k", default="1,2,4,8,16,32,64", help="GMM: comma list of component counts")
    lat.add_argument("--out", default=None, help="JSON output path, the plot beside it (default: in the cache / run)")
    dif = sub.add_parser("diffusability", help="every latent metric of the diffusability study, JSON + PNG")
    dif.add_argument("--tokenizer_ckpt", required=True,
                     help="tokenizer run folder, checkpoint or release; a comma list compares several on the same "
                          "images (one table and figure)")
    dif.add_argument("--normalisation", default="pipeline", choices=["pipeline", "channel"],
                     help="pipeline: as the tokenizer's own pipeline normalises its latents (a release's scaling or "
                          "statistics; nanotok's and VA-VAE's: per channel, train statistics); channel: always per "
                          "channel with train statistics")
    dif.add_argument("--data_path", default=data.BUILTIN, help="labelled held-out images (builtin: val split)")
    dif.add_argument("--train_path", default=None, help="images for statistics / iFID neighbours (default: "
                     "data_path's train split)")
    dif.add_argument("--denoiser_ckpt", default=None, help="a diffusion run on this tokenizer: trajectory metrics")
    dif.add_argument("--num_train", type=int, default=2000, help="train images (statistics, probe, neighbours)")
    dif.add_argument("--num_val", type=int, default=2000, help="held-out images (every metric)")
    dif.add_argument("--num_ifid", type=int, default=1000,
                     help="held-out images decoded for iFID / rFID and the equivariance metrics (0: skip them)")
    dif.add_argument("--num_trajectories", type=int, default=256, help="denoiser samples for trajectory metrics")
    dif.add_argument("--posterior", default="both", choices=["mean", "sample", "both"],
                     help="KL tokenizers: metrics on the posterior mean, a sample, or both")
    dif.add_argument("--lnc_k", type=int, default=10, help="LNC neighbours")
    dif.add_argument("--viv_samples", type=int, default=512, help="Monte-Carlo samples per t node (marginal VIV)")
    dif.add_argument("--tsne_points", type=int, default=2000, help="uniformity: t-SNE points")
    dif.add_argument("--tsne_reps", type=int, default=3, help="uniformity: repetitions (VA-VAE: 10)")
    dif.add_argument("--compare", default="", help="comma list of other diffusability JSONs for the plot")
    dif.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    feature_flags(dif, "proxy")
    cur = sub.add_parser("curves", help="a tokenizer run's reconstruction and diffusability-monitor curves, PNG")
    cur.add_argument("--run", required=True, help="train_tokenizer.py run folder (its metrics.jsonl)")
    cur.add_argument("--out", default=None, help="output .png (default: curves.png in the run)")
    args = p.parse_args(argv)
    if args.cmd == "latent" and not (args.ckpt or args.cache_path):
        p.error("latent needs --ckpt or --cache_path")
    if getattr(args, "batch_size", 1) <= 0 or getattr(args, "num_images", 1) <= 0:
        p.error("--batch_size and --num_images must be positive")
    try:
        return {"gen": cmd_gen, "recon": cmd_recon, "latent": cmd_latent,
                "diffusability": cmd_diffusability, "curves": cmd_curves}[args.cmd](args)
    finally:  # under torchrun: tear gloo / NCCL down before exit (a live group can abort the process at exit)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
